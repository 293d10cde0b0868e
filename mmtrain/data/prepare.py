"""`mmtrain prepare`: corpus -> tokenizer -> packed MDS shards, one directory per context length.

One pass over the corpus writes every requested n_ctx at once (:mod:`mmtrain.data.writer`), each
into a temporary sibling renamed into place at the end, so a failed or killed run never leaves a
directory that looks complete.

Tokenizer choice, in order: ``tokenizer`` (a given .model) > ``<out>/tokenizer.model`` when it
exists (so adding a context length to an existing out dir reuses the tokenizer of its siblings;
if it was trained here, ``tokenizer_spec`` must match ``<out>/tokenizer.yaml``) > train one from
the corpus into ``<out>/tokenizer.model``. A ctx dir whose meta.json already records the same
recipe (inputs and their sizes/mtimes, tokenizer hash, packing, split) is kept as is.

``part`` (``--part I/N``) prepares one part of the corpus and ``merge`` (``--merge``) joins the
parts (:mod:`mmtrain.data.parts`). ``out`` may be a URL (``s3://bucket/prefix``, ``file:///path``, ...):
the output is written into a local staging directory with the same checks, then uploaded, the
file that marks completion last (:func:`prepare_remote`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from mmtrain import config as C
from mmtrain import files as F
from mmtrain.data.schema import PrepareConfig, validate_prepare
from mmtrain.data import parts as P
from mmtrain.data import remote as R
from mmtrain.data import shards as S
from mmtrain.data.corpus import Corpus
from mmtrain.data.errors import DataError
from mmtrain.data.progress import add_quiet_argument, progress_bar
from mmtrain.data.remote import delete_remote, upload_output
from mmtrain.data.writer import STAGING_OUT, clean_stale, staging_dir, write_shards
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


_CTX_ENTRIES = {S.META_NAME, S.TOKENIZER_NAME, P.RECORDS_DIR, *S.SPLITS}


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
    if R.is_remote(cfg.out):
        return prepare_remote(cfg, progress=progress)
    start = time.time()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise C.ConfigError([f"out: {out} is a file; give a directory (new or one written by `mmtrain prepare`)"])
    n_ctx_list = sorted(set(int(n) for n in cfg.n_ctx))
    if cfg.merge:
        return merge(out, n_ctx_list, start=start)
    part = P.parse_part(cfg.part) if cfg.part else None
    if part is not None:
        _check_part_tokenizer(cfg, out)
    from mmtrain.data.pairs import heldout_texts

    corpus = Corpus(list(cfg.input), text_field=cfg.text_field, delimiter=cfg.delimiter,
                    max_docs=int(cfg.max_docs), exclude=heldout_texts(list(cfg.exclude_pairs)))
    F.check_writable_into(out, "prepare", ours=_holds_shards, overwrite=bool(cfg.overwrite))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if part is None:
            written, tok, source = _prepare_locked(cfg, corpus, out, n_ctx_list, progress)
        else:
            written, tok, source = _prepare_part_locked(cfg, corpus, out, n_ctx_list, part, progress)
    except BaseException:
        if created:
            _remove_if_only_started(out)
        raise
    if part is not None:
        return _part_summary(out, n_ctx_list, part, written, tok, source, time.time() - start)
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


def _holds_shards(out: Path) -> bool:
    """Whether ``out`` holds output of `mmtrain prepare`: a complete ctx dir or a part of one."""
    return bool(S.existing_ctx(out)) or any(out.glob(f"ctx*/{P.RECORDS_DIR}"))


# ---------------------------------------------------------------------------------------------
# Parts and merge (mmtrain.data.parts)
# ---------------------------------------------------------------------------------------------


def _check_part_tokenizer(cfg: DictConfig, out: Path, shown: Optional[str] = None) -> None:
    """A part needs the tokenizer every part shares: given, or ``<out>/tokenizer.model``
    (``shown``: how to name ``out`` in the error, e.g. its URL)."""
    if cfg.tokenizer or (out / S.TOKENIZER_NAME).is_file():
        return
    shown = shown or str(out)
    raise DataError(
        f"--part {cfg.part}: the parts of a corpus must share one tokenizer, and a part never trains one; "
        f"give --tokenizer FILE (e.g. the shipped {DEMO_TOKENIZER}), or train one into "
        f"{shown}/{S.TOKENIZER_NAME} first with a plain prepare of a sample (`mmtrain prepare --input ... "
        f"--out {shown} --n-ctx N --max-docs 100000`) and run the parts after it")


def _part_lock_target(out: Path, part: P.Part) -> Path:
    """Each part holds its own lock (``.OUT.part-IIIII-of-NNNNN.lock`` beside ``out``), so parts run
    concurrently into one output."""
    return out.with_name(f"{out.name}.{P.part_name(part)}")


def _prepare_part_locked(cfg, corpus, out: Path, n_ctx_list: List[int], part: P.Part, progress: bool):
    """Write part ``part`` of each ctx dir of ``n_ctx_list`` that does not hold it yet: (n_ctx ->
    record of the ones written, the tokenizer, its source)."""
    F.write_marker(out, "prepare")   # first: a part starting beside this one sees the output as ours
    with F.output_lock(_part_lock_target(out, part), "prepare"):
        for n in n_ctx_list:
            P.clean_stale(out, n, part)
        tok, source, _ = resolve_tokenizer(cfg, corpus, out, progress)
        _check_tokenizer_conflicts(out, tok, n_ctx_list)
        recipe = {**_recipe(cfg, corpus), "part": f"{part[0]}/{part[1]}"}
        state = {n: P.part_state(out, n, part, recipe, tok.sha256) for n in n_ctx_list}
        other = [n for n in n_ctx_list if state[n] == "other"]
        if other and not cfg.overwrite:
            raise C.ConfigError([f"out: {S.ctx_dir(out, n)} holds part {part[0]}/{part[1]} or merged shards prepared "
                                 "with another recipe (corpus, packing, split, tokenizer or number of parts); pass "
                                 "--overwrite (overwrite=true) to replace them, or choose another --out"
                                 for n in other])
        for n in other:   # incomplete from here on: the merge rebuilds meta.json
            (S.ctx_dir(out, n) / S.META_NAME).unlink(missing_ok=True)
            P.record_path(out, n, part).unlink(missing_ok=True)
        todo = [n for n in n_ctx_list if state[n] != "done"]
        free_at_start = F.free_bytes(out)
        try:
            written = write_shards(cfg, corpus, tok, todo, out, recipe, progress, part=part) if todo else {}
        except OSError as exc:
            if not F.is_disk_full(exc):
                raise
            raise F.disk_full_error(exc.filename or out, f"writing part {part[0]}/{part[1]}",
                                    free_at_start=free_at_start) from None
    return written, tok, source


def _part_summary(out: Path, n_ctx_list: List[int], part: P.Part, written, tok: Tokenizer, source: str,
                  seconds: float) -> Dict[str, Any]:
    summary: Dict[str, Any] = {
        "out": str(out), "part": f"{part[0]}/{part[1]}",
        "tokenizer": {"path": str(tok.path), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "source": source},
        "ctx": {}, "seconds": round(seconds, 2)}
    corpus_tokens = 0
    for n in n_ctx_list:
        record = written.get(n) or P.read_record(P.record_path(out, n, part)) or S.read_meta(out, n)
        summary["ctx"][n] = {"status": "written" if n in written else "up to date",
                             "dir": str(S.ctx_dir(out, n)), "splits": record["splits"]}
        if n in written:
            corpus_tokens = sum(s["document_tokens"] for s in record["splits"].values())
    summary["corpus_tokens"] = corpus_tokens
    summary["tokens_per_second"] = round(corpus_tokens / seconds) if written and seconds > 0 else 0
    return summary


def merge(out: Path, n_ctx_list: List[int], *, start: Optional[float] = None,
          check_files: bool = True) -> Dict[str, Any]:
    """`mmtrain prepare --merge`: join the complete parts of every ctx dir of ``n_ctx_list``
    (:func:`mmtrain.data.parts.merge_ctx`), then write the root tokenizer. A summary as
    :func:`prepare`'s (status: merged | up to date)."""
    start = time.time() if start is None else start
    if not out.is_dir():
        raise DataError(f"{out}: no such directory; run `mmtrain prepare --part I/N --out {out} ...` for every "
                        "part first, then merge")
    with F.output_lock(out, "prepare"):
        metas, changed = {}, {}
        shas = {}
        for n in n_ctx_list:   # every ctx dir checked before any is written
            shas[n] = P.load_records(out, n)[1][0].get("tokenizer_sha256")
        if len(set(shas.values())) > 1:
            raise DataError(f"{out}: the parts of " + ", ".join(f"n_ctx={n} ({sha[:12]}…)" for n, sha in shas.items())
                            + " were made with different tokenizers; one shard root holds one tokenizer")
        tok = load_tokenizer(S.ctx_dir(out, n_ctx_list[0]) / S.TOKENIZER_NAME)
        _check_tokenizer_conflicts(out, tok, n_ctx_list)
        for n in n_ctx_list:
            metas[n], changed[n] = P.merge_ctx(out, n, check_files=check_files)
        _save_root_tokenizer(out, tok, None)
        F.write_marker(out, "prepare")
    summary: Dict[str, Any] = {
        "out": str(out), "merged": True,
        "tokenizer": {"path": str(out / S.TOKENIZER_NAME), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "source": "parts"},
        "ctx": {n: {"status": "merged" if changed[n] else "up to date", "dir": str(S.ctx_dir(out, n)),
                    "parts": metas[n]["prepare"]["parts"], "splits": metas[n]["splits"]} for n in n_ctx_list},
        "seconds": round(time.time() - start, 2), "corpus_tokens": 0, "tokens_per_second": 0}
    return summary


# ---------------------------------------------------------------------------------------------
# Output to an object store
# ---------------------------------------------------------------------------------------------

def _remote_json(url: str) -> Optional[Dict[str, Any]]:
    text = R.fetch_text(url)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _fetch_remote_tokenizer(url: str, local: Path) -> None:
    """Copy the store's ``tokenizer.model`` (+ tokenizer.yaml) into the staging output, so the run
    reuses it as a local prepare reuses ``<out>/tokenizer.model``."""
    local.mkdir(parents=True, exist_ok=True)
    if R.download(R.child(url, S.TOKENIZER_NAME), local / S.TOKENIZER_NAME):
        if not R.download(R.child(url, "tokenizer.yaml"), local / "tokenizer.yaml"):
            (local / "tokenizer.yaml").unlink(missing_ok=True)


def _check_remote_tokenizer(url: str, root: Path, tok_sha: str) -> None:
    """One shard root holds one tokenizer: a given tokenizer must be the store's ``tokenizer.model``
    when it has one."""
    theirs = root / ".remote-tokenizer.model"
    try:
        if not R.download(R.child(url, S.TOKENIZER_NAME), theirs):
            return
        sha = load_tokenizer(theirs).sha256
    finally:
        theirs.unlink(missing_ok=True)
    if sha != tok_sha:
        raise DataError(f"{R.child(url, S.TOKENIZER_NAME)} has sha256 {sha}, the given tokenizer {tok_sha}. One "
                        "shard root holds one tokenizer: use the store's (leave out --tokenizer), another --out, "
                        "or --overwrite")


def _plain_relpaths(local: Path, n_ctx_list: List[int]) -> List[str]:
    """Upload order of complete ctx dirs: shards, index.json, tokenizers, then each meta.json."""
    rels: List[str] = []
    for n in n_ctx_list:
        for split in S.SPLITS:
            sdir = S.split_dir(local, n, split)
            files = sorted(p for p in sdir.rglob("*") if p.is_file() and p.name != "index.json"
                           and not p.name.startswith("."))
            rels += [p.relative_to(local).as_posix() for p in files]
            rels += sorted(p.relative_to(local).as_posix() for p in sdir.rglob("index.json"))
        rels.append(f"ctx{n}/{S.TOKENIZER_NAME}")
    rels += [name for name in (S.TOKENIZER_NAME, "tokenizer.yaml") if (local / name).is_file()]
    return rels + [f"ctx{n}/{S.META_NAME}" for n in n_ctx_list]


def prepare_remote(cfg: DictConfig, *, progress: bool = True) -> Dict[str, Any]:
    """:func:`prepare` with ``out`` a URL: check the store's meta.json (or part record) first -- the
    same recipe is up to date and nothing is sent, another one needs ``overwrite`` -- then prepare
    into the staging directory (:func:`staging_dir`; a complete staging output is reused, so a run
    killed while uploading is not tokenized again) and upload what the store lacks, meta.json last."""
    start = time.time()
    try:
        url = R.check_url(cfg.out)
    except DataError as exc:
        raise C.ConfigError([f"out: {exc}"]) from None
    n_ctx_list = sorted(set(int(n) for n in cfg.n_ctx))
    root = staging_dir(url)
    local = root / STAGING_OUT
    if cfg.merge:
        return _merge_remote(url, root, local, n_ctx_list, start)
    part = P.parse_part(cfg.part) if cfg.part else None
    if not cfg.tokenizer:
        _fetch_remote_tokenizer(url, local)
    if part is not None:
        _check_part_tokenizer(cfg, local, shown=url)
    try:
        tok_sha = (load_tokenizer(cfg.tokenizer).sha256 if cfg.tokenizer
                   else load_tokenizer(local / S.TOKENIZER_NAME).sha256 if (local / S.TOKENIZER_NAME).is_file()
                   else None)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"tokenizer: {exc}") from None
    if cfg.tokenizer and not cfg.overwrite:
        _check_remote_tokenizer(url, root, tok_sha)
    corpus = Corpus(list(cfg.input), text_field=cfg.text_field, delimiter=cfg.delimiter, max_docs=int(cfg.max_docs))
    recipe = _recipe(cfg, corpus)
    if part is not None:
        recipe["part"] = f"{part[0]}/{part[1]}"
    state: Dict[int, Optional[str]] = {}
    remote_meta: Dict[int, Dict[str, Any]] = {}
    for n in n_ctx_list:
        meta = _remote_json(R.child(url, f"ctx{n}", S.META_NAME))
        if part is not None and meta is not None:
            same = meta.get("prepare") == P.merged_recipe(recipe, part[1])
        elif part is not None:
            meta = _remote_json(R.child(url, P.record_path(Path(), n, part).as_posix()))
            same = meta is not None and meta.get("prepare") == recipe
        else:
            same = meta is not None and meta.get("prepare") == recipe
        if meta is not None:
            same = same and (tok_sha is None or meta.get("tokenizer_sha256") == tok_sha)
            remote_meta[n] = meta
        state[n] = None if meta is None else "same" if same else "other"
    other = [n for n in n_ctx_list if state[n] == "other"]
    if other and not cfg.overwrite:
        what = f"part {part[0]}/{part[1]} or merged shards" if part is not None else "complete shards"
        raise C.ConfigError([f"out: {R.child(url, f'ctx{n}')} holds {what} prepared with another recipe (corpus, "
                             "packing, split, tokenizer or held-out pairs); pass --overwrite (overwrite=true) to "
                             "replace them, or choose another --out" for n in other])
    for n in other:   # the store's dataset reads as incomplete until the new meta.json arrives
        delete_remote(R.child(url, f"ctx{n}", S.META_NAME))
        if part is not None:
            delete_remote(R.child(url, P.record_path(Path(), n, part).as_posix()))
    todo = [n for n in n_ctx_list if state[n] != "same"]
    summary: Dict[str, Any]
    if todo:
        local_cfg = cfg.copy()
        local_cfg.out, local_cfg.n_ctx, local_cfg.overwrite = str(local), todo, True   # the staging dir is ours
        summary = prepare(local_cfg, progress=progress)
        if part is None:
            rels = _plain_relpaths(local, todo)
        else:
            rels = [r for n in todo for r in P.relpaths(local, n, part)]
        who = P.part_name(part) if part is not None else "prepare"
        sent = upload_output(local, rels, url, root / f".uploaded-{who}.json")
    else:
        tok = load_tokenizer(cfg.tokenizer or local / S.TOKENIZER_NAME)
        summary = {"tokenizer": {"path": str(tok.path), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                                 "source": "reused"}, "ctx": {}, "corpus_tokens": 0, "tokens_per_second": 0}
        sent = {"uploaded": 0, "skipped": 0}
    for n in n_ctx_list:
        if state[n] == "same":
            summary["ctx"][n] = {"status": "up to date", "dir": R.child(url, f"ctx{n}"),
                                 "splits": remote_meta[n]["splits"]}
        else:
            summary["ctx"][n]["dir"] = R.child(url, f"ctx{n}")
    summary["ctx"] = {n: summary["ctx"][n] for n in n_ctx_list}
    summary.update(out=url, staging=str(local), uploaded=sent["uploaded"], seconds=round(time.time() - start, 2))
    if part is not None:
        summary["part"] = f"{part[0]}/{part[1]}"
    return summary


def _merge_remote(url: str, root: Path, local: Path, n_ctx_list: List[int], start: float) -> Dict[str, Any]:
    """`--merge` on a store: fetch the part records, the parts' index.json files and the tokenizer into
    the staging dir, merge there, upload the merged index.json files, the tokenizers and meta.json last."""
    from mmtrain.data.remote import list_remote

    for n in n_ctx_list:
        listed = list_remote(url, f"ctx{n}/{P.RECORDS_DIR}/", scratch=root)
        if listed is None:
            raise DataError(f"{R.child(url, f'ctx{n}', P.RECORDS_DIR)}: cannot list the part records in this store; "
                            "merge on a filesystem that holds the parts instead")
        rdir = P.records_dir(local, n)
        if rdir.is_dir():
            shutil.rmtree(rdir)
        for rel in sorted(listed):
            if rel.endswith(".json") and "/." not in rel:
                R.download(R.child(url, rel), local / rel)
        for part in P.find_records(local, n):
            for split in S.SPLITS:
                rel = (P.part_dir(Path(), n, split, part) / "index.json").as_posix()
                if not R.download(R.child(url, rel), local / rel):
                    raise DataError(f"{R.child(url, rel)}: missing, but its part record exists; rerun "
                                    f"`mmtrain prepare --part {part[0]}/{part[1]} ... --overwrite`")
        tok_rel = f"ctx{n}/{S.TOKENIZER_NAME}"
        R.download(R.child(url, tok_rel), local / tok_rel)
    local.mkdir(parents=True, exist_ok=True)
    summary = merge(local, n_ctx_list, start=start, check_files=False)
    todo = []
    for n in n_ctx_list:
        meta = _remote_json(R.child(url, f"ctx{n}", S.META_NAME))
        mine = S.read_meta(local, n)
        if meta is not None and meta.get("prepare") == mine["prepare"] and meta.get("splits") == mine["splits"]:
            summary["ctx"][n]["status"] = "up to date"
        else:
            summary["ctx"][n]["status"] = "merged"
            todo.append(n)
        summary["ctx"][n]["dir"] = R.child(url, f"ctx{n}")
    rels = [r for n in todo for r in P.merged_relpaths(n)]
    if todo:
        rels += [name for name in (S.TOKENIZER_NAME,) if (local / name).is_file()]
        rels += [f"ctx{n}/{S.META_NAME}" for n in todo]
    sent = upload_output(local, rels, url, root / ".uploaded-merge.json") if rels else {"uploaded": 0}
    summary.update(out=url, staging=str(local), uploaded=sent["uploaded"], seconds=round(time.time() - start, 2))
    return summary


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
    if summary.get("part"):
        what = f"part {summary['part']} (merge all parts with `mmtrain prepare --merge --out {summary['out']}`)"
    elif summary.get("merged"):
        what = "merged parts"
    else:
        what = "shards"
    lines.append(f"{what} in {summary['out']}; {summary['seconds']:.1f} s{rate}")
    if "uploaded" in summary:
        lines.append(f"uploaded {summary['uploaded']} file{'s' if summary['uploaded'] != 1 else ''} "
                     f"(staging directory {summary['staging']})")
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
    ("--out", "out", dict(metavar="DIR|URL", help="output root (default: data/demo), or a store URL "
                                                   "(s3://bucket/prefix, gs://..., file:///path): written into a "
                                                   "local staging directory, then uploaded, meta.json last")),
    ("--part", "part", dict(metavar="I/N", help="prepare only part I (0-based) of N of the corpus, e.g. "
                                                "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; needs --tokenizer "
                                                "or <out>/tokenizer.model. Join the parts with --merge")),
    ("--merge", "merge", dict(action="store_true", help="join the complete parts in --out (for each --n-ctx) "
                                                       "into one dataset: index.json per split, meta.json last")),
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
               "  mmtrain prepare --config configs/prepare/demo.yaml packing=pad\n"
               "  mmtrain prepare --input big/*.jsonl --out data/big --n-ctx 512 --tokenizer tok.model --part 0/8\n"
               "  mmtrain prepare --out data/big --n-ctx 512 --merge\n"
               "  mmtrain prepare --input demo --out s3://bucket/demo --n-ctx 128 512",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="YAML", help="PrepareConfig YAML (repeatable)")
    for flag, _, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    add_quiet_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="PrepareConfig overrides, e.g. val_fraction=0.01")
    p.set_defaults(func=_run)
