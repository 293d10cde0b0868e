"""Toeplitz token mixing: a causal matrix whose entries depend only on the lag, ``M[i, j] = k[i - j]``.

(Badger & Roland, "Toeplitz MLP Mixers are Low Complexity, Information-Rich Sequence Models",
arXiv 2605.06683.) Each head's mixing is a causal convolution of the sequence with a learned
kernel ``k`` as long as the context, plus the per-position bias the dense mixer keeps::

    Y[i] = sum_{j <= i} k[i - j] · U[j] + b[i]         (i, j positions; U [L, N], Y [L, N])

so a head stores ``2 n_ctx`` numbers instead of ``n_ctx (n_ctx + 1) / 2``.

Two exact product paths, chosen by length (:func:`toeplitz_mix`):

- **direct** (L < :data:`FFT_MIN_LENGTH`): materialise the masked ``L x L`` Toeplitz matrix and run
  the dense mixer's block-triangular op (:func:`~mmtrain.models.mixing_ops.triangular_mix`);
  the kernel's gradient is the sum of the matrix gradient along each diagonal. O(L^2 N).
- **FFT** (L >= :data:`FFT_MIN_LENGTH`): zero-pad U and k to ``n_fft >= 2L - 1`` (the next
  power of two), ``irfft(rfft(U) · rfft(k))`` and keep the first L rows: a linear (not circular)
  convolution, so no output reads a later input. O(N L log L). Half and bfloat16 inputs are
  transformed in fp32 and the result rounded once. Both gradients come from autograd through the
  transforms (each is again one convolution / correlation by FFT).

Incremental decoding reads rows ``start..end-1`` of the matrix (:func:`toeplitz_rows`):
O(L N) per new token, as the dense mixer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mmtrain.models.mixing_ops import triangular_mix

#: Sequence length from which :func:`toeplitz_mix` multiplies by FFT (below it: the direct
#: product). Measured by ``python benchmarks/toeplitz.py --crossover`` (docs/toeplitz.md).
FFT_MIN_LENGTH = 1024

PATHS = ("auto", "direct", "fft")


def toeplitz_rows(kernel: torch.Tensor, n_out: int, n_in: int, start: int = 0) -> torch.Tensor:
    """Rows ``start..n_out-1``, columns ``0..n_in-1`` of the masked Toeplitz matrix of ``kernel``
    [(h,) n]: entry (i, j) is ``kernel[i - j]`` for ``j <= i``, else 0 -> [(h,) n_out - start, n_in]."""
    rows = torch.arange(start, n_out, device=kernel.device)
    lag = rows[:, None] - torch.arange(n_in, device=kernel.device)[None, :]
    live = lag >= 0
    return kernel[..., lag.clamp(min=0)] * live.to(kernel.dtype)


def fft_size(length: int) -> int:
    """The transform length of a length-L linear convolution: a power of two >= 2L - 1."""
    return 1 << max(0, (2 * length - 2).bit_length())


def toeplitz_mix_fft(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``Y = T(kernel)[:L, :L] · u`` by FFT. kernel [(h,) n], u [(B,) (h,) L, N] -> u's shape.

    The transforms run along the last axis of the transposed view [.., N, L] (measured faster
    than along the strided sequence axis)."""
    length = u.shape[-2]
    n_fft = fft_size(length)
    dtype = torch.promote_types(u.dtype, kernel.dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    spectrum_u = torch.fft.rfft(u.transpose(-1, -2).to(work), n=n_fft, dim=-1)       # [.., N, F]
    spectrum_k = torch.fft.rfft(kernel[..., :length].to(work), n=n_fft, dim=-1)       # [(h,) F]
    mixed = torch.fft.irfft(spectrum_u * spectrum_k[..., None, :], n=n_fft, dim=-1)[..., :length]
    return mixed.transpose(-1, -2).to(dtype)


def toeplitz_mix_direct(kernel: torch.Tensor, u: torch.Tensor, block_size: int = 0) -> torch.Tensor:
    """The same product through the materialised ``L x L`` matrix and the block-triangular op."""
    length = u.shape[-2]
    matrix = toeplitz_rows(kernel, length, length)
    if u.dtype != matrix.dtype:
        dtype = torch.promote_types(u.dtype, matrix.dtype)
        matrix, u = matrix.to(dtype), u.to(dtype)
    return triangular_mix(matrix, u, block_size)


def toeplitz_mix(kernel: torch.Tensor, u: torch.Tensor, path: str = "auto", block_size: int = 0,
                 fft_min_length: Optional[int] = None) -> torch.Tensor:
    """``T(kernel)[:L, :L] · u`` for each sample and head: kernel [n] with u [(B,) L, N], or kernel
    [h, n] with u [(B,) h, L, N]; L = u.shape[-2] <= n. ``path``: ``auto`` (FFT from
    ``fft_min_length``, default :data:`FFT_MIN_LENGTH`), ``direct`` or ``fft``. Returns u's shape."""
    if kernel.dim() not in (1, 2):
        raise ValueError(f"toeplitz_mix: kernel must be [n] or [heads, n], got {tuple(kernel.shape)}")
    length = u.shape[-2]
    if length > kernel.shape[-1]:
        raise ValueError(f"toeplitz_mix: sequence length {length} exceeds the kernel length {kernel.shape[-1]}")
    if kernel.dim() == 2 and (u.dim() < 3 or u.shape[-3] != kernel.shape[0]):
        raise ValueError(f"toeplitz_mix: kernel has {kernel.shape[0]} heads, u is {tuple(u.shape)}")
    if path not in PATHS:
        raise ValueError(f"toeplitz_mix: path {path!r} is not one of {', '.join(PATHS)}")
    if path == "auto":
        path = "fft" if length >= (FFT_MIN_LENGTH if fft_min_length is None else fft_min_length) else "direct"
    if path == "fft":
        return toeplitz_mix_fft(kernel, u)
    return toeplitz_mix_direct(kernel, u, block_size)


def fft_flops(length: int) -> float:
    """Forward FLOPs per output element of the FFT product at length L: a real FFT of n_fft
    points ~ 2.5 n_fft log2 n_fft, one forward and one inverse per channel, and the complex
    pointwise product (6 per frequency), spread over the L outputs (the kernel's own transform is
    shared by all channels and left out)."""
    n_fft = fft_size(length)
    return (2 * 2.5 * n_fft * math.log2(max(n_fft, 2)) + 6 * (n_fft // 2 + 1)) / length


class ToeplitzMixing(nn.Module):
    """A learned causal Toeplitz matrix over positions (or one per head), with a per-position bias:
    ``Y = T(k)[:L, :L] · U + b[:L]``, ``T(k)[i, j] = k[i - j]`` for ``j <= i``.

    kernel [(heads,) n_ctx]: entry t is the weight of the input t positions back (lag t).
    bias   [(heads,) n_ctx]: one value per output position, broadcast over the width.

    The same interface as the dense mixer's matrices
    (:class:`~mmtrain.models.mixer.CausalMixingMatrix`): ``forward(u)`` batch-first on a whole
    input, ``forward(u, triangular_block=...)`` sequence-first [(heads,) L, N] (the training
    path: :func:`toeplitz_mix`, direct below ``fft_min_length`` and FFT from it), and
    ``forward(u, n_out, start)`` for the rows of incremental decoding. Bundles store the kernel
    itself; :meth:`dense_weight` is the matrix it stands for.

    Init (``model.mixing_init``): ``kaiming`` (the default, the Toeplitz mixer's own: kernel
    N(0, 2 / n_ctx), i.e. ``nn.init.kaiming_normal_`` on a [1, n_ctx] weight, and a zero bias) or
    ``uniform`` (the dense mixer's U(+-1/sqrt(n_ctx)) for kernel and bias).
    """

    #: Marks the module for :func:`mmtrain.models.layers.initialize_` (model.mixing_init).
    is_token_mixing = True
    #: The init the constructor draws (``model.mixing_init: auto``).
    default_init = "kaiming"
    INITS = ("kaiming", "uniform")

    def __init__(self, n_ctx: int, heads: Optional[int] = None, fft_min_length: int = 0):
        super().__init__()
        self.n_ctx = n_ctx
        self.fft_min_length = fft_min_length or FFT_MIN_LENGTH
        lead = () if heads is None else (heads,)
        self.kernel = nn.Parameter(torch.empty(*lead, n_ctx))
        self.bias = nn.Parameter(torch.empty(*lead, n_ctx))
        self.reset_parameters()

    def reset_parameters(self, mode: str = "kaiming") -> None:
        if mode not in self.INITS:
            raise ValueError(f"Toeplitz mixing init {mode!r} is not one of {', '.join(self.INITS)}")
        with torch.no_grad():
            if mode == "kaiming":
                self.kernel.normal_(0.0, math.sqrt(2.0 / self.n_ctx))
                self.bias.zero_()
            else:
                bound = 1.0 / math.sqrt(self.n_ctx)
                self.kernel.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)

    @property
    def mixing_parameter(self) -> nn.Parameter:
        return self.kernel

    def masked_entries(self) -> torch.Tensor:
        """Nothing stored is masked: every lag 0..n_ctx-1 is read."""
        return torch.zeros_like(self.kernel, dtype=torch.bool)

    def dense_numel(self) -> int:
        """The values the kernels hold (a Toeplitz mixer's parameters are the kernels themselves)."""
        return int(torch.Size(getattr(self.kernel, "ds_shape", self.kernel.shape)).numel())

    def dense_weight(self) -> torch.Tensor:
        """The whole masked matrix T(k) [(heads,) n_ctx, n_ctx] the kernels stand for."""
        return toeplitz_rows(self.kernel, self.n_ctx, self.n_ctx)

    def masked_weight(self, n_out: int, n_in: int, start: int = 0) -> torch.Tensor:
        """Rows start..n_out-1, columns 0..n_in-1 of T(k): [(heads,) n_out - start, n_in]."""
        return toeplitz_rows(self.kernel, n_out, n_in, start)

    def forward(self, u: torch.Tensor, n_out: Optional[int] = None, start: int = 0,
                triangular_block: Optional[int] = None) -> torch.Tensor:
        """u [B, (heads,) n_in, width] -> rows start..n_out-1 [B, (heads,) n_out - start, width];
        with ``triangular_block`` (the direct path's tile size, 0 = auto) u is sequence-first
        [(heads,) L, N]. A whole input (start 0, n_out = L) takes :func:`toeplitz_mix`'s path."""
        length = u.shape[-2]
        if triangular_block is not None or (start == 0 and n_out in (None, length)):
            mixed = toeplitz_mix(self.kernel, u, block_size=triangular_block or 0,
                                 fft_min_length=self.fft_min_length)
            return mixed + self.bias[..., :length, None].to(mixed.dtype)
        n_out = length if n_out is None else n_out
        return torch.matmul(self.masked_weight(n_out, length, start), u) + self.bias[..., start:n_out, None]

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """Forward FLOPs per token of the product's path at this length: the direct path's lower
        triangle (d (L + 1), as the dense mixer) or the FFT's (:func:`fft_flops`)."""
        if seq_len >= self.fft_min_length:
            return float(d_model * fft_flops(seq_len))
        return float(d_model * (seq_len + 1))


class ReverseToeplitzMixing(ToeplitzMixing):
    """The bidirectional mixer's reverse stream as a Toeplitz matrix: output n mixes inputs
    j >= n + ``skip`` with ``k[j - n]``, ``Y[n] = sum_{j >= n + skip} k[j - n] U[j] + b[n]`` (the
    transpose of the causal Toeplitz matrix, its first ``skip`` lags unused).

    Computed as the causal product on the sequence read backwards: flip U, mix with the kernel
    whose first ``skip`` lags are zero, flip back; so both product paths apply. Lags below
    ``skip`` are stored but never read (:meth:`masked_entries`; their gradient is exactly zero).
    u [B, L, d] (whole inputs only: the stream has no incremental form) -> [B, L, d].
    """

    def __init__(self, n_ctx: int, skip: int = 2, fft_min_length: int = 0):
        self.skip = skip
        super().__init__(n_ctx, fft_min_length=fft_min_length)

    def live_kernel(self) -> torch.Tensor:
        lags = torch.arange(self.kernel.shape[-1], device=self.kernel.device)
        return self.kernel * (lags >= self.skip).to(self.kernel.dtype)

    def masked_entries(self) -> torch.Tensor:
        return (torch.arange(self.kernel.shape[-1], device=self.kernel.device) < self.skip).expand_as(self.kernel)

    def reset_parameters(self, mode: str = "kaiming") -> None:
        super().reset_parameters(mode)
        with torch.no_grad():
            self.kernel[..., :self.skip] = 0.0

    def dense_weight(self) -> torch.Tensor:
        """W [n_ctx, n_ctx], W[n, j] = k[j - n] for j >= n + skip, else 0."""
        return toeplitz_rows(self.live_kernel(), self.n_ctx, self.n_ctx).transpose(-1, -2)

    def masked_weight(self, n_out: int, n_in: int, start: int = 0) -> torch.Tensor:
        return self.dense_weight()[..., start:n_out, :n_in]

    def forward(self, u: torch.Tensor, n_out: Optional[int] = None, start: int = 0,
                triangular_block: Optional[int] = None) -> torch.Tensor:
        length = u.shape[-2]
        if start or n_out not in (None, length) or triangular_block is not None:
            raise ValueError("the reverse Toeplitz stream mixes whole batch-first inputs only")
        mixed = toeplitz_mix(self.live_kernel(), u.flip(-2), fft_min_length=self.fft_min_length).flip(-2)
        return mixed + self.bias[..., :length, None].to(mixed.dtype)

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """The FFT path's, or the direct product's live entries (as the general reverse stream counts them)."""
        if seq_len >= self.fft_min_length:
            return super().forward_flops_per_token(seq_len, d_model)
        return float(d_model * (seq_len - 1) * (seq_len - 2)) / seq_len
