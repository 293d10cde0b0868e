"""`mmtrain frozen-retrieval`: retrieval with frozen embeddings and a small trained scorer (the paper's first retrieval
method, arXiv 2409.01482).

1. **Embeddings, once.** A frozen bundle (mixer or transformer) embeds the queries and documents of
   every split of the pair shards (train, val when present, test; ``embeddings.pooling``, default
   the paper's ``second_to_last``, L2-normalised). They are saved as
   ``<embeddings.dir>/embeddings.safetensors`` (tensors ``<split>.query`` and ``<split>.document``,
   e.g. ``train.query``: [pairs, d] fp32) and
   ``embeddings.json`` (where they came from: bundle path, model config, tokenizer and weights
   sha256, pair shards and their meta.json sha256, pooling, pairs per split). A later run with the
   same bundle, pooling and shards reuses them (adding a split they lack); embeddings of anything
   else there are an error.
2. **Scorer.** :class:`~mmtrain.models.frozen_scorer.FrozenEmbeddingScorer`, a bidirectional
   mixer over ``[q, c_1 .. c_{N-1}]`` trained with cross-entropy over the candidates, on candidate
   sets sampled afresh every step (:func:`~mmtrain.models.frozen_scorer.sample_candidates`).
   Plain PyTorch with ``torch.optim.AdamW`` over all its parameters and the Trainer's LR schedule
   (:func:`mmtrain.optim.lr_factor`); the ``train`` keys of both come from
   :class:`mmtrain.optim.OptimizerSettings`, and a non-finite loss raises the Trainer's
   :class:`~mmtrain.optim.NonFiniteLoss` (exit 3). It is not a task of
   :class:`mmtrain.train.trainer.Trainer`: that loop would wrap a DeepSpeed engine, a run
   directory, checkpoints and resume around a minutes-long run over precomputed embeddings whose
   only output is ``<out_dir>/scorer/``. TensorBoard scalars
   ``train/loss``, ``train/lr``, ``train/accuracy``, ``eval/accuracy``, ``eval/loss`` and
   ``eval/cosine_accuracy`` in ``<out_dir>/tensorboard``.
3. **Evaluation** on the test split (``embeddings.eval_split``: ``test``, or ``val`` to choose
   settings): one fixed candidate set per query (``train.eval_seed``); accuracy = the positive
   gets the strictly highest logit among the N-1 candidates. Printed next to the
   cosine-similarity top-1 over the *same* candidate sets from the same embeddings (the baseline
   the scorer has to beat) and chance, 1/(N-1); every evaluation also scores as many training
   queries (``train_accuracy``), so a scorer that memorises shows that number rising alone.
4. **Result**: ``<out_dir>/scorer/{model.safetensors,config.json}``, written to a temporary
   directory and renamed into place, so a killed run never leaves a half-written scorer.

Usage: ``mmtrain frozen-retrieval --config configs/frozen_retrieval/demo.yaml [key=value ...]
[--json out.json] [--embed-only] [--quiet]``. Exit codes: 0 done, 2 configuration / input error,
3 non-finite loss or weights (:data:`mmtrain.optim.EXIT_NONFINITE`; no scorer is saved).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from mmtrain import files as F
from mmtrain.optim import EXIT_NONFINITE, NonFiniteLoss, Schedule, lr_factor

EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_META = "embeddings.json"
EMBEDDINGS_FORMAT_VERSION = 1
SCORER_DIR = "scorer"
SCORER_WEIGHTS = "model.safetensors"
SCORER_CONFIG = "config.json"
#: The splits embedded, those of them that the pair shards hold (train and test always do).
SPLITS = ("train", "val", "test")
EMBEDDINGS_ENTRIES = {EMBEDDINGS_FILE, EMBEDDINGS_META}
#: What a run writes in out_dir (plus the marker): an out_dir holding other things is not ours.
OUT_ENTRIES = {"tensorboard", "embeddings", SCORER_DIR}
# What must agree between saved embeddings and a run (paths may move; contents may not).
_IDENTITY = ("bundle_model", "bundle_tokenizer_sha256", "bundle_weights_sha256", "pairs_meta_sha256", "pooling")


class FrozenRetrievalError(ValueError):
    """Bad input to frozen-embedding retrieval: names the file / key and what was expected."""


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def _sha256_files(paths: List[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def embeddings_source(bundle: str, pairs: str, pooling: str) -> Dict[str, Any]:
    """Where embeddings of (bundle, pairs, pooling) come from; checks the bundle against the pairs.

    Raises FrozenRetrievalError for a missing / broken bundle or pair shards, or pairs made with
    another tokenizer.
    """
    from mmtrain.export.bundle import BundleError, load_bundle_tokenizer, read_bundle_config
    from mmtrain.data.errors import DataError
    from mmtrain.data.pairs import META_NAME, check_pairs

    try:
        section = read_bundle_config(bundle)
        tokenizer = load_bundle_tokenizer(bundle)
        weights = [Path(bundle) / name for name in section.get("weight_files", [])]
        missing = [str(p) for p in weights if not p.is_file()]
        if not weights or missing:
            raise BundleError(f"{bundle}: weight files missing: {', '.join(missing) or 'none listed in config.json'}")
    except BundleError as exc:
        raise FrozenRetrievalError(f"embeddings.bundle: {exc}") from None
    try:
        meta = check_pairs(pairs, tokenizer_sha256=tokenizer.sha256, model_n_ctx=section["model"]["n_ctx"],
                           bundle=bundle)
    except DataError as exc:
        raise FrozenRetrievalError(f"embeddings.pairs: {exc}") from None
    return {"bundle": os.path.abspath(bundle), "bundle_model": dict(section["model"]),
            "bundle_tokenizer_sha256": tokenizer.sha256, "bundle_weights_sha256": _sha256_files(weights),
            "pairs": os.path.abspath(pairs), "pairs_n_ctx": int(meta["n_ctx"]),
            "pairs_meta_sha256": _sha256_files([Path(pairs) / META_NAME]), "pooling": pooling,
            "splits": {s: {"pairs": int(meta["splits"][s]["pairs"])} for s in SPLITS if s in meta["splits"]}}


def read_embeddings_meta(directory: Path) -> Optional[Dict[str, Any]]:
    """embeddings.json of ``directory``; None when the directory is absent or empty."""
    path = directory / EMBEDDINGS_META
    if not path.is_file():
        if directory.is_dir() and any(directory.iterdir()):
            raise FrozenRetrievalError(f"embeddings.dir: {directory} exists but holds no {EMBEDDINGS_META} (not "
                                       "embeddings written by `mmtrain frozen-retrieval`); choose another directory")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FrozenRetrievalError(f"{path}: unreadable or not valid JSON ({exc})") from None
    if meta.get("kind") != "frozen-embeddings" or meta.get("format_version") != EMBEDDINGS_FORMAT_VERSION:
        raise FrozenRetrievalError(f"{path}: not frozen embeddings of format {EMBEDDINGS_FORMAT_VERSION}")
    return meta


def check_embeddings_match(meta: Dict[str, Any], source: Dict[str, Any], directory: Path) -> None:
    """FrozenRetrievalError naming what differs when saved embeddings are not those of ``source``."""
    differ = [key for key in _IDENTITY if meta.get(key) != source.get(key)]
    if not differ:
        return
    what = {"bundle_model": "model config", "bundle_tokenizer_sha256": "tokenizer",
            "bundle_weights_sha256": "weights", "pairs_meta_sha256": "pair shards", "pooling": "pooling"}
    raise FrozenRetrievalError(
        f"embeddings.dir: {directory / EMBEDDINGS_META} holds embeddings of bundle {meta.get('bundle')} "
        f"({meta.get('pooling')} pooling) and pairs {meta.get('pairs')}, but this run uses bundle {source['bundle']} "
        f"({source['pooling']} pooling) and pairs {source['pairs']}; they differ in: "
        f"{', '.join(what[k] for k in differ)}. Set embeddings.dir to another directory or "
        "embeddings.overwrite=true to recompute them.")


def compute_embeddings(source: Dict[str, Any], batch_size: int, device: str,
                       log: Callable[[str], None] = print, progress: bool = False) -> Dict[str, Any]:
    """{"train.query": [n, d], ...} float32 tensors of every split, embedded by the frozen bundle
    (``progress``: a bar of the embedding batches per split and side)."""
    import torch

    from mmtrain.export.bundle import BundleError, load_pretrained
    from mmtrain.data.pairs import load_split
    from mmtrain.eval.retrieval import embed_arrays
    from mmtrain.models.embedding import embed

    try:
        model = load_pretrained(source["bundle"], device=device)
    except BundleError as exc:   # e.g. a weight file that differs from its recorded digest
        raise FrozenRetrievalError(f"embeddings.bundle: {exc}") from None
    pooling = source["pooling"]
    out = {}
    with torch.no_grad():
        for split in source["splits"]:
            arrays = load_split(source["pairs"], split)
            for side in ("query", "document"):
                emb = embed_arrays(lambda i, l: embed(model, i, l, pooling), arrays[f"{side}_ids"],
                                   arrays[f"{side}_length"], batch_size, device, progress,
                                   f"embedding {split} {'queries' if side == 'query' else 'documents'}")
                out[f"{split}.{side}"] = torch.from_numpy(emb).contiguous()
            log(f"embedded {split}: {len(arrays['pair_id'])} queries and documents")
    return out


def load_or_compute_embeddings(source: Dict[str, Any], directory: Path, *, overwrite: bool, batch_size: int,
                               device: str, log: Callable[[str], None] = print,
                               progress: bool = False) -> Tuple[Dict[str, Any], bool]:
    """(embeddings, reused?): the saved ones when they match ``source``, else computed and saved."""
    from safetensors.torch import load_file, save_file

    from mmtrain.data.shards import replace_dir, write_json_atomic

    meta = None if overwrite else read_embeddings_meta(directory)
    if meta is not None:
        check_embeddings_match(meta, source, directory)
        missing = [s for s in source["splits"] if s not in meta.get("splits", {})]
        if missing:   # the same embedder and shards, saved before those splits were embedded: add them
            log(f"embeddings in {directory} lack split(s) {', '.join(missing)}; recomputing them all")
            meta = None
    if meta is None:   # to be (re)computed: it replaces `directory`, which must hold nothing else
        F.check_replaceable(directory, "frozen-retrieval", own=EMBEDDINGS_ENTRIES.__contains__,
                            ours=lambda d: (d / EMBEDDINGS_META).is_file(), overwrite=True, what="embeddings.dir",
                            overwrite_flag="embeddings.overwrite=true")
    if meta is not None:
        tensors = load_file(str(directory / EMBEDDINGS_FILE))
        for split in source["splits"]:
            for side in ("query", "document"):
                t = tensors.get(f"{split}.{side}")
                n = source["splits"][split]["pairs"]
                if t is None or t.ndim != 2 or t.shape[0] != n:
                    raise FrozenRetrievalError(f"{directory / EMBEDDINGS_FILE}: {split}.{side} should be "
                                               f"[{n}, d], found {None if t is None else list(t.shape)}")
        return tensors, True
    tensors = compute_embeddings(source, batch_size, device, log, progress)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = F.tmp_name(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / EMBEDDINGS_FILE), metadata={"pooling": source["pooling"]})
        write_json_atomic(tmp / EMBEDDINGS_META, {
            "format_version": EMBEDDINGS_FORMAT_VERSION, "kind": "frozen-embeddings", **source,
            "dim": int(tensors["train.query"].shape[1]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tensors, False


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def total_steps(train_cfg, n_train: int) -> int:
    """train.steps, else ceil(epochs * n_train / batch_size)."""
    if train_cfg.steps > 0:
        return int(train_cfg.steps)
    return max(1, math.ceil(float(train_cfg.epochs) * n_train / int(train_cfg.batch_size)))


def query_batches(n: int, batch_size: int, rng) -> Iterator[Any]:
    """Endless batches of query indices: a fresh permutation per epoch, cut into batch_size chunks."""
    import numpy as np

    buffer = np.empty(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, rng.permutation(n)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def cosine_scores(queries, documents, candidates):
    """[B, N-1] dot products of L2-normalised query embeddings with their candidates' (= cosine)."""
    import torch

    return torch.einsum("bd,bkd->bk", queries, documents[candidates])


def evaluate(model, queries, documents, candidates, labels, batch_size: int = 256) -> Dict[str, float]:
    """Scorer accuracy (strict top-1) and mean cross-entropy over fixed candidate sets."""
    import torch
    import torch.nn.functional as F

    from mmtrain.models.frozen_scorer import strict_top1

    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(labels), batch_size):
            c, y = candidates[s:s + batch_size], labels[s:s + batch_size]
            logits = model(queries[s:s + batch_size], documents[c])
            correct += int(strict_top1(logits, y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}


def train_scorer(embeddings: Dict[str, Any], cfg, device: str = "cpu", writer=None,
                 log: Callable[[str], None] = print):
    """Train the scorer on ``embeddings["train.*"]``, evaluate on ``embeddings["<split>.*"]``, the split
    ``cfg.embeddings.eval_split`` (test or val).

    Returns ``(model, result)``; result: accuracy, cosine_accuracy, initial_accuracy, chance,
    eval_loss, train_loss, steps, eval_split, eval_queries (also as test_queries), n_candidates,
    history (one dict per evaluation: step, accuracy, loss, and train_accuracy on fixed candidate
    sets of as many training queries).
    Raises :class:`~mmtrain.optim.NonFiniteLoss` on a non-finite training loss (naming the step)
    or non-finite weights at the end.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmtrain.models.frozen_scorer import (FrozenEmbeddingScorer, check_pool, sample_candidates,
                                                strict_top1)

    m, t = cfg.model, cfg.train
    split = str(cfg.embeddings.eval_split)
    n_cand = int(m.n_candidates)
    if f"{split}.query" not in embeddings:
        raise FrozenRetrievalError(f"embeddings.eval_split: {split}, but the embeddings hold no {split} split "
                                   f"(they hold {', '.join(sorted({k.split('.')[0] for k in embeddings}))})")
    tq, td = embeddings["train.query"].float().to(device), embeddings["train.document"].float().to(device)
    eq, ed = embeddings[f"{split}.query"].float().to(device), embeddings[f"{split}.document"].float().to(device)
    check_pool(n_cand, len(td), "train")
    check_pool(n_cand, len(ed), split)
    steps = total_steps(t, len(tq))
    torch.manual_seed(int(t.seed))
    model = FrozenEmbeddingScorer(tq.shape[1], n_cand, m.n_layers, m.ffn_mult, m.norm_eps,
                                  input_scale=m.input_scale, interaction=m.interaction).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = Schedule.of(t, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule))

    ec, el = sample_candidates(np.arange(len(eq)), len(ed), n_cand, np.random.default_rng(int(t.eval_seed)))
    ec, el = torch.as_tensor(ec, device=device), torch.as_tensor(el, device=device)
    cosine = float(strict_top1(cosine_scores(eq, ed, ec), el).float().mean())
    # as many training queries, with fixed candidate sets from the training pool: memorising shows here alone
    probe_rng = np.random.default_rng(int(t.eval_seed) + 1)
    pq = np.sort(probe_rng.permutation(len(tq))[:len(eq)])
    pc, pl = sample_candidates(pq, len(td), n_cand, probe_rng)
    pq, pc, pl = (torch.as_tensor(a, device=device) for a in (pq, pc, pl))
    history: List[Dict[str, float]] = []

    def run_eval(step: int) -> Dict[str, float]:
        r = evaluate(model, eq, ed, ec, el)
        r["train_accuracy"] = evaluate(model, tq[pq], td, pc, pl)["accuracy"]
        history.append({"step": step, **r})
        if writer is not None:
            writer.add_scalar("eval/accuracy", r["accuracy"], step)
            writer.add_scalar("eval/loss", r["loss"], step)
            writer.add_scalar("eval/cosine_accuracy", cosine, step)
            writer.add_scalar("eval/train_accuracy", r["train_accuracy"], step)
        log(f"eval   step {step} | {split} accuracy among {n_cand} {100 * r['accuracy']:.1f}% | cosine "
            f"{100 * cosine:.1f}% | loss {r['loss']:.4f} | train accuracy {100 * r['train_accuracy']:.1f}%")
        return r

    log(f"scorer: {model.num_params():,} params ({m.n_layers} bidirectional mixer blocks, d {tq.shape[1]}, "
        f"N {n_cand}, input scale {m.input_scale}, interaction {m.interaction}) | {len(tq)} train / {len(eq)} "
        f"{split} queries | {steps} steps of {t.batch_size}")
    initial = run_eval(0)
    rng = np.random.default_rng(int(t.seed))
    batches = query_batches(len(tq), int(t.batch_size), rng)
    model.train()
    loss_value = float("nan")
    for step in range(1, steps + 1):
        idx = next(batches)
        cand, labels = sample_candidates(idx, len(td), n_cand, rng)
        cand, labels = torch.as_tensor(cand, device=device), torch.as_tensor(labels, device=device)
        logits = model(tq[torch.as_tensor(idx, device=device)], td[cand])
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({float(loss.detach())}) at step {step}")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if step % t.log_every == 0 or step == 1 or step == steps:
            acc = float(strict_top1(logits.detach(), labels).float().mean())
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/accuracy", acc, step)
            log(f"step {step:>6}/{steps} | loss {loss_value:.4f} | batch accuracy {100 * acc:.1f}% | lr {lr:.2e}")
        if step != steps and t.eval_every > 0 and step % t.eval_every == 0:
            run_eval(step)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise NonFiniteLoss(f"non-finite weights after step {steps}; not saved")
    final = run_eval(steps)
    result = {"n_candidates": n_cand, "eval_split": split, "eval_queries": len(eq), "test_queries": len(eq),
              "steps": steps, "accuracy": final["accuracy"], "train_accuracy": final["train_accuracy"],
              "cosine_accuracy": cosine, "chance": 1.0 / (n_cand - 1), "initial_accuracy": initial["accuracy"],
              "eval_loss": final["loss"], "train_loss": loss_value, "eval_seed": int(t.eval_seed),
              "history": history}
    return model, result


# --------------------------------------------------------------------------------------------
# The trained scorer on disk
# --------------------------------------------------------------------------------------------


def save_scorer(model, out_dir: Path, info: Dict[str, Any]) -> Path:
    """``<out_dir>/scorer/{model.safetensors,config.json}``, built in a temporary directory and renamed."""
    from safetensors.torch import save_file

    from mmtrain.data.shards import replace_dir, write_json_atomic

    final = Path(out_dir) / SCORER_DIR
    check_scorer_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = F.tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / SCORER_WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(tmp / SCORER_CONFIG, {"kind": "frozen-embedding-scorer", "format_version": 1,
                                                "model": dict(model.config_dict), **info})
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_scorer_dir(final: Path) -> None:
    """OutputError when ``<out_dir>/scorer`` holds anything but a scorer (it is replaced)."""
    F.check_replaceable(final, "frozen-retrieval", own={SCORER_WEIGHTS, SCORER_CONFIG}.__contains__,
                        ours=lambda d: (d / SCORER_CONFIG).is_file(), overwrite=True, what="out_dir:")


def load_scorer(path, device: str = "cpu"):
    """The scorer saved by :func:`save_scorer` (``path`` = the scorer directory), in eval mode."""
    from safetensors.torch import load_file

    from mmtrain.models.frozen_scorer import FrozenEmbeddingScorer

    path = Path(path)
    try:
        config = json.loads((path / SCORER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FrozenRetrievalError(f"{path / SCORER_CONFIG}: unreadable ({exc})") from None
    model = FrozenEmbeddingScorer(**config["model"])
    model.load_state_dict(load_file(str(path / SCORER_WEIGHTS)))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FrozenRetrievalError("device: cuda requested but no CUDA device is available")
    return name


def check_outputs(out_dir: Path, embeddings_dir: Path, inputs: Dict[str, str]) -> None:
    """FrozenRetrievalError unless the directories this command writes are directories (or new)
    and lie outside its inputs (``{what: path}``: the bundle and the pair shards), so a run never
    writes into, or over, what it reads."""
    for what, path in (("out_dir", out_dir), ("embeddings.dir", embeddings_dir)):
        path = path.resolve()
        if path.exists() and not path.is_dir():
            raise FrozenRetrievalError(f"{what} {path} is a file; give a directory")
        for name, source in inputs.items():
            source = Path(source).resolve()
            if path == source or source in path.parents or path in source.parents:
                raise FrozenRetrievalError(f"{what} {path} overlaps the {name} {source}; choose a directory outside it")


def _is_frozen_out(out_dir: Path) -> bool:
    """An out_dir of an earlier run (before markers): only the entries a run writes."""
    names = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
    return bool(names) and set(names) <= OUT_ENTRIES


def check_out_dir(out_dir: Path) -> None:
    """OutputError unless out_dir is new, empty, or written by frozen-retrieval (its marker, or
    only its own entries): a run adds and replaces only its own entries there."""
    F.check_writable_into(out_dir, "frozen-retrieval", ours=_is_frozen_out, overwrite=False, what="out_dir",
                          overwrite_flag=None)


def run(cfg, json_path: Optional[str] = None, embed_only: bool = False,
        log: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Any]:
    """Embed (or reuse), train, evaluate, save; the result dict (also written to ``json_path``).
    ``progress``: bars of the embedding step (drawn only on a terminal, by rank 0).

    out_dir is written only when new, empty or a frozen-retrieval out_dir (:func:`check_out_dir`);
    it and the embeddings directory are locked (:func:`mmtrain.files.output_lock`) for the run."""
    from mmtrain.models.frozen_scorer import check_pool

    e = cfg.embeddings
    device = _device(cfg.device)
    source = embeddings_source(e.bundle, e.pairs, e.pooling)
    if e.eval_split not in source["splits"]:
        raise FrozenRetrievalError(f"embeddings.eval_split: {e.eval_split}, but the pair shards {e.pairs} have no "
                                   f"{e.eval_split} split (they have {', '.join(source['splits'])}); prepare them "
                                   f"with val_fraction > 0, or use embeddings.eval_split=test")
    if not embed_only:
        try:
            for split in ("train", e.eval_split):
                check_pool(int(cfg.model.n_candidates), source["splits"][split]["pairs"], split)
        except ValueError as exc:
            raise FrozenRetrievalError(str(exc)) from None
    out_dir = Path(cfg.out_dir)
    directory = Path(e.dir) if e.dir else out_dir / "embeddings"
    check_outputs(out_dir, directory, {"bundle": e.bundle, "pair shards": e.pairs})
    writes_out = not embed_only or not e.dir
    with contextlib.ExitStack() as locks:
        if writes_out:
            check_out_dir(out_dir)
            locks.enter_context(F.output_lock(out_dir.resolve(), "frozen-retrieval"))
            out_dir.mkdir(parents=True, exist_ok=True)
            F.write_marker(out_dir, "frozen-retrieval")
            F.clean_stale(out_dir / SCORER_DIR)
            if not embed_only:
                check_scorer_dir(out_dir / SCORER_DIR)   # before the work, not after
        if not (writes_out and out_dir.resolve() in directory.resolve().parents):
            locks.enter_context(F.output_lock(directory.resolve(), "frozen-retrieval"))
        F.clean_stale(directory)
        return _run_locked(cfg, source, out_dir, directory, device, json_path, embed_only, log, progress)


def _run_locked(cfg, source: Dict[str, Any], out_dir: Path, directory: Path, device: str,
                json_path: Optional[str], embed_only: bool, log: Callable[[str], None],
                progress: bool) -> Dict[str, Any]:
    """:func:`run` once its output directories are checked and locked."""
    from mmtrain.config import to_dict

    e = cfg.embeddings
    embeddings, reused = load_or_compute_embeddings(source, directory, overwrite=e.overwrite,
                                                    batch_size=e.batch_size, device=device, log=log,
                                                    progress=progress)
    kind = source["bundle_model"]["kind"]
    log(f"frozen-retrieval: bundle {e.bundle} ({kind}, {e.pooling} pooling) | pairs {e.pairs} | embeddings "
        f"{directory} ({'reused' if reused else 'computed'}; d {embeddings['train.query'].shape[1]})")
    result: Dict[str, Any] = {"bundle": source["bundle"], "kind": kind, "pooling": e.pooling,
                              "pairs": source["pairs"], "embeddings": str(directory), "embeddings_reused": reused}
    if not embed_only:
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        try:
            model, report = train_scorer(embeddings, cfg, device, writer, log)
        finally:
            writer.close()
        result.update(report)
        metrics = {k: v for k, v in report.items() if k != "history"}
        scorer = save_scorer(model, out_dir, {"embeddings": source, "config": to_dict(cfg), "metrics": metrics})
        result["scorer"] = str(scorer)
        log(f"{report['eval_split']} [{report['eval_queries']} queries, N={report['n_candidates']}: "
            f"{report['n_candidates'] - 1} "
            f"candidates, seed {report['eval_seed']}]: frozen-embedding scorer {100 * report['accuracy']:.1f}% | "
            f"cosine similarity {100 * report['cosine_accuracy']:.1f}% | chance {100 * report['chance']:.1f}%")
        log(f"saved scorer -> {scorer}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _main(args) -> int:
    from mmtrain.config import load_config
    from mmtrain.eval.schema import FrozenRetrievalConfig

    cfg = load_config(FrozenRetrievalConfig, args.config or [], list(args.overrides or []))
    try:
        run(cfg, args.json, args.embed_only, log=lambda s: print(s, flush=True), progress=not args.quiet)
    except FrozenRetrievalError as exc:
        print(f"mmtrain frozen-retrieval: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"mmtrain frozen-retrieval: {exc}; stopping, no scorer saved (lower train.lr, or raise "
              "train.warmup_steps, and run again)", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "frozen-retrieval", help="retrieval with frozen bundle embeddings and a trained bidirectional-mixer scorer",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  mmtrain frozen-retrieval --config configs/frozen_retrieval/demo.yaml "
               "embeddings.bundle=bundles/mixer --json out.json")
    p.add_argument("--config", action="append", metavar="YAML", help="FrozenRetrievalConfig YAML (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. model.n_candidates=64")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--embed-only", action="store_true", help="compute (or check) the embeddings and stop")
    from mmtrain.data.progress import add_quiet_argument

    add_quiet_argument(p)
    p.set_defaults(func=_main)
