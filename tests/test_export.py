"""`mmtrain export`: checkpoints of every ZeRO stage -> bundles with the trained model's logits;
loading without the training config; Hugging Face interop; sharding; the errors users hit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TRAIN_STEPS
from mmtrain.export import bundle as B
from mmtrain.cli import main as cli_main
from mmtrain.config import load_config
from mmtrain.train.schema import PretrainConfig
from mmtrain.export.exporter import ExportError, export
from mmtrain.models import LlamaLM, MaskedMixerLM, build_model
from mmtrain.models.mixer import MaskedMixingMatrix
from mmtrain.data.tokenizer import DEMO_TOKENIZER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 4096          # the shipped demo tokenizer
TOKENS_PER_STEP = 8 * 32  # tiny.yaml: global batch 8 x n_ctx 32


def tokens(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def checkpoint_model(run_dir: Path, tag: str = None):
    """The trained model rebuilt straight from the checkpoint files and the run's training config
    (independently of mmtrain.export.exporter): the module weights DeepSpeed saved for ZeRO 0-2 (fp32
    runs), DeepSpeed's zero_to_fp32 for ZeRO 3 (whose saved module is only placeholders)."""
    cfg = load_config(PretrainConfig, [str(run_dir / "config.yaml")])
    root = run_dir / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    if cfg.engine.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag)
    else:
        state = torch.load(root / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model = build_model(cfg.model, VOCAB)
    model.load_state_dict(state, strict=True)
    return model.eval()


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


# --------------------------------------------------------------------------------------------
# Every ZeRO stage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixer_expanded_zero0", "mixer_zero1", "transformer_zero2",
                                  "mixer_heads_tied_zero3", "mixer_heads_tied_zero3_2proc"])
def test_bundle_of_every_zero_stage_has_the_trained_models_logits(name, trained_runs, exported_bundles):
    reference = checkpoint_model(trained_runs[name])
    exported = B.load_pretrained(exported_bundles[name])
    assert type(exported) is type(reference)
    for ids in (tokens(3, 32), tokens(2, 17, seed=1)):   # full context and a shorter input
        assert max_logit_diff(exported, reference, ids) <= 1e-6
    source = json.loads((exported_bundles[name] / "config.json").read_text())["mmtrain"]["source"]
    assert source["step"] == TRAIN_STEPS and source["tokens_seen"] == TRAIN_STEPS * TOKENS_PER_STEP
    assert source["world_size"] == (2 if name.endswith("2proc") else 1)
    assert source["zero_stage"] == int(name.split("zero")[1][0])


def test_two_process_zero3_bundle_matches_the_one_process_run(exported_bundles):
    one = B.load_pretrained(exported_bundles["mixer_heads_tied_zero3"])
    two = B.load_pretrained(exported_bundles["mixer_heads_tied_zero3_2proc"])
    # the same run: only the gradient reduction order differs between 1 and 2 processes, so the
    # logits agree to fp32 rounding relative to their scale (tied N(0, 1) embeddings: |logit| ~ 20)
    ids = tokens(2, 32)
    with torch.no_grad():
        scale = float(one(ids).logits.abs().max())
    assert max_logit_diff(one, two, ids) <= 2e-5 * max(1.0, scale)


def test_tag_selects_an_earlier_checkpoint(trained_runs, tmp_path):
    run = trained_runs["mixer_zero1"]
    config = export(str(run), str(tmp_path / "b"), tag="step_6")
    assert config["mmtrain"]["source"]["step"] == 6
    assert max_logit_diff(B.load_pretrained(tmp_path / "b"), checkpoint_model(run, "step_00000006"),
                          tokens(2, 32)) <= 1e-6
    with pytest.raises(ExportError, match=r"no checkpoint step_00000007 .*step_00000006, step_00000012"):
        export(str(run), str(tmp_path / "c"), tag="7")


# --------------------------------------------------------------------------------------------
# What a bundle holds and how it loads
# --------------------------------------------------------------------------------------------


def test_config_json_describes_the_model_and_its_tensors(exported_bundles, demo_shards):
    bundle = exported_bundles["mixer_expanded_zero0"]
    m = json.loads((bundle / "config.json").read_text())["mmtrain"]
    assert {k: m["model"][k] for k in ("kind", "d_model", "n_layers", "n_ctx", "vocab_size", "mixer_expansion",
                                       "final_norm", "tie_embeddings")} == dict(
        kind="mixer", d_model=32, n_layers=2, n_ctx=32, vocab_size=VOCAB, mixer_expansion=2,
        final_norm=False, tie_embeddings=False)
    assert m["mmtrain_version"] == "0.1.0"
    stored = load_file(str(bundle / "model.safetensors"))
    assert {n: info["shape"] for n, info in m["tensors"].items()} == {n: list(t.shape) for n, t in stored.items()}
    assert m["tensors"]["blocks.0.token_mixing.expand.weight"]["shape"] == [64, 32]
    assert "hidden row r" in m["tensors"]["blocks.0.token_mixing.expand.weight"]["description"]
    assert (bundle / "tokenizer.model").read_bytes() == (demo_shards / "tokenizer.model").read_bytes()
    card = (bundle / "model_card.md").read_text()
    for text in ("`blocks.1.token_mixing.contract.weight` | [32, 64]", f"| steps_done | {TRAIN_STEPS} |",
                 "| zero_stage | 0 |", "## Verification", "load_pretrained"):
        assert text in card


def test_bundle_loads_alone_and_without_deepspeed(exported_bundles, tmp_path):
    alone = tmp_path / "copied"
    shutil.copytree(exported_bundles["mixer_zero1"], alone)    # far from the run and its config
    code = ("import sys, torch; from mmtrain import load_pretrained; "
            f"m = load_pretrained({str(alone)!r}); m(torch.zeros(1, 32, dtype=torch.long)); "
            "bad = [x for x in ('deepspeed', 'transformers', 'streaming') if x in sys.modules]; "
            "assert not bad, bad; print(type(m).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MaskedMixerLM"
    assert isinstance(B.load_pretrained(alone, kind="mixer"), MaskedMixerLM)
    assert isinstance(B.load_pretrained(exported_bundles["transformer_zero2"], kind="transformer"), LlamaLM)
    with pytest.raises(ValueError, match="holds a 'mixer' model"):
        B.load_pretrained(alone, kind="transformer")


def test_tied_embedding_is_stored_once(exported_bundles):
    bundle = exported_bundles["mixer_heads_tied_zero3"]
    stored = load_file(str(bundle / "model.safetensors"))
    assert "wte.weight" in stored and "lm_head.weight" not in stored
    model = B.load_pretrained(bundle)
    assert model.lm_head.weight is model.wte.weight


def perturbed_mixer(**cfg):
    torch.manual_seed(0)
    model = build_model(dict(kind="mixer", d_model=16, n_layers=2, n_ctx=16, **cfg), VOCAB).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedMixingMatrix):  # garbage where the mask is 0
                dead = module.mask.expand_as(module.weight) == 0
                module.weight[dead] = 3.0
    return model


@pytest.mark.parametrize("cfg", [{}, {"mixer_heads": 2}, {"mixer_expansion": 3}])
def test_masked_weights_are_saved_already_masked(cfg, tmp_path):
    model = perturbed_mixer(**cfg)
    B.write_bundle(model, tmp_path / "b", DEMO_TOKENIZER)
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    for name, module in model.named_modules():
        if isinstance(module, MaskedMixingMatrix):
            weight = stored[f"{name}.weight"]
            dead = module.mask.expand_as(weight) == 0
            assert dead.any() and torch.count_nonzero(weight[dead]) == 0, name
            assert torch.equal(weight[~dead], module.weight.detach()[~dead]), name
    assert max_logit_diff(B.load_pretrained(tmp_path / "b"), model, tokens(2, 16)) == 0


def test_large_bundles_are_sharded_with_an_index(exported_bundles, tmp_path):
    model = B.load_pretrained(exported_bundles["mixer_zero1"])
    B.write_bundle(model, tmp_path / "b", DEMO_TOKENIZER, max_shard_size=B.parse_size("200KB"))
    index = json.loads((tmp_path / "b" / B.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "b" / B.WEIGHTS_NAME).exists()
    assert sorted(index["weight_map"]) == sorted(B.export_state_dict(model))
    assert "blocks.0.token_mixing.weight" in index["weight_map"]   # the dense masked matrix, as in the paper
    for file in files:
        shard = load_file(str(tmp_path / "b" / file))
        # at most 200 KB, unless one tensor alone is larger (the 4096 x 32 fp32 embedding: 512 KiB)
        assert len(shard) == 1 or sum(t.numel() * 4 for t in shard.values()) <= 200_000, file
    assert max_logit_diff(B.load_pretrained(tmp_path / "b"), model, tokens(2, 32)) == 0


def test_bf16_export_stores_bf16_and_is_verified(trained_runs, tmp_path):
    run = trained_runs["transformer_zero2"]
    config = export(str(run), str(tmp_path / "b"), dtype="bf16", max_shard_size=100_000)
    m = config["mmtrain"]
    assert m["dtype"] == "bfloat16" and len(m["weight_files"]) > 2   # shards + index
    assert all(t.dtype == torch.bfloat16 for f in m["weight_files"] if f.endswith(".safetensors")
               for t in load_file(str(tmp_path / "b" / f)).values())
    assert m["verification"]["max_abs_diff"] <= 1e-6
    reference = checkpoint_model(run)
    assert 0 < max_logit_diff(B.load_pretrained(tmp_path / "b"), reference, tokens(2, 32)) < 0.1


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------


def test_hugging_face_llama_loads_the_exported_transformer(exported_bundles, tmp_path):
    from mmtrain.export.hf import llama_classes

    _, LlamaForCausalLM = llama_classes()
    ours = B.load_pretrained(exported_bundles["transformer_zero2"])
    hf = LlamaForCausalLM.from_pretrained(exported_bundles["transformer_zero2"]).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.max_position_embeddings == 32
    ids = tokens(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    # sharded bundles too (Hugging Face's index layout)
    B.write_bundle(ours, tmp_path / "sharded", DEMO_TOKENIZER, max_shard_size=100_000)
    hf_sharded = LlamaForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_sharded(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_directory_without_checkpoint_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(ExportError, match=r"no checkpoint in .*Found: notes\.txt, tensorboard/"):
        export(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "checkpoints" / "step_00000004.incomplete").mkdir(parents=True)   # no `latest`
    with pytest.raises(ExportError, match=r"no complete checkpoint .*Found: step_00000004\.incomplete/"):
        export(str(tmp_path), str(tmp_path / "out"))


@pytest.fixture()
def copied_run(trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["mixer_heads_tied_zero3_2proc"], run)
    return run


def test_partially_written_checkpoints_are_refused(copied_run, tmp_path):
    root = copied_run / "checkpoints"
    # a write killed before every rank had finished (never renamed from <tag>.incomplete)
    shutil.copytree(root / "step_00000012", root / "step_00000018.incomplete")
    with pytest.raises(ExportError, match=r"step_00000018\.incomplete is a partially written checkpoint.*"
                                          r"Complete checkpoints next to it: step_00000006, step_00000012"):
        export(str(root / "step_00000018.incomplete"), str(tmp_path / "out"))
    # one rank's optimizer partition missing
    (root / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ExportError, match=r"step_00000012/zero_pp_rank_1_mp_rank_00_optim_states\.pt is missing"):
        export(str(copied_run), str(tmp_path / "out"))
    # a truncated file
    states = root / "step_00000006" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt has [\d,]+ bytes; manifest\.json "
                                          r"records [\d,]+ \(truncated\)"):
        export(str(copied_run), str(tmp_path / "out"), tag="6")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(trained_runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    run = str(trained_runs["mixer_zero1"])
    for extra in ([], ["--overwrite"]):   # a file export did not write is never deleted
        assert cli_main(["export", run, "--out", str(out), *extra]) == 2
        assert "did not write (precious.txt); it never deletes them" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert cli_main(["export", run, "--out", str(out)]) == 0
    assert cli_main(["export", run, "--out", str(out)]) == 2   # a bundle: replaced only when asked
    assert "not empty (config.json, " in capsys.readouterr().err
    assert cli_main(["export", run, "--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "verified: reloaded logits match the checkpoint's" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "model_card.md", "modeling_mmtrain.py", "special_tokens_map.json",
                                                     "tokenization_mmtrain.py", "tokenizer.model",
                                                     "tokenizer_config.json"]


def test_loading_a_bundle_with_a_missing_tensor_names_it(exported_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(exported_bundles["mixer_zero1"], bundle)
    state = load_file(str(bundle / "model.safetensors"))
    del state["blocks.1.mlp.fc_in.bias"]
    save_file(state, str(bundle / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(B.BundleError, match=r"missing tensor 'blocks\.1\.mlp\.fc_in\.bias' \(expected shape \[128\]\)"):
        B.load_pretrained(bundle)
    with pytest.raises(B.BundleError, match="has no config.json"):
        B.load_pretrained(tmp_path)
