"""Masked mixer language model (Badger, arXiv 2409.01482).

A transformer with attention replaced by a learned, causally masked ``n_ctx x n_ctx`` matrix
over sequence positions::

    wte -> n_layers x MixerBlock -> final LayerNorm (optional) -> lm_head

    MixerBlock (pre-norm, two residuals):
        H = H + TokenMixing(LN(H))                  # mixes positions, shared across the width d
        H = H + MLP(LN(H))                          # Linear(d, m*d) -> GELU -> Linear(m*d, d)

Token mixing comes in three variants (``model.mixer_heads`` / ``model.mixer_expansion``):

- flat:        ``Y = (W ⊙ M)[:L, :L] · U + b[:L]`` with ``M = tril(ones)``,
- multi-head:  project to h heads of width d/h, mix each head with its own masked matrix,
               concatenate, project back,
- expanded:    ``Y = W2' · GELU(W1' · U + b1) + b2`` through e*n_ctx hidden rows, both masked.

Storage (``model.mixer_layout``): ``packed`` (default) keeps only the lower triangle of each
causal matrix, as row panels (:class:`CausalMixingMatrix`, :mod:`mmtrain.models.mixing_ops`):
about half the parameters, gradients and optimizer state of ``dense``, the full matrix with a
non-persistent mask buffer. Either way the mask is applied inside ``forward`` (entries above the
diagonal are never read) and parameters are never written to after init, which keeps ZeRO-3
partitioning and gradient clipping honest. Because every masked matrix is lower-triangular in
positions, a model built for ``n_ctx`` runs any input of length ``L <= n_ctx`` exactly by using
the top-left ``L x L`` block. Bundles always hold the dense masked matrices.

Fast training path (``model.mixer_impl``: auto | triangular; ``dense`` is the formula above under
autograd): the model runs sequence-first, H [L, B, d], so flat token mixing is one
``[L, L] x [L, B*d]`` product per layer, computed on the packed panels (two GEMMs per block row
and product) or, in the dense layout, by the tiled op; only the lower half is computed, forward
and both gradients, and entries above the diagonal get exactly zero gradient. Multi-head mixing
does the same for all heads at once on [h, L, B*d/h]; expanded mixing stays a dense masked
product, on the [L, B*d] view.

Initialisation (``model.init``, default ``paper`` for the mixer family; see
:func:`mmtrain.models.layers.initialize_`): PyTorch's defaults, as in the paper's code, i.e.
embedding N(0, 1), Linear layers Kaiming-uniform, token mixing U(+-1/sqrt(n_ctx)). The embedding
scale is what matters: each block adds ``(W ⊙ M) · LN(H)``, a mixture of unit-scale normalised
vectors of earlier positions (per-coordinate std up to ~0.58 at init), to the residual stream. A
GPT-style N(0, 0.02) embedding (``model.init: gpt``) is buried under that mixture, so the model
cannot tell which token it is at and sits on the unigram plateau for hundreds of steps
(``benchmarks/learning.py``; ``tests/test_learning.py`` fails on it).

Incremental decoding (``init_cache`` / ``forward_step``): output row t of a masked matrix reads
only inputs j <= t, so each block caches what its token mixing reads (the normalised inputs U,
the projected heads, or the expanded hidden rows) and computes just the new rows:
O(L * d) per new token per layer instead of a full forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.layers import CausalLM, DecodingCache
from mmtrain.models.mixing_ops import (AUTO_BLOCK_SIZE, block_for_size, pack_lower, packed_mix, packed_size,
                                       triangular_mix, unpack_lower, unpack_rows)
from mmtrain.models.toeplitz import ToeplitzMixing

MATRICES = ("general", "toeplitz")

Cache = Dict[str, torch.Tensor]


class MaskedMixingMatrix(nn.Module):
    """A learned matrix over sequence positions, multiplied by a fixed 0/1 mask in ``forward``.

    weight [n_out, n_in] (or [heads, n_out, n_in]): row = output position, column = input position.
    bias   [n_out]       (or [heads, n_out]): one value per output position, broadcast over width.
    mask   [n_out, n_in] non-persistent buffer, shared by all heads.

    ``forward(u, n_out, n_in)`` uses the top-left ``n_out x n_in`` block, so the masks must make
    every prefix self-contained (true for all masks in this file).
    Init (:meth:`reset_parameters`): ``U(-1/sqrt(n_in), 1/sqrt(n_in))`` for weight and bias,
    PyTorch's Conv1d default that the paper relies on, or (``model.mixing_init: position``) row
    i drawn ``U(-1/sqrt(k_i), 1/sqrt(k_i))`` with k_i its number of live inputs; the masked
    entries are then zeroed once so exported weights look clean.
    """

    #: Marks the module for :func:`mmtrain.models.layers.initialize_` (model.mixing_init).
    is_token_mixing = True

    def __init__(self, mask: torch.Tensor, heads: Optional[int] = None):
        super().__init__()
        n_out, n_in = mask.shape
        lead = () if heads is None else (heads,)
        self.weight = nn.Parameter(torch.empty(*lead, n_out, n_in))
        self.bias = nn.Parameter(torch.empty(*lead, n_out))
        self.register_buffer("mask", mask.to(torch.get_default_dtype()), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, mode: str = "uniform") -> None:
        """``uniform``: U(+-1/sqrt(n_in)) everywhere; ``position``: row i U(+-1/sqrt(k_i)) for
        weight and bias, k_i = live (unmasked) inputs of row i. Masked entries are zeroed."""
        if mode not in ("uniform", "position"):
            raise ValueError(f"mixing init {mode!r} is not one of 'uniform', 'position'")
        with torch.no_grad():
            if mode == "uniform":
                bound = 1.0 / math.sqrt(self.weight.shape[-1])
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)
            else:
                rows = self.mask.sum(dim=-1).clamp(min=1.0).rsqrt().to(self.weight.dtype)   # [n_out]
                self.weight.uniform_(-1.0, 1.0).mul_(rows[:, None])
                self.bias.uniform_(-1.0, 1.0).mul_(rows)
            self.weight.mul_(self.mask)

    @property
    def mixing_parameter(self) -> nn.Parameter:
        """The parameter holding the mixing matrix (for optimizer groups)."""
        return self.weight

    def masked_entries(self) -> torch.Tensor:
        """Bool, the mixing parameter's shape: True where a stored entry is masked (never read)."""
        return (self.mask == 0).expand_as(self.weight)

    def dense_numel(self) -> int:
        """Entries of the dense matrices (what the paper counts as this module's parameters)."""
        return int(torch.Size(getattr(self.weight, "ds_shape", self.weight.shape)).numel())

    def dense_weight(self) -> torch.Tensor:
        """The whole masked matrix [(heads,) n_out, n_in] (what a bundle stores)."""
        return self.weight * self.mask.to(self.weight.dtype)

    def masked_weight(self, n_out: int, n_in: int, start: int = 0) -> torch.Tensor:
        """(W ⊙ M) restricted to outputs start..n_out-1 and the first n_in inputs:
        [(heads,) n_out - start, n_in]."""
        # The mask buffer stays fp32 when DeepSpeed casts only the parameters to bf16/fp16.
        return self.weight[..., start:n_out, :n_in] * self.mask[start:n_out, :n_in].to(self.weight.dtype)

    def forward(self, u: torch.Tensor, n_out: Optional[int] = None, start: int = 0,
                triangular_block: Optional[int] = None) -> torch.Tensor:
        """u [B, (heads,) n_in, width] -> output rows start..n_out-1: [B, (heads,) n_out - start, width].

        n_out defaults to n_in; ``start > 0`` is incremental decoding (only the new rows). With
        ``triangular_block`` (a block size, 0 = auto; lower-triangular masks only), u is
        [(heads,) L, N] and the product is :func:`triangular_mix`'s. Every use of the weights goes
        through this call, so module hooks (ZeRO-3's parameter gathering) always see it.
        """
        if triangular_block is not None:
            length = u.shape[-2]
            mixed = triangular_mix(self.weight, u, triangular_block)
            return mixed + self.bias[..., :length, None].to(mixed.dtype)
        n_in = u.shape[-2]
        n_out = n_in if n_out is None else n_out
        return torch.matmul(self.masked_weight(n_out, n_in, start), u) + self.bias[..., start:n_out, None]


LAYOUTS = ("packed", "dense")
DENSE_PANEL_MAX = 256    # up to this n_ctx a packed matrix is one panel: the dense matrix itself


def packed_block(n_ctx: int, block_size: int = 0) -> int:
    """Rows per block row of a packed matrix: ``block_size`` when set, else one panel (the dense
    matrix) up to DENSE_PANEL_MAX positions and AUTO_BLOCK_SIZE (128) rows above: a packed matrix
    then stores n (n + 128) / 2 values, 51.6 % of the dense count at n_ctx 4096 (256-row panels:
    53.1 %, and no faster in benchmarks/mixing.py)."""
    if block_size:
        return min(block_size, n_ctx)
    return n_ctx if n_ctx <= DENSE_PANEL_MAX else AUTO_BLOCK_SIZE


class CausalMixingMatrix(nn.Module):
    """A learned triangular ``n_ctx x n_ctx`` matrix over positions (or one per head), with a
    per-position bias: ``Y = tril(W)[:L, :L] · U + b[:L]``.

    ``layout``:

    - ``packed`` (default): ``packed_weight [(heads,) P]`` holds only a lower triangle, one row
      panel per block of :func:`packed_block` rows (:mod:`mmtrain.models.mixing_ops`), so the
      parameter, its gradient, its optimizer moments and its ZeRO partitions are about half of
      ``n_ctx^2``; the sequence-first product is :func:`packed_mix` (two GEMMs per block row).
    - ``dense``: ``weight [(heads,) n_ctx, n_ctx]`` with a 0/1 mask buffer, the product
      :func:`triangular_mix` (the layout of earlier versions).

    ``diagonal`` (<= 0) and ``transposed`` describe other triangular masks with the same
    storage: the live entries of ``S`` are ``tril(S, diagonal)``, with ``S = W`` or, transposed,
    ``S = Wᵀ`` (an upper-triangular W; e.g. the bidirectional model's reverse stream,
    ``triu(W, 2)`` = ``diagonal=-2, transposed=True``). Those run through the masked matmul.

    Either layout loads the other's state dict (``weight`` dense or ``packed_weight``), so old and
    new checkpoints and bundles load into both; bundles always store the dense, masked ``weight``
    (:meth:`dense_weight`). Init draws the dense matrix as the dense layout does and packs it, so
    a seed gives the same model in both layouts.
    """

    #: Marks the module for :func:`mmtrain.models.layers.initialize_` (model.mixing_init).
    is_token_mixing = True

    def __init__(self, n_ctx: int, heads: Optional[int] = None, layout: str = "packed", block_size: int = 0,
                 diagonal: int = 0, transposed: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"mixing layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if diagonal > 0:
            raise ValueError(f"diagonal must be <= 0 (a lower triangle), got {diagonal}")
        self.n_ctx, self.layout, self.diagonal, self.transposed = n_ctx, layout, diagonal, transposed
        self.block = packed_block(n_ctx, block_size)
        lead = () if heads is None else (heads,)
        if layout == "packed":
            self.packed_weight = nn.Parameter(torch.empty(*lead, packed_size(n_ctx, self.block)))
        else:
            self.weight = nn.Parameter(torch.empty(*lead, n_ctx, n_ctx))
            self.register_buffer("mask", self._live().float(), persistent=False)
        self.bias = nn.Parameter(torch.empty(*lead, n_ctx))
        self._register_load_state_dict_pre_hook(self._convert_layout)
        self.reset_parameters()

    def _live(self, device=None) -> torch.Tensor:
        """[n_ctx, n_ctx] bool, W's coordinates (row = output): True where W is used."""
        lower = torch.ones(self.n_ctx, self.n_ctx, dtype=torch.bool, device=device).tril(self.diagonal)
        return lower.t() if self.transposed else lower

    @property
    def mixing_parameter(self) -> nn.Parameter:
        return self.packed_weight if self.layout == "packed" else self.weight

    def masked_entries(self) -> torch.Tensor:
        """Bool, the mixing parameter's shape: True where a stored entry is masked, never read
        (packed: the entries of diagonal blocks outside the triangle; dense: all of them)."""
        param = self.mixing_parameter
        if self.layout == "packed":
            live = self._live(param.device)
            stored_live = pack_lower(live.t() if self.transposed else live, self.block)
            return (~stored_live).expand_as(param)
        return (self.mask == 0).expand_as(param)

    def dense_numel(self) -> int:
        """Entries of the dense ``[(heads,) n_ctx, n_ctx]`` matrices, whatever the layout stores
        (the paper's parameter count)."""
        shape = getattr(self.mixing_parameter, "ds_shape", self.mixing_parameter.shape)
        lead = shape[:-1] if self.layout == "packed" else shape[:-2]
        return int(torch.Size(lead).numel()) * self.n_ctx * self.n_ctx

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """Dense W [(heads,) n, n] -> this module's packed tensor (entries outside the mask dropped)."""
        live = self._live(dense.device).to(dense.dtype)
        masked = dense * live
        return pack_lower(masked.transpose(-1, -2) if self.transposed else masked, self.block)

    def unpack(self, packed: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
        """A packed tensor (block size ``block``, default this module's) -> the dense masked W."""
        stored = unpack_lower(packed, self.n_ctx, block or self.block).tril(self.diagonal)
        return stored.transpose(-1, -2) if self.transposed else stored

    def reset_parameters(self, mode: str = "uniform") -> None:
        """``uniform``: U(+-1/sqrt(n_ctx)) for weight and bias; ``position``: row i U(+-1/sqrt(k_i))
        for both, k_i = live inputs of row i. Masked entries are zero (packed: not stored)."""
        if mode not in ("uniform", "position"):
            raise ValueError(f"mixing init {mode!r} is not one of 'uniform', 'position'")
        param = self.mixing_parameter
        lead = param.shape[:-1] if self.layout == "packed" else param.shape[:-2]
        with torch.no_grad():
            dense = torch.empty(*lead, self.n_ctx, self.n_ctx, dtype=param.dtype, device=param.device)
            live = self._live(param.device).to(param.dtype)
            if mode == "uniform":
                bound = 1.0 / math.sqrt(self.n_ctx)
                dense.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)
            else:
                rows = live.sum(dim=-1).clamp(min=1.0).rsqrt()
                dense.uniform_(-1.0, 1.0).mul_(rows[:, None])
                self.bias.uniform_(-1.0, 1.0).mul_(rows)
            param.copy_(self.pack(dense) if self.layout == "packed" else dense * live)

    def dense_weight(self) -> torch.Tensor:
        """The whole masked matrix W [(heads,) n_ctx, n_ctx] (what a bundle stores)."""
        if self.layout == "packed":
            return self.unpack(self.packed_weight)
        return self.weight * self.mask.to(self.weight.dtype)

    def masked_weight(self, n_out: int, n_in: int, start: int = 0) -> torch.Tensor:
        """Masked W rows start..n_out-1, columns 0..n_in-1: [(heads,) n_out - start, n_in]
        (packed: read from the panels those rows lie in)."""
        if self.layout == "dense":
            return self.weight[..., start:n_out, :n_in] * self.mask[start:n_out, :n_in].to(self.weight.dtype)
        if self.transposed:   # W[start:n_out, :n_in] = S[:n_in, start:n_out]ᵀ
            stored = unpack_rows(self.packed_weight, self.n_ctx, self.block, 0, n_in, n_out).tril(self.diagonal)
            return stored[..., start:n_out].transpose(-1, -2)
        rows = unpack_rows(self.packed_weight, self.n_ctx, self.block, start, n_out, n_in)
        return rows.tril(start + self.diagonal) if self.diagonal else rows

    def forward(self, u: torch.Tensor, n_out: Optional[int] = None, start: int = 0,
                triangular_block: Optional[int] = None) -> torch.Tensor:
        """u [B, (heads,) n_in, width] -> rows start..n_out-1 [B, (heads,) n_out - start, width]
        (masked matmul; ``start > 0`` is incremental decoding). With ``triangular_block`` (the
        dense layout's tile size, 0 = auto), u is sequence-first [(heads,) L, N] and the product
        is :func:`packed_mix` / :func:`triangular_mix` (causal masks only)."""
        if triangular_block is not None:
            if self.diagonal or self.transposed:
                raise ValueError("the triangular op computes tril(W) products only")
            length = u.shape[-2]
            if self.layout == "packed":
                mixed = packed_mix(self.packed_weight, u, self.n_ctx, self.block)
            else:
                mixed = triangular_mix(self.weight, u, triangular_block)
            return mixed + self.bias[..., :length, None].to(mixed.dtype)
        n_in = u.shape[-2]
        n_out = n_in if n_out is None else n_out
        return torch.matmul(self.masked_weight(n_out, n_in, start), u) + self.bias[..., start:n_out, None]

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """Forward FLOPs per token of ``tril(W)[:L, :L] · U`` on width d: 2 d (L + 1) / 2 averaged
        over the positions (only the lower triangle is computed)."""
        return float(d_model * (seq_len + 1))

    def _convert_layout(self, state_dict, prefix, *args) -> None:
        """Accept the other layout's tensor: dense ``weight`` -> packed, or ``packed_weight`` -> dense
        (the block size of a packed tensor is inferred from its length)."""
        dense_key, packed_key = prefix + "weight", prefix + "packed_weight"
        if self.layout == "packed" and dense_key in state_dict and packed_key not in state_dict:
            dense = state_dict.pop(dense_key)
            right = dense.dim() >= 2 and dense.shape[-1] == dense.shape[-2] == self.n_ctx
            state_dict[packed_key] = self.pack(dense) if right else dense   # a wrong shape: load_state_dict says so
        elif self.layout == "dense" and packed_key in state_dict and dense_key not in state_dict:
            packed = state_dict.pop(packed_key)
            block = block_for_size(self.n_ctx, packed.shape[-1])
            state_dict[dense_key] = packed if block is None else self.unpack(packed, block)


def mixing_layout(model: nn.Module) -> Optional[str]:
    """The storage layout of a model's causal token-mixing matrices ("packed" / "dense"), or
    None when it has none."""
    layouts = sorted({m.layout for m in model.modules() if isinstance(m, CausalMixingMatrix)})
    if len(layouts) > 1:
        raise ValueError(f"a model mixes token-mixing layouts: {layouts}")
    return layouts[0] if layouts else None


class SequenceMixing:
    """What flat token mixing adds to a matrix module (:class:`CausalMixingMatrix` or
    :class:`~mmtrain.models.toeplitz.ToeplitzMixing`): the sequence-first product on the
    [L, B*d] view and incremental decoding over a cache of the normalised inputs U."""

    block_size: int
    n_ctx: int

    def mix_sequence_first(self, u: torch.Tensor) -> torch.Tensor:
        """u [L, B, d] -> M[:L, :L] · u + b[:L]: [L, B, d] (one product on the [L, B*d] view)."""
        length, batch, width = u.shape
        return self(u.reshape(length, batch * width), triangular_block=self.block_size).view(length, batch, width)

    def init_cache(self, batch: int, width: int, new) -> Cache:
        return {"u": new(batch, self.n_ctx, width)}

    def forward_step(self, u: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
        """u [B, T, d] (positions start..start+T-1) -> [B, T, d], caching U."""
        end = start + u.shape[1]
        cache["u"][:, start:end] = u
        return self(cache["u"][:, :end], n_out=end, start=start)


class FlatTokenMixing(SequenceMixing, CausalMixingMatrix):
    """The paper's main token mixing: ``tril(W)[:L, :L] · U + b[:L, None]``.

    U [B, L, d] -> [B, L, d] (masked matmul), or sequence-first U [L, B, d] -> [L, B, d] through
    the packed (or dense-layout) triangular op on the [L, B*d] view. Parameters: the mixing
    matrix (:class:`CausalMixingMatrix`) and bias [n_ctx]. Forward cost per token averaged over
    positions: 2 * d * (L + 1) / 2 FLOPs (the lower triangle).
    """

    #: Batch-first calls ``forward(u)`` on a whole [B, L, d] input run the packed op on a
    #: sequence-first copy (the hybrid, autoencoder and bidirectional models run batch-first);
    #: ``model.mixer_impl: dense`` turns it off for the plain masked matmul.
    batch_first_op = True

    def __init__(self, n_ctx: int, block_size: int = 0, layout: str = "packed"):
        super().__init__(n_ctx, layout=layout, block_size=block_size)
        self.block_size = block_size

    def forward(self, u: torch.Tensor, n_out: Optional[int] = None, start: int = 0,
                triangular_block: Optional[int] = None) -> torch.Tensor:
        whole = triangular_block is None and start == 0 and n_out in (None, u.shape[-2]) and u.dim() == 3
        if whole and self.batch_first_op and self.layout == "packed":
            return self.mix_sequence_first(u.transpose(0, 1)).transpose(0, 1)
        return super().forward(u, n_out, start, triangular_block)


class FlatToeplitzMixing(SequenceMixing, ToeplitzMixing):
    """Flat Toeplitz token mixing (``model.mixer_matrix: toeplitz``): ``T(k)[:L, :L] · U + b[:L]``
    on the full width, one kernel [n_ctx] and bias [n_ctx] per block
    (:class:`~mmtrain.models.toeplitz.ToeplitzMixing`). Batch-first inputs need no transpose:
    both product paths work along the sequence axis of any layout."""

    def __init__(self, n_ctx: int, block_size: int = 0, fft_min_length: int = 0):
        super().__init__(n_ctx, fft_min_length=fft_min_length)
        self.block_size = block_size


def flat_token_mixing(n_ctx: int, block_size: int = 0, layout: str = "packed", matrix: str = "general",
                      fft_min_length: int = 0) -> nn.Module:
    """Flat token mixing over a general causal matrix (stored in ``layout``) or a Toeplitz one."""
    if matrix == "toeplitz":
        return FlatToeplitzMixing(n_ctx, block_size, fft_min_length)
    if matrix != "general":
        raise ValueError(f"mixer_matrix {matrix!r} is not one of {', '.join(MATRICES)}")
    return FlatTokenMixing(n_ctx, block_size, layout)


class MultiHeadTokenMixing(nn.Module):
    """Multi-head token mixing: project, mix each head with its own masked matrix, project back.

    U [B, L, d] -> in_proj -> [B, h, L, d/h] -> (W_h ⊙ tril) · P_h + b_h -> concat [B, L, d]
    -> out_proj -> [B, L, d]. All heads are mixed in one batched matmul over a [h, n_ctx, n_ctx]
    weight. Both projections are Linear(d, d) with bias (as the original's MixerHead).
    """

    def __init__(self, d_model: int, n_ctx: int, heads: int, block_size: int = 0, layout: str = "packed",
                 matrix: str = "general", fft_min_length: int = 0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by mixer_heads {heads}")
        self.heads = heads
        self.block_size = block_size
        self.in_proj = nn.Linear(d_model, d_model)
        if matrix == "toeplitz":
            self.mixing = ToeplitzMixing(n_ctx, heads=heads, fft_min_length=fft_min_length)
        else:
            self.mixing = CausalMixingMatrix(n_ctx, heads=heads, layout=layout, block_size=block_size)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch, length, width = u.shape
        per_head = self.in_proj(u).view(batch, length, self.heads, width // self.heads).transpose(1, 2)
        mixed = self.mixing(per_head)                              # [B, h, L, d/h]
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))

    def mix_sequence_first(self, u: torch.Tensor) -> torch.Tensor:
        """u [L, B, d] -> [L, B, d]: heads laid out as [h, L, B*d/h] so each head's mixing is one
        block-triangular product (two copies of size L*B*d, small next to the L^2 product)."""
        length, batch, width = u.shape
        head_width = width // self.heads
        per_head = (self.in_proj(u).view(length, batch, self.heads, head_width)
                    .permute(2, 0, 1, 3).reshape(self.heads, length, batch * head_width))
        mixed = self.mixing(per_head, triangular_block=self.block_size)                  # [h, L, B*d/h]
        mixed = mixed.view(self.heads, length, batch, head_width).permute(1, 2, 0, 3).reshape(length, batch, width)
        return self.out_proj(mixed)

    def init_cache(self, batch: int, width: int, new) -> Cache:
        return {"heads": new(batch, self.heads, self.mixing.n_ctx, width // self.heads)}

    def forward_step(self, u: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
        """u [B, T, d] -> [B, T, d], caching the projected head inputs [B, h, n_ctx, d/h]."""
        batch, length, width = u.shape
        end = start + length
        cache["heads"][:, :, start:end] = self.in_proj(u).view(
            batch, length, self.heads, width // self.heads).transpose(1, 2)
        mixed = self.mixing(cache["heads"][:, :, :end], n_out=end, start=start)   # [B, h, T, d/h]
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        # h heads of width d/h mixed as the matrix counts it (all heads together cost a width-d
        # product); the projections are in matmul_params.
        return self.mixing.forward_flops_per_token(seq_len, d_model)


def expanded_masks(n_ctx: int, expansion: int):
    """Masks of expanded mixing with hidden row r assigned to position pos(r) = r // expansion.

    expand   [e*n_ctx, n_ctx]: hidden row r sees inputs j <= pos(r).
    contract [n_ctx, e*n_ctx]: output i sees hidden rows with pos(r) <= i.
    """
    hidden_pos = torch.arange(expansion * n_ctx) // expansion
    positions = torch.arange(n_ctx)
    expand = (positions[None, :] <= hidden_pos[:, None]).float()
    contract = (hidden_pos[None, :] <= positions[:, None]).float()
    return expand, contract


class ExpandedTokenMixing(nn.Module):
    """Expanded token mixing ``n_ctx -> e*n_ctx -> n_ctx`` with GELU between (Conv1d(T, eT, 1) ->
    GELU -> Conv1d(eT, T, 1) in the original), both matrices causally masked.

    Causality: each position owns e hidden rows (pos(r) = r // e). Hidden row r reads inputs
    j <= pos(r); output i reads hidden rows with pos(r) <= i, so output i depends only on inputs
    j <= i. The original masks both matrices with a rectangular ``tril`` instead, which leaves the
    hidden rows r >= T dead (they feed no output); this layout gives every position e live rows.
    For a length-L input the first e*L hidden rows are used, so prefixes stay exact.

    U [B, L, d] -> [B, L, d]. Parameters: 2*e*T^2 weights + e*T + T biases.
    """

    def __init__(self, n_ctx: int, expansion: int):
        super().__init__()
        self.expansion = expansion
        expand_mask, contract_mask = expanded_masks(n_ctx, expansion)
        self.expand = MaskedMixingMatrix(expand_mask)
        self.contract = MaskedMixingMatrix(contract_mask)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        length = u.shape[1]
        hidden = F.gelu(self.expand(u, n_out=self.expansion * length))   # [B, e*L, d]
        return self.contract(hidden, n_out=length)                       # [B, L, d]

    def mix_sequence_first(self, u: torch.Tensor) -> torch.Tensor:
        """u [L, B, d] -> [L, B, d]: the same two masked products, each one GEMM on [rows, B*d]."""
        length, batch, width = u.shape
        hidden = F.gelu(self.expand(u.reshape(length, batch * width), n_out=self.expansion * length))
        return self.contract(hidden, n_out=length).view(length, batch, width)

    def init_cache(self, batch: int, width: int, new) -> Cache:
        n_ctx = self.expand.weight.shape[-1]
        return {"u": new(batch, n_ctx, width), "hidden": new(batch, self.expansion * n_ctx, width)}

    def forward_step(self, u: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
        """u [B, T, d] -> [B, T, d], caching U and the GELU hidden rows (e per position)."""
        end, e = start + u.shape[1], self.expansion
        cache["u"][:, start:end] = u
        cache["hidden"][:, e * start:e * end] = F.gelu(
            self.expand(cache["u"][:, :end], n_out=e * end, start=e * start))
        return self.contract(cache["hidden"][:, :e * end], n_out=end, start=start)

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        # Unmasked entries: e * L (L + 1) / 2 in each of the two matrices, so averaged over
        # positions 2 * 2 * e * d * (L + 1) / 2 per token (the dense product computes twice that).
        return 2.0 * self.expansion * d_model * (seq_len + 1)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, hidden) -> GELU (exact erf) -> Linear(hidden, d)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


def build_token_mixing(d_model: int, n_ctx: int, heads: int, expansion: int, block_size: int = 0,
                       layout: str = "packed", matrix: str = "general", fft_min_length: int = 0) -> nn.Module:
    """Flat, multi-head or expanded token mixing; block_size is the triangular op's (0 = auto),
    layout the causal matrices' storage (:class:`CausalMixingMatrix`; expanded mixing is dense),
    matrix ``general`` or ``toeplitz`` (flat and multi-head only)."""
    if heads > 0 and expansion > 1:
        raise ValueError("mixer_heads > 0 and mixer_expansion > 1 cannot be combined")
    if expansion > 1 and matrix != "general":
        raise ValueError("mixer_expansion > 1 needs mixer_matrix: general (expanded mixing has no Toeplitz form)")
    if heads > 0:
        return MultiHeadTokenMixing(d_model, n_ctx, heads, block_size, layout, matrix, fft_min_length)
    if expansion > 1:
        return ExpandedTokenMixing(n_ctx, expansion)
    return flat_token_mixing(n_ctx, block_size, layout, matrix, fft_min_length)


class MixerBlock(nn.Module):
    """Pre-norm block: ``H += TokenMixing(LN(H)); H += MLP(LN(H))``.

    H [B, L, d] -> [B, L, d], or with ``sequence_first=True`` H [L, B, d] -> [L, B, d] (the
    token mixing's fast path; everything else is position-wise and layout-agnostic).
    """

    def __init__(self, d_model: int, n_ctx: int, ffn_mult: int, heads: int, expansion: int, eps: float,
                 block_size: int = 0, layout: str = "packed", matrix: str = "general", fft_min_length: int = 0):
        super().__init__()
        self.token_norm = nn.LayerNorm(d_model, eps=eps)
        self.token_mixing = build_token_mixing(d_model, n_ctx, heads, expansion, block_size, layout, matrix,
                                               fft_min_length)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, ffn_mult * d_model)

    def forward(self, h: torch.Tensor, sequence_first: bool = False) -> torch.Tensor:
        u = self.token_norm(h)
        h = h + (self.token_mixing.mix_sequence_first(u) if sequence_first else self.token_mixing(u))
        return h + self.mlp(self.mlp_norm(h))

    def forward_step(self, h: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
        """The same block for new positions start..start+T-1 only: h [B, T, d] -> [B, T, d]."""
        h = h + self.token_mixing.forward_step(self.token_norm(h), cache, start)
        return h + self.mlp(self.mlp_norm(h))


class MaskedMixerLM(CausalLM):
    """Masked mixer LM (``model.kind: mixer``).

    ``MaskedMixerLM(model_cfg, vocab_size=None)``: model_cfg is a ModelConfig (DictConfig,
    dataclass or dict). State-dict names: ``wte.weight``, ``blocks.{i}.token_norm.*``,
    ``blocks.{i}.token_mixing.*``, ``blocks.{i}.mlp_norm.*``, ``blocks.{i}.mlp.fc_{in,out}.*``,
    ``final_norm.*`` (when enabled), ``lm_head.weight``.
    """

    kind = "mixer"

    def __init__(self, model_cfg: Any, vocab_size: Optional[int] = None):
        super().__init__(model_cfg, vocab_size)
        c = self.config_dict
        d = c["d_model"]
        self.wte = nn.Embedding(c["vocab_size"], d)
        # Block size 0 = per input length (mixing_ops.auto_block_size); `triangular` always blocks.
        block_size = c["mixer_block_size"] or (AUTO_BLOCK_SIZE if c["mixer_impl"] == "triangular" else 0)
        self.blocks = nn.ModuleList(
            MixerBlock(d, c["n_ctx"], c["ffn_mult"], c["mixer_heads"], c["mixer_expansion"], c["norm_eps"],
                       block_size, c["mixer_layout"], c["mixer_matrix"], c["mixer_fft_min_length"])
            for _ in range(c["n_layers"]))
        # auto / triangular: run sequence-first so token mixing is one large triangular GEMM.
        self.sequence_first = c["mixer_impl"] != "dense"
        for block in self.blocks:
            if isinstance(block.token_mixing, FlatTokenMixing):
                block.token_mixing.batch_first_op = self.sequence_first
        self._finish_mixer_lm()

    @property
    def embedding(self) -> nn.Embedding:
        return self.wte

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (L <= n_ctx) -> [B, L, d], after the final LayerNorm when enabled."""
        self.check_length(input_ids)
        if not self.sequence_first:
            return self.final_norm(self._run_blocks(self.wte(input_ids), len(self.blocks)))
        h = self._run_blocks(self.wte(input_ids.t()), len(self.blocks))             # [L, B, d]
        return self.final_norm(h).transpose(0, 1).contiguous()

    def run_blocks(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """embeddings [B, L, d] through blocks 0..k-1 -> [B, L, d] (no final LayerNorm)."""
        if not self.sequence_first:
            return self._run_blocks(embeddings, k)
        return self._run_blocks(embeddings.transpose(0, 1).contiguous(), k).transpose(0, 1).contiguous()

    def _run_blocks(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """h through blocks 0..k-1, in the model's layout ([L, B, d] when sequence_first, else
        [B, L, d]), each block checkpointed when model.activation_checkpointing is on."""
        for block in self.blocks[:k]:
            h = self.call_block(block, h, self.sequence_first)
        return h

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        """Per block, preallocated [B, n_ctx, ...] buffers of what its token mixing reads."""
        layers = [block.token_mixing.init_cache(batch_size, self.d_model, self._cache_tensor) for block in self.blocks]
        return DecodingCache(length=0, layers=layers)

    def step_hidden_states(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        h = self.wte(input_ids)
        for block, layer_cache in zip(self.blocks, cache.layers):
            h = block.forward_step(h, layer_cache, cache.length)
        return self.final_norm(h)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length seq_len
        (default n_ctx)::

            6 * matmul_params  +  3 * n_layers * mixing_forward_flops_per_token

        matmul_params = all Linear weights incl. the LM head (not the embedding lookup):
        n_layers * 2 * ffn_mult * d^2 (+ 2 d^2 per layer for multi-head) + V * d.
        mixing_forward_flops_per_token counts the lower triangle only (position t reads t + 1
        positions), averaged over the L positions: flat d * (L + 1), multi-head d * (L + 1),
        expanded 2 * e * d * (L + 1) (the dense formulation computes twice as many).
        So a flat mixer costs 6 * matmul_params + 3 * n_layers * d * (L + 1).
        """
        length = self._sequence_length_for_flops(seq_len)
        mixing = sum(block.token_mixing.forward_flops_per_token(length, self.d_model) for block in self.blocks)
        return 6.0 * self.matmul_params() + 3.0 * mixing
