"""Generation: cached incremental decoding equals full-forward decoding (mixer variants and the
transformer), sampling options, stopping at n_ctx, and the `mmtrain generate` command."""

from __future__ import annotations

import pytest
import torch

from mmtrain.cli import main as cli_main
from mmtrain.eval.generate import STOP_EOS, STOP_MAX_TOKENS, STOP_N_CTX, filter_logits, generate
from mmtrain.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61
N_CTX = 32
MODELS = {
    "flat": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX),
    "multi_head": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_heads=4),
    "expanded": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_expansion=3),
    "flat_tied_no_final_norm": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, tie_embeddings=True,
                                    final_norm=False),
    "toeplitz_flat": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_matrix="toeplitz"),
    "toeplitz_multi_head_fft": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=N_CTX, mixer_heads=4,
                                    mixer_matrix="toeplitz", mixer_fft_min_length=1),
    "llama": dict(kind="transformer", d_model=32, n_layers=2, n_ctx=N_CTX, n_heads=4),
    "llama_gqa": dict(kind="transformer", d_model=32, n_layers=2, n_ctx=N_CTX, n_heads=4, n_kv_heads=2),
}


def make(name, seed=0):
    """A model with every parameter randomised (biases and norms too), so caching bugs show."""
    torch.manual_seed(seed)
    model = build_model(MODELS[name], VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def prompt(length, seed=1):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_incremental_logits_equal_full_forward_logits(name):
    model = make(name)
    ids = torch.randint(0, VOCAB, (2, N_CTX), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    cache = model.init_cache(batch_size=2)
    pieces, start = [], 0
    for size in (5, 1, 1, 9, 1, 15):      # a prompt, single tokens, and chunks after cached ones
        pieces.append(model.forward_step(ids[:, start:start + size], cache))
        start += size
    assert start == N_CTX and cache.length == N_CTX
    # float rounding only, relative to the logits' scale (paper init, no final norm: |logit| up to ~50)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6 * max(1.0, float(full.abs().max())))
    with pytest.raises(ValueError, match="exceed n_ctx=32"):
        model.forward_step(ids[:, :1], cache)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_generation_equals_uncached(name):
    model = make(name)
    for length in (1, 2, 7, 16, 31, N_CTX):
        p = prompt(length, seed=length)
        cached = generate(model, p, max_new_tokens=100, temperature=0, use_cache=True, eos_id=None)
        uncached = generate(model, p, max_new_tokens=100, temperature=0, use_cache=False, eos_id=None)
        assert cached.tokens == uncached.tokens, (name, length)
        assert len(cached.tokens) == N_CTX - length and cached.stop_reason == STOP_N_CTX


def test_sampling_is_seeded_and_cached_equals_uncached():
    model = make("flat")
    p = prompt(4)
    runs = [generate(model, p, 20, temperature=1.0, top_k=20, top_p=0.9, seed=s, use_cache=c, eos_id=None).tokens
            for s, c in ((7, True), (7, False), (7, True), (8, True))]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != runs[3]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [1, 2]
    probs = torch.softmax(logits, -1)                           # [.09, .63, .23, .03, .01]
    assert kept(filter_logits(logits, top_p=0.5)) == [1]
    assert kept(filter_logits(logits, top_p=float(probs[1] + probs[2]) - 1e-3)) == [1, 2]
    assert kept(filter_logits(logits, top_p=0.95)) == [0, 1, 2]
    model = make("llama")
    greedy = generate(model, prompt(3), 10, temperature=0, eos_id=None).tokens
    assert generate(model, prompt(3), 10, temperature=1.0, top_k=1, seed=5, eos_id=None).tokens == greedy


def test_generation_stops_at_eos_max_tokens_and_n_ctx():
    model = make("expanded")
    first = generate(model, prompt(3), 5, temperature=0, eos_id=None)
    assert first.stop_reason == STOP_MAX_TOKENS and len(first.tokens) == 5
    stopped = generate(model, prompt(3), 5, temperature=0, eos_id=first.tokens[2])
    assert stopped.stop_reason == STOP_EOS and stopped.tokens == first.tokens[:3]
    full = generate(model, prompt(N_CTX), 5, temperature=0, eos_id=None)
    assert full.tokens == [] and full.stop_reason == STOP_N_CTX
    with pytest.raises(ValueError, match="the prompt is 33 tokens; it must be 1..32"):
        generate(model, prompt(N_CTX + 1), 5)


# --------------------------------------------------------------------------------------------
# The command, on exported bundles of trained runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixer_zero1", "transformer_zero2"])
def test_generate_command_streams_text_and_says_why_it_stopped(name, exported_bundles, capsys):
    bundle = str(exported_bundles[name])
    args = ["generate", bundle, "--prompt", "Return the", "--temperature", "0", "--max-new-tokens", "200",
            "--ignore-eos"]
    assert cli_main(args) == 0
    cached = capsys.readouterr()
    assert cached.out.startswith("Return the") and len(cached.out) > len("Return the\n")
    assert "reached the model's n_ctx=32 tokens" in cached.err and ", cached;" in cached.err
    assert cli_main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert uncached.out == cached.out and ", uncached;" in uncached.err
    assert cli_main(["generate", bundle, "--prompt", "x", "--max-new-tokens", "3", "--seed", "1"]) == 0
    err = capsys.readouterr().err   # sampled: 3 tokens, or fewer when an end of document comes first
    assert "3 tokens" in err and "stopped: --max-new-tokens 3" in err or "stopped: end of document" in err


def test_generate_command_rejects_a_prompt_longer_than_n_ctx(exported_bundles, capsys):
    long_prompt = "word " * 40
    assert cli_main(["generate", str(exported_bundles["mixer_zero1"]), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "longer than the model's n_ctx=32" in err and "shorten it to at most 32 tokens" in err
