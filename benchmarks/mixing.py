"""Micro-benchmark of causal token mixing (forward + backward), and of a whole mixer training step.

Token mixing ``Y = (W ⊙ tril)[:L, :L] · X + b`` for X [B, L, d], timed fwd+bwd (gradients of W, b
and X), median of ``--repeats`` after ``--warmup`` runs, all variants interleaved in one run:

- ``dense``: the masked product under autograd, ``matmul(W[:L,:L] * M[:L,:L], X)`` (mmtrain's
  ``model.mixer_impl: dense``),
- ``conv``: the paper's formulation, ``nn.Conv1d(L, L, 1)`` whose weight is re-masked in place
  with tril before every forward (input [B, L, d], positions as channels),
- ``tri[bs] BLd``: :func:`mmtrain.models.mixing_ops.triangular_mix` on X [B, L, d] (one GEMM per
  sample and block row), block size bs (``bs = L`` is the op's dense single-block case),
- ``tri[bs] LN``: the same op on sequence-first activations X [L, B*d] (one GEMM per block row;
  what ``MaskedMixerLM`` runs with ``mixer_layout: dense``),
- ``packed[b] LN``: :func:`mmtrain.models.mixing_ops.packed_mix` on X [L, B*d] with W stored
  packed (only its lower triangle, block size b; the default ``mixer_layout: packed``), gradients
  of the packed parameter, b and X.

Ratios are ``dense time / variant time`` (> 1 = faster than dense). The second table counts the
parameter + optimizer memory of a mixer in both layouts (fp32 AdamW: weights, gradients, two
moments, plus the dense layout's mask buffers). The third times a whole training step (fwd +
bwd + AdamW, plain PyTorch, fp32) of a MaskedMixerLM in the packed and the dense layout, with
``mixer_impl: dense``, and with the paper's Conv1d token mixing.

    python benchmarks/mixing.py                       # n_ctx 256..4096, d 256, batch 4
    python benchmarks/mixing.py --n-ctx 2048 4096 --repeats 9 --step-repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtrain.models.mixer import packed_block  # noqa: E402
from mmtrain.models.mixing_ops import auto_block_size, pack_lower, packed_mix, triangular_mix  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-ctx", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096],
                   help="lengths of the token-mixing table; none = skip it")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--layouts", nargs="+", default=["LN", "BLd"], choices=["LN", "BLd"],
                   help="activation layouts of the tri[bs] rows (packed rows are always LN)")
    p.add_argument("--packed-blocks", type=int, nargs="*", default=[64, 128, 256],
                   help="block sizes of the packed rows (the default block is always added)")
    p.add_argument("--memory-n-ctx", type=int, nargs="*", default=[1024, 2048, 4096, 8192],
                   help="n_ctx of the parameter + optimizer memory table; none = skip it")
    p.add_argument("--memory-d-model", type=int, nargs="+", default=[256, 512])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--step-n-ctx", type=int, default=4096, help="n_ctx of the whole-step table; 0 = skip it")
    p.add_argument("--step-layers", type=int, default=4)
    p.add_argument("--step-batch", type=int, default=2)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--device", default="cpu", help="cpu or cuda (token-mixing table and step table)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the token-mixing table (the step table stays fp32)")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="`process` = CPU seconds of this process: with --threads 1 it is far less "
                        "disturbed by other processes on a shared machine than wall time")
    return p.parse_args(argv)


CLOCK = time.perf_counter


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_medians(cases: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per case; one call of every case per round so load changes hit all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync()
            start = CLOCK()
            fn()
            _sync()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class PaperConvMixing(nn.Module):
    """The original formulation: Conv1d(n_ctx, n_ctx, 1) over [B, n_ctx, d], weight tril'ed in
    place before every forward."""

    def __init__(self, n_ctx: int):
        super().__init__()
        self.conv = nn.Conv1d(n_ctx, n_ctx, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.conv.weight[:, :, 0].tril_()
        return self.conv(u)


def mixing_cases(length: int, args) -> Dict[str, Callable[[], None]]:
    d, batch = args.d_model, args.batch
    gen = torch.Generator().manual_seed(0)
    on = dict(device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    weight = torch.randn(length, length, generator=gen).div_(length ** 0.5).tril_().to(**on).requires_grad_()
    bias = torch.randn(length, generator=gen).to(**on).requires_grad_()
    mask = torch.tril(torch.ones(length, length)).to(**on)
    x_bld = torch.randn(batch, length, d, generator=gen).to(**on).requires_grad_()
    x_ln = x_bld.detach().transpose(0, 1).reshape(length, batch * d).contiguous().requires_grad_()
    grad_bld = torch.randn(batch, length, d, generator=gen).to(**on)
    grad_ln = grad_bld.transpose(0, 1).reshape(length, batch * d).contiguous()
    conv = PaperConvMixing(length).to(**on)

    def clear():
        for t in (weight, bias, x_bld, x_ln, *conv.parameters()):
            t.grad = None

    def dense():
        clear()
        y = torch.matmul(weight * mask, x_bld) + bias[:, None]
        y.backward(grad_bld)

    def paper_conv():
        clear()
        conv(x_bld).backward(grad_bld)

    def tri(bs: int, layout: str):
        def run():
            clear()
            if layout == "LN":
                y = triangular_mix(weight, x_ln, bs) + bias[:, None]
                y.backward(grad_ln)
            else:
                y = triangular_mix(weight, x_bld, bs) + bias[:, None]
                y.backward(grad_bld)
        return run

    def packed(block: int):
        values = pack_lower(weight.detach(), block).requires_grad_()

        def run():
            clear()
            values.grad = None
            y = packed_mix(values, x_ln, length, block) + bias[:, None]
            y.backward(grad_ln)
        return run

    cases = {"dense": dense, "conv": paper_conv}
    sizes = sorted({min(bs, length) for bs in args.block_sizes} | {length})
    for layout in args.layouts:
        for bs in sizes:
            cases[f"tri[{bs}] {layout}"] = tri(bs, layout)
    for block in sorted({min(b, length) for b in args.packed_blocks} | {packed_block(length)}):
        cases[f"packed[{block}] LN"] = packed(block)
    return cases


def mixing_table(args) -> List[str]:
    where = args.device if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"Token mixing fwd+bwd, d {args.d_model}, batch {args.batch}, {args.dtype}, "
             f"{where}, {args.clock} clock; ms (median of {args.repeats}) "
             "and speed-up vs dense",
             "", "| n_ctx | variant | ms | vs dense | GFLOP/s (triangular count) |", "|---|---|---|---|---|"]
    best = []
    for length in args.n_ctx:
        medians = interleaved_medians(mixing_cases(length, args), args.warmup, args.repeats)
        useful = 3 * 2 * args.batch * args.d_model * length * (length + 1) / 2
        for name, seconds in medians.items():
            lines.append(f"| {length} | {name} | {seconds * 1e3:.1f} | {medians['dense'] / seconds:.2f}x "
                         f"| {useful / seconds / 1e9:.0f} |")
        fastest = min((n for n in medians if n.startswith("tri")), key=medians.get)
        auto = auto_block_size(length)
        auto_name = f"tri[{auto}] {args.layouts[0]}"
        default = f"packed[{packed_block(length)}] LN"
        best.append(f"n_ctx {length}: packed default {default} {medians['dense'] / medians[default]:.2f}x; "
                    f"dense-parameter op: fastest {fastest} ({medians['dense'] / medians[fastest]:.2f}x), "
                    f"auto block {auto} -> {medians['dense'] / medians.get(auto_name, float('nan')):.2f}x; "
                    f"paper conv {medians['dense'] / medians['conv']:.2f}x")
        print("\n".join(lines[-len(medians):]), flush=True)
    return lines + [""] + best


def memory_table(args) -> List[str]:
    """Parameter + optimizer memory of a flat mixer (4 layers, vocabulary 4096), counted from
    models built on the meta device: fp32 AdamW holds 16 bytes per stored value (weight,
    gradient, two moments; a bf16 run adds its fp32 master copy, the ratio is the same), and the
    dense layout keeps an n_ctx^2 fp32 mask buffer per matrix."""
    from mmtrain.models import build_model
    from mmtrain.models.mixer import CausalMixingMatrix

    lines = ["Parameter + optimizer memory, flat mixer, 4 layers, vocab 4096, fp32 AdamW (16 bytes per stored "
             "value) + mask buffers", "",
             "| d | n_ctx | params (paper count, M) | stored packed (M) | stored dense (M) | params + optimizer: "
             "packed / dense | packed MiB | dense MiB (+ masks) | with masks: packed / dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in args.memory_d_model:
        for length in args.memory_n_ctx:
            sizes = {}
            for layout in ("packed", "dense"):
                with torch.device("meta"):
                    model = build_model(dict(kind="mixer", d_model=d, n_layers=4, n_ctx=length, vocab_size=4096,
                                             mixer_layout=layout))
                masks = sum(m.mask.numel() for m in model.modules()
                            if isinstance(m, CausalMixingMatrix) and m.layout == "dense")
                sizes[layout] = (model.num_params(), model.stored_params(), 16 * model.stored_params() + 4 * masks)
            (paper, packed_n, packed_b), (_, dense_n, dense_b) = sizes["packed"], sizes["dense"]
            lines.append(f"| {d} | {length} | {paper / 1e6:.1f} | {packed_n / 1e6:.1f} | {dense_n / 1e6:.1f} | "
                         f"{packed_n / dense_n:.1%} | {packed_b / 2**20:,.0f} | {dense_b / 2**20:,.0f} | "
                         f"{packed_b / dense_b:.1%} |")
    return lines


def step_table(args) -> List[str]:
    from mmtrain.models import build_model

    length, vocab = args.step_n_ctx, 4096
    base = dict(kind="mixer", d_model=args.d_model, n_layers=args.step_layers, n_ctx=length, vocab_size=vocab)
    tokens = torch.randint(0, vocab, (args.step_batch, length),
                           generator=torch.Generator().manual_seed(0)).to(args.device)

    def trainer(model: nn.Module) -> Callable[[], None]:
        model.to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(tokens, labels=tokens).loss.backward()
            opt.step()
        return step

    models = {"packed (default)": build_model({**base, "mixer_impl": "auto"}),
              "dense parameters": build_model({**base, "mixer_impl": "auto", "mixer_layout": "dense"}),
              "mixer_impl dense": build_model({**base, "mixer_impl": "dense", "mixer_layout": "dense"})}
    paper = build_model({**base, "mixer_impl": "dense", "mixer_layout": "dense"})
    for block in paper.blocks:
        block.token_mixing = PaperConvMixing(length)
    models["paper Conv1d"] = paper
    medians = interleaved_medians({name: trainer(m) for name, m in models.items()}, 1, args.step_repeats)
    n_tokens = args.step_batch * length
    lines = [f"Whole training step (fwd+bwd+AdamW, fp32, {args.device}), mixer d {args.d_model}, {args.step_layers} layers, "
             f"n_ctx {length}, batch {args.step_batch}, vocab {vocab}; median of {args.step_repeats}",
             "", "| model | s/step | tokens/s | vs paper Conv1d |", "|---|---|---|---|"]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds:.2f} | {n_tokens / seconds:.0f} | {medians['paper Conv1d'] / seconds:.2f}x |")
    return lines


def matmul_gflops(size: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """fp32 square matmul rate on this machine right now (best of repeats), for context."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = CLOCK()
    fn()
    _sync()
    return CLOCK() - start


def main(argv=None) -> int:
    global CLOCK
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    print(f"device {args.device}, threads {torch.get_num_threads()}, clock {args.clock}, fp32 2048^3 matmul "
          f"{matmul_gflops(device=args.device):.0f} GFLOP/s at start", flush=True)
    out = mixing_table(args) if args.n_ctx else []
    if args.memory_n_ctx:
        out += [""] + memory_table(args)
    if args.step_n_ctx:
        out += [""] + step_table(args)
    out += ["", f"fp32 2048^3 matmul {matmul_gflops(device=args.device):.0f} GFLOP/s at the end ({args.clock} clock)"]
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
