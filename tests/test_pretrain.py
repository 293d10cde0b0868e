"""End-to-end pretraining through the real entry script, DeepSpeed engine and streaming shards."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import (TINY, TRAIN_STEPS, finish, pretrain_in_process, read_metrics, run_pretrain, start_pretrain,
                      train_losses)

STEPS = 6


def tiny_args(shards, run_dir, *extra):
    # 8-row panels: the packed mixing matrices (n_ctx 32) span 4 block rows, partitioned at ZeRO 1-3
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.eval_every=3", "checkpoint.every=3", "model.mixer_block_size=8", *extra]


@pytest.fixture(scope="module")
def zero_runs(demo_shards, tmp_path_factory):
    """The same tiny run (2 loader workers) under ZeRO 0-3: ZeRO 1 launched through `deepspeed`,
    the others in this process while it runs (a world of one trains the same either way)."""
    base = tmp_path_factory.mktemp("zero_runs")
    args = {stage: tiny_args(demo_shards, base / f"zero{stage}", f"engine.zero_stage={stage}", "data.num_workers=2")
            for stage in (0, 1, 2, 3)}
    launched = start_pretrain(args[1], launcher="deepspeed")
    runs = {}
    try:
        for stage in (0, 2, 3):
            pretrain_in_process(args[stage])
            runs[stage] = (base / f"zero{stage}", None)
    except BaseException:
        launched.kill()
        raise
    code, output = finish(launched)
    assert code == 0, f"{' '.join(launched.args)} exited {code}\n{output[-6000:]}"
    runs[1] = (base / "zero1", SimpleNamespace(stdout=output))
    return dict(sorted(runs.items()))


def tb_scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_deepspeed_launcher_run_writes_events_checkpoints_and_config(zero_runs):
    run_dir, proc = zero_runs[1]
    scalars = tb_scalars(run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "perf/tokens_per_s",
                "perf/mfu", "perf/step_time_s", "perf/peak_memory_gb", "eval/loss_ctx32", "eval/loss_ctx16"):
        assert tag in scalars, f"missing TensorBoard scalar {tag}; have {sorted(scalars)}"
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == list(range(1, STEPS + 1))
    assert [s for s, _ in scalars["eval/loss_ctx32"]] == [3, 6]
    # every logged number is the one in metrics.jsonl
    metrics = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(metrics[step]["loss"], rel=1e-6)
    tokens = [v for _, v in scalars["train/tokens_seen"]]
    assert tokens == [8 * 32 * s for s in range(1, STEPS + 1)]  # global batch 8 x n_ctx 32
    assert all(0 < v < 1 for _, v in scalars["perf/mfu"])
    lrs = [v for _, v in scalars["train/lr"]]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)  # warmup 2 steps to 3e-3

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (ckpts / "step_00000006" / "mp_rank_00_model_states.pt").is_file()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["n_ctx"] == 32 and resolved["engine"]["zero_stage"] == 1
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["train_batch_size"] == 8 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["zero_optimization"]["stage"] == 1
    final = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"run_dir"')][-1])
    assert final["step"] == STEPS and final["tokens_seen"] == 8 * 32 * STEPS


def test_zero_stages_give_the_same_losses(zero_runs):
    losses = {stage: train_losses(run_dir) for stage, (run_dir, _) in zero_runs.items()}
    assert len(losses[0]) == STEPS and all(math.isfinite(v) for v in losses[0].values())
    for stage in (1, 2, 3):
        for step in range(1, STEPS + 1):
            assert losses[stage][step] == pytest.approx(losses[0][step], rel=1e-6, abs=1e-6), (stage, step)


@pytest.mark.parametrize("stage", [0, 3])
def test_resume_continues_with_exactly_the_same_losses(zero_runs, demo_shards, tmp_path, stage):
    """Stopped at step 3 and resumed (both in this process): steps 4-6 equal the launched
    uninterrupted run's bit for bit."""
    full = train_losses(zero_runs[stage][0])
    run_dir = tmp_path / "resumed"
    args = tiny_args(demo_shards, run_dir, f"engine.zero_stage={stage}", "data.num_workers=2")
    assert pretrain_in_process(args + ["train.stop_at=3"]).step == 3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    trainer = pretrain_in_process(args)  # checkpoint.resume defaults to auto
    assert trainer.resumed_from == str(run_dir / "checkpoints" / "step_00000003")
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])   # ZeRO 0-3 on 2 ranks: also test_run_safety's resume-on-2-ranks chain
def test_two_processes_match_one_process(trained_runs, stage):
    """torchrun, 2 processes (micro 4 x 2 ranks, 2 loader workers each, packed panels partitioned)
    log the losses of one process (micro 4 x accumulation 2): the session's pair of trained runs."""
    one = trained_runs[f"mixer_heads_tied_zero{stage}"]
    two = trained_runs[f"mixer_heads_tied_zero{stage}_2proc"]
    reference, losses = train_losses(one), train_losses(two)
    assert sorted(losses) == sorted(reference) == list(range(1, TRAIN_STEPS + 1))
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
    assert json.loads((one / "deepspeed_config.json").read_text())["gradient_accumulation_steps"] == 2
    ds_config = json.loads((two / "deepspeed_config.json").read_text())
    assert ds_config["gradient_accumulation_steps"] == 1 and ds_config["zero_optimization"]["stage"] == stage


def test_bf16_trains_with_zero_1(demo_shards, tmp_path):
    run_dir = tmp_path / "bf16"
    run_pretrain(["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={run_dir}",
                  "engine.precision=bf16", "engine.zero_stage=1", "train.steps=12", "train.eval_every=0",
                  "checkpoint.every=0", "train.lr=1e-2"], launcher="module")
    losses = train_losses(run_dir)
    assert all(math.isfinite(v) for v in losses.values())
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3


@pytest.fixture()
def fails(monkeypatch, capsys):
    """Run the entry script's ``main`` in this process (as `python mmtrain/pretrain.py` would, a
    world of one) and check it exits with the configuration-error code 2 naming ``needles``.
    Cheaper than a subprocess; the environment is restored afterwards."""
    from mmtrain import pretrain
    from conftest import script_env

    def run(args, *needles):
        for key in set(os.environ) - set(script_env()):
            monkeypatch.delenv(key)
        capsys.readouterr()
        code = pretrain.main([str(a) for a in args])   # exits before training: the process group stays up
        err = capsys.readouterr().err
        assert code == 2, (code, err[-3000:])
        for needle in needles:
            assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"
        return err

    return run


def test_unknown_key_fails_before_work(tmp_path, fails):
    fails(["--config", TINY, "train.setps=3", f"logging.run_dir={tmp_path / 'r'}"],
          "unknown key 'train.setps'", "did you mean 'steps'")
    assert not (tmp_path / "r").exists()


def test_missing_shards_name_the_prepare_command(tmp_path, fails):
    fails(["--config", TINY, f"data.shard_dir={tmp_path / 'nothing'}", "data.auto_prepare=false",
           f"logging.run_dir={tmp_path / 'r'}"], "mmtrain prepare", "--n-ctx 32")
    assert not (tmp_path / "r").exists()


def test_shards_for_another_n_ctx_are_rejected(demo_shards, tmp_path, fails):
    import shutil

    fake = tmp_path / "shards"
    shutil.copytree(demo_shards / "ctx32", fake / "ctx48")
    shutil.copy(demo_shards / "tokenizer.model", fake / "tokenizer.model")
    fails(["--config", TINY, f"data.shard_dir={fake}", "model.n_ctx=48", "data.auto_prepare=false",
           f"logging.run_dir={tmp_path / 'r'}"], "n_ctx=32", "expected n_ctx=48")


def test_global_batch_must_split_over_micro_batch_and_world(demo_shards, tmp_path, fails):
    fails(["--config", TINY, f"data.shard_dir={demo_shards}", "train.global_batch_size=12",
           "train.micro_batch_size=8", f"logging.run_dir={tmp_path / 'r'}"],
          "global_batch_size 12 is not divisible by train.micro_batch_size 8")


@pytest.mark.slow
def test_quick_start_default_run_prepares_demo_data_and_trains(tmp_path):
    """The README's `python mmtrain/pretrain.py`, shortened to 10 steps, in an empty directory."""
    proc = run_pretrain([f"data.shard_dir={tmp_path / 'data'}", f"logging.runs_root={tmp_path / 'runs'}",
                         "train.steps=10", "train.eval_every=0", "logging.log_every=5"], timeout=600)
    assert "preparing demo shards for n_ctx=128" in proc.stdout
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("mixer-ctx128-")
    losses = train_losses(run_dirs[0])
    assert len(losses) == 10
    assert losses[10] < losses[1] - 0.5, losses  # visibly falling
    assert (tmp_path / "data" / "ctx128" / "meta.json").is_file()


def test_loss_normalisation_does_not_depend_on_the_micro_batch_split_with_pad_packing(tmp_path):
    """With `pad` packing micro-batches hold different numbers of target tokens. The gradient and
    the logged loss are both the global token mean, so one micro-batch of 8 and four of 2 (gradient
    accumulation) train identically up to fp32 rounding. A mean of per-micro-batch means would not."""
    from mmtrain.data.prepare import demo_prepare_config, prepare

    shards = tmp_path / "pad"
    prepare(demo_prepare_config(str(shards), [32], max_docs=300, packing="pad"), progress=False)
    runs = {}
    for micro in (8, 2):
        pretrain_in_process(["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={tmp_path / f'm{micro}'}",
                             "train.steps=3", "train.eval_every=0", "checkpoint.every=0", "train.global_batch_size=8",
                             f"train.micro_batch_size={micro}", "engine.peak_flops=1e11"])
        runs[micro] = train_losses(tmp_path / f"m{micro}")
    assert sorted(runs[8]) == sorted(runs[2]) == [1, 2, 3]
    for step in (1, 2, 3):   # steps 2 and 3 follow from the first updates: the gradients agree too
        assert runs[2][step] == pytest.approx(runs[8][step], rel=1e-5, abs=0), step


def test_zero3_builds_the_model_partitioned_and_gathers_only_through_module_hooks(demo_shards, tmp_path):
    """At ZeRO 3 the model is built under deepspeed.zero.Init (partitioned as it is constructed), is
    initialised exactly as a whole model is, and no parameter is fetched outside its module's call
    (DeepSpeed's fallback registers such a parameter as an "external parameter" of the caller)."""
    import deepspeed
    import torch

    from conftest import train_in_process
    from mmtrain.models import build_model
    from mmtrain.train.lm import LMTask
    from mmtrain.train.schema import PretrainConfig
    from mmtrain.train.trainer import seed_everything

    class RecordingLMTask(LMTask):
        def build_model(self):
            model = super().build_model()
            self.built = {n: (hasattr(p, "ds_id"), p.data.numel()) for n, p in model.named_parameters()}
            self.initial = {}
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    self.initial[name] = p.detach().clone()
            return model

    run_dir = tmp_path / "run"
    trainer = train_in_process(PretrainConfig, RecordingLMTask, [TINY], [
        f"data.shard_dir={demo_shards}", f"logging.run_dir={run_dir}", "engine.zero_stage=3", "train.steps=2",
        "train.eval_every=0", "checkpoint.every=0", "model.mixer_heads=2"])
    built = trainer.task.built
    assert built and all(is_ds and local == 0 for is_ds, local in built.values()), built
    external = {name: len(m._external_params) for name, m in trainer.engine.module.named_modules()
                if getattr(m, "_external_params", None)}
    assert external == {}, f"parameters fetched outside their module's __call__: {external}"
    seed_everything(trainer.cfg.train.seed)
    whole = dict(build_model(trainer.cfg.model, trainer.task.vocab_size).named_parameters())
    assert sorted(whole) == sorted(trainer.task.initial)
    for name, tensor in trainer.task.initial.items():
        assert torch.equal(tensor, whole[name].detach()), name
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
