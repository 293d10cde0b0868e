"""The frozen-embedding retrieval model (arXiv 2409.01482, frozen-embedding retrieval) and its candidate-set sampler.

One example is a sequence of N embedding positions ``[q, c_1 .. c_{N-1}]``: the query embedding
and N-1 candidate document embeddings, all from a frozen bundle. A small **bidirectional** mixer
reads the whole sequence and a head gives one logit per candidate; cross-entropy against the slot
of the true document. N counts the query slot, as in the paper (N = 32: 31 candidates).

Two input options (``input_scale``, ``interaction``) decide what the blocks read; ``none`` / ``none`` is
the paper's scorer. The embeddings are L2-normalised, so each coordinate is ~1/sqrt(d), while every
block adds terms of order 1 (LayerNorm outputs, mixed over N positions) to the residual stream:
``input_scale="sqrt_d"`` multiplies the embeddings by sqrt(d) so that they are not buried.
``interaction="product"`` puts the elementwise product of the (scaled) query and candidate at each
candidate position: its mean over the width is their cosine similarity, a quantity the paper's
blocks can reach only by mixing the query into each position and recovering a norm that the next
LayerNorm divides out.

Sampling (:func:`sample_candidates`), exactly as the paper: the N-1 candidates are drawn uniformly
without replacement from the document pool of the same split, excluding the query's own document;
the true document then overwrites a uniformly random slot in 1..N-1; label = slot - 1.

Plain PyTorch, no deepspeed: the model is tiny and trains in :mod:`mmtrain.eval.frozen_retrieval`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Candidate sets
# --------------------------------------------------------------------------------------------


def check_pool(n_candidates: int, pool: int, split: str = "") -> None:
    """N positions need N-1 distinct candidates from the pool minus the query's own document (plus it)."""
    where = f"the {split} split's" if split else "the"
    if n_candidates > pool:
        raise ValueError(f"model.n_candidates N={n_candidates} is larger than {where} pool of {pool} documents: "
                         f"an example needs N-1={n_candidates - 1} distinct candidates drawn from the other "
                         f"{pool - 1} documents plus the positive; use N <= {pool}")
    if n_candidates < 3:
        raise ValueError(f"model.n_candidates N={n_candidates} must be >= 3 (query slot, positive, a negative)")


def sample_candidates(queries: np.ndarray, pool: int, n_candidates: int,
                      rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Candidate sets for ``queries`` (indices into the split; query i's own document is document i).

    Returns ``(candidates [B, N-1] int64, labels [B] int64)``: ``candidates[b]`` are document
    indices, uniformly drawn without replacement from ``range(pool)`` minus ``queries[b]`` and in
    random order; then ``candidates[b, labels[b]] = queries[b]`` (the positive overwrites a uniformly
    random slot, so an example holds N-2 negatives). Cost O(B * pool).
    """
    queries = np.asarray(queries, dtype=np.int64)
    check_pool(n_candidates, pool)
    k = n_candidates - 1
    rows = np.arange(len(queries))
    keys = rng.random((len(queries), pool))
    keys[rows, queries] = np.inf                                  # never the query's own document
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]          # the k smallest keys: a uniform k-subset
    order = np.argsort(np.take_along_axis(keys, chosen, axis=1), axis=1)
    candidates = np.take_along_axis(chosen, order, axis=1)        # ... in uniformly random order
    labels = rng.integers(0, k, size=len(queries))
    candidates[rows, labels] = queries
    return candidates.astype(np.int64), labels.astype(np.int64)


def strict_top1(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: the labelled candidate scores strictly higher than every other one (ties count against)."""
    positive = scores.gather(1, labels[:, None])
    others = scores.scatter(1, labels[:, None], float("-inf"))
    return (positive[:, 0] > others.max(dim=1).values)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class PositionMixing(nn.Module):
    """``Mix(U) = W U + b`` over positions: U [B, N, d] -> [B, N, d].

    weight [N, N] is a full, **unmasked** learned matrix (row = output position), so every position
    reads every other one; bias [N] is one value per output position, broadcast over the width.
    Init U(-1/sqrt(N), 1/sqrt(N)) for both, as the masked mixer's (PyTorch's Conv1d default).
    """

    def __init__(self, n_positions: int):
        super().__init__()
        bound = 1.0 / math.sqrt(n_positions)
        self.weight = nn.Parameter(torch.empty(n_positions, n_positions).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_positions).uniform_(-bound, bound))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, u) + self.bias[:, None]


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, hidden) -> GELU -> Linear(hidden, d)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class BidirectionalMixerBlock(nn.Module):
    """``H += Mix(LN(H)); H += MLP(LN(H))`` over N positions: H [B, N, d] -> [B, N, d]."""

    def __init__(self, d_model: int, n_positions: int, ffn_mult: int, eps: float):
        super().__init__()
        self.token_norm = nn.LayerNorm(d_model, eps=eps)
        self.token_mixing = PositionMixing(n_positions)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, ffn_mult * d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.token_mixing(self.token_norm(h))
        return h + self.mlp(self.mlp_norm(h))


INPUT_SCALES = ("none", "sqrt_d")
INTERACTIONS = ("none", "product")


class FrozenEmbeddingScorer(nn.Module):
    """Bidirectional mixer over ``[q, c_1 .. c_{N-1}]`` (width d = embedding dim, no token embedding).

    ``forward(queries [B, d], candidates [B, N-1, d]) -> logits [B, N-1]``: the head ``Linear(d, 1)``
    gives one logit per position; positions 1..N-1 are the candidates. Loss: cross-entropy of the
    logits against the label (softmax over the candidates).

    ``input_scale``: ``none`` (the paper) or ``sqrt_d`` (embeddings times sqrt(d)). ``interaction``:
    ``none`` (the paper: candidate i's position holds c_i) or ``product`` (it holds q * c_i,
    elementwise, after the scaling; the query position holds q).
    """

    def __init__(self, d_model: int, n_candidates: int, n_layers: int = 8, ffn_mult: int = 4, norm_eps: float = 1e-5,
                 input_scale: str = "none", interaction: str = "none"):
        super().__init__()
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        self.config_dict: Dict[str, Any] = {"d_model": int(d_model), "n_candidates": int(n_candidates),
                                            "n_layers": int(n_layers), "ffn_mult": int(ffn_mult),
                                            "norm_eps": float(norm_eps), "input_scale": input_scale,
                                            "interaction": interaction}
        self.n_candidates = int(n_candidates)
        self.input_scale = input_scale
        self.interaction = interaction
        self.scale = math.sqrt(d_model) if input_scale == "sqrt_d" else 1.0
        self.blocks = nn.ModuleList(BidirectionalMixerBlock(d_model, n_candidates, ffn_mult, norm_eps)
                                    for _ in range(n_layers))
        self.head = nn.Linear(d_model, 1)

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        if candidates.shape[1] != self.n_candidates - 1:
            raise ValueError(f"expected {self.n_candidates - 1} candidates per query (N={self.n_candidates}), "
                             f"got {candidates.shape[1]}")
        q, c = queries * self.scale, candidates * self.scale
        if self.interaction == "product":
            c = q[:, None, :] * c
        h = torch.cat([q[:, None, :], c], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)[:, 1:, 0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
