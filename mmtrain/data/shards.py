"""The on-disk shard layout, ``meta.json``, and the checks run before any training work.

Layout written by ``mmtrain prepare --out <shard_dir>``::

    <shard_dir>/tokenizer.model          the tokenizer used (shared by every ctx dir)
    <shard_dir>/tokenizer.yaml           how it was trained (absent when it was given)
    <shard_dir>/ctx<N>/meta.json         written last: its presence marks a complete directory
    <shard_dir>/ctx<N>/tokenizer.model   copy, so each ctx dir is self-contained
    <shard_dir>/ctx<N>/train/            MDS: index.json + shard.*.mds
    <shard_dir>/ctx<N>/val/

:func:`check_shards` validates all of it without reading samples (sizes and headers only; with
``verify_hashes=True`` also the sha1 of every shard file) and raises :class:`DataError` naming the
file, what was found and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from mmtrain.data.errors import DataError

FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "val")
SHARD_HASH = "sha1"

PathLike = Union[str, Path]


def ctx_dir(shard_dir: PathLike, n_ctx: int) -> Path:
    return Path(shard_dir) / f"ctx{int(n_ctx)}"


def split_dir(shard_dir: PathLike, n_ctx: int, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return ctx_dir(shard_dir, n_ctx) / split


def shard_tokenizer_path(shard_dir: PathLike, n_ctx: int) -> Path:
    """The tokenizer the shards of ``n_ctx`` were made with (the copy inside the ctx dir)."""
    return ctx_dir(shard_dir, n_ctx) / TOKENIZER_NAME


def prepare_command(shard_dir: PathLike, n_ctx: int) -> str:
    """The exact ``mmtrain prepare`` command that creates ``<shard_dir>/ctx<n_ctx>``.

    Reuses the inputs and tokenizer of a sibling ctx dir when there is one, so the new context
    length matches the existing ones; otherwise it prepares the demo corpus.
    """
    shard_dir = Path(shard_dir)
    recipe: Dict[str, Any] = {}
    for sibling in sorted(shard_dir.glob("ctx*/" + META_NAME)):
        try:
            recipe = json.loads(sibling.read_text()).get("prepare", {})
            break
        except (OSError, ValueError):
            continue
    args = ["mmtrain", "prepare", "--input", *(recipe.get("input") or ["demo"])]
    if recipe.get("text_field", "text") != "text":
        args += ["--text-field", recipe["text_field"]]
    args += ["--out", str(shard_dir), "--n-ctx", str(n_ctx)]
    if (shard_dir / TOKENIZER_NAME).exists():
        args += ["--tokenizer", str(shard_dir / TOKENIZER_NAME)]
    if recipe.get("packing", "concat") != "concat":
        args += ["--packing", recipe["packing"]]
    extra = []
    for key, default in (("delimiter", ""), ("max_docs", 0), ("val_fraction", 0.05), ("seed", 0)):
        if key in recipe and recipe[key] != default:
            extra.append(f"{key}={recipe[key]}")
    return " ".join(shlex.quote(a) for a in args + extra)


def _missing(shard_dir: PathLike, n_ctx: int, what: str) -> DataError:
    return DataError(f"{what}\nCreate the shards with:\n  {prepare_command(shard_dir, n_ctx)}")


def read_meta(shard_dir: PathLike, n_ctx: int) -> Dict[str, Any]:
    """Load ``<shard_dir>/ctx<n_ctx>/meta.json``; DataError (with the prepare command) if missing."""
    cdir = ctx_dir(shard_dir, n_ctx)
    path = cdir / META_NAME
    if not cdir.is_dir():
        raise _missing(shard_dir, n_ctx, f"no shards for n_ctx={n_ctx}: {cdir} does not exist.")
    if not path.is_file():
        raise _missing(shard_dir, n_ctx, f"incomplete shard directory {cdir}: no {META_NAME} "
                       "(an interrupted `mmtrain prepare`?).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or not valid JSON ({exc}); re-run:\n  "
                        f"{prepare_command(shard_dir, n_ctx)}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: shard format_version {version!r}, this mmtrain reads "
                        f"{FORMAT_VERSION}; re-run:\n  {prepare_command(shard_dir, n_ctx)}")
    return meta


def _read_index(sdir: Path) -> Dict[str, Any]:
    path = sdir / "index.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (shard directory incomplete or damaged)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt index ({exc})") from None
    if index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise DataError(f"{path}: not an MDS index (expected version 2 with a list of shards)")
    return index


read_index = _read_index


def file_digest(path: PathLike, algo: str = SHARD_HASH) -> str:
    """Hex digest of a file (``sha1``: what MDS indexes record per shard), read in 4 MiB blocks."""
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_file(sdir: Path, info: Dict[str, Any], verify_hashes: bool, remedy: str = "`mmtrain prepare`") -> int:
    """Check one shard file of an MDS index entry (presence, size, header; sha1 with ``verify_hashes``);
    its sample count. ``remedy``: the command that rewrites it, named in the error."""
    raw = info.get("raw_data") or {}
    path = sdir / str(raw.get("basename", "?"))
    if not path.is_file():
        raise DataError(f"{path}: shard file missing (listed in {sdir / 'index.json'})")
    size = path.stat().st_size
    if size != raw.get("bytes"):
        raise DataError(f"{path}: {size} bytes on disk, index.json says {raw.get('bytes')} "
                        "(truncated or corrupt shard file)")
    samples = int(info.get("samples", -1))
    with open(path, "rb") as fh:
        head = fh.read(4 + 4 * (samples + 1)) if samples >= 0 else b""
    if len(head) < 8:
        raise DataError(f"{path}: too short to be an MDS shard")
    count = int(np.frombuffer(head[:4], np.uint32)[0])
    offsets = np.frombuffer(head[4:], np.uint32)
    if count != samples or len(offsets) != samples + 1 or int(offsets[-1]) != size:
        raise DataError(f"{path}: corrupt MDS header (says {count} samples ending at byte "
                        f"{int(offsets[-1]) if len(offsets) else '?'}; index.json says {samples} "
                        f"samples in {size} bytes)")
    if verify_hashes:
        for algo, expected in (raw.get("hashes") or {}).items():
            found = file_digest(path, algo)
            if found != expected:
                raise DataError(f"{path}: {algo} {found} does not match index.json "
                                f"({expected}): corrupt shard file; re-run {remedy} to rewrite it")
    return samples


def expected_columns(meta: Dict[str, Any]) -> Dict[str, str]:
    cols = {"tokens": f"ndarray:{meta['token_dtype']}:{meta['n_ctx']}"}
    if meta["packing"] == "pad":
        cols["length"] = "int32"
    return cols


def check_split(shard_dir: PathLike, n_ctx: int, split: str, meta: Dict[str, Any],
                verify_hashes: bool = False, present_only: bool = False) -> int:
    """Check one MDS split directory against meta.json; returns its sample count. ``present_only``
    (the cache of a remote dataset): shard files not downloaded yet are counted from index.json."""
    sdir = split_dir(shard_dir, n_ctx, split)
    if not sdir.is_dir():
        raise DataError(f"{sdir}: missing split directory")
    index = _read_index(sdir)
    want = expected_columns(meta)
    total = 0
    for info in index["shards"]:
        cols = dict(zip(info.get("column_names", []), info.get("column_encodings", [])))
        if cols != want:
            raise DataError(f"{sdir}/index.json: columns {cols}, expected {want} "
                            f"(n_ctx {n_ctx}, packing {meta['packing']})")
        raw = info.get("raw_data") or {}
        if present_only and not (sdir / str(raw.get("basename", "?"))).is_file():
            total += int(info.get("samples", 0))
            continue
        total += check_shard_file(sdir, info, verify_hashes)
    recorded = meta["splits"][split]["samples"]
    if total != recorded:
        raise DataError(f"{sdir}: {total} samples in index.json, meta.json says {recorded}")
    return total


def check_shards(shard_dir: PathLike, n_ctx: int, *, tokenizer_hash: Optional[str] = None,
                 vocab_size: Optional[int] = None, splits: Sequence[str] = SPLITS,
                 verify_hashes: bool = False, present_only: bool = False) -> Dict[str, Any]:
    """Fail early and clearly unless ``<shard_dir>/ctx<n_ctx>`` holds complete, matching shards.

    Checks: the directory and meta.json exist (else the message gives the ``mmtrain prepare``
    command), meta.json's n_ctx, the tokenizer hash and vocabulary size when given, and for each
    split the MDS index, column types, every shard file's size and header (and sha1 with
    ``verify_hashes``) and the sample counts. Returns the meta dict.
    """
    meta = read_meta(shard_dir, n_ctx)
    where = ctx_dir(shard_dir, n_ctx) / META_NAME
    if int(meta.get("n_ctx", -1)) != int(n_ctx):
        raise DataError(f"{where}: shards were written for n_ctx={meta.get('n_ctx')}, expected "
                        f"n_ctx={n_ctx}. Create matching shards with:\n  {prepare_command(shard_dir, n_ctx)}")
    if tokenizer_hash is not None and meta.get("tokenizer_sha256") != tokenizer_hash:
        raise DataError(f"{where}: shards were tokenized with tokenizer sha256 "
                        f"{meta.get('tokenizer_sha256')} ({meta.get('tokenizer_path')}), but the "
                        f"expected tokenizer has sha256 {tokenizer_hash}. Use the shards' tokenizer "
                        f"({shard_tokenizer_path(shard_dir, n_ctx)}) or prepare new shards "
                        "with `mmtrain prepare ... --tokenizer <your .model>`.")
    if vocab_size is not None and int(meta.get("vocab_size", -1)) != int(vocab_size):
        raise DataError(f"{where}: shards have vocab_size {meta.get('vocab_size')}, expected {vocab_size}")
    for split in splits:
        check_split(shard_dir, n_ctx, split, meta, verify_hashes, present_only)
    return meta


def index_digest(shard_dir: PathLike, n_ctx: int) -> str:
    """sha256 of what the MDS indexes of ``<shard_dir>/ctx<n_ctx>`` list (split, file, size, sha1 and
    samples of every shard file): equal for moved or copied shards, not for shards written again."""
    entries = []
    for split in SPLITS:
        for info in _read_index(split_dir(shard_dir, n_ctx, split))["shards"]:
            raw = info.get("raw_data") or {}
            entries.append([split, raw.get("basename"), raw.get("bytes"), raw.get("hashes"), info.get("samples")])
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def split_bytes(path: PathLike) -> int:
    """Bytes on disk under a directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary sibling renamed over it (removed when the write fails,
    e.g. on a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Put the finished directory ``tmp`` at ``final`` atomically (:func:`mmtrain.files.publish_dir`):
    ``final`` holds the complete old or the complete new directory at every instant."""
    from mmtrain.files import publish_dir

    publish_dir(tmp, final)


def existing_ctx(shard_dir: PathLike) -> List[int]:
    """Context lengths with a complete (meta.json present) directory under ``shard_dir``."""
    out = []
    for meta in Path(shard_dir).glob("ctx*/" + META_NAME):
        suffix = meta.parent.name[3:]
        if suffix.isdigit():
            out.append(int(suffix))
    return sorted(out)
