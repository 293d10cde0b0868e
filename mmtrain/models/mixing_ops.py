"""Causal token mixing that computes only the lower-triangular half: ``Y = tril(W)[:L, :L] · X``.

The masked mixer multiplies every sequence by a lower-triangular ``n_ctx x n_ctx`` matrix. A
dense product spends half of its FLOPs on zeros, and masking the weight under autograd costs two
full ``L x L`` passes per micro-batch (``W ⊙ M`` forward, ``grad ⊙ M`` backward). Here the lower
triangle is tiled recursively (:func:`tiling`)::

    tril(W) = [[A, 0],      C: one full rectangle (rows L/2.., columns ..L/2), one large GEMM;
               [C, D]]      A, D: tiled the same way, down to diagonal blocks of block_size rows

and each of the three products is a sum of plain GEMMs over the tiles, each writing into a
preallocated output slice (``torch.mm(out=)`` / ``addmm_``)::

    forward   Y[r]     = tril(W[r, r]) · X[r]  (diagonal blocks)   +=  W[r, c] · X[c]  (rectangles)
    input     dX[c]    = tril(W[c, c])ᵀ · dY[c]                    +=  W[r, c]ᵀ · dY[r]
    weight    dW[r, c] = Σ_batch dY[r] · X[c]ᵀ  (diagonal blocks tril'ed in place); the mirrored
              upper tiles and rows/columns >= L are written as exact zeros, never computed

No ``L x L`` mask, masked copy or transpose is materialised and the entries of W above the
diagonal are never read. FLOPs per product: ``L * (L + block_size) * N`` instead of ``2 L^2 N``
(N = columns of X), a speed-up of at most ``2 / (1 + block_size / L)``; half of them fall in the
single L/2 x L/2 GEMM. ``block_size >= L`` is the dense case: one tril'ed block, one GEMM.

Shapes (weight rows = output positions, columns = input positions)::

    weight [n, n]     with x [L, N] or [B, L, N]              (flat mixing)
    weight [h, n, n]  with x [h, L, N] or [B, h, L, N]        (one matrix per head)

``L <= n`` (the top-left ``L x L`` block is used); the output has x's shape. The layout
``[L, N]`` with ``N = batch * width`` (sequence-first activations) makes every tile one GEMM
over the whole batch; ``[B, L, N]`` runs one GEMM per sample and tile. Works for any floating
dtype and device (fp32, bf16, CUDA); the GEMMs run in the weight's dtype.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

# Defaults measured with benchmarks/mixing.py (flat op fwd+bwd, d 256, batch 4, fp32, CPU): up to
# DENSE_MAX_LEN one tril'ed block (the dense product) is as fast as any tiling; above it diagonal
# blocks of AUTO_BLOCK_SIZE rows were fastest or within noise of the fastest (64..512 tried).
DENSE_MAX_LEN = 256
AUTO_BLOCK_SIZE = 128


def auto_block_size(length: int) -> int:
    """Block size used when ``model.mixer_block_size`` is 0: dense (one block) up to
    DENSE_MAX_LEN positions, AUTO_BLOCK_SIZE rows per block above."""
    return length if length <= DENSE_MAX_LEN else AUTO_BLOCK_SIZE


def tiling(length: int, block_size: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, int, int]]]:
    """Tiles of the lower triangle of an ``length x length`` matrix, split recursively in halves.

    Returns ``(diagonal, rectangles)``: diagonal blocks ``(r0, r1)`` of at most block_size rows
    (used tril'ed) and full rectangles ``(r0, r1, c0, c1)`` with ``r0 >= c1`` (rows r0:r1,
    columns c0:c1). ``[[A, 0], [C, D]]``: C is one rectangle, A and D are tiled the same way, so
    most FLOPs land in a few large, square GEMMs (the first one is L/2 x L/2).
    """
    diagonal: List[Tuple[int, int]] = []
    rectangles: List[Tuple[int, int, int, int]] = []
    leaf = max(1, block_size)

    def split(lo: int, hi: int) -> None:
        if hi - lo <= leaf:
            diagonal.append((lo, hi))
            return
        # Split on a multiple of the leaf size so the leaves keep their size where they can.
        mid = lo + max(1, (hi - lo) // 2 // leaf) * leaf
        split(lo, mid)
        split(mid, hi)
        rectangles.append((mid, hi, lo, mid))

    split(0, length)
    return diagonal, rectangles


def _as_4d(weight: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight -> [h, n, n], x -> [B, h, L, N] views (no copies)."""
    w3 = weight if weight.dim() == 3 else weight.unsqueeze(0)
    x4 = x
    while x4.dim() < 4:
        # Missing batch and/or head axes: [L, N] -> [1, 1, L, N]; [B, L, N] (flat) -> [B, 1, L, N].
        x4 = x4.unsqueeze(0 if x4.dim() == 2 or weight.dim() == 3 else 1)
    return w3, x4


class TriangularMixing(torch.autograd.Function):
    """``tril(W)[:L, :L] · X`` with block-triangular forward, input-gradient and weight-gradient
    products over the tiles of :func:`tiling` (see the module docstring). Use through
    :func:`triangular_mix`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: torch.Tensor, block_size: int) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        ctx.save_for_backward(weight, x)
        ctx.block_size = block_size
        w3, x4 = _as_4d(weight, x)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _, y4 = _as_4d(weight, y)
        diagonal, rectangles = tiling(x.shape[-2], block_size)
        for head in range(w3.shape[0]):
            w = w3[head]
            for r0, r1 in diagonal:                      # writes every row of y once
                block = w[r0:r1, r0:r1].tril()
                for b in range(x4.shape[0]):
                    torch.mm(block, x4[b, head, r0:r1], out=y4[b, head, r0:r1])
            for r0, r1, c0, c1 in rectangles:
                for b in range(x4.shape[0]):
                    y4[b, head, r0:r1].addmm_(w[r0:r1, c0:c1], x4[b, head, c0:c1])
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight, x = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        w3, x4 = _as_4d(weight, x)
        _, gy4 = _as_4d(weight, grad_y)
        length, batch, heads = x.shape[-2], x4.shape[0], w3.shape[0]
        diagonal, rectangles = tiling(length, ctx.block_size)
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            # dX = tril(W)ᵀ · dY: each tile used transposed (rows <-> columns).
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _, gx4 = _as_4d(weight, grad_x)
            for head in range(heads):
                w = w3[head]
                for c0, c1 in diagonal:
                    block_t = w[c0:c1, c0:c1].tril().t()
                    for b in range(batch):
                        torch.mm(block_t, gy4[b, head, c0:c1], out=gx4[b, head, c0:c1])
                for r0, r1, c0, c1 in rectangles:
                    for b in range(batch):
                        gx4[b, head, c0:c1].addmm_(w[r0:r1, c0:c1].t(), gy4[b, head, r0:r1])
        if ctx.needs_input_grad[0]:
            # dW = Σ_b dY · Xᵀ on the lower tiles; the mirrored (upper) tiles and rows/columns
            # >= L are exact zeros, written, never computed.
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            gw3 = grad_w if grad_w.dim() == 3 else grad_w.unsqueeze(0)
            gw3[:, length:].zero_()
            gw3[:, :length, length:].zero_()
            for head in range(heads):
                gw = gw3[head]
                tiles = [(r0, r1, r0, r1) for r0, r1 in diagonal] + rectangles
                for r0, r1, c0, c1 in tiles:
                    out = gw[r0:r1, c0:c1]
                    for b in range(batch):
                        if b == 0:
                            torch.mm(gy4[b, head, r0:r1], x4[b, head, c0:c1].t(), out=out)
                        else:
                            out.addmm_(gy4[b, head, r0:r1], x4[b, head, c0:c1].t())
                    if r0 == c0:
                        out.tril_()
                    else:
                        gw[c0:c1, r0:r1].zero_()
        return grad_w, grad_x, None


def triangular_mix(weight: torch.Tensor, x: torch.Tensor, block_size: int = 0) -> torch.Tensor:
    """``tril(weight)[:L, :L] · x`` for each sample (and head), differentiable in both.

    weight [n, n] with x [L, N] / [B, L, N], or weight [h, n, n] with x [h, L, N] / [B, h, L, N];
    L = x.shape[-2] <= n. block_size 0 = :func:`auto_block_size`; block_size >= L = dense.
    Returns a tensor of x's shape in weight's dtype. Entries of weight above the diagonal are
    never read and get an exactly zero gradient.
    """
    heads = weight.dim() == 3
    if weight.dim() not in (2, 3) or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"triangular_mix: weight must be [n, n] or [heads, n, n], got {tuple(weight.shape)}")
    base = 3 if heads else 2
    if x.dim() not in (base, base + 1):
        raise ValueError(f"triangular_mix: for weight {tuple(weight.shape)} x must have {base} or {base + 1} "
                         f"dims ([(B,) {'h, ' if heads else ''}L, N]), got {tuple(x.shape)}")
    if heads and x.shape[-3] != weight.shape[0]:
        raise ValueError(f"triangular_mix: x has {x.shape[-3]} heads, weight has {weight.shape[0]}")
    length = x.shape[-2]
    if length > weight.shape[-1]:
        raise ValueError(f"triangular_mix: sequence length {length} exceeds the matrix size {weight.shape[-1]}")
    if block_size < 0:
        raise ValueError(f"triangular_mix: block_size must be >= 0, got {block_size}")
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return TriangularMixing.apply(weight, x, block_size or auto_block_size(length))
