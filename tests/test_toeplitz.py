"""Toeplitz token mixing: both product paths against a float64 reference (forward and both
gradients), the model options and their refusals, causality, and bundles in transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mmtrain.config import ConfigError
from mmtrain.models import build_model
from mmtrain.models.mixer import FlatToeplitzMixing, MultiHeadTokenMixing
from mmtrain.models.toeplitz import (FFT_MIN_LENGTH, ToeplitzMixing, fft_size, toeplitz_mix, toeplitz_rows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The definition, in float64: Y[i] = sum_{j <= i} k[i - j] U[j], by explicit loops over lags."""
    length = u.shape[-2]
    out = torch.zeros_like(u, dtype=torch.float64)
    k, x = kernel.double(), u.double()
    for lag in range(length):
        weight = k[..., lag, None, None] if k.dim() == 2 else k[lag]
        out[..., lag:, :] += weight * x[..., :length - lag, :]
    return out


@pytest.mark.parametrize("path", ["direct", "fft"])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("n", [1, 7, 128, 129, 1000])
def test_both_paths_equal_the_float64_reference_forward_and_both_gradients(n, heads, path):
    gen = torch.Generator().manual_seed(n)
    lead = () if heads is None else (heads,)
    kernel = torch.randn(*lead, n + 3, generator=gen)       # a kernel longer than the input: prefix use
    u = torch.randn(2, *lead, n, 5, generator=gen)
    grad = torch.randn(2, *lead, n, 5, generator=gen)
    k32, u32 = kernel.clone().requires_grad_(), u.clone().requires_grad_()
    y = toeplitz_mix(k32, u32, path=path)
    y.backward(grad)
    k64, u64 = kernel.double().requires_grad_(), u.double().requires_grad_()
    expected = reference(k64, u64)
    expected.backward(grad.double())
    scale = float(expected.detach().abs().max())
    assert y.dtype == torch.float32 and y.shape == u.shape
    assert float((y.double() - expected).abs().max()) <= 2e-6 * scale * max(1.0, n ** 0.5) + 1e-6
    for got, want in ((k32.grad, k64.grad), (u32.grad, u64.grad)):
        assert float((got.double() - want).abs().max()) <= 2e-6 * float(want.abs().max()) * max(1.0, n ** 0.5)
    assert float(k32.grad[..., n:].abs().max()) == 0.0    # lags beyond the input get exactly nothing


def test_the_matrix_is_toeplitz_lower_triangular_and_rows_are_prefixes():
    kernel = torch.arange(1.0, 6.0)
    matrix = toeplitz_rows(kernel, 5, 5)
    assert torch.equal(matrix, torch.tensor([[1., 0, 0, 0, 0], [2, 1, 0, 0, 0], [3, 2, 1, 0, 0],
                                             [4, 3, 2, 1, 0], [5, 4, 3, 2, 1]]))
    assert torch.equal(toeplitz_rows(kernel, 5, 4, start=2), matrix[2:5, :4])
    assert [fft_size(n) for n in (1, 2, 3, 128, 129)] == [1, 4, 8, 256, 512]


def test_bf16_runs_the_fft_in_fp32_and_rounds_once():
    gen = torch.Generator().manual_seed(0)
    kernel, u = torch.randn(600, generator=gen), torch.randn(600, 8, generator=gen)
    exact = reference(kernel.bfloat16().float(), u.bfloat16().float())
    y = toeplitz_mix(kernel.bfloat16(), u.bfloat16(), path="fft")
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the exact result (8 bits of mantissa): relative 2^-8 of each value
    assert float(((y.double() - exact).abs() - exact.abs() / 256).max()) <= 1e-3 * float(exact.abs().max())


def test_the_auto_path_switches_to_fft_at_the_measured_length(monkeypatch):
    import mmtrain.models.toeplitz as T

    used = []
    monkeypatch.setattr(T, "toeplitz_mix_fft", lambda k, u: used.append("fft") or T.toeplitz_mix_direct(k, u))
    kernel = torch.randn(FFT_MIN_LENGTH + 1)
    for length in (FFT_MIN_LENGTH - 1, FFT_MIN_LENGTH):
        used.append(length)
        T.toeplitz_mix(kernel, torch.randn(length, 2))
    assert used == [FFT_MIN_LENGTH - 1, FFT_MIN_LENGTH, "fft"]
    used.clear()
    T.toeplitz_mix(kernel, torch.randn(10, 2), fft_min_length=8)
    assert used == ["fft"]


def test_module_init_state_and_parameter_count():
    torch.manual_seed(0)
    model = build_model(dict(kind="mixer", d_model=32, n_layers=2, n_ctx=4096, mixer_matrix="toeplitz"), 50)
    state = model.state_dict()
    assert state["blocks.0.token_mixing.kernel"].shape == (4096,)
    assert state["blocks.0.token_mixing.bias"].shape == (4096,)
    assert not any(k.endswith("weight") and "token_mixing" in k for k in state)
    kernels = torch.stack([block.token_mixing.kernel.detach() for block in model.blocks])
    assert abs(float(kernels.std()) - (2 / 4096) ** 0.5) < 0.05 * (2 / 4096) ** 0.5   # N(0, 2/n): kaiming
    assert all(float(block.token_mixing.bias.abs().max()) == 0.0 for block in model.blocks)
    # the parameter count is what is stored: 2 n_ctx per block for the mixing, not n_ctx^2
    assert model.num_params() == model.stored_params() == sum(p.numel() for p in model.parameters())
    heads = build_model(dict(kind="mixer", d_model=32, n_layers=1, n_ctx=64, mixer_heads=4,
                             mixer_matrix="toeplitz", mixing_init="uniform"), 50)
    mixing = heads.blocks[0].token_mixing
    assert isinstance(mixing, MultiHeadTokenMixing) and isinstance(mixing.mixing, ToeplitzMixing)
    assert mixing.mixing.kernel.shape == (4, 64) and float(mixing.mixing.kernel.abs().max()) <= 1 / 8
    assert float(mixing.mixing.bias.abs().max()) > 0


@pytest.mark.parametrize("extra", [dict(), dict(mixer_heads=4), dict(mixer_fft_min_length=1),
                                   dict(kind="hybrid", n_heads=2), dict(kind="mixer_autoencoder")],
                         ids=["flat", "heads", "flat_fft", "hybrid", "autoencoder"])
def test_toeplitz_models_are_causal_and_run_any_length_up_to_n_ctx(extra):
    torch.manual_seed(0)
    cfg = {**dict(kind="mixer", d_model=32, n_layers=2, n_ctx=48, mixer_matrix="toeplitz"), **extra}
    model = build_model(cfg, 61).eval()
    ids = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        if cfg["kind"] != "mixer_autoencoder":
            changed = ids.clone()
            changed[:, 30] = (changed[:, 30] + 1) % 61
            after = model(changed).logits
            torch.testing.assert_close(after[:, :30], full[:, :30], rtol=1e-5, atol=1e-5)
            assert float((after[:, 30:] - full[:, 30:]).abs().max()) > 1e-3
            torch.testing.assert_close(model(ids[:, :17]).logits, full[:, :17], rtol=1e-5, atol=1e-5)


def test_a_general_and_a_toeplitz_mixer_agree_when_the_matrix_is_toeplitz():
    """The Toeplitz module is the general one restricted: copy T(k) into a general mixer's matrices
    and the two models give the same logits, on the sequence-first, batch-first and cached paths."""
    torch.manual_seed(0)
    base = dict(kind="mixer", d_model=32, n_layers=2, n_ctx=40)
    toeplitz = build_model({**base, "mixer_matrix": "toeplitz", "mixing_init": "uniform"}, 61).eval()
    general = build_model({**base, "mixer_layout": "dense"}, 61).eval()
    state = {k: v for k, v in toeplitz.state_dict().items() if not k.endswith("kernel")}
    for i, block in enumerate(toeplitz.blocks):
        state[f"blocks.{i}.token_mixing.weight"] = block.token_mixing.dense_weight().detach()
    general.load_state_dict(state)
    ids = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(toeplitz(ids).logits, general(ids).logits, rtol=1e-5, atol=1e-5)
        cache = toeplitz.init_cache(batch_size=3)
        steps = torch.cat([toeplitz.forward_step(ids[:, :7], cache), toeplitz.forward_step(ids[:, 7:], cache)], 1)
    torch.testing.assert_close(steps, general(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer_expansion=2), "toeplitz needs mixer_expansion=1"),
    (dict(mixing_init="position"), "position scales each matrix row"),
    (dict(mixer_matrix="general", mixing_init="kaiming"), "kaiming is the Toeplitz kernels' init"),
    (dict(mixer_matrix="circulant"), "mixer_matrix"),
])
def test_combinations_without_a_toeplitz_form_are_refused(overrides, message):
    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig

    args = [f"model.{k}={v}" for k, v in {"mixer_matrix": "toeplitz", **overrides}.items()]
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, [], args)


def test_flat_module_decodes_rows_in_linear_time_per_token():
    mixing = FlatToeplitzMixing(64)
    u = torch.randn(1, 64, 4)
    cache = mixing.init_cache(1, 4, torch.zeros)
    rows = [mixing.forward_step(u[:, t:t + 1], cache, t) for t in range(64)]
    torch.testing.assert_close(torch.cat(rows, 1), mixing(u), rtol=1e-5, atol=1e-5)
    # each new row reads one row of T(k) (n_ctx values), never the n_ctx x n_ctx matrix
    assert mixing.masked_weight(11, 11, 10).shape == (1, 11)


def test_a_long_toeplitz_bundle_loads_in_transformers_with_the_same_logits_on_the_fft_path(tmp_path):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmtrain.data.tokenizer import DEMO_TOKENIZER
    from mmtrain.export import bundle as B
    from mmtrain.export import hf as H

    transformers = H.import_transformers()
    from mmtrain.export.hf_modeling import TOEPLITZ_FFT_MIN_LENGTH

    assert TOEPLITZ_FFT_MIN_LENGTH == FFT_MIN_LENGTH
    torch.manual_seed(0)
    n_ctx = FFT_MIN_LENGTH + 76      # both sides take their FFT path on the whole input
    model = build_model(dict(kind="mixer", d_model=32, n_layers=2, n_ctx=n_ctx, mixer_heads=2,
                             mixer_matrix="toeplitz"), 4096).eval()
    B.write_bundle(model, tmp_path / "bundle", DEMO_TOKENIZER)
    loaded = B.load_pretrained(tmp_path / "bundle").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bundle", trust_remote_code=True,
                                                           local_files_only=True).eval()
    ids = torch.randint(0, 4096, (2, n_ctx), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
        generated = hf.generate(ids[:1, :20], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 25)


def test_a_toeplitz_mixer_trains_at_every_zero_stage_resumes_exports_evaluates_and_retrieves(demo_shards, tmp_path):
    """The FFT path (from length 16) in training under ZeRO 0-3, the same losses at every stage,
    an exact resume at ZeRO 3, the exported bundle's kernels, eval-lm at two lengths, the
    representation analysis and a short retrieval run from the bundle."""
    from conftest import TINY, pretrain_in_process, train_in_process, train_losses
    from mmtrain import cli
    from mmtrain.export import bundle as B
    from mmtrain.export.exporter import export
    from mmtrain.train.contrastive import ContrastiveTask
    from mmtrain.train.schema import RetrievalConfig

    def args(run_dir, *extra):
        return ["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={run_dir}", "train.steps=4",
                "train.eval_every=2", "checkpoint.every=2", "engine.peak_flops=1e11", "data.num_workers=0",
                "model.mixer_matrix=toeplitz", "model.mixer_heads=2", "model.mixer_fft_min_length=16", *extra]

    for stage in (0, 1, 2, 3):
        pretrain_in_process(args(tmp_path / f"z{stage}", f"engine.zero_stage={stage}"))
    losses = {stage: train_losses(tmp_path / f"z{stage}") for stage in (0, 1, 2, 3)}
    assert sorted(losses[0]) == [1, 2, 3, 4] and losses[0][4] < losses[0][1]
    for stage in (1, 2, 3):
        for step, loss in losses[0].items():
            assert losses[stage][step] == pytest.approx(loss, rel=1e-6, abs=1e-6), (stage, step)
    pretrain_in_process(args(tmp_path / "resumed", "engine.zero_stage=3", "train.stop_at=2"))
    pretrain_in_process(args(tmp_path / "resumed", "engine.zero_stage=3"))
    resumed = train_losses(tmp_path / "resumed")
    assert [resumed[s] for s in (3, 4)] == [losses[3][s] for s in (3, 4)]

    export(str(tmp_path / "z3"), str(tmp_path / "bundle"))
    stored = B.read_weights(tmp_path / "bundle")
    assert stored["blocks.0.token_mixing.mixing.kernel"].shape == (2, 32)     # the kernels, not n x n matrices
    assert not [name for name in stored if name.endswith("mixing.weight")]
    model = B.load_pretrained(tmp_path / "bundle")
    assert torch.equal(model.blocks[0].token_mixing.mixing.kernel.detach(), stored["blocks.0.token_mixing.mixing.kernel"])
    report = tmp_path / "eval.json"
    assert cli.main(["eval-lm", str(tmp_path / "bundle"), "--data", str(demo_shards), "--n-ctx", "16", "32",
                     "--max-sequences", "8", "--json", str(report)]) == 0
    results = {r["n_ctx"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {16, 32} and all(0 < r["loss"] < 9 for r in results.values())
    assert cli.main(["analyze-representation", str(tmp_path / "bundle"), "--text", "def f(x): return x + 1",
                     "--layers", "all", "--steps", "3"]) == 0

    assert cli.main(["prepare-pairs", "--config", str(TINY.parents[2] / "configs" / "pairs" / "demo.yaml"),
                     "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "pairs"), "n_ctx=0"]) == 0
    trainer = train_in_process(RetrievalConfig, ContrastiveTask, [TINY.parents[2] / "configs" / "retrieval" / "tiny.yaml"],
                               [f"retrieval.bundle={tmp_path / 'bundle'}", f"data.shard_dir={tmp_path / 'pairs'}",
                                f"logging.run_dir={tmp_path / 'ret'}", "train.steps=4", "train.eval_every=0",
                                "checkpoint.every=0", "engine.zero_stage=3"])
    assert trainer.step == 4
    assert cli.main(["export-embedder", str(tmp_path / "ret"), "--out", str(tmp_path / "embedder")]) == 0
    embedder = B.load_pretrained(tmp_path / "embedder")
    assert embedder.blocks[0].token_mixing.mixing.kernel.shape == (2, 32)


@pytest.mark.parametrize("fft_min_length", [0, 1], ids=["direct", "fft"])
def test_the_bidirectional_toeplitz_mixer_is_the_general_one_with_toeplitz_matrices(fft_min_length):
    """Both streams Toeplitz: the reverse one reads k_r[j - n] at j >= n + 2 (never n + 1), computed
    on the flipped sequence; copied into a general bidirectional mixer the logits agree."""
    torch.manual_seed(0)
    base = dict(kind="bidirectional_mixer", d_model=32, n_layers=2, n_ctx=24)
    toeplitz = build_model({**base, "mixer_matrix": "toeplitz", "mixing_init": "uniform",
                            "mixer_fft_min_length": fft_min_length}, 61).eval()
    general = build_model({**base, "mixer_layout": "dense"}, 61).eval()
    state = {k: v for k, v in toeplitz.state_dict().items() if not k.endswith("kernel")}
    for i, block in enumerate(toeplitz.blocks):
        state[f"blocks.{i}.token_mixing.weight"] = block.token_mixing.dense_weight().detach()
        reverse = block.reverse_mixing.dense_weight().detach()
        assert torch.count_nonzero(torch.triu(reverse, 2)) == torch.count_nonzero(reverse) > 0
        state[f"blocks.{i}.reverse_mixing.weight"] = reverse
    general.load_state_dict(state)
    ids = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = toeplitz(ids).logits
        torch.testing.assert_close(logits, general(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(toeplitz(ids[:, :13]).logits, general(ids[:, :13]).logits, rtol=1e-5, atol=1e-5)
        changed = ids.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 61
        after = toeplitz(changed).logits
    assert torch.allclose(after[:, 9], logits[:, 9], atol=1e-5)         # position 9 predicts token 10: blind to it
    assert float((after[:, 8] - logits[:, 8]).abs().max()) > 1e-4       # position 8 reads token 10 (n + 2)
