"""Checkpoints: save / resume through the DeepSpeed engine, with an atomic ``latest`` pointer.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/          written by engine.save_checkpoint (any ZeRO stage, any world size)
        mp_rank_00_model_states.pt   (module + client state: step, tokens, loader state, config)
        rng_rank000.pt ...           per-rank RNG states (plain tensors: loads with weights_only)
        resolved_config.yaml
        manifest.json                world size, ZeRO stage, token-mixing layout and every file above
                                     with its size and sha256 digest (written last)
    latest                  tag of the newest *complete* checkpoint (replaced atomically)
    universal/step_00000100/  the same checkpoint as a DeepSpeed universal checkpoint (made by
                            :func:`to_universal` to resume on another number of ranks;
                            deleted once a newer checkpoint is published)

Every rank writes into ``step_XXXXXXXX.incomplete/``. Once all ranks have finished, rank 0
renames it to ``step_XXXXXXXX``, then points ``latest`` at it, and only then deletes checkpoints
beyond ``keep_last``. So a run killed at any moment of a write leaves ``latest`` (and every
directory named ``step_*``) on complete checkpoints, and never fewer complete checkpoints than
before; the next start removes the unfinished ``*.incomplete`` directory
(:func:`remove_incomplete`). Assumes one file system shared by all ranks (as ``latest`` does).
Before resuming, :func:`resolve_resume` refuses a ``latest`` that names no complete checkpoint of
this run and a start that would overwrite published checkpoints, and :func:`check_loadable`
refuses a checkpoint missing a file of its manifest or failing :func:`verify`, and says when one
written by another number of ranks or at another ZeRO partitioning must first be converted
(:func:`to_universal`).

Integrity (:mod:`mmtrain.checkpoint_files`): :func:`verify` checks every file's size and sha256 against the manifest (one chunked
read per file; the ranks of a run split the files between them), before anything is loaded.
Checkpoint files are pickles (DeepSpeed's format). :func:`verify` also unpickles every ``.pt``
file with ``torch.load(weights_only=True)`` and :func:`allowed_globals` (the few DeepSpeed types
the files hold), so a file referencing any other Python object is refused before DeepSpeed's
loader (which passes ``weights_only=False``) sees it; the loads themselves run under
:func:`weights_only_loads`, which holds DeepSpeed's ``torch.load`` calls to the same rule. Digests
protect against damage, not against someone who can rewrite the manifest too: the
``weights_only`` rule is what keeps a planted pickle from running.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mmtrain.models.mixer import mixing_layout
from mmtrain.checkpoint_files import (CHECKPOINT_SUBDIR, DIGEST, INCOMPLETE_SUFFIX, LATEST,  # noqa: F401
                                     MANIFEST, RESUME_INFO, TAG_RE, CheckpointError, check_latest,
                                     complete_digests, digest_files, digest_own_files, file_digest,
                                     gather_digests, list_tags, read_latest, read_manifest, read_pt, tag_for,
                                     verify, weights_only_loads)
from mmtrain.models.mixing_ops import block_for_size
from mmtrain.train import faults

UNIVERSAL = "universal"      # subdirectory of universal conversions (resume on another layout)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_SUBDIR)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with faults.open_run_file(tmp, "w") as fh:   # a link planted under the temporary name is not followed
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors, ints and tuples only (``torch.load(weights_only=True)``)."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep_last: int,
         config_yaml: str, rank: int, resume_info: Optional[Dict[str, Any]] = None) -> str:
    """Write checkpoint ``step_<step>`` on every rank, then publish it. Returns its path.

    A collective: every rank calls it. Order (each step starts after the previous one finished):
    all ranks write ``<tag>.incomplete/`` -> barrier -> rank 0 renames it to ``<tag>`` -> rank 0
    moves ``latest`` -> rank 0 prunes old checkpoints -> barrier. ``resume_info`` (what a resume
    compares before loading anything: :func:`read_resume_info`) is written beside the config.
    """
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    staging_tag = tag + INCOMPLETE_SUFFIX
    staging, path = os.path.join(root, staging_tag), os.path.join(root, tag)
    if rank == 0 and os.path.isdir(staging):  # left by a write that was killed
        shutil.rmtree(staging)
    _barrier()
    engine.save_checkpoint(root, tag=staging_tag, client_state=client_state, save_latest=False)
    faults.inject("after_model_states", step, rank)
    torch.save(rng_state(), os.path.join(staging, f"rng_rank{rank:03d}.pt"))
    if rank == 0:
        _atomic_write(os.path.join(staging, "resolved_config.yaml"), config_yaml)
        if resume_info is not None:
            _atomic_write(os.path.join(staging, RESUME_INFO), json.dumps(resume_info, indent=1))
    _barrier()  # every rank's files are on disk
    digests = gather_digests(digest_own_files(staging, rank))
    if rank == 0:
        files = sorted(f for f in os.listdir(staging) if f != MANIFEST)
        _atomic_write(os.path.join(staging, MANIFEST), json.dumps(
            {"world_size": world_size(), "zero_stage": int(engine.zero_optimization_stage()),
             "mixing_layout": mixing_layout(engine.module), "files": files,
             "digests": complete_digests(staging, files, digests)}, indent=1))
        _publish(staging, path)
        faults.inject("before_latest", step, rank)
        _atomic_write(os.path.join(root, LATEST), tag)
        prune(root, keep_last)
    _barrier()
    return path


def _publish(staging: str, path: str) -> None:
    """Rename the finished ``staging`` directory to ``path``. An existing ``path`` (the same step
    written again after resuming from an older checkpoint) is moved aside first and deleted last.
    Everything is flushed to disk first, so ``latest`` survives a machine crash pointing at data."""
    for folder, _, files in os.walk(staging):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)
    replaced = None
    if os.path.isdir(path):
        replaced = f"{path}.replaced{os.getpid()}"
        os.replace(path, replaced)
    os.replace(staging, path)
    _fsync(os.path.dirname(path))
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def _fsync(path: str) -> None:
    """Flush a file's or a directory's (its entries') data to disk, as far as the OS allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_incomplete(ckpt_root: str) -> List[str]:
    """Delete what killed checkpoint writes left behind (``*.incomplete`` / ``*.replaced*``
    directories, ``latest.tmp*`` files); return the removed paths. Call it only while holding the
    run-directory lock, before training starts."""
    if not os.path.isdir(ckpt_root):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if name.endswith(INCOMPLETE_SUFFIX) or ".replaced" in name:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(LATEST + ".tmp"):
            os.remove(path)
        elif name == UNIVERSAL and os.path.isdir(path):
            removed += remove_incomplete(path)
            continue
        else:
            continue
        removed.append(path)
    return removed


def prune(root: str, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (never the latest; 0 keeps
    all), and universal conversions of any checkpoint but the latest."""
    latest = read_latest(root)
    universal = os.path.join(root, UNIVERSAL)
    for tag in list_tags(universal):   # a conversion is only needed until the resumed run saves
        if tag != latest:
            shutil.rmtree(os.path.join(universal, tag), ignore_errors=True)
    if keep_last <= 0:
        return
    tags = [t for t in list_tags(root) if latest is None or t <= latest]
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def resolve_resume(resume: str, run_dir: str) -> Optional[Tuple[str, str]]:
    """Where to resume from: ``(checkpoint_root, tag)`` or None to start fresh.

    ``auto``: ``<run_dir>/checkpoints/latest`` when present. ``none``: never. Otherwise a path to
    a checkpoint directory (``.../step_XXXXXXXX``) or a checkpoints root holding ``latest``.
    CheckpointError when ``latest`` cannot be trusted, or when a run started from elsewhere (``none``
    or an older checkpoint) would write over this run directory's published checkpoints.
    """
    own_root = checkpoint_root(run_dir)
    own = list_tags(own_root)
    if resume == "auto":
        tag = check_latest(own_root)
        if tag is None and own:
            raise CheckpointError(
                f"{own_root} holds complete checkpoints ({', '.join(own)}) but no 'latest': resume one with "
                f"checkpoint.resume={os.path.join(own_root, own[-1])}, or use a new logging.run_dir")
        where = (own_root, tag) if tag else None
    elif resume == "none":
        where = None
    else:
        path = os.path.abspath(resume)
        if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
            where = os.path.dirname(path), os.path.basename(path)
        else:
            for root in (path, checkpoint_root(path)):
                tag = check_latest(root)
                if tag is not None:
                    where = root, tag
                    break
            else:
                raise CheckpointError(
                    f"checkpoint.resume: {resume!r} is neither a checkpoint directory (.../step_XXXXXXXX) nor a "
                    "run / checkpoints directory with a 'latest' file")
    if resume == "auto":
        # a step directory newer than `latest` was never published (killed before `latest` moved): the
        # resumed run writes that step again
        return where
    start = where[1] if where and os.path.abspath(where[0]) == os.path.abspath(own_root) else None
    newer = [t for t in own if start is None or t > start]
    if newer:
        begin = f"from {start}" if start else "from step 0"
        raise CheckpointError(
            f"{own_root} already holds complete checkpoints ({', '.join(newer)}) newer than where this run would "
            f"start ({begin}); it would overwrite and prune them. Resume the newest (checkpoint.resume=auto) or "
            "train into a new logging.run_dir")
    return where


_SAME_LAYOUT = {0: "0", 1: "1 or 2", 2: "1 or 2", 3: "3"}


class LoadPlan(NamedTuple):
    """How a checkpoint loads into this run: ``universal`` when it must first be converted (a
    ZeRO >= 1 checkpoint written by another number of ranks); ``same_ranks`` when it was written
    by as many ranks as this run has (each rank then restores its RNG)."""
    universal: bool
    same_ranks: bool
    saved_world: Optional[int]
    saved_stage: Optional[int]


def check_loadable(root: str, tag: str, rank: int, world_size: int, zero_stage: int) -> LoadPlan:
    """How ``root/tag`` loads into this run (:class:`LoadPlan`); CheckpointError unless it holds
    every file its manifest lists (and, at the same layout, what this rank loads: its RNG state,
    the model states and, at ZeRO >= 1, its optimizer partition) and passes :func:`verify` (this
    rank's share of it), or when it was written at a ZeRO stage of another layout (0 | 1, 2 | 3:
    no conversion between those)."""
    directory = os.path.join(root, tag)
    manifest = read_manifest(root, tag)
    if manifest is not None:
        saved_stage, saved_world, files = manifest["zero_stage"], manifest["world_size"], manifest["files"]
    else:   # written before manifests: what the file names say
        files = sorted(os.listdir(directory))
        saved_world = len([f for f in files if f.endswith("_mp_rank_00_optim_states.pt")]) or None
        saved_stage = (3 if any(f.startswith("zero_pp_rank_") and f.endswith("model_states.pt") for f in files)
                       else None)
    if saved_stage is not None and ((saved_stage == 0) != (zero_stage == 0) or (saved_stage == 3) != (zero_stage == 3)):
        raise CheckpointError(f"{directory} was written at ZeRO {saved_stage}; this run is engine.zero_stage="
                              f"{zero_stage}. Resume at ZeRO {_SAME_LAYOUT[saved_stage]} (any number of ranks): "
                              "ZeRO 0 keeps a plain optimizer state, 1 and 2 a partitioned one, 3 also "
                              "partitioned weights, and there is no conversion between those")
    same_ranks = saved_world is None or saved_world == world_size
    universal = zero_stage >= 1 and not same_ranks
    needed = []
    if not universal:
        needed.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3
                      else "mp_rank_00_model_states.pt")
        if zero_stage >= 1:
            needed.append(next((f for f in files if f.endswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")),
                               f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    if same_ranks:
        needed.insert(0, f"rng_rank{rank:03d}.pt")
    missing = [n for n in needed if not os.path.isfile(os.path.join(directory, n))]
    missing += [f for f in files if f not in missing and not os.path.isfile(os.path.join(directory, f))]
    if missing:
        others = [t for t in list_tags(root) if t != tag]
        raise CheckpointError(f"{directory} lacks {', '.join(missing)}: an incomplete or damaged checkpoint. "
                              f"Other checkpoints there: {', '.join(others) or 'none'} "
                              "(checkpoint.resume=<dir> picks one)")
    verify(root, tag, rank, world_size)
    return LoadPlan(universal, same_ranks, saved_world, saved_stage)


def saved_layout(root: str, tag: str) -> str:
    """How ``root/tag`` stores its causal token-mixing matrices: "packed" or "dense" (checkpoints
    that do not record it were written before packed storage existed: dense)."""
    return (read_manifest(root, tag) or {}).get("mixing_layout") or "dense"


def read_resume_info(root: str, tag: str) -> Optional[Dict[str, Any]]:
    """What ``root/tag`` recorded about the data it trained on (:data:`RESUME_INFO`), or None for a
    checkpoint written before it was recorded (or an unreadable record; verification names that)."""
    try:
        with open(os.path.join(root, tag, RESUME_INFO), encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_layout(root: str, tag: str, layout: Optional[str], zero_stage: int) -> bool:
    """True when ``root/tag`` stores the token-mixing matrices in another layout than ``layout``
    (the model's; None = the model has none) and must be converted (:func:`to_universal`);
    CheckpointError when it cannot be: a ZeRO 0 checkpoint keeps a plain optimizer state."""
    if layout is None:
        return False
    saved = saved_layout(root, tag)
    if saved == layout:
        return False
    if zero_stage == 0:
        raise CheckpointError(
            f"{os.path.join(root, tag)} holds {saved} token-mixing matrices; this run builds them {layout} "
            f"(model.mixer_layout). Resume with model.mixer_layout={saved}: a ZeRO 0 optimizer state is not "
            "converted between layouts (ZeRO 1-3 checkpoints are). The weights load into either layout "
            "(mmtrain export, load_pretrained)")
    return True


def _convert_mixing_layout(directory: str, model) -> None:
    """In a universal checkpoint ``directory``, re-lay the fp32 weights and Adam moments of every
    causal token-mixing matrix of ``model`` that is stored in the other layout (dense ``weight``
    <-> ``packed_weight``); a moment of a dense entry maps to the same entry packed."""
    from mmtrain.models.mixer import CausalMixingMatrix

    zero = os.path.join(directory, "zero")
    for prefix, module in model.named_modules():
        if not isinstance(module, CausalMixingMatrix):
            continue
        names = ("weight", "packed_weight") if module.layout == "packed" else ("packed_weight", "weight")
        source, target = (os.path.join(zero, f"{prefix}.{n}") for n in names)
        if not os.path.isdir(source):
            continue
        os.makedirs(target, exist_ok=True)
        shape = getattr(module.mixing_parameter, "ds_shape", module.mixing_parameter.shape)
        lead = tuple(shape[:-1] if module.layout == "packed" else shape[:-2])
        for name in sorted(os.listdir(source)):
            value = read_pt(os.path.join(source, name))
            tensor = value.get("param") if isinstance(value, dict) else value   # ZeRO-3 files hold flat tensors
            if torch.is_tensor(tensor) and tensor.numel() > 1:
                if module.layout == "packed":
                    relaid = module.pack(tensor.reshape(*lead, module.n_ctx, module.n_ctx))
                else:
                    packed = tensor.reshape(*lead, -1)
                    block = block_for_size(module.n_ctx, packed.shape[-1])
                    if block is None:
                        raise CheckpointError(f"{source}: a packed token-mixing tensor of {packed.shape[-1]} values "
                                              f"fits no block size for n_ctx {module.n_ctx}")
                    relaid = module.unpack(packed, block)
                relaid = relaid.reshape(-1) if tensor.dim() == 1 else relaid
                value = {**value, "param": relaid} if isinstance(value, dict) else relaid
            torch.save(value, os.path.join(target, name))
        shutil.rmtree(source)


def _repair_zero3_universal(engine, directory: str) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader: it gives every optimizer group the
    first group's hyperparameters (so the no-decay group would decay), and one shared ``step``
    tensor to every group's state (Adam increments it in place once per group, so later groups
    would see their bias correction run ahead)."""
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = read_pt(os.path.join(directory, "zero", "optimizer_state.pt"))
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{directory} has {len(saved_groups)} optimizer groups; this model has {len(groups)}")
    for group, values in zip(groups, saved_groups):
        group.update({k: v for k, v in values.items() if k != "params"})


def to_universal(root: str, tag: str, model=None) -> str:
    """Convert ``root/tag`` (a ZeRO >= 1 checkpoint) into a DeepSpeed universal checkpoint at
    ``root/universal/tag`` (once: a finished conversion for the same token-mixing layout is
    reused) and return ``root/universal``. Every parameter's fp32 weights and Adam moments are
    stored whole, so any number of ranks at the same ZeRO layout loads it
    (``checkpoint.load_universal`` in the DeepSpeed config); with ``model``, its token-mixing
    matrices are re-laid in the model's layout (packed / dense). The source is verified first
    (:func:`verify`), and so is a finished conversion before it is reused (a damaged one is made
    again); the conversion's manifest records its digests. It is written to ``tag.incomplete``
    and renamed when done. Run it on one rank."""
    import argparse
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out_root = os.path.join(root, UNIVERSAL)
    out = os.path.join(out_root, tag)
    layout = mixing_layout(model) if model is not None else saved_layout(root, tag)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        try:
            verify(out_root, tag)
            if saved_layout(out_root, tag) == (layout or "dense"):
                return out_root
        except CheckpointError as exc:
            print(f"[mmtrain] converting {os.path.join(root, tag)} again: {exc}", file=sys.stderr, flush=True)
    verify(root, tag)
    staging = out + INCOMPLETE_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(out_root, exist_ok=True)
    args = argparse.Namespace(input_folder=os.path.join(root, tag), output_folder=staging, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # checkpoints written without Megatron's marker
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), weights_only_loads():
            ds_to_universal(args)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not convert {os.path.join(root, tag)} to a universal checkpoint "
                              f"({type(exc).__name__}: {exc}); resume with the world size and ZeRO stage it "
                              "was written at") from exc
    finally:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out_root, "latest_universal"))   # DeepSpeed's pointer; we name the tag
    if model is not None:
        _convert_mixing_layout(staging, model)
    files = sorted(f for f in os.listdir(staging) if f != MANIFEST)
    _atomic_write(os.path.join(staging, MANIFEST), json.dumps(
        {"universal_of": tag, "mixing_layout": layout, "files": files,
         "digests": complete_digests(staging, files, {})}, indent=1))
    _publish(staging, out)
    return out_root


def load(engine, root: str, tag: str, rank: int, rng_dir: Optional[str] = "") -> Dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG from ``rng_dir`` (default:
    the checkpoint directory; None: leave the RNG alone); return the client state. Every file is
    unpickled with ``weights_only=True`` and the allowlist (:func:`weights_only_loads`)."""
    with weights_only_loads():
        load_path, client_state = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {os.path.join(root, tag)}")
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal(engine, os.path.join(root, tag))
    if rng_dir is not None:
        set_rng_state(torch.load(os.path.join(rng_dir or os.path.join(root, tag), f"rng_rank{rank:03d}.pt"),
                                 weights_only=True))
    return client_state or {}
