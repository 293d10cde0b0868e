"""Checkpoint integrity: every file's size and sha256 in the manifest, verified before resume and
export use anything; damaged, truncated or empty files and a damaged manifest are exit-2 errors
naming the file; checkpoints written before digests still load (with a warning); ``.pt`` files
load with ``weights_only=True`` and an allowlist, so a planted pickle never runs."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, pretrain_in_process
from mmtrain.cli import main as cli_main
from mmtrain.pretrain import main as pretrain_main
from mmtrain.train import checkpoint as ckpt
from mmtrain import checkpoint_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 4          # the runs stop here (train.stop_at) of a 6-step schedule; a resume trains steps 5 and 6
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rng_rank000.pt"


def run_args(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}", "train.steps=6",
            "checkpoint.every=2", "train.eval_every=0", "engine.peak_flops=1e11", "data.num_workers=0",
            "logging.log_every=100", *extra]


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory) -> dict:
    """{zero stage: run_dir} of two tiny runs stopped at step 4 (checkpoints at steps 2 and 4)."""
    base = tmp_path_factory.mktemp("integrity_runs")
    out = {}
    for stage in (0, 1):
        out[stage] = base / f"zero{stage}"
        pretrain_in_process(run_args(demo_shards, out[stage], f"engine.zero_stage={stage}", f"train.stop_at={STEPS}"))
    return out


@pytest.fixture()
def copy_run(runs, tmp_path):
    def copy(stage: int) -> Path:
        run = tmp_path / f"run{stage}"
        shutil.copytree(runs[stage], run)
        return run
    return copy


def step_dir(run: Path, step: int = STEPS) -> Path:
    return run / "checkpoints" / ckpt.tag_for(step)


def flip_bit(path: Path, mask: int = 0x80) -> None:
    """Flip a bit of the high byte of the first value of the largest tensor stored in a torch.save
    file (0x80: its sign; 0x40: the top bit of its exponent)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + 3    # high byte of a little-endian fp32
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ mask]))


def resume(shards, run: Path, capsys, *extra) -> tuple:
    """`mmtrain pretrain` resuming ``run`` to step 6 in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = pretrain_main([str(a) for a in run_args(shards, run, *extra)])
    return rc, capsys.readouterr().err


def export_rc(run: Path, out: Path, capsys) -> tuple:
    capsys.readouterr()
    rc = cli_main(["export", str(run), "--out", str(out), "--quiet"])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------


def test_manifest_records_size_and_sha256_of_every_file(runs):
    directory = step_dir(runs[1])
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    assert sorted(manifest["digests"]) == manifest["files"] == sorted(p.name for p in directory.iterdir()
                                                                       if p.name != ckpt.MANIFEST)
    assert {MODEL_STATES, OPTIM_STATES, RNG, "resolved_config.yaml"} <= set(manifest["files"])
    for name, digest in manifest["digests"].items():
        data = (directory / name).read_bytes()
        assert digest == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("stage,name,bit", [(0, MODEL_STATES, "sign"), (1, MODEL_STATES, "sign"),
                                            (1, OPTIM_STATES, "sign"), (0, MODEL_STATES, "exponent"),
                                            (1, OPTIM_STATES, "exponent")])
def test_a_flipped_bit_is_refused_on_resume_and_on_export_naming_the_file(stage, name, bit, copy_run, demo_shards,
                                                                         tmp_path, capsys):
    run = copy_run(stage)
    damaged = step_dir(run) / name
    flip_bit(damaged, 0x80 if bit == "sign" else 0x40)
    rc, err = resume(demo_shards, run, capsys, f"engine.zero_stage={stage}")
    assert rc == 2, err
    assert f"{damaged} has sha256" in err and "records" in err
    assert "Other checkpoints in" in err and f"checkpoint.resume={step_dir(run, 2)}" in err
    assert not (run / "checkpoints" / ckpt.tag_for(6)).exists()    # nothing trained
    rc, err = export_rc(run, tmp_path / "bundle", capsys)
    assert rc == 2, err
    assert f"{damaged} has sha256" in err and "--tag step_00000002" in err
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("name,how", [(MODEL_STATES, "truncated"), (OPTIM_STATES, "truncated"),
                                      (RNG, "truncated"), (MODEL_STATES, "empty"), (OPTIM_STATES, "empty"),
                                      (RNG, "empty"), (ckpt.MANIFEST, "truncated"), (ckpt.MANIFEST, "incomplete")])
def test_truncated_or_empty_files_and_a_damaged_manifest_exit_2_naming_the_file(name, how, copy_run, demo_shards,
                                                                                tmp_path, capsys):
    run = copy_run(1)
    path = step_dir(run) / name
    data = path.read_bytes()
    if how == "incomplete":   # valid JSON without the file list
        path.write_text(json.dumps({k: v for k, v in json.loads(data).items() if k != "files"}))
    else:
        path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    rc, err = resume(demo_shards, run, capsys)
    assert rc == 2, err
    assert str(path) in err and "Traceback" not in err
    expected = {"truncated": f"records {len(data):,} (truncated)", "empty": "has 0 bytes"}
    if name != ckpt.MANIFEST:
        assert expected[how] in err
    assert f"checkpoint.resume={step_dir(run, 2)}" in err
    rc, err = export_rc(run, tmp_path / "bundle", capsys)
    assert rc == 2 and str(path) in err and "--tag step_00000002" in err, err


@pytest.mark.parametrize("old_style", ["no digests", "no manifest"])
def test_checkpoints_written_before_digests_still_resume_with_a_warning(old_style, copy_run, demo_shards, capfd):
    run = copy_run(1)
    manifest = step_dir(run) / ckpt.MANIFEST
    if old_style == "no manifest":
        manifest.unlink()
    else:
        record = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "digests"}
        manifest.write_text(json.dumps(record))
        # a checkpoint that has the resume_info.json written beside digests cannot be that old
        with pytest.raises(ckpt.CheckpointError, match="records no digests, but this checkpoint was written with them"):
            ckpt.verify(str(run / "checkpoints"), ckpt.tag_for(STEPS))
        record["files"] = [f for f in record["files"] if f != ckpt.RESUME_INFO]
        manifest.write_text(json.dumps(record))
    (step_dir(run) / ckpt.RESUME_INFO).unlink()   # older checkpoints have neither
    capfd.readouterr()
    trainer = pretrain_in_process(run_args(demo_shards, run))
    assert trainer.step == 6 and trainer.resumed_from.endswith(ckpt.tag_for(STEPS))
    err = capfd.readouterr().err
    said = "no manifest" if old_style == "no manifest" else "a manifest without digests"
    assert f"warning: {step_dir(run)} has {said}" in err
    # what can be checked still is: an empty or truncated file of such a checkpoint is refused
    (step_dir(run) / OPTIM_STATES).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=f"{step_dir(run) / OPTIM_STATES} is empty"):
        ckpt.verify(str(run / "checkpoints"), ckpt.tag_for(STEPS))
    states = step_dir(run) / MODEL_STATES
    states.write_bytes(states.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match=f"{states} is not a readable torch.save file"):
        ckpt.verify(str(run / "checkpoints"), ckpt.tag_for(STEPS))


class _Payload:
    """Unpickling this calls open(path, "w"): it creates a file (what an attacker's code would do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_payload_in_a_checkpoint_never_runs_on_resume_or_export(copy_run, demo_shards, tmp_path, capsys):
    run = copy_run(1)
    planted = step_dir(run) / MODEL_STATES
    sentinel = tmp_path / "payload-ran"
    states = torch.load(planted, weights_only=False)   # the test's own file: trusted
    states["tokens_seen"] = _Payload(str(sentinel))
    torch.save(states, planted)
    # an attacker rewrites the manifest too: the digests then match, weights_only still refuses
    manifest_path = step_dir(run) / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["digests"][MODEL_STATES] = ckpt.file_digest(str(planted))
    manifest_path.write_text(json.dumps(manifest))
    rc, err = resume(demo_shards, run, capsys)
    assert rc == 2, err
    assert f"{planted} references a Python object outside the types a checkpoint holds" in err
    assert not sentinel.exists()
    rc, err = export_rc(run, tmp_path / "bundle", capsys)
    assert rc == 2 and f"{planted} references a Python object" in err, err
    assert not sentinel.exists()


def test_conversion_to_universal_verifies_its_source_first(copy_run):
    run = copy_run(1)
    flip_bit(step_dir(run) / OPTIM_STATES)
    with pytest.raises(ckpt.CheckpointError, match=f"{step_dir(run) / OPTIM_STATES} has sha256"):
        ckpt.to_universal(str(run / "checkpoints"), ckpt.tag_for(STEPS))
    assert not (run / "checkpoints" / ckpt.UNIVERSAL / ckpt.tag_for(STEPS)).exists()


def test_every_rank_checks_its_share_and_together_all_files(runs):
    sizes = {"a.pt": 100, "b.pt": 90, "c.pt": 20, "d": 5, "e": 1}
    shares = [checkpoint_files._share(sizes, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    assert checkpoint_files._file_owner("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert checkpoint_files._file_owner("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert checkpoint_files._file_owner("rng_rank002.pt") == 2 and checkpoint_files._file_owner(MODEL_STATES) == 0


def test_verify_cost_benchmark_prints_its_table(tmp_path, capsys, monkeypatch):
    import sys

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "verify_cost", raising=False)
    import verify_cost

    assert verify_cost.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip().split(" ")[0].rstrip(",") for r in rows] == [
        "sha256", "sha256", "weights_only", "verify():", "engine.load_checkpoint", "engine.load_checkpoint"]
    assert rows[4].rstrip(" |").endswith("1.00x")
    assert (tmp_path / "verify_cost.md").is_file() and (tmp_path / "verify_cost.csv").is_file()
