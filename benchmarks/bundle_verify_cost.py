"""What checking a bundle at load costs: the sha256 of its weight files against config.json, next
to ``load_pretrained`` without that check.

A random-weight masked mixer (default d_model 512, 8 layers, n_ctx 512, vocab 4096, fp32) is
written as a bundle into a temporary directory, then timed (median of ``--repeats``, page cache
warm, after one untimed load):

* digest: :func:`mmtrain.export.bundle.file_digest` over every weight file (bytes, s, MB/s);
* load without digests: ``load_pretrained(bundle, verify=False)`` (still validates config.json and
  compares the shapes with the safetensors headers on a meta-device model);
* load: ``load_pretrained(bundle)`` (the default: the same plus the digests);
* mmtrain verify: :func:`mmtrain.export.verify.check_bundle` (schema, shapes, digests, tokenizer).

The first meta-device build in a process imports ``torch._dynamo`` (torch computes some meta ops
through it); that one-time cost is reported apart ("first shape check in a process").

    python benchmarks/bundle_verify_cost.py                  # d512 mixer, 5 repeats
    python benchmarks/bundle_verify_cost.py --quick          # tiny model (smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from _common import ROOT, machine_info, markdown_table, report

FIRST_CHECK = """
import time, sys
from mmtrain.export import bundle as B
section = B.read_bundle_config(sys.argv[1])
header = B.read_headers(sys.argv[1], B.weight_files(sys.argv[1]))
start = time.perf_counter()
assert not B.shape_problems(section, header)
print(time.perf_counter() - start)
"""


def timed(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median wall-clock seconds of each ``fn()`` over ``repeats`` rounds; the functions take turns
    within a round, so load from other processes falls on all of them alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(args: argparse.Namespace, bundle: Path) -> Dict[str, Any]:
    import torch

    from mmtrain.data.tokenizer import DEMO_TOKENIZER
    from mmtrain.export import bundle as B
    from mmtrain.export.verify import check_bundle
    from mmtrain.models import build_model

    torch.manual_seed(0)
    model = build_model(dict(kind="mixer", d_model=args.d_model, n_layers=args.layers, n_ctx=args.n_ctx,
                             vocab_size=args.vocab))
    config = B.write_bundle(model, bundle, DEMO_TOKENIZER)
    files = config["mmtrain"]["weight_files"]
    nbytes = sum(config["mmtrain"]["digests"][f]["bytes"] for f in files)
    first = float(subprocess.run([sys.executable, "-c", FIRST_CHECK, str(bundle)], check=True,
                                 capture_output=True, text=True).stdout)
    B.load_pretrained(bundle)   # untimed: imports, page cache, the meta build's one-time import
    t = timed({"digest": lambda: [B.file_digest(bundle / f) for f in files],
               "plain": lambda: B.load_pretrained(bundle, verify=False),
               "full": lambda: B.load_pretrained(bundle),
               "check": lambda: check_bundle(bundle)}, args.repeats)
    digest, plain, full, check = t["digest"], t["plain"], t["full"], t["check"]
    return {"d_model": args.d_model, "layers": args.layers, "n_ctx": args.n_ctx, "vocab": args.vocab,
            "params": model.num_params(), "bytes": nbytes, "digest_s": digest, "digest_mb_s": nbytes / digest / 1e6,
            "load_no_digest_s": plain, "load_s": full, "verify_cmd_s": check, "first_shape_check_s": first,
            "digest_over_load": digest / plain, "load_overhead": full / plain - 1}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke run)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096, help="must equal the demo tokenizer's (4096)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the median is reported")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="where bundle_verify_cost.md / .csv are written")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.n_ctx, args.repeats = 64, 2, 64, 2
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args, Path(tmp) / "bundle")
    row = [f"d{r['d_model']} x {r['layers']}, ctx {r['n_ctx']}, vocab {r['vocab']}", f"{r['params']:,}",
           f"{r['bytes'] / 1e6:,.1f}", f"{r['digest_s']:.3f}", f"{r['digest_mb_s']:,.0f}",
           f"{r['load_no_digest_s']:.3f}", f"{r['load_s']:.3f}", f"{r['digest_over_load']:.2f}x",
           f"{100 * r['load_overhead']:+.0f}%", f"{r['verify_cmd_s']:.3f}", f"{r['first_shape_check_s']:.2f}"]
    table = markdown_table(["model (fp32)", "params", "MB", "digest s", "digest MB/s", "load w/o digest s",
                            "load s", "digest / load w/o", "load overhead", "mmtrain verify s",
                            "first shape check s"], [row])
    report(args.out_dir, "bundle_verify_cost", machine_info(),
           f"Bundle verification cost, median of {args.repeats}, page cache warm", table, [r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
