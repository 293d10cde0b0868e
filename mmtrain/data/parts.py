"""`mmtrain prepare --part I/N` and `--merge`: one corpus prepared by many processes or machines.

Part ``I`` of ``N`` reads the whole corpus in order but tokenizes only the documents whose text
hashes to it (``blake2b(text) mod N == I``), so which documents a part gets depends neither on
file order nor on which machine finishes first. Train/validation is decided as in one plain
prepare, by :func:`mmtrain.data.packing.is_validation` of the document's index in the whole
corpus: the union of the parts splits exactly like one prepare. Every part uses the same
tokenizer (given, or ``<out>/tokenizer.model``); a part never trains one.

Layout of part ``I`` of ``N`` (``part-IIIII-of-NNNNN``) in ``<out>/ctx<n>``::

    train/part-00000-of-00004/        MDS index.json + shards of the part
    val/part-00000-of-00004/
    tokenizer.model                   the shared tokenizer (the same bytes from every part)
    parts/part-00000-of-00004.json    the part's record, written last: counts, recipe, tokenizer

Each split of a part is built in a temporary directory and renamed into place; the record comes
after, so a part without its record is incomplete and a re-run replaces it. :func:`merge` then
joins the parts' indexes into ``<split>/index.json`` (basenames ``part-.../shard.N.mds``, which
streaming and :mod:`mmtrain.data.shards` read as they are) and writes ``meta.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from mmtrain import files as F
from mmtrain.data import shards as S
from mmtrain.data.errors import DataError

PathLike = Union[str, Path]
Part = Tuple[int, int]

RECORDS_DIR = "parts"
_PART_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PART_NAME = re.compile(r"^part-(\d+)-of-(\d+)$")


def parse_part(text: str) -> Part:
    """``"I/N"`` -> ``(I, N)``; ValueError saying what is expected (0 <= I < N)."""
    m = _PART_TEXT.match(str(text))
    if not m:
        raise ValueError(f"expected I/N (this process's part and the number of parts, e.g. 0/4), got {text!r}")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise ValueError(f"expected I/N with 0 <= I < N (parts are numbered from 0), got {text!r}")
    return index, count


def part_name(part: Part) -> str:
    return f"part-{part[0]:05d}-of-{part[1]:05d}"


def in_part(text: str, part: Part) -> bool:
    """Whether the document ``text`` belongs to ``part``: ``blake2b(text) mod N == I``."""
    index, count = part
    if count == 1:
        return True
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count == index


def records_dir(out: PathLike, n_ctx: int) -> Path:
    return S.ctx_dir(out, n_ctx) / RECORDS_DIR


def record_path(out: PathLike, n_ctx: int, part: Part) -> Path:
    return records_dir(out, n_ctx) / f"{part_name(part)}.json"


def part_dir(out: PathLike, n_ctx: int, split: str, part: Part) -> Path:
    return S.split_dir(out, n_ctx, split) / part_name(part)


def relpaths(out: PathLike, n_ctx: int, part: Part) -> List[str]:
    """The files of one complete part, relative to ``out``, in upload order: each split's shards,
    then its index.json, the ctx tokenizer, and the record last."""
    out = Path(out)
    rels: List[str] = []
    for split in S.SPLITS:
        d = part_dir(out, n_ctx, split, part)
        shards = sorted(p for p in d.iterdir() if p.is_file() and p.name != "index.json")
        rels += [p.relative_to(out).as_posix() for p in shards] + [(d / "index.json").relative_to(out).as_posix()]
    rels.append(f"ctx{n_ctx}/{S.TOKENIZER_NAME}")
    rels.append(record_path(out, n_ctx, part).relative_to(out).as_posix())
    return rels


def read_record(path: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def merged_recipe(part_recipe: Dict[str, Any], count: int) -> Dict[str, Any]:
    """The recipe a merge of ``count`` parts records: the parts' recipe without ``part``, with ``parts``."""
    recipe = {k: v for k, v in part_recipe.items() if k != "part"}
    recipe["parts"] = int(count)
    return recipe


def part_state(out: Path, n_ctx: int, part: Part, recipe: Dict[str, Any], tokenizer_sha256: str) -> Optional[str]:
    """``"done"`` when the part is complete with ``recipe`` (or the merged ctx dir already holds it),
    ``"other"`` when it (or the merged ctx dir) was made with another recipe, None when absent."""
    merged = None
    if (S.ctx_dir(out, n_ctx) / S.META_NAME).is_file():
        try:
            merged = S.read_meta(out, n_ctx)
        except DataError:
            merged = None
    if merged is not None:
        same = (merged.get("prepare") == merged_recipe(recipe, part[1])
                and merged.get("tokenizer_sha256") == tokenizer_sha256)
        return "done" if same else "other"
    record = read_record(record_path(out, n_ctx, part))
    if record is None:
        return None
    complete = all((part_dir(out, n_ctx, s, part) / "index.json").is_file() for s in S.SPLITS)
    if record.get("prepare") == recipe and record.get("tokenizer_sha256") == tokenizer_sha256 and complete:
        return "done"
    return "other"


def clean_stale(out: Path, n_ctx: int, part: Part) -> None:
    """Remove what a killed run of this part left (its temporary directories). Call it holding the part's lock."""
    for split in S.SPLITS:
        F.clean_stale(part_dir(out, n_ctx, split, part))
    F.clean_stale(records_dir(out, n_ctx) / part_name(part))


def tmp_dir(out: Path, n_ctx: int, part: Part) -> Path:
    """Where the part is built: ``ctx<n>/parts/.part-...tmp-PID``."""
    return F.tmp_name(records_dir(out, n_ctx) / part_name(part))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(tmp: Path, out: Path, n_ctx: int, part: Part, record: Dict[str, Any], tokenizer_bytes: bytes) -> None:
    """Put a finished part in place: each split directory, the ctx tokenizer, then the record."""
    record_path(out, n_ctx, part).unlink(missing_ok=True)
    for split in S.SPLITS:
        target = part_dir(out, n_ctx, split, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        S.replace_dir(tmp / split, target)
    tok_path = S.ctx_dir(out, n_ctx) / S.TOKENIZER_NAME
    if not tok_path.is_file() or tok_path.read_bytes() != tokenizer_bytes:
        write_bytes_atomic(tok_path, tokenizer_bytes)
    S.write_json_atomic(record_path(out, n_ctx, part), record)


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------


def find_records(out: Path, n_ctx: int) -> Dict[Part, Path]:
    rdir = records_dir(out, n_ctx)
    found = {}
    if rdir.is_dir():
        for path in rdir.glob("part-*-of-*.json"):
            m = _PART_NAME.match(path.name[:-len(".json")])
            if m:
                found[int(m[1]), int(m[2])] = path
    return found


def _part_list(parts: List[int], count: int) -> str:
    return ", ".join(f"{i}/{count}" for i in parts)


def load_records(out: Path, n_ctx: int) -> Tuple[int, List[Dict[str, Any]]]:
    """(N, the N records in part order) of ``ctx<n_ctx>``; DataError naming missing or disagreeing parts."""
    found = find_records(out, n_ctx)
    rdir = records_dir(out, n_ctx)
    if not found:
        raise DataError(f"{rdir}: no part records (part-IIIII-of-NNNNN.json) for n_ctx={n_ctx}: run "
                        f"`mmtrain prepare --part I/N ... --n-ctx {n_ctx}` for every part I of N first")
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise DataError(f"{rdir}: records of {' and '.join(map(str, counts))} parts (part-*-of-"
                        f"{', part-*-of-'.join(f'{c:05d}' for c in counts)}.json): one dataset is prepared in one "
                        "number of parts; delete the records (and part directories) of the other runs")
    count = counts[0]
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        names = ", ".join(record_path(out, n_ctx, (i, count)).name for i in missing[:8])
        raise DataError(f"{S.ctx_dir(out, n_ctx)}: part{'s' if len(missing) > 1 else ''} "
                        f"{_part_list(missing[:8], count)}{' …' if len(missing) > 8 else ''} of {count} "
                        f"{'are' if len(missing) > 1 else 'is'} not complete (no {names} in {rdir}): run "
                        f"`mmtrain prepare --part I/{count} ...` for {'them' if len(missing) > 1 else 'it'} "
                        "(a part without its record was killed or is still running), then merge again")
    records = []
    for i in range(count):
        path = found[i, count]
        record = read_record(path)
        if record is None or not isinstance(record.get("prepare"), dict) or not isinstance(record.get("splits"), dict):
            raise DataError(f"{path}: unreadable part record; run `mmtrain prepare --part {i}/{count} ... "
                            "--overwrite` to write the part again")
        records.append(record)
    first = records[0]
    for i, record in enumerate(records[1:], 1):
        for key, what in (("tokenizer_sha256", "tokenizer"), ("n_ctx", "n_ctx"), ("packing", "packing")):
            if record.get(key) != first.get(key):
                raise DataError(f"{found[i, count]}: part {i}/{count} was made with {what} {record.get(key)}, part "
                                f"0/{count} with {first.get(key)}; every part must use the same one: rerun the "
                                "odd one with the settings of the others (and --overwrite)")
        if merged_recipe(record["prepare"], count) != merged_recipe(first["prepare"], count):
            diff = sorted(k for k in set(record["prepare"]) | set(first["prepare"]) if k != "part"
                          and record["prepare"].get(k) != first["prepare"].get(k))
            raise DataError(f"{found[i, count]}: part {i}/{count} was prepared with another recipe than part "
                            f"0/{count} (differs in {', '.join(diff)}); rerun it with the settings of the others "
                            "(and --overwrite)")
    return count, records


def _merged_index(out: Path, n_ctx: int, split: str, count: int, records: List[Dict[str, Any]],
                  check_files: bool) -> Dict[str, Any]:
    """One MDS index listing the shards of every part in part order, basenames prefixed with the part
    directory (what streaming's ``merge_index`` writes, without its temporary copies and logging)."""
    shards = []
    for i, record in enumerate(records):
        sdir = part_dir(out, n_ctx, split, (i, count))
        index = S._read_index(sdir)
        samples = 0
        for info in index["shards"]:
            if check_files:
                S.check_shard_file(sdir, info, verify_hashes=False)
            samples += int(info.get("samples", 0))
            info = json.loads(json.dumps(info))
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if info.get(key):
                    info[key]["basename"] = f"{sdir.name}/{info[key]['basename']}"
            shards.append(info)
        recorded = int(record["splits"].get(split, {}).get("samples", -1))
        if samples != recorded:
            raise DataError(f"{sdir}/index.json: {samples} samples, its record says {recorded}; rerun "
                            f"`mmtrain prepare --part {i}/{count} ... --overwrite`")
    return {"version": 2, "shards": shards}


def _sum_splits(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    total: Dict[str, Dict[str, int]] = {}
    for split in S.SPLITS:
        acc: Dict[str, int] = {}
        for record in records:
            for key, value in record["splits"].get(split, {}).items():
                acc[key] = acc.get(key, 0) + int(value)
        total[split] = acc
    return total


def _tidy_split(sdir: Path, count: int) -> None:
    """Remove what the merged index no longer lists: shards of an earlier plain prepare, part
    directories of another number of parts."""
    if not sdir.is_dir():
        return
    for entry in sdir.iterdir():
        m = _PART_NAME.match(entry.name)
        if entry.is_dir() and not entry.is_symlink() and m and int(m[2]) != count:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and re.match(r"^shard\.\d+\.mds(\.\w+)?$", entry.name):
            entry.unlink()


def merge_ctx(out: Path, n_ctx: int, *, check_files: bool = True) -> Tuple[Dict[str, Any], bool]:
    """Merge the parts of ``<out>/ctx<n_ctx>``: (meta.json's dict, whether anything was written).

    Writes each split's index.json, then meta.json last (summed counts; the recipe without
    ``part``, with ``parts: N``). ``check_files``: check each part's shard files (sizes, headers)
    too; off where only the indexes are here (merging on an object store)."""
    count, records = load_records(out, n_ctx)
    tok_path = S.ctx_dir(out, n_ctx) / S.TOKENIZER_NAME
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: missing (every part writes it); rerun one part with --overwrite")
    tok_sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    if tok_sha != records[0].get("tokenizer_sha256"):
        raise DataError(f"{tok_path}: sha256 {tok_sha}, the part records say {records[0].get('tokenizer_sha256')}; "
                        "rerun one part with --overwrite to rewrite it")
    indexes = {split: _merged_index(out, n_ctx, split, count, records, check_files) for split in S.SPLITS}
    splits = _sum_splits(records)
    for split, stats in splits.items():
        if stats.get("samples", 0) == 0:
            raise DataError(f"the {split} split of n_ctx={n_ctx} has no samples in any of the {count} parts "
                            f"({stats.get('documents', 0)} documents, {stats.get('document_tokens', 0)} tokens; a "
                            f"block needs {n_ctx}). Use more documents, a larger val_fraction, a smaller n_ctx, "
                            "or packing=pad.")
    recipe = merged_recipe(records[0]["prepare"], count)
    meta = {k: v for k, v in records[0].items() if k not in ("part", "kind")}
    meta.update(splits=splits, prepare=recipe, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    cdir = S.ctx_dir(out, n_ctx)
    try:
        old = S.read_meta(out, n_ctx)
    except DataError:
        old = None
    if (old is not None and old.get("prepare") == recipe and old.get("splits") == splits
            and all(_same_json(S.split_dir(out, n_ctx, s) / "index.json", indexes[s]) for s in S.SPLITS)):
        return old, False
    (cdir / S.META_NAME).unlink(missing_ok=True)   # incomplete until the new meta.json is written
    for split in S.SPLITS:
        sdir = S.split_dir(out, n_ctx, split)
        _tidy_split(sdir, count)
        sdir.mkdir(parents=True, exist_ok=True)
        S.write_json_atomic(sdir / "index.json", indexes[split])
    S.write_json_atomic(cdir / S.META_NAME, meta)
    return meta, True


def _same_json(path: Path, obj: Any) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == obj
    except (OSError, ValueError):
        return False


def merged_relpaths(n_ctx: int) -> List[str]:
    """What a merge adds to the parts of ``ctx<n_ctx>``, relative to ``out`` (meta.json, which goes
    last, not included)."""
    return [f"ctx{n_ctx}/{split}/index.json" for split in S.SPLITS] + [f"ctx{n_ctx}/{S.TOKENIZER_NAME}"]
