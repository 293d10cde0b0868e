"""`mmtrain prepare` scaling: one process vs the corpus in parts (``--part I/N``) run side by side.

The corpus is the demo docstrings written ``--copies`` times into one JSONL file (a few MB). Each
setting runs ``mmtrain prepare`` as a user would, in fresh processes (start-up and imports are
counted), with the shipped tokenizer and ``num_proc 1`` per process:

* 1 process: one plain prepare.
* P processes: parts 0/P .. P-1/P started at once, then ``--merge``; the time is from the start of
  the parts to the end of the merge, and the merge alone is shown too.

tokens = the corpus tokens written (documents + EOS, from meta.json); ratio = tokens/s of the
setting / tokens/s of one process; CPU seconds = user + system time of all its processes (the
work to share out: with P free cores the wall time approaches it / P). Each setting runs ``--repeats`` times into a new directory; the
median time is reported.

    python benchmarks/prepare.py                   # 1 vs 2 processes, 3 copies, 3 repeats
    python benchmarks/prepare.py --processes 1 2 4 --copies 5 --n-ctx 512

Writes ``<out-dir>/prepare.{md,csv}`` (default out-dir: runs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import ROOT, fmt, machine_info, markdown_table, median, report


def write_corpus(path: Path, copies: int) -> int:
    """The demo docstrings ``copies`` times as JSONL; returns the file's size in bytes."""
    from mmtrain.data.demo_corpus import demo_documents

    docs = list(demo_documents())
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            for doc in docs:
                fh.write(json.dumps({"text": doc}) + "\n")
    return path.stat().st_size


def prepare_command(corpus: Path, out: Path, n_ctx: int, *extra: str) -> List[str]:
    from mmtrain.data.tokenizer import DEMO_TOKENIZER

    return [sys.executable, "-m", "mmtrain.cli", "prepare", "--input", str(corpus), "--out", str(out),
            "--n-ctx", str(n_ctx), "--tokenizer", str(DEMO_TOKENIZER), "--num-proc", "1", "--quiet", *extra]


def run_all(commands: List[List[str]]) -> None:
    """Start every command at once and wait for all; an error names the failing command."""
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    for cmd, proc in zip(commands, procs):
        output, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")


def corpus_tokens(out: Path, n_ctx: int) -> int:
    meta = json.loads((out / f"ctx{n_ctx}" / "meta.json").read_text())
    return sum(s["document_tokens"] for s in meta["splits"].values())


def measure(corpus: Path, work: Path, n_ctx: int, processes: int, repeat: int) -> Dict[str, Any]:
    out = work / f"p{processes}-r{repeat}"
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if processes == 1:
        run_all([prepare_command(corpus, out, n_ctx)])
        merge_s = None
    else:
        run_all([prepare_command(corpus, out, n_ctx, "--part", f"{i}/{processes}") for i in range(processes)])
        merge_start = time.perf_counter()
        run_all([[sys.executable, "-m", "mmtrain.cli", "prepare", "--out", str(out), "--n-ctx", str(n_ctx),
                  "--merge"]])
        merge_s = time.perf_counter() - merge_start
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "merge_seconds": merge_s, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_start,
            "tokens": corpus_tokens(out, n_ctx)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="settings to compare (default: 1 2)")
    parser.add_argument("--copies", type=int, default=3, help="copies of the demo corpus (default: 3, ~5 MB)")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "benchmarks")
    args = parser.parse_args(argv)
    if any(p < 1 for p in args.processes) or args.copies < 1 or args.repeats < 1:
        parser.error("--processes, --copies and --repeats must be >= 1")
    processes = sorted(set(args.processes) | {1})
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-prepare-") as tmp:
        work = Path(tmp)
        size = write_corpus(work / "corpus.jsonl", args.copies)
        results: Dict[int, List[Dict[str, Any]]] = {p: [] for p in processes}
        for repeat in range(args.repeats):   # interleaved: slow phases of a noisy machine hit every setting
            for p in processes:
                results[p].append(measure(work / "corpus.jsonl", work, args.n_ctx, p, repeat))
    base = None
    rows, records = [], []
    for p in processes:
        seconds = median([r["seconds"] for r in results[p]])
        merges = [r["merge_seconds"] for r in results[p] if r["merge_seconds"] is not None]
        tokens = results[p][0]["tokens"]
        rate = tokens / seconds
        base = base or rate
        cpu = median([r["cpu_seconds"] for r in results[p]])
        rows.append([str(p), fmt(tokens), fmt(seconds, 2), fmt(median(merges), 2) if merges else "—", fmt(cpu, 2),
                     fmt(rate), f"{rate / base:.2f}x"])
        records.append({"processes": p, "tokens": tokens, "seconds": round(seconds, 3),
                        "merge_seconds": round(median(merges), 3) if merges else None,
                        "cpu_seconds": round(cpu, 3), "tokens_per_second": round(rate), "ratio": round(rate / base, 3),
                        "all_seconds": [round(r["seconds"], 3) for r in results[p]]})
    header = (f"Corpus: the demo docstrings x{args.copies} ({size / 1e6:.1f} MB JSONL), n_ctx {args.n_ctx}, shipped "
              f"tokenizer, num_proc 1 per process; median of {args.repeats} runs. P > 1: parts 0/P..P-1/P at once, "
              "then --merge (included in seconds, and shown alone).")
    text = markdown_table(["processes", "tokens", "seconds", "of which merge (s)", "CPU seconds (all processes)",
                           "tokens/s", "ratio vs 1"], rows)
    report(args.out_dir, "prepare", info, header, text, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
