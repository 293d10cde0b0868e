"""Toeplitz token mixing: the direct / FFT crossover, and the op against the packed dense op.

Forward + backward (both gradients: kernel and input) of one token-mixing product on
sequence-first activations [L, N], N = batch * d, timed as medians of interleaved rounds (one call
of every case per round, so load changes hit all cases alike):

* ``--crossover``: :func:`toeplitz_mix` on its ``direct`` path (materialised matrix through the
  triangular op) against its ``fft`` path at each L; the first L from which FFT stays faster is
  what ``mmtrain.models.toeplitz.FFT_MIN_LENGTH`` should be.
* the op table (default): Toeplitz on its automatic path against the dense mixer's packed
  lower-triangular op (:class:`~mmtrain.models.mixer.CausalMixingMatrix`, the default layout) at
  n_ctx 1k ... 32k; a length whose dense matrix (with its gradient) would not fit in
  ``--max-gib`` is reported as "does not fit", one whose dense product alone would take more than
  ``--dense-max-s`` seconds as "not run". Each case runs in a process of its own (peak memory).

    python benchmarks/toeplitz.py --crossover                 # L 32 ... 1024, N = 8 x 256
    python benchmarks/toeplitz.py                             # n_ctx 1k ... 32k, d 256, batch 1
    python benchmarks/toeplitz.py --n-ctx 1024 2048 --repeats 3

Writes ``<out-dir>/toeplitz-{crossover,op}.{md,csv}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional

from _common import ROOT, fmt, machine_info, markdown_table, median, memory_meter, report, run_isolated, timed_repeats
from mixing import interleaved_medians

import torch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crossover", action="store_true", help="direct vs FFT path per length")
    p.add_argument("--n-ctx", type=int, nargs="+", help="lengths (crossover: 32 ... 1024; op: 1024 ... 32768)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, help="sequences (crossover: 8, the tiny and quick-start micro-batch; op: 1)")
    p.add_argument("--heads", type=int, default=0, help="0 = flat mixing; h = h kernels on d/h channels each")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-gib", type=float, default=16.0,
                   help="CPU: address-space cap of each case's process (GiB); a case beyond it does not fit")
    p.add_argument("--dense-max-s", type=float, default=60.0,
                   help="skip the dense op where one forward + backward is estimated above this")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks")
    return p.parse_args(argv)


def toeplitz_case(length: int, args, path: str) -> Callable[[], None]:
    from mmtrain.models.toeplitz import toeplitz_mix

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    heads = args.heads or None
    lead = () if heads is None else (heads,)
    width = args.batch * args.d_model // (heads or 1)
    kernel = (torch.randn(*lead, length, generator=gen) / length ** 0.5).to(args.device, dtype).requires_grad_()
    u = torch.randn(*lead, length, width, generator=gen).to(args.device, dtype).requires_grad_()
    grad = torch.randn(*lead, length, width, generator=gen).to(args.device, dtype)

    def run():
        kernel.grad = u.grad = None
        toeplitz_mix(kernel, u, path=path).backward(grad)
    return run


def dense_case(length: int, args) -> Callable[[], None]:
    from mmtrain.models.mixer import CausalMixingMatrix

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads = args.heads or None
    width = args.batch * args.d_model // (heads or 1)
    mixing = CausalMixingMatrix(length, heads=heads).to(args.device, dtype)
    gen = torch.Generator().manual_seed(0)
    lead = () if heads is None else (heads,)
    u = torch.randn(*lead, length, width, generator=gen).to(args.device, dtype).requires_grad_()
    grad = torch.randn(*lead, length, width, generator=gen).to(args.device, dtype)

    def run():
        mixing.zero_grad(set_to_none=True)
        u.grad = None
        mixing(u, triangular_block=0).backward(grad)
    return run


def crossover(args, info) -> None:
    lengths = args.n_ctx or [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    rows, records = [], []
    for length in lengths:
        t = interleaved_medians({"direct": toeplitz_case(length, args, "direct"),
                                 "fft": toeplitz_case(length, args, "fft")}, args.warmup, args.repeats)
        ratio = t["direct"] / t["fft"]
        rows.append([length, fmt(t["direct"] * 1e3, 3), fmt(t["fft"] * 1e3, 3), fmt(ratio, 2) + "x",
                     "fft" if ratio > 1 else "direct"])
        records.append(dict(n_ctx=length, direct_ms=t["direct"] * 1e3, fft_ms=t["fft"] * 1e3, direct_over_fft=ratio))
        print(rows[-1], flush=True)
    faster = [r["n_ctx"] for r in records if r["direct_over_fft"] > 1]
    stays = next((n for i, n in enumerate(r["n_ctx"] for r in records)
                  if all(x["direct_over_fft"] > 1 for x in records[i:])), None)
    text = markdown_table(["L", "direct fwd+bwd ms", "FFT fwd+bwd ms", "direct / FFT", "faster"], rows, "rrrrl")
    text += (f"\n\nFFT faster at: {faster or 'no length'}; faster from {stays} on (every longer length)."
             if stays else f"\n\nFFT faster at: {faster or 'no length'}.")
    header = (f"Toeplitz product, direct vs FFT path, forward + backward (kernel and input gradients); "
              f"N = batch {args.batch} x d {args.d_model}, heads {args.heads or 'flat'}, {args.dtype}, "
              f"{args.device}; median of {args.repeats} interleaved rounds")
    report(args.out_dir, "toeplitz-crossover", info, header, text, records)


def measure_case(kind: str, length: int, args) -> Dict[str, float]:
    """One case in a process of its own: median forward + backward seconds and peak memory (MiB).
    On CPU the child's address space is capped at ``--max-gib``, so a case that does not fit fails
    with an allocation error instead of waking the kernel's OOM killer."""
    if args.device == "cpu" and args.max_gib:
        import resource

        cap = int(args.max_gib * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meter = memory_meter(device)
    run = toeplitz_case(length, args, "auto") if kind == "toeplitz" else dense_case(length, args)
    times = timed_repeats(run, device, args.warmup, args.repeats if length < 16384 else max(1, args.repeats // 2))
    return {"s": median(times), "peak_mib": meter.peak_mib()}


def op_table(args, info) -> None:
    lengths = args.n_ctx or [1024, 2048, 4096, 8192, 16384, 32768]
    rows, records = [], []
    dense_s_per_flop = None
    fork = args.device == "cpu"
    for length in lengths:
        flops = 3.0 * length * length * args.batch * args.d_model   # the triangle forward, backward twice that
        toeplitz = run_isolated(measure_case, "toeplitz", length, args, fork=fork)
        if dense_s_per_flop is not None and dense_s_per_flop * flops > args.dense_max_s:
            dense = {"error": f"not run (~{dense_s_per_flop * flops:.0f} s per call)"}
        else:
            dense = run_isolated(measure_case, "dense", length, args, fork=fork)
        if "error" not in dense:
            dense_s_per_flop = dense["s"] / flops
        elif re.search(r"alloc|memory|died", dense["error"], re.I):   # the cap, or the kernel's OOM killer
            dense["error"] = f"does not fit in {args.max_gib:g} GiB"
            print(f"  dense op at n_ctx {length}: {dense['error']}", flush=True)
        ratio = dense["s"] / toeplitz["s"] if "error" not in dense and "error" not in toeplitz else None

        def cell(r, key, scale, digits):
            if "error" in r:
                return r["error"] if key == "s" else "—"
            return fmt(r[key] * scale, digits)
        rows.append([length, cell(toeplitz, "s", 1e3, 2), cell(toeplitz, "peak_mib", 1, 0),
                     cell(dense, "s", 1e3, 1), cell(dense, "peak_mib", 1, 0), fmt(ratio, 1) + "x" if ratio else "—"])
        records.append(dict(n_ctx=length, toeplitz_ms=toeplitz.get("s", float("nan")) * 1e3,
                            toeplitz_peak_mib=toeplitz.get("peak_mib"), dense_ms=dense.get("s", float("nan")) * 1e3,
                            dense_peak_mib=dense.get("peak_mib"), dense_over_toeplitz=ratio,
                            note=dense.get("error", "") or toeplitz.get("error", "")))
        print(rows[-1], flush=True)
    text = markdown_table(["n_ctx", "Toeplitz (auto) ms", "Toeplitz peak MiB", "packed dense op ms",
                           "dense peak MiB", "dense / Toeplitz"], rows, "rrrrrr")
    header = (f"Token-mixing op, forward + backward (median of {args.repeats}, half of it from 16k): Toeplitz "
              f"(auto path) vs the packed dense op, each in its own process; N = batch {args.batch} x d "
              f"{args.d_model}, heads {args.heads or 'flat'}, {args.dtype}, {args.device}")
    report(args.out_dir, "toeplitz-op", info, header, text, records)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.batch is None:
        args.batch = 8 if args.crossover else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    (crossover if args.crossover else op_table)(args, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
