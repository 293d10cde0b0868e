"""The paper's model variants: the transformer + mixer hybrid (both modes), the bidirectional mixer
and the mixer autoencoder. What each may see (exact, with perturbed weights), their losses, sizes and
FLOPs, the export -> load round trip, generate's refusals, and one real training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmtrain.export import bundle as B
from mmtrain.cli import main as cli_main
from mmtrain.config import ConfigError
from mmtrain.eval.generate import generate
from mmtrain.models import build_model, causal_lm_loss
from mmtrain.models.bidirectional import ReverseTokenMixing
from mmtrain.models.mixer import CausalMixingMatrix, MaskedMixingMatrix
from mmtrain.models.transformer import rotary_cos_sin
from mmtrain.data.tokenizer import DEMO_TOKENIZER

from conftest import TINY, pretrain_in_process, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61
N_CTX = 16
HYBRIDS = {
    "sequential": dict(kind="hybrid", d_model=32, n_layers=2, n_ctx=N_CTX, n_heads=4, hybrid_mode="sequential"),
    "parallel": dict(kind="hybrid", d_model=32, n_layers=2, n_ctx=N_CTX, n_heads=4, n_kv_heads=2,
                     hybrid_mode="parallel"),
}
BIDIRECTIONAL = dict(kind="bidirectional_mixer", d_model=32, n_layers=2, n_ctx=N_CTX)
AUTOENCODER = dict(kind="mixer_autoencoder", d_model=32, n_layers=2, encoder_layers=2, decoder_layers=3,
                   compression=4, n_ctx=N_CTX)
VARIANTS = {"hybrid": HYBRIDS["sequential"], "hybrid_parallel": HYBRIDS["parallel"],
            "bidirectional_mixer": BIDIRECTIONAL, "mixer_autoencoder": AUTOENCODER}


def make(cfg: dict, vocab: int = VOCAB, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model({**cfg, **overrides}, vocab).eval()
    perturb(model)
    return model


def perturb(model) -> None:
    """Random norms/biases and garbage in every masked-out entry: what a model may see must come
    from the masks applied in forward, not from a friendly init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, (MaskedMixingMatrix, CausalMixingMatrix)):
                dead = module.masked_entries()
                module.mixing_parameter[dead] = torch.randn(int(dead.sum()))


def random_tokens(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def changed_at(tokens: torch.Tensor, positions) -> torch.Tensor:
    """tokens with every given position set to a different token."""
    out = tokens.clone()
    out[:, positions] = (tokens[:, positions] + 1 + torch.randint(0, VOCAB - 1, out[:, positions].shape)) % VOCAB
    return out


# --------------------------------------------------------------------------------------------
# Hybrid (transfixer)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(HYBRIDS))
def test_hybrid_future_tokens_do_not_change_past_logits(mode):
    model = make(HYBRIDS[mode])
    tokens = random_tokens(3, N_CTX)
    for t in (0, 6, N_CTX - 2):
        changed = changed_at(tokens, list(range(t + 1, N_CTX)))
        with torch.no_grad():
            before, after = model(tokens).logits, model(changed).logits
        assert torch.equal(before[:, :t + 1], after[:, :t + 1]), (mode, t)
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("mode", list(HYBRIDS))
def test_hybrid_layer_adds_masked_token_mixing_of_the_attention_output_or_of_the_normed_input(mode):
    model = make(HYBRIDS[mode])
    layer = model.model.layers[0]
    h = torch.randn(2, 10, 32)
    from mmtrain.models.transformer import rotary_cos_sin

    cos, sin = rotary_cos_sin(10, model.head_dim, model.rope_theta, h.device, h.dtype)
    u = layer.input_layernorm(h)
    a = layer.self_attn(u, cos, sin)
    mixing_input = a if mode == "sequential" else u   # the other one must not be what is mixed
    expected = h + a + layer.token_mixing(mixing_input)
    expected = expected + layer.mlp(layer.post_attention_layernorm(expected))
    with torch.no_grad():
        assert torch.allclose(layer(h, cos, sin), expected, atol=1e-5)


@pytest.mark.parametrize("mode", list(HYBRIDS))
def test_hybrid_incremental_decoding_equals_full_forward_and_generates(mode):
    model = make(HYBRIDS[mode])
    tokens = random_tokens(2, N_CTX)
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.init_cache(2)
        steps = [model.forward_step(tokens[:, :5], cache), model.forward_step(tokens[:, 5:9], cache)]
        steps += [model.forward_step(tokens[:, t:t + 1], cache) for t in range(9, N_CTX)]
    assert cache.length == N_CTX
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    prompt = tokens[0, :4].tolist()
    cached = generate(model, prompt, 20, temperature=0, eos_id=None)
    uncached = generate(model, prompt, 20, temperature=0, eos_id=None, use_cache=False)
    assert cached.tokens == uncached.tokens and len(cached.tokens) == N_CTX - 4
    assert cached.stop_reason == "n_ctx"


# --------------------------------------------------------------------------------------------
# Bidirectional mixer
# --------------------------------------------------------------------------------------------


def embedding_gradient(model, tokens: torch.Tensor, position: int) -> torch.Tensor:
    """|d logits[:, position] / d embeddings| summed over batch and width: [L] per input position."""
    captured = {}

    def keep(_, __, output):
        output.retain_grad()
        captured["e"] = output

    handle = model.embedding.register_forward_hook(keep)
    try:
        model(tokens).logits[:, position].sum().backward()
    finally:
        handle.remove()
    return captured["e"].grad.abs().sum(dim=(0, 2))


def test_bidirectional_logit_at_n_never_sees_token_n_plus_1_but_sees_every_other_token():
    model = make(BIDIRECTIONAL)
    tokens = random_tokens(2, N_CTX)
    for n in range(N_CTX):
        grad = embedding_gradient(model, tokens, n)
        for m in range(N_CTX):
            if m == n + 1:
                assert grad[m] == 0, (n, m)      # exactly: masked entries contribute exact zeros
            else:
                assert grad[m] > 0, (n, m)
    with torch.no_grad():
        before = model(tokens).logits
        for n in (0, 5, N_CTX - 2):
            assert torch.equal(model(changed_at(tokens, [n + 1])).logits[:, n], before[:, n])
            if n + 2 < N_CTX:
                assert not torch.allclose(model(changed_at(tokens, [n + 2])).logits[:, n], before[:, n])
            assert not torch.allclose(model(changed_at(tokens, [n])).logits[:, n], before[:, n])


def test_bidirectional_loss_is_the_shifted_next_token_cross_entropy():
    model = make(BIDIRECTIONAL)
    tokens = random_tokens(2, N_CTX)
    out = model(tokens, labels=tokens)
    assert model.label_shift == 1
    assert torch.equal(out.loss, causal_lm_loss(out.logits, tokens))


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_reverse_mixing_is_shifted_triu_and_its_masked_half_gets_exactly_zero_gradient(layout):
    model = make(BIDIRECTIONAL, mixer_layout=layout).train()
    mixers = [m for m in model.modules() if isinstance(m, ReverseTokenMixing)]
    assert len(mixers) == 2
    rows, cols = torch.arange(N_CTX)[:, None], torch.arange(N_CTX)[None, :]
    live = cols >= rows + 2
    for module in mixers:
        weight = module.dense_weight().detach()
        assert torch.count_nonzero(weight[~live]) == 0 and torch.count_nonzero(weight[live]) == live.sum()
    # forward equals the written-out sum over inputs m >= n + 2 (length 12 < n_ctx: top-left block)
    u = torch.randn(2, 12, 8)
    module = mixers[0]
    weight = module.dense_weight().detach()
    expected = torch.stack([sum((weight[n, m] * u[:, m] for m in range(n + 2, 12)), torch.zeros(2, 8))
                            + module.bias[n] for n in range(12)], dim=1)
    assert torch.allclose(module(u), expected, atol=1e-6)
    tokens = random_tokens(4, N_CTX)
    model(tokens, labels=tokens).loss.backward()
    for module in mixers:
        dead, grad = module.masked_entries(), module.mixing_parameter.grad
        assert torch.count_nonzero(grad[dead]) == 0
        assert torch.count_nonzero(grad[~dead]) > 0.9 * (~dead).sum()


# --------------------------------------------------------------------------------------------
# Mixer autoencoder
# --------------------------------------------------------------------------------------------


def test_autoencoder_decoder_is_causal_over_its_input():
    model = make(AUTOENCODER)
    h = torch.randn(2, N_CTX, 32)
    with torch.no_grad():
        before = model.decoder_hidden_states(h)
        for t in (0, 7, N_CTX - 2):
            changed = h.clone()
            changed[:, t + 1:] += torch.randn_like(changed[:, t + 1:])
            after = model.decoder_hidden_states(changed)
            assert torch.equal(before[:, :t + 1], after[:, :t + 1]), t
            assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_autoencoder_output_depends_on_the_input_only_through_the_embedding():
    model = make(AUTOENCODER)
    a, b = random_tokens(2, N_CTX, seed=1), random_tokens(2, N_CTX, seed=2)
    with torch.no_grad():
        e_a, e_b = model.encode(a), model.encode(b)
        assert e_a.shape == (2, 32) and not torch.allclose(e_a, e_b)
        assert not torch.allclose(model.encode(changed_at(a, [0])), e_a)    # e reads the first token too
        assert torch.equal(model(a).logits, model.lm_head(model.decode(e_a, N_CTX)))
        # Swap in b's embedding while running a: the output is b's, whatever a's tokens were.
        handle = model.bottleneck.register_forward_hook(lambda *_: e_b)
        try:
            swapped = model(a).logits
        finally:
            handle.remove()
        assert torch.equal(swapped, model(b).logits)


def test_autoencoder_loss_is_the_unshifted_reconstruction_cross_entropy():
    model = make(AUTOENCODER)
    tokens = random_tokens(3, 12)
    labels = tokens.clone()
    labels[0, 3] = -100
    mask = torch.ones_like(tokens)
    mask[2, 9:] = 0
    with torch.no_grad():
        out = model(tokens, labels=labels, attention_mask=mask)
    log_probs = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [-log_probs[b, t, tokens[b, t]] for b in range(3) for t in range(12)
             if labels[b, t] != -100 and mask[b, t] == 1]
    assert len(terms) == 3 * 12 - 1 - 3
    assert model.label_shift == 0
    assert float(out.loss) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Sizes, FLOPs, configuration
# --------------------------------------------------------------------------------------------


def test_parameter_counts_and_flops_extend_the_base_models_by_the_variant_parts():
    d, layers, n, length = 32, 2, N_CTX, 12
    llama = build_model(dict(kind="transformer", d_model=d, n_layers=layers, n_ctx=n, n_heads=4), VOCAB)
    hybrid = build_model(HYBRIDS["sequential"], VOCAB)
    flat_mixing = hybrid.model.layers[0].token_mixing.forward_flops_per_token(length, d)   # the mixer's count
    assert flat_mixing > 0
    assert hybrid.num_params() == llama.num_params() + layers * (n * n + n)
    assert hybrid.flops_per_token(length) == llama.flops_per_token(length) + 3 * layers * flat_mixing

    mixer = build_model(dict(kind="mixer", d_model=d, n_layers=layers, n_ctx=n), VOCAB)
    bidirectional = build_model(BIDIRECTIONAL, VOCAB)
    assert bidirectional.num_params() == mixer.num_params() + layers * (n * n + n + 2 * d)
    mlp = layers * 2 * 4 * d * d
    reverse_live = (length - 1) * (length - 2) / 2          # entries m >= n + 2 of an L x L matrix
    assert bidirectional.flops_per_token(length) == pytest.approx(
        mixer.flops_per_token(length) + 6 * mlp + 3 * layers * 2 * d * reverse_live / length)

    ae = build_model(AUTOENCODER, VOCAB)
    mixer5 = build_model(dict(kind="mixer", d_model=d, n_layers=5, n_ctx=n), VOCAB)
    bottleneck = 2 * d * (d // 4) + d // 4 + d
    assert ae.num_params() == mixer5.num_params() + bottleneck
    assert ae.flops_per_token(length) == pytest.approx(
        mixer5.flops_per_token(length) + 6 * 2 * d * (d // 4) / length)


@pytest.mark.parametrize("overrides, message", [
    (dict(kind="hybrid", hybrid_mode="interleaved"), "hybrid_mode"),
    (dict(kind="hybrid", d_model=32, n_heads=3), "n_heads"),
    (dict(kind="bidirectional_mixer", mixer_heads=2), "flat token mixing only"),
    (dict(kind="mixer_autoencoder", d_model=32, compression=5), "compression: must be >= 1 and divide d_model 32"),
    (dict(kind="mixer_autoencoder", encoder_layers=-1), "encoder_layers: must be >= 0"),
])
def test_bad_variant_settings_are_rejected_before_building(overrides, message):
    cfg = {**dict(d_model=32, n_layers=2, n_ctx=N_CTX), **overrides}
    with pytest.raises(ValueError, match=message):
        build_model(cfg, VOCAB)


def test_variant_keys_load_from_yaml_overrides():
    from mmtrain.config import load_config
    from mmtrain.train.schema import PretrainConfig

    cfg = load_config(PretrainConfig, [str(TINY)], ["model.kind=hybrid", "model.hybrid_mode=parallel"])
    assert build_model(cfg.model, VOCAB).model.layers[0].mode == "parallel"
    with pytest.raises(ConfigError, match="hybrid_mode"):
        load_config(PretrainConfig, [str(TINY)], ["model.kind=hybrid", "model.hybrid_mode=interleaved"])


# --------------------------------------------------------------------------------------------
# Bundles and generate
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_bundles(tmp_path_factory):
    """{name: (model, bundle_dir)} for every variant, written the way `mmtrain export` writes them."""
    base = tmp_path_factory.mktemp("variant_bundles")
    out = {}
    for name, cfg in VARIANTS.items():
        model = make(cfg, vocab=4096, d_model=16, n_heads=2, n_kv_heads=0, tie_embeddings=name == "hybrid")
        B.write_bundle(model, base / name, DEMO_TOKENIZER)
        out[name] = (model, base / name)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_and_load_round_trip_gives_identical_logits(name, variant_bundles):
    model, bundle = variant_bundles[name]
    loaded = B.load_pretrained(bundle)
    assert type(loaded) is type(model) and loaded.config_dict == model.config_dict
    config = json.loads((bundle / B.CONFIG_NAME).read_text())["mmtrain"]
    assert config["model"]["kind"] == model.kind and config["num_params"] == model.num_params()
    tokens = random_tokens(2, N_CTX, vocab=4096)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
        assert torch.equal(loaded(tokens[:, :9]).logits, model(tokens[:, :9]).logits)
    for tensor_name, info in config["tensors"].items():
        assert info["description"], f"{tensor_name} has no description in config.json"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_card_describes_the_variant_and_offers_only_what_works(name, variant_bundles):
    model, bundle = variant_bundles[name]
    card = (bundle / B.CARD_NAME).read_text()
    title = {"hybrid": "transformer + masked mixer hybrid", "hybrid_parallel": "transformer + masked mixer hybrid",
             "bidirectional_mixer": "bidirectional masked mixer", "mixer_autoencoder": "masked mixer autoencoder"}
    assert card.startswith(f"# {title.get(name, name)}:"), card.splitlines()[0]
    assert "LlamaForCausalLM.from_pretrained" not in card
    assert ("mmtrain generate" in card) == (model.kind == "hybrid")
    assert "mmtrain eval-lm" in card


def test_reverse_mixing_weights_are_stored_masked(variant_bundles):
    from safetensors.torch import load_file

    model, bundle = variant_bundles["bidirectional_mixer"]
    stored = load_file(str(bundle / B.WEIGHTS_NAME))
    weight = stored["blocks.0.reverse_mixing.weight"]                 # dense, masked (triu 2)
    dead = ~torch.ones(weight.shape, dtype=torch.bool).triu(2)
    assert torch.count_nonzero(weight[dead]) == 0
    assert torch.equal(weight[~dead], model.blocks[0].reverse_mixing.dense_weight().detach()[~dead])
    assert "blocks.0.reverse_mixing.packed_weight" in model.state_dict()   # trained packed


@pytest.mark.parametrize("name, reason", [("bidirectional_mixer", "reads tokens after the position"),
                                          ("mixer_autoencoder", "reconstructs its whole input")])
def test_generate_refuses_bidirectional_and_autoencoder_bundles(name, reason, variant_bundles, capsys):
    model, bundle = variant_bundles[name]
    assert cli_main(["generate", str(bundle), "--prompt", "Return the", "--max-new-tokens", "3"]) == 2
    captured = capsys.readouterr()
    assert f"cannot generate with model.kind={name!r}" in captured.err and reason in captured.err
    assert captured.out == ""
    with pytest.raises(ValueError, match=reason):
        generate(model, [3, 5, 7], 3)


def test_generate_command_runs_the_hybrid_bundle_cached_and_uncached(variant_bundles, capsys):
    _, bundle = variant_bundles["hybrid"]
    args = ["generate", str(bundle), "--prompt", "Return", "--temperature", "0", "--ignore-eos"]
    assert cli_main(args) == 0
    cached = capsys.readouterr()
    assert cli_main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert cached.out == uncached.out and len(cached.out) > len("Return\n")
    assert f"reached the model's n_ctx={N_CTX} tokens" in cached.err


# --------------------------------------------------------------------------------------------
# One real run: the autoencoder through pretrain.py (DeepSpeed), export and eval-lm
# --------------------------------------------------------------------------------------------


def test_autoencoder_trains_exports_and_eval_lm_reports_its_reconstruction_loss(demo_shards, tmp_path):
    from mmtrain.eval.lm import eval_lm, read_blocks
    from mmtrain.export.exporter import export

    run_dir = tmp_path / "run"
    pretrain_in_process(["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={run_dir}",
                         "model.kind=mixer_autoencoder", "model.compression=2", "train.steps=8", "train.lr=1e-2",
                         "train.eval_every=0", "train.eval_batches=2", "train.eval_n_ctx=[]", "checkpoint.every=8",
                         "engine.zero_stage=0", "engine.peak_flops=1e11"])
    metrics = read_metrics(run_dir)
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    trainer_eval = [r["eval_loss_ctx32"] for r in metrics if "eval_loss_ctx32" in r][-1]

    export(str(run_dir), str(tmp_path / "bundle"))
    report = eval_lm(str(tmp_path / "bundle"), str(demo_shards), [32], max_sequences=8)
    result = report["results"][0]
    assert report["model"] == "mixer_autoencoder"
    assert result["tokens"] == 8 * 32                      # unshifted: every token is a target
    # the trainer evaluated the same first 2 x 4 validation blocks with the model's own loss
    assert result["loss"] == pytest.approx(trainer_eval, rel=1e-5)
    model = B.load_pretrained(tmp_path / "bundle")
    tok = B.load_bundle_tokenizer(tmp_path / "bundle")
    ids = torch.cat([b for b, _ in read_blocks(str(demo_shards), 32, "val", 4, tok.sha256, 4096, 8)])
    with torch.no_grad():
        by_hand = F.cross_entropy(model(ids).logits.reshape(-1, 4096), ids.reshape(-1))
    assert result["loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_hybrid_runs_its_first_k_blocks_for_representation_analysis(mode):
    model = make(HYBRIDS[mode])
    tokens = random_tokens(2, N_CTX)
    with torch.no_grad():
        embeddings = model.embedding(tokens)
        assert torch.allclose(model.model.norm(model.block_outputs(embeddings, model.num_blocks)),
                              model.hidden_states(tokens), atol=1e-6)
        cos, sin = rotary_cos_sin(N_CTX, model.head_dim, model.rope_theta, embeddings.device, embeddings.dtype)
        assert torch.equal(model.block_outputs(embeddings, 1), model.model.layers[0](embeddings, cos, sin))
