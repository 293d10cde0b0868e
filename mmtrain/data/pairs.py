"""Retrieval pairs: `mmtrain prepare-pairs` writes (query, document) MDS shards; loaders read them.

Layout of ``<out>`` (written into a temporary sibling, renamed into place when complete)::

    <out>/meta.json        written last: n_ctx, tokenizer sha256, padding, fields, split sizes, recipe
    <out>/tokenizer.model  copy of the tokenizer used
    <out>/train/  <out>/test/   MDS: query [n_ctx], query_length, document [n_ctx], document_length, pair_id

Every query and document is tokenized separately, truncated to n_ctx (EOS kept last when
``append_eos``) and **right-padded** with the pad id: the models are causal, so right padding never
changes the hidden states of real tokens, and the last real token sits at ``length - 1``.

Cleaning and split: pairs with an empty side are dropped; a document that occurred before
(exact text) is dropped with its pair, so documents are unique and a query's positive is
unambiguous. The split is by document: ``sha1(seed, document) < test_fraction`` puts a pair in
``test`` -- deterministic, independent of input order, and no document is in both splits.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

PAIRS_FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"
PAIR_SPLITS = ("train", "test")

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


def is_test(document: str, seed: int, test_fraction: float) -> bool:
    digest = hashlib.sha1(f"{seed}\0{document}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


def clean_and_split(pairs: Iterator[Tuple[str, str]], seed: int, test_fraction: float
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
        splits["test" if is_test(document, seed, test_fraction) else "train"].append((query, document))
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
        from mmtrain.bundle import BundleError, load_bundle_tokenizer, read_bundle_config

        try:
            section = read_bundle_config(bundle)
            tok = load_bundle_tokenizer(bundle)
        except BundleError as exc:
            raise DataError(f"bundle: {exc}") from None
        model_n_ctx = int(section["model"]["n_ctx"])
    if tokenizer:
        from mmtrain.tokenizer import load_tokenizer

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


def _write_split(directory: Path, pairs: List[Tuple[str, str]], tok, n_ctx: int, append_eos: bool,
                 dtype, first_id: int) -> None:
    from mmtrain.data.streaming_compat import MDSWriter

    columns = {"query": f"ndarray:{dtype.name}:{n_ctx}", "query_length": "int32",
               "document": f"ndarray:{dtype.name}:{n_ctx}", "document_length": "int32", "pair_id": "int64"}
    q_ids, q_len = encode_padded(tok, [q for q, _ in pairs], n_ctx, append_eos)
    d_ids, d_len = encode_padded(tok, [d for _, d in pairs], n_ctx, append_eos)
    writer = MDSWriter(out=str(directory), columns=columns, compression=None, hashes=["sha1"])
    for i in range(len(pairs)):
        writer.write({"query": q_ids[i].astype(dtype), "query_length": int(q_len[i]),
                      "document": d_ids[i].astype(dtype), "document_length": int(d_len[i]),
                      "pair_id": first_id + i})
    writer.finish()


def prepare_pairs(cfg) -> Dict[str, Any]:
    """Run `mmtrain prepare-pairs` for a :class:`~mmtrain.config.PairsConfig`; returns meta.json's dict."""
    from mmtrain.data.demo_pairs import DEMO_PAIRS, demo_pairs_description
    from mmtrain.data.errors import DataError
    from mmtrain.data.packing import token_dtype
    from mmtrain.data.shards import replace_dir, write_json_atomic
    from mmtrain.data.streaming_compat import STREAMING_VERSION

    tok, n_ctx, _ = resolve_tokenizer(cfg.bundle, cfg.tokenizer, int(cfg.n_ctx))
    pairs = read_pairs(list(cfg.input), cfg.query_field, cfg.document_field, int(cfg.max_pairs))
    splits, stats = clean_and_split(pairs, int(cfg.seed), float(cfg.test_fraction))
    for split, items in splits.items():
        if not items:
            raise DataError(f"the {split} split would be empty ({stats['read']} pairs read, "
                            f"{stats['duplicate_documents']} duplicate documents dropped); use more pairs "
                            "or another test_fraction")
    out = Path(cfg.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = token_dtype(tok.vocab_size)
    try:
        tmp.mkdir()
        first = 0
        for split in PAIR_SPLITS:
            _write_split(tmp / split, splits[split], tok, n_ctx, bool(cfg.append_eos), dtype, first)
            first += len(splits[split])
        (tmp / TOKENIZER_NAME).write_bytes(tok.serialized())
        sources = [demo_pairs_description() if i == DEMO_PAIRS else os.path.abspath(i) for i in cfg.input]
        meta = {
            "format_version": PAIRS_FORMAT_VERSION, "kind": "pairs", "n_ctx": n_ctx,
            "token_dtype": dtype.name, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
            "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256, "tokenizer_file": TOKENIZER_NAME,
            "padding": "right", "append_eos": bool(cfg.append_eos),
            "fields": {"query": cfg.query_field, "document": cfg.document_field},
            "splits": {s: {"pairs": len(v)} for s, v in splits.items()},
            "cleaning": stats, "source": sources,
            "prepare": {"input": list(cfg.input), "bundle": cfg.bundle, "seed": int(cfg.seed),
                        "test_fraction": float(cfg.test_fraction), "max_pairs": int(cfg.max_pairs)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "streaming_version": STREAMING_VERSION,
        }
        write_json_atomic(tmp / META_NAME, meta)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


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
                bundle: str = "") -> Dict[str, Any]:
    """meta.json of the pair shards; DataError if made with another tokenizer or longer than the model."""
    from mmtrain.data.errors import DataError

    meta = read_pairs_meta(pair_dir)
    where = Path(pair_dir) / META_NAME
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"{where}: the pairs were tokenized with tokenizer sha256 {meta['tokenizer_sha256'][:12]}…, "
                        f"but bundle {bundle or '?'} uses {tokenizer_sha256[:12]}…: prepare the pairs with this "
                        f"bundle (`mmtrain prepare-pairs ... bundle={bundle or '<bundle>'}`)")
    if model_n_ctx is not None and int(meta["n_ctx"]) > int(model_n_ctx):
        raise DataError(f"{where}: pairs have n_ctx {meta['n_ctx']}, longer than the model's n_ctx {model_n_ctx}")
    for split in PAIR_SPLITS:
        if not (Path(pair_dir) / split / "index.json").is_file():
            raise DataError(f"{Path(pair_dir) / split}: missing split (no index.json)")
    return meta


def _dataset_class():
    import numpy as np
    import torch

    from mmtrain.data.streaming_compat import StreamingDataset

    class PairDataset(StreamingDataset):
        """A StreamingDataset over one pair split yielding long tensors (see module docstring)."""

        def get_item(self, sample_id: int, retry: int = 7) -> Dict[str, Any]:
            s = super().get_item(sample_id, retry)
            return {"query_ids": torch.from_numpy(np.asarray(s["query"]).astype(np.int64)),
                    "query_length": torch.tensor(int(s["query_length"])),
                    "document_ids": torch.from_numpy(np.asarray(s["document"]).astype(np.int64)),
                    "document_length": torch.tensor(int(s["document_length"])),
                    "pair_id": torch.tensor(int(s["pair_id"]))}

    return PairDataset


def pair_dataset(pair_dir: PathLike, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
    from mmtrain.data.lm_dataset import _launcher_env

    num_nodes = _launcher_env()
    return _dataset_class()(local=str((Path(pair_dir) / split).resolve()), remote=None, batch_size=batch_size,
                            shuffle=shuffle, shuffle_seed=seed, num_canonical_nodes=num_nodes)


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

    splits = PAIR_SPLITS if split == "all" else (split,)
    parts = []
    for name in splits:
        ds = pair_dataset(pair_dir, name, batch_size=1)
        parts.append([ds.get_item(i) for i in range(ds.size)])
    items = [it for part in parts for it in part]
    if max_pairs > 0:
        items = items[:max_pairs]
    return {key: np.stack([it[key].numpy() for it in items]) for key in items[0]}


def load_jsonl_split(path: str, tok, n_ctx: int, query_field: str, document_field: str, split: str,
                     seed: int = 0, test_fraction: float = 0.1, append_eos: bool = True,
                     max_pairs: int = 0) -> Dict[str, Any]:
    """Pairs of a JSONL file, cleaned and split exactly as prepare-pairs does, tokenized in memory."""
    import numpy as np

    from mmtrain.data.errors import DataError

    splits, _ = clean_and_split(jsonl_pairs([path], query_field, document_field), seed, test_fraction)
    pairs = splits["train"] + splits["test"] if split == "all" else splits[split]
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
          ("--out", "out", dict(metavar="DIR")),
          ("--n-ctx", "n_ctx", dict(type=int, metavar="N"))]


def _run(args: argparse.Namespace) -> int:
    from mmtrain import config as C
    from mmtrain.data.errors import DataError

    overrides = [f"{key}={json.dumps(getattr(args, flag[2:].replace('-', '_')))}" for flag, key, _ in _FLAGS
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
    cfg = C.load_config(C.PairsConfig, args.config or [], overrides + list(args.overrides))
    try:
        meta = prepare_pairs(cfg)
    except DataError as exc:
        print(f"mmtrain prepare-pairs: error: {exc}", file=sys.stderr)
        return 1
    c = meta["cleaning"]
    print(f"wrote {cfg.out}: {meta['splits']['train']['pairs']} train / {meta['splits']['test']['pairs']} test "
          f"pairs (n_ctx {meta['n_ctx']}, right-padded; {c['read']} read, {c['duplicate_documents']} "
          f"duplicate documents and {c['empty']} empty pairs dropped)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-pairs", help="tokenize (query, document) pairs into train/test MDS shards for retrieval",
        description="Read (query, document) pairs from JSONL (or the built-in demo pairs), tokenize them with "
                    "a bundle's tokenizer, split train/test by document and write MDS shards + meta.json.",
        epilog="examples:\n  mmtrain prepare-pairs --config configs/pairs/demo.yaml bundle=bundles/mixer\n"
               "  mmtrain prepare-pairs --input ts.jsonl --query-field summary --document-field story "
               "--bundle bundles/mixer --out data/pairs/ts",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="YAML", help="PairsConfig YAML (repeatable)")
    for flag, _, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="PairsConfig overrides, e.g. test_fraction=0.05")
    p.set_defaults(func=_run)
