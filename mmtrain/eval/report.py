"""`mmtrain report`: compare training runs from their TensorBoard logs.

``mmtrain report runs/a runs/b ... --out report/`` reads each run's event files (tensorboard's
``EventAccumulator``; no TensorFlow needed) and writes

- ``<out>/curves.png``: loss against optimizer step, tokens seen and wall time; training loss
  (``train/loss``) as solid lines, evaluation loss at the run's n_ctx (``eval/loss_ctx<N>``) as
  dashed lines with markers, one colour per run,
- ``<out>/report.md``: one table row per run: label (kind, d_model, n_layers, n_ctx from the run's
  ``config.yaml``), last step, final train loss, final eval loss, tokens seen, tokens/s and MFU,
- ``<out>/report.json``: the same numbers.

Definitions: "final" = the value logged at the highest step; tokens/s and MFU = the median of
the logged ``perf/tokens_per_s`` / ``perf/mfu`` values (robust to the slow first step and to
evaluation pauses). Wall time = seconds since the run's first logged scalar; a resumed run has
one event file per process, and the pause between processes is left out. Where a step was
logged twice (a run resumed from an earlier checkpoint), the later value wins.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmtrain.eval import tags

EVENT_GLOB = "events.out.tfevents.*"


class ReportError(ValueError):
    """A run directory that cannot be reported: the message names it and what was expected."""


@dataclass
class Series:
    """One scalar tag of a run: steps, values and wall-clock seconds since the run started."""

    steps: List[int] = field(default_factory=list)
    values: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)

    @property
    def last(self) -> Optional[float]:
        return self.values[-1] if self.values else None


@dataclass
class Run:
    path: Path
    label: str
    config: Dict[str, Any]
    scalars: Dict[str, Series]

    @property
    def n_ctx(self) -> Optional[int]:
        return self.config.get("model", {}).get("n_ctx")

    def eval_tag(self) -> Optional[str]:
        """``eval/loss_ctx<n_ctx>`` (the run's training length), else the longest eval length logged."""
        if self.n_ctx is not None and tags.eval_tag(self.n_ctx) in self.scalars:
            return tags.eval_tag(self.n_ctx)
        logged = sorted((t for t in self.scalars if t.startswith("eval/loss_ctx")),
                        key=lambda t: int(t.rsplit("ctx", 1)[1]))
        return logged[-1] if logged else None


def event_files(run_dir: Path) -> List[Path]:
    """Event files of a run: ``<run_dir>/tensorboard/`` (what pretrain writes) or ``<run_dir>`` itself,
    oldest first (their names start with the creation time)."""
    for directory in (run_dir / "tensorboard", run_dir):
        files = [f for f in directory.glob(EVENT_GLOB) if f.is_file()] if directory.is_dir() else []
        if files:
            return sorted(files, key=lambda f: (int(f.name.split(".")[3]) if f.name.split(".")[3].isdigit() else 0,
                                                f.name))
    raise ReportError(f"{run_dir}: no TensorBoard event files ({EVENT_GLOB}) in {run_dir / 'tensorboard'} or "
                      f"{run_dir}; expected a run directory written by mmtrain/pretrain.py (or mmtrain/retrieval.py)")


def read_scalars(run_dir: Path) -> Dict[str, Series]:
    """Every scalar tag of a run, merged over its event files (one per process of a resumed run)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    points: Dict[str, Dict[int, Tuple[float, float]]] = {}
    offset = 0.0  # seconds of earlier processes
    for path in event_files(run_dir):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        events = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags().get("scalars", [])}
        times = [e.wall_time for evs in events.values() for e in evs]
        if not times:
            continue
        start, end = min(times), max(times)
        for tag, evs in events.items():
            for e in evs:
                points.setdefault(tag, {})[int(e.step)] = (float(e.value), offset + e.wall_time - start)
        offset += end - start
    scalars = {}
    for tag, by_step in points.items():
        steps = sorted(by_step)
        scalars[tag] = Series(steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps])
    return scalars


def read_run_config(run_dir: Path) -> Dict[str, Any]:
    """The resolved ``config.yaml`` of a run as a dict ({} when the run has none)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML ({exc})") from None


def run_label(config: Dict[str, Any], run_dir: Path) -> str:
    model = config.get("model") or {}
    if not model:
        return run_dir.name
    label = f"{model.get('kind', '?')} d{model.get('d_model', '?')} L{model.get('n_layers', '?')} ctx{model.get('n_ctx', '?')}"
    retrieval = config.get("retrieval") or {}
    return f"{label} retrieval" if retrieval else label


def load_runs(run_dirs: Sequence[str]) -> List[Run]:
    """Read every run; ReportError names the first directory that is missing or has no event files."""
    runs = []
    for name in run_dirs:
        path = Path(name)
        if not path.is_dir():
            raise ReportError(f"{name}: not a directory (expected a run directory written by mmtrain/pretrain.py)")
        config = read_run_config(path)
        scalars = read_scalars(path)
        if not scalars:
            raise ReportError(f"{name}: its event files hold no scalars (did the run log a step?)")
        runs.append(Run(path, run_label(config, path), config, scalars))
    labels = [r.label for r in runs]
    for run in runs:  # two runs of the same architecture: tell them apart by directory name
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.path.name})"
    return runs


# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------


def _median(series: Optional[Series]) -> Optional[float]:
    return statistics.median(series.values) if series and series.values else None


def summarize(run: Run) -> Dict[str, Any]:
    s = run.scalars
    train = s.get(tags.TRAIN_LOSS)
    tag = run.eval_tag()
    tokens = s.get(tags.TOKENS_SEEN)
    return {
        "run": str(run.path), "label": run.label, "n_ctx": run.n_ctx,
        "last_step": max(max(x.steps) for x in s.values() if x.steps),
        "train_loss": train.last if train else None,
        "eval_tag": tag, "eval_loss": s[tag].last if tag else None,
        "tokens_seen": int(tokens.last) if tokens and tokens.values else None,
        "tokens_per_s": _median(s.get(tags.TOKENS_PER_S)),
        "mfu": _median(s.get(tags.MFU)),
        "wall_s": max(max(x.seconds) for x in s.values() if x.seconds),
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| run | model | steps | train loss | eval loss | tokens seen | tokens/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {Path(r['run']).name} | {r['label']} | {r['last_step']} | {_fmt(r['train_loss'], '.4f')} | "
                     f"{_fmt(r['eval_loss'], '.4f')} | {_fmt(r['tokens_seen'], ',')} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------


def _interp(x: Sequence[float], xp: Sequence[float], fp: Sequence[float]) -> List[float]:
    import numpy as np

    return list(np.interp(x, xp, fp)) if len(xp) else [float("nan")] * len(x)


def plot_curves(runs: Sequence[Run], out: Path, title: str = "") -> None:
    """Loss against step, tokens seen and wall time (train solid, eval dashed) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        tokens = run.scalars.get(tags.TOKENS_SEEN)
        curves = [("train", run.scalars.get(tags.TRAIN_LOSS), "-", None)]
        tag = run.eval_tag()
        if tag:
            curves.append(("eval", run.scalars[tag], "--", "o"))
        for kind, series, style, marker in curves:
            if series is None or not series.steps:
                continue
            xs_tokens = (_interp(series.steps, tokens.steps, tokens.values) if tokens
                         else [float("nan")] * len(series.steps))
            label = f"{run.label} {kind}"
            for ax, xs in zip(axes, (series.steps, xs_tokens, series.seconds)):
                ax.plot(xs, series.values, style, marker=marker, markersize=3, color=colour, label=label,
                        linewidth=1.2)
    for ax, xlabel in zip(axes, ("optimizer step", "tokens seen", "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats)")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_report(run_dirs: Sequence[str], out: str, title: str = "") -> Dict[str, Any]:
    """Read the runs, write ``curves.png``, ``report.md`` and ``report.json`` into ``out``; returns the summary."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = load_runs(run_dirs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in runs]
    plot_curves(runs, out_dir / "curves.png", title)
    heading = f"# {title}\n\n" if title else "# Run report\n\n"
    notes = ("Final = value at the last logged step; eval loss at each run's n_ctx; tokens/s and MFU = median of "
             "the logged values; wall time = seconds since the first logged scalar (pauses between resumed "
             "processes left out).\n")
    (out_dir / "report.md").write_text(f"{heading}{format_table(rows)}\n\n{notes}\n![loss curves](curves.png)\n",
                                       encoding="utf-8")
    summary = {"runs": rows}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _run(args) -> int:
    try:
        summary = write_report(args.run_dirs, args.out, args.title or "")
    except ReportError as exc:
        print(f"mmtrain report: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary["runs"]))
    print(f"\nwrote {Path(args.out) / 'report.md'}, {Path(args.out) / 'curves.png'}, {Path(args.out) / 'report.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="loss curves and a summary table of several runs from their TensorBoard logs",
        description="Read the TensorBoard event files of run directories and write curves.png (loss vs step, "
                    "tokens and wall time, train and eval), report.md and report.json into --out.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by mmtrain/pretrain.py")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--title", help="title of the figure and the report")
    p.set_defaults(func=_run)
