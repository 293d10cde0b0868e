"""BM25 over token lists: the index behind hard-negative mining (`prepare-pairs hard_negatives=K`)
and the BM25 baseline of `mmtrain eval-retrieval`."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


class BM25:
    """Okapi BM25 over token lists (token ids or words), computed by the `bm25s` library.

    Lucene's variant (bm25s ``method="lucene"``, k1 = 1.2, b = 0.75): score(q, d) = sum over the
    *distinct* terms t of q of ``idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))``
    with ``idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))``. (Classic Okapi multiplies each
    term by k1 + 1, a constant factor that changes no ranking.) Query terms absent from every
    document score nothing. Both the evaluation baseline and hard-negative mining use this class.
    """

    def __init__(self, documents: Sequence[Sequence], k1: float = 1.2, b: float = 0.75):
        import bm25s

        self.k1, self.b = k1, b
        self.n_docs = len(documents)
        self._vocab: Dict[object, int] = {}
        ids = [[self._vocab.setdefault(t, len(self._vocab)) for t in doc] for doc in documents]
        self._names = {str(i): i for i in self._vocab.values()}
        self._index = bm25s.BM25(k1=k1, b=b, method="lucene")
        if self.n_docs:
            self._index.index(bm25s.tokenization.Tokenized(ids=ids, vocab=self._names), show_progress=False)

    def _query(self, query: Sequence) -> List[int]:
        return sorted({self._vocab[t] for t in query if t in self._vocab})

    def scores(self, query: Sequence) -> np.ndarray:
        """[n_docs] scores of one query."""
        q = self._query(query)
        if not q:
            return np.zeros(self.n_docs, dtype=np.float64)
        return np.asarray(self._index.get_scores(q), dtype=np.float64)

    def score_matrix(self, queries: Sequence[Sequence]) -> np.ndarray:
        return np.stack([self.scores(q) for q in queries]) if len(queries) else np.zeros((0, self.n_docs))

    def top_k(self, queries: Sequence[Sequence], k: int):
        """([n_queries, k] document indices, best first, [n_queries, k] their scores); ties in
        bm25s's order, k <= n_docs."""
        import bm25s

        k = min(int(k), self.n_docs)
        qs = [self._query(q) for q in queries]
        if not qs or k == 0:
            return np.zeros((len(qs), k), dtype=np.int64), np.zeros((len(qs), k))
        docs, scores = self._index.retrieve(bm25s.tokenization.Tokenized(ids=qs, vocab=self._names), k=k,
                                            show_progress=False, n_threads=1)
        return np.asarray(docs, dtype=np.int64), np.asarray(scores, dtype=np.float64)
