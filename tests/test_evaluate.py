"""`mmtrain eval-lm`: loss / perplexity / bits per byte per context length on validation shards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmtrain.export import bundle as B
from mmtrain.cli import main as cli_main
from mmtrain.config import load_config
from mmtrain.train.schema import PretrainConfig
from mmtrain.data import DataError
from mmtrain.eval.lm import eval_lm, target_bytes, token_bytes
from mmtrain.models import build_model, causal_lm_loss
from mmtrain.data.tokenizer import DEMO_TOKENIZER, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def untrained_bundle(trained_runs, tmp_path_factory):
    """The trained mixer's architecture at its initialisation (same seed as training)."""
    cfg = load_config(PretrainConfig, [str(trained_runs["mixer_zero1"] / "config.yaml")])
    torch.manual_seed(cfg.train.seed)
    out = tmp_path_factory.mktemp("untrained") / "bundle"
    B.write_bundle(build_model(cfg.model, 4096), out, DEMO_TOKENIZER)
    return out


def by_length(report):
    return {r["n_ctx"]: r for r in report["results"]}


def test_trained_model_has_lower_loss_than_untrained_and_numbers_are_stable(
        exported_bundles, untrained_bundle, demo_shards):
    trained = eval_lm(str(exported_bundles["mixer_zero1"]), str(demo_shards), [8, 16, 32])
    untrained = eval_lm(str(untrained_bundle), str(demo_shards), [8, 16, 32])
    for L in (8, 16, 32):
        t, u = by_length(trained)[L], by_length(untrained)[L]
        assert t["loss"] < u["loss"] - 0.3, L
        # ~uniform at init: the paper init's logits (std ~0.6) add about std^2 / 2 to ln V
        assert math.log(4096) - 0.1 < u["loss"] < math.log(4096) + 0.5
        assert t["perplexity"] == pytest.approx(math.exp(t["loss"]))
        assert t["bits_per_byte"] < u["bits_per_byte"]
        assert t["tokens"] == u["tokens"] > 0
    assert eval_lm(str(exported_bundles["mixer_zero1"]), str(demo_shards), [8, 16, 32]) == trained


def test_loss_is_the_mean_shifted_cross_entropy_of_the_cut_blocks(exported_bundles, demo_shards):
    bundle = exported_bundles["transformer_zero2"]
    report = by_length(eval_lm(str(bundle), str(demo_shards), [16, 32], max_sequences=10))
    from mmtrain.eval.lm import read_blocks

    tok = B.load_bundle_tokenizer(bundle)
    ids = torch.cat([b for b, _ in read_blocks(str(demo_shards), 32, "val", 4, tok.sha256, 4096, 10)])
    assert ids.shape == (10, 32)
    model = B.load_pretrained(bundle)
    with torch.no_grad():
        for L in (16, 32):
            blocks = ids.reshape(-1, L)
            expected = float(causal_lm_loss(model(blocks).logits, blocks))
            assert report[L]["loss"] == pytest.approx(expected, rel=1e-5)
            assert report[L]["sequences"] == blocks.shape[0] and report[L]["tokens"] == blocks.shape[0] * (L - 1)


def test_bytes_of_target_tokens_are_the_utf8_bytes_of_their_text():
    tok = load_tokenizer(DEMO_TOKENIZER)
    text = "Return the  café 😀\n\tdef f(x):"
    ids = torch.tensor([[tok.eos_id] + tok.encode(text) + [tok.eos_id] + tok.encode("Next doc")])
    per_token = target_bytes(ids, token_bytes(tok), tok.eos_id)
    assert float(per_token.sum()) == len(text.encode("utf-8")) + len("Next doc")   # EOS counts 0


def test_eval_lm_command_prints_a_table_and_writes_json(exported_bundles, demo_shards, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval-lm", str(exported_bundles["mixer_expanded_zero0"]), "--data", str(demo_shards),
            "--n-ctx", "16", "32", "--json", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| n_ctx | sequences | tokens | loss | perplexity | bits/byte |" in printed
    report = json.loads(out.read_text())
    assert [r["n_ctx"] for r in report["results"]] == [16, 32]
    for r in report["results"]:
        assert f"| {r['n_ctx']} | {r['sequences']:,} | {r['tokens']:,} | {r['loss']:.4f} |" in printed


def test_eval_lm_errors_name_the_problem(exported_bundles, demo_shards, tmp_path, capsys):
    bundle = str(exported_bundles["mixer_zero1"])
    with pytest.raises(DataError, match=r"every length must be in 2\.\.32"):
        eval_lm(bundle, str(demo_shards), [64])
    with pytest.raises(DataError, match=r"no shards for n_ctx=128 .*found: ctx32, ctx64"):
        eval_lm(bundle, str(demo_shards), shard_ctx=128)
    assert cli_main(["eval-lm", str(tmp_path), "--data", str(demo_shards)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    # a mixer evaluates shorter blocks cut from longer shards
    report = eval_lm(bundle, str(demo_shards), [32], shard_ctx=64, max_sequences=4)
    assert by_length(report)[32]["sequences"] == 8


def test_eval_lm_reads_shards_from_a_bucket_like_local_ones(exported_bundles, demo_shards, s3_server, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    url = s3_server.bucket("mmeval") + "/demo"
    s3_server.upload_dir(demo_shards, url)
    bundle = str(exported_bundles["mixer_zero1"])
    local = eval_lm(bundle, str(demo_shards), [16, 32], max_sequences=24, progress=False)
    remote = eval_lm(bundle, url, [16, 32], max_sequences=24, progress=False)
    assert remote["results"] == local["results"] and remote["data"] == url
    with pytest.raises(DataError, match=r"no shards for n_ctx=128 at s3://mmeval/demo/ctx128"):
        eval_lm(bundle, url, [16], shard_ctx=128)
