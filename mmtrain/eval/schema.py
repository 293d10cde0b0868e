"""`mmtrain frozen-retrieval` (the paper's first retrieval method: a small bidirectional mixer scores
candidate sets of embeddings precomputed once with a frozen bundle): its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from mmtrain.config import register_validator, seed_setting, setting
from mmtrain.optim import OptimizerSettings, tuned


@dataclass
class FrozenEmbeddingsSection:
    bundle: str = setting("", "Exported bundle (mixer or transformer) whose frozen hidden states are the embeddings.")
    pairs: str = setting("data/pairs/demo", "Pair shards from `mmtrain prepare-pairs` made with this bundle's "
                                       "tokenizer; every split they hold (train, val, test) is embedded.")
    pooling: str = setting("second_to_last", "Embedding = final hidden state at the last real token (`last`), the "
                                        "one before it (`second_to_last`, the paper's index -2) or the mean "
                                        "(`mean`); L2-normalised.", choices=["last", "second_to_last", "mean"])
    dir: str = setting("", "Directory of the saved embeddings (embeddings.safetensors + embeddings.json), reused "
                      "when present; '' = <out_dir>/embeddings. Embeddings of another bundle, pooling or "
                      "pair shards there are an error.")
    overwrite: bool = setting(False, "Recompute the embeddings even when `dir` already holds some.")
    batch_size: int = setting(64, "Sequences per forward pass of the frozen bundle.", ge=1)
    eval_split: str = setting("test", "Split the scorer is evaluated on: `test`, or `val` (the pairs' validation "
                              "split, for choosing settings without looking at test).", choices=["test", "val"],
                              role="watch")


@dataclass
class FrozenScorerSection:
    n_candidates: int = setting(32, "N: positions of one example [q, c_1 .. c_{N-1}], counting the query slot as "
                               "the paper does (N = 32: 31 candidates, the positive and 30 negatives).", ge=3)
    n_layers: int = setting(8, "Bidirectional mixer blocks (paper: 8). Width = the embedding dimension.", ge=1)
    ffn_mult: int = setting(4, "MLP hidden width as a multiple of the embedding dimension.", ge=1)
    norm_eps: float = setting(1e-5, "LayerNorm epsilon.", gt=0)
    input_scale: str = setting("sqrt_d", "Scale of the embeddings fed to the scorer: `sqrt_d` multiplies the "
                               "L2-normalised embeddings by sqrt(d), so each coordinate is ~1 like the blocks' "
                               "outputs; `none` feeds them as they are (the paper; each coordinate ~1/sqrt(d)).",
                               choices=["none", "sqrt_d"])
    interaction: str = setting("product", "What a candidate position holds: `product`, the elementwise product "
                               "of the query and candidate embeddings (its sum is their cosine similarity); `none`, "
                               "the candidate embedding alone (the paper), so query and candidate meet only through "
                               "the blocks' position mixing.", choices=["none", "product"])


@dataclass
class FrozenTrainSection(OptimizerSettings):
    """The scorer's training: the optimizer and LR-schedule keys of the Trainer's ``train`` section
    (:class:`mmtrain.optim.OptimizerSettings`: meaning and ranges there) with the paper's defaults,
    and the keys of this loop."""

    steps: int = tuned("steps", 0, "When > 0 it is used instead of `epochs`.")
    lr: float = tuned("lr", 1e-4, "Paper: 1e-4.")
    min_lr_ratio: float = tuned("min_lr_ratio", 0.0)
    warmup_steps: int = tuned("warmup_steps", 500, "Paper: 500.")
    schedule: str = tuned("schedule", "linear")
    weight_decay: float = tuned("weight_decay", 0.0, "Applied to every parameter of the scorer.")
    batch_size: int = setting(128, "Queries (candidate sets) per optimizer step (paper: 128).", ge=1)
    grad_clip: float = setting(1.0, "Global gradient-norm clip; 0 = off.", ge=0)
    epochs: float = setting(100.0, "Passes over the training queries (paper: 100-200), each with fresh candidate "
                              "sets; steps = ceil(epochs * train pairs / batch_size). Used when steps is 0.", ge=0)
    eval_every: int = setting(0, "Evaluate on the test split every N steps (always at step 0 and at the end); 0 = "
                            "only then.", ge=0)
    eval_seed: int = seed_setting(0, "Seed of the fixed test candidate sets (the same for the scorer and the cosine "
                           "baseline).")
    log_every: int = setting(50, "Print a line and log train/loss and train/lr every N steps.", ge=1)


@dataclass
class FrozenRetrievalConfig:
    embeddings: FrozenEmbeddingsSection = field(default_factory=FrozenEmbeddingsSection)
    model: FrozenScorerSection = field(default_factory=FrozenScorerSection)
    train: FrozenTrainSection = field(default_factory=FrozenTrainSection)
    out_dir: str = setting("runs/frozen-retrieval", "Output directory: tensorboard/, embeddings/ (by default) and "
                                               "scorer/ (model.safetensors + config.json, written atomically).")
    device: str = setting("auto", "`auto` = CUDA when available, else CPU.", choices=["auto", "cpu", "cuda"])


def validate_frozen_retrieval(cfg: DictConfig) -> List[str]:
    """What a frozen-retrieval config cannot run with besides out-of-range values (load_config checks those)."""
    e, t = cfg.embeddings, cfg.train
    p: List[str] = []
    if not e.bundle:
        p.append("embeddings.bundle: give the exported bundle to embed with (`mmtrain export ... --out DIR`)")
    if not e.pairs:
        p.append("embeddings.pairs: give the pair shards (`mmtrain prepare-pairs`)")
    if not cfg.out_dir:
        p.append("out_dir: must not be empty")
    if t.steps == 0 and t.epochs == 0:
        p.append("train.steps / train.epochs: one of them must be > 0 (steps wins when both are)")
    return p


register_validator(FrozenRetrievalConfig, validate_frozen_retrieval)
