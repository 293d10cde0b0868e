"""The block-triangular token-mixing op and the fast mixer paths equal the plain masked product."""

from __future__ import annotations

import pytest
import torch

from mmtrain.config import ConfigError
from mmtrain.models import build_model
from mmtrain.models.mixing_ops import auto_block_size, tiling, triangular_mix

N = 40          # matrix size (n_ctx of the op tests)
VOCAB = 61


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny GEMMs: one thread is faster than two fighting over the shared cores."""


def masked_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain formulation: (W ⊙ tril)[:L, :L] · x under autograd."""
    length = x.shape[-2]
    mask = torch.tril(torch.ones(weight.shape[-2:], dtype=weight.dtype))
    masked = (weight * mask)[..., :length, :length]
    if weight.dim() == 3 and x.dim() == 4:
        return torch.matmul(masked.unsqueeze(0), x)
    return torch.matmul(masked, x)


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| relative to max |b| (or to ``floor`` where b is smaller than that)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


# (weight shape, x shape without L): flat [L, N] / [B, L, N], heads [h, L, N] / [B, h, L, N]
LAYOUTS = {
    "flat_LN": ((N, N), (None, 6)),
    "flat_BLN": ((N, N), (3, None, 5)),
    "heads_hLN": ((4, N, N), (4, None, 6)),
    "heads_BhLN": ((4, N, N), (2, 4, None, 3)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("length", [1, 29, 32, N])
@pytest.mark.parametrize("block_size", [0, 7, 16])
def test_triangular_mix_equals_masked_product_values_and_gradients(layout, length, block_size):
    w_shape, x_shape = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(length * 100 + block_size)
    # A full random weight: the op must ignore the entries above the diagonal by itself.
    weight = torch.randn(*w_shape, generator=gen).requires_grad_()
    x = torch.randn(*[length if s is None else s for s in x_shape], generator=gen).requires_grad_()
    grad_out = torch.randn(x.shape, generator=gen)

    out = triangular_mix(weight, x, block_size)
    gw, gx = torch.autograd.grad(out, (weight, x), grad_out)
    ref = masked_reference(weight, x)
    rw, rx = torch.autograd.grad(ref, (weight, x), grad_out)

    assert out.shape == x.shape
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gx, rx) < 1e-5
    assert rel_err(gw, rw) < 1e-5


def test_masked_half_and_unused_rows_get_exactly_zero_weight_gradient():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(N, N, generator=gen).requires_grad_()
    x = torch.randn(2, 27, 8, generator=gen)
    triangular_mix(weight, x, 8).sum().backward()
    grad = weight.grad
    upper = ~torch.tril(torch.ones(N, N, dtype=torch.bool))
    assert torch.count_nonzero(grad[upper]) == 0
    assert torch.count_nonzero(grad[27:]) == 0 and torch.count_nonzero(grad[:, 27:]) == 0
    lower_used = torch.tril(torch.ones(27, 27, dtype=torch.bool))
    assert bool((grad[:27, :27][lower_used] != 0).all())


def test_gradcheck_float64_multi_head():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(2, 2, 5, 2, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, v: triangular_mix(w, v, 2), (weight, x), fast_mode=True)


def test_bf16_op_follows_the_fp32_result():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(N, N, generator=gen) / N ** 0.5
    x = torch.randn(N, 16, generator=gen)
    w16 = weight.bfloat16().requires_grad_()
    x16 = x.bfloat16().requires_grad_()
    out = triangular_mix(w16, x16, 16)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    assert rel_err(out.float(), masked_reference(weight, x)) < 2e-2
    assert torch.count_nonzero(w16.grad.float().triu(1)) == 0


@pytest.mark.parametrize("length, block_size", [(1, 4), (29, 4), (40, 7), (64, 16), (100, 128)])
def test_tiling_covers_the_lower_triangle_exactly_once(length, block_size):
    cover = torch.zeros(length, length, dtype=torch.int64)
    diagonal, rectangles = tiling(length, block_size)
    for r0, r1 in diagonal:
        assert r1 - r0 <= block_size
        cover[r0:r1, r0:r1] += torch.tril(torch.ones(r1 - r0, r1 - r0, dtype=torch.int64))
    for r0, r1, c0, c1 in rectangles:
        assert r0 >= c1
        cover[r0:r1, c0:c1] += 1
    assert torch.equal(cover, torch.tril(torch.ones(length, length, dtype=torch.int64)))


def test_auto_block_size_is_dense_for_short_sequences_and_blocked_for_long_ones():
    assert auto_block_size(64) == 64
    assert auto_block_size(4096) < 4096


def test_bad_arguments_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="exceeds the matrix size"):
        triangular_mix(torch.zeros(8, 8), torch.zeros(9, 4))
    with pytest.raises(ValueError, match="heads"):
        triangular_mix(torch.zeros(3, 8, 8), torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match=r"weight must be \[n, n\]"):
        triangular_mix(torch.zeros(8, 7), torch.zeros(7, 4))
    with pytest.raises(ConfigError, match="mixer_impl"):
        build_model(dict(kind="mixer", d_model=16, n_layers=1, n_ctx=8, mixer_impl="fast"), VOCAB)
    with pytest.raises(ConfigError, match="mixer_block_size"):
        build_model(dict(kind="mixer", d_model=16, n_layers=1, n_ctx=8, mixer_block_size=-1), VOCAB)


MIXERS = {
    "flat": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=32),
    "multi_head": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=32, mixer_heads=4),
    "expanded": dict(kind="mixer", d_model=32, n_layers=2, n_ctx=32, mixer_expansion=2),
}


def logits_and_grads(cfg: dict, tokens: torch.Tensor, **overrides):
    """Logits and every parameter's gradient; a packed mixing matrix's gradient as the dense
    lower-triangular ``weight`` gradient it stands for (comparable across layouts and blocks)."""
    from mmtrain.models.mixer import CausalMixingMatrix
    from mmtrain.models.mixing_ops import unpack_lower

    torch.manual_seed(0)
    model = build_model({**cfg, **overrides}, VOCAB)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, CausalMixingMatrix) and module.layout == "packed":
            packed = grads.pop(f"{name}.packed_weight")
            grads[f"{name}.weight"] = unpack_lower(packed, module.n_ctx, module.block)
        elif isinstance(module, CausalMixingMatrix):
            grads[f"{name}.weight"] = grads[f"{name}.weight"].tril()
    return out.logits.detach(), grads


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("length", [27, 32])
def test_mixer_lm_triangular_equals_dense(name, length):
    tokens = torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(3))
    dense_logits, dense_grads = logits_and_grads(MIXERS[name], tokens, mixer_impl="dense")
    for overrides in (dict(mixer_impl="triangular", mixer_block_size=8), dict(mixer_impl="auto"),
                      dict(mixer_impl="triangular", mixer_block_size=8, mixer_layout="dense"),
                      dict(mixer_impl="auto", mixer_layout="dense"), dict(mixer_impl="dense", mixer_layout="dense")):
        logits, grads = logits_and_grads(MIXERS[name], tokens, **overrides)
        assert rel_err(logits, dense_logits) < 1e-5, overrides
        # Token-mixing biases feed only LayerNorms and residuals, whose input gradient sums to
        # zero over the width: their exact gradient is 0 (rounding noise), so errors are measured
        # against at least 10% of the largest gradient in the model.
        scale = max(float(g.abs().max()) for g in dense_grads.values())
        for key, grad in dense_grads.items():
            assert rel_err(grads[key], grad, floor=0.1 * scale) < 1e-5, (overrides, key)


@pytest.mark.parametrize("cfg", [dict(MIXERS["flat"], mixer_block_size=8), dict(MIXERS["multi_head"], mixer_impl="dense"),
                                 dict(kind="transformer", d_model=32, n_layers=2, n_ctx=32, n_heads=4)],
                         ids=["mixer_triangular", "mixer_dense", "transformer"])
def test_activation_checkpointing_gives_equal_loss_and_gradients(cfg):
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    logits, grads = logits_and_grads(cfg, tokens)
    ckpt_logits, ckpt_grads = logits_and_grads(cfg, tokens, activation_checkpointing=True)
    assert torch.equal(ckpt_logits, logits)
    for key, grad in grads.items():
        assert torch.allclose(ckpt_grads[key], grad, rtol=1e-6, atol=1e-7), key


# --------------------------------------------------------------------------------------------
# Packed lower-triangular storage (the default mixer layout)
# --------------------------------------------------------------------------------------------

from mmtrain.models.mixing_ops import (pack_lower, packed_mask, packed_mix, packed_panels,  # noqa: E402
                                       packed_size, unpack_lower, unpack_rows)

PACKED_N = 37   # not a multiple of the block sizes below: the last panel is short


def _packed_case(heads, length, block, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (heads,) if heads else ()
    dense = torch.randn(*lead, PACKED_N, PACKED_N, generator=g, dtype=dtype)
    x = torch.randn(*lead, length, 6, generator=g, dtype=dtype)
    grad_y = torch.randn(*lead, length, 6, generator=g, dtype=dtype)
    return dense, x, grad_y


@pytest.mark.parametrize("group_rows", [512, 16, 1], ids=["one_group", "groups_of_16_rows", "per_block_row"])
@pytest.mark.parametrize("heads", [0, 3], ids=["flat", "heads"])
@pytest.mark.parametrize("block", [1, 5, 8, 16, PACKED_N, 64])
def test_packed_mix_equals_masked_product_values_and_gradients(heads, block, group_rows, monkeypatch):
    from mmtrain.models import mixing_ops

    monkeypatch.setattr(mixing_ops, "INPUT_GRAD_ROWS", group_rows)   # block rows stacked per input-grad GEMM
    for length in sorted({min(max(1, n), PACKED_N) for n in (1, block - 1, block, block + 1, PACKED_N)}):
        dense, x, grad_y = _packed_case(heads, length, block)
        packed = pack_lower(dense, block).requires_grad_()
        xp = x.clone().requires_grad_()
        y = packed_mix(packed, xp, PACKED_N, block)
        y.backward(grad_y)
        w = dense.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        reference = masked_reference(w, xr)
        reference.backward(grad_y)
        assert rel_err(y, reference) < 1e-5, (block, length)
        assert rel_err(xp.grad, xr.grad) < 1e-5, (block, length)
        # the packed gradient is the dense gradient's lower triangle, packed; rows >= L get zero
        assert rel_err(packed.grad, pack_lower(w.grad, block)) < 1e-5, (block, length)
        assert torch.count_nonzero(unpack_lower(packed.grad, PACKED_N, block)[..., length:, :]) == 0


def test_packed_storage_is_about_half_and_round_trips():
    for n, block in [(37, 8), (4096, 128), (4096, 256), (8192, 256)]:
        size = packed_size(n, block)
        assert size == sum((r1 - r0) * r1 for r0, r1, _ in packed_panels(n, block))
        assert size <= n * (n + block) / 2 and size < 0.55 * n * n or n < 100
    dense = torch.randn(2, PACKED_N, PACKED_N)
    for block in (1, 5, 8, PACKED_N):
        packed = pack_lower(dense, block)
        assert packed.shape == (2, packed_size(PACKED_N, block))
        assert torch.equal(unpack_lower(packed, PACKED_N, block), dense.tril())
        assert torch.equal(unpack_rows(packed, PACKED_N, block, 9, 23, 17), dense.tril()[:, 9:23, :17])
        assert packed_mask(PACKED_N, block).sum() == PACKED_N * (PACKED_N + 1) // 2


def test_packed_entries_above_the_diagonal_have_no_influence_and_zero_gradient():
    dense, x, grad_y = _packed_case(2, PACKED_N, 8, dtype=torch.float64)
    packed = pack_lower(dense, 8)
    junk = packed + 7.0 * (~packed_mask(PACKED_N, 8)).double()     # stored zeros overwritten
    junk.requires_grad_()
    assert torch.equal(packed_mix(junk, x, PACKED_N, 8), packed_mix(packed, x, PACKED_N, 8))
    packed_mix(junk, x, PACKED_N, 8).backward(grad_y)
    assert torch.count_nonzero(junk.grad[:, ~packed_mask(PACKED_N, 8)]) == 0
    assert torch.equal(unpack_lower(junk.detach(), PACKED_N, 8), dense.tril())


def test_packed_gradcheck_float64(monkeypatch):
    from mmtrain.models import mixing_ops

    monkeypatch.setattr(mixing_ops, "INPUT_GRAD_ROWS", 8)   # two block rows per input-gradient group
    for heads in (0, 2):
        dense, x, _ = _packed_case(heads, 11, 4, dtype=torch.float64)
        n = PACKED_N
        packed = pack_lower(dense[..., :13, :13], 4).requires_grad_()
        x = x[..., :11, :3].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda p, v: packed_mix(p, v, 13, 4), (packed, x)), n


def test_packed_bf16_follows_fp32_with_one_rounding():
    dense, x, grad_y = _packed_case(0, PACKED_N, 8)
    packed = pack_lower(dense, 8)
    p32, x32 = packed.clone().requires_grad_(), x.clone().requires_grad_()
    packed_mix(p32, x32, PACKED_N, 8).backward(grad_y)
    p16 = packed.bfloat16().requires_grad_()
    x16 = x.bfloat16().requires_grad_()
    y16 = packed_mix(p16, x16, PACKED_N, 8)
    y16.backward(grad_y.bfloat16())
    assert y16.dtype == torch.bfloat16 and p16.grad.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: inputs rounded once (2^-9 each) and each output rounded once
    assert rel_err(y16.float(), packed_mix(packed, x, PACKED_N, 8)) < 2e-2
    assert rel_err(x16.grad.float(), x32.grad) < 2e-2
    assert rel_err(p16.grad.float(), p32.grad) < 2e-2


def test_packed_mix_rejects_bad_shapes_with_clear_errors():
    packed = pack_lower(torch.randn(PACKED_N, PACKED_N), 8)
    with pytest.raises(ValueError, match="packed must be"):
        packed_mix(packed[:-1], torch.randn(5, 2), PACKED_N, 8)
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        packed_mix(packed, torch.randn(PACKED_N + 1, 2), PACKED_N, 8)
    with pytest.raises(ValueError, match="x must be"):
        packed_mix(packed, torch.randn(2, 5, 2), PACKED_N, 8)


@pytest.mark.parametrize("cfg", [dict(kind="mixer", d_model=32, n_layers=2, n_ctx=40, mixer_block_size=16),
                                 dict(kind="mixer", d_model=32, n_layers=2, n_ctx=40, mixer_heads=2,
                                      mixer_block_size=16),
                                 dict(kind="hybrid", d_model=32, n_layers=2, n_ctx=40, n_heads=4, mixer_block_size=16),
                                 dict(kind="mixer_autoencoder", d_model=32, n_layers=2, n_ctx=40,
                                      mixer_block_size=16)],
                         ids=["flat", "heads", "hybrid", "autoencoder"])
def test_packed_and_dense_layouts_are_the_same_model_and_load_each_other(cfg):
    """The same seed gives the same model in both layouts (init draws the dense matrix and packs
    it); each layout loads the other's state dict; bundles store the dense masked weight."""
    from mmtrain.export.bundle import export_state_dict

    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    packed = build_model({**cfg, "mixer_layout": "packed"}, VOCAB).eval()
    torch.manual_seed(0)
    dense = build_model({**cfg, "mixer_layout": "dense"}, VOCAB).eval()
    assert packed.stored_params() < dense.stored_params() and packed.num_params() == dense.num_params()
    with torch.no_grad():
        assert rel_err(packed(tokens).logits, dense(tokens).logits) < 1e-5
        exported = export_state_dict(packed)
        assert exported.keys() == export_state_dict(dense).keys()
        assert all(torch.equal(t, export_state_dict(dense)[k]) for k, t in exported.items())
        # packed state dict -> dense model, dense state dict -> packed model (perturbed first)
        for p in packed.parameters():
            p.add_(0.1 * torch.randn_like(p))
        dense.load_state_dict(packed.state_dict())
        assert rel_err(dense(tokens).logits, packed(tokens).logits) < 1e-5
        again = build_model({**cfg, "mixer_layout": "packed", "mixer_block_size": 8}, VOCAB).eval()
        again.load_state_dict(dense.state_dict())
        assert rel_err(again(tokens).logits, packed(tokens).logits) < 1e-5
        with pytest.raises(RuntimeError, match="size mismatch"):
            build_model({**cfg, "n_ctx": 32, "mixer_layout": "packed"}, VOCAB).load_state_dict(dense.state_dict())
