"""Refuse before loading: a resume whose model shapes, precision, vocabulary or shards differ from
its checkpoint's is an exit-2 error listing each change before any weights load; a disk that fills
up during a checkpoint write is an exit-2 error with the previous checkpoint intact; files planted
as symbolic links in a run directory are never followed. Real Trainer runs in this process."""

import hashlib
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import TINY, pretrain_in_process
from mmtrain.train import checkpoint as ckpt
from mmtrain.train import faults
from mmtrain.train.lm import LMTask
from mmtrain.train.schema import PretrainConfig
from mmtrain.train.trainer import run_entry


def args(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}", "train.steps=4",
            "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=0", "engine.peak_flops=1e11",
            "data.num_workers=0", *extra]


@pytest.fixture(scope="module")
def base(demo_shards, tmp_path_factory):
    """(shards, run_dir): a copy of the demo shards, and a run of 2 steps on them with a checkpoint at
    step 2 (stopped at train.stop_at; resuming it trains steps 3-4). Tests resume copies of both."""
    root = tmp_path_factory.mktemp("resume_refusals")
    shards = root / "shards"
    shutil.copytree(demo_shards, shards)
    pretrain_in_process(args(shards, root / "run", "train.stop_at=2"))
    return shards, root / "run"


@pytest.fixture()
def run_copy(base, tmp_path):
    """A copy of the base run to resume (the base shards stay where the run trained on them)."""
    shards, run_dir = base
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    return shards, tmp_path / "run"


def digests(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def launch(argv, capsys, task_cls=LMTask):
    """`mmtrain pretrain` in this process (run_entry: the real exit-code mapping); (code, stderr).
    The test process keeps its signal handlers and thread count."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    capsys.readouterr()
    try:
        code = run_entry([str(a) for a in argv], PretrainConfig, task_cls)
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    captured = capsys.readouterr()
    return code, captured.err, captured.out


# ---- refuse before loading ----------------------------------------------------------------------


@pytest.mark.parametrize("changes, lines", [
    (["model.n_ctx=64"], ["model.n_ctx: 32 -> 64"]),
    (["model.d_model=64"], ["model.d_model: 32 -> 64"]),
    (["model.n_layers=3", "model.d_model=48", "checkpoint.allow_changes=[model]"],   # allow_changes cannot help
     ["model.n_layers: 2 -> 3", "model.d_model: 32 -> 48"]),
], ids=["n_ctx", "d_model", "n_layers_and_d_model_allowed"])
def test_a_resume_with_other_model_shapes_is_refused_before_loading(run_copy, capsys, changes, lines):
    shards, run_dir = run_copy
    before = digests(run_dir / "checkpoints")
    code, err, _ = launch(args(shards, run_dir, *changes), capsys)
    assert code == 2, err
    assert "Traceback" not in err and "size mismatch" not in err
    for line in lines:
        assert f"with a model of other shapes: {line}" in err, err
    assert "or train into a new logging.run_dir" in err
    assert digests(run_dir / "checkpoints") == before


def test_a_resume_at_another_precision_is_refused_unless_allowed_and_then_converted(run_copy, capsys):
    """fp32 -> bf16 at ZeRO 1: refused with the fix; allowed, the checkpoint is converted to a
    universal checkpoint and resumes with its optimizer state (steps 3-4 train, finite losses)."""
    shards, run_dir = run_copy
    code, err, _ = launch(args(shards, run_dir, "engine.precision=bf16"), capsys)
    assert code == 2, err
    assert "at another precision: engine.precision: 'fp32' -> 'bf16'" in err
    assert "allow it with checkpoint.allow_changes=[engine.precision]" in err
    assert "or resume with engine.precision=fp32" in err and "FileNotFoundError" not in err
    trainer = pretrain_in_process(args(shards, run_dir, "engine.precision=bf16",
                                       "checkpoint.allow_changes=[engine.precision]"))
    assert trainer.step == 4 and trainer.resumed_from == str(run_dir / "checkpoints" / "universal" / "step_00000002")
    assert "trained in fp32; this run trains in bf16: converting it" in capsys.readouterr().out
    state = next(iter(trainer.engine.optimizer.optimizer.state.values()))
    assert int(state["step"]) == 4   # Adam's step count went on from the checkpoint's 2


def test_a_resume_on_shards_of_another_vocabulary_is_refused(run_copy, tmp_path, capsys):
    from mmtrain.data.prepare import demo_prepare_config, prepare

    _, run_dir = run_copy
    other = tmp_path / "vocab512"
    prepare(demo_prepare_config(str(other), [32], tokenizer="", max_docs=300,
                                **{"tokenizer_spec.vocab_size": 512}), progress=False)
    code, err, _ = launch(args(other, run_dir), capsys)
    assert code == 2, err
    assert "with another vocabulary: shards.vocab_size: 4096 -> 512" in err
    assert "with another vocabulary: shards.tokenizer_sha256: " in err and "Traceback" not in err


def test_a_resume_on_shards_prepared_again_with_another_recipe_is_refused(base, run_copy, tmp_path, capsys):
    from mmtrain.data.prepare import demo_prepare_config, prepare

    shards, run_dir = tmp_path / "shards", run_copy[1]
    shutil.copytree(base[0], shards)   # the run's shards, moved (allowed), then prepared again in place
    prepare(demo_prepare_config(str(shards), [32], max_docs=300, overwrite=True), progress=False)
    code, err, _ = launch(args(shards, run_dir), capsys)
    assert code == 2, err
    assert "on other data: shards.digest: '" in err
    assert "on other data: shards.prepare.max_docs: 600 -> 300" in err
    assert "checkpoint.allow_changes=[shards]" in err


def test_a_checkpoint_without_a_data_fingerprint_resumes_with_a_warning(run_copy, capsys):
    shards, run_dir = run_copy
    step2 = run_dir / "checkpoints" / "step_00000002"
    (step2 / ckpt.RESUME_INFO).unlink()   # as an earlier mmtrain wrote it: not in its manifest either

    def drop(value):
        if isinstance(value, list):
            return [drop(v) for v in value if v != ckpt.RESUME_INFO]
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if k != ckpt.RESUME_INFO}
        return value

    manifest = step2 / ckpt.MANIFEST
    manifest.write_text(json.dumps(drop(json.loads(manifest.read_text()))))
    trainer = pretrain_in_process(args(shards, run_dir))
    assert trainer.step == 4 and trainer.resumed_from == str(step2)
    assert "records no fingerprint of the data it trained on" in capsys.readouterr().out


# ---- a full disk during a checkpoint write ------------------------------------------------------


@pytest.mark.parametrize("how", ["deepspeed_writer", "enospc_oserror"])
def test_a_full_disk_during_a_checkpoint_write_is_exit_2_and_keeps_the_previous_checkpoint(
        run_copy, capsys, monkeypatch, how):
    """The disk fills up during the write of step 4: torch's C++ writer, under DeepSpeed's save,
    leaves a cut-short file and raises what it raises on a full disk (a RuntimeError naming no
    errno: ``basic_ios::clear``), and the file system then reports 4 KiB free; or our own write
    raises OSError(ENOSPC) (the MMTRAIN_FAULT hook)."""
    shards, run_dir = run_copy
    root = run_dir / "checkpoints"
    before = digests(root)
    monkeypatch.setenv(faults.FAULT_ENV, "enospc_in_checkpoint:4" if how == "enospc_oserror" else "")
    if how == "deepspeed_writer":
        save = torch.save

        def full_disk_save(obj, f, *a, **kw):
            if "step_00000004" not in str(f):
                return save(obj, f, *a, **kw)
            os.environ[faults.FAULT_ENV] = "disk_free:4096"
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04" + bytes(4092))
            raise RuntimeError("basic_ios::clear: iostream error")

        monkeypatch.setattr(torch, "save", full_disk_save)
    code, err, _ = launch(args(shards, run_dir), capsys)
    assert code == 2, err
    assert f"{root / 'step_00000004'}: no space left on device while writing the checkpoint of step 4" in err
    assert "one checkpoint of this run needs about" in err
    assert f"the previous checkpoint {root / 'step_00000002'} and `latest` are unchanged" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert (root / "latest").read_text() == "step_00000002"
    assert ckpt.list_tags(str(root)) == ["step_00000002"]
    assert not [p for p in root.iterdir() if p.name.startswith("step_00000004")]   # the partial write removed
    assert digests(root) == before


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"),
                                              (1, "bf16"), (2, "bf16"), (3, "bf16")])
def test_the_disk_precheck_estimates_a_real_checkpoint_within_10_percent(demo_shards, tmp_path, stage, precision):
    trainer = pretrain_in_process(args(demo_shards, tmp_path / "run", "train.steps=1", "checkpoint.every=1",
                                       f"engine.zero_stage={stage}", f"engine.precision={precision}"))
    real = sum(p.stat().st_size for p in (tmp_path / "run" / "checkpoints" / "step_00000001").iterdir())
    assert trainer.checkpoint_size() == pytest.approx(real, rel=0.10), (stage, precision, real)


# ---- run-directory files are never followed -------------------------------------------------------


@pytest.mark.parametrize("name", ["mmtrain.lock", "deepspeed_config.json", "config.yaml", "metrics.jsonl",
                                  "metrics.jsonl.tmp", "config.yaml.tmp"])
def test_a_symlink_planted_in_a_run_directory_is_refused_and_its_target_untouched(run_copy, tmp_path, capsys, name):
    shards, run_dir = run_copy
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data that is not mmtrain's\n")
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(victim)
    before = digests(run_dir / "checkpoints")
    code, err, _ = launch(args(shards, run_dir), capsys)
    assert code == 2, err
    assert f"{run_dir / name} is a symbolic link; mmtrain writes this file itself and does not write through links" in err
    assert victim.read_text() == "precious data that is not mmtrain's\n"
    assert digests(run_dir / "checkpoints") == before


def test_a_hard_linked_copy_of_a_run_directory_resumes_and_the_copy_never_changes(run_copy, tmp_path):
    # `cp -al RUN SNAPSHOT` (or rsync --link-dest): every file of the run shares its inode with the
    # snapshot's. Resuming RUN must leave SNAPSHOT as it was (and a planted hard link's target too).
    shards, run_dir = run_copy
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data that is not mmtrain's\n")
    (run_dir / "config.yaml.tmp").hardlink_to(victim)
    snapshot = tmp_path / "snapshot"
    assert subprocess.run(["cp", "-al", str(run_dir), str(snapshot)]).returncode == 0
    before = digests(snapshot)
    trainer = pretrain_in_process(args(shards, run_dir, "train.steps=4"))
    assert trainer.step == 4 and trainer.resumed_from == str(run_dir / "checkpoints" / "step_00000002")
    assert digests(snapshot) == before
    assert victim.read_text() == "precious data that is not mmtrain's\n"
    for name in ("mmtrain.lock", "metrics.jsonl", "config.yaml"):
        assert os.stat(run_dir / name).st_nlink == 1, name
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()


def test_run_files_are_opened_without_following_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    for mode in ("r", "w", "a", "wb"):
        with pytest.raises(faults.RunFileLink, match="is a symbolic link"):
            faults.open_run_file(str(link), mode)
    (tmp_path / faults.LOCK_FILE).symlink_to(victim)
    with pytest.raises(faults.RunFileLink):
        faults.RunDirLock(str(tmp_path)).acquire()
    hard = tmp_path / "hard"
    for mode, written in (("w", "new"), ("a", "keepnew"), ("wb", "new")):
        hard.unlink(missing_ok=True)
        hard.hardlink_to(victim)
        with faults.open_run_file(str(hard), mode) as fh:   # written into a copy of its own
            fh.write(b"new" if "b" in mode else "new")
        assert hard.read_text() == written and os.stat(hard).st_nlink == 1
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_latest_that_links_to_another_file_is_refused_without_echoing_it(run_copy, tmp_path, capsys, kind):
    shards, run_dir = run_copy
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN-0123456789 do not print me")
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink()
    (latest.symlink_to if kind == "symlink" else latest.hardlink_to)(secret)
    code, err, _ = launch(args(shards, run_dir), capsys)
    assert code == 2, err
    assert "SECRET" not in err
    assert (f"{latest} is a symbolic link" if kind == "symlink" else
            f"{latest} names no checkpoint tag (39 characters)") in err
    assert secret.read_text() == "SECRET-TOKEN-0123456789 do not print me"
    # the same checkpoints named by checkpoint.resume from another run directory
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_resume(str(run_dir), str(tmp_path / "new_run"))
    assert "SECRET" not in str(info.value) and "Complete checkpoints there: step_00000002" in str(info.value)


def test_per_step_seeds_past_two_to_the_32_still_seed_every_generator():
    # A resume on another number of ranks re-seeds with seed + 1_000_003 * step + 7919 * rank,
    # which passes numpy's 2**32 limit after about step 4,295.
    import numpy as np

    from mmtrain.train.trainer import seed_everything

    seed_everything(2**32 * 3 + 5)
    after_wrap = np.random.rand(), torch.rand(1).item()
    seed_everything(5)
    assert (np.random.rand(), torch.rand(1).item()) == after_wrap
