"""SentencePiece tokenizers: train, load, encode, decode, and a content hash.

Every mmtrain tokenizer has the same special ids: ``pad=0, unk=1, bos=2, eos=3``. It is lossless
(``decode(encode(text)) == text`` for any text): identity normalization, whitespace kept as is
(runs of spaces, newlines, tabs) and byte fallback for characters outside the vocabulary, so code,
indentation and any Unicode survive a round trip.

The hash (:attr:`Tokenizer.sha256`) is the sha256 of the serialized model proto; shards record it in
their meta.json and training refuses shards made with a different tokenizer.

The shipped demo tokenizer (:data:`DEMO_TOKENIZER`) was trained on the demo corpus from the spec
next to it (:data:`DEMO_TOKENIZER_SPEC`); ``train_from_spec_file`` reproduces it exactly on the
same Python version.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import sentencepiece as spm
import yaml

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "tokenizer"
DEMO_TOKENIZER = TOKENIZER_DIR / "demo-bpe-4096.model"
DEMO_TOKENIZER_SPEC = TOKENIZER_DIR / "demo-bpe-4096.yaml"

# Training reads at most this many characters from the start of the corpus: plenty for a
# vocabulary of a few thousand pieces, and it keeps memory and time bounded on huge corpora.
TRAIN_MAX_CHARS = 50_000_000


@dataclass(frozen=True)
class TrainSpec:
    """How a tokenizer is trained (mirrors ``mmtrain.config.TokenizerSpec``)."""

    type: str = "bpe"
    vocab_size: int = 4096
    character_coverage: float = 1.0
    max_sentence_length: int = 16384
    seed: int = 0

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> "TrainSpec":
        known = {f: spec[f] for f in cls.__dataclass_fields__ if f in spec}
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ValueError(f"unknown tokenizer spec key(s): {', '.join(unknown)}")
        return cls(**known)


class Tokenizer:
    """A loaded SentencePiece model with mmtrain's fixed special ids."""

    def __init__(self, model_proto: bytes, path: Optional[Union[str, Path]] = None):
        self.path = str(path) if path is not None else None
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sha256 = hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            where = self.path or "model"
            raise ValueError(f"{where}: special ids (pad, unk, bos, eos) are {ids}, mmtrain needs "
                             f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with mmtrain.data.tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def encode_numpy(self, texts: Sequence[str], num_threads: int = 1) -> list:
        """Token ids of each text as int32 numpy arrays (the fast path used by ``prepare``)."""
        return self.sp.encode(list(texts), out_type="numpy", num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self) -> List[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def serialized(self) -> bytes:
        return self.sp.serialized_model_proto()

    def save(self, path: Union[str, Path]) -> None:
        """Write the model file atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(self.serialized())
        os.replace(tmp, path)
        self.path = str(path)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or '<memory>'}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """Load a ``.model`` file; ValueError names the path when it is missing or not a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    data = path.read_bytes()
    try:
        return Tokenizer(data, path)
    except RuntimeError as exc:  # sentencepiece: "Internal: could not parse ModelProto"
        raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None


def _training_sentences(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of the documents (a line is one SentencePiece training sentence)."""
    n_chars = 0
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line
        n_chars += len(doc)
        if n_chars >= max_chars:
            return


def train_tokenizer(documents: Iterable[str], spec: Union[TrainSpec, Mapping[str, Any]] = TrainSpec(),
                    out: Optional[Union[str, Path]] = None, max_chars: int = TRAIN_MAX_CHARS) -> Tokenizer:
    """Train a tokenizer on the documents (the first ``max_chars`` characters) and optionally save it.

    Deterministic: one thread, input in corpus order, no sentence sampling, seeded RNG; the same
    documents and spec give a byte-identical model.
    """
    if not isinstance(spec, TrainSpec):
        spec = TrainSpec.from_mapping(spec)
    if spec.type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer type must be bpe or unigram, got {spec.type!r}")
    sentences = _training_sentences(documents, max_chars)
    first = next(sentences, None)
    if first is None:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty lines)")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    model = io.BytesIO()
    spm.set_random_generator_seed(spec.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(), model_writer=model,
            model_type=spec.type, vocab_size=spec.vocab_size,
            character_coverage=spec.character_coverage,
            max_sentence_length=spec.max_sentence_length,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, minloglevel=2,
        )
    except RuntimeError as exc:
        # e.g. "Vocabulary size is too high (4096). Please set it to a value <= 1234."
        raise ValueError(f"SentencePiece training failed: {exc}") from None
    tok = Tokenizer(model.getvalue())
    if out is not None:
        tok.save(out)
    return tok


def read_spec_file(path: Union[str, Path]) -> dict:
    """Read a shipped tokenizer spec YAML (see ``tokenizer/demo-bpe-4096.yaml``)."""
    with open(path, "r", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def train_from_spec_file(path: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Tokenizer:
    """Retrain the tokenizer a spec YAML describes (``input``, ``text_field``, ``spec``)."""
    from mmtrain.data.corpus import Corpus

    info = read_spec_file(path)
    corpus = Corpus(list(info["input"]), text_field=info.get("text_field", "text"),
                    delimiter=info.get("delimiter", ""), max_docs=int(info.get("max_docs", 0)))
    return train_tokenizer(corpus, info["spec"], out=out,
                           max_chars=int(info.get("max_chars", TRAIN_MAX_CHARS)))
