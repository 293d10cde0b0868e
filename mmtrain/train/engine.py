"""Distributed setup and the DeepSpeed engine: the only module that imports deepspeed.

* :func:`init_distributed` — nccl on GPU, gloo on CPU; a plain ``python script.py`` process gets
  single-process defaults for RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
* :func:`deepspeed_config` — the DeepSpeed JSON derived from the typed config (nowhere else).
* :func:`build_engine` — AdamW with decay/no-decay groups, warmup + decay schedule
  (:func:`mmtrain.optim.lr_factor`, shared with frozen-retrieval's scorer),
  ``deepspeed.initialize``.
* :func:`peak_flops` — the peak FLOP/s MFU divides by, with its source: ``engine.peak_flops``,
  the data-sheet table :data:`DEVICE_PEAKS`, or a measured matmul.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from mmtrain.config import ConfigError
from mmtrain.optim import Schedule, lr_factor


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
    the masked token-mixing matrices when ``mixing_weight_decay`` is false. The parameters a model
    lists in ``scaled_parameters()`` (an embedder's logit scale) get a group each, without decay,
    at ``base_lr * scale``."""
    exempt = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    scales = {id(p): s for p, s in (model.scaled_parameters() if hasattr(model, "scaled_parameters") else [])}
    if not mixing_weight_decay:
        exempt |= {id(m.mixing_parameter) for m in model.modules() if getattr(m, "is_token_mixing", False)}
    decay, no_decay, scaled = [], [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in scales:
            scaled.append({"params": [param], "weight_decay": 0.0, "lr": base_lr * float(scales[id(param)])})
        elif len(getattr(param, "ds_shape", param.shape)) < 2 or id(param) in exempt:  # ds_shape: ZeRO-3 partitioned
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ] + scaled


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

    schedule = Schedule.of(t)

    def scheduler_factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule))

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


# ---- peak FLOP/s for MFU ------------------------------------------------------------------------

@dataclass(frozen=True)
class DevicePeak:
    """Dense (no structured sparsity) peak FLOP/s of one device, per training precision."""

    name: str
    pattern: str        #: regex searched in the lower-cased ``torch.cuda.get_device_name()``
    bf16: float
    fp16: float
    fp32: float         #: plain FP32 (CUDA cores), what an fp32 run's matmuls use by default
    tf32: float         #: TF32 tensor cores, used only when torch allows TF32 matmuls
    source: str         #: the vendor document the figures come from


_T = 1e12
# Vendors' data sheets list tensor-core rates "with sparsity" (2:4 structured), which are twice
# the dense rates; only the dense figures are used here. Decimals as in the architecture
# whitepapers (the data sheets round them: H100 SXM FP32 "67", BF16 "1,979*" = 2 x 989.4).
#   H100 SXM / PCIe: "NVIDIA H100 Tensor Core GPU" data sheet and "NVIDIA H100 Tensor Core GPU
#                    Architecture" whitepaper: SXM5 FP32 66.9, TF32 494.7, BF16/FP16 989.4 TFLOPS;
#                    PCIe FP32 51.2, TF32 378, BF16/FP16 756.5 TFLOPS (dense).
#   H200 (SXM):      "NVIDIA H200 Tensor Core GPU" data sheet: the H100 SXM compute figures
#                    (FP32 67, TF32 989*, BF16/FP16 1,979* TFLOPS, * = with sparsity).
#   A100 SXM/PCIe:   "NVIDIA A100 Tensor Core GPU" data sheet, 40 GB and 80 GB alike: FP32 19.5,
#                    TF32 156, BF16/FP16 312 TFLOPS dense (312* and 624* with sparsity).
#   L4:              "NVIDIA L4 Tensor Core GPU" data sheet: FP32 30.3, TF32 120*, BF16/FP16 242*
#                    TFLOPS (* = with sparsity), i.e. TF32 60 and BF16/FP16 121 dense.
# Order matters: the first pattern that matches wins (H100 PCIe before the other H100s). The NVL
# parts (H100 NVL, H200 NVL) have other clocks and power limits and are not in the table: they
# get a measured peak, as does every other device.
DEVICE_PEAKS: Tuple[DevicePeak, ...] = (
    DevicePeak("NVIDIA H100 PCIe", r"\bh100\b.*\bpcie\b", 756.5 * _T, 756.5 * _T, 51.2 * _T, 378.0 * _T,
               "NVIDIA H100 Tensor Core GPU data sheet"),
    DevicePeak("NVIDIA H100 SXM", r"\bh100\b(?!.*\bnvl\b)", 989.4 * _T, 989.4 * _T, 66.9 * _T, 494.7 * _T,
               "NVIDIA H100 Tensor Core GPU data sheet"),
    DevicePeak("NVIDIA H200", r"\bh200\b(?!.*\bnvl\b)", 989.4 * _T, 989.4 * _T, 66.9 * _T, 494.7 * _T,
               "NVIDIA H200 Tensor Core GPU data sheet"),
    DevicePeak("NVIDIA A100", r"\ba100\b", 312.0 * _T, 312.0 * _T, 19.5 * _T, 156.0 * _T,
               "NVIDIA A100 Tensor Core GPU data sheet"),
    DevicePeak("NVIDIA L4", r"\bl4\b", 121.0 * _T, 121.0 * _T, 30.3 * _T, 60.0 * _T,
               "NVIDIA L4 Tensor Core GPU data sheet"),
)


@dataclass(frozen=True)
class PeakFlops:
    """The peak FLOP/s per device that MFU divides by, and where it came from: ``source`` is
    ``"config: engine.peak_flops"``, ``"table: <device> <dtype> dense (<data sheet>)"`` or
    ``"measured: <dtype> matmul on <device>"``."""

    value: float
    source: str

    def __float__(self) -> float:
        return float(self.value)

    def describe(self) -> str:
        """``"989.4 TFLOP/s (table: NVIDIA H100 SXM bf16 dense (...))"`` for a log line."""
        return f"{_format_flops(self.value)} ({self.source})"


def _format_flops(value: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.3g} FLOP/s"


def device_name(device: torch.device) -> str:
    """The name the peak table is matched against (``torch.cuda.get_device_name``; "" on CPU)."""
    if device.type != "cuda":
        return ""
    return torch.cuda.get_device_name(device)


def tf32_matmuls_enabled() -> bool:
    """Whether torch may run fp32 CUDA matmuls on TF32 tensor cores (off by default)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def table_peak(name: str, precision: str, tf32: bool = False) -> Optional[PeakFlops]:
    """The data-sheet dense peak of the device called ``name`` for ``precision`` (bf16, fp16, fp32;
    fp32 with ``tf32`` = TF32 tensor cores), or None for a device the table does not know."""
    lowered = name.lower()
    for entry in DEVICE_PEAKS:
        if re.search(entry.pattern, lowered):
            dtype = "tf32" if precision == "fp32" and tf32 else precision
            if dtype not in ("bf16", "fp16", "fp32", "tf32"):
                return None
            return PeakFlops(getattr(entry, dtype), f"table: {entry.name} {dtype} dense ({entry.source})")
    return None


def peak_flops(device: torch.device, precision: str, configured: float = 0.0, max_size: int = 2048,
               budget_s: float = 0.25) -> PeakFlops:
    """Peak FLOP/s per device for MFU, and its source, in this order:

    1. ``configured`` > 0 (``engine.peak_flops``): that value, source ``config: engine.peak_flops``;
    2. a CUDA device in :data:`DEVICE_PEAKS`: its dense data-sheet figure for the training dtype
       (fp32: plain FP32, or TF32 when torch allows TF32 matmuls);
    3. otherwise a dense matmul measured on ``device`` in the training dtype. On CPUs without
       native bf16/fp16 matmuls those are emulated far below the fp32 rate; the peak the
       hardware offers is then the fp32 one, so the better of the two is used (and named).
    """
    if configured > 0:
        return PeakFlops(float(configured), "config: engine.peak_flops")
    if device.type == "cuda":
        known = table_peak(device_name(device), precision, tf32=precision == "fp32" and tf32_matmuls_enabled())
        if known is not None:
            return known
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtype, label = dtypes.get(precision, torch.float32), precision if precision in dtypes else "fp32"
    rate = _matmul_rate(device, dtype, max_size, budget_s)
    if device.type == "cpu" and dtype != torch.float32:
        fp32_rate = _matmul_rate(device, torch.float32, max_size, budget_s)
        if fp32_rate > rate:
            rate, label = fp32_rate, "fp32"
    where = device.type if device.type == "cpu" else f"{device.type} {device_name(device)}".strip()
    return PeakFlops(rate, f"measured: {label} matmul on {where}")


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
