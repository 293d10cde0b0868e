"""What a checkpoint directory holds, and how it is checked before anything of it is used.

Each checkpoint ``step_XXXXXXXX/`` ends with a :data:`MANIFEST` (world size, ZeRO stage, every file,
and the size and sha256 of each: :func:`file_digest`, computed at save by the rank that wrote the
file). :func:`verify` checks a checkpoint against it before resume or export touch it: sizes, then
digests, then every ``.pt`` unpickled with ``weights_only=True`` and :func:`allowed_globals`. The
loads themselves run under :func:`weights_only_loads`, since DeepSpeed's own loaders pass
``weights_only=False``. Errors are :class:`CheckpointError`, naming the file and the other
checkpoints to fall back on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import zipfile
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from mmtrain.files import sha256_file

CHECKPOINT_SUBDIR = "checkpoints"   # <run_dir>/checkpoints/<tag>/
LATEST = "latest"                   # <run_dir>/checkpoints/latest: the tag to resume from
INCOMPLETE_SUFFIX = ".incomplete"   # a checkpoint being written: <tag>.incomplete/
MANIFEST = "manifest.json"   # world size, ZeRO stage and every file of a checkpoint, written last
RESUME_INFO = "resume_info.json"   # the data a checkpoint trained on, read before a resume loads anything
TAG_RE = re.compile(r"^step_(\d{8,})$")
DIGEST = "sha256"
_RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")   # files named for the rank that writes them


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(ckpt_root: str) -> List[str]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(t for t in os.listdir(ckpt_root) if TAG_RE.match(t) and
                  os.path.isdir(os.path.join(ckpt_root, t)))


def file_digest(path: str) -> Dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, in one chunked pass."""
    size, digest = sha256_file(path)
    return {"size": size, DIGEST: digest}


def digest_files(paths: List[str]) -> List[Dict[str, Any]]:
    """:func:`file_digest` of each path, several files at a time (hashlib releases the GIL while it
    hashes, so threads use the cores a multi-core node has; one core reads at ~1 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(paths), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_digest, paths))


def _file_owner(name: str) -> int:
    """The rank that writes ``name``: the one it is named for (optimizer partitions, ZeRO-3 model
    states, RNG states); rank 0 for the rest (model states, resolved config)."""
    match = _RANK_FILE_RE.search(name)
    return int(next(g for g in match.groups() if g is not None)) if match else 0


def digest_own_files(directory: str, rank: int) -> Dict[str, Dict[str, Any]]:
    """Digests of the files of ``directory`` that this rank wrote: each rank reads back its own
    files (on several hosts, the host that wrote them), in parallel with the other ranks."""
    names = [name for name in sorted(os.listdir(directory))
             if name != MANIFEST and _file_owner(name) == rank and os.path.isfile(os.path.join(directory, name))]
    return dict(zip(names, digest_files([os.path.join(directory, name) for name in names])))


def gather_digests(digests: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Every rank's digests merged (a collective; the identity in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(digests)
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, digests)
    merged: Dict[str, Dict[str, Any]] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def complete_digests(directory: str, names: List[str], digests: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``{relative path: digest}`` for every file under ``names`` of ``directory`` (recursing into
    folders), taking ``digests`` where a rank already computed one."""
    paths = []
    for name in names:
        path = os.path.join(directory, name)
        paths += ([name] if not os.path.isdir(path) else
                  sorted(os.path.relpath(os.path.join(folder, f), directory)
                         for folder, _, files in os.walk(path) for f in files))
    todo = [rel for rel in paths if rel not in digests]
    found = dict(zip(todo, digest_files([os.path.join(directory, rel) for rel in todo])))
    return {rel: digests.get(rel) or found[rel] for rel in paths}


class CheckpointError(ValueError):
    """A checkpoint pointer or directory that cannot be trusted; the message says what to do."""


def allowed_globals() -> list:
    """The Python types checkpoint ``.pt`` files may hold besides what ``torch.load(weights_only=True)``
    allows by itself (tensors, containers, numbers, strings): the DeepSpeed 0.19 objects its optimizer
    states store (ZeRO 1-3, fp32 and bf16, and universal conversions; DynamicLossScaler for fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's included) loads with ``weights_only=True``
    and :func:`allowed_globals`: a pickle naming any other Python object fails instead of running.

    DeepSpeed 0.19.8 passes ``weights_only=False`` itself in its checkpoint engine, its ZeRO and
    universal-checkpoint loaders, ``ds_to_universal`` and ``zero_to_fp32``, with no setting to change
    it; they all call ``torch.load`` through the ``torch`` module, so replacing that attribute for
    the duration of a load is the one hook they share. Not thread-safe: use it around loads only."""
    original = torch.load
    if getattr(original, "_mmtrain_weights_only", False):   # already inside such a block
        yield
        return

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    load._mmtrain_weights_only = True
    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        torch.load = original


def read_pt(path: str) -> Any:
    """A checkpoint ``.pt`` file loaded with ``weights_only=True`` and :func:`allowed_globals`."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _scan_pt(path: str) -> Optional[str]:
    """What is wrong with ``.pt`` file ``path`` (None: nothing): it is unpickled with
    ``weights_only=True`` and the allowlist, its tensors memory-mapped, not read (cheap)."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:   # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower():
            return ("references a Python object outside the types a checkpoint holds; refused unloaded: "
                    "it may run code when unpickled (a planted or foreign file). "
                    "torch.serialization.get_unsafe_globals_in_checkpoint(path) lists what it references")
        return f"is not a readable torch.save file ({type(exc).__name__}): truncated or damaged"
    return None


def _damaged(root: str, tag: str, problem: str, fix: str) -> CheckpointError:
    """The error for a damaged checkpoint ``root/tag``: ``problem``, then the other checkpoints
    there and how to pick one (``fix`` formats ``{path}`` and ``{tag}`` of the newest other)."""
    others = [t for t in list_tags(root) if t != tag]
    pick = (f"; use one with {fix.format(path=os.path.join(root, others[-1]), tag=others[-1])}" if others else
            "; none to fall back on: restore it from a copy, or train again into a new logging.run_dir")
    return CheckpointError(f"{problem}. Other checkpoints in {root}: {', '.join(others) or 'none'}{pick}")


def read_manifest(root: str, tag: str, fix: str = "checkpoint.resume={path}") -> Optional[Dict[str, Any]]:
    """The manifest of checkpoint ``root/tag``; None when there is none (written before manifests
    existed); CheckpointError when it is unreadable, not complete JSON or lacks an entry."""
    path = os.path.join(root, tag, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(root, tag, f"{path} is unreadable or not complete JSON ({type(exc).__name__}): it is written "
                                  "last, in one piece, so it was damaged or truncated afterwards", fix) from None
    keys = ("universal_of", "files") if isinstance(manifest, dict) and "universal_of" in manifest else (
        "world_size", "zero_stage", "files")
    missing = [k for k in keys if not isinstance(manifest, dict) or k not in manifest]
    bad = missing or not isinstance(manifest["files"], list) or not all(isinstance(f, str) for f in manifest["files"])
    digests = manifest.get("digests") if not bad else None
    if not bad and digests is not None:
        bad = not isinstance(digests, dict) or not all(
            isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get(DIGEST), str)
            for d in digests.values())
    if bad:
        what = f"lacks {', '.join(missing)}" if missing else "has a malformed file list or digest"
        raise _damaged(root, tag, f"{path} {what} (an incomplete or edited manifest)", fix)
    return manifest


def _files_under(directory: str) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``directory`` but the manifest."""
    out = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), directory)
            if rel != MANIFEST:
                out[rel] = os.lstat(os.path.join(folder, name)).st_size
    return out


def _share(sizes: Dict[str, int], rank: int, world_size: int) -> List[str]:
    """The files rank ``rank`` of ``world_size`` checks: the largest go first to the least-loaded
    rank (every rank computes the same split)."""
    loads, mine = [0] * max(world_size, 1), []
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        owner = loads.index(min(loads))
        loads[owner] += size + 1
        if owner == rank:
            mine.append(name)
    return mine


def _size_problem(path: str, expected: Dict[str, Any]) -> Optional[str]:
    """How file ``path``'s size differs from its manifest entry (None: it does not)."""
    size = os.path.getsize(path)
    if size == expected["size"]:
        return None
    what = "empty" if size == 0 else "truncated" if size < expected["size"] else "longer than it was written"
    return f"{path} has {size:,} bytes; {MANIFEST} records {expected['size']:,} ({what})"


def _digest_problem(path: str, got: Dict[str, Any], expected: Dict[str, Any]) -> Optional[str]:
    """How file ``path``'s digest ``got`` differs from its manifest entry (None: it does not)."""
    if got[DIGEST] == expected[DIGEST] and got["size"] == expected["size"]:
        return None
    return (f"{path} has sha256 {got[DIGEST][:16]}…; {MANIFEST} records {expected[DIGEST][:16]}… (bytes changed "
            "on disk or in a copy after it was written)")


def verify(root: str, tag: str, rank: int = 0, world_size: int = 1, fix: str = "checkpoint.resume={path}") -> None:
    """Check checkpoint ``root/tag`` before anything of it is loaded; CheckpointError naming the
    first bad file, what was expected, and the other checkpoints (``fix`` says how to pick one).

    Each file's size and sha256 must match the manifest (one chunked read per file), every ``.pt``
    file must unpickle under ``weights_only=True`` with :func:`allowed_globals` (its tensors are
    mapped, not read), and no ``.pt`` file may be missing from the manifest. A checkpoint written
    before manifests recorded digests is checked for what it can be (no empty file, every ``.pt``
    readable and allowed), with a warning. With ``world_size`` ranks each checks its share of the
    files (the same split on every rank): call it on every rank and stop all when any fails."""
    directory = os.path.join(root, tag)
    manifest = read_manifest(root, tag, fix)
    sizes = _files_under(directory)
    digests = (manifest or {}).get("digests")
    if digests is None and os.path.lexists(os.path.join(directory, RESUME_INFO)):
        # Written by an mmtrain that records digests (resume_info.json came with them): they were removed.
        raise _damaged(root, tag, f"{os.path.join(directory, MANIFEST)} records no digests, but this checkpoint "
                       "was written with them (it has a resume_info.json): the manifest was edited", fix)
    if digests is None:
        if rank == 0:
            age = "has no manifest" if manifest is None else "has a manifest without digests"
            print(f"[mmtrain] warning: {directory} {age} (written by an older mmtrain): its files' sizes and "
                  "sha256 cannot be checked; checking that none is empty and every .pt file is readable",
                  file=sys.stderr, flush=True)
    else:
        problems = [f"{os.path.join(directory, name)} is missing" for name in sorted(digests) if name not in sizes]
        problems += [f"{os.path.join(directory, name)} is not in {MANIFEST} (not written with this checkpoint)"
                     for name in sorted(sizes) if name not in digests and name.endswith(".pt")]
        problems += [f"{MANIFEST} lists {name} without a digest" for name in manifest["files"]
                     if name not in digests and not any(d.startswith(name + os.sep) for d in digests)]
        if problems:
            raise _damaged(root, tag, f"{problems[0]} (an incomplete or damaged checkpoint)", fix)
    mine = _share(sizes, rank, world_size)
    paths = {name: os.path.join(directory, name) for name in mine}
    problems = {}
    for name in mine:   # the cheap checks first: a truncated file is named without reading it
        path = paths[name]
        if not os.path.isfile(path):   # a device, pipe or dangling link: reading it may never end
            problems[name] = f"{path} is not a regular file"
        elif digests is not None and name in digests:
            problems[name] = _size_problem(path, digests[name])
        elif sizes[name] == 0:
            problems[name] = f"{path} is empty"
    hashed = [name for name in mine if not problems.get(name) and digests is not None and name in digests]
    for name, got in zip(hashed, digest_files([paths[name] for name in hashed])):
        problems[name] = _digest_problem(paths[name], got, digests[name])
    for name in mine:
        if not problems.get(name) and name.endswith(".pt"):
            problems[name] = (f"{paths[name]} " + scan) if (scan := _scan_pt(paths[name])) else None
        if problems.get(name):
            raise _damaged(root, tag, problems[name], fix)


def read_latest(ckpt_root: str) -> Optional[str]:
    """The tag ``latest`` points at, or None when there is no trustworthy one (:func:`check_latest`
    without the error)."""
    try:
        return check_latest(ckpt_root)
    except CheckpointError:
        return None


def check_latest(ckpt_root: str) -> Optional[str]:
    """The tag ``latest`` names, checked: None when there is no ``latest`` file; CheckpointError when
    it is unreadable or names anything but a complete checkpoint directory of ``ckpt_root``. A
    ``latest`` that is a symbolic link is refused unread, and its text is never shown unless it is a
    checkpoint tag's shape (it may be another file's: a planted hard link)."""
    path = os.path.join(ckpt_root, LATEST)
    target = f"a complete checkpoint directory of {ckpt_root}"
    if os.path.islink(path):
        problem = f"is a symbolic link (not followed: mmtrain writes `latest` as a plain file naming {target})"
    elif not os.path.isfile(path):
        return None
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "r", encoding="utf-8") as fh:
                tag = fh.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"is unreadable ({type(exc).__name__}), not {target}"
        else:
            if tag in list_tags(ckpt_root):
                return tag
            shown = repr(tag) if re.fullmatch(r"[\w.-]{1,64}", tag) else f"no checkpoint tag ({len(tag)} characters)"
            problem = f"names {shown}, which is not {target}"
    complete = list_tags(ckpt_root)
    raise CheckpointError(
        f"{path} {problem}. Complete checkpoints there: "
        f"{', '.join(complete) or 'none'}. Pick one with checkpoint.resume={os.path.join(ckpt_root, complete[-1]) if complete else '<dir>'}"
        f" (or checkpoint.resume=none with a new logging.run_dir to start over); nothing was changed")
