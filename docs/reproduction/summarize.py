"""Tables of the reproduction sweep (docs/reproduction/sweep.sh) from the runs' metrics.jsonl.

    python docs/reproduction/summarize.py runs/repro [--json docs/reproduction/sweep.json]

Prints (markdown) the LR sweep (final eval loss per family, n_ctx and LR at seed 0, the best
marked) and the seed table (mean and standard deviation of the final eval loss over the seeds at
each family's best LR), plus, per run, the first step at which eval loss was 0.3 nats below the
unigram entropy of the validation split.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

RUN = re.compile(r"^(?P<family>mixer|transformer)-ctx(?P<n_ctx>\d+)-lr(?P<lr>[0-9.e-]+)-s(?P<seed>\d+)$")


def load(runs_root: Path):
    from learning import eval_curve  # benchmarks/learning.py

    runs = []
    for d in sorted(runs_root.iterdir()):
        m = RUN.match(d.name)
        if not m or not d.is_dir() or not (d / "metrics.jsonl").is_file():
            continue
        n_ctx = int(m["n_ctx"])
        curve = eval_curve(d, n_ctx)
        if not curve:
            continue
        tokens = [json.loads(line).get("tokens_seen") for line in open(d / "metrics.jsonl")]
        runs.append({"family": m["family"], "n_ctx": n_ctx, "lr": float(m["lr"]), "lr_text": m["lr"],
                     "seed": int(m["seed"]), "curve": curve, "final": curve[-1][1], "steps": curve[-1][0],
                     "tokens": max(t for t in tokens if t is not None), "run_dir": str(d)})
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_root", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--shard-dir", type=Path, default=ROOT / "data" / "demo")
    args = p.parse_args(argv)
    from learning import first_step_below, unigram_entropy

    runs = load(args.runs_root)
    if not runs:
        print(f"no sweep runs under {args.runs_root}", file=sys.stderr)
        return 2
    h1 = {n: unigram_entropy(args.shard_dir, n)["entropy"] for n in sorted({r["n_ctx"] for r in runs})}
    for r in runs:
        r["unigram_entropy"] = h1[r["n_ctx"]]
        r["step_below"] = first_step_below(r["curve"], h1[r["n_ctx"]] - 0.3)

    print("LR sweep (seed 0): final eval loss (nats)\n")
    lrs = sorted({r["lr"] for r in runs if r["seed"] == 0})
    print("| n_ctx | model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | unigram H1 |")
    print("|---:|---|" + "---:|" * (len(lrs) + 1))
    best = {}
    for n_ctx in sorted(h1):
        for family in ("mixer", "transformer"):
            seed0 = {r["lr"]: r for r in runs if r["seed"] == 0 and r["family"] == family and r["n_ctx"] == n_ctx}
            if not seed0:
                continue
            top = min(seed0.values(), key=lambda r: r["final"])
            best[(family, n_ctx)] = top["lr"]
            cells = [("**%.3f**" if seed0[lr] is top else "%.3f") % seed0[lr]["final"] if lr in seed0 else "—"
                     for lr in lrs]
            print(f"| {n_ctx} | {family} | " + " | ".join(cells) + f" | {h1[n_ctx]:.3f} |")

    print("\nBest LR, all seeds: final eval loss, mean ± std over seeds\n")
    print("| n_ctx | model | lr | steps | tokens | seeds | final eval loss per seed | mean ± std | "
          "step < H1-0.3 per seed |")
    print("|---:|---|---:|---:|---:|---|---|---:|---|")
    summary = []
    for (family, n_ctx), lr in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        group = sorted((r for r in runs if r["family"] == family and r["n_ctx"] == n_ctx and r["lr"] == lr),
                       key=lambda r: r["seed"])
        finals = [r["final"] for r in group]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"| {n_ctx} | {family} | {lr:g} | {group[0]['steps']} | {group[0]['tokens']:,} | "
              f"{', '.join(str(r['seed']) for r in group)} | {', '.join(f'{x:.3f}' for x in finals)} | "
              f"{statistics.mean(finals):.3f} ± {std:.3f} | "
              f"{', '.join('never' if r['step_below'] is None else str(r['step_below']) for r in group)} |")
        summary.append({"family": family, "n_ctx": n_ctx, "lr": lr, "seeds": [r["seed"] for r in group],
                        "final_eval_loss": finals, "mean": statistics.mean(finals), "std": std})
    if args.json:
        args.json.write_text(json.dumps({"unigram_entropy": h1, "runs": runs, "best": summary}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
