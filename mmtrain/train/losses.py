"""Training losses: shifted causal-LM cross-entropy (re-exported) and InfoNCE for retrieval.

:func:`info_nce` is the contrastive loss of retrieval training (:mod:`mmtrain.train.contrastive`). Inputs are L2-normalised
embeddings; row i of ``documents`` is the positive of query i, every other document row (other
queries' positives, plus optional extra random negatives) is a negative::

    L_q2d = mean_i  -log( exp(q_i.d_i / t) / sum_j exp(q_i.d_j / t) )

With ``symmetric=True`` the document-to-query direction (each positive document against all
queries) is added and the two are averaged. The temperature t is the cosine scale (paper: 0.02,
"temperatureless" = 1.0).

Distributed: with ``gather=True`` (default) the embeddings of every rank are all-gathered *with
gradient* (:class:`_AllGather`), so each query sees the documents of
all ranks and the number of negatives grows with world size. Every rank then computes the same
global loss; the gather's backward sums the gradient of the local embeddings over ranks (world
size x the global gradient) and the engine's gradient averaging over ranks divides it back, so the
parameters get exactly the single-process gradient of the concatenated batch (tested with 2 ranks).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtrain.models.layers import causal_lm_loss

__all__ = ["causal_lm_loss", "gather_with_grad", "info_nce", "info_nce_logits", "num_negatives",
           "GradCache"]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, d] of every rank in rank order (differentiable; identity on 1 rank).

    Every rank must pass the same n.
    """
    if _world() == 1:
        return x
    return _AllGather.apply(x)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy and keeps this rank's rows
    (``torch.distributed.nn.functional.all_gather`` does the same and is deprecated)."""

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def info_nce_logits(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine scores / temperature [n_q, n_d] of L2-normalised embeddings (computed in fp32)."""
    return queries.float() @ documents.float().t() / temperature


def info_nce(queries: torch.Tensor, positives: torch.Tensor, temperature: float = 0.02, *,
             extra_negatives: Optional[torch.Tensor] = None, symmetric: bool = False,
             gather: bool = True) -> torch.Tensor:
    """InfoNCE over in-batch negatives (mean over all queries of all ranks).

    queries [B, d] and positives [B, d] (row i is query i's document), extra_negatives [E, d] or
    None; all L2-normalised. With ``gather`` and an initialised process group of W ranks, the
    candidates are the W*B positives plus W*E extra negatives of all ranks.
    """
    if queries.shape != positives.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must match")
    if gather:
        queries, positives = gather_with_grad(queries), gather_with_grad(positives)
        if extra_negatives is not None:
            extra_negatives = gather_with_grad(extra_negatives)
    candidates = positives if extra_negatives is None else torch.cat([positives, extra_negatives], 0)
    labels = torch.arange(queries.shape[0], device=queries.device)
    loss = F.cross_entropy(info_nce_logits(queries, candidates, temperature), labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(info_nce_logits(positives, queries, temperature), labels))
    return loss


def num_negatives(batch_per_rank: int, world_size: int, extra_per_query: int = 0) -> int:
    """Negatives each query is scored against: the other positives and all extra negatives."""
    total = batch_per_rank * world_size
    return total - 1 + extra_per_query * total


class GradCache:
    """Gradient caching (Gao et al. 2021) for a contrastive loss over a large batch.

    1. :meth:`embed_no_grad`: embed the inputs chunk by chunk without building graphs;
    2. :meth:`representation_grads`: the loss on the cached embeddings (leaf tensors) and its
       gradient w.r.t. each embedding (the loss's graph holds embeddings, not activations);
    3. re-embed each chunk *with* grad and backpropagate ``(embedding * cached_grad).sum()``
       (:meth:`surrogate`): the parameter gradients add up to exactly those of the plain loss.

    Memory holds one chunk's activations instead of the batch's. The model must be deterministic
    between the two forward passes (no dropout in mmtrain's models).
    """

    def __init__(self, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def chunks(self, n: int) -> List[Tuple[int, int]]:
        return [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]

    @torch.no_grad()
    def embed_no_grad(self, embed, *tensors: torch.Tensor) -> torch.Tensor:
        """``embed(*chunk_tensors)`` over chunks of the leading dimension, concatenated."""
        n = tensors[0].shape[0]
        return torch.cat([embed(*(t[s:e] for t in tensors)) for s, e in self.chunks(n)], 0)

    @staticmethod
    def representation_grads(loss_fn, cached: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, d loss / d cached) with ``loss = loss_fn(cached)``."""
        leaf = cached.detach().float().requires_grad_(True)
        loss = loss_fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    @staticmethod
    def surrogate(embeddings: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient w.r.t. the parameters is ``grad`` pulled back through ``embeddings``."""
        return (embeddings.float() * grad).sum()


def split_embeddings(all_embeddings: torch.Tensor, batch: int, extra: int) -> Dict[str, torch.Tensor]:
    """[queries; positives; extras] rows -> dict (the layout retrieval.py embeds them in)."""
    q = all_embeddings[:batch]
    d = all_embeddings[batch:2 * batch]
    e = all_embeddings[2 * batch:2 * batch + extra] if extra else None
    return {"queries": q, "positives": d, "extra_negatives": e}
