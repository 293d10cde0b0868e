"""Retrieval metrics on small hand-made rankings (ties count against the query) and BM25."""

import math

import numpy as np
import pytest

from mmtrain.data.bm25 import BM25
from mmtrain.eval.metrics import (map_at_k, mrr_at_k, ndcg_at_k, positive_ranks, recall_at_k, retrieval_report,
                                  top1_among_n)


def test_ranks_recall_and_mrr_on_a_hand_made_ranking():
    scores = np.array([[0.9, 0.1, 0.2, 0.0],    # positive 0 is best: rank 0
                       [0.5, 0.4, 0.6, 0.1],    # positive 1 behind 0 and 2: rank 2
                       [0.3, 0.3, 0.3, 0.3],    # all tied: counted against -> rank 3
                       [0.1, 0.2, 0.7, 0.7]])   # tie with doc 2 -> rank 1
    ranks = positive_ranks(scores, [0, 1, 2, 3])
    assert ranks.tolist() == [0, 2, 3, 1]
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 2) == 0.5
    assert recall_at_k(ranks, 3) == 0.75
    assert mrr_at_k(ranks, 10) == pytest.approx((1 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert mrr_at_k(ranks, 2) == pytest.approx((1 + 1 / 2) / 4)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(3)) / 4)
    assert ndcg_at_k(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert map_at_k(ranks, 3) == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)


class _Lookup:
    """A sentence-transformers model stand-in that returns given embeddings for given texts (the
    evaluator only calls ``encode_query`` / ``encode_document``)."""

    def __init__(self, table):
        self.table = table

    def encode_query(self, sentences, **kwargs):
        import torch

        return torch.stack([self.table[s] for s in sentences])

    encode_document = encode_query


def test_ir_metrics_equal_sentence_transformers_information_retrieval_evaluator():
    """Same embeddings, same cosine scores: nDCG@10, MAP@100, recall@{1,5,10,100} and MRR@10 equal
    InformationRetrievalEvaluator's to 1e-6 (a pool of 300 with the positives spread over all ranks)."""
    from mmtrain.export.hf import import_transformers

    pytest.importorskip("transformers", reason="the st extra is not installed")
    import_transformers()     # a torchvision built for another torch would break transformers' model classes
    pytest.importorskip("sentence_transformers", reason="the st extra is not installed")
    import torch
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:   # sentence-transformers before 5.4
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    rng = np.random.default_rng(0)
    n, d = 300, 16
    docs = rng.standard_normal((n, d)).astype(np.float32)
    noise = rng.uniform(0.2, 3.0, size=(n, 1)).astype(np.float32)     # from easy to hopeless queries
    queries = (docs + noise * rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    e = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    ours = retrieval_report(q @ e.T, np.arange(n))
    ranks = positive_ranks(q @ e.T, np.arange(n))
    assert ranks.min() == 0 and np.median(ranks) >= 1 and (ranks >= 10).mean() > 0.2 and ranks.max() >= 100

    table = {f"q{i}": torch.from_numpy(queries[i]) for i in range(n)}
    table.update({f"d{i}": torch.from_numpy(docs[i]) for i in range(n)})
    evaluator = InformationRetrievalEvaluator(
        {f"q{i}": f"q{i}" for i in range(n)}, {f"d{i}": f"d{i}" for i in range(n)},
        {f"q{i}": {f"d{i}"} for i in range(n)}, accuracy_at_k=[1, 5, 10, 100], precision_recall_at_k=[1, 5, 10, 100],
        mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[100], score_functions={"cosine": cos_sim}, show_progress_bar=False)
    theirs = evaluator.compute_metrices(_Lookup(table))["cosine"]
    for k in (1, 5, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(theirs["recall@k"][k], abs=1e-6)
        assert ours[f"recall@{k}"] == pytest.approx(theirs["accuracy@k"][k], abs=1e-6)
    assert ours["mrr@10"] == pytest.approx(theirs["mrr@k"][10], abs=1e-6)
    assert ours["ndcg@10"] == pytest.approx(theirs["ndcg@k"][10], abs=1e-6)
    assert ours["map@100"] == pytest.approx(theirs["map@k"][100], abs=1e-6)


def test_top1_among_n():
    scores = np.array([[1.0, 0.5, 0.2, 0.1],     # always correct
                       [0.3, 0.3, 0.3, 0.3],     # positive 3 ties everything: never correct
                       [0.1, 0.2, 0.3, 0.4]])    # positive 0 is the worst: never correct
    positives = [0, 3, 0]
    for n in (2, 3, 4):
        assert top1_among_n(scores, positives, n, seed=1) == pytest.approx(1 / 3)
    # positive beats exactly one of three negatives: correct iff that one is drawn alone (N=2: p=1/3)
    row = np.array([[0.5, 0.6, 0.4, 0.7]])
    hits = np.mean([top1_among_n(row, [0], 2, seed=s) for s in range(300)])
    assert hits == pytest.approx(1 / 3, abs=0.08)
    assert top1_among_n(row, [0], 4, seed=0) == 0.0
    # fixed seed: same answer twice
    big = np.random.default_rng(0).random((50, 40))
    assert top1_among_n(big, np.arange(40).tolist() + [0] * 10, 8, seed=3) == \
        top1_among_n(big, np.arange(40).tolist() + [0] * 10, 8, seed=3)


def test_n_larger_than_the_pool_is_an_error():
    with pytest.raises(ValueError, match="larger than the pool of 4"):
        top1_among_n(np.zeros((2, 4)), [0, 1], 5)
    with pytest.raises(ValueError, match=">= 2"):
        top1_among_n(np.zeros((2, 4)), [0, 1], 1)


def test_report_keys():
    report = retrieval_report(np.eye(3), [0, 1, 2], [2, 3])
    assert report == {"queries": 3, "pool": 3, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0,
                      "recall@100": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0, "map@100": 1.0, "top1@2": 1.0, "top1@3": 1.0}


def test_bm25_matches_the_lucene_formula():
    docs = [["a", "b", "b"], ["b", "c"], ["c", "c", "c", "d"]]
    bm = BM25(docs)
    avgdl = 3.0
    n = 3

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf, dl, df):
        return idf(df) * tf / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))

    s = bm.scores(["b", "d", "b"])   # repeated query terms count once
    assert s[0] == pytest.approx(term(2, 3, 2))
    assert s[1] == pytest.approx(term(1, 2, 2))
    assert s[2] == pytest.approx(term(1, 4, 1))
    assert bm.scores(["zzz"]).tolist() == [0, 0, 0]
    assert bm.score_matrix([["b", "d"], ["a"]]).argmax(1).tolist() == [2, 0]
    assert bm.top_k([["b", "d", "b"], ["c"]], 3)[0].tolist() == [[2, 0, 1], [2, 1, 0]]
