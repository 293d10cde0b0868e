"""Table of the frozen-embedding scorer runs of docs/retrieval/frozen_study.sh (or any
`mmtrain frozen-retrieval --json` results): one row per result JSON, as Markdown, plus the numbers
(and every evaluation) as one JSON file.

    python docs/retrieval/frozen_summary.py runs/frozen-study --out docs/retrieval/frozen_study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(name: str, r: dict) -> dict:
    hist = r["history"]
    best = max(hist, key=lambda h: (h["accuracy"], -h["step"]))
    return {"run": name, "eval_split": r.get("eval_split", "test"), "n_candidates": r["n_candidates"],
            "steps": r["steps"], "chance": r["chance"], "cosine": r["cosine_accuracy"],
            "initial": r["initial_accuracy"], "best": best["accuracy"], "best_step": best["step"],
            "final": r["accuracy"], "final_loss": r["eval_loss"], "min_loss": min(h["loss"] for h in hist),
            "train_loss": r["train_loss"], "train_accuracy": r.get("train_accuracy"),
            "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in hist]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="result JSON files or directories holding them")
    ap.add_argument("--out", help="write the rows (with every evaluation) here")
    args = ap.parse_args()
    files = []
    for item in map(Path, args.results):
        files += sorted(item.glob("*.json")) if item.is_dir() else [item]
    rows = [row(f.stem, json.loads(f.read_text())) for f in files]
    print("| run | N | steps | acc step 0 -> best (step) -> final | loss min -> final | train acc | cosine | chance |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['n_candidates']} | {r['steps']} | {100 * r['initial']:.1f} -> "
              f"{100 * r['best']:.1f} ({r['best_step']}) -> {100 * r['final']:.1f} | {r['min_loss']:.3f} -> "
              f"{r['final_loss']:.3f} | {100 * (r['train_accuracy'] or 0):.1f} | {100 * r['cosine']:.1f} | "
              f"{100 * r['chance']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
