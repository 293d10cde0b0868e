"""Per-rank peak memory and step time of DeepSpeed ZeRO 0/1/2/3 at world size 1 and 2 (CPU, gloo).

For each world size W the benchmark starts ``torchrun --nproc_per_node W`` on this file. Every
rank runs each ZeRO stage in a forked process of its own (the stages meet through a gloo group on
a file store), so each stage's peak memory is measured from the same starting point: peak RSS of
that process minus its RSS after imports (``benchmarks/_common.py``). The model is a flat masked
mixer large enough (default d 768, 6 layers, ~35 M parameters) that model states dominate:
weights, gradients and AdamW's two moments, in fp32 with a client ``torch.optim.AdamW``.

Expected bytes per parameter of the model states on each rank (N = world size; DeepSpeed's ZeRO
1-3 optimizers also keep an fp32 master copy of their partition, even when training in fp32)::

    ZeRO 0: 4 weights + 4 gradients + 8 moments                     = 16
    ZeRO 1: 4 weights + 4 gradients + (4 master + 8 moments) / N    = 8 + 12/N
    ZeRO 2: 4 weights + (4 gradients + 4 master + 8 moments) / N    = 4 + 16/N
    ZeRO 3: (4 weights + 4 gradients + 4 master + 8 moments) / N    = 20/N

The measured peak also holds activations, logits and DeepSpeed's communication buffers.

    python benchmarks/zero_memory.py                 # ZeRO 0-3 at world size 1 and 2, ~35 M params
    python benchmarks/zero_memory.py --quick         # tiny model, 1 timed step (smoke run)
    python benchmarks/zero_memory.py --d-model 1024 --layers 4 --world-sizes 2 --stages 2 3

Writes ``<out-dir>/zero_memory.{md,csv}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import (ROOT, fmt, free_port, machine_info, markdown_table, median, PeakRSS,
                     preload_engine_modules, quiet_deepspeed, report, run_isolated, timed_repeats)

VOCAB = 4096
PRESETS = {
    "default": dict(d_model=768, layers=6, n_ctx=128, batch=2, warmup=1, repeats=3),
    "quick": dict(d_model=64, layers=2, n_ctx=32, batch=2, warmup=1, repeats=1),
}


def expected_bytes_per_param(stage: int, world_size: int) -> float:
    """Model-state bytes per parameter on each rank (fp32 training, AdamW; see the module docstring)."""
    n = float(world_size)
    return {0: 16.0, 1: 8.0 + 12.0 / n, 2: 4.0 + 16.0 / n, 3: 20.0 / n}[stage]


FORMULA = {0: "16", 1: "8 + 12/N", 2: "4 + 16/N", 3: "20/N"}


# --------------------------------------------------------------------------------------------
# One rank, one stage (runs in a forked process inside a torchrun worker)
# --------------------------------------------------------------------------------------------

def run_stage(stage: int, args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig
    from mmtrain.train.engine import build_engine, init_distributed
    from mmtrain.models import build_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    meter = PeakRSS()
    dist.init_process_group("gloo", init_method=f"file://{args.store_dir}/ws{world}-zero{stage}",
                            rank=rank, world_size=world)
    init_distributed("cpu")
    quiet_deepspeed()
    torch.manual_seed(0)
    model = build_model(dict(kind="mixer", d_model=args.d_model, n_layers=args.layers, n_ctx=args.n_ctx,
                             vocab_size=VOCAB), VOCAB)
    params = model.num_params()
    cfg = load_config(PretrainConfig, [], [
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch * world}",
        f"engine.zero_stage={stage}", "engine.precision=fp32", "engine.torch_adam=true", "engine.device=cpu",
        "train.warmup_steps=0",
    ])
    engine, _ = build_engine(cfg, model, world)
    generator = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.n_ctx), generator=generator)

    def step():
        out = engine(input_ids, labels=input_ids)
        engine.backward(out.loss)
        engine.step()

    times = timed_repeats(step, torch.device("cpu"), args.warmup, args.repeats)
    peak = meter.peak_mib()
    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, world_size=world, zero_stage=stage, params=params, step_s=median(times),
                peak_mem_mib=peak, mem_method=meter.method)


def worker(args: argparse.Namespace) -> int:
    """Inside torchrun: every stage in its own forked process; this rank's results to JSON."""
    rank = int(os.environ["RANK"])
    preload_engine_modules()
    results = [run_isolated(run_stage, stage, args) for stage in args.stages]
    Path(f"{args.out_json}.rank{rank}").write_text(json.dumps(results), encoding="utf-8")
    return 0 if all("error" not in r for r in results) else 1


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def launch(world_size: int, args: argparse.Namespace, tmp: Path) -> List[Dict[str, Any]]:
    """torchrun this file with ``world_size`` ranks; returns every rank's per-stage results."""
    out_json = tmp / f"ws{world_size}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(Path(__file__).resolve()),
           "--worker", f"--out-json={out_json}", f"--store-dir={tmp}",
           f"--d-model={args.d_model}", f"--layers={args.layers}", f"--n-ctx={args.n_ctx}",
           f"--batch={args.batch}", f"--warmup={args.warmup}", f"--repeats={args.repeats}",
           "--stages", *map(str, args.stages)]
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # Ranks share the cores: give each its share of threads unless the caller chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    results = []
    for rank in range(world_size):
        path = Path(f"{out_json}.rank{rank}")
        if not path.is_file():
            raise RuntimeError(f"world size {world_size}: rank {rank} wrote no results (exit {proc.returncode})\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results += json.loads(path.read_text(encoding="utf-8"))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        sys.stderr.write(proc.stderr[-5000:])
    return results


def summarize(results: List[Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One record per (world size, stage): the largest per-rank peak and the slowest rank's step."""
    records = []
    for world in args.world_sizes:
        for stage in args.stages:
            ranks = [r for r in results if r.get("world_size") == world and r.get("zero_stage") == stage]
            if len(ranks) != world:
                failed = [r["error"] for r in results if "error" in r]
                records.append(dict(world_size=world, zero_stage=stage, error=(failed or ["missing"])[0]))
                continue
            params = ranks[0]["params"]
            peak = max(r["peak_mem_mib"] for r in ranks)
            step_s = max(r["step_s"] for r in ranks)
            expected = expected_bytes_per_param(stage, world)
            records.append(dict(
                world_size=world, zero_stage=stage, params=params, expected_bytes_per_param=expected,
                expected_model_states_mib=expected * params / 2**20, peak_mem_mib_max_rank=peak,
                peak_mem_mib_per_rank=" / ".join(f"{r['peak_mem_mib']:.0f}" for r in sorted(ranks, key=lambda r: r["rank"])),
                measured_bytes_per_param=peak * 2**20 / params, step_s=step_s,
                tokens_per_s=args.batch * args.n_ctx * world / step_s, mem_method=ranks[0]["mem_method"],
            ))
    return records


def table(records: List[Dict[str, Any]]) -> str:
    headers = ["ZeRO", "world", "expected B/param", "expected model states (MiB)", "peak per rank (MiB)",
               "measured B/param (max rank)", "step (ms)", "tokens/s (all ranks)"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["zero_stage"], r["world_size"], "failed", r["error"][:80], "", "", "", ""])
            continue
        rows.append([
            r["zero_stage"], r["world_size"],
            f"{FORMULA[r['zero_stage']]} = {r['expected_bytes_per_param']:.1f}",
            fmt(r["expected_model_states_mib"]), r["peak_mem_mib_per_rank"],
            f"{r['measured_bytes_per_param']:.1f}", fmt(1e3 * r["step_s"]), fmt(r["tokens_per_s"]),
        ])
    return markdown_table(headers, rows)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, one timed step (smoke run)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--d-model", type=int, help="mixer width (default 768)")
    p.add_argument("--layers", type=int, help="mixer blocks (default 6)")
    p.add_argument("--n-ctx", type=int, help="sequence length (default 128)")
    p.add_argument("--batch", type=int, help="sequences per rank and step (default 2)")
    p.add_argument("--warmup", type=int, help="untimed steps (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps; the median is reported (default 3)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="where zero_memory.{md,csv} go (default runs/benchmarks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--store-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [f"--{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}"
                for k in ("d_model", "layers", "n_ctx", "batch", "repeats") if getattr(args, k) < 1]
    problems += [f"--world-sizes: must be >= 1, got {w}" for w in args.world_sizes if w < 1]
    if args.warmup < 0:
        problems.append(f"--warmup: must be >= 0, got {args.warmup}")
    if problems:
        p.error("\n  " + "\n  ".join(problems))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="mmtrain-zero-"))
    try:
        results = []
        for world in args.world_sizes:
            print(f"  world size {world}: ZeRO {' '.join(map(str, args.stages))} ...", file=sys.stderr, flush=True)
            results += launch(world, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    records = summarize(results, args)
    params = next((r["params"] for r in records if "params" in r), 0)
    setup = (f"flat mixer d_model {args.d_model}, {args.layers} layers, n_ctx {args.n_ctx}, vocab {VOCAB}: "
             f"{params / 1e6:.1f} M parameters; fp32, torch AdamW, batch {args.batch} per rank, "
             f"median of {args.repeats} steps after {args.warmup} warm-up; "
             "memory: peak RSS of each stage's own process minus its RSS after imports, per rank")
    text = table(records)
    report(args.out_dir, "zero_memory", info, setup, text, records)
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
