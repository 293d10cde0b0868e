"""The seam between the training loop and what it trains: a :class:`Task` of seven methods.

The :class:`~mmtrain.train.trainer.Trainer` owns the run: distributed setup, the run directory, the
DeepSpeed engine, the step (gradient accumulation, loss normalisation), resume, checkpoints, and
every report (banner, step lines, TensorBoard, ``metrics.jsonl``, hparams, evaluations). A task
says what is trained, through plain values it returns; it never reads the Trainer:

* :meth:`Task.setup` checks the inputs and returns a :class:`TaskInfo` (names, data fingerprint,
  batch geometry, what the banner says about the task);
* :meth:`Task.build_model`, :meth:`Task.train_loader`;
* :meth:`Task.batch` turns a loader batch into a :class:`Batch` on the device, with the counts the
  step is normalised by (known before any forward pass, so one reduction serves the whole step);
* :meth:`Task.loss` runs the forward pass of one micro-batch: a :class:`StepOutput`;
* :meth:`Task.evaluate` returns an :class:`Evaluation` for the Trainer to log;
* :meth:`Task.state_dict`: what a checkpoint records besides the engine and the config (e.g. what
  ``mmtrain export`` needs to build the exported model).

LM pretraining is :class:`mmtrain.train.lm.LMTask`, contrastive retrieval
:class:`mmtrain.train.contrastive.ContrastiveTask`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List

import torch


@dataclass
class RunContext:
    """What a task may know about the run it is part of (given to :meth:`Task.setup`)."""

    cfg: Any
    rank: int
    world_size: int
    device: torch.device
    is_main: bool
    gas: int        #: micro-batches per optimizer step and rank


@dataclass
class TaskInfo:
    """What the Trainer needs to know about a task (returned by :meth:`Task.setup`; a task may fill
    ``flops_per_token`` in :meth:`Task.build_model`)."""

    run_name: str                 #: default run name (a timestamp is appended)
    tokenizer_hash: str
    vocab_size: int
    describe: str                 #: the task's part of the banner: its data and model
    micro_batch: int              #: sequences per DeepSpeed micro-batch
    micro_steps: int              #: DeepSpeed micro-steps per optimizer step (gas, or more when a task splits)
    data: Dict[str, Any] = field(default_factory=dict)   #: data fingerprint besides tokenizer and vocabulary
    hparams: Dict[str, Any] = field(default_factory=dict)  #: HParams besides the config's
    step_tags: Dict[str, str] = field(default_factory=dict)  #: StepOutput.metrics key -> TensorBoard tag
    evaluate_at_start: bool = False   #: evaluate the starting model (step 0) of a fresh run
    flops_per_token: float = 0.0      #: model FLOPs per trained token: MFU is reported when > 0


@dataclass
class Batch:
    """One micro-batch on the device, with what its loss averages over (``targets``) and the tokens
    it holds (for tokens_seen and throughput)."""

    inputs: Any
    targets: torch.Tensor
    tokens: torch.Tensor


@dataclass
class StepOutput:
    """The forward pass of one micro-batch: its mean ``loss``, the ``terms`` to back-propagate (one per
    engine micro-step) and per-step ``metrics`` (``metrics.jsonl`` keys; tags in TaskInfo.step_tags): numbers
    or device scalars, read once per step from the step's last micro-batch."""

    loss: torch.Tensor
    terms: Iterable[torch.Tensor]
    metrics: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """An evaluation, for the Trainer to log: ``metrics`` (``metrics.jsonl`` keys, also the run's
    summary), TensorBoard ``scalars`` and ``texts`` (tag -> markdown), a console ``line`` and
    ``notes`` (printed once each)."""

    metrics: Dict[str, float]
    scalars: Dict[str, float]
    line: str
    texts: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


class Task:
    """What one kind of training trains; see the module docstring."""

    name = "train"          #: program name in messages

    def setup(self, ctx: RunContext) -> TaskInfo:
        """Check the task's inputs (ConfigError naming the key), before the run directory exists."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        """The model to train (built under ``deepspeed.zero.Init`` at ZeRO-3)."""
        raise NotImplementedError

    def train_loader(self):
        """The training loader (its ``state_dict`` is checkpointed for exact resume)."""
        raise NotImplementedError

    def batch(self, raw: Dict[str, torch.Tensor], micro: int, step: int) -> Batch:
        """A loader batch -> the device inputs of :meth:`loss` and their counts (``micro``: index in
        the optimizer step ``step``, 0-based)."""
        raise NotImplementedError

    def loss(self, engine, batch: Batch) -> StepOutput:
        """The forward pass of one micro-batch through ``engine``."""
        raise NotImplementedError

    def evaluate(self, engine, step: int) -> Evaluation:
        """Evaluate the model in ``engine`` after ``step`` optimizer steps (on every rank)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint records besides the engine, the config, the loader and the counters."""
        return {}
