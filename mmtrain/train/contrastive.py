"""Contrastive retrieval training as a :class:`~mmtrain.train.task.Task`.

It starts from an exported bundle and pair shards made with the bundle's tokenizer. Each
micro-batch: its queries, their documents, and ``extra_negatives`` random plus ``hard_negatives``
BM25-mined training documents per query are embedded (:class:`mmtrain.models.embedding.Embedder`:
the bundle's LM, the pooling and an optional learned temperature, one module for the engine), gathered across ranks with gradient and scored with InfoNCE
(:mod:`mmtrain.train.losses`). Each micro-batch is its own contrastive batch: negatives per query
= micro_batch_size x world size - 1 (+ extras); gradient accumulation adds none, gradient caching
(``grad_cache_chunk``) makes large batches fit. Evaluation: :mod:`mmtrain.eval.retrieval` on
``retrieval.eval_split`` at step 0, every ``train.eval_every`` steps and at the end, next to
recall on as many training pairs (``train_recall@1`` rising alone shows memorisation).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from mmtrain.config import ConfigError
from mmtrain.train import monitor as mon
from mmtrain.train.task import Batch, Evaluation, RunContext, StepOutput, Task, TaskInfo

NEGATIVES = "retrieval/negatives"
TEMPERATURE = "retrieval/temperature"


class ContrastiveTask(Task):
    """InfoNCE over (query, document) pairs, starting from a bundle."""

    name = "retrieval"

    def _pair_dir(self) -> str:
        """Where the pairs are read: data.shard_dir, or the node's copy of it when it is a URL
        (made by each node's local rank 0 while the others wait)."""
        from mmtrain.data.errors import DataError
        from mmtrain.data.remote import is_remote
        from mmtrain.data.pair_sources import local_pairs
        from mmtrain.train.trainer import local_leader_first

        d = self.cfg.data
        if not is_remote(d.shard_dir):
            return d.shard_dir
        kw = dict(retries=d.download_retry, timeout=d.download_timeout)
        try:
            local_leader_first(lambda: local_pairs(d.shard_dir, d.cache_dir, fetch=True, **kw))
            return local_pairs(d.shard_dir, d.cache_dir, fetch=False, **kw)
        except DataError as exc:
            raise ConfigError([f"data.shard_dir: {exc}"]) from exc

    def _pairs_location(self) -> str:
        from mmtrain.data.remote import is_remote

        loc = self.cfg.data.shard_dir
        return loc if is_remote(loc) else os.path.abspath(loc)

    def setup(self, ctx: RunContext) -> TaskInfo:
        from mmtrain.data.errors import DataError
        from mmtrain.data.pairs import check_pairs, load_split
        from mmtrain.export.bundle import BundleError, bundle_file, load_bundle_tokenizer, read_bundle_config
        from mmtrain.train.losses import GradCache, num_negatives

        self.ctx, cfg = ctx, ctx.cfg
        self.cfg = cfg
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
        self.vocab_size = int(self.bundle_section["model"]["vocab_size"])
        self.tokenizer_path = str(bundle_file(r.bundle, self.bundle_section["tokenizer"]["file"], "tokenizer file"))
        self.micro = cfg.train.micro_batch_size
        self.n_random = r.extra_negatives * self.micro
        self.n_hard = r.hard_negatives * self.micro
        self.extra = self.n_random + self.n_hard
        self.grad_cache = GradCache(r.grad_cache_chunk) if r.grad_cache_chunk > 0 else None
        world_negatives = ctx.world_size if r.gather_negatives else 1
        self.negatives = num_negatives(self.micro, world_negatives, r.extra_negatives + r.hard_negatives)
        model = self.bundle_section["model"]
        if self.grad_cache is None:
            micro_batch, micro_steps = self.micro, ctx.gas
        else:   # one engine micro-step per re-embedded chunk of sequences (queries, documents and extras)
            chunks = self.grad_cache.chunks(2 * self.micro + self.extra)
            micro_batch, micro_steps = self.grad_cache.chunk_size, ctx.gas * len(chunks)
        describe = (f"retrieval from {r.bundle} ({model['kind']}) | pairs {self._pairs_location()} (n_ctx "
                    f"{self.meta['n_ctx']}) | {self.negatives} negatives per query"
                    + (f" | grad cache chunk {r.grad_cache_chunk}" if self.grad_cache else "") + " |")
        # the model is the bundle's: its settings are hyperparameters of this run too
        hparams = mon.run_hparams({}, {f"model.{k}": v for k, v in mon.flatten(model).items()})
        return TaskInfo(run_name=f"{model['kind']}-retrieval-ctx{model['n_ctx']}",
                        tokenizer_hash=self.meta["tokenizer_sha256"], vocab_size=self.vocab_size, describe=describe,
                        micro_batch=micro_batch, micro_steps=micro_steps, hparams=hparams,
                        step_tags={"negatives": NEGATIVES, "temperature": TEMPERATURE}, evaluate_at_start=True)

    def build_model(self) -> torch.nn.Module:
        from mmtrain.export.bundle import BundleError, load_pretrained

        from mmtrain.models.embedding import Embedder

        r = self.cfg.retrieval
        try:
            lm = load_pretrained(r.bundle).train()   # partitioned at ZeRO-3 (Trainer._build_model)
        except BundleError as exc:   # e.g. a weight file that differs from its recorded digest
            raise ConfigError([f"retrieval.bundle: {exc}"]) from None
        self.model = Embedder(lm, r.pooling, r.temperature if r.learn_temperature else None)
        return self.model

    def train_loader(self):
        from mmtrain.data.pairs import build_pair_loader

        c = self.cfg
        self.loader = build_pair_loader(self.pair_dir, "train", self.micro, shuffle=c.data.shuffle, seed=c.train.seed,
                                        num_workers=c.data.num_workers)
        return self.loader

    # ---- one micro-batch ---------------------------------------------------------------------

    def _extra_documents(self, batch, micro: int, step: int):
        """``n_random`` random training documents, seeded by (seed, step, rank, micro-batch), then the
        first ``hard_negatives`` mined negatives of each query of the batch."""
        ds = self.loader.dataset
        gen = torch.Generator().manual_seed(((self.cfg.train.seed * 1_000_003 + step) * 4099 + self.ctx.rank)
                                            * 131 + micro)
        idx = torch.randint(0, ds.size, (self.n_random,), generator=gen).tolist()
        if self.n_hard:
            idx += batch["negatives"][:, : self.cfg.retrieval.hard_negatives].reshape(-1).tolist()
        items = [ds.get_item(i) for i in idx]
        return (torch.stack([it["document_ids"] for it in items]),
                torch.stack([it["document_length"] for it in items]))

    def batch(self, raw, micro: int, step: int) -> Batch:
        ids = [raw["query_ids"], raw["document_ids"]]
        lengths = [raw["query_length"], raw["document_length"]]
        if self.extra:
            e_ids, e_len = self._extra_documents(raw, micro, step)
            ids.append(e_ids)
            lengths.append(e_len)
        device = self.ctx.device
        ids, lengths = torch.cat(ids).to(device).long(), torch.cat(lengths).to(device).long()
        # every micro-batch's loss is a mean over the same number of queries
        return Batch((ids, lengths), torch.tensor(float(self.micro), dtype=torch.float64, device=device),
                     lengths.sum().double())

    def _info_nce(self, embeddings: torch.Tensor, temperature) -> torch.Tensor:
        from mmtrain.train.losses import info_nce, split_embeddings

        r = self.cfg.retrieval
        parts = split_embeddings(embeddings, self.micro, self.extra)
        return info_nce(parts["queries"], parts["positives"], temperature,
                        extra_negatives=parts["extra_negatives"], symmetric=r.symmetric, gather=r.gather_negatives)

    def loss(self, engine, batch: Batch) -> StepOutput:
        ids, lengths = batch.inputs
        temperature = self._temperature()

        def embed(i, l):
            return engine(i, l)

        def info_nce(embeddings):
            return self._info_nce(embeddings, temperature)

        # a learned temperature stays a tensor here: the Trainer reads it once per step
        metrics = {"negatives": self.negatives,
                   "temperature": temperature.detach() if torch.is_tensor(temperature) else temperature}
        if self.grad_cache is None:
            loss = info_nce(embed(ids, lengths))
            return StepOutput(loss, [loss], metrics)
        gc = self.grad_cache
        loss, grad = gc.representation_grads(info_nce, gc.embed_no_grad(embed, ids, lengths))
        chunks = gc.chunks(ids.shape[0])
        # the engine divides by its micro-steps (gas x chunks); the chunk part is undone here
        return StepOutput(loss, (gc.surrogate(embed(ids[s:e], lengths[s:e]), grad[s:e]) * len(chunks)
                                 for s, e in chunks), metrics)

    def _temperature(self):
        """The InfoNCE temperature: the configured one, or the embedder's learned one."""
        learned = self.model.learned_temperature()
        return self.cfg.retrieval.temperature if learned is None else learned

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def report(self, engine, split: Optional[Dict[str, np.ndarray]] = None, n_candidates=None) -> Dict[str, float]:
        """Retrieval metrics on ``retrieval.eval_split`` (or ``split``); every rank embeds it (ZeRO-3
        forwards are collective)."""
        from mmtrain.eval.retrieval import score_split

        engine.eval()
        report = score_split(lambda i, l: engine(i, l),
                             self.eval_split if split is None else split,
                             self.eval_n if n_candidates is None else n_candidates,
                             self.cfg.retrieval.eval_seed, batch_size=max(self.micro, 16), device=self.ctx.device)
        engine.train()
        return report

    def evaluate(self, engine, step: int) -> Evaluation:
        report = self.report(engine)
        metrics = {k: v for k, v in report.items() if k not in ("queries", "pool")}
        if self.train_sample is not None:
            # the same pool size as the eval split, so the two recalls are comparable
            pool = min(len(self.train_sample["pair_id"]), report["pool"])
            train = self.report(engine, {k: v[:pool] for k, v in self.train_sample.items()}, [])
            metrics.update({f"train_{k}": train[k] for k in ("recall@1", "mrr@10")})
        split = self.cfg.retrieval.eval_split
        table = mon.retrieval_table(metrics, f"step {step}: {split} split, {report['queries']} queries, "
                                             f"pool {report['pool']}")
        return Evaluation({f"eval_{k}": v for k, v in metrics.items()}, {f"eval/{k}": v for k, v in metrics.items()},
                          f"eval   step {step} | {split} pool {report['pool']} | "
                          + " | ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()),
                          texts={mon.RETRIEVAL_TABLE: table})

    # ---- checkpoint and reporting ------------------------------------------------------------

    def embedder_info(self) -> Dict[str, Any]:
        r = self.cfg.retrieval
        return {"pooling": r.pooling, "padding": "right", "normalize": True, "temperature": float(self._temperature()),
                "learned_temperature": bool(r.learn_temperature), "symmetric": r.symmetric,
                "base_bundle": os.path.abspath(r.bundle), "pairs": self._pairs_location(),
                "append_eos": self.meta.get("append_eos", True), "n_ctx": self.meta["n_ctx"]}

    def state_dict(self) -> Dict[str, Any]:
        """What `mmtrain export` reads besides the config: the bundle's model section, the tokenizer's
        path and the embedder's settings."""
        info = self.embedder_info()
        return {"export": {"model": dict(self.bundle_section["model"]), "tokenizer": self.tokenizer_path,
                           "embedder": info}, "embedder": info}
