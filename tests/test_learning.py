"""Models that learn: the initialisation keys, and a regression test for the unigram plateau.

The regression test trains tiny models on a synthetic language that can only be predicted from
context: a Markov chain over 64 tokens whose next token is a fixed permutation of the current one
with probability 0.7, else a Zipf-distributed draw. Its unigram entropy (the loss of any model
that ignores context, and where a model whose current-token signal is buried stalls) is ~3.85
nats; the chain's conditional entropy is ~1.7. A mixer whose embedding starts at N(0, 0.02)
(the `gpt` scheme) stays within ~0.1 nat of the unigram entropy for these 60 steps; every model
here, with its default init, must end at least 1 nat below it.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from mmtrain.config import ConfigError, load_config
from mmtrain.models.schema import ModelConfig
from mmtrain.train.schema import PretrainConfig
from mmtrain.train.engine import param_groups
from mmtrain.models import build_model
from mmtrain.models.layers import resolve_init

VOCAB, N_CTX, BATCH, STEPS, LR = 64, 64, 16, 60, 3e-3
FOLLOW = 0.7
ZIPF = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
ZIPF = (ZIPF / ZIPF.sum()).float()


def markov_batch(gen: torch.Generator, perm: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    x = torch.empty(batch, N_CTX, dtype=torch.long)
    x[:, 0] = torch.multinomial(ZIPF, batch, replacement=True, generator=gen)
    for t in range(1, N_CTX):
        follow = torch.rand(batch, generator=gen) < FOLLOW
        noise = torch.multinomial(ZIPF, batch, replacement=True, generator=gen)
        x[:, t] = torch.where(follow, perm[x[:, t - 1]], noise)
    return x


def unigram_entropy(tokens: torch.Tensor) -> float:
    counts = torch.bincount(tokens[:, 1:].reshape(-1), minlength=VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def train_on_markov_chain(model_cfg: dict, steps: int = STEPS, seed: int = 0):
    """(held-out loss after ``steps`` AdamW steps, unigram entropy of the held-out tokens)."""
    torch.manual_seed(seed)
    model = build_model({**model_cfg, "n_ctx": N_CTX}, VOCAB)
    defaults = PretrainConfig().train
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=LR, betas=(defaults.beta1, defaults.beta2))
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(VOCAB, generator=gen)
    for _ in range(steps):
        x = markov_batch(gen, perm)
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = markov_batch(torch.Generator().manual_seed(99), perm, batch=64)
    with torch.no_grad():
        loss = model(held_out, labels=held_out).loss.item()
    return loss, unigram_entropy(held_out)


CONTEXT_MODELS = {
    "mixer": dict(kind="mixer", d_model=32, n_layers=4),
    "mixer_multi_head": dict(kind="mixer", d_model=32, n_layers=4, mixer_heads=2),
    "mixer_toeplitz": dict(kind="mixer", d_model=32, n_layers=4, mixer_matrix="toeplitz"),
    "mixer_toeplitz_multi_head": dict(kind="mixer", d_model=32, n_layers=4, mixer_heads=2, mixer_matrix="toeplitz"),
    "transformer": dict(kind="transformer", d_model=32, n_layers=4, n_heads=2),
}


@pytest.mark.parametrize("name", sorted(CONTEXT_MODELS))
def test_default_init_learns_past_the_unigram_plateau(name, one_torch_thread):
    loss, unigram = train_on_markov_chain(CONTEXT_MODELS[name])
    assert 3.6 < unigram < 4.1, unigram
    assert loss < unigram - 1.0, (f"{name}: held-out loss {loss:.3f} after {STEPS} steps is not 1 nat below "
                                  f"the unigram entropy {unigram:.3f}: the model does not use its context")


# --------------------------------------------------------------------------------------------
# The init keys
# --------------------------------------------------------------------------------------------

def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_model({"d_model": 64, "n_layers": 2, "n_ctx": 32, **cfg}, 100)


@pytest.mark.parametrize("kind", ["mixer", "bidirectional_mixer", "mixer_autoencoder"])
def test_mixer_family_defaults_to_the_papers_init(kind):
    model = _model(kind=kind)
    assert resolve_init(model.config_dict, "paper").scheme == "paper"
    assert abs(model.embedding.weight.std().item() - 1.0) < 0.05            # nn.Embedding's N(0, 1)
    bound = 1.0 / math.sqrt(64)                                             # Kaiming-uniform, fan_in 64
    head = model.lm_head.weight
    assert head.abs().max().item() <= bound
    assert abs(head.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    fc = model.blocks[0].mlp.fc_in if hasattr(model, "blocks") else None
    if fc is not None:
        assert fc.bias.abs().max().item() > 0                               # U(+-1/sqrt(fan_in)) biases


@pytest.mark.parametrize("kind", ["transformer", "hybrid"])
def test_transformer_family_keeps_the_llama_init(kind):
    model = _model(kind=kind)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            assert torch.all(param == 1), name
        elif "token_mixing" in name or "mixing." in name:
            continue
        elif param.ndim == 2:
            assert abs(param.std().item() - 0.02) < 0.003, name


def test_gpt_scheme_and_explicit_stds():
    gpt = _model(kind="mixer", init="gpt")
    assert abs(gpt.embedding.weight.std().item() - 0.02) < 0.002
    assert abs(gpt.lm_head.weight.std().item() - 0.02) < 0.002
    assert torch.all(gpt.blocks[0].mlp.fc_in.bias == 0)
    mixed = _model(kind="mixer", init="gpt", embedding_init_std=0.5)
    assert abs(mixed.embedding.weight.std().item() - 0.5) < 0.03
    assert abs(mixed.lm_head.weight.std().item() - 0.02) < 0.002
    kaiming = _model(kind="transformer", linear_init="kaiming", init_std=0.1)
    assert abs(kaiming.embedding.weight.std().item() - 0.1) < 0.01
    assert kaiming.lm_head.weight.abs().max().item() <= 1.0 / math.sqrt(64)
    normal = _model(kind="mixer", linear_init="normal", init_std=0.05)
    assert abs(normal.lm_head.weight.std().item() - 0.05) < 0.005
    assert abs(normal.embedding.weight.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("heads", [0, 2])
def test_position_scaled_mixing_init(heads):
    model = _model(kind="mixer", mixing_init="position", mixer_heads=heads)
    mixing = model.blocks[0].token_mixing
    mixing = mixing.mixing if heads else mixing
    weight = mixing.dense_weight() if heads else mixing.dense_weight()[None]
    assert torch.all(torch.triu(weight, diagonal=1) == 0)
    rows = torch.arange(1, 33, dtype=torch.float32).sqrt()[:, None]      # sqrt(live inputs of row i)
    scaled = (weight * rows)[:, torch.tril(torch.ones(32, 32)) > 0]          # should be U(-1, 1)
    assert scaled.abs().max().item() <= 1.0
    assert abs(scaled.std().item() - 1 / math.sqrt(3)) < 0.05
    assert abs((weight[:, -1, :] * math.sqrt(32)).std().item() - 1 / math.sqrt(3)) < 0.15
    uniform = _model(kind="mixer", mixer_heads=heads).blocks[0].token_mixing
    uniform = uniform.mixing if heads else uniform
    assert uniform.dense_weight()[..., 0, 0].abs().max().item() <= 1.0 / math.sqrt(32)


def test_same_seed_same_init():
    a, b = _model(seed=3, kind="mixer"), _model(seed=3, kind="mixer")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("override, problem", [
    ("model.init_std=inf", "model.init_std (command line): must be a finite number, got inf"),
    ("model.init_std=0", "model.init_std: must be a finite number > 0"),
    ("model.embedding_init_std=-1", "model.embedding_init_std: must be a finite number >= 0"),
    ("model.embedding_init_std=nan", "model.embedding_init_std (command line): must be a finite number, got nan"),
    ("model.init=kaiming", "model.init"),
    ("model.mixing_init=zeros", "model.mixing_init"),
])
def test_bad_init_keys_are_config_errors(override, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(PretrainConfig, [], [override])


def test_init_keys_are_documented():
    fields = ModelConfig.__dataclass_fields__
    for key in ("init", "embedding_init_std", "linear_init", "mixing_init", "init_std"):
        assert fields[key].metadata["help"]
