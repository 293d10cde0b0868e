"""Where a run's shards come from: one directory or URL (``data.shard_dir``) or a mixture
(``data.streams``), each resolved to a :class:`Source`, made ready and checked before any work.

A local source is read in place. A remote one (a URL, :mod:`mmtrain.data.remote`) is read
through a per-node cache directory: before the run, each node's local rank 0 downloads the small
files (``ctx<N>/meta.json``, ``tokenizer.model``, each split's ``index.json``) and checks them
exactly as local shards are checked; the shards themselves arrive during training, each checked
against the size and sha1 its index records before it takes its final name in the cache
(:class:`CachedStream`). A cache left by an earlier run is reused: a shard file already there is
kept when its size matches (and, with ``data.verify_shards``, its sha1), deleted otherwise; when
the dataset at the URL was prepared again (another ``meta.json`` or ``index.json``), the cached
copies of it are dropped first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmtrain.data import remote as R
from mmtrain.data import shards as S
from mmtrain.data.errors import DataError
from mmtrain.files import sha256_file
from mmtrain.data.streaming_compat import Stream


@dataclass
class Source:
    """One dataset of a run: ``location`` as configured, ``local`` where its files are read."""

    name: str
    location: str
    local: Path
    url: Optional[str] = None          # the remote, when location is a URL
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None

    @property
    def remote(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        return f"{self.url} (cache {self.local})" if self.remote else str(self.location)

    def weights(self) -> Dict[str, Any]:
        return {k: v for k, v in (("proportion", self.proportion), ("repeat", self.repeat),
                                  ("choose", self.choose)) if v}


def source(location: str, cache_dir: str = "", name: str = "", **weights: Any) -> Source:
    """A Source for a directory or URL; the cache of a URL is ``cache_dir`` or its default."""
    location = str(location)
    clean = {k: v for k, v in weights.items() if v}
    if R.is_remote(location):
        url = R.check_url(location)
        cache = Path(cache_dir).expanduser() if cache_dir else R.default_cache_dir(url)
        return Source(name=name, location=location, local=cache, url=url, **clean)
    return Source(name=name, location=location, local=Path(location), **clean)


def sources_of(data) -> List[Source]:
    """The sources of a ``data`` config section: its streams, else its shard_dir."""
    if len(data.streams):
        return [source(s.shard_dir, s.cache_dir, s.name or f"stream{i}", proportion=s.proportion, repeat=s.repeat,
                       choose=s.choose) for i, s in enumerate(data.streams)]
    return [source(data.shard_dir, data.cache_dir, "")]


# ---- the cache of a remote source -------------------------------------------------------------


def _same_file(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except OSError:
        return False


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _drop(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sync(src: Source, n_ctx: int, splits: Sequence[str] = S.SPLITS, *, retries: int = R.DEFAULT_RETRIES,
         timeout: float = R.DEFAULT_TIMEOUT, verify: bool = True) -> Dict[str, int]:
    """Bring the cache of a remote source up to date for ``n_ctx`` (run by one process per node):
    meta.json, tokenizer.model and the index of each split from the store; cached shard files
    checked (size, and sha1 with ``verify``), stale or damaged ones deleted. Returns counts
    ``{"cached": shard files kept, "dropped": deleted, "missing": still to download}``."""
    assert src.url is not None
    R.claim_cache(src.local, src.url)
    with R.cache_lock(src.local):
        return _sync(src, n_ctx, splits, retries, timeout, verify)


def _sync(src: Source, n_ctx: int, splits: Sequence[str], retries: int, timeout: float,
          verify: bool) -> Dict[str, int]:
    assert src.url is not None
    cdir_url = R.child(src.url, f"ctx{int(n_ctx)}")
    cdir = S.ctx_dir(src.local, n_ctx)
    meta_text = R.fetch_text(R.child(cdir_url, S.META_NAME), retries=retries, timeout=timeout)
    if meta_text is None:
        raise DataError(f"no shards for n_ctx={n_ctx} at {cdir_url}: {S.META_NAME} is missing (not prepared, or an "
                        f"upload that did not finish). Create them with:\n  mmtrain prepare --out {src.url} "
                        f"--n-ctx {n_ctx} ...")
    meta_path = cdir / S.META_NAME
    if not _same_file(meta_path, meta_text):
        _drop(cdir)          # prepared again: nothing cached from the old version is reused
        _write_text(meta_path, meta_text)
    tok_path = cdir / S.TOKENIZER_NAME
    try:
        meta = json.loads(meta_text)
        want_tok = meta.get("tokenizer_sha256")
    except ValueError:
        want_tok = None      # read_meta reports the bad JSON
    if not tok_path.is_file() or (want_tok and sha256_file(tok_path)[1] != want_tok):
        if not R.download(R.child(cdir_url, S.TOKENIZER_NAME), tok_path, retries=retries, timeout=timeout):
            raise DataError(f"{R.child(cdir_url, S.TOKENIZER_NAME)}: missing (every ctx directory holds the "
                            "tokenizer its shards were made with); re-run `mmtrain prepare --out ...`")
    counts = {"cached": 0, "dropped": 0, "missing": 0}
    for split in splits:
        sdir = S.split_dir(src.local, n_ctx, split)
        index_url = R.child(cdir_url, split, "index.json")
        text = R.fetch_text(index_url, retries=retries, timeout=timeout)
        if text is None:
            raise DataError(f"{index_url}: missing (the dataset at {src.url} is incomplete); re-run "
                            f"`mmtrain prepare --out {src.url} ...`")
        if not _same_file(sdir / "index.json", text):
            _drop(sdir)
            _write_text(sdir / "index.json", text)
        for info in S.read_index(sdir)["shards"]:
            raw = info.get("raw_data") or {}
            path = sdir / str(raw.get("basename", "?"))
            if not path.is_file():
                counts["missing"] += 1
                continue
            try:
                S.check_shard_file(sdir, info, verify_hashes=verify)
                counts["cached"] += 1
            except DataError:
                path.unlink()                  # downloaded again when needed
                counts["dropped"] += 1
                counts["missing"] += 1
        for leftover in sdir.rglob(".*.dl*"):   # downloads a killed run left half-done
            leftover.unlink(missing_ok=True)
    return counts


def local_leader() -> bool:
    """Whether this process prepares the node's cache (LOCAL_RANK 0, or a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0) or 0) == 0


# ---- the stream ------------------------------------------------------------------------------


class CachedStream(Stream):
    """A streaming ``Stream`` that downloads with :func:`mmtrain.data.remote.download`: bounded
    retries with backoff, the size and sha1 of each shard checked before the file takes its final
    name, a :class:`DataError` naming the shard's URL on failure (kept in ``failure`` so the
    dataset can raise it from the thread that downloads)."""

    def __init__(self, *, url: Optional[str], retries: int, timeout: float, **kwargs: Any):
        super().__init__(remote=R.streaming_remote(url) if url else None, download_retry=0,
                         download_timeout=timeout, **kwargs)
        self.url, self.retries, self.timeout = url, retries, timeout
        self.failure: Optional[DataError] = None
        self.expected: Dict[str, Tuple[Optional[int], Optional[str]]] = {}
        index = os.path.join(self.local, self.split, "index.json")
        if url and os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                for info in json.load(fh).get("shards", []):
                    raw = info.get("raw_data") or {}
                    self.expected[raw.get("basename")] = (raw.get("bytes"), (raw.get("hashes") or {}).get(S.SHARD_HASH))

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if self.url is None:
            return super()._download_file(from_basename, to_basename)
        if os.path.exists(local):
            return local
        url = R.child(self.url, from_basename)
        try:
            found = R.download(url, local, retries=self.retries, timeout=self.timeout,
                               expect=self.expected.get(from_basename), what=f" (shard of {self.url})")
        except DataError as exc:
            self.failure = exc
            raise
        if not found:
            self.failure = DataError(f"{url}: listed in its index.json but not in the store; re-run "
                                     "`mmtrain prepare --out ...` to rewrite the dataset")
            raise self.failure
        return local


def _label(src: Source, many: bool) -> str:
    return f"stream {src.name!r} ({src.location}): " if many else ""


def fetch_sources(srcs: Sequence[Source], n_ctx: int, splits: Sequence[str] = S.SPLITS, *,
                  retries: int = R.DEFAULT_RETRIES, timeout: float = R.DEFAULT_TIMEOUT, verify: bool = False) -> None:
    """Bring the cache of every remote source up to date (:func:`sync`); an error names its stream."""
    many = len(srcs) > 1
    for src in srcs:
        if src.remote:
            try:
                sync(src, n_ctx, splits, retries=retries, timeout=timeout, verify=verify)
            except DataError as exc:
                raise DataError(f"{_label(src, many)}{exc}") from None


def check_sources(srcs: Sequence[Source], n_ctx: int, *, tokenizer_hash: Optional[str] = None,
                  vocab_size: Optional[int] = None, splits: Sequence[str] = S.SPLITS, verify: bool = False,
                  retries: int = R.DEFAULT_RETRIES, timeout: float = R.DEFAULT_TIMEOUT,
                  fetch: Optional[bool] = None) -> Dict[str, Any]:
    """Make every source ready and check it (:func:`mmtrain.data.shards.check_shards`); every source
    must share the first one's tokenizer, vocabulary and packing. Returns the first one's meta.

    ``fetch``: whether this process first updates the caches of remote sources (:func:`fetch_sources`;
    default: when it is its node's local rank 0); in a distributed run the local rank 0 fetches
    while the others wait, then every rank checks (:func:`mmtrain.train.lm.ensure_shards`).
    """
    many = len(srcs) > 1
    if local_leader() if fetch is None else fetch:
        fetch_sources(srcs, n_ctx, splits, retries=retries, timeout=timeout, verify=verify)
    metas = []
    for src in srcs:
        try:
            metas.append(S.check_shards(src.local, n_ctx, tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
                                        splits=splits, verify_hashes=verify and not src.remote,
                                        present_only=src.remote))
        except DataError as exc:
            raise DataError(f"{_label(src, many)}{exc}") from None
    first = metas[0]
    for src, meta in zip(srcs[1:], metas[1:]):
        for key in ("tokenizer_sha256", "vocab_size", "packing", "token_dtype"):
            if meta.get(key) != first.get(key):
                raise DataError(f"{_label(src, True)}{key} {meta.get(key)!r}, but stream {srcs[0].name!r} "
                                f"({srcs[0].location}) has {first.get(key)!r}: every stream of a mixture must be "
                                "prepared with the same tokenizer and packing (`mmtrain prepare --tokenizer ...`)")
    return first


def wrapped_worker_error(exc: DataError) -> DataError:
    """A DataError raised in a data-loader worker arrives wrapped with the worker's traceback;
    the original message alone."""
    text = str(exc)
    if not text.startswith("Caught DataError"):
        return exc
    marker = "\nmmtrain.data.errors.DataError: "
    return DataError(text[text.find(marker) + len(marker):].strip()) if marker in text else exc
