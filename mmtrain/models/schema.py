"""The ``model`` section of every training config: its schema and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from omegaconf import DictConfig

from mmtrain.config import check_ranges, setting


@dataclass
class ModelConfig:
    kind: str = setting("mixer", "Model family. `mixer` = masked mixer, `transformer` = Llama baseline, "
                            "`hybrid` = Llama + masked token mixing (transfixer), `bidirectional_mixer` = "
                            "forward + reverse mixer streams (encoder), `mixer_autoencoder` = mixer "
                            "encoder -> one embedding -> mixer decoder.",
                   choices=["mixer", "transformer", "hybrid", "bidirectional_mixer", "mixer_autoencoder"])
    d_model: int = setting(256, "Hidden width d (e.g. 512).", ge=1)
    n_layers: int = setting(4, "Number of blocks (e.g. 8).", ge=1)
    n_ctx: int = setting(128, "Context length in tokens the model is built for (e.g. 512). A mixer's "
                         "token-mixing matrices are n_ctx x n_ctx; it runs any input of length <= n_ctx.", ge=1)
    vocab_size: int = setting(0, "Vocabulary size; 0 = take it from the tokenizer / shards (the usual case).", ge=0)
    mixer_heads: int = setting(0, "Mixer only. 0 = flat mixer (one n_ctx x n_ctx matrix on the full width); "
                             "h >= 1 = multi-head mixer: project to h heads of width d/h, mix each with "
                             "its own masked matrix, concatenate, project back.", ge=0)
    mixer_expansion: int = setting(1, "Mixer only. 1 = flat token mixing; e > 1 = expanded mixing "
                                 "n_ctx -> e*n_ctx -> n_ctx with GELU between (both masked).", ge=1)
    ffn_mult: int = setting(4, "Mixer MLP hidden width as a multiple of d_model (paper: 4).", ge=1)
    final_norm: bool = setting(False, "Mixer family: apply a LayerNorm before the LM head. Off by default, as in "
                                 "the paper's code (with the paper init it learned faster without one: "
                                 "benchmarks/learning.py). The transformer always has its final RMSNorm.")
    tie_embeddings: bool = setting(False, "Share the input embedding and LM head weights.")
    hybrid_mode: str = setting("sequential", "hybrid only: where the masked token mixing sits in each Llama "
                                         "layer. `sequential` (transfixer): a = Attn(N(h)); h + a + Mix(a). "
                                         "`parallel`: h + Attn(N(h)) + Mix(N(h)).",
                          choices=["sequential", "parallel"])
    encoder_layers: int = setting(0, "mixer_autoencoder only: encoder mixer blocks; 0 = n_layers (e.g. 8).", ge=0)
    decoder_layers: int = setting(0, "mixer_autoencoder only: decoder mixer blocks; 0 = n_layers (e.g. 8).", ge=0)
    compression: int = setting(1, "mixer_autoencoder only: bottleneck factor c; c > 1 passes the embedding "
                             "through Linear(d, d/c) -> Linear(d/c, d) before it is repeated; 1 = none.", ge=1)
    n_heads: int = setting(4, "Transformer only: attention heads (paper's compute-matched baseline: 4).", ge=1)
    n_kv_heads: int = setting(0, "Transformer only: key/value heads for grouped-query attention; 0 = n_heads.", ge=0)
    intermediate_size: int = setting(0, "Transformer only: SwiGLU hidden width; 0 = 4 * d_model (paper).", ge=0)
    rope_theta: float = setting(10000.0, "Transformer only: RoPE base frequency.", gt=0)
    norm_eps: float = setting(1e-5, "Epsilon of LayerNorm (mixer) / RMSNorm (transformer; HF Llama uses 1e-6).", gt=0)
    init: str = setting("auto", "Initialisation scheme. `paper`: PyTorch's defaults, as the paper's code "
                           "(embedding N(0, 1), Linear Kaiming-uniform with U(+-1/sqrt(fan_in)) biases, "
                           "token mixing U(+-1/sqrt(n_ctx))). `gpt`: N(0, init_std) for every Linear and "
                           "embedding weight, zero biases (Hugging Face Llama's init). `auto`: paper for "
                           "the mixer family (mixer, bidirectional_mixer, mixer_autoencoder), gpt for "
                           "transformer and hybrid. The three keys below override parts of it.",
                   choices=["auto", "paper", "gpt"])
    embedding_init_std: float = setting(0.0, "Std of the N(0, std) token-embedding init; 0 = the scheme's "
                                        "(paper: 1.0, gpt: init_std). A mixer needs it near 1: its token "
                                        "mixing adds unit-scale normalised neighbours to the residual stream.", ge=0)
    linear_init: str = setting("auto", "Init of Linear layers (LM head included). `kaiming`: PyTorch's default "
                                  "Kaiming-uniform weights, U(+-1/sqrt(fan_in)) biases. `normal`: N(0, "
                                  "init_std) weights, zero biases. `auto` = the scheme's (paper: kaiming, "
                                  "gpt: normal).", choices=["auto", "kaiming", "normal"])
    mixing_init: str = setting("auto", "Init of the masked token-mixing matrices (mixer family, hybrid). "
                                  "`uniform`: U(+-1/sqrt(n_in)) for weights and biases, PyTorch's Conv1d "
                                  "default the paper relies on. `position`: row i (which sums i+1 live "
                                  "inputs) drawn U(+-1/sqrt(i+1)), so every output position starts at the "
                                  "same scale. `kaiming` (Toeplitz only): kernel N(0, 2/n_ctx), zero bias, the "
                                  "Toeplitz mixer's own init. `auto` = uniform for general matrices, kaiming for "
                                  "Toeplitz ones.", choices=["auto", "uniform", "position", "kaiming"])
    init_std: float = setting(0.02, "Std of the normal init (linear_init=normal, and the embedding under the "
                               "gpt scheme), e.g. 0.02.", gt=0)
    mixer_impl: str = setting("auto", "Mixer token-mixing computation (same results to fp32 rounding, different "
                                 "speed). `dense`: (W * tril) @ U under autograd, batch-first (reference). "
                                 "`triangular`: sequence-first activations and a block-triangular op that "
                                 "computes only the lower half (forward and both gradients). `auto`: the "
                                 "same op, one dense tril block for short inputs and blocks above the "
                                 "crossover measured by benchmarks/mixing.py.",
                         choices=["auto", "dense", "triangular"])
    mixer_block_size: int = setting(0, "Rows per block of the triangular op and of a packed mixing matrix (e.g. "
                                  "256); 0 = the measured defaults (packed: one panel up to n_ctx 256, else 128 rows; "
                                  "dense layout: one block for L <= 256, else 128).", ge=0)
    mixer_layout: str = setting("packed", "Storage of the causal token-mixing matrices. `packed`: only the lower "
                                "triangle (about half the parameters, gradients, optimizer state and ZeRO "
                                "partitions of `dense`), one GEMM per block row. `dense`: the full n_ctx x n_ctx "
                                "matrix with a mask (the layout of earlier versions). Bundles always store the "
                                "dense masked matrix; each layout loads the other's weights.",
                                choices=["packed", "dense"], role="layout")
    mixer_matrix: str = setting("general", "Structure of the token-mixing matrices (mixer, hybrid, "
                                "bidirectional_mixer, mixer_autoencoder; flat or multi-head). `general`: any lower-triangular n_ctx x n_ctx "
                                "matrix (the paper's). `toeplitz`: M[i, j] = k[i - j], one learned kernel of "
                                "n_ctx lags (and the per-position bias) per head per block: O(n_ctx) "
                                "parameters, FFT mixing in O(n log n) (docs/toeplitz.md).",
                                choices=["general", "toeplitz"])
    mixer_fft_min_length: int = setting(0, "Toeplitz mixing: input length from which the product runs by FFT "
                                        "(below it: the materialised matrix through the triangular op); 0 = the "
                                        "crossover measured by benchmarks/toeplitz.py. Same results to rounding.",
                                        ge=0)
    activation_checkpointing: bool = setting(False, "Recompute each block's activations in the backward pass "
                                               "(torch.utils.checkpoint, non-reentrant): less memory, ~1/3 "
                                               "more compute.")


def validate_model(m: DictConfig, prefix: str = "model", ranges: bool = True) -> List[str]:
    """Problems of a model section: values outside their declared ranges (unless ``ranges`` is
    false, for callers that already checked them, e.g. :func:`mmtrain.config.load_config`) and
    invalid combinations of values."""
    p: List[str] = check_ranges(m, ModelConfig, prefix) if ranges else []
    for key in ("init", "linear_init", "mixing_init"):
        allowed = ModelConfig.__dataclass_fields__[key].metadata["choices"]
        if m[key] not in allowed:
            p.append(f"{prefix}.{key}: {m[key]!r} is not one of {', '.join(map(repr, allowed))}")
    if m.kind in ("mixer", "mixer_autoencoder"):
        if m.mixer_heads > 0 and m.d_model % m.mixer_heads:
            p.append(f"{prefix}.mixer_heads: d_model {m.d_model} is not divisible by {m.mixer_heads} heads")
        if m.mixer_heads > 0 and m.mixer_expansion > 1:
            p.append(f"{prefix}: mixer_heads > 0 and mixer_expansion > 1 cannot be combined")
    if m.get("mixer_matrix", "general") not in ("general", "toeplitz"):
        p.append(f"{prefix}.mixer_matrix: {m.mixer_matrix!r} is not one of 'general', 'toeplitz'")
    elif m.get("mixer_matrix", "general") == "toeplitz" and m.kind != "transformer":
        if m.mixer_expansion > 1:
            p.append(f"{prefix}.mixer_matrix: toeplitz needs mixer_expansion=1 (expanded mixing maps n_ctx to "
                     f"e*n_ctx rows and has no Toeplitz form), got {m.mixer_expansion}")
        if m.mixing_init == "position":
            p.append(f"{prefix}.mixing_init: position scales each matrix row, which a Toeplitz kernel (one weight "
                     "per lag, shared by every row) cannot; use auto, kaiming or uniform")
    if m.get("mixing_init", "auto") == "kaiming" and m.get("mixer_matrix", "general") != "toeplitz":
        p.append(f"{prefix}.mixing_init: kaiming is the Toeplitz kernels' init (mixer_matrix: toeplitz); "
                 "a general matrix takes auto, uniform or position")
    if m.get("mixer_impl", "auto") not in ("auto", "dense", "triangular"):
        p.append(f"{prefix}.mixer_impl: {m.mixer_impl!r} is not one of 'auto', 'dense', 'triangular'")
    if m.get("mixer_layout", "packed") not in ("packed", "dense"):
        p.append(f"{prefix}.mixer_layout: {m.mixer_layout!r} is not one of 'packed', 'dense'")
    if m.kind in ("transformer", "hybrid") and m.n_heads >= 1:
        if m.d_model % m.n_heads:
            p.append(f"{prefix}.n_heads: d_model {m.d_model} must be divisible by n_heads {m.n_heads}")
        elif (m.d_model // m.n_heads) % 2:
            p.append(f"{prefix}.n_heads: head width d_model/n_heads = {m.d_model // m.n_heads} must be even (RoPE)")
        kv = m.n_kv_heads or m.n_heads
        if kv >= 1 and m.n_heads % kv:
            p.append(f"{prefix}.n_kv_heads: n_heads {m.n_heads} must be divisible by n_kv_heads {kv}")
    if m.kind == "bidirectional_mixer" and (m.mixer_heads != 0 or m.mixer_expansion != 1):
        p.append(f"{prefix}: bidirectional_mixer has flat token mixing only; set mixer_heads=0 and "
                 f"mixer_expansion=1 (got {m.mixer_heads} and {m.mixer_expansion})")
    if m.kind == "mixer_autoencoder" and m.compression >= 1 and m.d_model % m.compression:
        p.append(f"{prefix}.compression: must be >= 1 and divide d_model {m.d_model}, got {m.compression}")
    return p
