"""Retrieval pairs: `mmtrain prepare-pairs` writes (query, document) MDS shards; loaders read them.

Layout of ``<out>`` (written into a temporary sibling, renamed into place when complete)::

    <out>/meta.json        written last: n_ctx, tokenizer sha256, padding, fields, split sizes, recipe
    <out>/tokenizer.model  copy of the tokenizer used
    <out>/heldout.jsonl    the raw text of the val and test pairs (what `exclude_pairs` keeps out of a corpus)
<out>/train/ <out>/val/ <out>/test/   MDS: query [n_ctx], query_length, document [n_ctx],
                       document_length, pair_id (train also ``negatives`` [k] with hard negatives)

Every query and document is tokenized separately, truncated to n_ctx (EOS kept last when
``append_eos``) and **right-padded** with the pad id: the models are causal, so right padding never
changes the hidden states of real tokens, and the last real token sits at ``length - 1``.

Cleaning and split: pairs with an empty side are dropped; a document that occurred before
(exact text) is dropped with its pair, so documents are unique and a query's positive is
unambiguous. The split is by document: ``u = sha1(seed, document)`` mapped to [0, 1) puts a pair
in ``test`` when ``u < test_fraction``, in ``val`` when ``u < test_fraction + val_fraction``, else
in ``train`` -- deterministic, independent of input order, and no document is in two splits. The
test split does not depend on ``val_fraction``. ``val`` is carved from what would otherwise be
training pairs, for choosing hyperparameters and checkpoints; ``test`` is for the final table.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from mmtrain import files as F

PAIRS_FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"
PAIR_SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
HELDOUT_NAME = "heldout.jsonl"
#: What prepare-pairs writes in ``out``: a non-empty ``out`` holding anything else is never replaced.
OUT_ENTRIES = {META_NAME, TOKENIZER_NAME, HELDOUT_NAME, "train", "val", "test"}

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# Reading pairs
# --------------------------------------------------------------------------------------------


def _expand(inputs: Sequence[str]) -> List[str]:
    from mmtrain.data.errors import DataError

    files: List[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise DataError(f"pairs input {item!r}: no such file (expected .jsonl / .jsonl.gz files or `demo`)")
        files.extend(matches)
    return files


def jsonl_pairs(paths: Sequence[str], query_field: str, document_field: str) -> Iterator[Tuple[str, str]]:
    """(query, document) of every JSONL line; DataError names the file and line of a bad record."""
    from mmtrain.data.errors import DataError

    for path in _expand(paths):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                missing = [f for f in (query_field, document_field) if f not in record]
                if missing:
                    raise DataError(f"{path}:{lineno}: record has no field {', '.join(map(repr, missing))} "
                                    f"(fields: {', '.join(map(repr, record))}); set query_field / "
                                    "document_field (--query-field / --document-field)")
                query, document = record[query_field], record[document_field]
                if not isinstance(query, str) or not isinstance(document, str):
                    raise DataError(f"{path}:{lineno}: fields {query_field!r} and {document_field!r} must be strings")
                yield query, document


def read_pairs(inputs: Sequence[str], query_field: str = "query", document_field: str = "document",
               max_pairs: int = 0) -> Iterator[Tuple[str, str]]:
    """Pairs of the inputs in order (`demo` = the built-in docstring pairs)."""
    from mmtrain.data.demo_pairs import DEMO_PAIRS, demo_pairs

    count = 0
    for item in inputs:
        source = demo_pairs() if item == DEMO_PAIRS else jsonl_pairs([item], query_field, document_field)
        for pair in source:
            yield pair
            count += 1
            if 0 < max_pairs <= count:
                return


def split_of(document: str, seed: int, test_fraction: float, val_fraction: float = 0.0) -> str:
    """``train`` | ``val`` | ``test`` of a document (see module docstring)."""
    digest = hashlib.sha1(f"{seed}\0{document}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def clean_and_split(pairs: Iterator[Tuple[str, str]], seed: int, test_fraction: float, val_fraction: float = 0.0
                    ) -> Tuple[Dict[str, List[Tuple[str, str]]], Dict[str, int]]:
    """Drop empty and repeated-document pairs, then split by document (see module docstring)."""
    seen = set()
    splits: Dict[str, List[Tuple[str, str]]] = {s: [] for s in PAIR_SPLITS}
    stats = {"read": 0, "empty": 0, "duplicate_documents": 0}
    for query, document in pairs:
        stats["read"] += 1
        query, document = query.strip(), document.strip()
        if not query or not document:
            stats["empty"] += 1
            continue
        if document in seen:
            stats["duplicate_documents"] += 1
            continue
        seen.add(document)
        splits[split_of(document, seed, test_fraction, val_fraction)].append((query, document))
    return splits, stats


# --------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------


def encode_padded(tok, texts: Sequence[str], n_ctx: int, append_eos: bool = True):
    """[len(texts), n_ctx] int64 right-padded ids and [len(texts)] lengths (>= 1)."""
    import numpy as np

    ids = np.full((len(texts), n_ctx), tok.pad_id, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, seq in enumerate(tok.encode_batch(list(texts))):
        seq = list(seq)[: n_ctx - 1 if append_eos else n_ctx]
        if append_eos:
            seq.append(tok.eos_id)
        if not seq:
            seq = [tok.eos_id]
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return ids, lengths


def resolve_tokenizer(bundle: str, tokenizer: str, n_ctx: int):
    """(tokenizer, n_ctx, bundle model n_ctx or None) from a bundle and/or a .model file."""
    from mmtrain.data.errors import DataError

    model_n_ctx = None
    if bundle:
        from mmtrain.data.bundle_config import BundleError, load_bundle_tokenizer, read_bundle_config

        try:
            section = read_bundle_config(bundle)
            tok = load_bundle_tokenizer(bundle)
        except BundleError as exc:
            raise DataError(f"bundle: {exc}") from None
        model_n_ctx = int(section["model"]["n_ctx"])
    if tokenizer:
        from mmtrain.data.tokenizer import load_tokenizer

        try:
            given = load_tokenizer(tokenizer)
        except (OSError, ValueError) as exc:
            raise DataError(f"tokenizer: {exc}") from None
        if bundle and given.sha256 != tok.sha256:
            raise DataError(f"tokenizer {tokenizer} (sha256 {given.sha256[:12]}…) is not the tokenizer of "
                            f"bundle {bundle} ({tok.sha256[:12]}…); give only one of them")
        tok = given
    n_ctx = n_ctx or model_n_ctx
    if model_n_ctx is not None and n_ctx > model_n_ctx:
        raise DataError(f"n_ctx {n_ctx} is larger than the bundle's n_ctx {model_n_ctx} ({bundle})")
    return tok, int(n_ctx), model_n_ctx


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


Sequences = List[List[int]]


def pad_sequences(seqs: Sequence[Sequence[int]], n_ctx: int, pad_id: int, eos_id: int, append_eos: bool = True):
    """Token sequences -> [N, n_ctx] right-padded int64 ids and [N] lengths (as :func:`encode_padded`)."""
    import numpy as np

    ids = np.full((len(seqs), n_ctx), pad_id, dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for i, seq in enumerate(seqs):
        seq = list(seq)[: n_ctx - 1 if append_eos else n_ctx]
        if append_eos:
            seq.append(eos_id)
        if not seq:
            seq = [eos_id]
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return ids, lengths


def _write_split(directory: Path, queries: Sequences, documents: Sequences, tok, n_ctx: int, append_eos: bool,
                 dtype, first_id: int, negatives=None, bar=None) -> None:
    from mmtrain.data.streaming_compat import MDSWriter

    columns = {"query": f"ndarray:{dtype.name}:{n_ctx}", "query_length": "int32",
               "document": f"ndarray:{dtype.name}:{n_ctx}", "document_length": "int32", "pair_id": "int64"}
    if negatives is not None:
        columns["negatives"] = f"ndarray:int64:{negatives.shape[1]}"
    q_ids, q_len = pad_sequences(queries, n_ctx, tok.pad_id, tok.eos_id, append_eos)
    d_ids, d_len = pad_sequences(documents, n_ctx, tok.pad_id, tok.eos_id, append_eos)
    writer = MDSWriter(out=str(directory), columns=columns, compression=None, hashes=["sha1"])
    for i in range(len(queries)):
        sample = {"query": q_ids[i].astype(dtype), "query_length": int(q_len[i]),
                  "document": d_ids[i].astype(dtype), "document_length": int(d_len[i]), "pair_id": first_id + i}
        if negatives is not None:
            sample["negatives"] = negatives[i]
        writer.write(sample)
        if bar is not None:
            bar.update(1)
    writer.finish()


# ---- held-out texts --------------------------------------------------------------------------


def _heldout_path(pair_dir: PathLike) -> Path:
    """``<pair_dir>/heldout.jsonl`` of valid pair shards; DataError saying what to do otherwise."""
    from mmtrain.data.errors import DataError

    read_pairs_meta(pair_dir)
    path = Path(pair_dir) / HELDOUT_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing (pairs written by an older mmtrain); rerun `mmtrain prepare-pairs` "
                        f"for {pair_dir} to record its held-out texts")
    return path


def heldout_texts(pair_dirs: Sequence[PathLike]) -> List[str]:
    """The distinct query and document texts of the val and test pairs of pair directories."""
    texts = set()
    for d in pair_dirs:
        with open(_heldout_path(d), encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                texts.update(t for t in (record["query"], record["document"]) if t)
    return sorted(texts)


def heldout_fingerprint(pair_dirs: Sequence[PathLike]) -> List[Dict[str, str]]:
    out = []
    for d in pair_dirs:
        digest = hashlib.sha256(_heldout_path(d).read_bytes()).hexdigest()
        out.append({"path": os.path.abspath(d), "heldout_sha256": digest})
    return out


# ---- pairs from unlabeled documents ----------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def document_rng(seed: int, text: str):
    """A generator seeded by (seed, document text): a document's pairs do not depend on input order."""
    import numpy as np

    digest = hashlib.sha1(f"pairs\0{seed}\0{text}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def crop_span(ids: Sequence[int], rng, min_ratio: float, max_ratio: float, min_tokens: int,
              max_tokens: int) -> List[int]:
    """One contiguous span of ``ids``: length ~ U(min_ratio, max_ratio) x len(ids), clipped to
    [min_tokens, max_tokens] and the document; start uniform."""
    n = len(ids)
    length = int(round(rng.uniform(min_ratio, max_ratio) * n))
    length = max(1, min(n, max_tokens, max(min_tokens, length)))
    start = int(rng.integers(0, n - length + 1))
    return list(ids[start:start + length])


def sentences(text: str) -> List[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def ict_pair(text: str, rng, keep_fraction: float) -> Optional[Tuple[str, str]]:
    """(one sentence, the passage without it -- or with it, with probability keep_fraction); None if
    the document has fewer than two sentences."""
    parts = sentences(text)
    if len(parts) < 2:
        return None
    i = int(rng.integers(0, len(parts)))
    rest = parts if rng.random() < keep_fraction else parts[:i] + parts[i + 1:]
    return parts[i], " ".join(rest)


def document_pairs(cfg, tok, n_ctx: int, exclude: Sequence[str], progress: bool = False):
    """Pairs built from the documents of ``cfg.input``: {split: [(query ids, document ids, source)]},
    held-out records and cleaning stats. Splits are by source document (as labeled pairs)."""
    from mmtrain.data.corpus import Corpus
    from mmtrain.data.progress import progress_bar

    corpus = Corpus(list(cfg.input), text_field=cfg.text_field, delimiter=cfg.delimiter,
                    max_docs=int(cfg.max_documents), exclude=exclude)
    splits: Dict[str, List[Tuple[List[int], List[int], int]]] = {s: [] for s in PAIR_SPLITS}
    heldout: List[Dict[str, str]] = []
    stats = {"documents": 0, "excluded_documents": 0, "duplicate_documents": 0, "short_documents": 0,
             "pairs": 0}
    seen = set()
    batch: List[str] = []
    max_tokens = n_ctx - 1 if cfg.append_eos else n_ctx

    def flush():
        encoded = tok.encode_batch(batch) if cfg.from_documents == "crop" else [None] * len(batch)
        for text, ids in zip(batch, encoded):
            source = stats["documents"]
            stats["documents"] += 1
            split = split_of(text, int(cfg.seed), float(cfg.test_fraction), float(cfg.val_fraction))
            rng = document_rng(int(cfg.seed), text)
            made = set()
            for _ in range(int(cfg.pairs_per_document)):
                if cfg.from_documents == "crop":
                    if len(ids) < cfg.min_document_tokens:
                        break
                    q = crop_span(ids, rng, cfg.crop_min_ratio, cfg.crop_max_ratio, cfg.min_span_tokens, max_tokens)
                    d = crop_span(ids, rng, cfg.crop_min_ratio, cfg.crop_max_ratio, cfg.min_span_tokens, max_tokens)
                else:
                    pair = ict_pair(text, rng, float(cfg.ict_keep_fraction))
                    if pair is None:
                        break
                    q, d = (list(x) for x in tok.encode_batch(list(pair)))
                    if len(q) < cfg.min_span_tokens or len(q) + len(d) < cfg.min_document_tokens:
                        continue
                key = (tuple(q), tuple(d))
                if key not in made:
                    made.add(key)
                    splits[split].append((q, d, source))
            if not made:
                stats["short_documents"] += 1
            elif split != "train":
                heldout.append({"split": split, "query": "", "document": text})
            bar.update(1)
        bar.set_postfix(pairs=sum(len(v) for v in splits.values()), refresh=False)
        batch.clear()

    with progress_bar(progress, desc=f"reading + tokenizing documents ({cfg.from_documents} pairs)",
                      total=int(cfg.max_documents) or None, unit=" docs") as bar:
        for text in corpus:
            if text in seen:
                stats["duplicate_documents"] += 1
                bar.update(1)
                continue
            seen.add(text)
            batch.append(text)
            if len(batch) >= 512:
                flush()
        flush()
    stats["excluded_documents"] = corpus.excluded
    stats["pairs"] = sum(len(v) for v in splits.values())
    return splits, heldout, stats, corpus.describe()


def _encode_lists(tok, texts: Sequence[str], bar, chunk: int = 1024) -> List[List[int]]:
    """Token ids of ``texts`` (as ``tok.encode_batch``), in chunks that advance ``bar``."""
    out: List[List[int]] = []
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        out += [list(x) for x in tok.encode_batch(part)]
        bar.update(len(part))
    return out


def labeled_pairs(cfg, tok, exclude: Sequence[str], progress: bool = False):
    """Labeled (query, document) pairs of ``cfg.input``, cleaned and split, as token ids."""
    from mmtrain.data.corpus import contains_any
    from mmtrain.data.progress import progress_bar

    pairs = read_pairs(list(cfg.input), cfg.query_field, cfg.document_field, int(cfg.max_pairs))
    with progress_bar(progress, pairs, desc="reading pairs", total=int(cfg.max_pairs) or None,
                      unit=" pairs") as reading:
        texts, stats = clean_and_split(reading, int(cfg.seed), float(cfg.test_fraction), float(cfg.val_fraction))
    stats["excluded"] = 0
    if exclude:
        for split in PAIR_SPLITS:
            kept = [p for p in texts[split] if not (contains_any(p[0], exclude) or contains_any(p[1], exclude))]
            stats["excluded"] += len(texts[split]) - len(kept)
            texts[split] = kept
    splits, heldout = {}, []
    source = 0
    with progress_bar(progress, desc="tokenizing pairs", total=2 * sum(len(v) for v in texts.values()),
                      unit=" texts") as bar:
        for split in PAIR_SPLITS:
            items = texts[split]
            bar.set_postfix(split=split, refresh=False)
            q = _encode_lists(tok, [a for a, _ in items], bar)
            d = _encode_lists(tok, [b for _, b in items], bar)
            splits[split] = [(qi, di, source + i) for i, (qi, di) in enumerate(zip(q, d))]
            source += len(items)
            if split != "train":
                heldout += [{"split": split, "query": a, "document": b} for a, b in items]
    return splits, heldout, stats


# ---- hard negatives --------------------------------------------------------------------------


def mine_hard_negatives(queries: Sequences, documents: Sequences, sources: Sequence[int], k: int,
                        ignore_ids: Sequence[int] = (), seed: int = 0, progress: bool = False):
    """[len(queries), k] int64: for query i, the k training documents BM25 ranks highest among those
    from another source than i's (never its positive, nor other pairs of its document); when fewer
    than k such documents score, the rest are random other-source documents (seeded)."""
    import numpy as np

    from mmtrain.data.errors import DataError
    from mmtrain.data.bm25 import BM25
    from mmtrain.data.progress import progress_bar

    sources = np.asarray(sources)
    n = len(documents)
    group = int(np.max(np.unique(sources, return_counts=True)[1])) if n else 0
    if n - group < k:
        raise DataError(f"hard_negatives: {k} negatives per query need more than {k + group - 1} training "
                        f"documents, the train split has {n}")
    ignore = set(int(t) for t in ignore_ids)
    strip = lambda seqs: [[t for t in s if t not in ignore] for s in seqs]  # noqa: E731
    with progress_bar(progress, desc=f"mining {k} BM25 hard negatives", total=len(queries), unit=" queries") as bar:
        bm25 = BM25(strip(documents))
        out = np.zeros((len(queries), k), dtype=np.int64)
        rng = np.random.default_rng(seed)
        for start in range(0, len(queries), 1024):
            chunk = strip(queries[start:start + 1024])
            cand, cand_scores = bm25.top_k(chunk, min(n, k + group))
            for r, (row, scores) in enumerate(zip(cand, cand_scores)):
                i = start + r
                picked = [int(j) for j, sc in zip(row, scores) if sources[j] != sources[i] and sc > 0][:k]
                while len(picked) < k:
                    j = int(rng.integers(0, n))
                    if sources[j] != sources[i] and j not in picked:
                        picked.append(j)
                out[i] = picked
            bar.update(len(chunk))
    return out


# ---- the command -----------------------------------------------------------------------------


def _recipe(cfg, tok, n_ctx: int) -> Dict[str, Any]:
    """What the shards are a function of: a rerun with the same recipe keeps them."""
    from mmtrain.data.corpus import Corpus

    keys = ["input", "query_field", "document_field", "append_eos", "test_fraction", "val_fraction", "seed",
            "max_pairs", "from_documents", "hard_negatives"]
    if cfg.from_documents:
        keys += ["text_field", "delimiter", "max_documents", "pairs_per_document", "min_document_tokens",
                 "min_span_tokens"] + (["crop_min_ratio", "crop_max_ratio"] if cfg.from_documents == "crop"
                                       else ["ict_keep_fraction"])
    recipe = {k: (list(cfg[k]) if k == "input" else cfg[k]) for k in keys}
    # `demo` (pairs) and `demo` (corpus) are the same docstrings: one fingerprint serves both
    recipe.update({"n_ctx": n_ctx, "tokenizer_sha256": tok.sha256,
                   "input_fingerprint": Corpus(list(cfg.input)).fingerprint(),
                   "exclude_pairs": heldout_fingerprint(list(cfg.exclude_pairs))})
    return recipe


def prepare_pairs(cfg, progress: bool = True) -> Dict[str, Any]:
    """Run `mmtrain prepare-pairs` for a :class:`~mmtrain.config.PairsConfig`; returns meta.json's dict
    (with ``status``: written | up to date). ``progress``: bars for reading + tokenizing, hard-negative
    mining and writing (drawn only on a terminal, by rank 0: :mod:`mmtrain.data.progress`).

    ``out`` is written only when it is new, empty or pair shards (:func:`check_out`), under
    :func:`mmtrain.files.output_lock`, and replaced atomically; a full disk is an OutputError.
    A URL ``out`` is prepared into a staging directory and uploaded (:func:`prepare_pairs_remote`)."""
    from mmtrain.data.remote import is_remote

    tok, n_ctx, _ = resolve_tokenizer(cfg.bundle, cfg.tokenizer, int(cfg.n_ctx))
    if is_remote(cfg.out):
        return prepare_pairs_remote(cfg, tok, n_ctx, progress)
    out = Path(cfg.out).resolve()
    check_out(out, bool(cfg.overwrite))
    out.parent.mkdir(parents=True, exist_ok=True)
    with F.output_lock(out, "prepare-pairs"):
        F.clean_stale(out)
        check_out(out, bool(cfg.overwrite))   # again, now that no other writer can change it
        return _prepare_pairs(cfg, tok, n_ctx, out, progress)


def pair_relpaths(out: Path) -> List[str]:
    """The files of pair shards in upload order: each split's shards then its index.json, the
    tokenizer, the held-out texts, and meta.json last."""
    rels: List[str] = []
    for split in PAIR_SPLITS:
        sdir = out / split
        if not (sdir / "index.json").is_file():
            continue
        rels += sorted(p.relative_to(out).as_posix() for p in sdir.iterdir()
                       if p.is_file() and p.name != "index.json" and not p.name.startswith("."))
        rels.append(f"{split}/index.json")
    return rels + [TOKENIZER_NAME, HELDOUT_NAME, META_NAME]


def prepare_pairs_remote(cfg, tok, n_ctx: int, progress: bool = True) -> Dict[str, Any]:
    """prepare-pairs with ``out`` a store URL. The store's meta.json is read first: pair shards of the
    same recipe are up to date (nothing is sent); of another recipe they are replaced, as a local
    ``out`` is; anything else there needs ``overwrite``. The shards are written into the staging
    directory (:func:`mmtrain.data.writer.staging_dir`, reused when complete, so a run killed while
    uploading is not tokenized again) and uploaded, meta.json last."""
    from mmtrain.data import remote as R
    from mmtrain.data.remote import delete_remote, upload_output
    from mmtrain.data.writer import STAGING_OUT, staging_dir

    try:
        url = R.check_url(cfg.out)
    except Exception as exc:   # noqa: BLE001 -- DataError; reported as a setting
        raise F.OutputError(f"out: {exc}") from None
    text = R.fetch_text(R.child(url, META_NAME))
    old = None
    if text is not None:
        try:
            old = json.loads(text)
        except ValueError:
            old = {}
        if not isinstance(old, dict) or old.get("kind") != "pairs":
            if not cfg.overwrite:
                raise F.OutputError(f"--out {url} holds a {META_NAME} that is not of pair shards; pass --overwrite to "
                                    "write pair shards there, or choose another URL")
            old = None
    recipe = _recipe(cfg, tok, n_ctx)
    if old is not None and old.get("recipe") == recipe:
        return {**old, "status": "up to date", "uploaded": 0}
    if text is not None:   # replaced: the store's pair shards read as incomplete until the new meta.json
        delete_remote(R.child(url, META_NAME))
    root = staging_dir(url)
    local = root / STAGING_OUT
    local_cfg = cfg.copy()
    local_cfg.out, local_cfg.overwrite = str(local), True   # the staging dir is ours
    meta = prepare_pairs(local_cfg, progress=progress)
    sent = upload_output(local, pair_relpaths(local), url, root / ".uploaded-pairs.json")
    return {**meta, "status": "written", "uploaded": sent["uploaded"], "staging": str(local)}


def _is_pair_shards(directory: Path) -> bool:
    """Pair shards written before output markers existed: meta.json of kind "pairs"."""
    try:
        return json.loads((directory / META_NAME).read_text(encoding="utf-8")).get("kind") == "pairs"
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, overwrite: bool) -> None:
    """OutputError unless ``out`` is new, empty or pair shards (a non-empty directory without them
    needs ``overwrite``); one holding anything prepare-pairs does not write is never replaced."""
    F.check_replaceable(out, "prepare-pairs", own=OUT_ENTRIES.__contains__, ours=_is_pair_shards,
                        overwrite=overwrite)


def _prepare_pairs(cfg, tok, n_ctx: int, out: Path, progress: bool) -> Dict[str, Any]:
    from mmtrain.data.demo_pairs import DEMO_PAIRS, demo_pairs_description
    from mmtrain.data.errors import DataError
    from mmtrain.data.packing import token_dtype
    from mmtrain.data.progress import progress_bar
    from mmtrain.data.shards import replace_dir, write_json_atomic
    from mmtrain.data.streaming_compat import STREAMING_VERSION

    recipe = _recipe(cfg, tok, n_ctx)
    if (out / META_NAME).is_file():
        try:
            old = check_pairs(out)
        except DataError:
            old = None
        if old is not None and old.get("recipe") == recipe and (out / HELDOUT_NAME).is_file():
            return {**old, "status": "up to date"}
    exclude = heldout_texts(list(cfg.exclude_pairs))
    if cfg.from_documents:
        splits, heldout, stats, described = document_pairs(cfg, tok, n_ctx, exclude, progress)
        sources = [described]
    else:
        splits, heldout, stats = labeled_pairs(cfg, tok, exclude, progress)
        sources = [demo_pairs_description() if i == DEMO_PAIRS else os.path.abspath(i) for i in cfg.input]
    wanted = PAIR_SPLITS if cfg.val_fraction > 0 else REQUIRED_SPLITS
    for split in wanted:
        if not splits[split]:
            what = "documents" if cfg.from_documents else "pairs"
            raise DataError(f"the {split} split would be empty ({stats}); use more {what} or another "
                            f"{'val_fraction' if split == 'val' else 'test_fraction'}")
    negatives = None
    if cfg.hard_negatives > 0:
        train = splits["train"]
        keep = n_ctx - 1 if cfg.append_eos else n_ctx   # mined on what the model sees
        negatives = mine_hard_negatives([q[:keep] for q, _, _ in train], [d[:keep] for _, d, _ in train],
                                        [s for _, _, s in train], int(cfg.hard_negatives),
                                        ignore_ids=(tok.pad_id, tok.eos_id), seed=int(cfg.seed),
                                        progress=progress)
    tmp = F.tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = token_dtype(tok.vocab_size)
    free_at_start = F.free_bytes(out.parent)
    try:
        tmp.mkdir()
        first = 0
        with progress_bar(progress, desc="writing pair shards", total=sum(len(splits[s]) for s in wanted),
                          unit=" pairs") as bar:
            for split in wanted:
                items = splits[split]
                bar.set_postfix(split=split, refresh=False)
                _write_split(tmp / split, [q for q, _, _ in items], [d for _, d, _ in items], tok, n_ctx,
                             bool(cfg.append_eos), dtype, first, negatives if split == "train" else None, bar)
                first += len(items)
        (tmp / TOKENIZER_NAME).write_bytes(tok.serialized())
        with open(tmp / HELDOUT_NAME, "w", encoding="utf-8") as fh:
            for record in heldout:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        meta = {
            "format_version": PAIRS_FORMAT_VERSION, "kind": "pairs", "n_ctx": n_ctx,
            "token_dtype": dtype.name, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
            "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256, "tokenizer_file": TOKENIZER_NAME,
            "padding": "right", "append_eos": bool(cfg.append_eos),
            "fields": {"query": cfg.query_field, "document": cfg.document_field},
            "from_documents": cfg.from_documents or None,
            "hard_negatives": int(cfg.hard_negatives),
            "splits": {s: {"pairs": len(splits[s])} for s in wanted},
            "cleaning": stats, "source": sources,
            "prepare": {"input": list(cfg.input), "bundle": cfg.bundle, "seed": int(cfg.seed),
                        "test_fraction": float(cfg.test_fraction), "val_fraction": float(cfg.val_fraction),
                        "max_pairs": int(cfg.max_pairs), "from_documents": cfg.from_documents,
                        "exclude_pairs": [os.path.abspath(p) for p in cfg.exclude_pairs]},
            "recipe": recipe,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "streaming_version": STREAMING_VERSION,
        }
        write_json_atomic(tmp / META_NAME, meta)
        F.write_marker(tmp, "prepare-pairs")
        replace_dir(tmp, out)
    except OSError as exc:
        if not F.is_disk_full(exc):
            raise
        raise F.disk_full_error(exc.filename or tmp, "writing the pair shards", free_at_start=free_at_start,
                                kept=out if out.exists() else None) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**meta, "status": "written"}


# --------------------------------------------------------------------------------------------
# Checking and reading
# --------------------------------------------------------------------------------------------


def read_pairs_meta(pair_dir: PathLike) -> Dict[str, Any]:
    from mmtrain.data.errors import DataError

    path = Path(pair_dir) / META_NAME
    if not path.is_file():
        raise DataError(f"{pair_dir}: no {META_NAME} (not pair shards written by `mmtrain prepare-pairs`, "
                        "or an interrupted run). Create them with:\n  mmtrain prepare-pairs --config "
                        "configs/pairs/demo.yaml bundle=<bundle dir> out=" + str(pair_dir))
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or not valid JSON ({exc})") from None
    if meta.get("kind") != "pairs" or meta.get("format_version") != PAIRS_FORMAT_VERSION:
        raise DataError(f"{path}: not pair shards of format {PAIRS_FORMAT_VERSION} (kind {meta.get('kind')!r}, "
                        f"format_version {meta.get('format_version')!r})")
    return meta


def check_pairs(pair_dir: PathLike, *, tokenizer_sha256: Optional[str] = None, model_n_ctx: Optional[int] = None,
                bundle: str = "", verify_hashes: bool = False) -> Dict[str, Any]:
    """meta.json of the pair shards; DataError if made with another tokenizer or longer than the model
    (or, with ``verify_hashes``, if a shard file's sha1 is not the one its index.json records)."""
    from mmtrain.data.errors import DataError

    meta = read_pairs_meta(pair_dir)
    where = Path(pair_dir) / META_NAME
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"{where}: the pairs were tokenized with tokenizer sha256 {meta['tokenizer_sha256'][:12]}…, "
                        f"but bundle {bundle or '?'} uses {tokenizer_sha256[:12]}…: prepare the pairs with this "
                        f"bundle (`mmtrain prepare-pairs ... bundle={bundle or '<bundle>'}`)")
    if model_n_ctx is not None and int(meta["n_ctx"]) > int(model_n_ctx):
        raise DataError(f"{where}: pairs have n_ctx {meta['n_ctx']}, longer than the model's n_ctx {model_n_ctx}")
    from mmtrain.data.shards import check_shard_file

    for split in REQUIRED_SPLITS + (("val",) if "val" in meta.get("splits", {}) else ()):
        sdir = Path(pair_dir) / split
        if not (sdir / "index.json").is_file():
            raise DataError(f"{sdir}: missing split (no index.json)")
        if verify_hashes:
            for info in json.loads((sdir / "index.json").read_text())["shards"]:
                check_shard_file(sdir, info, True, remedy="`mmtrain prepare-pairs`")
    return meta


def decode_pair(s: Dict[str, Any]) -> Dict[str, Any]:
    """A stored pair sample -> long tensors (see module docstring)."""
    import numpy as np
    import torch

    return {"query_ids": torch.from_numpy(np.asarray(s["query"]).astype(np.int64)),
            "query_length": torch.tensor(int(s["query_length"])),
            "document_ids": torch.from_numpy(np.asarray(s["document"]).astype(np.int64)),
            "document_length": torch.tensor(int(s["document_length"])),
            "pair_id": torch.tensor(int(s["pair_id"])),
            **({"negatives": torch.from_numpy(np.asarray(s["negatives"]).astype(np.int64))}
               if "negatives" in s else {})}


def _dataset_class():
    from mmtrain.data.streaming_compat import StreamingDataset

    class PairDataset(StreamingDataset):
        """A StreamingDataset over one pair split yielding long tensors (:func:`decode_pair`)."""

        def get_item(self, sample_id: int, retry: int = 7) -> Dict[str, Any]:
            return decode_pair(super().get_item(sample_id, retry))

    return PairDataset


def pair_dataset(pair_dir: PathLike, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
    from mmtrain.data.lm_dataset import _launcher_env, new_streaming_dataset

    num_nodes = _launcher_env()
    return new_streaming_dataset(_dataset_class(), local=str((Path(pair_dir) / split).resolve()), remote=None,
                                 batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                                 num_canonical_nodes=num_nodes)


def build_pair_loader(pair_dir: PathLike, split: str, batch_size: int, *, shuffle: bool, seed: int,
                      num_workers: int, drop_last: bool = True):
    """A resumable StreamingDataLoader of per-rank pair batches (state_dict / load_state_dict)."""
    import torch

    from mmtrain.data.streaming_compat import StreamingDataLoader

    dataset = pair_dataset(pair_dir, split, batch_size, shuffle, seed)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                               persistent_workers=False, pin_memory=torch.cuda.is_available())


def load_split(pair_dir: PathLike, split: str, max_pairs: int = 0) -> Dict[str, Any]:
    """Every pair of a split (in stored order) as numpy arrays: query_ids, query_length, document_ids, ..."""
    import numpy as np

    from mmtrain.data.errors import DataError

    present = [s for s in PAIR_SPLITS if (Path(pair_dir) / s / "index.json").is_file()]
    splits = present if split == "all" else (split,)
    if split != "all" and split not in present:
        raise DataError(f"{pair_dir}: no {split} split (it has {', '.join(present)})"
                        + ("; rerun `mmtrain prepare-pairs` (val_fraction > 0) to carve one from the training pairs"
                           if split == "val" else ""))
    from mmtrain.data.streaming_compat import read_samples

    items = []
    for name in splits:
        for sample in read_samples(Path(pair_dir) / name):
            if 0 < max_pairs <= len(items):
                break
            items.append(decode_pair(sample))
    keys = [k for k in items[0] if all(k in it for it in items)]
    return {key: np.stack([it[key].numpy() for it in items]) for key in keys}


def load_jsonl_split(path: str, tok, n_ctx: int, query_field: str, document_field: str, split: str,
                     seed: int = 0, test_fraction: float = 0.1, val_fraction: float = 0.1, append_eos: bool = True,
                     max_pairs: int = 0) -> Dict[str, Any]:
    """Pairs of a JSONL file, cleaned and split exactly as prepare-pairs does, tokenized in memory."""
    import numpy as np

    from mmtrain.data.errors import DataError

    splits, _ = clean_and_split(jsonl_pairs([path], query_field, document_field), seed, test_fraction, val_fraction)
    pairs = [p for s in PAIR_SPLITS for p in splits[s]] if split == "all" else splits[split]
    if max_pairs > 0:
        pairs = pairs[:max_pairs]
    if not pairs:
        raise DataError(f"{path}: the {split} split is empty")
    q, ql = encode_padded(tok, [p[0] for p in pairs], n_ctx, append_eos)
    d, dl = encode_padded(tok, [p[1] for p in pairs], n_ctx, append_eos)
    return {"query_ids": q, "query_length": ql, "document_ids": d, "document_length": dl,
            "pair_id": np.arange(len(pairs))}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_FLAGS = [("--input", "input", dict(nargs="+", metavar="PATH", help="JSONL files or `demo`")),
          ("--query-field", "query_field", dict(metavar="KEY")),
          ("--document-field", "document_field", dict(metavar="KEY")),
          ("--bundle", "bundle", dict(metavar="DIR", help="bundle whose tokenizer (and n_ctx) to use")),
          ("--out", "out", dict(metavar="DIR|URL", help="output directory, or a store URL (s3://bucket/prefix, "
                                                        "file:///path, ...): staged locally, then uploaded")),
          ("--n-ctx", "n_ctx", dict(type=int, metavar="N")),
          ("--from-documents", "from_documents", dict(choices=["crop", "ict"],
                                                      help="build pairs from unlabeled documents")),
          ("--hard-negatives", "hard_negatives", dict(type=int, metavar="K", help="BM25 negatives per query")),
          ("--exclude-pairs", "exclude_pairs", dict(action="append", metavar="DIR",
                                                    help="keep this pair set's held-out texts out (repeatable)")),
          ("--overwrite", "overwrite", dict(action="store_true",
                                            help="replace a non-empty --out that holds no pair shards (one "
                                                 "holding anything else is never replaced)"))]


def _run(args: argparse.Namespace) -> int:
    from mmtrain import config as C
    from mmtrain.data.schema import PairsConfig
    from mmtrain.data.errors import DataError

    overrides = [f"{key}={json.dumps(getattr(args, flag[2:].replace('-', '_')))}" for flag, key, _ in _FLAGS
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
    cfg = C.load_config(PairsConfig, args.config or [], overrides + list(args.overrides))
    try:
        meta = prepare_pairs(cfg, progress=not args.quiet)
    except DataError as exc:
        print(f"mmtrain prepare-pairs: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(cfg.out, meta))
    return 0


def format_summary(out: str, meta: Dict[str, Any]) -> str:
    c, sp = meta["cleaning"], meta["splits"]
    sizes = " / ".join(f"{sp[s]['pairs']} {s}" for s in PAIR_SPLITS if s in sp)
    if meta["status"] == "up to date":
        return f"{out}: up to date ({sizes} pairs, same recipe); nothing written"
    if meta.get("from_documents"):
        dropped = (f"{meta['from_documents']} pairs from {c['documents']} documents; {c['excluded_documents']} "
                   f"held-out-overlapping, {c['duplicate_documents']} duplicate and {c['short_documents']} "
                   "too-short documents dropped")
    else:
        dropped = (f"{c['read']} read, {c['duplicate_documents']} duplicate documents, {c['empty']} empty and "
                   f"{c['excluded']} held-out-overlapping pairs dropped")
    neg = f", {meta['hard_negatives']} BM25 hard negatives per training query" if meta.get("hard_negatives") else ""
    sent = (f"; uploaded {meta['uploaded']} files (staging directory {meta['staging']})"
            if meta.get("staging") else "")
    return f"wrote {out}: {sizes} pairs (n_ctx {meta['n_ctx']}, right-padded; {dropped}{neg}){sent}"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-pairs", help="tokenize (query, document) pairs into train/test MDS shards for retrieval",
        description="Read (query, document) pairs from JSONL (or the built-in demo pairs) -- or build them "
                    "from unlabeled documents (--from-documents crop|ict) -- tokenize them with a bundle's "
                    "tokenizer, split train/val/test by document, optionally mine BM25 hard negatives, and write "
                    "MDS shards + meta.json. A rerun with the same recipe keeps the shards.",
        epilog="examples:\n  mmtrain prepare-pairs --config configs/pairs/demo.yaml bundle=bundles/mixer\n"
               "  mmtrain prepare-pairs --input ts.jsonl --query-field summary --document-field story "
               "--bundle bundles/mixer --out data/pairs/ts\n"
               "  mmtrain prepare-pairs --input corpus.txt --delimiter '\\n\\n' --from-documents crop --bundle "
               "bundles/mixer --out data/pairs/crop --exclude-pairs data/pairs/ts",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="YAML", help="PairsConfig YAML (repeatable)")
    for flag, _, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    from mmtrain.data.progress import add_quiet_argument

    add_quiet_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="PairsConfig overrides, e.g. test_fraction=0.05")
    p.set_defaults(func=_run)
