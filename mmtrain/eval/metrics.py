"""Retrieval metrics (pure numpy): ranks, recall@k, MRR@k, nDCG@k, MAP@k, top-1 accuracy among N
candidates (the BM25 baseline's index is :class:`mmtrain.data.bm25.BM25`).

Conventions:

* ``scores[i, j]`` = score of document j for query i (higher = better); ``positives[i]`` = the
  index of query i's document in the pool.
* Ties count **against** the query: the rank of the positive is the number of *other* documents
  scoring >= it (0 = strictly best). A model that gives every document the same score therefore
  gets recall@1 = 0, not 1.
* Top-1 among N (the paper's protocol): the positive plus N-1 negatives drawn uniformly without
  replacement from the rest of the pool, independently per query, from a fixed seed; correct when
  the positive scores strictly higher than all N-1. N counts candidates (the paper's code counts
  the query slot too, so its "N = 32" is 31 candidates: our N = 31).
* Every query has exactly one relevant document (its pair), with binary relevance. The
  information-retrieval metrics are then, for a positive at 0-based rank r (0 when r >= k):
  recall@k = [r < k] (= accuracy@k), MRR@k = 1 / (r + 1), nDCG@k = 1 / log2(r + 2) (the ideal DCG
  is 1), MAP@k = 1 / (r + 1) (average precision over the one relevant document; MAP@100 is MRR@100).
  These are sentence-transformers' ``InformationRetrievalEvaluator`` definitions (and MTEB's / BEIR's
  for one relevant document): tests/test_retrieval_metrics.py checks them against it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

_CHUNK = 1024


def positive_ranks(scores: np.ndarray, positives: Sequence[int]) -> np.ndarray:
    """0-based rank of each query's positive among all documents (ties counted against it)."""
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=np.int64)
    pos = scores[np.arange(len(positives)), positives]
    return (scores >= pos[:, None]).sum(axis=1) - 1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(np.asarray(ranks) < k))


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks)
    return float(np.mean(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """nDCG@k with one relevant document per query (binary relevance): 1 / log2(rank + 2) within k."""
    ranks = np.asarray(ranks)
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def map_at_k(ranks: np.ndarray, k: int) -> float:
    """MAP@k with one relevant document per query: its precision at its rank, 1 / (rank + 1), within k."""
    return mrr_at_k(ranks, k)


def check_n_candidates(n: int, pool: int) -> None:
    if n < 2:
        raise ValueError(f"--n-candidates: N={n} must be >= 2 (the positive and at least one negative)")
    if n > pool:
        raise ValueError(f"--n-candidates: N={n} is larger than the pool of {pool} documents "
                         f"(the positive plus N-1 distinct negatives are needed); use N <= {pool}")


def top1_among_n(scores: np.ndarray, positives: Sequence[int], n: int, seed: int = 0) -> float:
    """Fraction of queries whose positive beats N-1 random negatives (see module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.int64)
    n_q, pool = scores.shape
    check_n_candidates(n, pool)
    rng = np.random.default_rng(seed)
    correct = 0
    for start in range(0, n_q, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n_q))
        keys = rng.random((len(rows), pool))
        keys[np.arange(len(rows)), positives[rows]] = np.inf   # never draw the positive
        negatives = np.argpartition(keys, n - 2, axis=1)[:, : n - 1] if n - 1 < pool else \
            np.argsort(keys, axis=1)[:, : n - 1]
        pos = scores[rows, positives[rows]]
        best_negative = np.take_along_axis(scores[rows], negatives, axis=1).max(axis=1)
        correct += int((pos > best_negative).sum())
    return correct / n_q


#: recall@k of every report (accuracy@k with one relevant document per query).
RECALL_KS = (1, 5, 10, 100)


def retrieval_report(scores: np.ndarray, positives: Sequence[int], n_candidates: Sequence[int] = (),
                     seed: int = 0, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """recall@k, MRR@10, nDCG@10 and MAP@100 over the whole pool, and top-1 among each N (keys ``top1@N``)."""
    ranks = positive_ranks(scores, positives)
    out: Dict[str, float] = {"queries": int(len(ranks)), "pool": int(np.asarray(scores).shape[1])}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
    out["mrr@10"] = mrr_at_k(ranks, 10)
    out["ndcg@10"] = ndcg_at_k(ranks, 10)
    out["map@100"] = map_at_k(ranks, 100)
    for n in n_candidates:
        out[f"top1@{n}"] = top1_among_n(scores, positives, int(n), seed)
    return out


def format_table(rows: Dict[str, Dict[str, float]], columns: Optional[List[str]] = None) -> str:
    """A fixed-width text table: one row per model, metric columns in %."""
    if not rows:
        return ""
    if columns is None:
        columns = [k for k in next(iter(rows.values())) if k not in ("queries", "pool")]
    name_w = max(len("model"), *(len(n) for n in rows))
    head = f"{'model':<{name_w}}  " + "  ".join(f"{c:>9}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(
            f"{100 * r[c]:>8.1f}%" if c in r else f"{'-':>9}" for c in columns))
    return "\n".join(lines)
