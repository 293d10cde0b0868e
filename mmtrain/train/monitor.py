"""Run monitoring: TensorBoard scalars, a rank-0 progress bar and concise log lines.

Only rank 0 writes; other ranks get a monitor whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional

import torch

# Names of the scalars written to TensorBoard (tests and `mmtrain report` read these).
TRAIN_LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS_SEEN = "train/tokens_seen"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
STEP_TIME = "perf/step_time_s"
MEMORY = "perf/peak_memory_gb"


def eval_tag(n_ctx: int) -> str:
    return f"eval/loss_ctx{n_ctx}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metrics.jsonl records after ``step`` (a resumed run re-does those steps)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, "r", encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed run can be cut short; it is redone
                continue
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> List[Dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), "r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class Monitor:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run redoes the steps after its checkpoint: purge_step hides the points an
        # interrupted run logged past it, so every step appears once in TensorBoard.
        self.writer = SummaryWriter(log_dir=f"{run_dir}/tensorboard",
                                    purge_step=start_step + 1 if start_step > 0 else None)
        self.metrics = open(f"{run_dir}/metrics.jsonl", "a", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), step)

    def record(self, values: Dict[str, float]) -> None:
        """Append one JSON line to <run_dir>/metrics.jsonl (every step; exact values)."""
        if self.enabled:
            self.metrics.write(json.dumps(values) + "\n")

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def advance(self, n: int = 1, postfix: Optional[Dict[str, str]] = None) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.metrics.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.metrics.close()


class StepTimer:
    """Wall time of one optimizer step (synchronising CUDA so the time is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        return False
