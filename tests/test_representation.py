"""Input-representation analysis (`mmtrain analyze-representation`): the metric, the block runner and
the paper's finding that an untrained masked mixer keeps its input."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.cli import main
from mmtrain.models import build_model
from mmtrain.models.layers import CausalLM
from mmtrain.eval.representation import analyze, top_k_misses
from conftest import TINY

@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one BLAS thread is faster and does not fight the other processes."""


TEXT = "Return the number of items in the container, counting duplicates once."


def tiny(kind: str, **extra) -> CausalLM:
    torch.manual_seed(0)
    config = dict(kind=kind, d_model=32, n_layers=2, n_ctx=32, n_heads=4, **extra)
    return build_model(config, vocab_size=4096).eval()


def test_metric_is_zero_for_the_true_embeddings_and_counts_a_known_permutation():
    model = tiny("mixer")
    weight = model.embedding.weight.detach()
    ids = torch.arange(100, 120)                                  # 20 distinct tokens
    assert top_k_misses(weight[ids], weight, ids) == (0, 20)
    shuffled = ids.clone()
    shuffled[:6] = ids[:6].roll(1)                                # 6 positions hold another input token
    assert top_k_misses(weight[shuffled], weight, ids) == (6, 20)
    counted = torch.ones(20, dtype=torch.bool)
    counted[:3] = False                                           # pads are not counted
    assert top_k_misses(weight[shuffled], weight, ids, counted) == (3, 17)


def test_untrained_mixer_with_the_papers_unit_embeddings_recovers_its_input():
    model = tiny("mixer")                                         # model.init: paper (the mixer default)
    assert abs(float(model.embedding.weight.std()) - 1.0) < 0.05  # nn.Embedding's N(0, 1), as in the paper
    ids = [list(range(200, 216))]
    rows = analyze(model, ids, layers=[2], steps=300)
    assert rows[0]["layers"] == 2 and rows[0]["positions"] == 16
    assert rows[0]["metric"] <= 0.1
    assert rows[0]["distance_end"] < 0.2 * rows[0]["distance_start"]
    few = analyze(model, ids, layers=[2], steps=2)                # no real search: nothing recovered
    assert few[0]["metric"] >= 0.5


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_block_outputs_of_all_blocks_are_the_hidden_states_before_the_final_norm(kind):
    model = tiny(kind)
    ids = torch.randint(4, 4096, (2, 10))
    embeddings = model.embedding(ids)
    final_norm = model.final_norm if kind == "mixer" else model.model.norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model.block_outputs(embeddings, 2)), model.hidden_states(ids))
        one = model.block_outputs(embeddings, 1)
        assert not torch.allclose(one, model.block_outputs(embeddings, 2))
    with pytest.raises(ValueError, match=r"k=3 blocks, expected 1\.\.2"):
        model.block_outputs(embeddings, 3)
    with pytest.raises(ValueError, match="embeddings must be"):
        model.block_outputs(ids, 1)


def test_a_model_kind_without_run_blocks_gets_a_clear_error():
    class NoBlocks(CausalLM):
        kind = "mixer"

    model = NoBlocks(dict(kind="mixer", d_model=32, n_layers=2, n_ctx=32), vocab_size=64)
    with pytest.raises(NotImplementedError, match="does not implement run_blocks"):
        model.block_outputs(torch.zeros(1, 4, 32), 1)


def test_cli_analyses_an_untrained_config_per_layer_and_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["analyze-representation", "--config", str(TINY), "--text", TEXT, "--layers", "all",
                 "--steps", "5", "--embedding-std", "1.0", "--json", str(out), "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["layers"] for r in report["results"]] == [1, 2]
    assert report["kind"] == "mixer" and report["embedding_std"] == 1.0 and report["steps"] == 5
    assert all(0.0 <= r["metric"] <= 1.0 and r["positions"] == report["inputs"][0] for r in report["results"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| blocks k |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--config", str(TINY), "--text", TEXT, "--layers", "3"], "the model has 2 blocks"),
    (["--config", str(TINY)], "give either --text or --data"),
    (["--text", TEXT], "give either a bundle directory or --config"),
    (["--config", str(TINY), "--data", "/nonexistent/x.txt"], "no such file or directory"),
])
def test_cli_rejects_bad_input_before_work(argv, message, capsys):
    assert main(["analyze-representation", *argv]) == 2
    assert message in capsys.readouterr().err
