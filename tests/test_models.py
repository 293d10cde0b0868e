"""Behaviour of the language models: causality, masking, variable length, sizes, FLOPs, loss,
and numerical equality of the Llama baseline with Hugging Face's LlamaForCausalLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmtrain.models.schema import ModelConfig
from mmtrain.models import LlamaLM, MaskedMixerLM, build_model
from mmtrain.models.mixer import CausalMixingMatrix, MaskedMixingMatrix

MIXING = (MaskedMixingMatrix, CausalMixingMatrix)

VOCAB = 61
N_CTX = 32

MIXERS = {
    "flat": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX),
    "multi_head": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_heads=4),
    "expanded": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_expansion=3),
}
TRANSFORMERS = {
    "llama": dict(kind="transformer", d_model=64, n_layers=2, n_ctx=N_CTX, n_heads=4),
    "llama_gqa": dict(kind="transformer", d_model=64, n_layers=2, n_ctx=N_CTX, n_heads=4, n_kv_heads=2),
}
ALL_MODELS = {**MIXERS, **TRANSFORMERS}


def make(cfg: dict, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model({**cfg, **overrides}, VOCAB).eval()


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    """Zero-init biases, unit norms and zeroed dead mixing entries hide bugs: randomise them, so
    causality must come from the mask applied in forward, not from the init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, MIXING):
                dead = module.masked_entries()
                module.mixing_parameter[dead] = torch.randn(int(dead.sum()))


# --------------------------------------------------------------------------------------------
# Causality and the mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_future_tokens_do_not_change_past_logits(name):
    model = make(ALL_MODELS[name])
    perturb(model)
    tokens = random_tokens(3, N_CTX)
    for t in (0, 7, N_CTX - 2):
        changed = tokens.clone()
        offset = 1 + torch.randint(0, VOCAB - 1, (3, N_CTX - t - 1))   # never 0 mod VOCAB
        changed[:, t + 1:] = (tokens[:, t + 1:] + offset) % VOCAB
        with torch.no_grad():
            before, after = model(tokens).logits, model(changed).logits
        # Exact: masked entries contribute exact zeros (mixer) / exp(-inf) = 0 (SDPA).
        assert torch.equal(before[:, :t + 1], after[:, :t + 1]), name
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def expected_masks(model) -> dict:
    """The causal mask of every token-mixing matrix, written out independently of the model."""
    masks = {}
    e = model.config_dict["mixer_expansion"]
    for name, module in model.named_modules():
        if not isinstance(module, MIXING):
            continue
        n_out, n_in = module.dense_weight().shape[-2:]
        out_pos = torch.arange(n_out)[:, None]
        in_pos = torch.arange(n_in)[None, :]
        if name.endswith("expand"):      # hidden row r belongs to position r // e
            masks[name] = in_pos <= out_pos // e
        elif name.endswith("contract"):
            masks[name] = in_pos // e <= out_pos
        else:
            masks[name] = in_pos <= out_pos
    assert masks, "no token-mixing matrices found"
    return masks


@pytest.mark.parametrize("layout", ["packed", "dense"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_masked_half_of_token_mixing_gets_exactly_zero_gradient(name, layout):
    model = make(MIXERS[name], mixer_layout=layout).train()
    masks = expected_masks(model)
    expected_counts = {"flat": 2, "multi_head": 2, "expanded": 4}
    assert len(masks) == expected_counts[name]
    for module_name, mask in masks.items():
        module = model.get_submodule(module_name)
        dense = module.dense_weight().detach()
        assert torch.count_nonzero(dense[~mask.expand_as(dense)]) == 0, "dead entries are zero at init"
        assert torch.count_nonzero(module.mixing_parameter.detach()[module.masked_entries()]) == 0
    perturb(model)
    tokens = random_tokens(4, N_CTX)
    model(tokens, labels=tokens).loss.backward()
    for module_name, mask in masks.items():
        module = model.get_submodule(module_name)
        dead, grad = module.masked_entries(), module.mixing_parameter.grad
        assert torch.count_nonzero(grad[dead]) == 0, module_name
        assert torch.count_nonzero(grad[~dead]) > 0.9 * (~dead).sum(), module_name


@pytest.mark.parametrize("layout", ["packed", "dense"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_values_in_masked_entries_have_no_effect_and_are_not_overwritten(name, layout):
    """The mask is applied in forward: forward never writes into the weights (ZeRO-3 safe)."""
    model = make(MIXERS[name], mixer_layout=layout)
    tokens = random_tokens(2, N_CTX)
    with torch.no_grad():
        reference = model(tokens).logits
        masks = expected_masks(model)
        for module_name in masks:
            module = model.get_submodule(module_name)
            module.mixing_parameter[module.masked_entries()] = 5.0
        perturbed = model(tokens).logits
    assert torch.equal(reference, perturbed)
    for module_name, mask in masks.items():
        module = model.get_submodule(module_name)
        assert (module.mixing_parameter[module.masked_entries()] == 5.0).all()
        dense = module.dense_weight()
        assert torch.count_nonzero(dense[~mask.expand_as(dense)]) == 0


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_short_input_equals_prefix_of_full_context_input(name):
    model = make(ALL_MODELS[name])
    perturb(model)
    full = random_tokens(2, N_CTX)
    with torch.no_grad():
        long_logits = model(full).logits
        short_logits = model(full[:, :20]).logits
        short_hidden = model.hidden_states(full[:, :20])
    assert short_logits.shape == (2, 20, VOCAB)
    assert short_hidden.shape == (2, 20, model.d_model)
    torch.testing.assert_close(short_logits, long_logits[:, :20], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_logits_are_lm_head_of_hidden_states_and_bf16_runs(name):
    model = make(ALL_MODELS[name])
    tokens = random_tokens(2, N_CTX)
    with torch.no_grad():
        hidden = model.hidden_states(tokens)
        out = model(tokens, labels=tokens)
        assert torch.equal(model.lm_head(hidden), out.logits)
        low = model.to(torch.bfloat16)(tokens, labels=tokens)
    assert low.logits.dtype == torch.bfloat16 and low.loss.dtype == torch.float32
    assert abs(low.loss.item() - out.loss.item()) < 0.05


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_runs_with_bf16_parameters_beside_fp32_mask_buffers(name):
    """DeepSpeed's bf16 mode casts only the parameters; the non-persistent masks stay fp32."""
    model = make(MIXERS[name])
    tokens = random_tokens(2, N_CTX)
    with torch.no_grad():
        reference = model(tokens).logits
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert all(m.mask.dtype == torch.float32 for m in model.modules() if isinstance(m, MaskedMixingMatrix))
        logits = model(tokens).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.1


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_input_longer_than_n_ctx_raises(name):
    model = make(ALL_MODELS[name])
    with pytest.raises(ValueError, match="n_ctx=32"):
        model(random_tokens(1, N_CTX + 1))


# --------------------------------------------------------------------------------------------
# Sizes and FLOPs
# --------------------------------------------------------------------------------------------


def mixer_param_count(d, n_layers, n_ctx, vocab, heads=0, expansion=1, ffn_mult=4, final_norm=False, tied=False):
    mlp = 2 * ffn_mult * d * d + ffn_mult * d + d
    if heads:
        mixing = 2 * (d * d + d) + heads * (n_ctx * n_ctx + n_ctx)
    elif expansion > 1:
        mixing = 2 * expansion * n_ctx * n_ctx + expansion * n_ctx + n_ctx
    else:
        mixing = n_ctx * n_ctx + n_ctx
    block = mlp + mixing + 4 * d
    return vocab * d + n_layers * block + (2 * d if final_norm else 0) + (0 if tied else vocab * d)


def llama_param_count(d, n_layers, vocab, n_heads, n_kv_heads, intermediate, tied=False):
    kv_width = n_kv_heads * (d // n_heads)
    layer = 2 * d * d + 2 * d * kv_width + 3 * d * intermediate + 2 * d
    return vocab * d + n_layers * layer + d + (0 if tied else vocab * d)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("final_norm", [False, True])
def test_flat_mixer_param_count_matches_closed_form(tied, final_norm):
    d, n, T, V = 32, 2, N_CTX, VOCAB
    per_block = 8 * d * d + 5 * d + T * T + T + 4 * d
    expected = V * d + n * per_block + (2 * d if final_norm else 0) + (0 if tied else V * d)
    model = make(MIXERS["flat"], tie_embeddings=tied, final_norm=final_norm)
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - (0 if tied else V * d)
    assert (model.lm_head.weight is model.wte.weight) == tied


@pytest.mark.parametrize("tied", [False, True])
def test_multi_head_expanded_and_narrow_mlp_mixer_param_counts(tied):
    count = lambda **kw: mixer_param_count(32, 2, N_CTX, VOCAB, tied=tied, **kw)  # noqa: E731
    assert make(MIXERS["multi_head"], tie_embeddings=tied).num_params() == count(heads=4)
    assert make(MIXERS["expanded"], tie_embeddings=tied).num_params() == count(expansion=3)
    assert make(MIXERS["flat"], tie_embeddings=tied, ffn_mult=2).num_params() == count(ffn_mult=2)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_llama_param_count_matches_closed_form(tied, n_kv_heads):
    model = make(TRANSFORMERS["llama"], n_kv_heads=n_kv_heads, tie_embeddings=tied)
    assert model.num_params() == llama_param_count(64, 2, VOCAB, 4, n_kv_heads or 4, 256, tied=tied)
    model = make(TRANSFORMERS["llama"], intermediate_size=96)
    assert model.num_params() == llama_param_count(64, 2, VOCAB, 4, 4, 96)


def test_paper_model_sizes():
    """The paper's parameter table (untied, no final norm for the mixer), built on the meta device."""
    with torch.device("meta"):
        mixer512 = build_model(dict(kind="mixer", d_model=512, n_layers=8, n_ctx=512, final_norm=False), 4096)
        mixer1024 = build_model(dict(kind="mixer", d_model=1024, n_layers=8, n_ctx=512, final_norm=False), 4096)
        llama512 = build_model(dict(kind="transformer", d_model=512, n_layers=8, n_ctx=512, n_heads=4), 4096)
    assert mixer512.num_params() == 23_109_632 == mixer_param_count(512, 8, 512, 4096, final_norm=False)
    assert mixer1024.num_params() == 77_672_448 == mixer_param_count(1024, 8, 512, 4096, final_norm=False)
    assert llama512.num_params() == 37_757_440 == llama_param_count(512, 8, 4096, 4, 4, 2048)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_follow_documented_formulas(tied):
    d, n, V, L = 32, 2, VOCAB, 24
    mlp = 2 * 4 * d * d
    flat = make(MIXERS["flat"], tie_embeddings=tied)
    # token mixing counts the lower triangle: d * (L + 1) forward FLOPs per token and layer
    assert flat.flops_per_token(L) == 6 * (n * mlp + V * d) + 3 * n * d * (L + 1)
    assert flat.flops_per_token() == 6 * (n * mlp + V * d) + 3 * n * d * (N_CTX + 1)
    heads = make(MIXERS["multi_head"], tie_embeddings=tied)
    assert heads.flops_per_token(L) == 6 * (n * (mlp + 2 * d * d) + V * d) + 3 * n * d * (L + 1)
    expanded = make(MIXERS["expanded"], tie_embeddings=tied)
    assert expanded.flops_per_token(L) == 6 * (n * mlp + V * d) + 3 * n * 2 * 3 * d * (L + 1)
    d, kv_width, inter = 64, 2 * 16, 256
    llama = make(TRANSFORMERS["llama_gqa"], tie_embeddings=tied)
    matmul = n * (2 * d * d + 2 * d * kv_width + 3 * d * inter) + V * d
    assert llama.flops_per_token(L) == 6 * matmul + 6 * n * d * (L + 1)  # causal half of attention


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flat", "llama"])
def test_loss_is_shifted_cross_entropy_ignoring_pads_and_masked_positions(name):
    model = make(ALL_MODELS[name])
    tokens = random_tokens(3, 16)
    labels = tokens.clone()
    labels[0, 10:] = -100                     # right padding marked by the caller
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, 12:] = 0                # padding known only through the mask
    out = model(tokens, labels=labels, attention_mask=attention_mask)
    assert model(tokens).loss is None
    log_probs = F.log_softmax(out.logits.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(15):                   # position t predicts token t + 1
            target = labels[b, t + 1].item()
            if target == -100 or attention_mask[b, t + 1] == 0:
                continue
            total -= log_probs[b, t, target].item()
            count += 1
    assert count == 3 * 15 - 6 - 4
    assert out.loss.item() == pytest.approx(total / count, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Hugging Face equivalence of the Llama baseline
# --------------------------------------------------------------------------------------------


def hf_llama_classes():
    pytest.importorskip("transformers")
    from mmtrain.export.hf import llama_classes

    return llama_classes()


@pytest.mark.parametrize("name,tied", [("llama", False), ("llama_gqa", False), ("llama_gqa", True)])
def test_llama_matches_hugging_face_logits(name, tied):
    LlamaConfig, LlamaForCausalLM = hf_llama_classes()
    ours = make(TRANSFORMERS[name], tie_embeddings=tied, norm_eps=1e-6, rope_theta=500.0)
    perturb(ours)
    hf = LlamaForCausalLM(LlamaConfig(**ours.hf_config_dict(), attn_implementation="eager")).eval()
    assert set(hf.state_dict()) == set(ours.state_dict())
    hf.load_state_dict(ours.state_dict(), strict=True)
    tokens = random_tokens(2, 27)
    with torch.no_grad():
        hf_out = hf(tokens, output_hidden_states=True)
        our_logits = ours(tokens).logits
        our_hidden = ours.hidden_states(tokens)
    torch.testing.assert_close(our_logits, hf_out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_hidden, hf_out.hidden_states[-1], rtol=0, atol=1e-5)
    assert hf.config.num_key_value_heads == ours.n_kv_heads


# --------------------------------------------------------------------------------------------
# Building from configs
# --------------------------------------------------------------------------------------------


def test_build_model_accepts_dictconfig_dataclass_and_dict():
    as_dataclass = ModelConfig(kind="mixer", d_model=32, n_layers=2, n_ctx=16, mixer_heads=2)
    as_dictconfig = OmegaConf.structured(as_dataclass)
    for cfg in (as_dataclass, as_dictconfig, OmegaConf.to_container(as_dictconfig)):
        model = build_model(cfg, VOCAB)
        assert isinstance(model, MaskedMixerLM)
        assert model.config_dict["vocab_size"] == VOCAB
        assert model.config_dict["mixer_heads"] == 2
    # config_dict rebuilds the same model (what export relies on)
    torch.manual_seed(0)
    rebuilt = build_model(model.config_dict)
    rebuilt.load_state_dict(model.state_dict())
    tokens = random_tokens(2, 16)
    assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)
    assert isinstance(build_model(ModelConfig(kind="transformer", d_model=32, n_heads=2), 100), LlamaLM)


def test_build_model_vocab_size_rules():
    cfg = dict(kind="mixer", d_model=16, n_layers=1, n_ctx=8)
    assert build_model(cfg, 50).vocab_size == 50
    assert build_model({**cfg, "vocab_size": 50}, 50).vocab_size == 50
    assert build_model({**cfg, "vocab_size": 50}).vocab_size == 50
    with pytest.raises(ValueError, match=r"vocab_size=50.*vocab_size=60"):
        build_model({**cfg, "vocab_size": 50}, 60)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(cfg)


def test_build_model_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model(dict(kind="rnn"), 10)
    with pytest.raises(ValueError, match="d_mdoel"):
        build_model(dict(kind="mixer", d_mdoel=16), 10)
    with pytest.raises(ValueError, match="mixer_heads"):
        build_model(dict(kind="mixer", d_model=30, mixer_heads=4), 10)
    with pytest.raises(ValueError, match="kind"):
        MaskedMixerLM(dict(kind="transformer"), 10)


def test_importing_models_does_not_import_deepspeed_or_transformers():
    code = ("import sys, mmtrain.models; "
            "bad = [m for m in ('deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("impl", ["dense", "triangular"])
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_parameter_is_used_inside_its_own_modules_call(name, impl):
    """ZeRO-3 gathers a module's parameters in its forward pre-hook and releases them after. Here
    every module's own parameters are empty except while that module's __call__ runs (as ZeRO-3
    partitions them), so a forward that reached into another module's weights would fail."""
    model = make(ALL_MODELS[name], mixer_impl=impl) if name in MIXERS else make(ALL_MODELS[name])
    ids = random_tokens(2, 24)
    expected = model(ids).logits
    full = {p: p.data for p in model.parameters()}
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]

    def gather(module, *_):
        for p in module.parameters(recurse=False):
            p.data = full[p]

    def release(module, *_):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    handles = []
    for m in owners:
        handles += [m.register_forward_pre_hook(gather), m.register_forward_hook(release)]
        release(m)
    try:
        partitioned = model(ids).logits
    finally:
        for h in handles:
            h.remove()
        for p, data in full.items():
            p.data = data
    assert torch.equal(partitioned, expected)
