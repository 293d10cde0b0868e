"""prepare-pairs: the val split, held-out exclusion, pairs from unlabeled documents (crop / ict) and
BM25 hard negatives. Real tokenizer and MDS shards, no model."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT

from mmtrain import cli
from mmtrain.config import load_config
from mmtrain.data.schema import PairsConfig, PrepareConfig
from mmtrain.data import pairs as P
from mmtrain.data.errors import DataError
from mmtrain.data.tokenizer import load_tokenizer

TOKENIZER = ROOT / "tokenizer" / "demo-bpe-4096.model"
N_DOCS = 120


def corpus_file(path, order=None):
    """JSONL documents of 4-6 sentences, each sentence naming its document: ``Doc 17 says ...``."""
    words = ["river", "stone", "light", "paper", "garden", "window", "number", "silver", "market", "thread"]
    docs = []
    for i in range(N_DOCS):
        n = 4 + i % 3
        docs.append(" ".join(f"Doc {i} says {words[(i + j) % 10]} and {words[(3 * i + j) % 10]} item {j}."
                             for j in range(n)))
    order = range(N_DOCS) if order is None else order
    path.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in order))
    return docs


def build(tmp_path, name, *overrides):
    cfg = load_config(PairsConfig, [], [f"tokenizer={TOKENIZER}", "n_ctx=48", f"out={tmp_path / name}",
                                        *overrides])
    return P.prepare_pairs(cfg)


def decoded(pair_dir, split, side="query"):
    tok = load_tokenizer(TOKENIZER)
    s = P.load_split(pair_dir, split)
    return [tok.decode(ids[: n - 1].tolist()) for ids, n in zip(s[f"{side}_ids"], s[f"{side}_length"])]


def doc_ids(texts):
    return {int(t.split("Doc ", 1)[1].split()[0]) for t in texts}


def test_ict_pairs_split_by_document_without_leakage_and_independent_of_order(tmp_path):
    docs = corpus_file(tmp_path / "c.jsonl")
    meta = build(tmp_path, "ict", f"input=[{tmp_path / 'c.jsonl'}]", "from_documents=ict",
                 "test_fraction=0.2", "val_fraction=0.2")
    sizes = {s: meta["splits"][s]["pairs"] for s in P.PAIR_SPLITS}
    assert sum(sizes.values()) == N_DOCS and min(sizes.values()) > 5, sizes
    owners = {s: doc_ids(decoded(tmp_path / "ict", s)) for s in P.PAIR_SPLITS}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    for split, ids in owners.items():   # the split is a function of the document alone
        assert all(P.split_of(docs[i], 0, 0.2, 0.2) == split for i in ids)
    # the query sentence is removed from its passage (ict_keep_fraction 0.1: almost always)
    queries, documents = decoded(tmp_path / "ict", "train"), decoded(tmp_path / "ict", "train", "document")
    assert sum(q not in d for q, d in zip(queries, documents)) > 0.7 * len(queries)
    # held-out texts record the val and test source documents
    held = [json.loads(line) for line in (tmp_path / "ict" / P.HELDOUT_NAME).read_text().splitlines()]
    assert sorted(doc_ids(r["document"] for r in held)) == sorted(owners["val"] | owners["test"])

    # same documents in reverse order: the same pairs in every split
    corpus_file(tmp_path / "r.jsonl", order=range(N_DOCS - 1, -1, -1))
    build(tmp_path, "ict-r", f"input=[{tmp_path / 'r.jsonl'}]", "from_documents=ict",
          "test_fraction=0.2", "val_fraction=0.2")
    for split in P.PAIR_SPLITS:
        a = set(zip(decoded(tmp_path / "ict", split), decoded(tmp_path / "ict", split, "document")))
        b = set(zip(decoded(tmp_path / "ict-r", split), decoded(tmp_path / "ict-r", split, "document")))
        assert a == b


def test_crop_pairs_are_deterministic_spans_of_their_document(tmp_path):
    docs = corpus_file(tmp_path / "c.jsonl")
    args = [f"input=[{tmp_path / 'c.jsonl'}]", "from_documents=crop", "pairs_per_document=2",
            "crop_min_ratio=0.2", "crop_max_ratio=0.4"]
    build(tmp_path, "a", *args)
    build(tmp_path, "b", *args)
    tok = load_tokenizer(TOKENIZER)
    for split in P.PAIR_SPLITS:
        a, b = P.load_split(tmp_path / "a", split), P.load_split(tmp_path / "b", split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    s = P.load_split(tmp_path / "a", "train")
    encoded = [tok.encode(d) for d in docs]
    for side in ("query", "document"):
        for ids, n in zip(s[f"{side}_ids"], s[f"{side}_length"]):
            span = ids[: n - 1].tolist()
            assert ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
            owners = [d for d in encoded if any(d[k:k + len(span)] == span for k in range(len(d) - len(span) + 1))]
            assert owners, "a crop must be a contiguous span of some document"
            ratio = len(span) / min(len(d) for d in owners)
            assert len(span) >= 4 and ratio <= 0.4 + 0.05
    # another seed: other crops
    build(tmp_path, "c", *args, "seed=1")
    assert not np.array_equal(P.load_split(tmp_path / "c", "test")["query_ids"][:5],
                              P.load_split(tmp_path / "a", "test")["query_ids"][:5])


def test_rerun_with_the_same_recipe_keeps_the_shards_and_a_failed_run_keeps_the_old_ones(tmp_path, monkeypatch):
    corpus_file(tmp_path / "c.jsonl")
    args = [f"input=[{tmp_path / 'c.jsonl'}]", "from_documents=crop"]
    assert build(tmp_path, "p", *args)["status"] == "written"
    stamp = os.stat(tmp_path / "p" / "meta.json").st_mtime_ns
    before = P.load_split(tmp_path / "p", "train")["query_ids"]
    assert build(tmp_path, "p", *args)["status"] == "up to date"
    assert os.stat(tmp_path / "p" / "meta.json").st_mtime_ns == stamp

    real = P._write_split

    def failing(directory, *a, **k):
        if directory.name == "test":
            raise OSError("disk full")
        return real(directory, *a, **k)

    monkeypatch.setattr(P, "_write_split", failing)
    with pytest.raises(OSError, match="disk full"):
        build(tmp_path, "p", *args, "seed=3")          # another recipe: rewritten, and it fails midway
    monkeypatch.setattr(P, "_write_split", real)
    assert os.stat(tmp_path / "p" / "meta.json").st_mtime_ns == stamp
    assert np.array_equal(P.load_split(tmp_path / "p", "train")["query_ids"], before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.tmp")] == []
    assert build(tmp_path, "p", *args, "seed=3")["status"] == "written"   # the rerun completes it


def test_held_out_texts_are_kept_out_of_corpus_pairs_and_pretraining_shards(tmp_path):
    from mmtrain.data.prepare import prepare

    # labeled pairs whose documents also occur, with their query, inside a corpus
    pairs = [(f"Query number {i} about {i % 7}.", f"Body {i} explains the topic {i % 7} at length. " * 3)
             for i in range(80)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    meta = build(tmp_path, "labeled", f"input=[{tmp_path / 'pairs.jsonl'}]", "test_fraction=0.2",
                 "val_fraction=0.2")
    held = meta["splits"]["val"]["pairs"] + meta["splits"]["test"]["pairs"]
    assert held > 10
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"{q}\n\n{d}"}) + "\n" for q, d in pairs))
    ict = build(tmp_path, "ict", f"input=[{tmp_path / 'corpus.jsonl'}]", "from_documents=ict",
                f"exclude_pairs=[{tmp_path / 'labeled'}]")
    assert ict["cleaning"]["excluded_documents"] == held
    heldout_bodies = {d.strip() for q, d in pairs if P.split_of(d.strip(), 0, 0.2, 0.2) != "train"}
    for split in P.PAIR_SPLITS:
        for text in decoded(tmp_path / "ict", split, "document") + decoded(tmp_path / "ict", split):
            assert not any(text.strip() and text.strip() in b for b in heldout_bodies if len(text) > 30)
    # pretraining shards: the same documents dropped
    cfg = load_config(PrepareConfig, [], [f"input=[{tmp_path / 'corpus.jsonl'}]", f"out={tmp_path / 'lm'}",
                                          "n_ctx=[32]", f"tokenizer={TOKENIZER}", "val_fraction=0.1",
                                          f"exclude_pairs=[{tmp_path / 'labeled'}]"])
    summary = prepare(cfg, progress=False)
    docs = sum(s["documents"] for s in summary["ctx"][32]["splits"].values())
    assert docs == len(pairs) - held
    # a pair dir without held-out texts is refused with what to do
    (tmp_path / "labeled" / P.HELDOUT_NAME).unlink()
    with pytest.raises(DataError, match="rerun `mmtrain prepare-pairs`"):
        build(tmp_path, "ict2", f"input=[{tmp_path / 'corpus.jsonl'}]", "from_documents=ict",
              f"exclude_pairs=[{tmp_path / 'labeled'}]")


def test_hard_negatives_are_top_bm25_documents_and_never_the_positive(tmp_path):
    from mmtrain.data.bm25 import BM25

    corpus_file(tmp_path / "c.jsonl")
    meta = build(tmp_path, "hn", f"input=[{tmp_path / 'c.jsonl'}]", "from_documents=ict", "pairs_per_document=3",
                 "hard_negatives=4")
    assert meta["hard_negatives"] == 4
    s = P.load_split(tmp_path / "hn", "train")
    neg = s["negatives"]
    n = len(neg)
    assert neg.shape == (n, 4) and neg.min() >= 0 and neg.max() < n
    rows = np.arange(n)
    assert not (neg == rows[:, None]).any()                     # never the query's own document
    owner = np.array([min(doc_ids([t])) for t in decoded(tmp_path / "hn", "train", "document")])
    assert not (owner[neg] == owner[:, None]).any()             # nor another pair of the same document
    # they are what BM25 ranks first among the allowed documents
    tok = load_tokenizer(TOKENIZER)
    strip = lambda ids, ls: [[t for t in r[:k].tolist() if t not in (tok.pad_id, tok.eos_id)] for r, k in zip(ids, ls)]
    bm = BM25(strip(s["document_ids"], s["document_length"]))
    scores = bm.score_matrix(strip(s["query_ids"], s["query_length"]))
    scores[owner[None, :] == owner[:, None]] = -np.inf
    best_allowed = np.sort(scores, axis=1)[:, ::-1][:, :4]
    picked = np.sort(np.take_along_axis(scores, neg, axis=1), axis=1)[:, ::-1]
    assert np.allclose(picked[best_allowed[:, 3] > 0], best_allowed[best_allowed[:, 3] > 0])
    assert "negatives" not in P.load_split(tmp_path / "hn", "test")


def test_bad_corpus_pair_settings_are_errors_before_work(tmp_path, capsys):
    corpus_file(tmp_path / "c.jsonl")
    assert cli.main(["prepare-pairs", "--input", str(tmp_path / "c.jsonl"), "--from-documents", "crop",
                     "--out", str(tmp_path / "x"), f"tokenizer={TOKENIZER}", "n_ctx=32",
                     "crop_min_ratio=0.6", "crop_max_ratio=0.3"]) == 2
    assert "crop_min_ratio / crop_max_ratio" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "Too short."}) + "\n")
    with pytest.raises(DataError, match="the train split would be empty"):
        build(tmp_path, "e", f"input=[{tmp_path / 'empty.jsonl'}]", "from_documents=crop")
    assert not (tmp_path / "e").exists()
