"""What only a CUDA device exercises: SDPA's flash-attention kernel in bf16, an NCCL process group,
the packed token-mixing op's CUDA bf16 path (fp32-accumulating GEMMs), and a bf16 mixer end to end.

Every test is marked ``gpu`` (tests/conftest.py skips them without CUDA); run them with
``python -m pytest -m gpu -q`` (benchmarks/device_check.sh does). Tolerances are stated per test:
bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 % per value), so a bf16 result is
compared with an fp32 / float64 reference relative to the reference's scale.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, free_port, script_env

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")

# Tolerances (max |a - b| / max |reference|, or ||a - b|| / ||reference|| where named).
PACKED_BF16_TOL = 2e-2       # packed_mix in bf16 vs float64 of the same bf16-rounded inputs
PACKED_FP32_TOL = 1e-5       # packed_mix in fp32 on CUDA (TF32 off) vs float64
FLASH_LOGITS_TOL = 3e-2      # transformer logits, bf16 flash attention vs fp32 (relative L2 norm)
FLASH_GRAD_TOL = 5e-2        # its parameter gradients (relative L2 norm, all parameters together)
LOSS_TOL = 2e-3              # loss of a tiny model, bf16 vs fp32 (relative)
MIXER_GRAD_TOL = 3e-2        # a tiny mixer's parameter gradients (relative L2 norm, all parameters together)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 references must not run on TF32 tensor cores."""
    previous = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    yield
    torch.set_float32_matmul_precision(previous)


def max_rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (in float64)."""
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def norm_rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (in float64)."""
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


# --------------------------------------------------------------------------------------------
# 1. SDPA flash attention (transformer, bf16)
# --------------------------------------------------------------------------------------------

def sdpa_flash():
    """A context manager that allows only SDPA's flash-attention kernel (an error if it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def test_transformer_bf16_flash_attention_matches_fp32():
    from mmtrain.models import build_model

    model = build_model(dict(kind="transformer", d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, n_ctx=256,
                             vocab_size=512)).to(CUDA)
    ids = torch.randint(0, 512, (2, 256), device=CUDA)
    out = model(ids, labels=ids)            # fp32 reference (SDPA's math / efficient kernel)
    out.loss.backward()
    reference_logits, reference_grads = out.logits.detach(), flat_grads(model)

    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.zero_grad(set_to_none=True)
    with sdpa_flash():                      # flash only: raises if the kernel cannot take these inputs
        out_bf16 = fast(ids, labels=ids)
        out_bf16.loss.backward()
    assert out_bf16.logits.dtype == torch.bfloat16 and torch.isfinite(out_bf16.loss)
    assert norm_rel(out_bf16.logits, reference_logits) < FLASH_LOGITS_TOL
    assert abs(out_bf16.loss.item() - out.loss.item()) < LOSS_TOL * out.loss.item()
    grads = flat_grads(fast)
    assert torch.isfinite(grads).all() and norm_rel(grads, reference_grads) < FLASH_GRAD_TOL


def test_flash_attention_kernel_agrees_with_the_math_kernel_on_the_same_bf16_inputs():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 4, 256, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_flash():
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_rel(flash, reference) < PACKED_BF16_TOL
    assert max_rel(math, reference) < PACKED_BF16_TOL
    # causal: the first query sees only the first key, so its output is that key's value
    assert max_rel(flash[:, :, 0], v[:, :, 0]) < 1e-2


# --------------------------------------------------------------------------------------------
# 2. NCCL with one rank
# --------------------------------------------------------------------------------------------

NCCL_SCRIPT = textwrap.dedent("""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    t = torch.arange(1, 5, dtype=torch.float32, device="cuda")
    dist.all_reduce(t)                                   # SUM over one rank: unchanged
    m = torch.tensor([3.0, -1.0], device="cuda")
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    dist.barrier()
    torch.cuda.synchronize()
    print("RESULT", dist.get_backend(), dist.get_world_size(), t.tolist(), m.tolist(), t.device.type)
    dist.destroy_process_group()
    print("DESTROYED", dist.is_initialized())
""")


def test_nccl_process_group_with_one_rank():
    """In a process of its own, so a process group of this test process (if any) is not touched."""
    env = script_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", NCCL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "RESULT nccl 1 [1.0, 2.0, 3.0, 4.0] [3.0, -1.0] cuda" in proc.stdout, proc.stdout
    assert "DESTROYED False" in proc.stdout


# --------------------------------------------------------------------------------------------
# 3. packed_mix on CUDA: bf16 (fp32-accumulating GEMMs) and fp32 against float64
# --------------------------------------------------------------------------------------------

N_CTX = 512
WIDTH = 96


def packed_case(length: int, block: int, dtype: torch.dtype, heads: int = 0):
    """(forward, grad x, grad packed) of packed_mix on CUDA in ``dtype``, and the float64 references
    tril(W)[:L, :L] @ x computed from the same (dtype-rounded) values: y, dL/dx, pack_lower(dL/dW)."""
    from mmtrain.models.mixing_ops import pack_lower, packed_mix

    lead = (heads,) if heads else ()
    gen = torch.Generator(device=CUDA).manual_seed(1000 * length + block + heads)
    weight = (torch.randn(*lead, N_CTX, N_CTX, device=CUDA, generator=gen) / N_CTX ** 0.5).to(dtype)
    x = torch.randn(*lead, length, WIDTH, device=CUDA, generator=gen).to(dtype)
    grad_y = torch.randn(*lead, length, WIDTH, device=CUDA, generator=gen).to(dtype)

    packed = pack_lower(weight, block).detach().requires_grad_()
    xs = x.clone().requires_grad_()
    y = packed_mix(packed, xs, N_CTX, block)
    y.backward(grad_y)

    w64 = weight.double().requires_grad_()
    x64 = x.double().requires_grad_()
    y64 = torch.tril(w64)[..., :length, :length] @ x64
    y64.backward(grad_y.double())
    assert y.dtype == dtype and y.shape == x.shape
    return (y, xs.grad, packed.grad), (y64, x64.grad, pack_lower(w64.grad, block))


LENGTHS = {64: [1, 63, 64, 65, N_CTX], 128: [1, 127, 128, 129, N_CTX]}   # 1, block - 1, block, block + 1, n_ctx
CASES = [(block, length) for block, lengths in LENGTHS.items() for length in lengths]


@pytest.mark.parametrize("block,length", CASES)
@pytest.mark.parametrize("heads", [0, 4])
def test_packed_mix_bf16_on_cuda_matches_float64(block, length, heads):
    got, ref = packed_case(length, block, torch.bfloat16, heads)
    for name, value, reference in zip(("forward", "grad x", "grad packed"), got, ref):
        assert torch.isfinite(value).all(), name
        err = max_rel(value, reference)
        assert err < PACKED_BF16_TOL, f"{name}: max abs error / max abs reference = {err:.2e}"
    # entries above the diagonal and rows/columns past L get an exactly zero gradient
    from mmtrain.models.mixing_ops import pack_lower

    live = pack_lower(_live_mask(length), block).bool()
    assert (got[2][..., ~live] == 0).all()


def _live_mask(length: int) -> torch.Tensor:
    """[n_ctx, n_ctx]: 1 where tril(W)[:L, :L] reads W."""
    mask = torch.zeros(N_CTX, N_CTX, device=CUDA)
    mask[:length, :length] = 1
    return mask.tril()


@pytest.mark.parametrize("block,length", CASES)
@pytest.mark.parametrize("heads", [0, 4])
def test_packed_mix_fp32_on_cuda_matches_float64(block, length, heads):
    got, ref = packed_case(length, block, torch.float32, heads)
    for name, value, reference in zip(("forward", "grad x", "grad packed"), got, ref):
        err = max_rel(value, reference)
        assert err < PACKED_FP32_TOL, f"{name}: max abs error / max abs reference = {err:.2e}"


# --------------------------------------------------------------------------------------------
# 4. A tiny mixer, bf16 vs fp32, forward + backward on CUDA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"mixer_heads": 4}, {"mixer_layout": "dense"},
                                   {"mixer_matrix": "toeplitz", "mixer_heads": 4, "mixer_fft_min_length": 1}],
                         ids=["flat-packed", "multi-head", "flat-dense-layout", "toeplitz-fft"])
def test_tiny_mixer_bf16_forward_backward_matches_fp32(extra):
    from mmtrain.models import build_model

    config = dict(kind="mixer", d_model=64, n_layers=2, n_ctx=256, vocab_size=512, **extra)
    model = build_model(config).to(CUDA)
    ids = torch.randint(0, 512, (4, 256), device=CUDA)
    loss = model(ids, labels=ids).loss
    loss.backward()
    reference_grads = flat_grads(model)

    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.zero_grad(set_to_none=True)
    loss_bf16 = fast(ids, labels=ids).loss
    loss_bf16.backward()
    assert loss_bf16.dtype == torch.float32          # the loss is computed in fp32 from bf16 logits
    assert torch.isfinite(loss_bf16) and torch.isfinite(loss)
    assert abs(loss_bf16.item() - loss.item()) < LOSS_TOL * loss.item()
    grads = flat_grads(fast)
    assert torch.isfinite(grads).all() and norm_rel(grads, reference_grads) < MIXER_GRAD_TOL
    # MFU's numerator does not depend on the device
    assert model.flops_per_token(256) == build_model(config).flops_per_token(256)


@pytest.mark.parametrize("length", [1, 7, 128, 129, 1000])
@pytest.mark.parametrize("path", ["direct", "fft"])
def test_toeplitz_mix_bf16_on_cuda_matches_float64(length, path):
    """bf16 inputs: the FFT path transforms in fp32 through cuFFT and rounds once; both paths
    match the float64 product of the same bf16 values to bf16 rounding."""
    from mmtrain.models.toeplitz import toeplitz_mix, toeplitz_rows

    gen = torch.Generator().manual_seed(length)
    kernel = (torch.randn(4, length, generator=gen) / length ** 0.5).bfloat16()
    u = torch.randn(4, length, 64, generator=gen).bfloat16()
    grad = torch.randn(4, length, 64, generator=gen).bfloat16()
    k, x = kernel.to(CUDA).requires_grad_(), u.to(CUDA).requires_grad_()
    y = toeplitz_mix(k, x, path=path)
    y.backward(grad.to(CUDA))
    k64, x64 = kernel.double().requires_grad_(), u.double().requires_grad_()
    want = toeplitz_rows(k64, length, length) @ x64
    want.backward(grad.double())
    assert y.dtype == torch.bfloat16
    for got, ref in ((y, want), (k.grad, k64.grad), (x.grad, x64.grad)):
        got = got.detach().double().cpu()
        ref = ref.detach()
        assert float((got - ref).abs().max()) <= 2 ** -7 * float(ref.abs().max()) + 1e-3
