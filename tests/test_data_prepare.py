"""`mmtrain prepare`: round trips, splits, meta.json, atomic writes, reuse, CLI and errors."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmtrain.config import ConfigError, load_config
from mmtrain.data.schema import PrepareConfig
from mmtrain.data import DataError
from mmtrain.data import shards as S
from mmtrain.data.demo_corpus import demo_documents
from mmtrain.data.lm_dataset import build_lm_loader
from mmtrain.data.packing import is_validation
from mmtrain.cli import build_parser
from mmtrain.data.prepare import config_from_args, prepare
from mmtrain.data.tokenizer import DEMO_TOKENIZER, EOS_ID, PAD_ID, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXTRA_DOCS = ["émoji 🤗 and 中文 survive", "tabs\tand  double  spaces\n\n    and indentation",
              ("A document that is much longer than one block. " * 40).strip()]


def make_cfg(**kw):
    return load_config(PrepareConfig, [], [f"{k}={json.dumps(v)}" for k, v in kw.items()])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~300 real documents (demo docstrings) plus a few tricky ones, as a JSONL file."""
    docs = list(demo_documents(max_docs=300)) + EXTRA_DOCS
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs)
    return path, docs


def split_docs(docs, seed=0, val_fraction=0.2):
    val = [d for i, d in enumerate(docs) if is_validation(i, seed, val_fraction)]
    train = [d for i, d in enumerate(docs) if not is_validation(i, seed, val_fraction)]
    return train, val


def read_in_order(shard_dir, n_ctx, split):
    loader = build_lm_loader(shard_dir, n_ctx, split, 1, shuffle=False, seed=0, num_workers=0,
                             drop_last=False)
    return [{k: v[0].numpy() for k, v in batch.items()} for batch in loader]


def decode_concat(tok, samples):
    stream = np.concatenate([s["input_ids"] for s in samples])
    cuts = np.flatnonzero(stream == EOS_ID)
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(tok.decode(stream[start:cut]))
        start = cut + 1
    return pieces, tok.decode(stream[start:])


@pytest.fixture(scope="module")
def concat_shards(corpus, tmp_path_factory):
    path, _ = corpus
    out = tmp_path_factory.mktemp("concat")
    summary = prepare(make_cfg(input=[str(path)], out=str(out), n_ctx=[64, 256], tokenizer=str(DEMO_TOKENIZER),
                               val_fraction=0.2, num_proc=1), progress=False)
    return out, summary


@pytest.fixture(scope="module")
def pad_shards(corpus, tmp_path_factory):
    path, _ = corpus
    out = tmp_path_factory.mktemp("pad")
    prepare(make_cfg(input=[str(path)], out=str(out), n_ctx=[64], tokenizer=str(DEMO_TOKENIZER),
                     packing="pad", val_fraction=0.2, num_proc=1), progress=False)
    return out


@pytest.mark.parametrize("n_ctx", [64, 256])
def test_concat_round_trip_gives_back_the_documents(concat_shards, corpus, n_ctx):
    out, _ = concat_shards
    _, docs = corpus
    tok = load_tokenizer(DEMO_TOKENIZER)
    for split, expected in zip(("train", "val"), split_docs(docs)):
        whole, tail = decode_concat(tok, read_in_order(out, n_ctx, split))
        assert whole == expected[:len(whole)]  # complete documents, in corpus order
        assert len(whole) >= len(expected) - 1  # at most the last one is cut by the dropped remainder
        if len(whole) < len(expected):
            assert expected[len(whole)].startswith(tail)


def test_pad_round_trip_gives_back_each_document_truncated_to_a_block(pad_shards, corpus):
    _, docs = corpus
    tok = load_tokenizer(DEMO_TOKENIZER)
    for split, expected in zip(("train", "val"), split_docs(docs)):
        samples = read_in_order(pad_shards, 64, split)
        assert len(samples) == len(expected)
        for sample, doc in zip(samples, expected):
            ids, mask = sample["input_ids"], sample["attention_mask"]
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == PAD_ID).all()
            full = tok.encode(doc) + [EOS_ID]
            assert list(ids[:n]) == full[:64]
            if len(full) <= 64:
                assert tok.decode(ids[:n - 1]) == doc
            else:
                assert doc.startswith(tok.decode(ids[:n]))  # truncated, EOS cut off


def test_every_document_lands_in_exactly_one_split_and_meta_counts_match_reads(pad_shards, concat_shards, corpus):
    _, docs = corpus
    tok = load_tokenizer(DEMO_TOKENIZER)
    # pad mode stores one sample per document: read back both splits and compare as a partition
    seen = {}
    for split in S.SPLITS:
        meta_split = S.read_meta(pad_shards, 64)["splits"][split]
        samples = read_in_order(pad_shards, 64, split)
        assert meta_split["samples"] == meta_split["documents"] == len(samples)
        assert meta_split["tokens"] == sum(int(s["attention_mask"].sum()) for s in samples)
        assert meta_split["pad_tokens"] == 64 * len(samples) - meta_split["tokens"]
        seen[split] = [tuple(s["input_ids"][:int(s["attention_mask"].sum())]) for s in samples]
    firsts = [tuple((tok.encode(d) + [EOS_ID])[:64]) for d in docs]
    assert sorted(seen["train"] + seen["val"]) == sorted(firsts)
    assert not set(seen["train"]) & set(seen["val"])
    assert 0.1 < len(seen["val"]) / len(docs) < 0.3
    # concat mode: counts in meta.json equal what the dataset yields
    out, _ = concat_shards
    for n_ctx in (64, 256):
        meta = S.read_meta(out, n_ctx)
        for split, expected in zip(S.SPLITS, split_docs(docs)):
            m = meta["splits"][split]
            samples = read_in_order(out, n_ctx, split)
            assert m["samples"] == len(samples)
            assert m["tokens"] == n_ctx * len(samples)
            assert m["documents"] == len(expected)
            assert m["document_tokens"] == sum(len(tok.encode(d)) + 1 for d in expected)
            assert m["dropped_tokens"] == m["document_tokens"] - m["tokens"] < n_ctx


def test_meta_json_records_what_training_checks(concat_shards):
    out, summary = concat_shards
    meta = json.loads((out / "ctx256" / "meta.json").read_text())
    tok = load_tokenizer(DEMO_TOKENIZER)
    assert meta["format_version"] == S.FORMAT_VERSION
    assert meta["n_ctx"] == 256 and meta["packing"] == "concat" and meta["token_dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["vocab_size"] == 4096
    assert (meta["pad_id"], meta["eos_id"]) == (0, 3)
    assert meta["tokenizer_path"] == str(DEMO_TOKENIZER)
    assert load_tokenizer(out / "ctx256" / meta["tokenizer_file"]).sha256 == tok.sha256
    assert load_tokenizer(out / "tokenizer.model").sha256 == tok.sha256
    assert "docs.jsonl" in meta["source"] and meta["created"]
    assert summary["ctx"][256]["splits"] == meta["splits"]
    assert summary["ctx"][256]["status"] == "written"
    index = json.loads((out / "ctx256" / "train" / "index.json").read_text())
    assert index["shards"][0]["column_encodings"] == ["ndarray:uint16:256"]
    assert index["shards"][0]["compression"] is None
    assert meta["splits"]["train"]["bytes"] == S.split_bytes(out / "ctx256" / "train")


def test_split_is_a_seeded_hash_of_the_document_index():
    flags = [is_validation(i, 0, 0.05) for i in range(20000)]
    assert 0.04 < sum(flags) / len(flags) < 0.06
    assert flags == [is_validation(i, 0, 0.05) for i in range(20000)]
    assert flags != [is_validation(i, 1, 0.05) for i in range(20000)]


def test_two_tokenizer_processes_write_the_same_shards_as_one(corpus, concat_shards, tmp_path):
    path, _ = corpus
    prepare(make_cfg(input=[str(path)], out=str(tmp_path), n_ctx=[64], tokenizer=str(DEMO_TOKENIZER),
                     val_fraction=0.2, num_proc=2), progress=False)
    ref, _ = concat_shards
    for split in S.SPLITS:
        a = json.loads((tmp_path / "ctx64" / split / "index.json").read_text())
        b = json.loads((ref / "ctx64" / split / "index.json").read_text())
        assert a == b  # includes each shard's sha1


def test_adding_a_context_length_keeps_the_existing_directories(corpus, tmp_path):
    path, _ = corpus
    args = dict(input=[str(path)], out=str(tmp_path), tokenizer_spec={"vocab_size": 512}, val_fraction=0.2,
                num_proc=1)
    first = prepare(make_cfg(n_ctx=[64], **args), progress=False)
    assert first["tokenizer"]["source"] == "trained"
    assert (tmp_path / "tokenizer.yaml").exists()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "ctx64").rglob("*")}
    second = prepare(make_cfg(n_ctx=[64, 32], **args), progress=False)
    assert second["tokenizer"]["source"] == "reused"
    assert second["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert second["ctx"][64]["status"] == "up to date" and second["ctx"][32]["status"] == "written"
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "ctx64").rglob("*")}
    assert after == before
    assert S.read_meta(tmp_path, 32)["tokenizer_sha256"] == first["tokenizer"]["sha256"]
    with pytest.raises(DataError, match="was trained with tokenizer_spec"):
        prepare(make_cfg(n_ctx=[128], **{**args, "tokenizer_spec": {"vocab_size": 1024}}), progress=False)


def test_a_second_tokenizer_cannot_mix_into_a_shard_root(corpus, tmp_path):
    path, _ = corpus
    prepare(make_cfg(input=[str(path)], out=str(tmp_path), n_ctx=[64], tokenizer=str(DEMO_TOKENIZER),
                     val_fraction=0.2, num_proc=1), progress=False)
    other = tmp_path / "other.model"
    from mmtrain.data.tokenizer import train_tokenizer
    train_tokenizer(list(demo_documents(max_docs=100)), {"vocab_size": 512}, out=other)
    with pytest.raises(DataError, match="One shard root holds one tokenizer"):
        prepare(make_cfg(input=[str(path)], out=str(tmp_path), n_ctx=[32], tokenizer=str(other),
                         val_fraction=0.2, num_proc=1), progress=False)
    assert not (tmp_path / "ctx32").exists()
    assert load_tokenizer(tmp_path / "tokenizer.model").sha256 == load_tokenizer(DEMO_TOKENIZER).sha256


def test_a_failing_prepare_leaves_old_shards_intact_and_nothing_that_looks_complete(corpus, tmp_path):
    path, docs = corpus
    common = dict(out=str(tmp_path), tokenizer=str(DEMO_TOKENIZER), val_fraction=0.2, num_proc=1)
    prepare(make_cfg(input=[str(path)], n_ctx=[64], **common), progress=False)
    meta_before = (tmp_path / "ctx64" / "meta.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + '{"title": "no text"}\n')
    # another corpus into the same --out: refused unless asked for ...
    with pytest.raises(ConfigError, match=r"ctx64 holds complete shards prepared with another recipe.*--overwrite"):
        prepare(make_cfg(input=[str(bad)], n_ctx=[64, 128], **common), progress=False)
    # ... and when asked for, a failure half-way keeps the old shards
    with pytest.raises(DataError, match=rf"bad\.jsonl:{len(docs) + 1}: no field 'text'"):
        prepare(make_cfg(input=[str(bad)], n_ctx=[64, 128], overwrite=True, **common), progress=False)
    assert (tmp_path / "ctx64" / "meta.json").read_bytes() == meta_before
    S.check_shards(tmp_path, 64)
    assert not (tmp_path / "ctx128").exists()
    assert not list(tmp_path.glob(".ctx*"))


def test_a_killed_prepare_is_not_mistaken_for_complete_and_is_cleaned_up(tmp_path):
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "mmtrain.cli", "prepare", "--input", "demo", "--out", str(out),
           "--n-ctx", "64", "--tokenizer", str(DEMO_TOKENIZER), "--num-proc", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob(".ctx64.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list(out.glob(".ctx64.tmp-*")):
        pytest.skip("prepare finished before it could be killed")
    assert not (out / "ctx64").exists()
    with pytest.raises(DataError, match="does not exist"):
        S.check_shards(out, 64)
    prepare(make_cfg(input=["demo"], out=str(out), n_ctx=[64], tokenizer=str(DEMO_TOKENIZER), max_docs=200,
                     num_proc=1), progress=False)
    S.check_shards(out, 64)
    assert not list(out.glob(".ctx*"))  # the dead run's temporary directory is gone


def test_empty_corpus_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n"])
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare(make_cfg(input=[str(empty)], out=str(tmp_path / "a"), tokenizer=str(DEMO_TOKENIZER),
                         num_proc=1), progress=False)
    with pytest.raises(DataError, match="the corpus is empty"):  # the tokenizer-training path
        prepare(make_cfg(input=[str(empty)], out=str(tmp_path / "b"), num_proc=1), progress=False)
    assert not list((tmp_path / "a").glob("ctx*")) and not list((tmp_path / "a").glob(".ctx*"))


def test_missing_input_and_missing_tokenizer_are_errors(tmp_path):
    with pytest.raises(DataError, match="input path not found"):
        prepare(make_cfg(input=[str(tmp_path / "nope.jsonl")], out=str(tmp_path)), progress=False)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="tokenizer model not found: .*missing.model"):
        prepare(make_cfg(input=[str(tmp_path / "a.txt")], out=str(tmp_path / "out"),
                         tokenizer=str(tmp_path / "missing.model")), progress=False)


def test_a_split_without_a_full_block_is_an_error(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", ["a short document"] * 10)
    with pytest.raises(DataError, match="would have no samples"):
        prepare(make_cfg(input=[str(small)], out=str(tmp_path / "o"), n_ctx=[512], tokenizer=str(DEMO_TOKENIZER),
                         num_proc=1, val_fraction=0.5), progress=False)


def test_a_corpus_too_few_documents_for_both_splits_fails_before_tokenizing(tmp_path, monkeypatch):
    """One 10 MB line is one document: it fails before any of it is tokenized."""
    import mmtrain.data.writer as writer

    def never(*args, **kwargs):
        raise AssertionError("tokenizing started")

    monkeypatch.setattr(writer, "encode_documents", never)
    big = tmp_path / "one.txt"
    big.write_text("word " * 2_000_000)
    with pytest.raises(DataError, match="the val split would get no documents: the corpus has 1 document "):
        prepare(make_cfg(input=[str(big)], out=str(tmp_path / "o"), n_ctx=[64], tokenizer=str(DEMO_TOKENIZER),
                         num_proc=1), progress=False)
    assert not (tmp_path / "o" / "ctx64").exists()


def test_cli_flags_and_key_value_overrides_map_onto_the_config(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("out: from_yaml\nn_ctx: [16]\nval_fraction: 0.5\n")
    parser = build_parser()
    args = parser.parse_args(["prepare", "--config", str(yaml_file), "--input", "a b.jsonl", "c:d.jsonl",
                              "--n-ctx", "64", "128", "packing=pad", "seed=3", "--text-field", "story",
                              "--delimiter", "<|endoftext|>", "--vocab-size", "8192"])
    cfg = config_from_args(args)
    assert list(cfg.input) == ["a b.jsonl", "c:d.jsonl"]
    assert list(cfg.n_ctx) == [64, 128] and cfg.packing == "pad" and cfg.seed == 3
    assert cfg.out == "from_yaml" and cfg.val_fraction == 0.5
    assert cfg.text_field == "story" and cfg.delimiter == "<|endoftext|>"
    assert cfg.tokenizer_spec.vocab_size == 8192
    assert config_from_args(parser.parse_args(["prepare", "--delimiter", r"\n\n"])).delimiter == "\n\n"
    args = parser.parse_args(["prepare", "--tokenizer", "x.model", "--vocab-size", "10", "--n-ctx", "x"])
    with pytest.raises(ConfigError) as err:
        config_from_args(args)
    assert "exclude each other" in str(err.value) and "--n-ctx" in str(err.value)


def test_cli_prepares_the_demo_corpus_and_prints_a_summary(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mmtrain.cli", "prepare", "--input", "demo", "--out", str(out),
           "--n-ctx", "64", "128", "--vocab-size", "1024", "--max-docs", "400", "--num-proc", "2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "n_ctx" in res.stdout and "train" in res.stdout and "val" in res.stdout
    for n in (64, 128):
        meta = S.check_shards(out, n, verify_hashes=True)
        assert meta["vocab_size"] == 1024
        assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 400
    res = subprocess.run(cmd[:-4] + ["--input", str(tmp_path / "missing.jsonl")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "input path not found" in res.stderr and "Traceback" not in res.stderr
