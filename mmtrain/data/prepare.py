"""`mmtrain prepare`: corpus -> tokenizer -> packed MDS shards, one directory per context length.

One pass over the corpus writes every requested n_ctx at once (:mod:`mmtrain.data.writer`), each
into a temporary sibling renamed into place at the end, so a failed or killed run never leaves a
directory that looks complete.

Tokenizer choice, in order: ``tokenizer`` (a given .model) > ``<out>/tokenizer.model`` when it
exists (so adding a context length to an existing out dir reuses the tokenizer of its siblings;
if it was trained here, ``tokenizer_spec`` must match ``<out>/tokenizer.yaml``) > train one from
the corpus into ``<out>/tokenizer.model``. A ctx dir whose meta.json already records the same
recipe (inputs and their sizes/mtimes, tokenizer hash, packing, split) is kept as is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from mmtrain import config as C
from mmtrain import files as F
from mmtrain.data.schema import PrepareConfig, validate_prepare
from mmtrain.data import shards as S
from mmtrain.data.corpus import Corpus
from mmtrain.data.errors import DataError
from mmtrain.data.progress import add_quiet_argument, progress_bar
from mmtrain.data.writer import clean_stale, write_shards
from mmtrain.data.tokenizer import (DEMO_TOKENIZER, TRAIN_MAX_CHARS, Tokenizer, load_tokenizer,
                               train_tokenizer)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _counting(docs, counter: Dict[str, int], bar):
    for doc in docs:
        counter["documents"] += 1
        counter["characters"] += len(doc)
        bar.update(1)
        yield doc


def _train(cfg: DictConfig, corpus: Corpus, progress: bool) -> Tuple[Tokenizer, Dict[str, Any]]:
    """Train on the corpus; returns the tokenizer and the record written to <out>/tokenizer.yaml."""
    spec = OmegaConf.to_container(cfg.tokenizer_spec)
    counter = {"documents": 0, "characters": 0}
    with progress_bar(progress, desc="training tokenizer", unit=" docs") as bar:
        try:
            tok = train_tokenizer(_counting(corpus, counter, bar), spec)
        except ValueError as exc:
            if counter["documents"] == 0:
                raise DataError(f"the corpus is empty: no non-empty documents in {corpus.describe()}") from None
            raise DataError(f"cannot train the tokenizer on {corpus.describe()}: {exc}") from None
    record = {"input": list(corpus.inputs), "text_field": corpus.text_field,
              "delimiter": corpus.delimiter, "max_docs": corpus.max_docs,
              "max_chars": TRAIN_MAX_CHARS, "spec": spec,
              "trained_on": {"documents": counter["documents"], "characters": counter["characters"]},
              "model_sha256": tok.sha256}
    return tok, record


def _save_root_tokenizer(out: Path, tok: Tokenizer, record: Optional[Dict[str, Any]]) -> None:
    """Write <out>/tokenizer.model (+ tokenizer.yaml when trained here) unless already there."""
    root_model = out / S.TOKENIZER_NAME
    if root_model.exists() and load_tokenizer(root_model).sha256 == tok.sha256:
        return
    tok.save(root_model)
    record_path = out / "tokenizer.yaml"
    if record is None:
        record_path.unlink(missing_ok=True)  # it described a model that is gone
        return
    tmp = out / ".tokenizer.yaml.tmp"
    tmp.write_text("# How tokenizer.model was trained (mmtrain.data.tokenizer.train_from_spec_file reads it).\n"
                   + yaml.safe_dump(record, sort_keys=False))
    os.replace(tmp, record_path)


def resolve_tokenizer(cfg: DictConfig, corpus: Corpus, out: Path,
                      progress: bool = True) -> Tuple[Tokenizer, str, Optional[Dict[str, Any]]]:
    """Pick (load, reuse or train) the tokenizer: returns it, how (given|reused|trained), training record."""
    root_model = out / S.TOKENIZER_NAME
    if cfg.tokenizer:
        try:
            tok = load_tokenizer(cfg.tokenizer)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"tokenizer: {exc}") from None
        return tok, "given", None
    if root_model.exists():
        tok = load_tokenizer(root_model)
        record_path = out / "tokenizer.yaml"
        if record_path.exists():
            recorded = (yaml.safe_load(record_path.read_text()) or {}).get("spec")
            wanted = OmegaConf.to_container(cfg.tokenizer_spec)
            if recorded is not None and recorded != wanted:
                raise DataError(
                    f"{root_model} was trained with tokenizer_spec {recorded} ({record_path}), but "
                    f"this run asks for {wanted}. Use another --out, delete {root_model}, or drop the "
                    "changed tokenizer_spec / --vocab-size.")
        return tok, "reused", None
    tok, record = _train(cfg, corpus, progress)
    return tok, "trained", record


def _check_tokenizer_conflicts(out: Path, tok: Tokenizer, n_ctx_list: List[int]) -> None:
    """Refuse to make ``<out>`` mix tokenizers: ctx dirs that stay must match the new one."""
    for n in S.existing_ctx(out):
        if n in n_ctx_list:
            continue  # will be rewritten with this tokenizer
        try:
            meta = S.read_meta(out, n)
        except DataError:
            continue
        if meta.get("tokenizer_sha256") != tok.sha256:
            raise DataError(
                f"{S.ctx_dir(out, n)} was made with tokenizer sha256 {meta.get('tokenizer_sha256')}, "
                f"this run uses {tok.sha256} ({tok.path}). One shard root holds one tokenizer: "
                f"use another --out, or include {n} in --n-ctx to rewrite it too.")


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------


def _recipe(cfg: DictConfig, corpus: Corpus) -> Dict[str, Any]:
    return {"input": list(corpus.inputs), "text_field": cfg.text_field, "delimiter": cfg.delimiter,
            "max_docs": int(cfg.max_docs), "packing": cfg.packing,
            "val_fraction": float(cfg.val_fraction), "seed": int(cfg.seed),
            "input_fingerprint": corpus.fingerprint(), **_exclude_recipe(cfg)}


def _exclude_recipe(cfg: DictConfig) -> Dict[str, Any]:
    """The held-out pair sets kept out, by path and content (absent when none, as before)."""
    from mmtrain.data.pairs import heldout_fingerprint

    pairs = list(cfg.exclude_pairs)
    return {"exclude_pairs": heldout_fingerprint(pairs)} if pairs else {}


def _existing_recipe(out: Path, n_ctx: int, tok: Tokenizer) -> Optional[Dict[str, Any]]:
    """The recipe of complete shards for ``n_ctx`` made with ``tok`` in ``out``, else None."""
    try:
        return S.check_shards(out, n_ctx, tokenizer_hash=tok.sha256).get("prepare", {})
    except DataError:
        return None


_CTX_ENTRIES = {S.META_NAME, S.TOKENIZER_NAME, *S.SPLITS}


def _write(cfg: DictConfig, corpus: Corpus, tok: Tokenizer, todo: List[int], out: Path,
           recipe: Dict[str, Any], record: Optional[Dict[str, Any]], progress: bool) -> Dict[int, Dict[str, Any]]:
    """Write the ctx dirs of ``todo``, then the root tokenizer and the marker; a full disk is an
    OutputError naming the path and the space, with every existing ctx dir as it was."""
    free_at_start = F.free_bytes(out)
    written: Dict[int, Dict[str, Any]] = {}
    try:
        written = write_shards(cfg, corpus, tok, todo, out, recipe, progress) if todo else {}
        # after the shards: a failed run leaves <out>/tokenizer.model matching the ctx dirs that exist
        _save_root_tokenizer(out, tok, record)
        F.write_marker(out, "prepare")
    except OSError as exc:
        if not F.is_disk_full(exc):
            raise
        # the ctx dirs are published together at the end of write_shards: none or all are new
        raise F.disk_full_error(exc.filename or out, "writing the shards", free_at_start=free_at_start,
                                kept=None if written else out) from None
    return written


def prepare(cfg: DictConfig, *, progress: bool = True) -> Dict[str, Any]:
    """Run the whole preparation for a :class:`mmtrain.config.PrepareConfig`; returns a summary.

    ``progress``: bars for tokenizer training, tokenizing + packing and writing the shards (drawn
    only on a terminal, by rank 0: :mod:`mmtrain.data.progress`).

    Summary: ``out``, ``tokenizer`` (path, sha256, vocab_size, source: given|reused|trained),
    ``ctx`` ({n_ctx: {status: written|up to date, dir, splits: {train|val: counts}}}), ``seconds``,
    ``tokens_per_second`` (corpus tokens tokenized+written per second, 0 when nothing was written).
    """
    problems = validate_prepare(cfg)
    if problems:
        raise C.ConfigError(problems)
    start = time.time()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise C.ConfigError([f"out: {out} is a file; give a directory (new or one written by `mmtrain prepare`)"])
    from mmtrain.data.pairs import heldout_texts

    corpus = Corpus(list(cfg.input), text_field=cfg.text_field, delimiter=cfg.delimiter,
                    max_docs=int(cfg.max_docs), exclude=heldout_texts(list(cfg.exclude_pairs)))
    n_ctx_list = sorted(set(int(n) for n in cfg.n_ctx))
    F.check_writable_into(out, "prepare", ours=lambda d: bool(S.existing_ctx(d)), overwrite=bool(cfg.overwrite))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        written, tok, source = _prepare_locked(cfg, corpus, out, n_ctx_list, progress)
    except BaseException:
        if created:
            _remove_if_only_started(out)
        raise
    root_model = out / S.TOKENIZER_NAME
    seconds = time.time() - start
    summary: Dict[str, Any] = {
        "out": str(out),
        "tokenizer": {"path": str(root_model), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "source": source},
        "ctx": {},
        "seconds": round(seconds, 2),
    }
    corpus_tokens = 0
    for n in n_ctx_list:
        meta = written.get(n) or S.read_meta(out, n)
        summary["ctx"][n] = {"status": "written" if n in written else "up to date",
                             "dir": str(S.ctx_dir(out, n)), "splits": meta["splits"]}
        if n in written:
            corpus_tokens = sum(s["document_tokens"] for s in meta["splits"].values())
    summary["corpus_tokens"] = corpus_tokens
    summary["tokens_per_second"] = round(corpus_tokens / seconds) if written else 0
    return summary


def _prepare_locked(cfg, corpus, out: Path, n_ctx_list: List[int], progress: bool):
    """The locked part of :func:`prepare`: (the ctx dirs written (n_ctx -> meta), the tokenizer, its source)."""
    with F.output_lock(out, "prepare"):
        clean_stale(out)
        tok, source, record = resolve_tokenizer(cfg, corpus, out, progress)
        _check_tokenizer_conflicts(out, tok, n_ctx_list)
        recipe = _recipe(cfg, corpus)
        existing = {n: _existing_recipe(out, n, tok) for n in n_ctx_list}
        todo = [n for n in n_ctx_list if existing[n] != recipe]
        other = [n for n in todo if existing[n] is not None]
        if other and not cfg.overwrite:
            raise C.ConfigError([f"out: {S.ctx_dir(out, n)} holds complete shards prepared with another recipe "
                                 "(corpus, packing, split or held-out pairs); pass --overwrite (overwrite=true) to "
                                 "replace them, or choose another --out" for n in other])
        for n in todo:   # a ctx dir is replaced only when it holds nothing but shards
            F.check_replaceable(S.ctx_dir(out, n), "prepare", own=_CTX_ENTRIES.__contains__,
                                ours=lambda d: (d / S.META_NAME).is_file(), overwrite=True, what="out:")
        written = _write(cfg, corpus, tok, todo, out, recipe, record, progress)
    return written, tok, source


def _remove_if_only_started(out: Path) -> None:
    """After a failed prepare into a directory it created: remove it when it holds nothing but what
    this run began to write (the tokenizer, the marker), so a failure leaves no empty output behind."""
    started = {S.TOKENIZER_NAME, "tokenizer.yaml", F.MARKER}
    try:
        names = [p.name for p in out.iterdir()]
        if set(names) <= started:
            for name in names:
                (out / name).unlink()
            out.rmdir()
    except OSError:
        pass


def format_summary(summary: Dict[str, Any]) -> str:
    """The end-of-run table: documents, tokens, samples and bytes per n_ctx and split."""
    rows = [("n_ctx", "split", "documents", "tokens", "samples", "bytes", "status")]
    for n, info in summary["ctx"].items():
        for split, s in info["splits"].items():
            rows.append((str(n), split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['samples']:,}",
                         F.human_bytes(s["bytes"]), info["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (1, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = summary["tokenizer"]
    lines.append(f"tokenizer: {t['path']} ({t['source']}, vocab {t['vocab_size']}, sha256 {t['sha256'][:16]}...)")
    rate = f", {summary['tokens_per_second']:,} tokens/s" if summary["tokens_per_second"] else ""
    lines.append(f"shards in {summary['out']}; {summary['seconds']:.1f} s{rate}")
    return "\n".join(lines)


def demo_prepare_config(out: str, n_ctx: List[int], tokenizer: str = str(DEMO_TOKENIZER),
                        **overrides: Any) -> DictConfig:
    """A PrepareConfig for the demo corpus (what the trainer's auto_prepare uses)."""
    items = [f"out={json.dumps(str(out))}", f"n_ctx={json.dumps([int(n) for n in n_ctx])}",
             f"tokenizer={json.dumps(str(tokenizer))}"]
    items += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return C.load_config(PrepareConfig, [], items)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

_FLAGS = [  # (flag, config key, argparse kwargs)
    ("--overwrite", "overwrite", dict(action="store_true",
                                      help="replace ctx<N> directories prepared from another corpus or recipe, or "
                                           "write into a non-empty --out that holds no shards")),
    ("--input", "input", dict(nargs="+", metavar="PATH",
                              help="corpus files, directories or globs (.txt .jsonl .jsonl.gz .json .parquet); "
                                   "`demo` = built-in Python-docstring corpus")),
    ("--text-field", "text_field", dict(metavar="KEY", help="JSON key / Parquet column with the text (default: text)")),
    ("--delimiter", "delimiter", dict(metavar="STR", help="plain text: document separator, e.g. '<|endoftext|>' "
                                                          "or '\\n\\n' (\\n and \\t are understood; default: "
                                                          "one document per file)")),
    ("--out", "out", dict(metavar="DIR", help="output root (default: data/demo)")),
    ("--n-ctx", "n_ctx", dict(nargs="+", metavar="N", help="context lengths (default: 128 512)")),
    ("--tokenizer", "tokenizer", dict(metavar="MODEL", help="use this SentencePiece .model instead of training one")),
    ("--vocab-size", "tokenizer_spec.vocab_size", dict(type=int, metavar="V", help="train a tokenizer of V pieces (default: 4096)")),
    ("--tokenizer-type", "tokenizer_spec.type", dict(choices=["bpe", "unigram"], help="trained tokenizer type (default: bpe)")),
    ("--packing", "packing", dict(choices=["concat", "pad"], help="concat (default) or pad")),
    ("--val-fraction", "val_fraction", dict(type=float, metavar="F", help="held-out document fraction (default: 0.05)")),
    ("--seed", "seed", dict(type=int, help="train/validation split seed (default: 0)")),
    ("--num-proc", "num_proc", dict(type=int, metavar="P", help="tokenizer processes (default: 2)")),
    ("--max-docs", "max_docs", dict(type=int, metavar="N", help="use only the first N documents (default: all)")),
]


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def _take_overrides(values: Optional[List[str]], into: List[str]) -> Optional[List[str]]:
    """Multi-value flags swallow trailing ``key=value`` words (``--n-ctx 128 packing=pad``): give them back."""
    if values is None:
        return None
    kept = [v for v in values if not _OVERRIDE.match(v)]
    into.extend(v for v in values if _OVERRIDE.match(v))
    return kept


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on a command line become the characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """YAML files <- flags <- key=value overrides, validated by mmtrain.config."""
    problems: List[str] = []
    if args.tokenizer is not None and args.vocab_size is not None:
        problems.append("--tokenizer and --vocab-size exclude each other (a given tokenizer is "
                        "used as is; --vocab-size trains a new one)")
    trailing: List[str] = []
    args.input = _take_overrides(args.input, trailing)
    args.n_ctx = _take_overrides(args.n_ctx, trailing)
    if args.n_ctx is not None:
        bad = [v for v in args.n_ctx if not v.isdigit()]
        if bad:
            problems.append(f"--n-ctx: expected whole numbers, got {', '.join(bad)}")
        args.n_ctx = [int(v) for v in args.n_ctx if v.isdigit()]
    if problems:
        raise C.ConfigError(problems)
    if args.delimiter is not None:
        args.delimiter = _unescape(args.delimiter)
    overrides = []
    for flag, key, _ in _FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: paths stay strings
    return C.load_config(PrepareConfig, args.config or [], overrides + trailing + list(args.overrides))


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        summary = prepare(cfg, progress=not args.quiet)
    except DataError as exc:
        print(f"mmtrain prepare: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus and write MDS shards per context length",
        description="Read a corpus, train or reuse a SentencePiece tokenizer, pack the tokens into "
                    "fixed blocks and write <out>/ctx<N>/{train,val} MDS shards plus meta.json.",
        epilog="examples:\n  mmtrain prepare --input demo --out data/demo --n-ctx 128 512\n"
               "  mmtrain prepare --input data/tinystories/*.jsonl --out data/ts --n-ctx 512 --vocab-size 8192\n"
               "  mmtrain prepare --config configs/prepare/demo.yaml packing=pad",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="YAML", help="PrepareConfig YAML (repeatable)")
    for flag, _, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    add_quiet_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="PrepareConfig overrides, e.g. val_fraction=0.01")
    p.set_defaults(func=_run)
