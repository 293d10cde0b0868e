"""Retrieval pair shards at a URL (`mmtrain prepare-pairs --out URL`): copied whole into the node's
cache, since retrieval training and evaluation read the held-out splits whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mmtrain.data import pairs as P
from mmtrain.data import remote as R
from mmtrain.data import shards as S
from mmtrain.data.errors import DataError
from mmtrain.data.sources import _drop, _same_file, _write_text, local_leader


def mirror_pairs(url: str, cache_dir: str = "", *, retries: int = R.DEFAULT_RETRIES,
                 timeout: float = R.DEFAULT_TIMEOUT) -> Path:
    """A local copy of the pair shards at ``url`` (`mmtrain prepare-pairs --out URL`), for
    retrieval training and evaluation, which read the held-out splits whole: every file is
    downloaded (each shard checked against the size and sha1 its index records) into
    ``cache_dir`` (default: under ``~/.cache/mmtrain/pairs``). Files already there and intact
    are kept; a dataset prepared again at the URL replaces the copy. Returns the directory."""
    url = R.check_url(url)
    cache = R.claim_cache(Path(cache_dir).expanduser() if cache_dir else R.default_cache_dir(url, "pairs"), url)
    with R.cache_lock(cache):
        _mirror_pairs(url, cache, retries, timeout)
    return cache


def _mirror_pairs(url: str, cache: Path, retries: int, timeout: float) -> None:
    meta_text = R.fetch_text(R.child(url, P.META_NAME), retries=retries, timeout=timeout)
    if meta_text is None:
        raise DataError(f"{R.child(url, P.META_NAME)}: missing (no pair shards there, or an upload that did not "
                        f"finish). Create them with:\n  mmtrain prepare-pairs ... --out {url}")
    if not _same_file(cache / P.META_NAME, meta_text):
        for entry in cache.iterdir():
            if entry.name not in (R.CACHE_MARKER, ".mmtrain-cache.lock"):
                _drop(entry)
    try:
        meta = json.loads(meta_text)
    except ValueError as exc:
        raise DataError(f"{R.child(url, P.META_NAME)}: not valid JSON ({exc})") from None
    for name in (P.TOKENIZER_NAME, P.HELDOUT_NAME):
        if not (cache / name).is_file() and not R.download(R.child(url, name), cache / name, retries=retries,
                                                          timeout=timeout) and name == P.TOKENIZER_NAME:
            raise DataError(f"{R.child(url, name)}: missing; re-run `mmtrain prepare-pairs ... --out {url}`")
    for split in meta.get("splits", {}):
        sdir = cache / split
        index_url = R.child(url, split, "index.json")
        text = R.fetch_text(index_url, retries=retries, timeout=timeout)
        if text is None:
            raise DataError(f"{index_url}: missing (the pair shards at {url} are incomplete)")
        if not _same_file(sdir / "index.json", text):
            _drop(sdir)
            _write_text(sdir / "index.json", text)
        for info in S.read_index(sdir)["shards"]:
            raw = info.get("raw_data") or {}
            name = str(raw.get("basename", "?"))
            if (sdir / name).is_file():
                try:
                    S.check_shard_file(sdir, info, verify_hashes=True, remedy="`mmtrain prepare-pairs`")
                    continue
                except DataError:
                    (sdir / name).unlink()
            R.download(R.child(url, split, name), sdir / name, retries=retries, timeout=timeout,
                       expect=(raw.get("bytes"), (raw.get("hashes") or {}).get(S.SHARD_HASH)),
                       what=f" (shard of {url})")
    _write_text(cache / P.META_NAME, meta_text)


def local_pairs(location: str, cache_dir: str = "", *, retries: int = R.DEFAULT_RETRIES,
                timeout: float = R.DEFAULT_TIMEOUT, fetch: Optional[bool] = None) -> str:
    """Where the pair shards of ``location`` (a directory or URL) are read from: the directory
    itself, or the mirror of the URL (filled when ``fetch``, by default on each node's local rank 0)."""
    if not R.is_remote(location):
        return str(location)
    if local_leader() if fetch is None else fetch:
        return str(mirror_pairs(location, cache_dir, retries=retries, timeout=timeout))
    url = R.check_url(location)
    return str(Path(cache_dir).expanduser() if cache_dir else R.default_cache_dir(url, "pairs"))
