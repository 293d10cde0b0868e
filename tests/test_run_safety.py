"""Never save a broken run, never lose one: non-finite numbers, steps and weights; untrustworthy
`latest` pointers; runs that would overwrite newer checkpoints. Real Trainer runs in this process."""

import math

import pytest
import torch

from conftest import TINY, pretrain_in_process, read_metrics, train_losses
from mmtrain.config import ConfigError, load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.lm import LMTask
from mmtrain.train.schema import PretrainConfig
from mmtrain.train.trainer import NonFiniteLoss, Trainer


def args(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}", "train.steps=6",
            "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=0", "engine.peak_flops=1e11", *extra]


@pytest.fixture(scope="module")
def four_steps(demo_shards, tmp_path_factory):
    """A finished run of 4 steps (ZeRO 1, checkpoints at 2 and 4), trained once for the module."""
    run_dir = tmp_path_factory.mktemp("four_steps") / "run"
    pretrain_in_process(args(demo_shards, run_dir, "train.steps=4"))
    return run_dir


@pytest.fixture()
def run_of_4_steps(four_steps, tmp_path):
    """A copy of :func:`four_steps` at ``tmp_path / "run"`` for a test to resume or damage."""
    import shutil

    shutil.copytree(four_steps, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.warmup_steps=0 engine.grad_clip=-inf",
                                      "engine.peak_flops=inf"])
def test_non_finite_numbers_in_a_config_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(PretrainConfig, [TINY], override.split())


class NanGradientAtStep4(LMTask):
    """Step 4's backward sees an infinite loss scale: its gradient, and the update, are non-finite."""

    def batch(self, raw, micro, step):
        self.step = step   # optimizer steps done before this one
        return super().batch(raw, micro, step)

    def loss(self, engine, batch):
        out = super().loss(engine, batch)
        if self.step == 3:
            out.terms = [term * float("inf") for term in out.terms]
        return out


def test_a_non_finite_step_is_never_saved_and_the_run_resumes_from_the_last_finite_checkpoint(demo_shards,
                                                                                             tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, [TINY], args(demo_shards, run_dir)[2:])
    trainer = Trainer(cfg, NanGradientAtStep4())
    try:
        with pytest.raises(NonFiniteLoss, match="non-finite gradient norm .* at step 4"):
            trainer.run()
    finally:
        trainer.release_run_dir()
        trainer.stop_request.uninstall()
    root = run_dir / "checkpoints"
    assert ckpt.check_latest(str(root)) == "step_00000002" and ckpt.list_tags(str(root)) == ["step_00000002"]
    # the saved step is finite, and the run continues from it to the end
    resumed = pretrain_in_process(args(demo_shards, run_dir))
    assert resumed.resumed_from == str(root / "step_00000002") and resumed.step == 6
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())


def test_weights_that_are_not_finite_are_never_saved(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    trainer = pretrain_in_process(args(demo_shards, run_dir, "train.steps=2"))
    with torch.no_grad():
        trainer.engine.module.wte.weight[0, 0] = float("nan")
    trainer.step = 3
    with pytest.raises(NonFiniteLoss, match="non-finite weights after step 3; not saved"):
        trainer.save()
    assert ckpt.list_tags(str(run_dir / "checkpoints")) == ["step_00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"


@pytest.mark.parametrize("latest, problem", [
    (b"step_00000099", "names 'step_00000099', which is not"),
    (b"\xff\xfe\x00garbage", "is unreadable"),
    (b"../../other/checkpoints/step_00000002", "names no checkpoint tag (37 characters), which is not"),
])
def test_a_latest_that_names_no_complete_checkpoint_is_an_error_and_nothing_is_touched(demo_shards, run_of_4_steps,
                                                                                       latest, problem):
    run_dir = run_of_4_steps
    root = run_dir / "checkpoints"
    (root / "latest").write_bytes(latest)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ConfigError) as info:
        pretrain_in_process(args(demo_shards, run_dir, "train.steps=6"))
    message = str(info.value)
    assert problem in message and "step_00000002, step_00000004" in message
    assert f"checkpoint.resume={root / 'step_00000004'}" in message
    assert sorted(p.name for p in root.iterdir()) == before
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_a_run_never_overwrites_newer_checkpoints(demo_shards, run_of_4_steps):
    run_dir = run_of_4_steps
    root = run_dir / "checkpoints"
    for extra, needle in ((["checkpoint.resume=none"], "newer than where this run would start (from step 0)"),
                          ([f"checkpoint.resume={root / 'step_00000002'}"], "(step_00000004) newer than")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            pretrain_in_process(args(demo_shards, run_dir, *extra))
    (root / "latest").unlink()
    with pytest.raises(ConfigError, match="but no 'latest'"):
        pretrain_in_process(args(demo_shards, run_dir))
    assert ckpt.list_tags(str(root)) == ["step_00000002", "step_00000004"]


def corrupt_copy(demo_shards, tmp_path):
    """A copy of the demo shards whose first training shard has its second half overwritten (same size)."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    shard = sorted((copy / "ctx32" / "train").glob("shard.*.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    return copy, shard


def test_a_corrupt_shard_is_named_before_training(demo_shards, tmp_path):
    shards, shard = corrupt_copy(demo_shards, tmp_path)
    with pytest.raises(ConfigError, match=rf"{shard}: sha1 .* does not match index.json .* re-run `mmtrain prepare`"):
        pretrain_in_process(args(shards, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_token_ids_outside_the_vocabulary_stop_the_run_with_the_fix(demo_shards, tmp_path):
    from mmtrain.data.errors import DataError

    shards, _ = corrupt_copy(demo_shards, tmp_path)   # unchecked: ids 65535 reach the loader
    with pytest.raises(DataError, match=r"token id 65535, outside the vocabulary 0..4095: the shards are corrupt"):
        pretrain_in_process(args(shards, tmp_path / "run", "data.verify_shards=false", "checkpoint.every=0"))


@pytest.mark.parametrize("escape", ["../../../../etc/passwd", "/etc/passwd", "symlink"])
def test_a_bundle_never_makes_mmtrain_read_outside_its_directory(exported_bundles, tmp_path, escape):
    import json
    import shutil

    from mmtrain.export.bundle import BundleError, load_bundle_tokenizer, load_pretrained

    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundles["mixer_zero1"], bundle)
    config = json.loads((bundle / "config.json").read_text())
    if escape == "symlink":
        outside = tmp_path / "outside.model"
        shutil.copy(bundle / config["mmtrain"]["tokenizer"]["file"], outside)
        (bundle / config["mmtrain"]["tokenizer"]["file"]).unlink()
        (bundle / config["mmtrain"]["tokenizer"]["file"]).symlink_to(outside)
    else:
        config["mmtrain"]["tokenizer"]["file"] = escape
        (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="is not a file inside the bundle directory"):
        load_bundle_tokenizer(bundle)
    # a sharded index naming a weight file outside the bundle
    (bundle / "model.safetensors").rename(tmp_path / "w.safetensors")
    (bundle / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"wte.weight": "../w.safetensors"}}))
    with pytest.raises(BundleError, match="weight file '../w.safetensors' is not a file inside"):
        load_pretrained(bundle)


def test_fp16_on_a_cpu_is_a_clear_error(demo_shards, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        pretrain_in_process(args(demo_shards, tmp_path / "run", "engine.precision=fp16", "engine.device=cpu"))


@pytest.mark.parametrize("flags, needle", [(["--top-p", "0"], "--top-p must be in (0, 1]"),
                                           (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
                                           (["--temperature", "-0.5"], "--temperature must be a finite number >= 0")])
def test_generate_refuses_unusable_sampling_settings(exported_bundles, capsys, flags, needle):
    from mmtrain import cli

    assert cli.main(["generate", str(exported_bundles["mixer_zero1"]), *flags]) == 2
    assert needle in capsys.readouterr().err


def test_a_checkpoint_missing_a_rank_file_or_from_another_layout_is_named_before_resuming(demo_shards, tmp_path,
                                                                                          run_of_4_steps):
    import json
    import shutil

    run_dir = run_of_4_steps
    step4 = run_dir / "checkpoints" / "step_00000004"
    cases = [
        ("rng_rank000.pt", [], "lacks rng_rank000.pt: an incomplete or damaged checkpoint"),
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", [], "lacks zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        (None, ["engine.zero_stage=3"], "was written at ZeRO 1; this run is engine.zero_stage=3. Resume at ZeRO 1 or 2"),
        (None, ["engine.zero_stage=0"], "was written at ZeRO 1; this run is engine.zero_stage=0. Resume at ZeRO 1 or 2"),
        ("rank1", [], "lacks zero_pp_rank_1_mp_rank_00_optim_states.pt"),   # a 2-rank checkpoint, one rank lost
    ]
    for change, extra, needle in cases:
        saved = tmp_path / "saved"
        shutil.copytree(step4, saved)
        if change == "rank1":
            manifest = json.loads((step4 / "manifest.json").read_text())
            files = manifest["files"] + ["rng_rank001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
            (step4 / "manifest.json").write_text(json.dumps({**manifest, "world_size": 2, "files": files}))
            shutil.copy(step4 / "rng_rank000.pt", step4 / "rng_rank001.pt")
        elif change:
            (step4 / change).unlink()
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            pretrain_in_process(args(demo_shards, run_dir, "train.steps=6", *extra))
        shutil.rmtree(step4)
        shutil.move(saved, step4)
    resumed = pretrain_in_process(args(demo_shards, run_dir, "train.steps=6", "engine.zero_stage=2",
                                       "checkpoint.allow_changes=[train.steps]"))
    assert resumed.resumed_from == str(step4) and resumed.step == 6   # a longer schedule, asked for explicitly
    # ZeRO 1 and 2 share a layout


TOEPLITZ = ["model.mixer_matrix=toeplitz", "model.mixer_fft_min_length=16"]   # its FFT path at n_ctx 32


def test_a_run_resumes_on_another_number_of_ranks_at_every_zero_stage(demo_shards, tmp_path):
    """1 rank (steps 1-2) -> 2 ranks (3-4) -> 1 rank (5-6) at the same global batch trains what one
    uninterrupted rank trains: a ZeRO >= 1 checkpoint is converted to a universal checkpoint
    (kept only until the resumed run saves), a ZeRO 0 one loads as it is. The dense mixer at ZeRO
    0-3 and the Toeplitz mixer at ZeRO 3, all in one two-rank launch."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, free_port, script_env

    runs = {f"z{z}": (z, []) for z in (0, 1, 2, 3)}
    runs["toeplitz_z3"] = (3, TOEPLITZ)

    def run_args(name, *extra):
        z, model = runs[name]
        return [str(a) for a in args(demo_shards, tmp_path / name, f"engine.zero_stage={z}", "data.num_workers=0",
                                     *model, *extra)]

    for name in runs:
        pretrain_in_process(run_args(name, "train.stop_at=2"))
    spec = tmp_path / "two_ranks.json"
    spec.write_text(json.dumps([run_args(name, "train.stop_at=4") for name in runs]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           str(ROOT / "tests" / "scripts" / "train_two_ranks.py"), str(spec)],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # one uninterrupted rank per model; ZeRO 0-3 train the same losses (tests/test_pretrain.py checks it)
    want = {}
    for model in ([], TOEPLITZ):
        reference = pretrain_in_process([str(a) for a in args(demo_shards, tmp_path / f"ref{len(model)}",
                                                              "engine.zero_stage=1", "data.num_workers=0", *model)])
        assert reference.step == 6
        want[len(model)] = train_losses(tmp_path / f"ref{len(model)}")
    assert want[0] != want[len(TOEPLITZ)]
    for name, (z, model) in runs.items():
        converting = f"{name}/checkpoints/step_00000002 was written by 1 rank(s) at ZeRO {z}; this run has 2"
        assert (converting in proc.stdout) == (z >= 1), proc.stdout[-3000:]
        resumed = pretrain_in_process(run_args(name))
        universal = tmp_path / name / "checkpoints" / "universal"
        assert resumed.resumed_from == str(universal / "step_00000004" if z else
                                           tmp_path / name / "checkpoints" / "step_00000004")
        assert ckpt.list_tags(str(universal)) == []   # conversions are pruned once a newer step is saved
        got = train_losses(tmp_path / name)
        assert sorted(got) == list(range(1, 7)) and resumed.step == 6
        for step in got:
            assert got[step] == pytest.approx(want[len(model)][step], rel=1e-5, abs=0), (name, step, got)


def test_resuming_with_a_changed_training_setting_is_an_error_and_watching_settings_apply(demo_shards, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    pretrain_in_process(args(demo_shards, run_dir, "train.steps=6", "train.stop_at=2"))
    with pytest.raises(ConfigError) as info:
        pretrain_in_process(args(demo_shards, run_dir, "train.steps=6", "train.lr=1e-2", "train.global_batch_size=16"))
    message = str(info.value)
    assert "train.lr: 0.003 -> 0.01" in message and "train.global_batch_size: 8 -> 16" in message
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.003   # not rewritten
    # evaluation / logging / checkpoint cadence may change, and a key named in allow_changes may too
    trainer = pretrain_in_process(args(demo_shards, run_dir, "train.steps=6", "train.eval_every=3",
                                       "logging.log_every=2", "train.warmup_steps=3",
                                       "checkpoint.allow_changes=[train.warmup_steps]"))
    assert trainer.step == 6 and trainer.resumed_from.endswith("step_00000002")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["eval_every"] == 3


def test_bundle_weights_are_as_readable_as_its_other_files(exported_bundles):
    bundle = exported_bundles["mixer_zero1"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in bundle.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_prepare_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    from mmtrain import cli

    (tmp_path / "afile").write_text("x")
    assert cli.main(["prepare", "--out", str(tmp_path / "afile"), "--n-ctx", "32", "max_docs=20"]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


def test_resuming_from_moved_shards_warns_and_goes_on(demo_shards, tmp_path, capsys):
    import shutil

    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    pretrain_in_process(args(demo_shards, run_dir, "train.stop_at=2"))
    shutil.copytree(demo_shards, moved)
    assert pretrain_in_process(args(moved, run_dir)).step == 6
    assert f"warning: resuming with changed settings: data.shard_dir: '{demo_shards}' -> '{moved}'" in \
        capsys.readouterr().out


@pytest.mark.parametrize("stage, directions", [(1, [("packed", "dense")]), (3, [("dense", "packed")])],
                         ids=["zero1_packed_to_dense", "zero3_dense_to_packed"])
def test_a_checkpoint_resumes_into_the_other_mixing_layout(demo_shards, tmp_path, stage, directions):
    """A dense-layout checkpoint (what earlier versions wrote; its manifest does not record a
    layout) resumes into a packed run, and a packed one into a dense run, through a universal
    checkpoint whose mixing weights and Adam moments are re-laid: the losses are an uninterrupted
    run's. At ZeRO 0 (a plain optimizer state) it is an exit-2 error before any work."""
    import json

    def run(run_dir, *extra):
        return pretrain_in_process(args(demo_shards, run_dir, f"engine.zero_stage={stage}", "model.mixer_block_size=8",
                                        *extra))

    reference = train_losses(run(tmp_path / "ref", "model.mixer_layout=dense").run_dir)
    for first, then in directions:
        run_dir = tmp_path / f"{first}-{then}"
        run(run_dir, "train.stop_at=2", f"model.mixer_layout={first}")
        manifest_path = run_dir / "checkpoints" / "step_00000002" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["mixing_layout"] == first
        if first == "dense":
            del manifest["mixing_layout"]   # as written before layouts were recorded
            manifest_path.write_text(json.dumps(manifest))
        resumed = run(run_dir, f"model.mixer_layout={then}")
        assert resumed.resumed_from.endswith("universal/step_00000002")
        losses = train_losses(run_dir)
        assert sorted(losses) == list(range(1, 7))
        # the layouts sum in different orders: rounding differences, which AdamW amplifies a little
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4, abs=0), (first, then, step)


def test_a_zero0_checkpoint_of_the_other_layout_is_refused_and_exports_to_either(demo_shards, tmp_path):
    import json

    from mmtrain.export import bundle as B
    from mmtrain.export.exporter import export

    run_dir = tmp_path / "run"
    pretrain_in_process(args(demo_shards, run_dir, "train.stop_at=2", "model.mixer_layout=dense",
                             "engine.zero_stage=0"))
    with pytest.raises(ConfigError, match="holds dense token-mixing matrices; this run builds them packed"):
        pretrain_in_process(args(demo_shards, run_dir, "engine.zero_stage=0"))
    assert ckpt.list_tags(str(run_dir / "checkpoints")) == ["step_00000002"]
    resumed = pretrain_in_process(args(demo_shards, run_dir, "model.mixer_layout=dense", "engine.zero_stage=0"))
    assert resumed.step == 6
    export(str(run_dir), str(tmp_path / "bundle"))
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["mmtrain"]["model"].pop("mixer_layout") == "dense"   # as an earlier version's bundle
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(config))
    packed = B.load_pretrained(tmp_path / "bundle")
    assert {m.layout for m in packed.modules() if hasattr(m, "layout")} == {"packed"}   # the default
    tokens = torch.randint(0, packed.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = resumed.model(tokens.to(resumed.device)).logits   # the dense run's own model
        assert (packed(tokens).logits - reference).abs().max() < 1e-5
