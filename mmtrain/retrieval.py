"""Contrastive retrieval training (InfoNCE) of a pretrained mixer or transformer on the DeepSpeed engine.

Run it any of these ways (``--config`` repeatable, then ``key=value`` overrides)::

    deepspeed mmtrain/retrieval.py --config configs/retrieval/mixer-demo.yaml retrieval.bundle=bundles/mixer
    torchrun --nproc_per_node 2 mmtrain/retrieval.py --config ... engine.zero_stage=3
    python mmtrain/retrieval.py --config ...     /    python -m mmtrain.retrieval --config ...

It starts from an exported bundle (``mmtrain export``) and pair shards (``mmtrain prepare-pairs``
with the same bundle, so the tokenizers match). The embedding of a sequence is its final hidden
states pooled over the real tokens (``retrieval.pooling``: mean | last | second_to_last),
L2-normalised; inputs are right-padded, so the last real token is at ``length - 1`` and, the
models being causal, padding never changes a real token's state. Each step: queries, their
documents (plus ``extra_negatives`` random and ``hard_negatives`` BM25-mined training documents
per query) are embedded, gathered across ranks with gradient, and scored with InfoNCE
(:mod:`mmtrain.losses`; ``learn_temperature`` learns t); ``grad_cache_chunk`` > 0 embeds in
chunks with gradient caching.
Negatives per query = micro_batch_size x world size - 1 (+ extras); gradient accumulation does not
add negatives (each micro-batch is its own contrastive batch): use grad caching for larger batches.

Monitoring, checkpoints and exact resume work as in pretraining (same run-dir layout), plus the
retrieval evaluation of :mod:`mmtrain.retrieval_metrics` on ``retrieval.eval_split`` (default
``val``, carved from the training pairs by prepare-pairs) at step 0, every ``train.eval_every``
steps and at the end, next to recall on as many training pairs (``train_recall@1``: a run that
only memorises shows it rising alone). Export the result with ``mmtrain export-embedder
<run_dir> --out DIR`` (``mmtrain export`` + the embedder settings in config.json).

Exit codes: 0 done, 2 configuration / data error, 3 non-finite loss.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import copy
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmtrain import checkpoint as ckpt
from mmtrain import monitor as mon
from mmtrain.config import ConfigError, RetrievalConfig, to_dict, to_yaml
from mmtrain.pretrain import (Trainer, _all_reduce_sum, resolve_run_dir, run_entry,
                              seed_everything)

POOLINGS = ("last", "second_to_last", "mean")
NEGATIVES = "retrieval/negatives"
TEMPERATURE = "retrieval/temperature"
LOGIT_SCALE = "logit_scale"   # the learned temperature's parameter (retrieval.learn_temperature); not exported
MIN_TEMPERATURE = 0.01
# temperature = exp(-logit_scale), trained at LOGIT_SCALE_LR x train.lr: Adam steps are ~lr in parameter
# space, and at retrieval LRs the log-temperature would otherwise barely move in a run
LOGIT_SCALE_LR = 100.0


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """[B, L, d] hidden states of right-padded sequences of ``lengths`` -> [B, d] L2-normalised fp32."""
    lengths = lengths.to(hidden.device).long()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        out = hidden[rows, lengths - 1]
    elif pooling == "second_to_last":
        out = hidden[rows, (lengths - 2).clamp(min=0)]
    elif pooling == "mean":
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        out = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return F.normalize(out.float(), dim=-1)


def embed(model, input_ids: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Embeddings [B, d] of right-padded ``input_ids`` [B, L]; the pad tail beyond the longest is cut."""
    longest = int(lengths.max())
    return pool(model.hidden_states(input_ids[:, :longest]), lengths, pooling)


class _EmbedderForward:
    """``forward(input_ids, lengths) -> embeddings``: what the engine calls during retrieval training."""

    pooling = "last"

    def forward(self, input_ids, lengths):  # noqa: D401
        return embed(self, input_ids, lengths, self.pooling)


def as_embedder(model, pooling: str):
    """Give ``model`` an embedding forward without changing its parameters or state-dict names
    (so its checkpoints export like any LM checkpoint)."""
    cls = type(model)
    if not isinstance(model, _EmbedderForward):
        model.__class__ = type(f"{cls.__name__}Embedder", (_EmbedderForward, cls), {})
    model.pooling = pooling
    return model


@torch.no_grad()
def embed_arrays(encode, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 64,
                 device: Any = "cpu") -> np.ndarray:
    """``encode(ids, lengths)`` over batches (sorted by length, so padding is cut) -> [N, d] float32."""
    order = np.argsort(lengths, kind="stable")
    out: List[Optional[np.ndarray]] = [None] * len(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        e = encode(torch.as_tensor(ids[idx], device=device), torch.as_tensor(lengths[idx], device=device))
        for i, row in zip(idx, e.float().cpu().numpy()):
            out[i] = row
    return np.stack(out)


def score_split(encode, split: Dict[str, np.ndarray], n_candidates, seed: int = 0, batch_size: int = 64,
                device: Any = "cpu") -> Dict[str, float]:
    """Embed queries and documents of a loaded split and compute the retrieval report (cosine scores)."""
    from mmtrain.retrieval_metrics import retrieval_report

    q = embed_arrays(encode, split["query_ids"], split["query_length"], batch_size, device)
    d = embed_arrays(encode, split["document_ids"], split["document_length"], batch_size, device)
    return retrieval_report(q @ d.T, np.arange(len(d)), n_candidates, seed)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class RetrievalTrainer(Trainer):
    """Contrastive training run; reuses the pretraining Trainer's run-dir, checkpoint and loop helpers."""

    def __init__(self, cfg):  # noqa: C901 (setup is a list of checks)
        from mmtrain.bundle import BundleError, load_bundle_tokenizer, load_pretrained, read_bundle_config
        from mmtrain.data.errors import DataError
        from mmtrain.data.pairs import build_pair_loader, check_pairs, load_split
        from mmtrain.engine import build_engine, grad_accum_steps, init_distributed
        from mmtrain.losses import GradCache

        self.cfg = cfg
        r = cfg.retrieval
        self.dist = init_distributed(cfg.engine.device)
        self.gas = grad_accum_steps(cfg.train, self.dist.world_size)
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        seed_everything(cfg.train.seed)
        try:
            self.bundle_section = read_bundle_config(r.bundle)
            tokenizer = load_bundle_tokenizer(r.bundle)
            self.meta = check_pairs(cfg.data.shard_dir, tokenizer_sha256=tokenizer.sha256,
                                    model_n_ctx=self.bundle_section["model"]["n_ctx"], bundle=r.bundle)
        except BundleError as exc:
            raise ConfigError([f"retrieval.bundle: {exc}"]) from exc
        except DataError as exc:
            raise ConfigError([f"data.shard_dir: {exc}"]) from exc
        self.tokenizer_path = os.path.abspath(os.path.join(r.bundle, self.bundle_section["tokenizer"]["file"]))
        self.run_dir = resolve_run_dir(_NamedCfg(cfg, self.bundle_section["model"]), self.is_main)
        self._check_run_dir()

        self.model = as_embedder(load_pretrained(r.bundle).train(), r.pooling)
        if r.learn_temperature:
            scale = torch.nn.Parameter(torch.full((1,), -math.log(r.temperature)))
            scale.lr_scale = LOGIT_SCALE_LR   # its own AdamW group (engine.param_groups)
            self.model.register_parameter(LOGIT_SCALE, scale)
        self.vocab_size = self.model.vocab_size
        self.micro = cfg.train.micro_batch_size
        stored = int(self.meta.get("hard_negatives", 0) or 0)
        if r.hard_negatives > stored:
            raise ConfigError([f"retrieval.hard_negatives: {r.hard_negatives} per query, but {cfg.data.shard_dir} "
                               f"stores {stored}; prepare the pairs with `mmtrain prepare-pairs ... "
                               f"hard_negatives={r.hard_negatives}`"])
        self.n_random = r.extra_negatives * self.micro
        self.n_hard = r.hard_negatives * self.micro
        self.extra = self.n_random + self.n_hard
        self.grad_cache = GradCache(r.grad_cache_chunk) if r.grad_cache_chunk > 0 else None
        self.n_backward = 1
        engine_cfg = cfg
        if self.grad_cache is not None:
            # One engine micro-step per re-embedded chunk: the engine accumulates over all of them.
            self.n_backward = len(self.grad_cache.chunks(2 * self.micro + self.extra))
            engine_cfg = copy.deepcopy(cfg)
            with _unlocked(engine_cfg):
                engine_cfg.train.micro_batch_size = 1
                engine_cfg.train.global_batch_size = self.gas * self.n_backward * self.dist.world_size
        self._check_disk_space()
        self.engine, self.ds_config = build_engine(engine_cfg, self.model, self.dist.world_size)
        self.step = 0
        self.tokens_seen = 0
        self.resolved_yaml = to_yaml(cfg)
        self._write_run_files()
        self.train_loader = build_pair_loader(cfg.data.shard_dir, "train", self.micro, shuffle=cfg.data.shuffle,
                                              seed=cfg.train.seed, num_workers=cfg.data.num_workers)
        try:
            self.eval_split = load_split(cfg.data.shard_dir, r.eval_split, r.eval_max_pairs)
        except DataError as exc:
            raise ConfigError([f"retrieval.eval_split: {exc} (or set retrieval.eval_split=test)"]) from exc
        self.train_sample = (load_split(cfg.data.shard_dir, "train", r.eval_train_pairs)
                             if r.eval_train_pairs > 0 else None)
        pool_size = len(self.eval_split["pair_id"])
        self.eval_n = sorted({min(int(n), pool_size) for n in r.eval_n_candidates if pool_size >= 2})
        self._resume()
        self.world_negatives = self.dist.world_size if r.gather_negatives else 1
        from mmtrain.losses import num_negatives

        self.negatives = num_negatives(self.micro, self.world_negatives, r.extra_negatives + r.hard_negatives)
        if self.is_main:
            mon.truncate_metrics(self.run_dir, self.step)
        self.monitor = mon.Monitor(self.run_dir, self.is_main, cfg.train.steps, self.step, cfg.logging.progress_bar)
        self._install_stop_handlers()

    # ---- one step ----------------------------------------------------------------------------

    def _extra_documents(self, batch, micro: int):
        """``n_random`` random training documents, seeded by (seed, step, rank, micro-batch), then the
        first ``hard_negatives`` mined negatives of each query of the batch."""
        ds = self.train_loader.dataset
        gen = torch.Generator().manual_seed(
            ((self.cfg.train.seed * 1_000_003 + self.step) * 4099 + self.dist.rank) * 131 + micro)
        idx = torch.randint(0, ds.size, (self.n_random,), generator=gen).tolist()
        if self.n_hard:
            idx += batch["negatives"][:, : self.cfg.retrieval.hard_negatives].reshape(-1).tolist()
        items = [ds.get_item(i) for i in idx]
        return (torch.stack([it["document_ids"] for it in items]),
                torch.stack([it["document_length"] for it in items]))

    def _inputs(self, batch, micro: int):
        ids = [batch["query_ids"], batch["document_ids"]]
        lengths = [batch["query_length"], batch["document_length"]]
        if self.extra:
            e_ids, e_len = self._extra_documents(batch, micro)
            ids.append(e_ids)
            lengths.append(e_len)
        ids = torch.cat(ids).to(self.device).long()
        lengths = torch.cat(lengths).to(self.device).long()
        return ids, lengths

    def _loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        from mmtrain.losses import info_nce, split_embeddings

        r = self.cfg.retrieval
        parts = split_embeddings(embeddings, self.micro, self.extra)
        return info_nce(parts["queries"], parts["positives"], self._temperature(),
                        extra_negatives=parts["extra_negatives"], symmetric=r.symmetric,
                        gather=r.gather_negatives)

    def _temperature(self):
        """The InfoNCE temperature: the configured one, or the learned exp(-logit_scale) (>= MIN_TEMPERATURE)."""
        if not self.cfg.retrieval.learn_temperature:
            return self.cfg.retrieval.temperature
        return torch.exp(-getattr(self.engine.module, LOGIT_SCALE)[0]).clamp(min=MIN_TEMPERATURE)

    def temperature(self) -> float:
        return float(self._temperature())

    def train_step(self, batches) -> Dict[str, float]:
        self.engine.train()
        lr = self._current_lr()
        loss_sum, n_tokens, grad_norm = 0.0, 0.0, None
        zero0 = self.engine.zero_optimization_stage() == 0
        for micro in range(self.gas):
            ids, lengths = self._inputs(next(batches), micro)
            n_tokens += float(lengths.sum())
            if self.grad_cache is None:
                loss = self._loss(self.engine(ids, lengths))
                self.engine.backward(loss)
                if micro == self.gas - 1 and zero0:
                    grad_norm = self._grad_norm()
                self.engine.step()
            else:
                gc = self.grad_cache
                cached = gc.embed_no_grad(lambda i, l: self.engine(i, l), ids, lengths)
                loss, grad = gc.representation_grads(self._loss, cached)
                for c, (s, e) in enumerate(gc.chunks(ids.shape[0])):
                    surrogate = gc.surrogate(self.engine(ids[s:e], lengths[s:e]), grad[s:e])
                    # the engine divides by its accumulation steps (gas x chunks); undo the chunk part
                    self.engine.backward(surrogate * self.n_backward)
                    if micro == self.gas - 1 and c == self.n_backward - 1 and zero0:
                        grad_norm = self._grad_norm()
                    self.engine.step()
            loss_sum += float(loss.detach())
        # every rank holds the same gathered loss; the sum keeps the non-gathered case honest too
        loss_sum, n_tokens = _all_reduce_sum([loss_sum, n_tokens], self.device)
        loss = loss_sum / (self.gas * self.dist.world_size)
        return self._step_stats(loss, lr, grad_norm, n_tokens)

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: Optional[Dict[str, np.ndarray]] = None, n_candidates=None) -> Dict[str, float]:
        """Retrieval metrics on ``retrieval.eval_split`` (or ``split``); every rank embeds it (ZeRO-3
        forwards are collective)."""
        self.engine.eval()
        report = score_split(lambda i, l: self.engine(i, l), self.eval_split if split is None else split,
                             self.eval_n if n_candidates is None else n_candidates,
                             self.cfg.retrieval.eval_seed, batch_size=max(self.micro, 16), device=self.device)
        self.engine.train()
        return report

    def log_eval(self) -> Dict[str, float]:
        report = self.evaluate()
        metrics = {k: v for k, v in report.items() if k not in ("queries", "pool")}
        if self.train_sample is not None:
            # the same pool size as the eval split, so the two recalls are comparable
            pool = min(len(self.train_sample["pair_id"]), report["pool"])
            sample = {k: v[:pool] for k, v in self.train_sample.items()}
            train = self.evaluate(sample, [])
            metrics.update({f"train_{k}": train[k] for k in ("recall@1", "mrr@10")})
        self.monitor.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.monitor.record({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.monitor.info(f"eval   step {self.step} | {self.cfg.retrieval.eval_split} pool {report['pool']} | "
                          + " | ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()))
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ---- checkpoint --------------------------------------------------------------------------

    def embedder_info(self) -> Dict[str, Any]:
        r = self.cfg.retrieval
        return {"pooling": r.pooling, "padding": "right", "normalize": True, "temperature": self.temperature(),
                "learned_temperature": bool(r.learn_temperature),
                "symmetric": r.symmetric, "base_bundle": os.path.abspath(r.bundle),
                "pairs": os.path.abspath(self.cfg.data.shard_dir), "append_eos": self.meta.get("append_eos", True),
                "n_ctx": self.meta["n_ctx"]}

    def save(self) -> str:
        config = to_dict(self.cfg)
        # What `mmtrain export` reads: the model config, and where the tokenizer is.
        config["model"] = dict(self.bundle_section["model"])
        config["data"]["tokenizer"] = self.tokenizer_path
        config["embedder"] = self.embedder_info()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.train_loader.state_dict(),
                 "config": config, "tokenizer_hash": self.meta["tokenizer_sha256"], "vocab_size": self.vocab_size,
                 "world_size": self.dist.world_size, "embedder": self.embedder_info()}
        self.last_saved_step = self.step
        return ckpt.save(self.engine, self.run_dir, self.step, state, self.cfg.checkpoint.keep_last,
                         self.resolved_yaml, self.dist.rank)

    # ---- the loop's hooks (the loop itself is Trainer.run) -------------------------------------

    def banner(self) -> str:
        cfg = self.cfg
        kind = self.bundle_section["model"]["kind"]
        return (f"[mmtrain] run dir {self.run_dir} | retrieval from {cfg.retrieval.bundle} ({kind}, "
                f"{self.model.num_params():,} params) | pairs {cfg.data.shard_dir} (n_ctx {self.meta['n_ctx']}) | "
                f"world={self.dist.world_size} zero={cfg.engine.zero_stage} {cfg.engine.precision} | "
                f"{self.micro} pairs x {self.gas} accum x {self.dist.world_size} ranks | "
                f"{self.negatives} negatives per query"
                + (f" | grad cache chunk {cfg.retrieval.grad_cache_chunk}" if self.grad_cache else ""))

    def before_loop(self) -> Dict[str, float]:
        return self.log_eval() if self.step == 0 else {}

    def step_report(self, stats: Dict[str, float], seconds: float):
        tps = stats["tokens"] / seconds
        temperature = self.temperature()
        gn = "n/a" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}"
        record = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "tokens_seen": self.tokens_seen, "tokens_per_s": tps, "negatives": self.negatives,
                  "temperature": temperature, "step_time_s": seconds}
        scalars = {mon.TRAIN_LOSS: stats["loss"], mon.LR: stats["lr"], mon.GRAD_NORM: stats["grad_norm"],
                   mon.TOKENS_SEEN: self.tokens_seen, mon.TOKENS_PER_S: tps, NEGATIVES: self.negatives,
                   TEMPERATURE: temperature}
        line = (f"step {self.step:>6}/{self.cfg.train.steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e} | "
                f"grad {gn} | {self.negatives} negatives | {seconds:.2f} s/step")
        return record, scalars, line, {"loss": f"{stats['loss']:.4f}"}, {"loss": stats["loss"], "tokens_per_s": tps}


class _NamedCfg:
    """cfg as resolve_run_dir expects it (default run name <kind>-retrieval-ctx<n>-<time>)."""

    def __init__(self, cfg, model: Dict[str, Any]):
        self.logging = cfg.logging
        self.model = OmegaConf.create({"kind": f"{model['kind']}-retrieval", "n_ctx": model["n_ctx"]})


class _unlocked:
    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_readonly(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    return run_entry(argv, RetrievalConfig, RetrievalTrainer, "retrieval")


if __name__ == "__main__":
    sys.exit(main())
