"""LM pretraining on the DeepSpeed ZeRO engine.

Run it any of these ways (all take ``--config X.yaml`` (repeatable) and ``key=value`` overrides)::

    deepspeed mmtrain/pretrain.py --config configs/pretrain/mixer-d512-ctx512.yaml
    torchrun --nproc_per_node 2 mmtrain/pretrain.py --config ... engine.zero_stage=3
    python mmtrain/pretrain.py                  # default small mixer on the demo corpus (CPU)
    python -m mmtrain.pretrain train.steps=50

Exit codes: 0 done, 2 configuration / data error (before any training; also: run directory not
writable, locked by another job, or too little free disk for a checkpoint), 3 non-finite loss,
75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint at the next step boundary (relaunch
with ``checkpoint.resume=auto``, the default, to continue; see mmtrain/faults.py).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: keep mmtrain/ itself off sys.path so its modules cannot shadow others.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import math
import random
from datetime import datetime
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from mmtrain import checkpoint as ckpt
from mmtrain import faults
from mmtrain import monitor as mon
from mmtrain.config import ConfigError, PretrainConfig, load_config, save_yaml, to_dict, to_yaml

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = faults.EXIT_PREEMPTED  # 75: stopped by SIGTERM / SIGUSR1 with a checkpoint written


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a masked mixer or transformer LM with DeepSpeed.")
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable; later wins)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_dir(cfg, is_main: bool) -> str:
    """Same run directory on every rank (rank 0 picks the timestamp, then broadcasts it)."""
    lg = cfg.logging
    if lg.run_dir:
        path = lg.run_dir
    else:
        name = lg.name or f"{cfg.model.kind}-ctx{cfg.model.n_ctx}-{datetime.now():%Y%m%d-%H%M%S}"
        path = os.path.join(lg.runs_root, name)
    holder = [os.path.abspath(path)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_main(value):
    """Rank 0's ``value`` on every rank."""
    holder = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place when distributed), staying on the device."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def ensure_shards(cfg, is_main: bool) -> Dict:
    """Check the shards for model.n_ctx (auto-preparing the demo corpus on first use)."""
    from mmtrain.data.errors import DataError
    from mmtrain.data.shards import check_shards, ctx_dir

    shard_dir, n_ctx = cfg.data.shard_dir, cfg.model.n_ctx
    if (is_main and cfg.data.auto_prepare and cfg.data.prepare_input == "demo"
            and not (ctx_dir(shard_dir, n_ctx) / "meta.json").is_file()):
        from mmtrain.data.prepare import demo_prepare_config, prepare

        print(f"[mmtrain] preparing demo shards for n_ctx={n_ctx} in {shard_dir} (first use; cached)",
              flush=True)
        kwargs = {"tokenizer": cfg.data.tokenizer} if cfg.data.tokenizer else {}
        try:
            prepare(demo_prepare_config(shard_dir, [n_ctx], **kwargs))
        except DataError as exc:
            raise ConfigError([f"data.auto_prepare: {exc}"]) from exc
    _barrier()
    expected_hash = None
    if cfg.data.tokenizer:
        from mmtrain.tokenizer import load_tokenizer

        expected_hash = load_tokenizer(cfg.data.tokenizer).sha256
    try:
        return check_shards(shard_dir, n_ctx, tokenizer_hash=expected_hash,
                            vocab_size=cfg.model.vocab_size or None)
    except DataError as exc:
        raise ConfigError([f"data.shard_dir: {exc}"]) from exc


class Trainer:
    """One pretraining run: engine, data, loop, evaluation, checkpoints, monitoring."""

    def __init__(self, cfg):
        from mmtrain.engine import build_engine, grad_accum_steps, init_distributed

        self.cfg = cfg
        self.dist = init_distributed(cfg.engine.device)
        grad_accum_steps(cfg.train, self.dist.world_size)  # fail early on a bad batch split
        self.is_main = self.dist.is_main
        seed_everything(cfg.train.seed)
        self.meta = ensure_shards(cfg, self.is_main)
        self.vocab_size = int(self.meta["vocab_size"])
        self.run_dir = resolve_run_dir(cfg, self.is_main)
        self._check_run_dir()

        from mmtrain.models import build_model

        self.model = build_model(cfg.model, self.vocab_size)
        self.label_shift = self.model.label_shift  # targets of out.loss: labels[:, shift:] (0 = autoencoder)
        self._check_disk_space()
        self.engine, self.ds_config = build_engine(cfg, self.model, self.dist.world_size)
        self.device = self.dist.device
        self.gas = self.engine.gradient_accumulation_steps()
        self.n_ctx = cfg.model.n_ctx
        self.step = 0
        self.tokens_seen = 0
        self.resolved_yaml = to_yaml(cfg)
        self._write_run_files()
        self.train_loader = self._loader("train", shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers)
        self.val_loader = None
        self._resume()
        flops = self.model.flops_per_token(self.n_ctx)
        peak = cfg.engine.peak_flops
        if peak <= 0:
            from mmtrain.engine import peak_flops

            peak = peak_flops(self.device, cfg.engine.precision)
        self.flops_per_token, self.peak_flops = flops, peak
        if self.is_main:
            mon.truncate_metrics(self.run_dir, self.step)
        self.monitor = mon.Monitor(self.run_dir, self.is_main, cfg.train.steps, self.step,
                                   cfg.logging.progress_bar)
        self._install_stop_handlers()

    # ---- setup -------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """Rank 0 creates the run directory, proves it writable and locks it for this job (held
        until :meth:`release_run_dir` or exit), then clears what killed checkpoint writes left.
        Every rank raises the same ConfigError when any of that fails."""
        self.run_dir_lock = None
        problem = None
        if self.is_main:
            problem = faults.check_writable(self.run_dir)
            if problem is None:
                try:
                    self.run_dir_lock = faults.RunDirLock(self.run_dir).acquire()
                except (faults.RunDirLocked, OSError) as exc:
                    problem = str(exc)
            if problem is None:
                for path in ckpt.remove_incomplete(ckpt.checkpoint_root(self.run_dir)):
                    print(f"[mmtrain] removed {path} (left by an interrupted checkpoint write)", flush=True)
        problem = _from_main(problem)
        if problem:
            raise ConfigError([f"logging.run_dir: {problem}"])

    def _check_disk_space(self) -> None:
        """Fail before training when the run directory's disk cannot hold one checkpoint."""
        problem = None
        if self.is_main:
            size = faults.checkpoint_bytes(self.model.num_params(), self.cfg.engine.precision)
            problem, warning = faults.check_free_space(self.run_dir, size, self.cfg.checkpoint.keep_last)
            if warning:
                print(f"[mmtrain] warning: {warning}", file=sys.stderr, flush=True)
        problem = _from_main(problem)
        if problem:
            raise ConfigError([f"logging.run_dir: {problem}"])

    def release_run_dir(self) -> None:
        """The run is over: drop the run-directory lock, and ignore further stop signals (a launcher
        tearing down the other ranks may still send one; it must not kill this rank mid-exit)."""
        if getattr(self, "stop_request", None) is not None:
            self.stop_request.ignore_further()
        if getattr(self, "run_dir_lock", None) is not None:
            self.run_dir_lock.release()

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        save_yaml(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        with open(os.path.join(self.run_dir, "deepspeed_config.json"), "w") as fh:
            json.dump(self.ds_config, fh, indent=2)

    def _loader(self, split: str, shuffle: bool, num_workers: int):
        from mmtrain.data.lm_dataset import build_lm_loader

        return build_lm_loader(
            self.cfg.data.shard_dir, self.n_ctx, split, self.cfg.train.micro_batch_size,
            shuffle=shuffle, seed=self.cfg.train.seed, num_workers=num_workers,
            expected_tokenizer_hash=self.meta["tokenizer_sha256"], expected_vocab_size=self.vocab_size,
            drop_last=split == "train", num_canonical_nodes=self.cfg.data.num_canonical_nodes,
        )

    def _resume(self) -> None:
        where = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.run_dir)
        if where is None:
            return
        root, tag = where
        state = ckpt.load(self.engine, root, tag, self.dist.rank)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        if state.get("tokenizer_hash") and state["tokenizer_hash"] != self.meta["tokenizer_sha256"]:
            raise ConfigError([f"checkpoint {root}/{tag} was trained with tokenizer "
                               f"{state['tokenizer_hash'][:12]}, the shards use {self.meta['tokenizer_sha256'][:12]}"])
        self.train_loader.load_state_dict(state["loader"])
        if self.is_main:
            print(f"[mmtrain] resumed from {os.path.join(root, tag)} at step {self.step}", flush=True)

    # ---- one step ----------------------------------------------------------------------------

    def _micro_batch(self, batch):
        input_ids = batch["input_ids"].to(self.device, non_blocking=True).long()
        labels = input_ids.clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask.to(self.device) == 0] = -100
        return input_ids, labels

    def train_step(self, batches) -> Dict[str, float]:
        """One optimizer step over ``gas`` micro-batches.

        The gradient is that of the logged loss: the sum of the token losses of the whole global
        batch (all micro-batches of all ranks) divided by its number of target tokens. Each
        micro-batch's mean loss is weighted by ``targets x gas x world / global targets``, undoing
        the engine's mean over micro-batches and ranks; with equal target counts (``concat``
        packing) the weight is exactly 1. Counts and losses stay on the device: one reduction of
        the target count before the forwards, one of the sums after.
        """
        self.engine.train()
        lr = self._current_lr()
        micro_batches = [self._micro_batch(next(batches)) for _ in range(self.gas)]
        targets = [(labels[:, self.label_shift:] != -100).sum().double() for _, labels in micro_batches]
        global_targets = _all_reduce_tensor(torch.stack(targets).sum()).clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm = None
        for micro, ((input_ids, labels), t) in enumerate(zip(micro_batches, targets)):
            out = self.engine(input_ids, labels=labels)
            weight = t * (self.gas * self.dist.world_size) / global_targets
            self.engine.backward(out.loss * weight.to(out.loss.dtype))
            if micro == self.gas - 1 and self.engine.zero_optimization_stage() == 0:
                grad_norm = self._grad_norm()  # ZeRO 0 does not report it; pre-clip, like ZeRO >= 1
            self.engine.step()
            loss_sum += out.loss.detach().double() * t
            n_tokens += (labels != -100).sum().double()
        loss_sum, n_tokens = _all_reduce_tensor(torch.stack([loss_sum, n_tokens])).tolist()
        return self._step_stats(loss_sum / float(global_targets), lr, grad_norm, n_tokens)

    def _current_lr(self) -> float:
        """The learning rate this step uses (read before the scheduler advances)."""
        opt = self.engine.optimizer
        return opt.param_groups[0]["lr"] if hasattr(opt, "param_groups") else self.engine.lr_scheduler.get_last_lr()[0]

    def _step_stats(self, loss: float, lr: float, grad_norm, n_tokens: float) -> Dict[str, float]:
        """Stop on a non-finite loss; take the engine's grad norm unless ZeRO 0 measured it."""
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss}) at step {self.step + 1}")
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens}

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    # ---- evaluation --------------------------------------------------------------------------

    def eval_lengths(self) -> List[int]:
        extra = sorted({int(n) for n in self.cfg.train.eval_n_ctx if int(n) < self.n_ctx})
        return extra + [self.n_ctx]

    @torch.no_grad()
    def evaluate(self) -> Dict[int, float]:
        """Mean validation loss per context length over the first eval_batches micro-batches.

        Shorter lengths L cut every n_ctx block into n_ctx // L consecutive blocks of L tokens.
        """
        if self.val_loader is None:
            self.val_loader = self._loader("val", shuffle=False, num_workers=0)
        self.engine.eval()
        sums = {n: [0.0, 0.0] for n in self.eval_lengths()}
        for i, batch in enumerate(self.val_loader):
            if i >= self.cfg.train.eval_batches:
                break
            input_ids, labels = self._micro_batch(batch)
            for n in sums:
                k = self.n_ctx // n
                ids = input_ids[:, : k * n].reshape(-1, n)
                lab = labels[:, : k * n].reshape(-1, n)
                out = self.engine(ids, labels=lab)
                targets = float((lab[:, self.label_shift:] != -100).sum())
                sums[n][0] += float(out.loss.float()) * targets
                sums[n][1] += targets
        flat = _all_reduce_sum([v for n in sums for v in sums[n]], self.device)
        self.engine.train()
        return {n: flat[2 * i] / max(flat[2 * i + 1], 1.0) for i, n in enumerate(sums)}

    # ---- checkpoint --------------------------------------------------------------------------

    def save(self) -> str:
        self.last_saved_step = self.step
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.train_loader.state_dict(),
            "config": to_dict(self.cfg),
            "tokenizer_hash": self.meta["tokenizer_sha256"],
            "vocab_size": self.vocab_size,
            "world_size": self.dist.world_size,
        }
        return ckpt.save(self.engine, self.run_dir, self.step, state, self.cfg.checkpoint.keep_last,
                         self.resolved_yaml, self.dist.rank)

    # ---- stop signals ------------------------------------------------------------------------

    def _install_stop_handlers(self) -> None:
        """SIGTERM / SIGUSR1 from now on only request a stop at the next step boundary."""
        self.stop_request = faults.StopRequest().install()
        self.stopped_by: Optional[str] = None
        self.last_saved_step = -1

    def _stop_at_step_boundary(self) -> bool:
        """True when any rank got a stop signal: every rank then saves this step (unless it just
        did) and the loop ends. A collective: call it on every rank after every step."""
        if self._done():
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

    # ---- loop --------------------------------------------------------------------------------

    def _done(self) -> bool:
        t = self.cfg.train
        if self.step >= t.steps or (t.stop_at > 0 and self.step >= t.stop_at):
            return True
        return t.max_tokens > 0 and self.tokens_seen >= t.max_tokens

    def _batches(self):
        from mmtrain.data.lm_dataset import iterate_forever

        return iterate_forever(self.train_loader)

    # ---- the loop: shared by every task (LM pretraining here, retrieval in mmtrain/retrieval.py) ----
    # A task supplies train_step, banner, before_loop, step_report and log_eval; run() owns the
    # cadence of logging, evaluation, checkpoints and stop signals.

    def banner(self) -> str:
        cfg = self.cfg
        return (f"[mmtrain] run dir {self.run_dir} | {cfg.model.kind} n_ctx={self.n_ctx} "
                f"params={self.model.num_params():,} | world={self.dist.world_size} "
                f"zero={cfg.engine.zero_stage} {cfg.engine.precision} | global batch "
                f"{cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {self.gas} x "
                f"{self.dist.world_size}")

    def before_loop(self) -> Dict[str, float]:
        """Work before the first step (retrieval evaluates the starting model); its summary."""
        return {}

    def step_report(self, stats: Dict[str, float], seconds: float):
        """One step's (metrics.jsonl fields, TensorBoard scalars, log line, progress postfix, summary)."""
        tps = stats["tokens"] / seconds
        mfu = tps * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        gn = "n/a" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}"
        record = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "tokens_seen": self.tokens_seen, "tokens_per_s": tps, "mfu": mfu, "step_time_s": seconds}
        scalars = {mon.TRAIN_LOSS: stats["loss"], mon.LR: stats["lr"], mon.GRAD_NORM: stats["grad_norm"],
                   mon.TOKENS_SEEN: self.tokens_seen, mon.TOKENS_PER_S: tps, mon.MFU: mfu}
        line = (f"step {self.step:>6}/{self.cfg.train.steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e} | "
                f"grad {gn} | {tps:,.0f} tok/s | mfu {100 * mfu:.1f}% | {seconds:.2f} s/step")
        postfix = {"loss": f"{stats['loss']:.4f}", "tok/s": f"{tps:,.0f}"}
        return record, scalars, line, postfix, {"loss": stats["loss"], "tokens_per_s": tps, "mfu": mfu}

    def log_eval(self) -> Dict[str, float]:
        """Evaluate, log it (TensorBoard, metrics.jsonl, console); its summary."""
        m = self.monitor
        losses = self.evaluate()
        m.scalars(self.step, {mon.eval_tag(n): v for n, v in losses.items()})
        m.record({"step": self.step, **{f"eval_loss_ctx{n}": v for n, v in losses.items()}})
        m.info("eval   " + " | ".join(f"ctx{n} {v:.4f}" for n, v in losses.items()))
        return {f"eval_loss_ctx{n}": v for n, v in losses.items()}

    def run(self) -> Dict[str, float]:
        cfg, m = self.cfg, self.monitor
        m.info(self.banner())
        m.text("config", "```\n" + self.resolved_yaml + "\n```")
        last = self.before_loop()
        batches = self._batches()
        eval_every, ckpt_every = cfg.train.eval_every, cfg.checkpoint.every
        while not self._done():
            with mon.StepTimer(self.device) as timer:
                stats = self.train_step(batches)
            self.step += 1
            faults.inject("step", self.step, self.dist.rank)  # test hook (MMTRAIN_FAULT); no-op otherwise
            self.tokens_seen += int(stats["tokens"])
            record, scalars, line, postfix, summary = self.step_report(stats, timer.seconds)
            last = dict(summary)   # the summary printed at the end: this step, and its evaluation if any
            m.record({"step": self.step, **record})
            m.advance(1, postfix)
            if self.step % cfg.logging.log_every == 0 or self.step == 1 or self._done():
                m.scalars(self.step, {**scalars, mon.STEP_TIME: timer.seconds,
                                      mon.MEMORY: mon.peak_memory_gb(self.device)})
                m.info(line)
            if (eval_every > 0 and self.step % eval_every == 0) or self._done():
                last.update(self.log_eval())
            if (ckpt_every > 0 and self.step % ckpt_every == 0) or self._done():
                m.info(f"saved {self.save()}")
            m.flush()
            if self._stop_at_step_boundary():
                break
        m.close()
        return last


def run_entry(argv: Optional[List[str]], schema, trainer_cls, prog: str) -> int:
    """Shared body of the training entry scripts: config -> trainer -> run -> exit code."""
    args = parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        trainer = trainer_cls(cfg)
    except ConfigError as exc:
        print(f"mmtrain {prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        last = trainer.run()
    except NonFiniteLoss as exc:
        latest = ckpt.read_latest(ckpt.checkpoint_root(trainer.run_dir))
        print(f"mmtrain {prog}: {exc}; stopping. Last good checkpoint: "
              f"{latest or 'none'} in {ckpt.checkpoint_root(trainer.run_dir)}", file=sys.stderr)
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


def main(argv: Optional[List[str]] = None) -> int:
    return run_entry(argv, PretrainConfig, Trainer, "pretrain")


if __name__ == "__main__":
    sys.exit(main())
