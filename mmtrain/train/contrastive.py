"""Contrastive retrieval training as a :class:`~mmtrain.train.trainer.Task`.

It starts from an exported bundle and pair shards made with the bundle's tokenizer. Each
micro-batch: its queries, their documents, and ``extra_negatives`` random plus ``hard_negatives``
BM25-mined training documents per query are embedded (``model(ids, lengths=..., pooling=...)``,
:mod:`mmtrain.models.embedding`), gathered across ranks with gradient and scored with InfoNCE
(:mod:`mmtrain.train.losses`). Each micro-batch is its own contrastive batch: negatives per query
= micro_batch_size x world size - 1 (+ extras); gradient accumulation adds none, gradient caching
(``grad_cache_chunk``) makes large batches fit. Evaluation: :mod:`mmtrain.eval.retrieval` on
``retrieval.eval_split`` at step 0, every ``train.eval_every`` steps and at the end, next to
recall on as many training pairs (``train_recall@1`` rising alone shows memorisation).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from mmtrain.config import ConfigError
from mmtrain.train import monitor as mon
from mmtrain.train.trainer import Task

NEGATIVES = "retrieval/negatives"
TEMPERATURE = "retrieval/temperature"
LOGIT_SCALE = "logit_scale"   # the learned temperature's parameter (retrieval.learn_temperature); not exported
MIN_TEMPERATURE = 0.01
# temperature = exp(-logit_scale), trained at LOGIT_SCALE_LR x train.lr: Adam steps are ~lr in parameter
# space, and at retrieval LRs the log-temperature would otherwise barely move in a run
LOGIT_SCALE_LR = 100.0


class ContrastiveTask(Task):
    """InfoNCE over (query, document) pairs, starting from a bundle."""

    name = "retrieval"

    def _pair_dir(self) -> str:
        """Where the pairs are read: data.shard_dir, or the node's copy of it when it is a URL
        (made by each node's local rank 0 while the others wait)."""
        from mmtrain.data.errors import DataError
        from mmtrain.data.remote import is_remote
        from mmtrain.data.pair_sources import local_pairs
        from mmtrain.data.sources import local_leader
        from mmtrain.train.trainer import barrier

        d = self.trainer.cfg.data
        if not is_remote(d.shard_dir):
            return d.shard_dir
        problem, kw = None, dict(retries=d.download_retry, timeout=d.download_timeout)
        if local_leader():
            try:
                local_pairs(d.shard_dir, d.cache_dir, fetch=True, **kw)
            except DataError as exc:
                problem = exc
        barrier()
        if problem is not None:
            raise ConfigError([f"data.shard_dir: {problem}"])
        try:
            return local_pairs(d.shard_dir, d.cache_dir, fetch=False, **kw)
        except DataError as exc:
            raise ConfigError([f"data.shard_dir: {exc}"]) from exc

    def _pairs_location(self) -> str:
        from mmtrain.data.remote import is_remote

        loc = self.cfg.data.shard_dir
        return loc if is_remote(loc) else os.path.abspath(loc)

    def setup(self) -> None:
        from mmtrain.data.errors import DataError
        from mmtrain.data.pairs import check_pairs, load_split
        from mmtrain.export.bundle import BundleError, bundle_file, load_bundle_tokenizer, read_bundle_config
        from mmtrain.train.losses import GradCache, num_negatives

        t = self.trainer
        cfg = self.cfg = t.cfg
        r = cfg.retrieval
        self.pair_dir = self._pair_dir()
        try:
            self.bundle_section = read_bundle_config(r.bundle)
            tokenizer = load_bundle_tokenizer(r.bundle)
            self.meta = check_pairs(self.pair_dir, tokenizer_sha256=tokenizer.sha256,
                                    model_n_ctx=self.bundle_section["model"]["n_ctx"], bundle=r.bundle,
                                    verify_hashes=True)
        except BundleError as exc:
            raise ConfigError([f"retrieval.bundle: {exc}"]) from exc
        except DataError as exc:
            raise ConfigError([f"data.shard_dir: {exc}"]) from exc
        stored = int(self.meta.get("hard_negatives", 0) or 0)
        if r.hard_negatives > stored:
            raise ConfigError([f"retrieval.hard_negatives: {r.hard_negatives} per query, but {cfg.data.shard_dir} "
                               f"stores {stored}; prepare the pairs with `mmtrain prepare-pairs ... "
                               f"hard_negatives={r.hard_negatives}`"])
        try:
            self.eval_split = load_split(self.pair_dir, r.eval_split, r.eval_max_pairs)
        except DataError as exc:
            raise ConfigError([f"retrieval.eval_split: {exc} (or set retrieval.eval_split=test)"]) from exc
        self.train_sample = (load_split(self.pair_dir, "train", r.eval_train_pairs)
                             if r.eval_train_pairs > 0 else None)
        pool_size = len(self.eval_split["pair_id"])
        self.eval_n = sorted({min(int(n), pool_size) for n in r.eval_n_candidates if pool_size >= 2})
        self.tokenizer_hash = self.meta["tokenizer_sha256"]
        self.vocab_size = int(self.bundle_section["model"]["vocab_size"])
        self.tokenizer_path = str(bundle_file(r.bundle, self.bundle_section["tokenizer"]["file"], "tokenizer file"))
        self.micro = cfg.train.micro_batch_size
        self.n_random = r.extra_negatives * self.micro
        self.n_hard = r.hard_negatives * self.micro
        self.extra = self.n_random + self.n_hard
        self.grad_cache = GradCache(r.grad_cache_chunk) if r.grad_cache_chunk > 0 else None
        world_negatives = t.dist.world_size if r.gather_negatives else 1
        self.negatives = num_negatives(self.micro, world_negatives, r.extra_negatives + r.hard_negatives)

    def run_name(self) -> str:
        model = self.bundle_section["model"]
        return f"{model['kind']}-retrieval-ctx{model['n_ctx']}"

    def engine_micro_steps(self):
        if self.grad_cache is None:
            return self.micro, self.trainer.gas
        # One engine micro-step per re-embedded chunk of sequences (queries, documents and extras).
        chunks = self.grad_cache.chunks(2 * self.micro + self.extra)
        return self.grad_cache.chunk_size, self.trainer.gas * len(chunks)

    def build_model(self) -> torch.nn.Module:
        from mmtrain.export.bundle import BundleError, load_pretrained

        r = self.cfg.retrieval
        try:
            model = load_pretrained(r.bundle).train()   # partitioned at ZeRO-3 (Trainer._build_model)
        except BundleError as exc:   # e.g. a weight file that differs from its recorded digest
            raise ConfigError([f"retrieval.bundle: {exc}"]) from None
        if r.learn_temperature:
            scale = torch.nn.Parameter(torch.full((1,), -math.log(r.temperature)))
            scale.lr_scale = LOGIT_SCALE_LR   # its own AdamW group (engine.param_groups)
            model.register_parameter(LOGIT_SCALE, scale)
        return model

    def train_loader(self):
        from mmtrain.data.pairs import build_pair_loader

        c = self.cfg
        return build_pair_loader(self.pair_dir, "train", self.micro, shuffle=c.data.shuffle, seed=c.train.seed,
                                 num_workers=c.data.num_workers)

    # ---- one micro-batch ---------------------------------------------------------------------

    def _extra_documents(self, batch, micro: int):
        """``n_random`` random training documents, seeded by (seed, step, rank, micro-batch), then the
        first ``hard_negatives`` mined negatives of each query of the batch."""
        t = self.trainer
        ds = t.train_loader.dataset
        gen = torch.Generator().manual_seed(((self.cfg.train.seed * 1_000_003 + t.step) * 4099 + t.dist.rank)
                                            * 131 + micro)
        idx = torch.randint(0, ds.size, (self.n_random,), generator=gen).tolist()
        if self.n_hard:
            idx += batch["negatives"][:, : self.cfg.retrieval.hard_negatives].reshape(-1).tolist()
        items = [ds.get_item(i) for i in idx]
        return (torch.stack([it["document_ids"] for it in items]),
                torch.stack([it["document_length"] for it in items]))

    def micro_batch(self, batch, micro: int):
        ids = [batch["query_ids"], batch["document_ids"]]
        lengths = [batch["query_length"], batch["document_length"]]
        if self.extra:
            e_ids, e_len = self._extra_documents(batch, micro)
            ids.append(e_ids)
            lengths.append(e_len)
        device = self.trainer.device
        return torch.cat(ids).to(device).long(), torch.cat(lengths).to(device).long()

    def counts(self, inputs):
        # every micro-batch's loss is a mean over the same number of queries
        _, lengths = inputs
        return torch.tensor(float(self.micro), dtype=torch.float64, device=lengths.device), lengths.sum().double()

    def _info_nce(self, embeddings: torch.Tensor) -> torch.Tensor:
        from mmtrain.train.losses import info_nce, split_embeddings

        r = self.cfg.retrieval
        parts = split_embeddings(embeddings, self.micro, self.extra)
        return info_nce(parts["queries"], parts["positives"], self._temperature(),
                        extra_negatives=parts["extra_negatives"], symmetric=r.symmetric, gather=r.gather_negatives)

    def loss(self, engine, inputs):
        ids, lengths = inputs
        pooling = self.cfg.retrieval.pooling

        def embed(i, l):
            return engine(i, lengths=l, pooling=pooling)

        if self.grad_cache is None:
            loss = self._info_nce(embed(ids, lengths))
            return loss, [loss]
        gc = self.grad_cache
        loss, grad = gc.representation_grads(self._info_nce, gc.embed_no_grad(embed, ids, lengths))
        chunks = gc.chunks(ids.shape[0])
        # the engine divides by its micro-steps (gas x chunks); the chunk part is undone here
        return loss, (gc.surrogate(embed(ids[s:e], lengths[s:e]), grad[s:e]) * len(chunks) for s, e in chunks)

    def _temperature(self):
        """The InfoNCE temperature: the configured one, or the learned exp(-logit_scale) (>= MIN_TEMPERATURE)."""
        if not self.cfg.retrieval.learn_temperature:
            return self.cfg.retrieval.temperature
        return torch.exp(-getattr(self.trainer.engine.module, LOGIT_SCALE)[0]).clamp(min=MIN_TEMPERATURE)

    def temperature(self) -> float:
        return float(self._temperature())

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def report(self, split: Optional[Dict[str, np.ndarray]] = None, n_candidates=None) -> Dict[str, float]:
        """Retrieval metrics on ``retrieval.eval_split`` (or ``split``); every rank embeds it (ZeRO-3
        forwards are collective)."""
        from mmtrain.eval.retrieval import score_split

        engine, pooling = self.trainer.engine, self.cfg.retrieval.pooling
        engine.eval()
        report = score_split(lambda i, l: engine(i, lengths=l, pooling=pooling),
                             self.eval_split if split is None else split,
                             self.eval_n if n_candidates is None else n_candidates,
                             self.cfg.retrieval.eval_seed, batch_size=max(self.micro, 16), device=self.trainer.device)
        engine.train()
        return report

    def evaluate(self) -> Dict[str, float]:
        m, step = self.trainer.monitor, self.trainer.step
        report = self.report()
        metrics = {k: v for k, v in report.items() if k not in ("queries", "pool")}
        if self.train_sample is not None:
            # the same pool size as the eval split, so the two recalls are comparable
            pool = min(len(self.train_sample["pair_id"]), report["pool"])
            train = self.report({k: v[:pool] for k, v in self.train_sample.items()}, [])
            metrics.update({f"train_{k}": train[k] for k in ("recall@1", "mrr@10")})
        m.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        m.record({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        m.text(mon.RETRIEVAL_TABLE, mon.retrieval_table(
            metrics, f"step {step}: {self.cfg.retrieval.eval_split} split, {report['queries']} queries, "
                     f"pool {report['pool']}"), step)
        m.info(f"eval   step {step} | {self.cfg.retrieval.eval_split} pool {report['pool']} | "
               + " | ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()))
        return {f"eval_{k}": v for k, v in metrics.items()}

    def before_loop(self) -> Dict[str, float]:
        return self.evaluate() if self.trainer.step == 0 else {}

    def hparams(self) -> Dict[str, Any]:
        # the model is the bundle's: its settings are hyperparameters of this run too
        model = {f"model.{k}": v for k, v in mon.flatten(self.bundle_section["model"]).items()}
        return {**super().hparams(), **mon.run_hparams({}, model)}

    # ---- checkpoint and reporting ------------------------------------------------------------

    def embedder_info(self) -> Dict[str, Any]:
        r = self.cfg.retrieval
        return {"pooling": r.pooling, "padding": "right", "normalize": True, "temperature": self.temperature(),
                "learned_temperature": bool(r.learn_temperature), "symmetric": r.symmetric,
                "base_bundle": os.path.abspath(r.bundle), "pairs": self._pairs_location(),
                "append_eos": self.meta.get("append_eos", True), "n_ctx": self.meta["n_ctx"]}

    def checkpoint_state(self) -> Dict[str, Any]:
        config = super().checkpoint_state()["config"]
        # What `mmtrain export` reads: the model config, and where the tokenizer is.
        config["model"] = dict(self.bundle_section["model"])
        config["data"]["tokenizer"] = self.tokenizer_path
        config["embedder"] = self.embedder_info()
        return {"config": config, "embedder": self.embedder_info()}

    def resume_config(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        # the checkpoint's config carries the bundle's model section and tokenizer path for export
        saved = {k: v for k, v in saved.items() if k not in ("model", "embedder")}
        return {**saved, "data": {k: v for k, v in saved.get("data", {}).items() if k != "tokenizer"}}

    def banner(self) -> str:
        t, cfg = self.trainer, self.cfg
        kind = self.bundle_section["model"]["kind"]
        return (f"[mmtrain] run dir {t.run_dir} | retrieval from {cfg.retrieval.bundle} ({kind}, "
                f"{t.model.num_params():,} params) | pairs {self._pairs_location()} (n_ctx {self.meta['n_ctx']}) | "
                f"world={t.dist.world_size} zero={cfg.engine.zero_stage} {cfg.engine.precision} | "
                f"{self.micro} pairs x {t.gas} accum x {t.dist.world_size} ranks | {self.negatives} negatives per query"
                + (f" | grad cache chunk {cfg.retrieval.grad_cache_chunk}" if self.grad_cache else ""))

    def step_report(self, stats: Dict[str, float], seconds: float):
        t = self.trainer
        tps = stats["tokens"] / seconds
        temperature = self.temperature()
        gn = "n/a" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}"
        record = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "tokens_seen": t.tokens_seen, "tokens_per_s": tps, "negatives": self.negatives,
                  "temperature": temperature, "step_time_s": seconds}
        scalars = {mon.TRAIN_LOSS: stats["loss"], mon.LR: stats["lr"], mon.GRAD_NORM: stats["grad_norm"],
                   mon.TOKENS_SEEN: t.tokens_seen, mon.TOKENS_PER_S: tps, NEGATIVES: self.negatives,
                   TEMPERATURE: temperature}
        line = (f"step {t.step:>6}/{self.cfg.train.steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e} | "
                f"grad {gn} | {self.negatives} negatives | {seconds:.2f} s/step")
        return record, scalars, line, {"loss": f"{stats['loss']:.4f}"}, {"loss": stats["loss"], "tokens_per_s": tps}
