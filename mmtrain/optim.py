"""What every training loop shares, below all of them: the optimizer and learning-rate settings
(:class:`OptimizerSettings`, the base of the Trainer's ``train`` section and of frozen-retrieval's),
the learning-rate schedule (:class:`Schedule`, :func:`lr_factor`) and the error a non-finite
training loss raises (:class:`NonFiniteLoss`; every command exits with :data:`EXIT_NONFINITE` on it).

The training loops are :class:`mmtrain.train.trainer.Trainer` (pretraining, contrastive retrieval)
and the small scorer of ``mmtrain frozen-retrieval`` (:mod:`mmtrain.eval.frozen_retrieval`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mmtrain.config import seed_setting, setting

#: Exit code of a command whose training stopped on a non-finite loss, gradient norm or weight.
EXIT_NONFINITE = 3

SCHEDULES = ("cosine", "linear", "constant")


class NonFiniteLoss(RuntimeError):
    """A non-finite training loss, gradient norm or weight: training stops (exit code
    :data:`EXIT_NONFINITE`); the message names what and the step, e.g. ``non-finite training loss
    (nan) at step 7``."""


@dataclass
class OptimizerSettings:
    """The optimizer (AdamW) and LR-schedule keys of a training section. A section builds on it
    (dataclass inheritance) and may give a key another default, or add a note to its help, with
    :func:`tuned`; the key's name, type, range, choices and help are defined here once."""

    steps: int = setting(300, "Optimizer steps to run.", ge=0)
    lr: float = setting(4e-3, "Peak AdamW learning rate, reached after warmup_steps.", gt=0)
    min_lr_ratio: float = setting(0.1, "Final learning rate as a fraction of lr.", ge=0, le=1)
    warmup_steps: int = setting(20, "Linear warmup steps from 0 to lr.", ge=0)
    schedule: str = setting("cosine", "Decay after warmup.", choices=list(SCHEDULES))
    weight_decay: float = setting(0.1, "AdamW weight decay.", ge=0)
    seed: int = seed_setting(0, "Seed of the model's initialisation and of the order and sampling of the "
                                "training data.")


def tuned(name: str, default: Any = dataclasses.MISSING, note: str = ""):
    """The :class:`OptimizerSettings` field ``name`` for a section built on it, with ``default``
    instead of its own (when given) and ``note`` appended to its help: what the key means, its
    type, range and choices stay defined once."""
    base = OptimizerSettings.__dataclass_fields__[name]
    meta = dict(base.metadata)
    if note:
        meta["help"] = f"{meta['help']} {note}"
    return dataclasses.field(default=base.default if default is dataclasses.MISSING else default, metadata=meta)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run: linear warmup over ``warmup_steps`` to the peak, then
    ``schedule`` decay to ``min_lr_ratio`` of it at ``steps``."""

    steps: int
    warmup_steps: int
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    @classmethod
    def of(cls, section, steps: int | None = None) -> "Schedule":
        """The schedule of a training section built on :class:`OptimizerSettings` (``steps``: the
        run's step count when the section's ``steps`` does not give it)."""
        return cls(steps=int(section.steps if steps is None else steps), warmup_steps=int(section.warmup_steps),
                   schedule=str(section.schedule), min_lr_ratio=float(section.min_lr_ratio))


def lr_factor(step: int, schedule: Schedule) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = schedule.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule.schedule == "constant":
        return 1.0
    total = max(schedule.steps - warmup, 1)
    progress = min(max(step - warmup, 0) / total, 1.0)
    floor = schedule.min_lr_ratio
    if schedule.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
