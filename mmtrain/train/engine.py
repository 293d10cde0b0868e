"""Distributed setup and the DeepSpeed engine: the only module that imports deepspeed.

* :func:`init_distributed` — nccl on GPU, gloo on CPU; a plain ``python script.py`` process gets
  single-process defaults for RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
* :func:`deepspeed_config` — the DeepSpeed JSON derived from the typed config (nowhere else).
* :func:`build_engine` — AdamW with decay/no-decay groups, warmup + decay schedule,
  ``deepspeed.initialize``.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from mmtrain.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["engine.device: 'cuda' was asked for but no CUDA device is available"])
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    import deepspeed

    device_type = resolve_device(device_preference)
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # A plain single process (python mmtrain/pretrain.py): give it a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    if device_type == "cpu" and "deepspeed_shm_comm" in getattr(deepspeed.ops, "__compatible_ops__", {}):
        # DeepSpeed >= 0.14 on CPU JIT-compiles a shared-memory allreduce op on first use (~40 s); gloo suffices.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def grad_accum_steps(train_cfg, world_size: int) -> int:
    per_step = train_cfg.micro_batch_size * world_size
    if train_cfg.global_batch_size % per_step:
        raise ConfigError([
            f"train.global_batch_size {train_cfg.global_batch_size} is not divisible by "
            f"train.micro_batch_size {train_cfg.micro_batch_size} x world size {world_size} = {per_step}"
        ])
    return train_cfg.global_batch_size // per_step


def deepspeed_config(cfg, world_size: int, micro_batch: Optional[int] = None,
                     micro_steps: Optional[int] = None) -> Dict:
    """The DeepSpeed config for a run, derived from the typed config (the only place it is built).

    ``micro_batch`` / ``micro_steps``: what one engine micro-step holds and how many make an
    optimizer step, when the task's unit is not train.micro_batch_size sequences x the
    accumulation steps (gradient-cached retrieval: one micro-step per embedded chunk).
    """
    t, e = cfg.train, cfg.engine
    micro_batch = int(t.micro_batch_size if micro_batch is None else micro_batch)
    micro_steps = int(grad_accum_steps(t, world_size) if micro_steps is None else micro_steps)
    zero: Dict = {"stage": int(e.zero_stage)}
    if e.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    ds = {
        "train_batch_size": micro_batch * micro_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": float(e.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not e.torch_adam:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.adam_eps,
                       "weight_decay": t.weight_decay},
        }
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float, mixing_weight_decay: bool = True,
                 base_lr: float = 0.0) -> List[Dict]:
    """AdamW groups: decay on matrices; none on norms, biases, embeddings (and tied heads), nor on
    the masked token-mixing matrices when ``mixing_weight_decay`` is false. A parameter with an
    ``lr_scale`` attribute gets a group of its own, without decay, at ``base_lr * lr_scale``."""
    exempt = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if not mixing_weight_decay:
        exempt |= {id(m.mixing_parameter) for m in model.modules() if getattr(m, "is_token_mixing", False)}
    decay, no_decay, scaled = [], [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "lr_scale", None) is not None:
            scaled.append({"params": [param], "weight_decay": 0.0, "lr": base_lr * float(param.lr_scale)})
        elif len(getattr(param, "ds_shape", param.shape)) < 2 or id(param) in exempt:  # ds_shape: ZeRO-3 partitioned
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ] + scaled


def lr_factor(step: int, train_cfg) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = train_cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return 1.0
    total = max(train_cfg.steps - warmup, 1)
    progress = min(max(step - warmup, 0) / total, 1.0)
    floor = train_cfg.min_lr_ratio
    if train_cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(cfg, model: torch.nn.Module, world_size: int,
                 ds_config: Optional[Dict] = None) -> Tuple[object, Dict]:
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the LR schedule (``ds_config``: default
    :func:`deepspeed_config`).

    Returns ``(engine, ds_config)``; ``engine.optimizer`` and ``engine.lr_scheduler`` are set.
    """
    import deepspeed

    ds_config = ds_config or deepspeed_config(cfg, world_size)
    t = cfg.train
    groups = param_groups(model, t.weight_decay, t.get("mixing_weight_decay", True), base_lr=t.lr)
    optimizer = None
    if cfg.engine.torch_adam:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)

    def scheduler_factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=scheduler_factory,
        config=ds_config,
        dist_init_required=False,
    )
    if getattr(cfg.engine, "compile", False):
        # Experimental: torch.compile of the wrapped module (inductor). Same losses to fp32
        # rounding; the first steps pay minutes of compilation on a CPU.
        engine.compile()
    return engine, ds_config


def peak_flops(device: torch.device, precision: str, max_size: int = 2048, budget_s: float = 0.25) -> float:
    """Measured dense matmul FLOP/s on ``device`` for the training dtype.

    On CPUs without native bf16/fp16 matmuls those are emulated far below the fp32 rate; the
    peak the hardware offers is then the fp32 one, so the better of the two is returned.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    rate = _matmul_rate(device, dtype, max_size, budget_s)
    if device.type == "cpu" and dtype != torch.float32:
        rate = max(rate, _matmul_rate(device, torch.float32, max_size, budget_s))
    return rate


def _matmul_rate(device: torch.device, dtype: torch.dtype, max_size: int, budget_s: float) -> float:
    """Best FLOP/s of square matmuls of growing size (256, 512, ... max_size), stopping after one
    takes ``budget_s`` (which bounds the time where a dtype is emulated and ~100x slow)."""
    import time

    def timed(a, b) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    best, size = 0.0, 256
    while size <= max_size:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        first = timed(a, b)  # warm-up; it is the measurement when it alone exceeds the budget
        seconds = first if first > budget_s else min(timed(a, b), timed(a, b))
        best = max(best, 2.0 * size**3 / seconds)
        if seconds > budget_s:
            break
        size *= 2
    return best
