"""Checkpoints: save / resume through the DeepSpeed engine, with an atomic ``latest`` pointer.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/          written by engine.save_checkpoint (any ZeRO stage, any world size)
        mp_rank_00_model_states.pt   (module + client state: step, tokens, loader state, config)
        rng_rank000.pt ...           per-rank RNG states
        resolved_config.yaml
    latest                  tag of the newest *complete* checkpoint (replaced atomically)

A checkpoint is complete once every rank has finished writing; only then does rank 0 point
``latest`` at it and delete checkpoints beyond ``keep_last``. A run killed mid-write leaves
``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_SUBDIR = "checkpoints"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_SUBDIR)


def list_tags(ckpt_root: str) -> List[str]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(t for t in os.listdir(ckpt_root) if _TAG_RE.match(t) and
                  os.path.isdir(os.path.join(ckpt_root, t)))


def read_latest(ckpt_root: str) -> Optional[str]:
    """The tag ``latest`` points at, or None when there is no complete checkpoint."""
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as fh:
        tag = fh.read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_root, tag)):
        return None
    return tag


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep_last: int,
         config_yaml: str, rank: int) -> str:
    """Write checkpoint ``step_<step>`` on every rank, then publish it. Returns its path."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    path = os.path.join(root, tag)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank:03d}.pt"))
    if rank == 0:
        _atomic_write(os.path.join(path, "resolved_config.yaml"), config_yaml)
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _fault_hook("before_latest")
        _atomic_write(os.path.join(root, LATEST), tag)
        prune(root, keep_last)
    _barrier()
    return path


def _fault_hook(point: str) -> None:
    """Test hook: ``MMTRAIN_FAULT=<point>`` kills the process at that point of a checkpoint write."""
    if os.environ.get("MMTRAIN_FAULT") == point:
        os.kill(os.getpid(), 9)


def prune(root: str, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (never the latest)."""
    if keep_last <= 0:
        return
    latest = read_latest(root)
    tags = [t for t in list_tags(root) if latest is None or t <= latest]
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def resolve_resume(resume: str, run_dir: str) -> Optional[Tuple[str, str]]:
    """Where to resume from: ``(checkpoint_root, tag)`` or None to start fresh.

    ``auto``: ``<run_dir>/checkpoints/latest`` when present. ``none``: never. Otherwise a path to
    a checkpoint directory (``.../step_XXXXXXXX``) or a checkpoints root holding ``latest``.
    """
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = read_latest(root)
        return (root, tag) if tag else None
    path = os.path.abspath(resume)
    if os.path.isdir(path) and _TAG_RE.match(os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    tag = read_latest(path) or read_latest(checkpoint_root(path))
    if tag is not None:
        root = path if read_latest(path) else checkpoint_root(path)
        return root, tag
    raise FileNotFoundError(
        f"checkpoint.resume: {resume!r} is neither a checkpoint directory (.../step_XXXXXXXX) nor a "
        "run / checkpoints directory with a 'latest' file")


def load(engine, root: str, tag: str, rank: int) -> Dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return the client state."""
    load_path, client_state = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {os.path.join(root, tag)}")
    rng_file = os.path.join(root, tag, f"rng_rank{rank:03d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
