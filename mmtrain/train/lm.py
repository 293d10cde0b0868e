"""LM pretraining as a :class:`~mmtrain.train.task.Task`: next-token loss over packed shards,
validation loss at every evaluation context length, throughput and MFU in the step report."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Tuple

import torch

from mmtrain.config import ConfigError
from mmtrain.train import monitor as mon
from mmtrain.train.task import Batch, Evaluation, RunContext, StepOutput, Task, TaskInfo
from mmtrain.train.trainer import all_reduce_sum, local_leader_first


def ensure_shards(cfg, is_main: bool) -> Dict:
    """Check the shards for model.n_ctx of every source (auto-preparing the demo corpus on first
    use; the node's local rank 0 bringing the cache of a URL up to date first)."""
    from mmtrain.data.errors import DataError
    from mmtrain.data.shards import ctx_dir
    from mmtrain.data.sources import check_sources, fetch_sources, sources_of

    n_ctx = cfg.model.n_ctx
    try:
        srcs = sources_of(cfg.data)
    except DataError as exc:
        raise ConfigError([f"data.{'streams' if len(cfg.data.streams) else 'shard_dir'}: {exc}"]) from exc
    shard_dir = cfg.data.shard_dir
    if (is_main and cfg.data.auto_prepare and cfg.data.prepare_input == "demo" and not len(cfg.data.streams)
            and not srcs[0].remote and not (ctx_dir(shard_dir, n_ctx) / "meta.json").is_file()):
        from mmtrain.data.prepare import demo_prepare_config, prepare

        print(f"[mmtrain] preparing demo shards for n_ctx={n_ctx} in {shard_dir} (first use; cached)",
              flush=True)
        kwargs = {"tokenizer": cfg.data.tokenizer} if cfg.data.tokenizer else {}
        from mmtrain.files import OutputError

        try:
            prepare(demo_prepare_config(shard_dir, [n_ctx], **kwargs))
        except (DataError, OutputError) as exc:
            raise ConfigError([f"data.auto_prepare: {exc}"]) from exc
    expected_hash = None
    if cfg.data.tokenizer:
        from mmtrain.data.tokenizer import load_tokenizer

        expected_hash = load_tokenizer(cfg.data.tokenizer).sha256
    key = "data.streams" if len(cfg.data.streams) else "data.shard_dir"
    fetch = dict(verify=cfg.data.verify_shards, retries=cfg.data.download_retry, timeout=cfg.data.download_timeout)
    try:
        # one process per node fills the node's caches (and has prepared the demo shards); then every rank checks
        local_leader_first(lambda: fetch_sources(srcs, n_ctx, **fetch))
        return srcs, check_sources(srcs, n_ctx, tokenizer_hash=expected_hash, vocab_size=cfg.model.vocab_size or None,
                                   fetch=False, **fetch)
    except DataError as exc:
        raise ConfigError([f"{key}: {exc}"]) from exc


def check_token_ids(ids: torch.Tensor, vocab_size: int, shard_dir: str) -> None:
    """DataError unless every id of a (host) batch is a token of the vocabulary: a corrupt shard
    read as tokens is stopped here instead of indexing past the embedding table."""
    from mmtrain.data.errors import DataError

    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise DataError(f"{shard_dir}: a batch holds token id {high if high >= vocab_size else low}, outside the "
                        f"vocabulary 0..{vocab_size - 1}: the shards are corrupt; re-run `mmtrain prepare`")


class LMTask(Task):
    """Next-token (or, for the autoencoder, reconstruction) loss on the token shards."""

    name = "pretrain"

    def setup(self, ctx: RunContext) -> TaskInfo:
        self.ctx, cfg = ctx, ctx.cfg
        self.cfg, self.n_ctx = cfg, cfg.model.n_ctx
        self.sources, self.meta = ensure_shards(cfg, ctx.is_main)
        self.mixture = len(self.sources) > 1
        self.data_name = ", ".join(s.location for s in self.sources)   # named when a batch is corrupt
        self.vocab_size = int(self.meta["vocab_size"])
        self.val_loaders = None           # one per source, built at the first evaluation
        self.tokenizer = None             # loaded at the first evaluation that logs samples
        weights = lambda s: "".join(f" {k} {v:g}" for k, v in s.weights().items())   # noqa: E731
        data = " + ".join(f"{s.name or 'data'} {s.describe()}{weights(s)}" for s in self.sources)
        hparams = {}
        if self.mixture:   # each stream's location and weights (lists are not HParams values)
            for s in self.sources:
                hparams[f"data.streams.{s.name}.shard_dir"] = s.location
                hparams.update({f"data.streams.{s.name}.{k}": v for k, v in s.weights().items()})
        self.info = TaskInfo(run_name=f"{cfg.model.kind}-ctx{self.n_ctx}", tokenizer_hash=self.meta["tokenizer_sha256"],
                             vocab_size=self.vocab_size, describe=f"data {data} | {cfg.model.kind} n_ctx={self.n_ctx}",
                             micro_batch=cfg.train.micro_batch_size, micro_steps=ctx.gas, data=self._data_fingerprint(),
                             hparams=hparams)
        return self.info

    def _data_fingerprint(self) -> Dict:
        """Besides tokenizer and vocabulary: the recipe that prepared the shards (meta.json) and a
        digest of their indexes (:func:`mmtrain.data.shards.index_digest`)."""
        from mmtrain.data.shards import index_digest, read_meta

        if self.mixture:   # every stream's recipe and index, with its weights
            parts = [{"name": s.name, **s.weights(), "prepare": read_meta(s.local, self.n_ctx).get("prepare") or {},
                      "digest": index_digest(s.local, self.n_ctx)} for s in self.sources]
            digest = hashlib.sha256(json.dumps([{k: v for k, v in p.items() if k != "prepare"} for p in parts],
                                               sort_keys=True).encode()).hexdigest()
            prepare = {"streams": [{"name": p["name"], **p["prepare"]} for p in parts]}
        else:
            digest, prepare = index_digest(self.sources[0].local, self.n_ctx), self.meta.get("prepare") or {}
        return {"prepare": prepare, "digest": digest}

    def build_model(self) -> torch.nn.Module:
        from mmtrain.models import build_model

        model = build_model(self.cfg.model, self.vocab_size)
        self.label_shift = model.label_shift  # targets of out.loss: labels[:, shift:] (0 = autoencoder)
        self.info.flops_per_token = model.flops_per_token(self.n_ctx)   # MFU's numerator, the same on every device
        return model

    def _loader(self, split: str, shuffle: bool, num_workers: int, sources=None):
        from mmtrain.data.lm_dataset import build_lm_loader

        c = self.cfg
        return build_lm_loader(
            sources or self.sources, self.n_ctx, split, c.train.micro_batch_size, shuffle=shuffle, seed=c.train.seed,
            num_workers=num_workers, drop_last=split == "train", num_canonical_nodes=c.data.num_canonical_nodes,
            meta=self.meta, retries=c.data.download_retry, timeout=c.data.download_timeout,
            cache_limit=c.data.cache_limit or None, predownload=c.data.predownload or None)

    def train_loader(self):
        return self._loader("train", shuffle=self.cfg.data.shuffle, num_workers=self.cfg.data.num_workers)

    def _inputs(self, raw):
        """(input_ids, labels) on the device; padding is -100 in the labels."""
        check_token_ids(raw["input_ids"], self.vocab_size, self.data_name)
        device = self.ctx.device
        input_ids = raw["input_ids"].to(device, non_blocking=True).long()
        labels = input_ids.clone()
        mask = raw.get("attention_mask")
        if mask is not None:
            labels[mask.to(device) == 0] = -100
        return input_ids, labels

    def batch(self, raw, micro: int, step: int) -> Batch:
        input_ids, labels = self._inputs(raw)
        return Batch((input_ids, labels), (labels[:, self.label_shift:] != -100).sum().double(),
                     (labels != -100).sum().double())

    def loss(self, engine, batch: Batch) -> StepOutput:
        input_ids, labels = batch.inputs
        out = engine(input_ids, labels=labels)
        return StepOutput(out.loss, [out.loss])

    # ---- evaluation --------------------------------------------------------------------------

    def eval_lengths(self) -> List[int]:
        extra = sorted({int(n) for n in self.cfg.train.eval_n_ctx if int(n) < self.n_ctx})
        return extra + [self.n_ctx]

    @torch.no_grad()
    def eval_sums(self, engine) -> torch.Tensor:
        """[sources, lengths, 2]: (loss x targets, targets) of the first eval_batches validation
        micro-batches of every source, summed over ranks. Shorter lengths L cut every n_ctx block
        into n_ctx // L consecutive blocks of L tokens."""
        from mmtrain.eval.lm import cut_blocks

        if self.val_loaders is None:
            self.val_loaders = [self._loader("val", shuffle=False, num_workers=0, sources=[s]) for s in self.sources]
        device = self.ctx.device
        engine.eval()
        lengths = self.eval_lengths()
        sums = torch.zeros(len(self.sources), len(lengths), 2, dtype=torch.float64, device=device)
        for k, loader in enumerate(self.val_loaders):
            for i, batch in enumerate(loader):
                if i >= self.cfg.train.eval_batches:
                    break
                input_ids, labels = self._inputs(batch)
                for j, n in enumerate(lengths):
                    ids, lab = cut_blocks(input_ids, n), cut_blocks(labels, n)
                    targets = (lab[:, self.label_shift:] != -100).sum().double()
                    sums[k, j] += torch.stack([engine(ids, labels=lab).loss.double() * targets, targets])
        sums = all_reduce_sum(sums)
        engine.train()
        return sums

    def evaluate(self, engine, step: int) -> Evaluation:
        sums = self.eval_sums(engine)
        lengths = self.eval_lengths()
        losses = {n: s / max(t, 1.0) for n, (s, t) in zip(lengths, sums.sum(0).tolist())}
        scalars = {mon.eval_tag(n): v for n, v in losses.items()}
        record = {f"eval_loss_ctx{n}": v for n, v in losses.items()}
        per_stream = []
        if self.mixture:   # each stream's own loss besides the token-weighted mean over all of them
            for src, rows in zip(self.sources, sums.tolist()):
                for n, (s, t) in zip(lengths, rows):
                    scalars[mon.eval_tag(n, src.name)] = record[f"eval_loss_ctx{n}/{src.name}"] = s / max(t, 1.0)
                per_stream.append(f"{src.name} {rows[-1][0] / max(rows[-1][1], 1.0):.4f}")
        line = ("eval   " + " | ".join(f"ctx{n} {v:.4f}" for n, v in losses.items())
                + (f" | ctx{self.n_ctx} per stream: " + ", ".join(per_stream) if per_stream else ""))
        ev = Evaluation(record, scalars, line)
        self.add_samples(ev, engine.module)
        return ev

    # ---- generated samples (TensorBoard text) ---------------------------------------------------

    def sample_refusal(self, model) -> str:
        """Why evaluations log no generated samples ('' when they do)."""
        from mmtrain.eval.generate import generation_refusal

        refusal = generation_refusal(model)
        if refusal:
            return refusal
        if self.cfg.engine.zero_stage == 3:
            # every forward pass gathers the partitioned parameters with collectives all ranks
            # must join; a rank-0-only decoding loop would hang the others (or read empty shards)
            return "engine.zero_stage 3 partitions the parameters across ranks; rank 0 cannot decode alone"
        return ""

    def add_samples(self, ev: Evaluation, model) -> None:
        """Rank 0: greedy continuations of ``logging.sample_prompts`` as TensorBoard text
        (:data:`~mmtrain.train.monitor.SAMPLES`); skipped, with a note saying why, for models that
        cannot generate and under ZeRO-3."""
        lg = self.cfg.logging
        if not self.ctx.is_main or lg.sample_tokens <= 0 or not lg.sample_prompts:
            return
        refusal = self.sample_refusal(model)
        if refusal:
            ev.notes.append(f"[mmtrain] no generated samples in TensorBoard: {refusal}")
            return
        ev.texts[mon.SAMPLES] = mon.samples_markdown(self.generate_samples(model))

    @torch.no_grad()
    def generate_samples(self, model) -> List[Tuple[str, str, str]]:
        """(prompt, continuation, note) for every ``logging.sample_prompts`` prompt: the model as it
        is now continues it greedily by up to ``logging.sample_tokens`` tokens (the prompt starts a
        document, as in the shards; stops at EOS or n_ctx). The model is in eval mode meanwhile and
        gets its previous mode back. Uses no random numbers (training stays reproducible)."""
        from mmtrain.data.shards import shard_tokenizer_path
        from mmtrain.eval.generate import STOP_EOS, encode_prompt, generate

        if self.tokenizer is None:
            from mmtrain.data.tokenizer import load_tokenizer

            from mmtrain.data.sources import sources_of

            first = sources_of(self.cfg.data)[0]   # a URL's tokenizer is in its cache (fetched at setup)
            self.tokenizer = load_tokenizer(shard_tokenizer_path(first.local, self.n_ctx))
        tok, n_tokens = self.tokenizer, self.cfg.logging.sample_tokens
        was_training = model.training
        model.eval()
        samples = []
        try:
            for prompt in self.cfg.logging.sample_prompts:
                ids = encode_prompt(tok, str(prompt))
                if len(ids) >= self.n_ctx:
                    samples.append((str(prompt), "", f"not generated: the prompt is {len(ids)} tokens with the "
                                                     f"document-start EOS, the model's n_ctx is {self.n_ctx}"))
                    continue
                out = generate(model, ids, n_tokens, temperature=0.0, eos_id=tok.eos_id)
                new = out.tokens[:-1] if out.stop_reason == STOP_EOS else out.tokens
                head = tok.decode(ids[1:])
                text = tok.decode(ids[1:] + new)
                if not text.startswith(head):   # decoding the prompt alone and with its continuation differ
                    head = ""
                continuation = text[len(head):]
                samples.append((head, continuation, f"{len(new)} tokens, greedy, stopped: {out.stop_reason}"))
        finally:
            model.train(was_training)
        return samples
