"""Shards in object storage: locations, the per-node cache, verified downloads and uploads.

A data location is a local path (read in place, as always) or a URL of a store mosaicml-streaming
reads: ``s3://``, ``gs://``, ``oci://``, ``hf://``, ``azure://``, ``azure-dl://``, ``dbfs:/``, ``sftp://``,
or ``file:///path`` (a directory, e.g. an NFS mount, copied into the cache like a bucket). The
layout under a URL is the local one (``ctx<N>/{train,val}``, ``meta.json``, ``tokenizer.model``).

Credentials come only from each store's own standard sources (boto3's chain and
``S3_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``OCI_CONFIG_FILE``, ...), read by the
store's client; mmtrain never reads, records or prints them. URLs carrying credentials
(``s3://KEY:SECRET@bucket``) are refused.

Every download goes to a temporary sibling, is checked against the size and sha1 its
``index.json`` records (shards), and only then takes its final name: a file under its final name
in the cache is complete and was verified. A store that does not answer is retried
``retries`` times with exponential backoff (1, 2, 4, ... s, at most 30 s), then a
:class:`~mmtrain.data.errors.DataError` names the object's URL and the last error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

from mmtrain.data.errors import DataError
from mmtrain.data.shards import file_digest, write_json_atomic

#: URL schemes read as remote data (what streaming's downloaders support, plus file://).
SCHEMES = ("s3", "gs", "oci", "hf", "azure", "azure-dl", "dbfs", "sftp", "file")
#: Written into every cache directory mmtrain creates; a directory without it is never cleared.
CACHE_MARKER = ".mmtrain-cache.json"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 60.0
MAX_BACKOFF = 30.0

PathLike = Union[str, Path]


def is_remote(location: Any) -> bool:
    """True for a URL of an object store (or file://), False for a local path."""
    scheme = urllib.parse.urlparse(str(location)).scheme
    return scheme in SCHEMES


def check_url(url: str) -> str:
    """The URL without a trailing slash; DataError for an unknown scheme, a missing bucket or
    credentials inside the URL."""
    parsed = urllib.parse.urlparse(str(url))
    if parsed.scheme not in SCHEMES:
        raise DataError(f"{url}: not a supported data URL (schemes: {', '.join(s + '://' for s in SCHEMES)}, "
                        "or a local path)")
    if "@" in parsed.netloc:
        raise DataError(f"{parsed.scheme}://...@{parsed.netloc.rsplit('@', 1)[1]}: credentials do not belong in a "
                        "data URL; give them through the store's own environment or config files")
    if parsed.scheme != "file" and not parsed.netloc:
        raise DataError(f"{url}: no bucket / container in the URL (expected e.g. {parsed.scheme}://bucket/prefix)")
    return str(url).rstrip("/")


def child(url: str, *parts: str) -> str:
    """``url/part/...`` (parts may hold slashes)."""
    return "/".join([str(url).rstrip("/"), *[str(p).strip("/") for p in parts if str(p)]])


def streaming_remote(url: str) -> str:
    """The form streaming's downloaders take: ``file:///x`` becomes the path ``/x``."""
    parsed = urllib.parse.urlparse(url)
    return urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url


def cache_root() -> Path:
    """``$MMTRAIN_CACHE``, else ``$XDG_CACHE_HOME/mmtrain``, else ``~/.cache/mmtrain``."""
    if os.environ.get("MMTRAIN_CACHE"):
        return Path(os.environ["MMTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmtrain"


def default_cache_dir(url: str, kind: str = "shards") -> Path:
    """The cache directory of a URL: ``<cache_root>/<kind>/<readable name>-<hash of the URL>``."""
    url = str(url).rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-60:] or "data"
    digest = hashlib.blake2s(url.encode(), digest_size=6).hexdigest()
    return cache_root() / kind / f"{slug}-{digest}"


def claim_cache(cache: Path, url: str) -> Path:
    """Create (or reuse) ``cache`` as the cache of ``url``. A non-empty directory that is not a cache
    mmtrain made, or the cache of another URL, is refused (DataError), never cleared."""
    cache = Path(cache).expanduser()
    marker = cache / CACHE_MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("url")
        except (OSError, ValueError):
            owner = None
        if owner != url:
            raise DataError(f"{cache}: the cache of {owner or 'an unreadable marker'}, not of {url}; give "
                            "data.cache_dir a directory of its own (or '' for the default)")
        return cache
    if cache.exists() and (not cache.is_dir() or any(cache.iterdir())):
        raise DataError(f"{cache}: exists and is not a cache mmtrain made for {url} (no {CACHE_MARKER}); give "
                        "data.cache_dir an empty or new directory (or '' for the default)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{CACHE_MARKER}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"url": url}) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return cache


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: Union[str, int]) -> int:
    """``"20gb"`` -> 20_000_000_000 (kb/mb/gb/tb decimal, kib/mib/gib/tib binary); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{text!r} is not a size; expected e.g. 500mb, 20gb or 1tib")
    value = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"{text!r}: must be more than 0 bytes")
    return value


@contextlib.contextmanager
def cache_lock(cache: Path):
    """Hold the cache's lock file (blocking) while its small files are brought up to date: jobs on
    one node that share a cache take turns; the shards themselves are guarded by streaming's own
    per-dataset locks."""
    import fcntl

    fd = os.open(str(Path(cache) / ".mmtrain-cache.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _not_found(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NoSuchBucket")


def _forbidden(exc: BaseException) -> bool:
    code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code", ""))
    return code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def endpoint_note(url: str) -> str:
    if url.startswith("s3://") and os.environ.get("S3_ENDPOINT_URL"):
        return f" (endpoint S3_ENDPOINT_URL={os.environ['S3_ENDPOINT_URL']})"
    return ""


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): 1, 2, 4, ... capped at MAX_BACKOFF."""
    return min(MAX_BACKOFF, 2.0 ** (attempt - 1))


def download(url: str, local: PathLike, *, retries: int = DEFAULT_RETRIES, timeout: float = DEFAULT_TIMEOUT,
             expect: Optional[Tuple[Optional[int], Optional[str]]] = None, what: str = "") -> bool:
    """Download one object to ``local`` (atomically: a temporary sibling renamed into place).

    ``expect``: (bytes, sha1) the object must have, checked before the rename; a mismatch is a
    DataError naming the URL (the bad copy is deleted), not retried. Returns False when the object
    does not exist; unreachable stores are retried ``retries`` times with backoff, then DataError.
    """
    from mmtrain.data.streaming_compat import CloudDownloader

    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.dl{os.getpid()}")
    source = streaming_remote(url)
    last: Optional[BaseException] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff(attempt))
        tmp.unlink(missing_ok=True)
        downloader = CloudDownloader.get(source)
        try:
            downloader.download(source, str(tmp), timeout)
        except Exception as exc:   # noqa: BLE001 -- every store's client raises its own types
            tmp.unlink(missing_ok=True)
            if _not_found(exc):
                return False
            if _forbidden(exc):
                raise DataError(f"{url}: access denied{endpoint_note(url)} ({_describe(exc)}); check the store's "
                                "credentials in its standard environment / config files") from None
            last = exc
            continue
        finally:
            try:
                downloader.clean_up()
            except Exception:   # noqa: BLE001
                pass
        if expect is not None:
            _verify(tmp, url, *expect, what=what)
        os.replace(tmp, local)
        return True
    raise DataError(f"{url}: the store did not answer after {retries + 1} attempts{endpoint_note(url)}; last "
                    f"error: {_describe(last)}. Nothing incomplete was kept in the cache; once the store is "
                    "reachable, run again (a training run resumes from its last checkpoint)")


def _verify(path: Path, url: str, size: Optional[int], sha1: Optional[str], what: str = "") -> None:
    got = path.stat().st_size
    if size is not None and got != int(size):
        path.unlink(missing_ok=True)
        raise DataError(f"{url}: {got} bytes downloaded, index.json says {size}{what}: the object in the store is "
                        "truncated or was replaced; re-run `mmtrain prepare` to rewrite it")
    if sha1:
        digest = file_digest(path)
        if digest != sha1:
            path.unlink(missing_ok=True)
            raise DataError(f"{url}: sha1 {digest} does not match index.json ({sha1}){what}: the object in the "
                            "store is corrupt; re-run `mmtrain prepare` to rewrite it (nothing was used from it, "
                            "nothing was kept in the cache)")


def fetch_text(url: str, *, retries: int = DEFAULT_RETRIES, timeout: float = DEFAULT_TIMEOUT) -> Optional[str]:
    """The content of a small object (meta.json), or None when it does not exist."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmtrain-fetch-") as tmp:
        target = Path(tmp) / "object"
        if not download(url, target, retries=retries, timeout=timeout):
            return None
        return target.read_text(encoding="utf-8")


def upload(local_root: PathLike, relpaths: Iterable[str], url: str, *, retries: int = DEFAULT_RETRIES) -> None:
    """Upload ``local_root/<relpath>`` to ``url/<relpath>`` for each relpath, in the order given
    (put the file that marks completion last). DataError naming the object after ``retries``."""
    from mmtrain.data.streaming_compat import CloudUploader

    url = check_url(url)
    target = streaming_remote(url)
    plain = urllib.parse.urlparse(url).scheme == "file"
    uploader = None
    if not plain:
        try:
            uploader = CloudUploader.get((str(local_root), target), keep_local=True, exist_ok=True, retry=1)
        except Exception as exc:   # noqa: BLE001
            raise DataError(f"{url}: cannot write there{endpoint_note(url)} ({_describe(exc)}); does the bucket "
                            "exist, and do the store's credentials allow writing?") from None
    for rel in relpaths:
        last: Optional[BaseException] = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff(attempt))
            try:
                if uploader is None:
                    dest = Path(target) / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.up{os.getpid()}")
                    shutil.copyfile(Path(local_root) / rel, tmp)
                    os.replace(tmp, dest)
                else:
                    uploader.upload_file(rel)
                last = None
                break
            except Exception as exc:   # noqa: BLE001
                if _forbidden(exc):
                    raise DataError(f"{child(url, rel)}: access denied{endpoint_note(url)} ({_describe(exc)})") from None
                last = exc
        if last is not None:
            raise DataError(f"{child(url, rel)}: upload failed after {retries + 1} attempts{endpoint_note(url)}; "
                            f"last error: {_describe(last)}. Run the same command again to continue: files "
                            "already uploaded are not sent again")


def list_remote(url: str, prefix: str = "", scratch: Optional[Path] = None) -> Optional[set]:
    """Relative paths of the objects under ``url/prefix``; None when the store cannot list them."""
    import tempfile
    import urllib.parse

    url = check_url(url)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        root = Path(streaming_remote(url))
        base = root / prefix
        if not base.exists():
            return set()
        return {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")}
    from mmtrain.data.streaming_compat import CloudUploader

    with tempfile.TemporaryDirectory(prefix="mmtrain-list-", dir=scratch) as local:
        try:
            uploader = CloudUploader.get((local, url), keep_local=True, exist_ok=True, retry=1)
            keys = uploader.list_objects(prefix)
        except Exception:   # noqa: BLE001 -- every store's client raises its own types
            return None
    base = parsed.path.strip("/")
    cut = len(base) + 1 if base else 0
    return {str(k)[cut:] for k in (keys or []) if not base or str(k).startswith(base + "/")}


def delete_remote(url: str) -> bool:
    """Delete one object (a meta.json about to be replaced, so the dataset reads as incomplete while
    it is rewritten); False where mmtrain cannot delete in that store (s3:// and file:// only)."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        Path(streaming_remote(url)).unlink(missing_ok=True)
        return True
    if parsed.scheme != "s3":
        return False
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
    try:
        client.delete_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
    except Exception as exc:   # noqa: BLE001
        raise DataError(f"{url}: cannot delete it before overwriting{endpoint_note(url)} "
                        f"({_describe(exc)})") from None
    return True


def upload_output(local: Path, relpaths: Sequence[str], url: str, record: Path) -> Dict[str, int]:
    """Upload ``local/<rel>`` to ``url/<rel>`` in the order given (the completion marker last), skipping
    what an earlier run uploaded: ``record`` (a JSON file beside the staging output) holds
    rel -> [bytes, sha1] of every file sent, updated after each one, and a file the store no longer
    lists is sent again. Returns ``{"uploaded": k, "skipped": m}``."""
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = {}
    common = os.path.commonpath([os.path.dirname(r) for r in relpaths]) if relpaths else ""
    present = list_remote(url, common + "/" if common else "", scratch=record.parent)
    todo = []
    for rel in relpaths:
        path = local / rel
        entry = [path.stat().st_size, file_digest(path)]
        if done.get(rel) == entry and (present is None or rel in present):
            continue
        todo.append((rel, entry))
    import logging

    # streaming's uploader warns on every start that the staging directory is not empty: it is meant to be
    upload_log = logging.getLogger("streaming.base.storage.upload")
    level = upload_log.level
    upload_log.setLevel(logging.ERROR)
    try:
        for rel, entry in todo:
            upload(local, [rel], url)
            done[rel] = entry
            write_json_atomic(record, done)
    finally:
        upload_log.setLevel(level)
    return {"uploaded": len(todo), "skipped": len(relpaths) - len(todo)}
