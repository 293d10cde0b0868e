"""The TensorBoard tags a run writes (:mod:`mmtrain.train.monitor`) and `mmtrain report` reads
(:mod:`mmtrain.eval.report`); tests read them too."""

from __future__ import annotations

# Scalars.
TRAIN_LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS_SEEN = "train/tokens_seen"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
STEP_TIME = "perf/step_time_s"
MEMORY = "perf/peak_memory_gb"

# Text written at every evaluation.
SAMPLES = "eval/samples"            # LM pretraining: greedy continuations of logging.sample_prompts
RETRIEVAL_TABLE = "eval/retrieval"  # retrieval training: the metrics of the evaluation as a table


def eval_tag(n_ctx: int, stream: str = "") -> str:
    """The tag of the validation loss at ``n_ctx`` (of one stream of a mixture)."""
    return f"eval/{stream}/loss_ctx{n_ctx}" if stream else f"eval/loss_ctx{n_ctx}"
