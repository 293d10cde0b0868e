"""Fault tolerance of pretraining, through the real entry script on tiny CPU runs.

Runs are interrupted on purpose with real signals: ``MMTRAIN_FAULT`` (mmtrain/train/faults.py) makes a
process SIGKILL or signal itself at an exact step or inside a checkpoint write, and one test
signals a running job from outside as a scheduler would. What must hold: a stop signal gives a
checkpoint and exit code 75 on every rank at the same step; a relaunch after ``kill -9`` ends
with exactly the weights of an uninterrupted run; ``latest`` never names an incomplete
checkpoint and old ones survive until a newer one is complete; a locked, unwritable or full run
directory fails before training.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import (TINY, checkpoint_module, finish, read_metrics, start_pretrain, train_losses,
                      wait_for_step)
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.faults import EXIT_PREEMPTED

STEPS = 8


def tiny_args(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}",
            f"train.steps={STEPS}", "checkpoint.every=2", "train.eval_every=0",
            "engine.peak_flops=1e11", *extra]


def ckpt_listing(run_dir) -> set:
    """The checkpoint tags (step_XXXXXXXX directories) in a run directory."""
    return set(ckpt.list_tags(str(run_dir / "checkpoints")))


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def assert_same_weights(run_dir, reference_dir):
    ours, ref = checkpoint_module(run_dir), checkpoint_module(reference_dir)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), f"{name} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def killed_runs(demo_shards, tmp_path_factory):
    """Tiny runs (8 steps, a checkpoint every 2), two at a time:

    1. ``mid_step`` is SIGKILLed right after step 5; ``in_write`` (keep_last=1) is SIGKILLed
       inside the write of checkpoint 4: after the engine files, before the RNG files and ``latest``.
    2. ``reference`` runs uninterrupted; ``in_write`` is relaunched (resume: auto) and SIGKILLed
       after checkpoint 6 is complete on disk but before ``latest`` moves to it.
    3. Both killed runs are relaunched unchanged and finish.
    """
    base = tmp_path_factory.mktemp("killed_runs")
    runs = {name: base / name for name in ("reference", "mid_step", "in_write")}
    args = {name: tiny_args(demo_shards, run_dir) for name, run_dir in runs.items()}
    args["in_write"].append("checkpoint.keep_last=1")
    seen = {}

    def phase(number: int, faults: dict) -> None:
        procs = {name: start_pretrain(args[name], env={"MMTRAIN_FAULT": fault} if fault else None)
                 for name, fault in faults.items()}
        for name, proc in procs.items():
            seen[number, name] = finish(proc)
            ckpt_dir = runs[name] / "checkpoints"
            seen[number, name, "checkpoints"] = (ckpt_listing(runs[name]), latest(runs[name]),
                                                 {p.name for p in ckpt_dir.iterdir()})

    phase(1, {"mid_step": "kill_at_step:5", "in_write": "after_model_states:4"})
    phase(2, {"reference": None, "in_write": "before_latest:6"})
    phase(3, {"mid_step": None, "in_write": None})
    return runs, seen


def test_kill_9_mid_run_then_relaunch_ends_with_the_uninterrupted_weights(killed_runs):
    runs, seen = killed_runs
    assert seen[2, "reference"][0] == 0, seen[2, "reference"][1][-3000:]
    rc, output = seen[1, "mid_step"]
    assert rc == -signal.SIGKILL, output[-3000:]
    tags, pointer, _ = seen[1, "mid_step", "checkpoints"]
    assert pointer == "step_00000004" and tags == {"step_00000002", "step_00000004"}

    rc, output = seen[3, "mid_step"]
    assert rc == 0, output[-3000:]
    assert "resumed from" in output and "step_00000004 at step 4" in output
    assert latest(runs["mid_step"]) == "step_00000008"
    assert_same_weights(runs["mid_step"], runs["reference"])  # fp32, bit for bit
    assert train_losses(runs["mid_step"]) == train_losses(runs["reference"])


def test_kill_inside_a_checkpoint_write_never_publishes_it_nor_deletes_the_previous_one(killed_runs):
    runs, seen = killed_runs
    run_dir = runs["in_write"]
    # Killed while writing checkpoint 4: `latest` stays on 2, and 2 is kept although keep_last=1.
    rc, output = seen[1, "in_write"]
    assert rc == -signal.SIGKILL, output[-3000:]
    tags, pointer, entries = seen[1, "in_write", "checkpoints"]
    assert pointer == "step_00000002" and tags == {"step_00000002"}
    assert "step_00000004.incomplete" in entries  # the unfinished write, under a name no reader takes

    # Relaunch: removes the leftover, resumes from 2; killed after 6 is complete, before `latest`.
    rc, output = seen[2, "in_write"]
    assert rc == -signal.SIGKILL, output[-3000:]
    assert "step_00000004.incomplete (left by an interrupted checkpoint write)" in output
    assert "step_00000002 at step 2" in output
    tags, pointer, _ = seen[2, "in_write", "checkpoints"]
    assert pointer == "step_00000004" and tags == {"step_00000004", "step_00000006"}

    # Relaunch: resumes from 4 (what `latest` says), writes 6 again, finishes; keep_last=1 applies.
    rc, output = seen[3, "in_write"]
    assert rc == 0, output[-3000:]
    assert "step_00000004 at step 4" in output
    tags, pointer, entries = seen[3, "in_write", "checkpoints"]
    assert pointer == "step_00000008" and tags == {"step_00000008"}
    assert not [e for e in entries if "incomplete" in e or "replaced" in e]
    # Steps redone after each relaunch appear once in TensorBoard and in metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert sorted(train_losses(run_dir)) == list(range(1, 9))
    assert_same_weights(run_dir, runs["reference"])


def test_sigterm_checkpoints_at_the_next_step_and_exits_75_and_a_second_job_cannot_take_the_run_dir(
        demo_shards, tmp_path):
    """A job signalled from outside, as a scheduler does; meanwhile a second job on its run dir."""
    run_dir = tmp_path / "run"
    args = tiny_args(demo_shards, run_dir, "train.steps=100000", "checkpoint.every=0", "logging.log_every=1000")
    first = start_pretrain(args)
    try:
        wait_for_step(run_dir, 1, first)
        holder = (run_dir / "mmtrain.lock").read_text()
        assert f"pid {first.pid} on host " in holder

        rc, output = finish(start_pretrain(args), timeout=180)  # the same run dir, while the first trains
        assert rc == 2, output[-3000:]
        assert f"is in use by another mmtrain job (pid {first.pid} on host" in output
        assert "logging.run_dir" in output and "Traceback" not in output
        assert first.poll() is None, "the second job must not disturb the first"

        first.send_signal(signal.SIGTERM)
        rc, output = finish(first, timeout=120)
    finally:
        first.kill()
    assert rc == EXIT_PREEMPTED == 75, output[-3000:]
    last_step = max(train_losses(run_dir))
    tag = f"step_{last_step:08d}"
    assert f"SIGTERM: stopped at step {last_step} with checkpoint" in output
    assert latest(run_dir) == tag and ckpt_listing(run_dir) == {tag}  # saved at the step it stopped
    final = json.loads([ln for ln in output.splitlines() if ln.startswith('{"run_dir"')][-1])
    assert final["stopped_by"] == "SIGTERM" and final["step"] == last_step


@pytest.mark.slow
def test_a_signal_reaching_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(
        killed_runs, demo_shards, tmp_path):
    """torchrun, 2 processes: only rank 1 gets SIGUSR1 (after step 3). The ranks agree on it at the
    step boundary, write checkpoint 3 together and both exit 75."""
    runs, _ = killed_runs
    run_dir = tmp_path / "ws2"
    rc, output = finish(start_pretrain(tiny_args(demo_shards, run_dir, "engine.zero_stage=2"), launcher="torchrun",
                                       nproc=2, env={"MMTRAIN_FAULT": "sigusr1_at_step:3@1"}))
    assert rc == 1, output[-3000:]  # torchrun reports any non-zero worker exit as its own failure
    summary = output[output.rfind("Failures:"):]
    assert summary.count(f"exitcode  : {EXIT_PREEMPTED} ") == 2, summary  # both ranks, neither killed
    assert "SIGUSR1: stopped at step 3 with checkpoint" in output
    assert latest(run_dir) == "step_00000003" and ckpt_listing(run_dir) == {"step_00000002", "step_00000003"}
    step3 = {p.name for p in (run_dir / "checkpoints" / "step_00000003").iterdir()}
    assert {"rng_rank000.pt", "rng_rank001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= step3
    losses, reference = train_losses(run_dir), train_losses(runs["reference"])
    assert sorted(losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6), step


def test_full_disk_and_unwritable_run_dir_fail_before_training(demo_shards, tmp_path):
    full = tmp_path / "full"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    procs = {
        "full": start_pretrain(tiny_args(demo_shards, full), env={"MMTRAIN_FAULT": "disk_free:100000"}),
        "unwritable": start_pretrain(tiny_args(demo_shards, blocker / "run")),
    }
    results = {name: finish(proc, timeout=180) for name, proc in procs.items()}
    rc, output = results["full"]
    assert rc == 2, output[-3000:]
    assert "logging.run_dir" in output and "has 97.7 KiB free, but one checkpoint of this model needs about" in output
    assert not (full / "metrics.jsonl").exists() and not (full / "checkpoints").exists()
    rc, output = results["unwritable"]
    assert rc == 2, output[-3000:]
    assert f"logging.run_dir: cannot write to {blocker / 'run'}" in output and "Traceback" not in output


def test_free_space_estimate_and_messages(tmp_path, monkeypatch):
    from mmtrain.train import faults

    # measured bytes per parameter (tests/test_resume_refusals.py checks them against real checkpoints)
    assert faults.checkpoint_bytes(1_000_000, "fp32", zero_stage=0) == 12_048_000
    assert faults.checkpoint_bytes(1_000_000, "fp32", zero_stage=1) == 16_034_000
    assert faults.checkpoint_bytes(1_000_000, "bf16", zero_stage=2, world_size=2) == 14_068_000
    monkeypatch.setenv("MMTRAIN_FAULT", "disk_free:25000000")
    error, warning = faults.check_free_space(str(tmp_path), 12_000_000, keep_last=3)
    assert error is None and "keeping checkpoint.keep_last=3" in warning
    error, warning = faults.check_free_space(str(tmp_path), 30_000_000, keep_last=3)
    assert "23.8 MiB free" in error and "28.6 MiB" in error and warning is None
    monkeypatch.delenv("MMTRAIN_FAULT")
    assert faults.check_free_space(str(tmp_path), 1000, keep_last=3) == (None, None)


def test_stop_request_remembers_the_first_signal_and_restores_handlers():
    from mmtrain.train.faults import StopRequest

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest().install()
    try:
        assert stop.agreed(torch.device("cpu")) is None
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)  # a second signal changes nothing and kills nothing
        assert stop.requested and stop.agreed(torch.device("cpu")) == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_rng_files_load_with_weights_only(killed_runs):
    runs, _ = killed_runs
    rng_file = runs["reference"] / "checkpoints" / "step_00000008" / "rng_rank000.pt"
    state = torch.load(rng_file, weights_only=True)  # no pickled code: plain tensors and tuples
    assert set(state) >= {"python", "numpy", "torch"}
    assert read_metrics(runs["reference"])  # the reference really trained


def test_resume_truncation_of_metrics_drops_a_line_cut_short_by_a_kill(tmp_path):
    from mmtrain.train.monitor import truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    truncate_metrics(str(tmp_path), 4)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
