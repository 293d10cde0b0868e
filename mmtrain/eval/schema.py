"""`mmtrain frozen-retrieval` (the paper's first retrieval method: a small bidirectional mixer scores
candidate sets of embeddings precomputed once with a frozen bundle): its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from mmtrain.config import register_validator, setting


@dataclass
class FrozenEmbeddingsSection:
    bundle: str = setting("", "Exported bundle (mixer or transformer) whose frozen hidden states are the embeddings.")
    pairs: str = setting("data/pairs/demo", "Pair shards from `mmtrain prepare-pairs` made with this bundle's "
                                       "tokenizer; both splits (train, test) are embedded.")
    pooling: str = setting("second_to_last", "Embedding = final hidden state at the last real token (`last`), the "
                                        "one before it (`second_to_last`, the paper's index -2) or the mean "
                                        "(`mean`); L2-normalised.", choices=["last", "second_to_last", "mean"])
    dir: str = setting("", "Directory of the saved embeddings (embeddings.safetensors + embeddings.json), reused "
                      "when present; '' = <out_dir>/embeddings. Embeddings of another bundle, pooling or "
                      "pair shards there are an error.")
    overwrite: bool = setting(False, "Recompute the embeddings even when `dir` already holds some.")
    batch_size: int = setting(64, "Sequences per forward pass of the frozen bundle.")


@dataclass
class FrozenScorerSection:
    n_candidates: int = setting(32, "N: positions of one example [q, c_1 .. c_{N-1}], counting the query slot as "
                               "the paper does (N = 32: 31 candidates, the positive and 30 negatives).")
    n_layers: int = setting(8, "Bidirectional mixer blocks (paper: 8). Width = the embedding dimension.")
    ffn_mult: int = setting(4, "MLP hidden width as a multiple of the embedding dimension.")
    norm_eps: float = setting(1e-5, "LayerNorm epsilon.")


@dataclass
class FrozenTrainSection:
    batch_size: int = setting(128, "Queries (candidate sets) per optimizer step (paper: 128).")
    lr: float = setting(1e-4, "Peak AdamW learning rate (paper: 1e-4).")
    warmup_steps: int = setting(500, "Linear warmup steps from 0 to lr (paper: 500).")
    schedule: str = setting("linear", "Decay after warmup.", choices=["linear", "cosine", "constant"])
    min_lr_ratio: float = setting(0.0, "Final learning rate as a fraction of lr.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    grad_clip: float = setting(1.0, "Global gradient-norm clip; 0 = off.")
    steps: int = setting(0, "Optimizer steps; when > 0 it is used instead of `epochs`.")
    epochs: float = setting(100.0, "Passes over the training queries (paper: 100-200), each with fresh candidate "
                              "sets; steps = ceil(epochs * train pairs / batch_size). Used when steps is 0.")
    seed: int = setting(0, "Seed of the scorer's init and of the training candidate sets.")
    eval_every: int = setting(0, "Evaluate on the test split every N steps (always at step 0 and at the end); 0 = "
                            "only then.")
    eval_seed: int = setting(0, "Seed of the fixed test candidate sets (the same for the scorer and the cosine "
                           "baseline).")
    log_every: int = setting(50, "Print a line and log train/loss and train/lr every N steps.")


@dataclass
class FrozenRetrievalConfig:
    embeddings: FrozenEmbeddingsSection = field(default_factory=FrozenEmbeddingsSection)
    model: FrozenScorerSection = field(default_factory=FrozenScorerSection)
    train: FrozenTrainSection = field(default_factory=FrozenTrainSection)
    out_dir: str = setting("runs/frozen-retrieval", "Output directory: tensorboard/, embeddings/ (by default) and "
                                               "scorer/ (model.safetensors + config.json, written atomically).")
    device: str = setting("auto", "`auto` = CUDA when available, else CPU.", choices=["auto", "cpu", "cuda"])


def validate_frozen_retrieval(cfg: DictConfig) -> List[str]:
    e, m, t = cfg.embeddings, cfg.model, cfg.train
    p: List[str] = []
    if not e.bundle:
        p.append("embeddings.bundle: give the exported bundle to embed with (`mmtrain export ... --out DIR`)")
    if not e.pairs:
        p.append("embeddings.pairs: give the pair shards (`mmtrain prepare-pairs`)")
    if not cfg.out_dir:
        p.append("out_dir: must not be empty")
    if m.n_candidates < 3:
        p.append(f"model.n_candidates: must be >= 3 (the query slot, the positive and at least one "
                 f"negative), got {m.n_candidates}")
    for key, section in (("embeddings.batch_size", e), ("model.n_layers", m), ("model.ffn_mult", m),
                         ("train.batch_size", t), ("train.log_every", t)):
        value = section[key.split(".")[1]]
        if value < 1:
            p.append(f"{key}: must be >= 1, got {value}")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    for key in ("warmup_steps", "steps", "eval_every"):
        if t[key] < 0:
            p.append(f"train.{key}: must be >= 0, got {t[key]}")
    if t.epochs < 0:
        p.append(f"train.epochs: must be >= 0, got {t.epochs}")
    if t.steps == 0 and t.epochs <= 0:
        p.append("train.steps / train.epochs: one of them must be > 0 (steps wins when both are)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0 or t.weight_decay < 0:
        p.append(f"train.grad_clip / train.weight_decay: must be >= 0, got {t.grad_clip} / {t.weight_decay}")
    return p


register_validator(FrozenRetrievalConfig, validate_frozen_retrieval)
