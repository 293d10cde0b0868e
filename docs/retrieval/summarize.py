"""Table and curves of the retrieval study (docs/retrieval/study.sh) from the runs' metrics.jsonl.

    python docs/retrieval/summarize.py runs/retrieval-study --out docs/retrieval [--groups ...]

Prints a markdown table (per run: val recall@1 / MRR@10 / top-1@32 at step 0, at its best val
evaluation and at the end, with train recall@1 at the end: the memorisation gap) and writes
``<out>/study.json`` and ``<out>/study.png`` (val recall@1, solid, and train recall@1, dashed,
against step; one panel per ``--groups`` entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


STUDY_GROUPS = (
    "1. from the shipped recipe (last-token pooling):mixer-shipped,mixer-base,mixer-lr5e-4,mixer-mean;"
    "2. temperature (mean pooling, lr 2e-4, learned at 5e-4):mixer-mean,mixer-m-t0.02,mixer-m-t0.1,"
    "mixer-r3-tlearn,mixer-m-lr5e-4;"
    "3. learning rate (mean pooling):mixer-mean,mixer-m-lr5e-4,mixer-r3-lr1e-3,mixer-r3-lr2e-3;"
    "4. the corpus stage (ict or crop) before the labeled one:mixer-r3-lr1e-3,mixer-ict-r3-lr1e-3,"
    "mixer-crop-r3-lr1e-3;"
    "5. hard negatives, batch 128 (80 steps = 5 epochs):mixer-m-lr5e-4,mixer-r3-hard1,mixer-mean,mixer-m-hard1,"
    "mixer-m-b128;"
    "6. pooling and one-sided loss (lr 2e-4), transformer:mixer-base,mixer-second,mixer-mean,mixer-m-asym,"
    "transformer-r3-lr1e-3,transformer-m-lr5e-4")


def load(root: Path):
    runs = {}
    for metrics in sorted(root.glob("*/metrics.jsonl")):
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval_recall@1" in r]
        if evals:
            runs[metrics.parent.name] = evals
    return runs


def row(name, evals):
    best = max(evals, key=lambda r: r["eval_recall@1"])
    last = evals[-1]
    pct = lambda r, k: 100 * r.get(f"eval_{k}", float("nan"))  # noqa: E731
    return {"run": name, "steps": last["step"],
            "start_r1": pct(evals[0], "recall@1"), "best_r1": pct(best, "recall@1"), "best_step": best["step"],
            "final_r1": pct(last, "recall@1"), "final_mrr10": pct(last, "mrr@10"),
            "final_top1_32": pct(last, "top1@32"), "final_train_r1": pct(last, "train_recall@1")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--title", default="InfoNCE on the demo pairs: val recall@1 (solid) and train recall@1 (dashed)")
    ap.add_argument("--groups", default="", help="panels: 'title:run,run;title:run,...' or `study` (docs/retrieval.md's); default one panel")
    args = ap.parse_args(argv)
    runs = load(args.root)
    if not runs:
        print(f"{args.root}: no runs with evaluations", file=sys.stderr)
        return 2
    rows = [row(n, e) for n, e in runs.items()]
    print("| run | steps | val R@1 step 0 | best val R@1 (step) | final val R@1 | final MRR@10 | final top-1@32 "
          "| final train R@1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['start_r1']:.1f}% | {r['best_r1']:.1f}% ({r['best_step']}) | "
              f"{r['final_r1']:.1f}% | {r['final_mrr10']:.1f}% | {r['final_top1_32']:.1f}% | {r['final_train_r1']:.1f}% |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "study.json").write_text(json.dumps({"rows": rows, "curves": runs}, indent=1) + "\n")
        spec = STUDY_GROUPS if args.groups == "study" else args.groups
        groups = [g.split(":", 1) for g in spec.split(";")] if spec else [("", ",".join(runs))]
        cols = min(2, len(groups))
        rows_n = (len(groups) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
        for ax, (title, names) in zip(axes.flat, groups):
            for i, name in enumerate(n for n in names.split(",") if n in runs):
                evals = runs[name]
                steps = [r["step"] for r in evals]
                color = f"C{i % 10}"
                ax.plot(steps, [100 * r["eval_recall@1"] for r in evals], "-o", ms=3, color=color, label=name)
                if "eval_train_recall@1" in evals[0]:
                    ax.plot(steps, [100 * r["eval_train_recall@1"] for r in evals], "--", color=color, alpha=0.5)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step (32 pairs; 64 steps = 1 epoch)")
            ax.set_ylabel("recall@1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.suptitle(args.title, fontsize=11)
        fig.tight_layout()
        fig.savefig(args.out / "study.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
