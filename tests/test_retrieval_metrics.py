"""Retrieval metrics on small hand-made rankings (ties count against the query) and BM25."""

import math

import numpy as np
import pytest

from mmtrain.data.bm25 import BM25
from mmtrain.eval.metrics import (mrr_at_k, positive_ranks, recall_at_k, retrieval_report,
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
                      "mrr@10": 1.0, "top1@2": 1.0, "top1@3": 1.0}


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
