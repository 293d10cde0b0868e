"""Training throughput, step time, peak memory and MFU through the DeepSpeed engine.

One full training step (forward, backward, AdamW step with gradient clipping) of each model goes
through ``mmtrain.train.engine.build_engine`` (one process, ZeRO stage ``--zero-stage``) on random
tokens (vocabulary 4096; no data loader, so only model + engine are measured), for every n_ctx:

* ``mixer``        our flat masked mixer (``model.kind=mixer``; packed lower-triangular mixing)
* ``mixer-mh``     our multi-head mixer (``model.mixer_heads``)
* ``mixer-dense-param``  our mixer with ``model.mixer_layout=dense`` (full n_ctx x n_ctx parameters
                   and masks, the layout of earlier versions; the same triangular-op speed path)
* ``mixer-dense``  our mixer with ``model.mixer_impl=dense`` and the dense layout (the plain
                   masked product)
* ``paper-mixer``  reference: the paper's formulation, token mixing as ``nn.Conv1d(n_ctx, n_ctx, 1)``
                   over positions-as-channels whose weight is re-masked in place with ``tril`` every
                   forward; same width, depth, MLP (d -> 4d -> d, GELU) and final LayerNorm as ours
* ``transformer``  our Llama (``model.kind=transformer``)
* ``hf-llama``     reference: Hugging Face ``LlamaForCausalLM`` built from our transformer's
                   ``hf_config_dict()`` (same size; SDPA attention, ``use_cache=False``)

Reported per row: median step time over ``--repeats`` steps after ``--warmup`` steps, tokens/s =
batch * n_ctx / median step time, peak memory, and MFU = tokens/s * FLOPs per token / matmul peak.
FLOPs per token come from each of our models' ``flops_per_token(n_ctx)``; each reference gets the
count of its equivalent (paper-mixer: our flat mixer's; hf-llama: our transformer's). The matmul
peak is measured in the same run, for the same dtype. Ratios compare each of our models with its
reference measured in the same run (tokens/s and memory).

Engine-overhead rows: the flat mixer at ``--overhead-n-ctx`` in a plain PyTorch loop (same model,
torch AdamW with the same parameter groups, LR schedule and gradient clipping; bf16 through
autocast) and through the engine at ZeRO 1, 2 and 3; ratio = engine / plain loop.

Peak memory: on CPU every configuration runs in its own forked process and reports its peak RSS
minus the RSS it started with (after imports; see benchmarks/_common.py); on CUDA
``torch.cuda.max_memory_allocated``.

    python benchmarks/throughput.py --quick            # tiny sizes, 2 n_ctx, < ~45 s on 2 cores
    python benchmarks/throughput.py                    # d 256 x 4, n_ctx 128 ... 4096, fp32, CPU
    python benchmarks/throughput.py --gpu              # d 1024 x 8, bf16, batch 8, CUDA
    python benchmarks/throughput.py --models mixer transformer --n-ctx 512 --d-model 512 --layers 8

Writes ``<out-dir>/throughput.{md,csv,png}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import (ROOT, fmt, machine_info, markdown_table, matmul_peak, median, memory_meter,
                     preload_engine_modules, quiet_deepspeed, report, run_isolated, single_process_env,
                     timed_repeats)

import torch
from torch import nn



LABELS = {
    "mixer": "mixer (ours)",
    "mixer-mh": "mixer multi-head (ours)",
    "mixer-dense-param": "mixer dense params (ours)",
    "mixer-dense": "mixer dense (ours)",
    "paper-mixer": "paper mixer, Conv1d (ref)",
    "transformer": "transformer (ours)",
    "hf-llama": "HF LlamaForCausalLM (ref)",
    "toeplitz": "Toeplitz mixer (ours)",
    "toeplitz-mh": "Toeplitz mixer multi-head (ours)",
}
REFERENCE = {"mixer": "paper-mixer", "mixer-mh": "paper-mixer", "mixer-dense": "paper-mixer",
             "mixer-dense-param": "paper-mixer",
             "transformer": "hf-llama", "toeplitz": "mixer", "toeplitz-mh": "mixer-mh"}
ALL_MODELS = list(LABELS)
#: The default sweep (the Toeplitz rows are asked for by name: --models toeplitz mixer transformer).
DEFAULT_MODELS = [m for m in ALL_MODELS if not m.startswith("toeplitz")]

PRESETS = {
    "default": dict(n_ctx=[128, 256, 512, 1024, 2048, 4096], d_model=256, layers=4, batch=4, dtype="fp32",
                    device="auto", warmup=1, repeats=3, overhead_n_ctx=512, peak_size=2048, threads=0),
    "quick": dict(n_ctx=[32, 64], d_model=32, layers=2, batch=2, dtype="fp32", device="cpu", threads=1,
                  warmup=1, repeats=3, overhead_n_ctx=64, peak_size=512),
    "gpu": dict(n_ctx=[128, 256, 512, 1024, 2048, 4096], d_model=1024, layers=8, batch=8, dtype="bf16",
                device="cuda", warmup=3, repeats=10, overhead_n_ctx=1024, peak_size=8192, threads=0),
}
VOCAB = 4096


# --------------------------------------------------------------------------------------------
# The paper's formulation (reference)
# --------------------------------------------------------------------------------------------

class PaperMixerBlock(nn.Module):
    """The paper's mixer block: ``x += Conv1d(n_ctx, n_ctx, 1)(LN(x))`` with positions as
    channels, the conv weight re-masked in place with ``tril`` at every forward; then
    ``x += MLP(LN(x))``. x [B, n_ctx, d] -> [B, n_ctx, d] (inputs must be exactly n_ctx long)."""

    def __init__(self, d_model: int, n_ctx: int, ffn_mult: int, eps: float):
        super().__init__()
        self.seq_layernorm = nn.LayerNorm(d_model, eps=eps)
        self.conv = nn.Conv1d(n_ctx, n_ctx, 1)
        self.patch_layernorm = nn.LayerNorm(d_model, eps=eps)
        self.patch_ff = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                      nn.Linear(ffn_mult * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = self.conv.weight[..., 0]            # [n_ctx out, n_ctx in]
            weight.copy_(torch.tril(weight))
        x = x + self.conv(self.seq_layernorm(x))
        return x + self.patch_ff(self.patch_layernorm(x))


class PaperMixerLM(nn.Module):
    """Embedding -> PaperMixerBlock x n_layers -> LayerNorm -> LM head; ``forward(input_ids,
    labels)`` returns an object with ``.logits`` [B, L, V] and the shifted cross-entropy ``.loss``."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_ctx: int, ffn_mult: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(PaperMixerBlock(d_model, n_ctx, ffn_mult, eps) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        from mmtrain.models import CausalLMOutput, causal_lm_loss

        h = self.wte(input_ids)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.final_norm(h))
        return CausalLMOutput(logits, None if labels is None else causal_lm_loss(logits, labels))


# --------------------------------------------------------------------------------------------
# Building and measuring one configuration
# --------------------------------------------------------------------------------------------

def our_model_config(name: str, job: Dict[str, Any]) -> Dict[str, Any]:
    """ModelConfig dict of one of our models (or of a reference's equivalent)."""
    base = dict(d_model=job["d_model"], n_layers=job["layers"], n_ctx=job["n_ctx"], vocab_size=VOCAB)
    if name in ("mixer", "paper-mixer"):
        return dict(base, kind="mixer")
    if name == "mixer-mh":
        return dict(base, kind="mixer", mixer_heads=job["mixer_heads"])
    if name == "mixer-dense-param":
        return dict(base, kind="mixer", mixer_layout="dense")
    if name == "mixer-dense":
        return dict(base, kind="mixer", mixer_impl="dense", mixer_layout="dense")
    if name in ("transformer", "hf-llama"):
        return dict(base, kind="transformer", n_heads=job["heads"])
    if name == "toeplitz":
        return dict(base, kind="mixer", mixer_matrix="toeplitz")
    if name == "toeplitz-mh":
        return dict(base, kind="mixer", mixer_matrix="toeplitz", mixer_heads=job["mixer_heads"])
    raise ValueError(name)


def build(name: str, job: Dict[str, Any]):
    """(model, training FLOPs per token) for one benchmark row."""
    from mmtrain.models import build_model

    config = our_model_config(name, job)
    if name in ("paper-mixer", "hf-llama"):
        with torch.device("meta"):  # the equivalent of ours, only for its FLOP count and HF config
            equivalent = build_model(config, VOCAB)
        flops = equivalent.flops_per_token(job["n_ctx"])
        if name == "paper-mixer":
            return PaperMixerLM(VOCAB, job["d_model"], job["layers"], job["n_ctx"]), flops
        from mmtrain.export.hf import llama_classes

        llama_config_cls, llama_cls = llama_classes()
        hf_config = llama_config_cls(**equivalent.hf_config_dict(), use_cache=False)
        hf_config._attn_implementation = "sdpa"
        return llama_cls(hf_config), flops
    model = build_model(config, VOCAB)
    return model, model.flops_per_token(job["n_ctx"])


def train_config(job: Dict[str, Any], zero_stage: int):
    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig

    return load_config(PretrainConfig, [], [
        f"train.micro_batch_size={job['batch']}", f"train.global_batch_size={job['batch']}",
        f"engine.zero_stage={zero_stage}", f"engine.precision={job['dtype']}", "engine.torch_adam=true",
        f"engine.device={job['device']}", "engine.grad_clip=1.0", "train.warmup_steps=0",
    ])


def engine_step(cfg, model, device, input_ids):
    from mmtrain.train.engine import build_engine

    engine, _ = build_engine(cfg, model, world_size=1)

    def step():
        out = engine(input_ids, labels=input_ids)
        engine.backward(out.loss)
        engine.step()
    return step


def plain_step(cfg, model, device, input_ids):
    """The same training step without DeepSpeed: torch AdamW, LR schedule, gradient clipping."""
    from mmtrain.train.engine import lr_factor, param_groups

    t = cfg.train
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    bf16 = cfg.engine.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids, labels=input_ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.engine.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(job: Dict[str, Any]) -> Dict[str, Any]:
    """Build, warm up and time one configuration; runs in its own process on CPU."""
    from mmtrain.train.engine import init_distributed

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if device.type == "cpu":
        single_process_env()
    init_distributed(job["device"])
    quiet_deepspeed()
    meter = memory_meter(device)
    torch.manual_seed(0)
    model, flops = build(job["model"], job)
    params = sum(p.numel() for p in model.parameters())
    cfg = train_config(job, job["zero_stage"])
    input_ids = torch.randint(0, VOCAB, (job["batch"], job["n_ctx"]), device=device)
    make_step = plain_step if job["mode"] == "plain" else engine_step
    step = make_step(cfg, model, device, input_ids)
    times = timed_repeats(step, device, job["warmup"], job["repeats"])
    step_s = median(times)
    tokens_per_s = job["batch"] * job["n_ctx"] / step_s
    return dict(params=params, step_s=step_s, tokens_per_s=tokens_per_s, peak_mem_mib=meter.peak_mib(),
                mem_method=meter.method, flops_per_token=flops)


def measure_peak(device_name: str, dtype: str, threads: int, max_size: int) -> Dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {"peak_flops": matmul_peak(device, torch_dtype, max_size)}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, n_ctx 32 and 64 (smoke run, < ~45 s)")
    p.add_argument("--gpu", action="store_true", help="preset: d 1024, 8 layers, batch 8, bf16, CUDA")
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=DEFAULT_MODELS)
    p.add_argument("--n-ctx", type=int, nargs="+", help="context lengths (default 128 ... 4096)")
    p.add_argument("--d-model", type=int, help="width d (default 256; --gpu 1024)")
    p.add_argument("--layers", type=int, help="blocks (default 4; --gpu 8)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4; --gpu 8)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="training precision (default fp32; --gpu bf16)")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3], help="ZeRO stage of the sweep")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the transformers (default 4)")
    p.add_argument("--mixer-heads", type=int, default=4, help="heads of the multi-head mixer (default 4)")
    p.add_argument("--warmup", type=int, help="untimed steps per configuration (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps per configuration; the median is reported (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (--quick: cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0 = torch's default; --quick: 1)")
    p.add_argument("--overhead-n-ctx", type=int, help="n_ctx of the engine-overhead rows (default 512)")
    p.add_argument("--no-overhead", action="store_true", help="skip the engine-overhead rows")
    p.add_argument("--max-gib", type=float, default=0.0,
                   help="skip a row whose weights, gradients and AdamW moments (16 bytes per stored fp32 "
                        "parameter) alone exceed this many GiB; 0 = no limit")
    p.add_argument("--max-step-s", type=float, default=0.0,
                   help="after a step slower than this, skip the model's longer n_ctx; 0 = no limit")
    p.add_argument("--crossover", type=int, nargs=2, metavar=("B1", "B2"),
                   help="also measure the peak memory of each mixer row and the transformer at these two "
                        "batch sizes (one step each) and report the batch size from which the mixer needs "
                        "less memory than the transformer (peak memory is affine in the batch size)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="where throughput.{md,csv,png} go (default runs/benchmarks)")
    args = p.parse_args(argv)
    if args.quick and args.gpu:
        p.error("--quick and --gpu are exclusive presets; pick one")
    preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    problems = []
    if any(n < 2 for n in args.n_ctx):
        problems.append(f"--n-ctx: every context length must be >= 2, got {args.n_ctx}")
    for name, value in (("--d-model", args.d_model), ("--layers", args.layers), ("--batch", args.batch),
                        ("--repeats", args.repeats), ("--heads", args.heads), ("--mixer-heads", args.mixer_heads)):
        if value < 1:
            problems.append(f"{name}: must be >= 1, got {value}")
    if args.warmup < 0:
        problems.append(f"--warmup: must be >= 0, got {args.warmup}")
    if args.d_model % args.heads:
        problems.append(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if "mixer-mh" in args.models and args.d_model % args.mixer_heads:
        problems.append(f"--d-model {args.d_model} is not divisible by --mixer-heads {args.mixer_heads}")
    if args.dtype == "bf16" and args.zero_stage == 0:
        problems.append("--dtype bf16 needs --zero-stage >= 1 (DeepSpeed's ZeRO-0 bf16 path drifts)")
    from mmtrain.config import ConfigError
    from mmtrain.train.engine import resolve_device

    try:
        args.device = resolve_device(args.device)
    except ConfigError as exc:
        problems.append(f"--device: {exc.problems[0]}")
    if problems:
        p.error("\n  " + "\n  ".join(problems))
    return args


def state_too_large(job: Dict[str, Any], max_gib: float) -> Optional[str]:
    """A reason to skip the row when 16 bytes per stored parameter (fp32 weight, gradient, two
    AdamW moments) exceed ``max_gib``, counted on the meta device; else None."""
    if not max_gib or job["model"] in ("paper-mixer", "hf-llama"):
        return None
    from mmtrain.models import build_model

    with torch.device("meta"):
        stored = build_model(our_model_config(job["model"], job), VOCAB).stored_params()
    need = 16.0 * stored / 2 ** 30
    return f"does not fit: {need:.1f} GiB of weights, gradients and moments > {max_gib:g}" if need > max_gib else None


def row_of(job: Dict[str, Any], section: str, label: str) -> Dict[str, Any]:
    """The fields of a table row that describe its configuration."""
    return dict(section=section, model=job["model"], label=label, n_ctx=job["n_ctx"], d_model=job["d_model"],
                n_layers=job["layers"], batch=job["batch"], dtype=job["dtype"],
                zero_stage=job["zero_stage"] if job["mode"] == "engine" else "", mode=job["mode"],
                device=job["device"])


def job_for(args, model: str, n_ctx: int, mode: str = "engine", zero_stage: Optional[int] = None) -> Dict[str, Any]:
    return dict(model=model, n_ctx=n_ctx, d_model=args.d_model, layers=args.layers, batch=args.batch,
                dtype=args.dtype, device=args.device, heads=args.heads, mixer_heads=args.mixer_heads,
                zero_stage=args.zero_stage if zero_stage is None else zero_stage, mode=mode,
                warmup=args.warmup, repeats=args.repeats, threads=args.threads)


def run_all(args) -> Dict[str, Any]:
    fork = args.device == "cpu"
    peak = run_isolated(measure_peak, args.device, args.dtype, args.threads, args.peak_size, fork=fork)
    if "error" in peak:
        raise RuntimeError(f"matmul peak measurement failed: {peak['error']}")
    records: List[Dict[str, Any]] = []

    def run(job, section, label):
        start = time.perf_counter()
        result = run_isolated(measure, job, fork=fork)
        record = dict(row_of(job, section, label), **result)
        if "error" not in result:
            record["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak["peak_flops"]
        records.append(record)
        status = result.get("error") or f"{result['tokens_per_s']:,.0f} tok/s"
        print(f"  {label:<34} n_ctx {job['n_ctx']:>5}: {status} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr, flush=True)
        return record

    too_slow = set()
    for n_ctx in args.n_ctx:
        for model in args.models:
            job = job_for(args, model, n_ctx)
            skip = ("not run: a shorter n_ctx took over --max-step-s" if model in too_slow else
                    state_too_large(job, args.max_gib))
            if skip:
                records.append(dict(row_of(job, "sweep", LABELS[model]), error=skip, skipped=True))
                print(f"  {LABELS[model]:<34} n_ctx {n_ctx:>5}: {skip}", file=sys.stderr, flush=True)
                continue
            record = run(job, "sweep", LABELS[model])
            if args.max_step_s and record.get("step_s", 0.0) > args.max_step_s:
                too_slow.add(model)
    if not args.no_overhead:
        n_ctx = args.overhead_n_ctx
        run(job_for(args, "mixer", n_ctx, mode="plain"), "overhead", "mixer, plain PyTorch loop")
        for stage in (1, 2, 3):
            run(job_for(args, "mixer", n_ctx, zero_stage=stage), "overhead", f"mixer, engine ZeRO {stage}")
    if args.crossover:
        mixers = [m for m in args.models if m.startswith("mixer")]
        for n_ctx in args.n_ctx:
            for model in mixers + ["transformer"]:
                for batch in args.crossover:
                    job = dict(job_for(args, model, n_ctx), batch=batch, warmup=0, repeats=1)
                    run(job, "crossover", LABELS[model])
    add_ratios(records)
    return {"peak_flops": peak["peak_flops"], "records": records}


def crossover_table(records: List[Dict[str, Any]]) -> str:
    """Per n_ctx and mixer: peak memory at the two batch sizes, the transformer's, and the
    smallest batch from which the mixer's (affine) peak memory is below the transformer's."""
    rows = []
    mem = {(r["model"], r["n_ctx"], r["batch"]): r["peak_mem_mib"] for r in records
           if r["section"] == "crossover" and "error" not in r}
    batches = sorted({b for (_, _, b) in mem})
    if len(batches) != 2:
        return ""
    b1, b2 = batches
    for model, n_ctx in dict.fromkeys((m, n) for (m, n, _) in mem if m != "transformer"):
        keys = [(model, n_ctx, b1), (model, n_ctx, b2), ("transformer", n_ctx, b1), ("transformer", n_ctx, b2)]
        if not all(k in mem for k in keys):
            continue
        m1, m2, t1, t2 = (mem[k] for k in keys)
        m_slope, t_slope = (m2 - m1) / (b2 - b1), (t2 - t1) / (b2 - b1)
        m_base, t_base = m1 - m_slope * b1, t1 - t_slope * b1
        if m_base <= t_base and m_slope <= t_slope:
            cross = "every batch"
        elif t_slope <= m_slope:
            cross = "never (per-sequence memory not smaller)"
        else:
            cross = f"{max(1, math.floor((m_base - t_base) / (t_slope - m_slope)) + 1)}"
        rows.append([LABELS[model], n_ctx, fmt(m1, 1), fmt(m2, 1), fmt(t1, 1), fmt(t2, 1),
                     f"{m_slope:,.1f} / {t_slope:,.1f}", cross])
    headers = ["mixer", "n_ctx", f"mixer MiB @{b1}", f"mixer MiB @{b2}", f"transformer MiB @{b1}",
               f"transformer MiB @{b2}", "MiB per sequence (mixer / transformer)", "mixer below from batch"]
    return markdown_table(headers, rows, align="lrrrrrrl")


def add_ratios(records: List[Dict[str, Any]]) -> None:
    """tokens/s and memory ratios: ours / reference (same n_ctx), engine / plain loop."""
    def find(section, model, n_ctx, mode="engine"):
        for r in records:
            if (r["section"], r["model"], r["n_ctx"], r["mode"]) == (section, model, n_ctx, mode) and "error" not in r:
                return r
        return None

    for r in records:
        if "error" in r or r["section"] == "crossover":
            continue
        if r["section"] == "sweep":
            ref = find("sweep", REFERENCE.get(r["model"], ""), r["n_ctx"])
            r["vs"] = LABELS[ref["model"]] if ref else ""
        else:
            ref = find("overhead", "mixer", r["n_ctx"], mode="plain") if r["mode"] == "engine" else None
            r["vs"] = "plain loop" if ref else ""
        if ref is not None:
            r["tokens_per_s_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["peak_mem_ratio"] = r["peak_mem_mib"] / ref["peak_mem_mib"] if ref["peak_mem_mib"] > 0 else None


TABLE_HEADERS = ["model", "n_ctx", "ZeRO", "stored params (M)", "step (ms)", "tokens/s", "peak mem (MiB)", "MFU",
                 "tokens/s ratio", "mem ratio", "ratio vs"]


def table(records: List[Dict[str, Any]]) -> str:
    rows = []
    for r in records:
        zero = r["zero_stage"] if r["mode"] == "engine" else "—"
        if "error" in r:
            rows.append([r["label"], r["n_ctx"], zero] + ["not run" if r.get("skipped") else "failed"] + [""] * 6
                        + [r["error"][:80]])
            continue
        ratio = r.get("tokens_per_s_ratio")
        mem_ratio = r.get("peak_mem_ratio")
        rows.append([
            r["label"], r["n_ctx"], zero, f"{r['params'] / 1e6:.2f}", fmt(1e3 * r["step_s"], 1),
            fmt(r["tokens_per_s"]), fmt(r["peak_mem_mib"], 1), f"{100 * r['mfu']:.1f}%",
            "—" if ratio is None else f"{ratio:.2f}x", "—" if mem_ratio is None else f"{mem_ratio:.2f}x",
            r.get("vs") or "—",
        ])
    return markdown_table(TABLE_HEADERS, rows, align="lrrrrrrrrrl")


def plot(records: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    fig, (ax_tps, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    sweep = [r for r in records if r["section"] == "sweep" and "error" not in r]
    for model in dict.fromkeys(r["model"] for r in sweep):
        rows = sorted((r for r in sweep if r["model"] == model), key=lambda r: r["n_ctx"])
        x = [r["n_ctx"] for r in rows]
        style = "--" if model in ("paper-mixer", "hf-llama") else "-"
        ax_tps.plot(x, [r["tokens_per_s"] for r in rows], style, marker="o", label=LABELS[model])
        ax_mem.plot(x, [r["peak_mem_mib"] for r in rows], style, marker="o", label=LABELS[model])
    for ax, ylabel in ((ax_tps, "tokens/s (training step)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("n_ctx")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_tps.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    quiet_deepspeed()
    preload_engine_modules()
    if "hf-llama" in args.models:
        from mmtrain.export.hf import llama_classes

        llama_classes()  # import transformers once here, not in every configuration's process
    info = machine_info()
    result = run_all(args)
    records = result["records"]
    memory = ("peak RSS of each configuration's own process minus its RSS after imports"
              if args.device == "cpu" else "torch.cuda.max_memory_allocated")
    threads = f", {args.threads or torch.get_num_threads()} CPU threads" if args.device == "cpu" else ""
    setup = (f"{args.device}{threads}, {args.dtype}, d_model {args.d_model}, {args.layers} layers, batch {args.batch}, "
             f"vocab {VOCAB}, sweep ZeRO {args.zero_stage}, median of {args.repeats} steps after "
             f"{args.warmup} warm-up")
    peak_line = f"{args.dtype} matmul peak (measured in this run): {result['peak_flops'] / 1e9:,.1f} GFLOP/s"
    text = table([r for r in records if r["section"] != "crossover"])
    if args.crossover:
        text += ("\n\nPeak memory against batch size (one step per configuration; crossing point of the two "
                 "affine fits)\n\n" + crossover_table(records))
    for r in records:
        r["peak_flops"] = result["peak_flops"]
    report(args.out_dir, "throughput", info, f"{setup}\n{peak_line}; memory: {memory}", text, records)
    plot(records, args.out_dir / "throughput.png", setup)
    print(f"wrote {args.out_dir / 'throughput.png'}")
    return 0 if all("error" not in r or r.get("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
