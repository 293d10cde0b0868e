"""What checkpoint verification costs at resume, against the load it protects (CPU, one process).

A masked-mixer LM (default d_model 512, 8 layers, n_ctx 512, vocab 4096: ~22 M parameters) is
wrapped in a DeepSpeed engine (default ZeRO 1, fp32, torch AdamW), takes one step (so the
optimizer holds its moments) and is saved with :func:`mmtrain.train.checkpoint.save`, which
writes the manifest with every file's size and sha256. Then, each timed ``--repeats`` times
(median reported), on the same files:

- ``sha256``: one chunked pass over every file, a few files at a time on a thread pool (what the
  manifest records; also what a save adds), and the same one file after another;
- ``weights_only scan``: every ``.pt`` unpickled with ``weights_only=True`` and the allowlist,
  tensors memory-mapped (not read);
- ``verify()``: both, as resume and ``mmtrain export`` run it before loading anything;
- ``load_checkpoint``: ``engine.load_checkpoint`` as resume runs it (under
  ``weights_only_loads``), and as DeepSpeed runs it by default (``weights_only=False``).

The files were just written, so every read comes from the page cache, for verification and
load alike; a cold read from disk costs both more. The ratio column is each row's time over
that of the load resume runs.

    python benchmarks/verify_cost.py                  # d512, 8 layers, n_ctx 512, ZeRO 1 fp32
    python benchmarks/verify_cost.py --quick          # tiny model (smoke run)
    python benchmarks/verify_cost.py --stage 3 --precision bf16

Writes ``<out-dir>/verify_cost.{md,csv}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from _common import ROOT, fmt, machine_info, markdown_table, median, quiet_deepspeed, report, single_process_env

VOCAB = 4096
PRESETS = {
    "default": dict(d_model=512, layers=8, n_ctx=512, repeats=3),
    "quick": dict(d_model=64, layers=2, n_ctx=64, repeats=1),
}


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def measure(args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    import torch

    from mmtrain.config import load_config
    from mmtrain.models import build_model
    from mmtrain.train import checkpoint as ckpt
    from mmtrain import checkpoint_files
    from mmtrain.train.engine import build_engine, init_distributed
    from mmtrain.train.schema import PretrainConfig

    single_process_env()
    init_distributed("cpu")
    quiet_deepspeed()
    torch.manual_seed(0)
    model = build_model(dict(kind="mixer", d_model=args.d_model, n_layers=args.layers, n_ctx=args.n_ctx,
                             vocab_size=VOCAB), VOCAB)
    cfg = load_config(PretrainConfig, [], [
        "train.micro_batch_size=1", "train.global_batch_size=1", f"engine.zero_stage={args.stage}",
        f"engine.precision={args.precision}", "engine.torch_adam=true", "engine.device=cpu", "train.warmup_steps=0"])
    engine, _ = build_engine(cfg, model, 1)
    ids = torch.randint(0, VOCAB, (1, args.n_ctx), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(ids, labels=ids).loss)   # one step: the optimizer now holds its moments
    engine.step()

    start = time.perf_counter()
    ckpt.save(engine, str(tmp), 1, {"step": 1}, keep_last=0, config_yaml="{}\n", rank=0)
    save_s = time.perf_counter() - start
    root, tag = ckpt.checkpoint_root(str(tmp)), ckpt.tag_for(1)
    directory = Path(root) / tag
    files = sorted(p for p in directory.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    pt_files = [str(p) for p in files if p.suffix == ".pt"]

    def load():
        with ckpt.weights_only_loads():
            engine.load_checkpoint(root, tag=tag)

    rows = {
        "sha256": timed(lambda: ckpt.digest_files([str(p) for p in files]), args.repeats),
        "sha256, one file at a time": timed(lambda: [ckpt.file_digest(str(p)) for p in files], args.repeats),
        "weights_only scan": timed(lambda: [checkpoint_files._scan_pt(p) for p in pt_files], args.repeats),
        "verify()": timed(lambda: ckpt.verify(root, tag), args.repeats),
        "load": timed(load, args.repeats),
        "load, DeepSpeed default": timed(lambda: engine.load_checkpoint(root, tag=tag), args.repeats),
    }
    return dict(params=model.num_params(), bytes=total, files=len(files), save_s=save_s, **rows)


def table(m: Dict[str, Any]) -> tuple:
    load = m["load"]
    what = [("sha256 of every file (8 MiB chunks, files in parallel; also what a save adds)", "sha256", True),
            ("sha256 of every file, one after another", "sha256, one file at a time", True),
            ("weights_only scan of every .pt (tensors mapped, not read)", "weights_only scan", False),
            ("verify(): sha256 + scan, before resume / export use anything", "verify()", True),
            ("engine.load_checkpoint under weights_only_loads (resume)", "load", True),
            ("engine.load_checkpoint, DeepSpeed default (weights_only=False)", "load, DeepSpeed default", True)]
    rows, records = [], []
    for label, key, per_byte in what:
        seconds = m[key]
        mb_s = m["bytes"] / seconds / 1e6 if per_byte and seconds > 0 else None
        rows.append([label, fmt(seconds, 3), fmt(mb_s), f"{seconds / load:.2f}x"])
        records.append(dict(step=key, seconds=seconds, mb_per_s=mb_s, vs_load=seconds / load, bytes=m["bytes"]))
    return markdown_table(["step", "seconds", "MB/s", "vs load"], rows, "lrrr"), records


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke run)")
    p.add_argument("--d-model", type=int, help="mixer width (default 512)")
    p.add_argument("--layers", type=int, help="mixer blocks (default 8)")
    p.add_argument("--n-ctx", type=int, help="sequence length (default 512)")
    p.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3], help="ZeRO stage (default 1)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, help="timed repeats of each row; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="where verify_cost.{md,csv} go (default runs/benchmarks)")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [f"--{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}"
                for k in ("d_model", "layers", "n_ctx", "repeats", "threads") if getattr(args, k) < 1]
    if args.stage == 0 and args.precision == "bf16":
        problems.append("--precision bf16 needs --stage >= 1 (ZeRO 0 bf16 switches to an fp16-style optimizer)")
    if problems:
        p.error("\n  " + "\n  ".join(problems))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="mmtrain-verify-"))
    try:
        print(f"  saving and timing a ZeRO {args.stage} {args.precision} checkpoint ...", file=sys.stderr, flush=True)
        m = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    setup = (f"mixer d_model {args.d_model}, {args.layers} layers, n_ctx {args.n_ctx}, vocab {VOCAB}: "
             f"{m['params'] / 1e6:.1f} M parameters; ZeRO {args.stage} {args.precision}, torch AdamW, one process; "
             f"checkpoint: {m['files']} files, {m['bytes'] / 1e6:,.1f} MB (save took {m['save_s']:.2f} s, digests "
             f"included); median of {args.repeats}; page-cache reads")
    text, records = table(m)
    report(args.out_dir, "verify_cost", info, setup, text, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
