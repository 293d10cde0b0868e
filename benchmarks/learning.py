"""Learning benchmark: does a model get past unigram statistics within a fixed token budget?

Trains a masked mixer and a transformer of the same width and depth on the built-in demo corpus
(auto-prepared on first use) at each context length, with the real launcher
(``python mmtrain/pretrain.py``: DeepSpeed engine, streaming shards), all runs with the same
recipe, seed and token budget (``--tokens``, the same tokens per step at every n_ctx). Reports
per run:

* eval loss at the budget (the run's last evaluation, at its n_ctx),
* the unigram entropy H1 of the validation split, computed from the shards: the loss of the best
  predictor that ignores context (the level of the "unigram plateau"),
* the first step at which eval loss fell ``--margin`` (0.3) nats below H1 ("never" if it did not),
* tokens/s (median of the logged values) and the parameter count,

and writes ``<out-dir>/learning.{md,csv}``, ``learning.png`` (the curves, via ``mmtrain report``)
and the runs themselves under ``<out-dir>/runs/``.

    python benchmarks/learning.py --quick                      # tiny models, n_ctx 64, ~1 min
    python benchmarks/learning.py                              # d 256 x 4, n_ctx 128 and 512
    python benchmarks/learning.py --set model.init=gpt --label gpt-init    # any override, all runs
    python benchmarks/learning.py --models mixer --n-ctx 128 --set train.lr=2e-3
    python benchmarks/learning.py --models mixer transformer hybrid --n-ctx 128 --flops 4e12 \
        --lr mixer=4e-3 transformer=1e-3 hybrid=2e-3          # equal training FLOPs, an LR per family

With ``--flops F`` every run gets the same training compute instead of the same tokens: steps =
F / (flops_per_token x tokens per step), with each model's own ``flops_per_token()`` (the count
the trainer logs for MFU), so a cheaper model sees more tokens.

Runs go one at a time with ``--threads`` torch threads (default: all cores), or ``--parallel 2``
at a time (tokens/s are then not comparable with a one-at-a-time run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _common import ROOT, fmt, machine_info, markdown_table, report

#: Family -> model overrides (same width and depth; the transformer is the Llama baseline).
FAMILIES = {
    "mixer": ["model.kind=mixer"],
    "transformer": ["model.kind=transformer", "model.n_heads=4"],
    "toeplitz": ["model.kind=mixer", "model.mixer_matrix=toeplitz"],
    "hybrid": ["model.kind=hybrid", "model.n_heads=4"],
}

#: The full benchmark: the quick-start model's shape and recipe (PretrainConfig's defaults).
FULL = {"d_model": 256, "n_layers": 4, "n_ctx": [128, 512], "tokens": 614_400, "tokens_per_step": 2048,
        "evals": 12, "eval_batches": 4, "overrides": []}
#: --quick: a tiny model with a higher LR, so that 200 steps get it past the unigram plateau.
QUICK = {"d_model": 64, "n_layers": 2, "n_ctx": [64], "tokens": 102_400, "tokens_per_step": 512,
         "evals": 8, "eval_batches": 2, "overrides": ["train.lr=3e-3"]}


def log_path(run_dir: Path) -> Path:
    """``<run_dir>.log`` beside the run (a label such as ``lr1.6e-2`` has dots: not a suffix)."""
    return run_dir.parent / f"{run_dir.name}.log"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models (d 64 x 2, lr 3e-3), n_ctx 64, 102k tokens")
    p.add_argument("--models", nargs="+", choices=sorted(FAMILIES), default=["mixer", "transformer"])
    p.add_argument("--n-ctx", type=int, nargs="+", help="context lengths (default 128 512; quick: 64)")
    p.add_argument("--tokens", type=int, help="training tokens per run (default 614,400; quick: 40,960)")
    p.add_argument("--flops", type=float, default=0.0,
                   help="equal compute instead of equal tokens: training FLOPs per run (e.g. 4e12); each "
                        "family's steps = FLOPS / (its flops_per_token x tokens per step)")
    p.add_argument("--lr", nargs="+", default=[], metavar="FAMILY=LR",
                   help="learning rate per family, e.g. mixer=4e-3 transformer=1e-3 (others: the config's)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default 2048; quick: 512)")
    p.add_argument("--d-model", type=int, help="width (default 256; quick: 64)")
    p.add_argument("--layers", type=int, help="depth (default 4; quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run (default 0)")
    p.add_argument("--margin", type=float, default=0.3, help="nats below the unigram entropy (default 0.3)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra pretrain overrides applied to every run, e.g. model.init=gpt train.lr=2e-3")
    p.add_argument("--label", default="", help="name of this sweep in the table and run names")
    p.add_argument("--shard-dir", type=Path, default=ROOT / "data" / "demo",
                   help="demo shards (prepared on first use; default data/demo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = cores / parallel)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks" / "learning")
    args = p.parse_args(argv)
    spec = dict(QUICK if args.quick else FULL)
    for key, value in (("n_ctx", args.n_ctx), ("tokens", args.tokens), ("tokens_per_step", args.tokens_per_step),
                       ("d_model", args.d_model), ("n_layers", args.layers)):
        if value:
            spec[key] = value
    for n_ctx in spec["n_ctx"]:
        if spec["tokens_per_step"] % n_ctx:
            p.error(f"--tokens-per-step {spec['tokens_per_step']} is not a multiple of n_ctx {n_ctx}")
    if spec["tokens"] < spec["tokens_per_step"]:
        p.error(f"--tokens {spec['tokens']} is less than one step ({spec['tokens_per_step']} tokens)")
    if args.flops < 0:
        p.error(f"--flops {args.flops:g}: must be > 0")
    args.lrs = {}
    for item in args.lr:
        family, _, value = item.partition("=")
        if family not in FAMILIES:
            p.error(f"--lr {item}: unknown family {family!r} (expected one of {', '.join(sorted(FAMILIES))})")
        try:
            args.lrs[family] = float(value)
        except ValueError:
            p.error(f"--lr {item}: expected FAMILY=LR with a number, e.g. mixer=4e-3")
    args.spec = spec
    return args


# --------------------------------------------------------------------------------------------
# What the benchmark computes from the data and the runs
# --------------------------------------------------------------------------------------------

def unigram_entropy(shard_dir: Path, n_ctx: int, split: str = "val") -> Dict[str, float]:
    """Entropy (nats) of the token distribution of a split's prediction targets: every token of
    every block but the first (position 0 is never a target), pads excluded. This is the loss of
    the best context-free predictor on that split. Returns ``{"entropy", "tokens"}``."""
    import numpy as np

    from mmtrain.data.lm_dataset import build_lm_loader
    from mmtrain.data.shards import read_meta

    vocab = int(read_meta(shard_dir, n_ctx)["vocab_size"])
    loader = build_lm_loader(shard_dir, n_ctx, split, batch_size=1, shuffle=False, seed=0, num_workers=0)
    counts = np.zeros(vocab, dtype=np.int64)
    for batch in loader:
        ids = batch["input_ids"][:, 1:]
        if "attention_mask" in batch:
            ids = ids[batch["attention_mask"][:, 1:] > 0]
        counts += np.bincount(ids.reshape(-1).numpy(), minlength=vocab)
    if counts.sum() == 0:
        raise ValueError(f"no tokens in {shard_dir}/ctx{n_ctx}/{split}")
    p = counts[counts > 0] / counts.sum()
    return {"entropy": float(-(p * np.log(p)).sum()), "tokens": int(counts.sum())}


def first_step_below(curve: Sequence[Sequence[float]], level: float) -> Optional[int]:
    """First step of ``curve`` ([(step, loss), ...], in step order) whose loss is < ``level``."""
    for step, loss in curve:
        if loss < level:
            return int(step)
    return None


def eval_curve(run_dir: Path, n_ctx: int) -> List[List[float]]:
    """[(step, eval loss at n_ctx), ...] from the run's metrics.jsonl (a resumed step: last wins)."""
    from mmtrain.train import monitor

    key = f"eval_loss_ctx{n_ctx}"
    by_step = {int(r["step"]): float(r[key]) for r in monitor.read_metrics(str(run_dir)) if key in r}
    return [[step, by_step[step]] for step in sorted(by_step)]


def median_tokens_per_s(run_dir: Path) -> Optional[float]:
    from mmtrain.train import monitor

    values = [float(r["tokens_per_s"]) for r in monitor.read_metrics(str(run_dir)) if "tokens_per_s" in r]
    return statistics.median(values[1:] or values) if values else None


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

def model_overrides(family: str, n_ctx: int, spec: Dict[str, Any]) -> List[str]:
    return FAMILIES[family] + [f"model.d_model={spec['d_model']}", f"model.n_layers={spec['n_layers']}",
                               f"model.n_ctx={n_ctx}"]


def flops_per_token(family: str, n_ctx: int, spec: Dict[str, Any], args: argparse.Namespace) -> float:
    """The model's training FLOPs per token at n_ctx (``flops_per_token()``, as the trainer counts)."""
    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig
    from mmtrain.data.shards import read_meta
    from mmtrain.models import build_model

    cfg = load_config(PretrainConfig, [], model_overrides(family, n_ctx, spec) + spec["overrides"]
                      + [o for o in args.overrides if o.startswith("model.")])
    vocab = int(read_meta(args.shard_dir, n_ctx)["vocab_size"])
    return float(build_model(cfg.model, vocab_size=vocab).flops_per_token())


def run_steps(family: str, n_ctx: int, spec: Dict[str, Any], args: argparse.Namespace,
              fpt: Optional[float] = None) -> int:
    """Optimizer steps of a run: the token budget, or with --flops the FLOP budget at this model's cost
    (``fpt``: its flops_per_token(), when already known)."""
    if args.flops:
        fpt = fpt or flops_per_token(family, n_ctx, spec, args)
        return max(1, round(args.flops / (fpt * spec["tokens_per_step"])))
    return spec["tokens"] // spec["tokens_per_step"]


def run_overrides(family: str, n_ctx: int, spec: Dict[str, Any], args: argparse.Namespace,
                  run_dir: Path, steps: Optional[int] = None) -> List[str]:
    batch = spec["tokens_per_step"] // n_ctx
    steps = steps or spec["tokens"] // spec["tokens_per_step"]
    every = max(1, steps // spec["evals"])
    lr = [f"train.lr={args.lrs[family]}"] if family in getattr(args, "lrs", {}) else []
    return model_overrides(family, n_ctx, spec) + [
        f"model.d_model={spec['d_model']}", f"model.n_layers={spec['n_layers']}", f"model.n_ctx={n_ctx}",
        f"train.steps={steps}", f"train.global_batch_size={batch}", f"train.micro_batch_size={min(batch, 8)}",
        f"train.seed={args.seed}", f"train.eval_every={every}", f"train.eval_batches={spec['eval_batches']}",
        f"data.shard_dir={args.shard_dir}", "checkpoint.every=0", "checkpoint.keep_last=1", "checkpoint.resume=none",
        "logging.progress_bar=false", f"logging.run_dir={run_dir}",
    ] + spec["overrides"] + list(args.overrides) + lr


def launch(overrides: List[str], threads: int, log: Path) -> int:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, str(ROOT / "mmtrain" / "pretrain.py"), *overrides],
                              cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return proc.returncode


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    spec = args.spec
    label = args.label or ("quick" if args.quick else "default")
    extra = spec["overrides"] + list(args.overrides)
    out = args.out_dir
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    jobs = [(family, n_ctx) for n_ctx in spec["n_ctx"] for family in args.models]
    run_dirs = {job: out / "runs" / f"{label}-{job[0]}-ctx{job[1]}" for job in jobs}
    budget = f"{args.flops:.3g} training FLOPs" if args.flops else f"{spec['tokens']:,} tokens"
    print(f"learning benchmark '{label}': {len(jobs)} runs of {budget} "
          f"(d {spec['d_model']} x {spec['n_layers']}, {spec['tokens_per_step']} tokens/step, seed {args.seed}"
          f"{', ' + ' '.join(extra) if extra else ''}); {args.parallel} at a time, "
          f"{threads} threads each", flush=True)

    # Shards first (one process), so parallel runs do not both auto-prepare them.
    from mmtrain.data.prepare import demo_prepare_config, prepare
    from mmtrain.data.shards import ctx_dir

    missing = [n for n in spec["n_ctx"] if not (ctx_dir(args.shard_dir, n) / "meta.json").is_file()]
    if missing:
        prepare(demo_prepare_config(str(args.shard_dir), missing), progress=False)
    entropies = {n: unigram_entropy(args.shard_dir, n) for n in spec["n_ctx"]}
    fpt_of = {job: flops_per_token(*job, spec, args) for job in jobs}
    steps_of = {job: run_steps(*job, spec, args, fpt_of[job]) for job in jobs}

    def one(job):
        start = time.time()
        rc = launch(run_overrides(*job, spec, args, run_dirs[job], steps_of[job]), threads, log_path(run_dirs[job]))
        print(f"  {job[0]} n_ctx {job[1]}: exit {rc} after {time.time() - start:.0f} s "
              f"(log {log_path(run_dirs[job])})", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        codes = dict(zip(jobs, pool.map(one, jobs)))
    failed = [job for job, rc in codes.items() if rc != 0]
    if failed:
        for job in failed:
            print(f"run {job} failed; last lines of its log:\n"
                  + "\n".join(log_path(run_dirs[job]).read_text().splitlines()[-15:]), file=sys.stderr)
        return 1

    records, rows = [], []
    for family, n_ctx in jobs:
        run_dir = run_dirs[(family, n_ctx)]
        curve = eval_curve(run_dir, n_ctx)
        level = entropies[n_ctx]["entropy"]
        below = first_step_below(curve, level - args.margin)
        params = re.search(r"params=([\d,]+)", log_path(run_dir).read_text())
        tps = median_tokens_per_s(run_dir)
        steps = steps_of[(family, n_ctx)]
        tokens = steps * spec["tokens_per_step"]
        record = {"label": label, "model": family, "n_ctx": n_ctx, "steps": steps, "tokens": tokens,
                  "flops_per_token": fpt_of[(family, n_ctx)], "train_flops": fpt_of[(family, n_ctx)] * tokens,
                  "lr": args.lrs.get(family), "eval_loss": curve[-1][1] if curve else None,
                  "unigram_entropy": level, "below_unigram": (level - curve[-1][1]) if curve else None,
                  "step_below": below, "tokens_per_s": tps, "seed": args.seed,
                  "overrides": " ".join(extra), "curve": json.dumps(curve),
                  "params": int(params.group(1).replace(",", "")) if params else None, "run_dir": str(run_dir)}
        records.append(record)
        rows.append([label, family, n_ctx, fmt((record["params"] or 0) / 1e6, 2), fmt(record["tokens"]),
                     f"{record['train_flops']:.3g}", f"{record['eval_loss']:.3f}", f"{level:.3f}",
                     f"{record['below_unigram']:+.3f}", "never" if below is None else f"{below}",
                     fmt(tps)])
    table = markdown_table(["sweep", "model", "n_ctx", "params (M)", "tokens", "train FLOPs", "eval loss",
                            "unigram H1", "H1 - eval", f"step < H1-{args.margin:g}", "tokens/s"], rows,
                           align="lllrrrrrrrr")
    budget = (f"{args.flops:.3g} training FLOPs per run (equal compute)" if args.flops
              else f"{spec['tokens']:,} tokens per run")
    lrs = "; lr " + ", ".join(f"{f} {v:g}" for f, v in args.lrs.items()) if args.lrs else ""
    header = (f"Learning benchmark, d {spec['d_model']} x {spec['n_layers']} layers, {budget} "
              f"({spec['tokens_per_step']} tokens per step), seed {args.seed}{lrs}; unigram H1 = entropy of the "
              f"validation targets (nats); about {spec['evals']} evals per run; {threads} torch "
              f"thread(s) per run, {max(1, args.parallel)} run(s) at a time"
              + (f"; overrides: {' '.join(extra)}" if extra else ""))
    report(out, "learning" if label in ("default", "quick") else f"learning-{label}", machine_info(), header,
           table, records)
    try:
        from mmtrain.eval.report import load_runs, plot_curves

        png = out / ("learning.png" if label in ("default", "quick") else f"learning-{label}.png")
        plot_curves(load_runs([str(run_dirs[job]) for job in jobs]), png, title=f"learning benchmark: {label}")
        print(f"wrote {png}")
    except Exception as exc:  # the table is the result; a plot failure (e.g. no matplotlib) is not fatal
        print(f"(no plot: {exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
