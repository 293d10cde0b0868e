"""SentencePiece tokenizer: fixed special ids, lossless round trip, content hash, reproducibility."""

import hashlib

import pytest

from mmtrain.data.demo_corpus import demo_documents, demo_fingerprint
from mmtrain.data.tokenizer import (BOS_ID, DEMO_TOKENIZER, DEMO_TOKENIZER_SPEC, EOS_ID, PAD_ID, UNK_ID,
                               load_tokenizer, read_spec_file, train_from_spec_file, train_tokenizer)

TRICKY = [
    "Return the list of items.",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n    indented code:\n\tx = 1\r\n",
    "émoji 🤗, 中文, Ελληνικά, ∑x²",
    "",
    " ",
    "\n",
    "numbers 3.14159 and 1,000,000",
]


def test_demo_tokenizer_is_shipped_with_fixed_special_ids():
    assert DEMO_TOKENIZER.is_absolute() and DEMO_TOKENIZER.is_file()
    tok = load_tokenizer(DEMO_TOKENIZER)
    assert tok.vocab_size == 4096
    assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (0, 1, 2, 3)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.pieces()[:4] == ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("text", TRICKY)
def test_encode_decode_is_lossless(text):
    tok = load_tokenizer(DEMO_TOKENIZER)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: nothing is unknown


def test_hash_is_sha256_of_the_model_proto():
    tok = load_tokenizer(DEMO_TOKENIZER)
    assert tok.sha256 == hashlib.sha256(tok.serialized()).hexdigest()
    assert tok.sha256 == hashlib.sha256(DEMO_TOKENIZER.read_bytes()).hexdigest()
    assert tok.sha256 == read_spec_file(DEMO_TOKENIZER_SPEC)["model_sha256"]


def test_retraining_from_the_shipped_spec_reproduces_the_demo_tokenizer(tmp_path):
    spec = read_spec_file(DEMO_TOKENIZER_SPEC)
    if demo_fingerprint()["sha256"] != spec["trained_on"]["corpus_sha256"]:
        pytest.skip(f"demo corpus differs from the one the tokenizer was trained on "
                    f"(Python {spec['trained_on']['python']}); the spec only reproduces there")
    retrained = train_from_spec_file(DEMO_TOKENIZER_SPEC, tmp_path / "again.model")
    shipped = load_tokenizer(DEMO_TOKENIZER)
    assert retrained.pieces() == shipped.pieces()
    assert retrained.sha256 == shipped.sha256
    assert (tmp_path / "again.model").read_bytes() == DEMO_TOKENIZER.read_bytes()


@pytest.mark.parametrize("kind,vocab", [("bpe", 512), ("unigram", 512)])
def test_training_is_deterministic_and_respects_the_spec(tmp_path, kind, vocab):
    docs = list(demo_documents(max_docs=300))
    spec = {"type": kind, "vocab_size": vocab}
    a = train_tokenizer(docs, spec, out=tmp_path / "a.model")
    b = train_tokenizer(docs, spec)
    assert a.sha256 == b.sha256
    assert a.vocab_size == vocab
    assert a.sp.encode("x", out_type=str)  # usable
    assert load_tokenizer(tmp_path / "a.model").sha256 == a.sha256
    assert a.decode(a.encode(docs[0])) == docs[0]


def test_training_on_an_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "   \n  "], {"vocab_size": 100})


def test_loading_a_missing_or_broken_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        load_tokenizer(bad)
