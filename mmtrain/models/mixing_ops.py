"""Causal token mixing that computes only the lower-triangular half: ``Y = tril(W)[:L, :L] · X``.

Two storages of W: dense ``[n, n]`` with :func:`triangular_mix` (this docstring), and packed
(only the lower triangle, as row panels; :func:`pack_lower`, :func:`packed_mix`, described above
:func:`packed_panels`), the mixer's default layout.

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

import functools
from typing import List, Optional, Tuple

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


# --------------------------------------------------------------------------------------------
# Packed lower-triangular storage: only the lower half of the matrix exists as a parameter.
# --------------------------------------------------------------------------------------------
#
# For block size b, block row i holds matrix rows r0 = i*b .. r1 = min(r0 + b, n) - 1 and, of
# them, the columns 0 .. r1 - 1 (everything left of and including its diagonal block): a row
# panel P_i = [C_i | D_i] of shape [r1 - r0, r1] stored row-major at ``offset_i``, one panel after
# another (C_i: the full rectangle left of the diagonal, D_i: the diagonal block). No entry right
# of the diagonal block is stored; the entries of D_i above the diagonal are stored (as zeros
# after init) but never read: every product uses tril(D_i), and their gradient is exactly zero.
# So a packed matrix holds ``sum_i (r1 - r0) * r1 ~ n (n + b) / 2`` values instead of n^2, and
# each product is two GEMMs per block row over contiguous memory::
#
#     forward   Y[r0:r1]      = C_i · X[:r0]  +  tril(D_i) · X[r0:r1]
#     input     dX[:g0]      += [C_i[:, :g0] for i in group]ᵀ · dY[g0:g1]   (one GEMM per group
#               of INPUT_GRAD_ROWS rows, over a stacked copy), then inside the group
#               dX[g0:r1] += (P_i[:, g0:r1], diagonal block tril'ed)ᵀ · dY[r0:r1]
#     weight    dP_i          = dY[r0:r1] · X[:r1]ᵀ    (one GEMM; D_i's part tril'ed in place)
#
# O(L / b) GEMMs per product. In bf16 / fp16 the two halves of a forward row and the input
# gradient's sums are accumulated in fp32 and rounded once; ``block >= n`` is the dense matrix
# itself (one panel [n, n]).


#: Rows of the block-row groups whose rectangles the input gradient stacks into one GEMM.
INPUT_GRAD_ROWS = 512


@functools.lru_cache(maxsize=64)
def packed_panels(n_ctx: int, block: int) -> Tuple[Tuple[int, int, int], ...]:
    """``(r0, r1, offset)`` of each block row's panel ``[r1 - r0, r1]`` in a packed matrix
    (cached: every product and its backward walk the same panels)."""
    if n_ctx < 1 or block < 1:
        raise ValueError(f"packed_panels: n_ctx and block must be >= 1, got {n_ctx}, {block}")
    panels, offset = [], 0
    for r0 in range(0, n_ctx, block):
        r1 = min(r0 + block, n_ctx)
        panels.append((r0, r1, offset))
        offset += (r1 - r0) * r1
    return tuple(panels)


def packed_size(n_ctx: int, block: int) -> int:
    """Values in a packed ``n_ctx x n_ctx`` lower-triangular matrix of block size ``block``."""
    r0, r1, offset = packed_panels(n_ctx, block)[-1]
    return offset + (r1 - r0) * r1


def block_for_size(n_ctx: int, size: int) -> Optional[int]:
    """The block size of a packed ``n_ctx x n_ctx`` matrix of ``size`` values (None: no block fits)."""
    return next((b for b in range(1, n_ctx + 1) if packed_size(n_ctx, b) == size), None)


def _panel(packed: torch.Tensor, r0: int, r1: int, offset: int) -> torch.Tensor:
    """Block row (r0, r1)'s panel [(h,) r1 - r0, r1] as a view of packed [(h,) P]."""
    return packed[..., offset:offset + (r1 - r0) * r1].unflatten(-1, (r1 - r0, r1))


def pack_lower(dense: torch.Tensor, block: int) -> torch.Tensor:
    """[(h,) n, n] -> packed [(h,) P]: the lower triangle (diagonal included); entries above the
    diagonal are dropped (the stored ones in diagonal blocks become exact zeros)."""
    n = dense.shape[-1]
    if dense.shape[-2] != n:
        raise ValueError(f"pack_lower: expected a square [(h,) n, n] matrix, got {tuple(dense.shape)}")
    lower = dense.tril()
    return torch.cat([lower[..., r0:r1, :r1].flatten(-2) for r0, r1, _ in packed_panels(n, block)], dim=-1)


def unpack_rows(packed: torch.Tensor, n_ctx: int, block: int, start: int, stop: int, n_in: int) -> torch.Tensor:
    """Rows start..stop-1 and columns 0..n_in-1 of the dense lower-triangular matrix a packed
    [(h,) P] holds: [(h,) stop - start, n_in], zeros above the diagonal. Differentiable."""
    if not 0 <= start <= stop <= n_ctx or not 0 <= n_in <= n_ctx:
        raise ValueError(f"unpack_rows: rows {start}:{stop}, columns :{n_in} outside a {n_ctx} x {n_ctx} matrix")
    pieces = []
    for r0, r1, offset in packed_panels(n_ctx, block):
        lo, hi = max(r0, start), min(r1, stop)
        if lo >= hi:
            continue
        rows = _panel(packed, r0, r1, offset)[..., lo - r0:hi - r0, :min(r1, n_in)].tril(lo)
        pieces.append(torch.nn.functional.pad(rows, (0, n_in - rows.shape[-1])))
    if not pieces:
        return packed.new_zeros(*packed.shape[:-1], 0, n_in)
    return torch.cat(pieces, dim=-2)


def packed_mask(n_ctx: int, block: int, device=None) -> torch.Tensor:
    """[P] bool: True where a packed matrix stores a lower-triangular entry, False for the stored
    zeros above the diagonal of each diagonal block."""
    ones = torch.ones(n_ctx, n_ctx, dtype=torch.bool, device=device)
    return pack_lower(ones, block)


def unpack_lower(packed: torch.Tensor, n_ctx: int, block: int) -> torch.Tensor:
    """packed [(h,) P] -> the dense lower-triangular [(h,) n, n] it holds."""
    return unpack_rows(packed, n_ctx, block, 0, n_ctx, n_ctx)


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b (batched for 3-d operands) summed and returned in fp32, whatever a and b's dtype."""
    mm = torch.bmm if a.dim() == 3 else torch.mm
    if a.dtype in (torch.float32, torch.float64):
        return mm(a, b)
    if a.is_cuda:
        return mm(a, b, out_dtype=torch.float32)
    return mm(a.float(), b.float())


def _exact(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


class PackedTriangularMixing(torch.autograd.Function):
    """``tril(W)[:L, :L] · X`` for W stored packed (:func:`pack_lower`); two GEMMs per block row
    and product (see the comment above :func:`packed_panels`). Use :func:`packed_mix`."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, x: torch.Tensor, n_ctx: int, block: int) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(packed, x)
        ctx.n_ctx, ctx.block = n_ctx, block
        length, exact = x.shape[-2], _exact(x.dtype)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for r0, r1, offset in packed_panels(n_ctx, block):
            if r0 >= length:
                break
            hi = min(r1, length)
            panel = _panel(packed, r0, r1, offset)
            diagonal = panel[..., :hi - r0, r0:hi].tril()
            out = y[..., r0:hi, :]
            if exact:
                _mm(diagonal, x[..., r0:hi, :], out)
                if r0:
                    out.baddbmm_(panel[..., :hi - r0, :r0], x[..., :r0, :]) if out.dim() == 3 else \
                        out.addmm_(panel[:hi - r0, :r0], x[:r0])
            else:
                acc = _mm_acc(diagonal, x[..., r0:hi, :])
                if r0:
                    acc += _mm_acc(panel[..., :hi - r0, :r0], x[..., :r0, :])
                out.copy_(acc)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        packed, x = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        length, exact = x.shape[-2], _exact(x.dtype)
        panels = [p for p in packed_panels(ctx.n_ctx, ctx.block) if p[0] < length]
        grad_packed = grad_x = None
        if ctx.needs_input_grad[1]:
            # dX = tril(W)ᵀ · dY, a group of block rows at a time: their rectangles left of the group
            # share columns [0, g0) and are stacked into one [g1 - g0, g0] copy (cheap next to the
            # GEMM: 1 / N of its FLOPs), so the prefix dX[:g0] is updated once per group with a
            # K = g1 - g0 GEMM instead of once per block row with K = b.
            acc = torch.zeros(x.shape, dtype=x.dtype if exact else torch.float32, device=x.device)
            group = max(1, INPUT_GRAD_ROWS // ctx.block)
            for first in range(0, len(panels), group):
                rows = [(r0, min(r1, length), offset, r1) for r0, r1, offset in panels[first:first + group]]
                g0, g1 = rows[0][0], rows[-1][1]
                views = [_panel(packed, r0, r1, offset)[..., :hi - r0, :] for r0, hi, offset, r1 in rows]
                if g0:
                    stacked = torch.cat([v[..., :g0] for v in views], dim=-2)
                    _mm_add(stacked.transpose(-1, -2), grad_y[..., g0:g1, :], acc[..., :g0, :], exact)
                for (r0, hi, _, _), view in zip(rows, views):   # inside the group: up to the diagonal
                    inner = view[..., g0:hi].clone()
                    inner[..., r0 - g0:].tril_()
                    _mm_add(inner.transpose(-1, -2), grad_y[..., r0:hi, :], acc[..., g0:hi, :], exact)
            grad_x = acc if acc.dtype == x.dtype else acc.to(x.dtype)
        if ctx.needs_input_grad[0]:
            whole = length == ctx.n_ctx   # every panel is written in full
            grad_packed = torch.empty_like(packed) if whole else torch.zeros_like(packed)
            for r0, r1, offset in panels:
                hi = min(r1, length)
                out = _panel(grad_packed, r0, r1, offset)[..., :hi - r0, :hi]
                _mm(grad_y[..., r0:hi, :], x[..., :hi, :].transpose(-1, -2), out)
                out[..., r0:hi].tril_()   # the diagonal block: entries above the diagonal get zero
        return grad_packed, grad_x, None, None


def _mm_add(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, exact: bool) -> None:
    """out += a · b (batched for 3-d operands); low-precision products summed in fp32."""
    if not exact:
        out += _mm_acc(a, b)
    elif out.dim() == 3:
        out.baddbmm_(a, b)
    else:
        out.addmm_(a, b)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a · b (batched over a leading head axis for 3-d operands), written into ``out``."""
    if out.is_contiguous():
        (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b) if a.dim() == 3 else torch.mm(a, b))


def packed_mix(packed: torch.Tensor, x: torch.Tensor, n_ctx: int, block: int) -> torch.Tensor:
    """``tril(W)[:L, :L] · x`` for W packed (:func:`pack_lower`, block size ``block``).

    packed [P] with x [L, N], or packed [h, P] with x [h, L, N] (all heads in one ``bmm`` per
    block row); L = x.shape[-2] <= n_ctx. Differentiable in both; returns x's shape in packed's
    dtype. Entries above the diagonal are never read (in diagonal blocks they are stored and get
    an exactly zero gradient).
    """
    if packed.dim() not in (1, 2) or packed.shape[-1] != packed_size(n_ctx, block):
        raise ValueError(f"packed_mix: packed must be [{packed_size(n_ctx, block)}] or [heads, "
                         f"{packed_size(n_ctx, block)}] for n_ctx {n_ctx}, block {block}; got {tuple(packed.shape)}")
    if x.dim() != packed.dim() + 1 or (packed.dim() == 2 and x.shape[0] != packed.shape[0]):
        raise ValueError(f"packed_mix: for packed {tuple(packed.shape)} x must be "
                         f"[{'heads, ' if packed.dim() == 2 else ''}L, N], got {tuple(x.shape)}")
    if x.shape[-2] > n_ctx:
        raise ValueError(f"packed_mix: sequence length {x.shape[-2]} exceeds n_ctx {n_ctx}")
    if x.dtype != packed.dtype:
        x = x.to(packed.dtype)
    return PackedTriangularMixing.apply(packed, x, n_ctx, block)
