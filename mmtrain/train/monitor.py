"""Run monitoring: TensorBoard scalars, text and hyperparameters, a rank-0 progress bar and
concise log lines.

Only rank 0 writes; other ranks get a monitor whose methods do nothing.

HParams dashboard: every run writes one ``SessionStartInfo`` (its hyperparameters,
:func:`run_hparams`) when it starts and a ``SessionEndInfo`` (success) when its schedule is
complete, both into its own event directory, so a run is one row of the dashboard. No
``Experiment`` summary is written: TensorBoard then builds the columns from every run's
hyperparameters and takes the metrics from the scalar tags of the runs (the last value of each,
i.e. the run's final ``train/loss``, ``eval/loss_ctx<N>``, ``eval/recall@1``, ...), so runs of
different kinds in one log directory compare side by side. A resumed run writes its start info
again in a new event file; TensorBoard keeps the first summary metadata of a tag in a run (the one
the original process wrote), so the run stays one session.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

# The TensorBoard tags, defined beside `mmtrain report` (which reads them) and written from here.
from mmtrain.eval.tags import (GRAD_NORM, LR, MEMORY, MFU, RETRIEVAL_TABLE, SAMPLES, STEP_TIME,  # noqa: F401
                               TOKENS_PER_S, TOKENS_SEEN, TRAIN_LOSS, eval_tag)

HParam = Union[bool, int, float, str]


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict as one level with dotted keys (``{"model": {"kind": k}}`` -> ``{"model.kind": k}``)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def run_hparams(config: Dict[str, Any], extra: Optional[Dict[str, Any]] = None,
                watch: Iterable[str] = ()) -> Dict[str, HParam]:
    """The hyperparameters of a run for the HParams dashboard: the resolved config flattened to
    dotted keys, its bool / int / float / str values only (lists and empty sections are left out),
    without the ``watch`` keys (settings whose role is to watch the run, not to train it:
    :func:`mmtrain.config.setting_roles`); then ``extra`` (e.g. ``run.world_size``)."""
    out: Dict[str, HParam] = {}
    for key, value in {**flatten(config), **(extra or {})}.items():
        if any(key == p or key.startswith(p + ".") for p in watch):
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def _hparams_summary(tag: str, plugin_data):
    """A Summary holding one HParams plugin message (what TensorBoard's own hparams API writes)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                        tensor=metadata.NULL_TENSOR)])


def session_start_summary(hparams: Dict[str, HParam], start_time: Optional[float] = None):
    """The ``_hparams_/session_start_info`` summary of a run with these hyperparameters."""
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionStartInfo

    info = SessionStartInfo(start_time_secs=time.time() if start_time is None else start_time)
    for key, value in hparams.items():
        if isinstance(value, bool):   # before int: a bool is an int in Python
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = float(value)
        else:
            info.hparams[key].string_value = str(value)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=info))


def session_end_summary(status: str = "STATUS_SUCCESS", end_time: Optional[float] = None):
    """The ``_hparams_/session_end_info`` summary (``status``: an ``api_pb2.Status`` name)."""
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    info = SessionEndInfo(status=api_pb2.Status.Value(status),
                          end_time_secs=time.time() if end_time is None else end_time)
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=info))


def _md_escape(text: str) -> str:
    """``text`` with the characters markdown would interpret backslash-escaped (TensorBoard
    escapes HTML itself)."""
    return "".join("\\" + c if c in "\\`*_[]#|~" else c for c in text)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_escape(str(h)) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def retrieval_table(metrics: Dict[str, float], caption: str = "") -> str:
    """Markdown: ``caption``, then one row per retrieval metric (``metric | value``; fractions, 4 decimals)."""
    table = markdown_table(["metric", "value"], [(k, f"{v:.4f}") for k, v in metrics.items()])
    return f"{_md_escape(caption)}\n\n{table}" if caption else table


def _visible(text: str) -> str:
    """Control characters other than newline and tab as ``\\xNN`` (byte-fallback tokens decode to
    them; the browser would show nothing or ``?``)."""
    return "".join(f"\\x{ord(c):02x}" if (ord(c) < 32 and c not in "\n\t") or 127 <= ord(c) < 160 else c
                   for c in text)


def samples_markdown(samples: Sequence[Tuple[str, str, str]]) -> str:
    """Markdown for (prompt, continuation, note) samples: the prompt in bold, then the prompt and
    its continuation verbatim (an indented code block, so markup in generated text stays text;
    control characters as ``\\xNN``)."""
    parts = []
    for i, (prompt, continuation, note) in enumerate(samples, 1):
        body = _visible(prompt + continuation).split("\n")
        parts.append(f"**{i}. {_md_escape(prompt)}** ({_md_escape(note)})\n\n"
                     + "\n".join("    " + line for line in body))
    return "\n\n".join(parts)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metrics.jsonl records after ``step`` (a resumed run re-does those steps). Neither the
    file nor its temporary copy is followed if it is a symbolic link (RunFileLink)."""
    from mmtrain.train.faults import open_run_file

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.lexists(path):
        return
    keep = []
    with open_run_file(path, "r") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed run can be cut short; it is redone
                continue
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open_run_file(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def truncate_events(run_dir: str, step: int) -> int:
    """Drop the TensorBoard events after ``step`` from ``<run_dir>/tensorboard`` (a resumed run
    redoes those steps); returns how many were dropped.

    TensorBoard's default (Rust) loader only replaces the points of a series that a later point
    precedes in step, so an evaluation or sample an interrupted process logged after its last
    checkpoint would stay next to the resumed run's (the Python loader also drops them at the
    SessionLog START the resumed writer begins with). Each file holding such events, or a record
    cut short by a kill, is rewritten in place; the records kept are copied byte for byte."""
    import glob
    import struct

    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    from mmtrain.train.faults import open_run_file

    dropped = 0
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        if os.path.islink(path):   # not written by a run: neither read nor rewritten
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        keep, pos, n = [], 0, 0
        while pos + 12 <= len(data):   # a record: u64 length, u32 crc, data, u32 crc
            (length,) = struct.unpack_from("<Q", data, pos)
            end = pos + 12 + length + 4
            if end > len(data):
                break
            try:
                event_step = Event.FromString(data[pos + 12:pos + 12 + length]).step
            except DecodeError:
                break
            if event_step <= step:
                keep.append(data[pos:end])
            else:
                n += 1
            pos = end
        if n or pos < len(data):
            tmp = os.path.join(os.path.dirname(path), ".truncate.tmp")   # no "tfevents" in the name
            with open_run_file(tmp, "wb") as fh:
                fh.write(b"".join(keep))
            os.replace(tmp, path)
        dropped += n
    return dropped


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

        # A resumed run redoes the steps after its checkpoint: the points an interrupted process
        # logged past it are removed from the event files (truncate_events), and purge_step starts
        # the new file with a SessionLog START at the first step it logs (TensorBoard's Python
        # loader drops what an earlier process logged from there on; it takes the first START of a
        # run for its start, not a restart, so a fresh run writes one too, at step 1).
        if start_step > 0:
            truncate_events(run_dir, start_step)
        self.writer = SummaryWriter(log_dir=f"{run_dir}/tensorboard", purge_step=start_step + 1)
        from mmtrain.train.faults import open_run_file

        self.metrics = open_run_file(os.path.join(run_dir, "metrics.jsonl"), "a")   # never through a link
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

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams_start(self, hparams: Dict[str, HParam]) -> None:
        """The run's hyperparameters for the HParams dashboard (at its start, so a run that is
        killed still shows; written again by a resumed run, which TensorBoard ignores)."""
        if self.writer is not None:
            self.writer._get_file_writer().add_summary(session_start_summary(hparams), 0)
            self.writer.flush()

    def hparams_end(self, step: int, status: str = "STATUS_SUCCESS") -> None:
        """The run finished (HParams dashboard status); its final metrics are the last scalars."""
        if self.writer is not None:
            self.writer._get_file_writer().add_summary(session_end_summary(status), step)

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
