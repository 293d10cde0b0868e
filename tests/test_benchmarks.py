"""The benchmarks run as a user runs them (their quickest form) and print complete tables.

The benchmark scripts start together (one BLAS thread each) and are shared by the tests;
the tests check the tables' rows, columns and numbers, and the files written. They do not judge
speed: timings on a shared machine are not test material.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, script_env

BENCH = ROOT / "benchmarks"


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def markdown_rows(output: str, first_header: str):
    """Header cells and data rows (lists of cells) of the markdown table whose first header cell
    is ``first_header``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


@pytest.fixture(scope="module")
def bench_runs(demo_shards, tmp_path_factory):
    """{name: (stdout, out_dir)} of the four benchmarks in their quick form."""
    base = tmp_path_factory.mktemp("benchmarks")
    commands = {
        "throughput": ["throughput.py", "--quick", "--models", "mixer", "mixer-mh", "paper-mixer", "transformer",
                       "hf-llama", "toeplitz"],
        "zero_memory": ["zero_memory.py", "--quick", "--world-sizes", "2"],
        "data": ["data.py", "--quick", "--shard-dir", str(demo_shards), "--n-ctx", "64", "--batches", "10",
                 "--threads", "1"],
        "learning": ["learning.py", "--quick", "--shard-dir", str(demo_shards), "--threads", "1",
                     "--tokens", "20480", "--label", "lr3.0e-3"],   # 40 steps of 512 tokens; a label with a dot
    }
    procs = {}
    for name, (script, *args) in commands.items():
        out_dir = base / name
        procs[name] = (subprocess.Popen([sys.executable, str(BENCH / script), *args, "--out-dir", str(out_dir)],
                                        cwd=ROOT, env=script_env(), text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE), out_dir)
    runs = {}
    for name, (proc, out_dir) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"benchmarks/{commands[name][0]} exited {proc.returncode}\n"
                                 f"{stdout[-4000:]}\n{stderr[-6000:]}")
        runs[name] = (stdout, out_dir)
    return runs


def test_throughput_quick_prints_every_model_at_both_lengths_with_ratios(bench_runs):
    stdout, out_dir = bench_runs["throughput"]
    header, rows = markdown_rows(stdout, "model")
    assert header == ["model", "n_ctx", "ZeRO", "stored params (M)", "step (ms)", "tokens/s", "peak mem (MiB)", "MFU",
                      "tokens/s ratio", "mem ratio", "ratio vs"]
    by_name = {}
    for row in rows:
        by_name.setdefault(row[0], []).append(row)
        for cell in row[3:8]:  # params, step, tokens/s, memory, MFU
            assert _number(cell) > 0, row
    for label in ("mixer (ours)", "mixer multi-head (ours)", "paper mixer, Conv1d (ref)", "transformer (ours)",
                  "HF LlamaForCausalLM (ref)"):
        assert sorted(int(r[1]) for r in by_name[label]) == [32, 64], label
    for row in by_name["mixer (ours)"] + by_name["transformer (ours)"]:
        assert _number(row[8]) > 0 and _number(row[9]) > 0
    assert {r[10] for r in by_name["mixer (ours)"]} == {"paper mixer, Conv1d (ref)"}
    assert {r[10] for r in by_name["transformer (ours)"]} == {"HF LlamaForCausalLM (ref)"}
    toeplitz = by_name["Toeplitz mixer (ours)"]
    assert sorted(int(r[1]) for r in toeplitz) == [32, 64] and {r[10] for r in toeplitz} == {"mixer (ours)"}
    assert all(_number(r[8]) > 0 for r in toeplitz)
    # engine overhead: plain loop and ZeRO 1-3, each engine row with its ratio to the plain loop
    assert [r[2] for r in by_name["mixer, plain PyTorch loop"]] == ["—"]
    for stage in (1, 2, 3):
        (row,) = by_name[f"mixer, engine ZeRO {stage}"]
        assert row[2] == str(stage) and row[10] == "plain loop" and _number(row[8]) > 0
    assert re.search(r"fp32 matmul peak \(measured in this run\): [\d,.]+ GFLOP/s", stdout)

    with open(out_dir / "throughput.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == len(rows)
    stored = {(r["model"], r["n_ctx"]): int(r["params"]) for r in records if r["section"] == "sweep"}
    for n_ctx in ("32", "64"):   # one kernel per block instead of a triangle
        assert stored[("toeplitz", n_ctx)] < stored[("mixer", n_ctx)]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["peak_flops"]) > 0 for r in records)
    assert (out_dir / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = (out_dir / "throughput.md").read_text().splitlines()
    assert sum(line.startswith("| mixer (ours) |") for line in written) == 2


def test_zero_memory_quick_reports_every_stage_per_rank_with_expected_bytes(bench_runs):
    stdout, out_dir = bench_runs["zero_memory"]
    header, rows = markdown_rows(stdout, "ZeRO")
    assert header[:3] == ["ZeRO", "world", "expected B/param"]
    assert [(r[0], r[1]) for r in rows] == [(str(s), "2") for s in range(4)]
    expected = {"0": "16 = 16.0", "1": "8 + 12/N = 14.0", "2": "4 + 16/N = 12.0", "3": "20/N = 10.0"}
    for row in rows:
        assert row[2] == expected[row[0]]
        per_rank = [_number(x) for x in row[4].split(" / ")]
        assert len(per_rank) == 2 and all(x > 0 for x in per_rank)
        assert _number(row[5]) > 0 and _number(row[6]) > 0 and _number(row[7]) > 0
    with open(out_dir / "zero_memory.csv", newline="") as fh:
        assert [int(r["zero_stage"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3]


def test_data_quick_compares_each_worker_setting_and_source_with_training_consumption(bench_runs):
    stdout, out_dir = bench_runs["data"]
    header, rows = markdown_rows(stdout, "what")
    assert header == ["what", "source", "samples/s", "tokens/s", "first batch (s)", "ratio vs training"]
    sources = ["local directory", "S3 bucket (loopback), cold cache", "S3 bucket (loopback), warm cache"]
    assert [(r[0], r[1]) for r in rows] == [(f"streaming loader, num_workers {w}", src) for src in sources
                                            for w in (0, 1, 2)] + [("training consumption (default config)", "—")]
    train_tps = _number(rows[-1][3])
    for row in rows[:-1]:
        samples, tokens = _number(row[2]), _number(row[3])
        assert samples > 0 and tokens == pytest.approx(64 * samples, abs=64)
        assert _number(row[4]) > 0 if "cold" in row[1] else _number(row[4]) >= 0
        assert _number(row[5]) == pytest.approx(tokens / train_tps, rel=0.06)
    with open(out_dir / "data.csv", newline="") as fh:
        records = [r for r in csv.DictReader(fh) if r["source"].startswith("S3")]
    # cold: an empty cache, every shard downloaded; warm: the same cache, complete, nothing downloaded
    for r in records:
        total = int(r["shards_total"])
        cold = r["source"].endswith("cold cache")
        assert total >= 1 and int(r["shards_in_cache_at_start"]) == (0 if cold else total), r
        assert (1 <= int(r["shards_downloaded"]) <= total) if cold else int(r["shards_downloaded"]) == 0, r
    assert (out_dir / "data.md").is_file()


def test_bad_arguments_are_refused_before_any_work(capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("mmtrain_bench_throughput", BENCH / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    with pytest.raises(SystemExit) as exc:
        throughput.parse_args(["--dtype", "bf16", "--zero-stage", "0", "--d-model", "30", "--heads", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype bf16 needs --zero-stage >= 1" in err
    assert "--d-model 30 is not divisible by --heads 4" in err


def test_learning_quick_reports_loss_unigram_entropy_and_crossing_step(bench_runs, demo_shards, monkeypatch):
    stdout, out_dir = bench_runs["learning"]
    header, rows = markdown_rows(stdout, "sweep")
    assert header == ["sweep", "model", "n_ctx", "params (M)", "tokens", "train FLOPs", "eval loss", "unigram H1",
                      "H1 - eval", "step < H1-0.3", "tokens/s"]
    assert [(r[1], r[2]) for r in rows] == [("mixer", "64"), ("transformer", "64")]
    monkeypatch.syspath_prepend(str(BENCH))
    import learning

    # H1 recomputed sample by sample from the dataset (no loader, no batching); concat packing: no pads
    import numpy as np

    from mmtrain.data.lm_dataset import LMDataset

    ds = LMDataset(demo_shards, 64, "val", batch_size=1)
    counts = np.bincount(np.concatenate([ds.get_item(i)["input_ids"].numpy()[1:] for i in range(ds.num_samples)]))
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    with open(out_dir / "learning-lr3.0e-3.csv", newline="") as fh:     # files named after the label
        records = list(csv.DictReader(fh))
    assert [r["model"] for r in records] == ["mixer", "transformer"]
    # each run's own log (a dotted label is no file suffix): the parameter counts differ
    assert all((Path(r["run_dir"]).parent / f"{Path(r['run_dir']).name}.log").is_file() for r in records)
    assert records[0]["params"] != records[1]["params"]
    for row, record in zip(rows, records):
        assert float(record["unigram_entropy"]) == pytest.approx(entropy, abs=1e-6)
        assert _number(row[7]) == pytest.approx(entropy, abs=1e-3)
        curve = json.loads(record["curve"])
        metrics = [json.loads(line) for line in open(Path(record["run_dir"]) / "metrics.jsonl")]
        evals = [[m["step"], m["eval_loss_ctx64"]] for m in metrics if "eval_loss_ctx64" in m]
        assert curve == evals and len(curve) >= 8 and curve[-1][0] == 40
        assert _number(row[6]) == pytest.approx(curve[-1][1], abs=1e-3)
        assert _number(row[8]) == pytest.approx(entropy - curve[-1][1], abs=2e-3)
        crossing = learning.first_step_below(curve, entropy - 0.3)
        assert row[9] == ("never" if crossing is None else str(crossing))
        assert int(record["params"]) > 0 and _number(row[10]) > 0
        assert float(record["train_flops"]) == pytest.approx(float(record["flops_per_token"]) * int(record["tokens"]))
        assert curve[-1][1] < curve[0][1]              # eval loss fell over the run
    assert (out_dir / "learning-lr3.0e-3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_first_step_below_and_argument_checks(capsys, monkeypatch, demo_shards):
    monkeypatch.syspath_prepend(str(BENCH))
    import learning

    curve = [[10, 6.5], [20, 6.2], [30, 5.9], [40, 6.0]]
    assert learning.first_step_below(curve, 6.0) == 30
    assert learning.first_step_below(curve, 5.0) is None
    with pytest.raises(SystemExit):
        learning.parse_args(["--n-ctx", "96", "--tokens-per-step", "2048"])
    assert "--tokens-per-step 2048 is not a multiple of n_ctx 96" in capsys.readouterr().err
    args = learning.parse_args(["--quick", "--set", "model.init=gpt"])
    overrides = learning.run_overrides("mixer", 64, args.spec, args, Path("/tmp/x"))
    assert "train.steps=200" in overrides and overrides[-2:] == ["train.lr=3e-3", "model.init=gpt"]
    # equal compute: each family's steps from its own flops_per_token(); an LR per family
    from mmtrain.models import build_model

    args = learning.parse_args(["--quick", "--shard-dir", str(demo_shards), "--flops", "2e10",
                                "--lr", "mixer=4e-3", "hybrid=2e-3"])
    for family, kind in (("mixer", "mixer"), ("transformer", "transformer"), ("hybrid", "hybrid")):
        model = build_model(dict(kind=kind, d_model=64, n_layers=2, n_ctx=64, n_heads=4), 4096)
        assert learning.flops_per_token(family, 64, args.spec, args) == model.flops_per_token()
        steps = learning.run_steps(family, 64, args.spec, args)
        assert steps == round(2e10 / (model.flops_per_token() * 512))
        overrides = learning.run_overrides(family, 64, args.spec, args, Path("/tmp/x"), steps)
        assert f"train.steps={steps}" in overrides
        assert [o for o in overrides if o.startswith("train.lr=")][-1] == \
            {"mixer": "train.lr=0.004", "hybrid": "train.lr=0.002", "transformer": "train.lr=3e-3"}[family]
    with pytest.raises(SystemExit):
        learning.parse_args(["--quick", "--lr", "gpt2=1e-3"])
    assert "--lr gpt2=1e-3: unknown family 'gpt2'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# benchmarks/device_check.sh: its commands (--dry-run), and that a failing or slow step is
# recorded while the script goes on (a stand-in interpreter; no GPU needed)
# --------------------------------------------------------------------------------------------

DEVICE_CHECK = BENCH / "device_check.sh"


def device_check(*args, env=None, timeout=60):
    full_env = script_env()
    full_env.update(env or {})
    return subprocess.run(["bash", str(DEVICE_CHECK), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def dry_run_steps(stdout: str):
    """[(title, limit_s, command)] of a --dry-run listing."""
    lines = stdout.splitlines()
    steps = []
    for i, line in enumerate(lines):
        match = re.fullmatch(r"\[(\d+)\] (.+) \(limit (\d+)s\)", line)
        if match:
            steps.append((match.group(2), int(match.group(3)), lines[i + 1].strip()))
    return steps


def test_device_check_dry_run_prints_every_command_with_a_time_limit():
    results = ROOT / "benchmarks" / "results" / "gpu-nvidia-h200.md"
    before = results.stat().st_mtime_ns if results.exists() else None
    proc = device_check("--dry-run", "--device-name", "NVIDIA H200")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    steps = dry_run_steps(out)
    commands = [command for _, _, command in steps]
    assert len(steps) == 11 and [int(n) for n in re.findall(r"^\[(\d+)\]", out, re.M)] == list(range(1, 12))
    # every command runs under `timeout`, and the limits fit in the budget, which fits in 8 minutes
    assert all(re.match(r"timeout -k \d+ \d+ ", c) for c in commands)
    budget = int(re.search(r"budget (\d+)s", out).group(1))
    assert sum(limit for _, limit, _ in steps) <= budget <= 8 * 60 - 10

    def one(pattern):
        found = [c for c in commands if re.search(pattern, c)]
        assert found, f"no command matches {pattern!r}:\n" + "\n".join(commands)
        return found

    assert one(r"nvidia-smi -L") == [commands[0]] and steps[0][0].startswith("device")
    assert "python '<inline script" in commands[0]    # torch / CUDA versions and the device's name
    assert one(r"python -m pytest -m gpu -q$")
    throughput = one(r"python benchmarks/throughput\.py ")
    assert len(throughput) == 2
    for command, d in zip(throughput, (512, 1024)):
        assert "--dtype bf16" in command and "--device cuda" in command and f"--d-model {d}" in command
        assert "--n-ctx 512 1024 2048 4096 8192" in command
        assert "--models mixer mixer-dense-param paper-mixer transformer hf-llama toeplitz" in command
    mixing = one(r"python benchmarks/mixing\.py ")
    assert [re.search(r"--d-model (\d+)", c).group(1) for c in mixing] == ["512", "1024"]
    assert all("--n-ctx 512 1024 2048 4096 8192" in c for c in mixing)
    toeplitz = one(r"python benchmarks/toeplitz\.py ")[0]
    assert "--device cuda --dtype bf16" in toeplitz and "--n-ctx 1024 2048 4096 8192 16384 32768" in toeplitz
    assert one(r"python benchmarks/zero_memory\.py .*--stages 1 2 3")
    prepare = one(r"-m mmtrain\.cli prepare --input demo ")[0]
    assert "--n-ctx 512" in prepare and "--tokenizer tokenizer/demo-bpe-4096.model" in prepare
    pretrain = one(r"mmtrain[./]pretrain")[0]
    for piece in ("--config configs/pretrain/mixer-d512-ctx512.yaml", "engine.precision=bf16", "train.steps=200",
                  "data.shard_dir=", "logging.run_dir="):
        assert piece in pretrain
    shards = re.search(r"--out (\S+)", prepare).group(1)
    assert f"data.shard_dir={shards}" in pretrain                  # the run reads the shards just prepared
    assert one(r"MFU")
    assert "results: benchmarks/results/gpu-nvidia-h200.md" in out
    # a dry run writes nothing
    assert (results.stat().st_mtime_ns if results.exists() else None) == before
    default = device_check("--dry-run")
    assert default.returncode == 0 and "benchmarks/results/gpu-<device>.md" in default.stdout


def test_device_check_records_a_failing_step_and_goes_on(tmp_path):
    out = tmp_path / "gpu-test.md"
    proc = device_check("--device-name", "Test GPU", "--out", str(out),
                        env={"PYTHON": "false", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    text = out.read_text()
    assert text.startswith("# Device check: Test GPU\n")
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (.+?) \| \d+ \|$", text, re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, 12))           # every step ran and was recorded
    assert all(status == "FAILED (exit 1)" for _, _, status in rows), rows
    assert text.count("status: **FAILED (exit 1)**") == 11


def test_device_check_stops_a_slow_step_at_its_limit_and_skips_what_the_budget_cannot_hold(tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\necho started\nsleep 60\n")
    slow.chmod(0o755)
    out = tmp_path / "gpu-test.md"
    proc = device_check("--device-name", "Test GPU", "--out", str(out), "--budget", "16",
                        env={"PYTHON": str(slow), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    text = out.read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (.+?) \| (\d+) \|$", text, re.M)
    assert len(rows) == 11
    first_status, first_seconds = rows[0][2], int(rows[0][3])
    assert re.fullmatch(r"TIMED OUT after \d+s", first_status) and first_seconds < 16
    assert all(status == "skipped (time budget spent)" for _, _, status, _ in rows[1:]), rows
    assert "started" in text                                            # the step's output is kept


def test_toeplitz_benchmark_prints_the_crossover_and_the_op_against_the_dense_op(tmp_path):
    def run(*args):
        proc = subprocess.run([sys.executable, str(BENCH / "toeplitz.py"), "--d-model", "16", "--repeats", "1",
                               "--threads", "1", "--out-dir", str(tmp_path), *args],
                              cwd=ROOT, env=script_env(), text=True, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    header, rows = markdown_rows(run("--crossover", "--n-ctx", "16", "64"), "L")
    assert header == ["L", "direct fwd+bwd ms", "FFT fwd+bwd ms", "direct / FFT", "faster"]
    assert [int(r[0]) for r in rows] == [16, 64]
    assert all(_number(r[1]) > 0 and _number(r[2]) > 0 and r[4] in ("direct", "fft") for r in rows)
    assert all((r[4] == "fft") == (_number(r[3].rstrip("x")) > 1) for r in rows)
    header, rows = markdown_rows(run("--n-ctx", "64", "128", "--max-gib", "8"), "n_ctx")
    assert header == ["n_ctx", "Toeplitz (auto) ms", "Toeplitz peak MiB", "packed dense op ms", "dense peak MiB",
                      "dense / Toeplitz"]
    assert [int(r[0]) for r in rows] == [64, 128]
    for row in rows:
        assert all(_number(cell) > 0 for cell in row[1:])
    with open(tmp_path / "toeplitz-op.csv", newline="") as fh:
        assert [int(r["n_ctx"]) for r in csv.DictReader(fh)] == [64, 128]
