"""The training loop, shared by every kind of training.

:class:`Trainer` owns what every run does the same way: distributed setup and seeding; the run
directory (created, proven writable, locked for the job, cleared of interrupted checkpoint writes,
checked for free disk); the DeepSpeed engine (at ZeRO-3 the model is built partitioned, under
``deepspeed.zero.Init``); the run files; resume; the step (gradient accumulation and loss
normalisation); the cadence of logging, evaluation and checkpoints; stop signals; exit codes.

A :class:`Task` supplies what differs: checking its inputs, building the model, the training
batches, the loss of one micro-batch, evaluation, and what a checkpoint records besides the
engine. LM pretraining is :class:`mmtrain.train.lm.LMTask`, contrastive retrieval
:class:`mmtrain.train.contrastive.ContrastiveTask`.

Exit codes of :func:`run_entry`: 0 done, 2 configuration / data error (before any training; also:
run directory not writable, locked by another job, holding a symbolic link where a run file goes,
or too little free disk for a checkpoint; a resume whose config or data differ from the
checkpoint's; and, during training, a disk that fills up while a checkpoint is written),
3 non-finite loss, 75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint at the next step
boundary (relaunch with ``checkpoint.resume=auto``, the default, to continue; see
:mod:`mmtrain.train.faults`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from datetime import datetime
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mmtrain.config import ConfigError, load_config, to_dict, to_yaml
from mmtrain.data.errors import DataError
from mmtrain.optim import EXIT_NONFINITE, NonFiniteLoss  # noqa: F401 (re-exported)
from mmtrain.train import checkpoint as ckpt
from mmtrain.train import faults
from mmtrain.train import monitor as mon
from mmtrain.train.task import RunContext, Task

EXIT_CONFIG = 2
EXIT_PREEMPTED = faults.EXIT_PREEMPTED  # 75: stopped by SIGTERM / SIGUSR1 with a checkpoint written


def resume_mutable(cfg) -> Tuple[str, ...]:
    """The settings of ``cfg``'s schema that may change when a run resumes: their role
    (:data:`mmtrain.config.ROLES`) is ``watch`` (how the run is watched or fed) or ``layout`` (how or
    where the same training runs: ZeRO stage and offload are checked and converted by the resume,
    moved shards keep their tokenizer and index digest, both compared)."""
    from omegaconf import OmegaConf

    from mmtrain.config import setting_roles

    return tuple(k for k, role in setting_roles(OmegaConf.get_type(cfg)).items() if role != "train")


# Keys no checkpoint.allow_changes makes resumable: the checkpoint's tensors would not fit. Model
# settings give the parameters their shapes (except those below); the tokenizer and vocabulary
# size the embedding. ``shards.*`` keys are the data fingerprint. (engine.precision: see
# PRECISION_CONVERTS.)
UNLOADABLE = ("model.", "shards.tokenizer_sha256", "shards.vocab_size")
# Precisions a checkpoint converts between when checkpoint.allow_changes names engine.precision:
# DeepSpeed lays out its optimizer files per precision (a bf16 run finds no fp32 optimizer state),
# but its universal checkpoint stores fp32 weights and Adam moments, which load into either (ZeRO
# 1-3; tested: the moments and step count load exactly). Other changes (fp16) are refused.
PRECISION_CONVERTS = ("fp32", "bf16")
# Model settings that only choose an initialisation or an implementation: allow_changes applies.
MODEL_NOT_SHAPES = ("model.init", "model.embedding_init_std", "model.linear_init", "model.mixing_init",
                    "model.init_std", "model.mixer_impl", "model.norm_eps", "model.rope_theta")


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith((".", "_")) else p + ".") for p in prefixes)


def config_changes(saved: Dict[str, Any], current: Dict[str, Any], allowed=(),
                   mutable=()) -> Tuple[List[str], List[str]]:
    """(forbidden, applied) differences between a checkpoint's config and a resumed run's, one
    ``key: old -> new`` line each; keys absent from the checkpoint (older versions) are not compared."""
    forbidden, applied, _ = resume_changes(saved, current, allowed, mutable)
    return forbidden, applied


def resume_changes(saved: Dict[str, Any], current: Dict[str, Any], allowed=(),
                   mutable=()) -> Tuple[List[str], List[str], List[str]]:
    """(forbidden, applied, unloadable) differences between a checkpoint's config (and data
    fingerprint, as ``shards.*`` keys) and a resumed run's, one ``key: old -> new`` line each.
    ``mutable``: the keys that may change (:func:`resume_mutable`). Unloadable: changes the
    checkpoint cannot be loaded into (:data:`UNLOADABLE`), whatever ``allowed`` says. Keys absent
    from the checkpoint (older versions) are not compared."""
    old, new = mon.flatten(saved), mon.flatten(current)
    forbidden, applied, unloadable = [], [], []
    for key in sorted(k for k in new if k in old and old[k] != new[k]):
        line = f"{key}: {_short(old[key])} -> {_short(new[key])}"
        if _matches(key, UNLOADABLE) and not _matches(key, (*MODEL_NOT_SHAPES, *mutable)):
            unloadable.append(line)
        elif _matches(key, (*mutable, *allowed)):
            applied.append(line)
        else:
            forbidden.append(line)
    return forbidden, applied, unloadable


def resume_problem(checkpoint: str, line: str, unloadable: bool = False, convertible: bool = False) -> str:
    """The error of resuming ``checkpoint`` with the change ``line`` (``key: old -> new``), with the
    fix. ``unloadable``: no setting makes the checkpoint load (:func:`resume_changes`);
    ``convertible``: a precision change the checkpoint can be converted for."""
    key, _, change = line.partition(": ")
    old = change.split(" -> ")[0]
    if key == "engine.precision":
        how = ("allow it with checkpoint.allow_changes=[engine.precision] (the checkpoint is then converted to a "
               "universal checkpoint, whose fp32 weights and optimizer state load at either precision)"
               if convertible else f"only {' <-> '.join(PRECISION_CONVERTS)} at engine.zero_stage >= 1 converts")
        return (f"resuming {checkpoint} at another precision: {line} (DeepSpeed lays out a checkpoint's optimizer "
                f"state per precision: {how}; or resume with {key}={old.strip(chr(39))}, or train into a new "
                "logging.run_dir)")
    if key in ("shards.tokenizer_sha256", "shards.vocab_size"):
        return (f"resuming {checkpoint} with another vocabulary: {line} (the shards in data.shard_dir were made with "
                "another tokenizer, which the checkpoint's embedding does not fit: point data.shard_dir at shards "
                "of its tokenizer, or train into a new logging.run_dir)")
    if key.startswith("shards."):
        return (f"resuming {checkpoint} on other data: {line} (the shards in data.shard_dir are not the ones it "
                "trained on, e.g. prepared again with another recipe: point data.shard_dir at those, allow it with "
                "checkpoint.allow_changes=[shards], or train into a new logging.run_dir)")
    if unloadable:
        return (f"resuming {checkpoint} with a model of other shapes: {line} (the checkpoint's weights do not fit "
                f"it, whatever checkpoint.allow_changes says: resume with {key}={old}, or train into a new "
                "logging.run_dir)")
    return (f"resuming {checkpoint} with a config that changes what it trains: {line} (resume with the "
            "checkpoint's value, allow it with checkpoint.allow_changes=[KEY], or train into a new logging.run_dir)")


def _short(value: Any) -> str:
    """A value for a ``key: old -> new`` line (digests shortened to 12 characters)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return repr(value[:12])
    return repr(value)


# ---- collectives (no-ops in a single process) ------------------------------------------------


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place when distributed), staying on the device."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def from_main(value):
    """Rank 0's ``value`` on every rank."""
    holder = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_leader_first(fn) -> None:
    """Run ``fn`` on each node's local rank 0 while every other rank waits at a barrier; an exception
    ``fn`` raised is raised there after the barrier, so no rank is left waiting."""
    from mmtrain.data.sources import local_leader

    error: Optional[BaseException] = None
    if local_leader():
        try:
            fn()
        except Exception as exc:   # noqa: BLE001 -- raised again below, after the barrier
            error = exc
    barrier()
    if error is not None:
        raise error


def seed_everything(seed: int) -> None:
    seed %= 2**32  # numpy takes seeds in [0, 2**32); derived per-(step, rank) seeds grow past it
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_dir(logging_cfg, default_name: str) -> str:
    """The run directory, the same on every rank (rank 0 picks the timestamp of a default name)."""
    lg = logging_cfg
    if lg.run_dir:
        path = lg.run_dir
    else:
        path = os.path.join(lg.runs_root, lg.name or f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")
    return from_main(os.path.abspath(path))


# ---- the loop ---------------------------------------------------------------------------------


class Trainer:
    """One run of ``task`` under ``cfg``: engine, run directory, loop, checkpoints, monitoring."""

    def __init__(self, cfg, task: Task):
        from mmtrain.train.engine import build_engine, deepspeed_config, grad_accum_steps, init_distributed

        self.cfg, self.task = cfg, task
        self.dist = init_distributed(cfg.engine.device)
        self.is_main, self.device = self.dist.is_main, self.dist.device
        if self.device.type == "cpu" and cfg.engine.precision == "fp16":
            raise ConfigError(["engine.precision: fp16 needs a CUDA device (CPUs have no fp16 training path); "
                               "use fp32 (or bf16 on a CPU with native bf16)"])
        self.gas = grad_accum_steps(cfg.train, self.dist.world_size)  # fails early on a bad batch split
        seed_everything(cfg.train.seed)
        self.info = task.setup(RunContext(cfg, self.dist.rank, self.dist.world_size, self.device, self.is_main,
                                          self.gas))
        self.run_dir = resolve_run_dir(cfg.logging, self.info.run_name)
        self._check_run_dir()
        try:
            where = self._resume_point()   # before any work: an untrustworthy `latest` changes nothing
            self._check_resume_config(where)   # before any weights load: what would not fit, or differs
            self.ds_config = deepspeed_config(cfg, self.dist.world_size, self.info.micro_batch, self.info.micro_steps)
            self.model = self._build_model()
            if where is not None:
                where = self._convert_for_resume(where)
            self._check_disk_space()
            self.engine, _ = build_engine(cfg, self.model, self.dist.world_size, self.ds_config)
            self.step = 0
            self.tokens_seen = 0
            self.resolved_yaml = to_yaml(cfg)
            self.train_loader = task.train_loader()
            self.resumed_from: Optional[str] = None
            if where is not None:
                self._resume(*where)
            self._write_run_files()
        except BaseException:
            self.release_run_dir()   # a run that never started leaves the directory free
            raise
        if self.is_main:
            mon.truncate_metrics(self.run_dir, self.step)
        self.monitor = mon.Monitor(self.run_dir, self.is_main, cfg.train.steps, self.step,
                                   cfg.logging.progress_bar)
        self.stop_request = faults.StopRequest().install()  # SIGTERM / SIGUSR1: stop at a step boundary
        self.stopped_by: Optional[str] = None
        self.last_saved_step = -1
        self._notes_printed: set = set()

    # ---- setup -------------------------------------------------------------------------------

    def _build_model(self) -> torch.nn.Module:
        """The task's model; at ZeRO-3 built partitioned (no rank holds all of it): modules are
        sharded as they are constructed and initialised one module at a time, gathered."""
        if self.cfg.engine.zero_stage != 3:
            return self.task.build_model()
        import deepspeed

        from mmtrain.models.layers import gathered_init

        def gather(params):
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

        with deepspeed.zero.Init(config_dict_or_path=self.ds_config), gathered_init(gather):
            return self.task.build_model()

    def _check_run_dir(self) -> None:
        """Rank 0 creates the run directory, proves it writable and locks it for this job (held
        until :meth:`release_run_dir` or exit), then clears what killed checkpoint writes left.
        Every rank raises the same ConfigError when any of that fails."""
        self.run_dir_lock = None
        problem = None
        if self.is_main:
            problem = faults.check_writable(self.run_dir)
            if problem is None:
                problem = "; ".join(faults.symlinked_run_files(self.run_dir)) or None
            if problem is None:
                try:
                    self.run_dir_lock = faults.RunDirLock(self.run_dir).acquire()
                except (faults.RunDirLocked, OSError) as exc:
                    problem = str(exc)
            if problem is None:
                for path in ckpt.remove_incomplete(ckpt.checkpoint_root(self.run_dir)):
                    print(f"[mmtrain] removed {path} (left by an interrupted checkpoint write)", flush=True)
        problem = from_main(problem)
        if problem:
            raise ConfigError([f"logging.run_dir: {problem}"])

    def _check_disk_space(self) -> None:
        """Fail before training when the run directory's disk cannot hold one checkpoint."""
        problem = None
        if self.is_main:
            problem, warning = faults.check_free_space(self.run_dir, self.checkpoint_size(),
                                                       self.cfg.checkpoint.keep_last)
            if warning:
                print(f"[mmtrain] warning: {warning}", file=sys.stderr, flush=True)
        problem = from_main(problem)
        if problem:
            raise ConfigError([f"logging.run_dir: {problem}"])

    def checkpoint_size(self) -> int:
        """Estimated bytes of one checkpoint of this run (:func:`faults.checkpoint_bytes`)."""
        model = self.model
        params = model.stored_params() if hasattr(model, "stored_params") else model.num_params()
        return faults.checkpoint_bytes(params, self.cfg.engine.precision, self.cfg.engine.zero_stage,
                                       self.dist.world_size)

    def release_run_dir(self) -> None:
        """The run is over: drop the run-directory lock, and ignore further stop signals (a launcher
        tearing down the other ranks may still send one; it must not kill this rank mid-exit)."""
        if getattr(self, "stop_request", None) is not None:
            self.stop_request.ignore_further()
        if getattr(self, "run_dir_lock", None) is not None:
            self.run_dir_lock.release()

    def _write_run_files(self) -> None:
        """config.yaml and deepspeed_config.json (replaced atomically, never through a link)."""
        if not self.is_main:
            return
        try:
            faults.write_run_file(os.path.join(self.run_dir, "config.yaml"), self.resolved_yaml)
            faults.write_run_file(os.path.join(self.run_dir, "deepspeed_config.json"),
                                  json.dumps(self.ds_config, indent=2))
        except faults.RunFileLink as exc:
            raise ConfigError([f"logging.run_dir: {exc}"]) from None

    def _resume_point(self) -> Optional[Tuple[str, str]]:
        """(checkpoint root, tag) to resume from, or None; ConfigError when it cannot be trusted.
        Sets ``self.load_plan`` (see :meth:`_convert_for_resume` for checkpoints that need converting)."""
        self.load_plan: Optional[ckpt.LoadPlan] = None
        try:
            where = from_main(ckpt.resolve_resume(self.cfg.checkpoint.resume, self.run_dir))
        except ckpt.CheckpointError as exc:
            raise ConfigError([f"checkpoint.resume: {exc}"]) from exc
        problem = None
        if where is not None:
            try:
                self.load_plan = ckpt.check_loadable(*where, self.dist.rank, self.dist.world_size,
                                                     self.cfg.engine.zero_stage)
            except ckpt.CheckpointError as exc:
                problem = str(exc)
        self._raise_any(problem)
        self.resume_source = where
        return where

    def _check_resume_config(self, where: Optional[Tuple[str, str]]) -> None:
        """Before the model is built and any weights load: ConfigError listing every difference
        between the checkpoint's config and data (its ``resolved_config.yaml`` and
        :data:`ckpt.RESUME_INFO`) and this run's that the resume cannot take (``key: old -> new``
        each); a warning for the changes it applies. Sets ``self.resume_checked`` (False for a
        checkpoint without those files: :meth:`_resume` then compares its client state)."""
        self.resume_checked, self.precision_from = False, None
        if where is None:
            return
        found = self._resume_differences(*where) if self.is_main else None
        problems, notes, checked, precision_from = from_main(found)
        if problems:
            raise ConfigError(problems)
        for note in notes if self.is_main else ():
            print(f"[mmtrain] warning: {note}", flush=True)
        self.resume_checked, self.precision_from = checked, precision_from

    def _resume_differences(self, root: str, tag: str) -> Tuple[List[str], List[str], bool, Optional[str]]:
        """(problems, warnings, compared, the checkpoint's precision when it is converted to this run's)
        of resuming ``root/tag`` with this run's config and data."""
        import yaml

        where = os.path.join(root, tag)
        try:
            with open(os.path.join(where, "resolved_config.yaml"), encoding="utf-8") as fh:
                saved_config = yaml.safe_load(fh)
        except (OSError, ValueError, yaml.YAMLError):
            saved_config = None
        if not isinstance(saved_config, dict):
            return [], [], False, None   # the client state is compared once loaded
        saved, current = saved_config, to_dict(self.cfg)
        info, notes = ckpt.read_resume_info(root, tag), []
        if info is None:
            notes.append(f"{where} records no fingerprint of the data it trained on (written by an earlier "
                         "mmtrain): the shards in data.shard_dir cannot be compared with its own; resuming")
        else:
            saved_data, data = dict(info.get("data") or {}), self.data_fingerprint()
            if saved_data.get("digest") == data.get("digest"):   # the same shards: how they were made is moot
                saved_data.pop("prepare", None)
                data.pop("prepare", None)
            saved, current = {**saved, "shards": saved_data}, {**current, "shards": data}
        forbidden, applied, unloadable = resume_changes(saved, current, list(self.cfg.checkpoint.allow_changes),
                                                        resume_mutable(self.cfg))
        old_precision, precision = mon.flatten(saved).get("engine.precision"), self.cfg.engine.precision
        converts = ({old_precision, precision} <= set(PRECISION_CONVERTS) and self.cfg.engine.zero_stage >= 1)
        if old_precision not in (None, precision) and not converts:
            line = next(x for x in forbidden + applied if x.startswith("engine.precision:"))
            forbidden, applied, unloadable = ([x for x in forbidden if x != line], [x for x in applied if x != line],
                                              unloadable + [line])
        problems = [resume_problem(where, line, convertible=converts) for line in forbidden]
        problems += [resume_problem(where, line, unloadable=True) for line in unloadable]
        if applied:
            notes.append(f"resuming with changed settings: {'; '.join(applied)}")
        return problems, notes, True, (old_precision if old_precision not in (None, precision) else None)

    def _convert_for_resume(self, where: Tuple[str, str]) -> Tuple[str, str]:
        """Where to load ``where`` from, once the model is built: itself, or (rank 0 converts it,
        once) its DeepSpeed universal checkpoint, when it was written by another number of ranks
        at ZeRO >= 1, stores the token-mixing matrices in the other layout (packed / dense) or was
        trained at the other precision (fp32 / bf16, allowed by :meth:`_check_resume_config`); the
        DeepSpeed config then loads universal checkpoints. ConfigError when it cannot be."""
        from mmtrain.models.mixer import mixing_layout

        layout = mixing_layout(self.model)
        try:
            relayout = ckpt.check_layout(*where, layout, self.cfg.engine.zero_stage)
        except ckpt.CheckpointError as exc:
            raise ConfigError([f"checkpoint.resume: {exc}"]) from exc
        plan = self.load_plan
        if not (plan.universal or relayout or self.precision_from):
            return where
        problem, converted = None, None
        if self.is_main:
            what = (f"written by {plan.saved_world} rank(s) at ZeRO {plan.saved_stage}; this run has "
                    f"{self.dist.world_size}" if plan.universal else "")
            if relayout:
                what += ("; " if what else "") + (f"stores {ckpt.saved_layout(*where)} token-mixing matrices; "
                                                  f"this run builds them {layout}")
            if self.precision_from:
                what += ("; " if what else "") + (f"trained in {self.precision_from}; this run trains in "
                                                  f"{self.cfg.engine.precision}")
            print(f"[mmtrain] {os.path.join(*where)} was {what}: converting it to a universal checkpoint",
                  flush=True)
            try:
                converted = ckpt.to_universal(*where, model=self.model)
            except ckpt.CheckpointError as exc:
                problem = str(exc)
        self._raise_any(problem)
        self.load_plan = plan._replace(universal=True)
        self.ds_config["checkpoint"] = {"load_universal": True}
        return from_main(converted), where[1]

    def _raise_any(self, problem: Optional[str]) -> None:
        """ConfigError on every rank when any rank has a ``problem`` (a collective)."""
        problems = [problem]
        if dist.is_initialized() and dist.get_world_size() > 1:   # every rank stops if any rank would fail
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem:
            raise ConfigError([f"checkpoint.resume: {problem}"])

    def _resume(self, root: str, tag: str) -> None:
        plan = self.load_plan
        state = ckpt.load(self.engine, root, tag, self.dist.rank,
                          rng_dir=os.path.join(*self.resume_source) if plan.same_ranks else None)
        self.step = int(state["step"])
        if not plan.same_ranks:   # no per-rank RNG state to restore: one stream per (seed, step, rank)
            seed_everything(self.cfg.train.seed + 1_000_003 * self.step + 7919 * self.dist.rank)
        self.tokens_seen = int(state["tokens_seen"])
        self._check_client_state(state, root, tag)
        self.train_loader.load_state_dict(state["loader"])
        self.resumed_from = os.path.join(root, tag)
        if self.is_main:
            print(f"[mmtrain] resumed from {os.path.join(root, tag)} at step {self.step}", flush=True)

    def _check_client_state(self, state: Dict[str, Any], root: str, tag: str) -> None:
        """The resume checks of a checkpoint written before the files :meth:`_check_resume_config`
        reads, on its client state (after loading)."""
        if state.get("tokenizer_hash") and state["tokenizer_hash"] != self.info.tokenizer_hash:
            raise ConfigError([f"checkpoint {root}/{tag} was trained with tokenizer "
                               f"{state['tokenizer_hash'][:12]}, the data uses {self.info.tokenizer_hash[:12]}"])
        if self.resume_checked:
            return
        forbidden, applied = config_changes(state.get("config", {}), to_dict(self.cfg),
                                            list(self.cfg.checkpoint.allow_changes), resume_mutable(self.cfg))
        if forbidden:
            raise ConfigError([f"resuming {root}/{tag} with a config that changes what it trains: {line} (resume "
                               "with the checkpoint's value, allow it with checkpoint.allow_changes=[KEY], or "
                               "train into a new logging.run_dir)" for line in forbidden])
        if applied and self.is_main:
            print(f"[mmtrain] warning: resuming with changed settings: {'; '.join(applied)}", flush=True)

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self, batches: Iterator) -> Dict[str, float]:
        """One optimizer step over ``gas`` micro-batches.

        The gradient is that of the logged loss: the sum over the whole global batch (all
        micro-batches of all ranks) of each micro-batch's mean loss times its targets, divided by
        the global targets. Each micro-batch's loss is weighted by ``targets x gas x world /
        global targets``, undoing the engine's mean over micro-batches and ranks; with equal
        target counts (``concat`` packing, contrastive batches) the weight is exactly 1. Counts
        and losses stay on the device: one reduction of the targets before the forwards, one of
        the sums after.
        """
        task, engine, world = self.task, self.engine, self.dist.world_size
        engine.train()
        lr = self._current_lr()
        inputs = [task.batch(next(batches), micro, self.step) for micro in range(self.gas)]
        global_targets = all_reduce_sum(torch.stack([b.targets for b in inputs]).sum()).clamp(min=1.0)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)   # loss x targets, tokens
        grad_norm = None
        zero0 = engine.zero_optimization_stage() == 0
        metrics: Dict[str, float] = {}
        for x in inputs:
            targets, tokens = x.targets, x.tokens
            weight = targets * (self.gas * world) / global_targets
            out = task.loss(engine, x)
            loss, metrics = out.loss, out.metrics
            for term in out.terms:
                engine.backward(term * weight.to(term.dtype))
                if zero0 and engine.is_gradient_accumulation_boundary():
                    grad_norm = self._grad_norm()  # ZeRO 0 does not report it; pre-clip, like ZeRO >= 1
                engine.step()
            sums += torch.stack([loss.detach().double() * targets, tokens.double()])
        loss_sum, n_tokens = all_reduce_sum(sums).tolist()
        loss = loss_sum / float(global_targets)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss}) at step {self.step + 1}")
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        # fp16's loss scaler skips an overflowing step itself; anywhere else the update is broken
        if grad_norm is not None and not math.isfinite(grad_norm) and self.cfg.engine.precision != "fp16":
            raise NonFiniteLoss(f"non-finite gradient norm ({grad_norm}) at step {self.step + 1}")
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "metrics": metrics}

    def weights_finite(self) -> bool:
        """Whether every weight of the model is finite, on every rank (one fused reduction; at
        ZeRO-3 each rank checks its own partitions)."""
        flags = [(~torch.isfinite(x)).any().to(self.device) for x in
                 (getattr(p, "ds_tensor", p).detach() for p in self.engine.module.parameters()) if x.numel()]
        bad = torch.stack(flags).sum().double() if flags else torch.zeros((), dtype=torch.float64, device=self.device)
        return float(all_reduce_sum(bad)) == 0.0

    def _current_lr(self) -> float:
        """The learning rate this step uses (read before the scheduler advances)."""
        opt = self.engine.optimizer
        return opt.param_groups[0]["lr"] if hasattr(opt, "param_groups") else self.engine.lr_scheduler.get_last_lr()[0]

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    # ---- checkpoint --------------------------------------------------------------------------

    def save(self) -> str:
        """Checkpoint this step; a model with a non-finite weight is never saved (NonFiniteLoss). A
        write that fails for lack of disk space is :class:`faults.DiskFull` (exit 2); the previous
        checkpoint and ``latest`` are untouched (the unfinished write is removed)."""
        if not self.weights_finite():
            raise NonFiniteLoss(f"non-finite weights after step {self.step}; not saved")
        self.last_saved_step = self.step
        data = self.data_fingerprint()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.train_loader.state_dict(),
                 "tokenizer_hash": self.info.tokenizer_hash, "vocab_size": self.info.vocab_size,
                 "world_size": self.dist.world_size, "data_fingerprint": data, "config": to_dict(self.cfg),
                 **self.task.state_dict()}
        try:
            return ckpt.save(self.engine, self.run_dir, self.step, state, self.cfg.checkpoint.keep_last,
                             self.resolved_yaml, self.dist.rank, resume_info={"data": data})
        except (OSError, RuntimeError) as exc:
            root, needed = ckpt.checkpoint_root(self.run_dir), self.checkpoint_size()
            if not faults.is_disk_full(exc, root, needed):
                raise
            raise self._disk_full(exc, root, needed) from exc

    def _disk_full(self, exc: BaseException, root: str, needed: int) -> faults.DiskFull:
        """The error of a checkpoint write that ran out of space, after removing what it wrote (one
        rank: the others of a larger world may still be writing; the next start removes it then)."""
        tag = ckpt.tag_for(self.step)
        if self.dist.world_size == 1:
            ckpt.remove_incomplete(root)
        try:
            free = faults.human_bytes(faults.free_bytes(root))
        except OSError:
            free = "?"
        latest = ckpt.read_latest(root)
        kept = (f"the previous checkpoint {os.path.join(root, latest)} and `latest` are unchanged: free some space "
                "(or point logging.run_dir at a larger disk) and relaunch with checkpoint.resume=auto to continue "
                "from it" if latest else "no earlier checkpoint exists: free some space or point logging.run_dir at "
                "a larger disk")
        return faults.DiskFull(f"{os.path.join(root, tag)}: no space left on device while writing the checkpoint of "
                               f"step {self.step} ({type(exc).__name__}); {free} free, one checkpoint of this run "
                               f"needs about {faults.human_bytes(needed)}; {kept}")

    # ---- the loop ----------------------------------------------------------------------------

    def done(self) -> bool:
        t = self.cfg.train
        if self.step >= t.steps or (t.stop_at > 0 and self.step >= t.stop_at):
            return True
        return t.max_tokens > 0 and self.tokens_seen >= t.max_tokens

    def _stop_at_step_boundary(self) -> bool:
        """True when any rank got a stop signal: every rank then saves this step (unless it just
        did) and the loop ends. A collective: call it on every rank after every step."""
        if self.done():
            return False  # finishing anyway
        signame = self.stop_request.agreed(self.device)
        if signame is None:
            return False
        if self.last_saved_step != self.step:
            path = self.save()
        else:
            path = os.path.join(ckpt.checkpoint_root(self.run_dir), ckpt.tag_for(self.step))
        self.stopped_by = signame
        self.monitor.info(f"[mmtrain] {signame}: stopped at step {self.step} with checkpoint {path}; "
                          f"exit code {EXIT_PREEMPTED}. Relaunch with checkpoint.resume=auto to continue.")
        return True

    def _batches(self) -> Iterator:
        from mmtrain.data.lm_dataset import iterate_forever

        return iterate_forever(self.train_loader)

    # ---- reports -----------------------------------------------------------------------------

    def data_fingerprint(self) -> Dict[str, Any]:
        """What identifies the training data, recorded in every checkpoint and compared on resume
        before anything loads (``shards.<key>`` in messages): tokenizer, vocabulary, and what the
        task adds (LM shards: their recipe and an index ``digest``)."""
        return {"tokenizer_sha256": self.info.tokenizer_hash, "vocab_size": int(self.info.vocab_size),
                **self.info.data}

    def banner(self) -> str:
        cfg, model = self.cfg, self.model
        stored = model.stored_params() if hasattr(model, "stored_params") else None
        params = f"params={model.num_params():,}" + (f" ({stored:,} stored)" if stored not in (None, model.num_params())
                                                     else "")
        line = (f"[mmtrain] run dir {self.run_dir} | {self.info.describe} {params} | world={self.dist.world_size} "
                f"zero={cfg.engine.zero_stage} {cfg.engine.precision} | global batch {cfg.train.global_batch_size} = "
                f"{cfg.train.micro_batch_size} x {self.gas} x {self.dist.world_size}")
        if self.info.flops_per_token:
            line += f" | MFU peak {self.peak.describe()} per device"
        return line

    @property
    def peak(self):
        """The MFU denominator: engine.peak_flops, else the device's data-sheet figure, else a
        measured matmul (the banner names which); measured once."""
        if getattr(self, "_peak", None) is None:
            from mmtrain.train.engine import peak_flops

            self._peak = peak_flops(self.device, self.cfg.engine.precision, self.cfg.engine.peak_flops)
        return self._peak

    def hparams(self) -> Dict[str, Any]:
        """The run's hyperparameters for TensorBoard's HParams dashboard (:func:`mon.run_hparams`)."""
        from omegaconf import OmegaConf

        from mmtrain.config import setting_roles

        watch = [k for k, role in setting_roles(OmegaConf.get_type(self.cfg)).items() if role == "watch"]
        return {**mon.run_hparams(to_dict(self.cfg), {"model.vocab_size": self.info.vocab_size,
                                                      "run.world_size": self.dist.world_size,
                                                      "run.num_params": self.model.num_params()}, watch),
                **self.info.hparams}

    def step_report(self, stats: Dict[str, Any], seconds: float):
        """One step's (metrics.jsonl fields, TensorBoard scalars, log line, progress postfix, summary)."""
        tps = stats["tokens"] / seconds
        gn = "n/a" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}"
        record = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "tokens_seen": self.tokens_seen, "tokens_per_s": tps}
        scalars = {mon.TRAIN_LOSS: stats["loss"], mon.LR: stats["lr"], mon.GRAD_NORM: stats["grad_norm"],
                   mon.TOKENS_SEEN: self.tokens_seen, mon.TOKENS_PER_S: tps}
        summary = {"loss": stats["loss"], "tokens_per_s": tps}
        parts = [f"step {self.step:>6}/{self.cfg.train.steps}", f"loss {stats['loss']:.4f}", f"lr {stats['lr']:.2e}",
                 f"grad {gn}", f"{tps:,.0f} tok/s"]
        if self.info.flops_per_token:
            mfu = tps * self.info.flops_per_token / (self.peak.value * self.dist.world_size)
            record["mfu"] = scalars[mon.MFU] = summary["mfu"] = mfu
            parts.append(f"mfu {100 * mfu:.1f}%")
        for key, value in stats["metrics"].items():
            value = float(value)   # device scalars are read once per step, here
            record[key] = value
            scalars[self.info.step_tags.get(key, f"train/{key}")] = value
            parts.append(f"{key} {value:.4g}")
        record["step_time_s"] = seconds
        parts.append(f"{seconds:.2f} s/step")
        postfix = {"loss": f"{stats['loss']:.4f}", "tok/s": f"{tps:,.0f}"}
        return record, scalars, " | ".join(parts), postfix, summary

    def evaluate(self) -> Dict[str, float]:
        """The task's evaluation, logged: TensorBoard scalars and texts, metrics.jsonl, the console."""
        m, step = self.monitor, self.step
        ev = self.task.evaluate(self.engine, step)
        for note in ev.notes:
            if note not in self._notes_printed:
                self._notes_printed.add(note)
                m.info(note)
        m.scalars(step, ev.scalars)
        m.record({"step": step, **ev.metrics})
        for tag, markdown in ev.texts.items():
            m.text(tag, markdown, step)
        m.info(ev.line)
        return dict(ev.metrics)

    def run(self) -> Dict[str, float]:
        cfg, m = self.cfg, self.monitor
        m.info(self.banner())
        m.text("config", "```\n" + self.resolved_yaml + "\n```")
        m.hparams_start(self.hparams())
        last = self.evaluate() if self.info.evaluate_at_start and self.step == 0 else {}
        batches = self._batches()
        eval_every, ckpt_every = cfg.train.eval_every, cfg.checkpoint.every
        while not self.done():
            with mon.StepTimer(self.device) as timer:
                stats = self.train_step(batches)
            self.step += 1
            faults.inject("step", self.step, self.dist.rank)  # test hook (MMTRAIN_FAULT); no-op otherwise
            self.tokens_seen += int(stats["tokens"])
            record, scalars, line, postfix, summary = self.step_report(stats, timer.seconds)
            last = dict(summary)   # the summary printed at the end: this step, and its evaluation if any
            m.record({"step": self.step, **record})
            m.advance(1, postfix)
            if self.step % cfg.logging.log_every == 0 or self.step == 1 or self.done():
                m.scalars(self.step, {**scalars, mon.STEP_TIME: timer.seconds,
                                      mon.MEMORY: mon.peak_memory_gb(self.device)})
                m.info(line)
            if (eval_every > 0 and self.step % eval_every == 0) or self.done():
                last.update(self.evaluate())
            if (ckpt_every > 0 and self.step % ckpt_every == 0) or self.done():
                m.info(f"saved {self.save()}")
            m.flush()
            if self._stop_at_step_boundary():
                break
        t = cfg.train
        if self.step >= t.steps or (t.max_tokens > 0 and self.tokens_seen >= t.max_tokens):
            m.hparams_end(self.step)   # the schedule is complete (not at stop_at or a stop signal)
        m.close()
        return last


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable; later wins)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def run_entry(argv: Optional[List[str]], schema, task_cls, description: str = "") -> int:
    """The body of a training entry script: config -> Trainer(task) -> run -> exit code."""
    prog = task_cls.name
    args = parse_args(argv, description)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        trainer = Trainer(cfg, task_cls())
    except ConfigError as exc:
        print(f"mmtrain {prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        last = trainer.run()
    except (DataError, faults.DiskFull) as exc:
        print(f"mmtrain {prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLoss as exc:
        root = ckpt.checkpoint_root(trainer.run_dir)
        latest = ckpt.read_latest(root)
        resume = ("; `latest` names it: relaunch with checkpoint.resume=auto (and e.g. a lower train.lr) "
                  "to continue from it" if latest else "")
        print(f"mmtrain {prog}: {exc}; stopping. Last finite checkpoint: {latest or 'none'} in {root}{resume}",
              file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        trainer.release_run_dir()
    if dist.is_initialized():
        dist.destroy_process_group()
    stopped = {"stopped_by": trainer.stopped_by} if trainer.stopped_by else {}
    if trainer.is_main:
        print(json.dumps({"run_dir": trainer.run_dir, "step": trainer.step,
                          "tokens_seen": trainer.tokens_seen, **stopped, **last}), flush=True)
    return EXIT_PREEMPTED if trainer.stopped_by else 0
