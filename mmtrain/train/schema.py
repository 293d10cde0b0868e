"""The training sections (``train``, ``engine``, ``logging``, ``checkpoint``, ``retrieval``) and the two
engine-trained configs built from them: pretraining (:class:`PretrainConfig`) and contrastive retrieval
(:class:`RetrievalConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from mmtrain.config import MAX_SEED, register_validator, setting
from mmtrain.data.schema import DataConfig, PairDataConfig, validate_data
from mmtrain.models.schema import ModelConfig, validate_model
from mmtrain.optim import OptimizerSettings, tuned


@dataclass
class LoopConfig(OptimizerSettings):
    """The ``train`` keys every engine-trained config has: the optimizer and LR-schedule keys every
    training loop shares (:class:`mmtrain.optim.OptimizerSettings`, defaults and ranges there) and
    the Trainer's own."""

    steps: int = tuned("steps", note="One step = one global batch; 0 only for pretraining with a "
                                     "train.max_tokens budget.")
    weight_decay: float = tuned("weight_decay", note="Not applied to norms, biases, embeddings, token-mixing "
                                                   "biases.")
    seed: int = tuned("seed", note="Also seeds dropout.")
    # (min_lr_ratio, warmup_steps, schedule: as OptimizerSettings defines them)
    stop_at: int = setting(0, "Stop (with a checkpoint) after this step although the LR schedule runs to "
                         "`steps`; 0 = run to the end. For staged runs: resume later with a larger stop_at.", ge=0, role="watch")
    max_tokens: int = setting(0, "Token budget; when > 0 training stops once this many tokens were seen "
                            "(whichever of steps / max_tokens comes first).", ge=0)
    global_batch_size: int = setting(16, "Sequences per optimizer step over all ranks "
                                    "(= micro_batch_size * grad_accum * world_size).", ge=1)
    micro_batch_size: int = setting(8, "Sequences per forward/backward on one rank.", ge=1)
    mixing_weight_decay: bool = setting(True, "Apply weight_decay to the masked token-mixing matrices too; "
                                         "false exempts them like norms and biases.")
    beta1: float = setting(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2.", ge=0, lt=1)
    adam_eps: float = setting(1e-8, "AdamW epsilon.", gt=0)
    eval_every: int = setting(100, "Evaluate every N steps (0 = only at the end).", ge=0, role="watch")


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining's ``train`` section: the loop's keys and the LM evaluation's."""

    lr: float = tuned("lr", note="E.g. 5e-4. The default suits the quick-start size (d 256, 4 layers): of "
                                 "5e-4 ... 8e-3 it was among the best for both families "
                                 "(benchmarks/learning.py); larger models want less.")
    eval_batches: int = setting(8, "Validation micro-batches per evaluation and context length. "
                                   "At least 1: an evaluation always runs at the end of a run.", ge=1, role="watch")
    eval_n_ctx: List[int] = setting(list, "Extra (shorter) context lengths to evaluate mixers at, e.g. [32, 64]; "
                                     "the training n_ctx is always evaluated.", factory=True, ge=1, role="watch")


@dataclass
class RetrievalTrainConfig(LoopConfig):
    """Retrieval's ``train`` section: the loop's keys (its evaluation is in ``retrieval.eval_*``)."""

    lr: float = tuned("lr", 1e-3, note="The retrieval study's choice (docs/retrieval.md) for both families.")


@dataclass
class EngineConfig:
    zero_stage: int = setting(1, "DeepSpeed ZeRO stage.", choices=[0, 1, 2, 3], role="layout")
    precision: str = setting("fp32", "Training precision (bf16 needs zero_stage >= 1).",
                        choices=["fp32", "bf16", "fp16"])
    grad_clip: float = setting(1.0, "Global gradient-norm clip; 0 = off.", ge=0)
    offload_optimizer: bool = setting(False, "ZeRO-Offload the optimizer state to CPU (stage >= 1).", role="layout")
    offload_params: bool = setting(False, "ZeRO-Offload parameters to CPU (stage 3).", role="layout")
    device: str = setting("auto", "`auto` = CUDA when available, else CPU.", choices=["auto", "cpu", "cuda"], role="layout")
    peak_flops: float = setting(0.0, "Peak FLOP/s per device used for MFU; 0 = the device's dense data-sheet "
                                     "figure for the precision (H100, H200, A100, L4), else a matmul measured "
                                     "at start. The run's banner names the source.", ge=0, role="watch")
    torch_adam: bool = setting(True, "Use torch.optim.AdamW (builds nothing). false = DeepSpeed's fused/CPU "
                                "Adam (JIT-built on first use).")
    compile: bool = setting(False, "Experimental: torch.compile the model through DeepSpeed (engine.compile()) "
                              "after the engine is built.")


@dataclass
class RunLoggingConfig:
    """The ``logging`` keys every engine-trained config has."""

    ROLE = "watch"
    runs_root: str = setting("runs", "Parent directory of run directories.")
    name: str = setting("", "Run name; '' = <kind>-ctx<n_ctx>-<timestamp>.")
    run_dir: str = setting("", "Explicit run directory (overrides runs_root/name).")
    log_every: int = setting(10, "Log a line and TensorBoard scalars every N steps.", ge=1)
    progress_bar: bool = setting(True, "Show a tqdm progress bar on rank 0.")


@dataclass
class LoggingConfig(RunLoggingConfig):
    """Pretraining's ``logging`` section: the run's, and generated samples."""

    sample_prompts: List[str] = setting(lambda: ["Return the", "Create a"], "Prompts the model "
                                        "continues greedily at every evaluation, logged as TensorBoard text "
                                        "(eval/samples); not for models that cannot generate, nor under ZeRO 3.",
                                        factory=True)
    sample_tokens: int = setting(32, "Tokens generated per sample prompt; 0 = no samples.", ge=0)


@dataclass
class CheckpointConfig:
    ROLE = "watch"
    every: int = setting(100, "Save a checkpoint every N steps (and always at the end); 0 = only at the end.", ge=0)
    keep_last: int = setting(3, "Keep the newest K checkpoints; 0 = keep all.", ge=0)
    resume: str = setting("auto", "`auto` = continue from <run_dir>/checkpoints/latest when present; "
                             "`none` = start fresh; or a checkpoint directory path.")
    allow_changes: List[str] = setting(list, "Config keys (or sections, e.g. `train.steps`, `engine`) that may "
                                             "differ from the checkpoint's on resume besides those that always "
                                             "may (evaluation, logging, checkpoint cadence, stop_at, workers); "
                                             "any other difference is an error.", factory=True)


@dataclass
class RetrievalSection:
    bundle: str = setting("", "Exported bundle (mixer or transformer) to start from (`mmtrain export`).")
    pooling: str = setting("mean", "Embedding = mean of the final hidden states over real tokens (`mean`; "
                              "docs/retrieval.md), the one at the last real token (`last`) or the one "
                              "before it (`second_to_last`, the paper's index -2); L2-normalised. Inputs "
                              "are right-padded.",
                      choices=["last", "second_to_last", "mean"])
    temperature: float = setting(0.05, "InfoNCE temperature t (logits = cosine / t); the paper's code: 0.02 "
                                  "(0.02-0.1 measured alike, docs/retrieval.md).", gt=0)
    learn_temperature: bool = setting(False, "Learn the temperature (CLIP's logit scale, starting at `temperature`, "
                                        "kept >= 0.01); not with grad_cache_chunk or ZeRO 3.")
    symmetric: bool = setting(True, "Average the query->document and document->query InfoNCE.")
    extra_negatives: int = setting(0, "Extra random training documents per query, added as negatives for all "
                                 "queries (seeded per step).", ge=0)
    hard_negatives: int = setting(0, "BM25-mined negatives per query (from `prepare-pairs hard_negatives=K`, "
                                "K >= this), added as negatives for all queries; 0 = none.", ge=0)
    grad_cache_chunk: int = setting(0, "Gradient caching: embed in chunks of this many sequences (queries, "
                                  "documents and extras together); 0 = off (one forward pass).", ge=0)
    gather_negatives: bool = setting(True, "All-gather embeddings across ranks (with gradient) so every "
                                      "rank's documents are negatives for every query.")
    eval_n_candidates: List[int] = setting(lambda: [32], "N values of the top-1-among-N evaluation (capped "
                                                    "at the test pool size).", factory=True, ge=2, role="watch")
    eval_split: str = setting("val", "Split evaluated during training: `val` (carved from the training pairs by "
                                "prepare-pairs; choose settings and checkpoints on it) or `test`.",
                         choices=["val", "test"], role="watch")
    eval_train_pairs: int = setting(256, "Also report recall on the first N training pairs (metrics train_*), to "
                                    "tell learning from memorising; 0 = off.", ge=0, role="watch")
    eval_max_pairs: int = setting(0, "Evaluate on the first N pairs of eval_split only; 0 = all.", ge=0, role="watch")
    eval_seed: int = setting(0, "Seed of the negatives drawn for top-1 among N.", ge=0, le=MAX_SEED, role="watch")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class RetrievalConfig:
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    train: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: RunLoggingConfig = field(default_factory=RunLoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def validate_train_engine(cfg: DictConfig) -> List[str]:
    """The train / engine / checkpoint checks every engine-trained config shares."""
    t, e = cfg.train, cfg.engine
    p: List[str] = []
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                 f"train.micro_batch_size {t.micro_batch_size}")
    if e.precision in ("bf16", "fp16") and e.zero_stage == 0:
        p.append(f"engine.precision {e.precision} needs engine.zero_stage >= 1 "
                 "(ZeRO 0 switches to an fp16-style optimizer that drifts)")
    if e.offload_params and e.zero_stage != 3:
        p.append("engine.offload_params needs engine.zero_stage 3")
    if e.offload_optimizer and e.zero_stage == 0:
        p.append("engine.offload_optimizer needs engine.zero_stage >= 1")
    return p


def validate_pretrain(cfg: DictConfig) -> List[str]:
    """Combinations of values a pretraining config cannot run with (load_config has checked each
    value's range already)."""
    p = validate_model(cfg.model, ranges=False)
    t = cfg.train
    if t.steps == 0 and t.max_tokens == 0:
        p.append("train.steps: must be >= 1 (or set train.max_tokens)")
    p += validate_train_engine(cfg)
    p += validate_data(cfg.data)
    for n in t.eval_n_ctx:
        if n > cfg.model.n_ctx:
            p.append(f"train.eval_n_ctx: {n} must be in [1, model.n_ctx={cfg.model.n_ctx}]")
    return p


def validate_retrieval(cfg: DictConfig) -> List[str]:
    """Combinations of values a retrieval config cannot run with (ranges are checked already)."""
    r, t, e = cfg.retrieval, cfg.train, cfg.engine
    p: List[str] = []
    if not r.bundle:
        p.append("retrieval.bundle: give the exported bundle to start from (`mmtrain export ... --out DIR`)")
    if r.learn_temperature and (r.grad_cache_chunk > 0 or e.zero_stage == 3):
        p.append("retrieval.learn_temperature: not available with retrieval.grad_cache_chunk > 0 or "
                 "engine.zero_stage 3 (the temperature would get no gradient / is partitioned)")
    if t.steps == 0:
        p.append("train.steps: must be >= 1")
    if t.micro_batch_size == 1 and not (r.extra_negatives or r.hard_negatives) and not r.gather_negatives:
        p.append("train.micro_batch_size 1 leaves a query without negatives (raise it, gather across "
                 "ranks or set retrieval.extra_negatives)")
    return p + validate_train_engine(cfg)


register_validator(PretrainConfig, validate_pretrain)
register_validator(RetrievalConfig, validate_retrieval)
