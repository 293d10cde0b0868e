"""Hugging Face ``transformers`` classes for mmtrain bundles (copied into every bundle as
``modeling_mmtrain.py``; it imports only torch and transformers, never mmtrain).

With the ``auto_map`` entries of the bundle's config.json::

    AutoConfig.from_pretrained(bundle, trust_remote_code=True)            -> MmtrainConfig
    AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)  -> MmtrainForCausalLM
    AutoModel.from_pretrained(bundle, trust_remote_code=True)             -> MmtrainModel (hidden states)

for the masked mixer (``kind: mixer``; flat, multi-head ``mixer_heads`` and expanded
``mixer_expansion`` token mixing), the transformer + masked mixer hybrid (``kind: hybrid``) and
the mixer autoencoder (``kind: mixer_autoencoder``). The architecture is read from the bundle's
``mmtrain.model`` section of config.json; parameter names are the bundle's safetensors keys, so
``from_pretrained`` loads the weights as they are stored.

The bundle stores every token-mixing matrix dense and already masked; the masks are applied
again in ``forward`` (``tril`` for causal mixing; for expanded mixing hidden row r belongs to
position r // e), so a fine-tuned model stays causal. A model built for ``n_ctx`` runs any length
L <= n_ctx with the top-left blocks of its matrices; longer inputs are an error.

Outputs: ``MmtrainForCausalLM`` returns ``logits`` [B, L, V] and, with ``labels``, the loss
mmtrain trains with (shifted next-token cross-entropy; the autoencoder: unshifted reconstruction
cross-entropy, position t scored against token t). Positions where ``attention_mask`` is 0 are
left out of the loss only: the models are causal, so right padding never changes the outputs at
real tokens (left padding does: positions are absolute).

Generation (``model.generate``, mixer and hybrid): decoding is incremental with
:class:`MmtrainCache`, preallocated per-layer buffers of what each layer's token mixing reads (the
normalised inputs, the projected heads or the expanded hidden rows; the hybrid also keys and
values), so a new token costs O(L * d) per layer. ``use_cache=False`` recomputes the whole prefix
for every token and gives the same tokens. Generation stops when the sequence reaches n_ctx.
The autoencoder reconstructs its input and cannot continue a text: ``generate`` refuses it.

Integrity: ``from_pretrained`` on a bundle directory first checks each weight file's size and
sha256 against the ``mmtrain.digests`` that ``mmtrain export`` recorded in config.json
(:func:`verify_bundle_weights`, about 1 s per GB) and raises :class:`BundleIntegrityError` naming
the file on a mismatch; a bundle written before digests were recorded loads with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

KINDS = ("mixer", "hybrid", "mixer_autoencoder")
IGNORE_INDEX = -100
NOT_GENERATIVE = ("a mixer_autoencoder reconstructs its whole input from one embedding of it; it does not "
                  "predict next tokens, so it cannot continue a prompt")

# Defaults of the mmtrain model config keys this file reads (mmtrain.models.schema.ModelConfig).
MODEL_DEFAULTS: Dict[str, Any] = dict(
    kind="mixer", d_model=256, n_layers=4, n_ctx=128, vocab_size=0, mixer_heads=0, mixer_expansion=1,
    ffn_mult=4, final_norm=False, tie_embeddings=False, hybrid_mode="sequential", encoder_layers=0,
    decoder_layers=0, compression=1, n_heads=4, n_kv_heads=0, intermediate_size=0, rope_theta=10000.0,
    norm_eps=1e-5,
)


class MmtrainConfig(PretrainedConfig):
    """The bundle's config.json. ``mmtrain`` is its "mmtrain" section (``mmtrain["model"]``: the
    architecture); the usual Hugging Face keys (vocab_size, hidden_size, num_hidden_layers,
    max_position_embeddings = n_ctx, tie_word_embeddings) are derived from it."""

    model_type = "mmtrain"

    def __init__(self, mmtrain: Optional[Dict[str, Any]] = None, **kwargs):
        self.mmtrain = dict(mmtrain or {})
        model = {**MODEL_DEFAULTS, **self.mmtrain.get("model", {})}
        self.mmtrain["model"] = model
        if model["kind"] not in KINDS:
            raise ValueError(f"model kind {model['kind']!r} has no Hugging Face classes here; "
                             f"supported kinds: {', '.join(KINDS)}")
        for key, value in (("vocab_size", model["vocab_size"]), ("hidden_size", model["d_model"]),
                           ("num_hidden_layers", model["n_layers"]), ("max_position_embeddings", model["n_ctx"])):
            kwargs.setdefault(key, value)
        kwargs.setdefault("tie_word_embeddings", bool(model["tie_embeddings"]))
        super().__init__(**kwargs)

    @property
    def model_config(self) -> Dict[str, Any]:
        return self.mmtrain["model"]


# --------------------------------------------------------------------------------------------
# Token mixing (every product returns output rows start..end-1 from all inputs 0..end-1)
# --------------------------------------------------------------------------------------------


def _causal_rows(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """tril(W) rows start..end-1, columns 0..end-1: [(heads,) end - start, end]."""
    return torch.tril(weight[..., start:end, :end], diagonal=start)


class CausalMixing(nn.Module):
    """``Y = tril(W)[:L, :L] @ U + b[:L, None]``; weight [(heads,) n_ctx, n_ctx], bias [(heads,) n_ctx].
    u [B, (heads,) L, width] -> rows start..L-1."""

    def __init__(self, n_ctx: int, heads: Optional[int] = None):
        super().__init__()
        lead = () if heads is None else (heads,)
        self.n_ctx = n_ctx
        self.weight = nn.Parameter(torch.empty(*lead, n_ctx, n_ctx))
        self.bias = nn.Parameter(torch.empty(*lead, n_ctx))

    def forward(self, u: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = u.shape[-2]
        return torch.matmul(_causal_rows(self.weight, start, end), u) + self.bias[..., start:end, None]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.n_ctx)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound).tril_()
            self.bias.uniform_(-bound, bound)


#: From this length a whole Toeplitz product runs by FFT (as mmtrain's default).
TOEPLITZ_FFT_MIN_LENGTH = 1024


def _toeplitz_rows(kernel: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1, columns 0..end-1 of T(k), T(k)[i, j] = k[i - j] for j <= i, else 0."""
    lag = torch.arange(start, end, device=kernel.device)[:, None] - torch.arange(end, device=kernel.device)[None, :]
    return kernel[..., lag.clamp(min=0)] * (lag >= 0).to(kernel.dtype)


class ToeplitzMixing(nn.Module):
    """``Y = T(k)[:L, :L] @ U + b[:L, None]``, ``T(k)[i, j] = k[i - j]`` (j <= i); kernel and bias
    [(heads,) n_ctx]. A whole input from TOEPLITZ_FFT_MIN_LENGTH positions is a linear convolution
    by FFT in fp32 (zero-padded to a power of two >= 2L - 1), otherwise the materialised rows."""

    def __init__(self, n_ctx: int, heads: Optional[int] = None):
        super().__init__()
        lead = () if heads is None else (heads,)
        self.n_ctx = n_ctx
        self.kernel = nn.Parameter(torch.empty(*lead, n_ctx))
        self.bias = nn.Parameter(torch.empty(*lead, n_ctx))

    def forward(self, u: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = u.shape[-2]
        if start == 0 and end >= TOEPLITZ_FFT_MIN_LENGTH:
            n_fft = 1 << (2 * end - 2).bit_length()
            work = torch.float64 if u.dtype == torch.float64 else torch.float32
            spectrum = torch.fft.rfft(u.transpose(-1, -2).to(work), n=n_fft, dim=-1) * torch.fft.rfft(
                self.kernel[..., :end].to(work), n=n_fft, dim=-1)[..., None, :]
            mixed = torch.fft.irfft(spectrum, n=n_fft, dim=-1)[..., :end].transpose(-1, -2).to(u.dtype)
        else:
            mixed = torch.matmul(_toeplitz_rows(self.kernel, start, end), u)
        return mixed + self.bias[..., start:end, None]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.kernel.normal_(0.0, math.sqrt(2.0 / self.n_ctx))
            self.bias.zero_()


class _InputCache:
    """Flat token mixing's decoding cache: the inputs U [B, n_ctx, d]."""

    def init_cache(self, batch: int, n_ctx: int, width: int, new) -> Dict[str, torch.Tensor]:
        return {"u": new(batch, n_ctx, width)}

    def step(self, u: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]], start: int) -> torch.Tensor:
        if cache is None:
            return self(u)
        end = start + u.shape[1]
        cache["u"][:, start:end] = u
        return self(cache["u"][:, :end], start)


class FlatTokenMixing(_InputCache, CausalMixing):
    """One causal matrix over positions, shared across the width d. Cache: the inputs U."""


class FlatToeplitzMixing(_InputCache, ToeplitzMixing):
    """One causal Toeplitz kernel over positions, shared across the width d. Cache: the inputs U."""


def _flat_mixing(c: Dict[str, Any]) -> nn.Module:
    toeplitz = c.get("mixer_matrix", "general") == "toeplitz"
    return FlatToeplitzMixing(c["n_ctx"]) if toeplitz else FlatTokenMixing(c["n_ctx"])


class MultiHeadTokenMixing(nn.Module):
    """in_proj -> h heads of width d/h, each mixed by its own causal matrix -> concat -> out_proj.
    Cache: the projected heads [B, h, n_ctx, d/h]."""

    def __init__(self, d_model: int, n_ctx: int, heads: int, toeplitz: bool = False):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d_model, d_model)
        self.mixing = ToeplitzMixing(n_ctx, heads) if toeplitz else CausalMixing(n_ctx, heads)
        self.out_proj = nn.Linear(d_model, d_model)

    def init_cache(self, batch: int, n_ctx: int, width: int, new) -> Dict[str, torch.Tensor]:
        return {"heads": new(batch, self.heads, n_ctx, width // self.heads)}

    def step(self, u: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]], start: int) -> torch.Tensor:
        batch, length, width = u.shape
        heads = self.in_proj(u).view(batch, length, self.heads, width // self.heads).transpose(1, 2)
        if cache is not None:
            end = start + length
            cache["heads"][:, :, start:end] = heads
            heads = cache["heads"][:, :, :end]
        mixed = self.mixing(heads, start if cache is not None else 0)           # [B, h, T, d/h]
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))


class ExpandedTokenMixing(nn.Module):
    """``n_ctx -> e*n_ctx -> n_ctx`` with GELU between: hidden row r belongs to position r // e and
    reads inputs j <= r // e; output i reads hidden rows r with r // e <= i. Cache: the inputs U and
    the hidden rows (e per position)."""

    def __init__(self, n_ctx: int, expansion: int):
        super().__init__()
        self.expansion = expansion
        self.expand = _Matrix(expansion * n_ctx, n_ctx)
        self.contract = _Matrix(n_ctx, expansion * n_ctx)

    def _hidden(self, u: torch.Tensor, start: int) -> torch.Tensor:
        """GELU hidden rows e*start..e*L-1 from inputs u [B, L, d] (all positions 0..L-1)."""
        e, length = self.expansion, u.shape[1]
        rows = torch.arange(e * start, e * length, device=u.device) // e
        mask = torch.arange(length, device=u.device)[None, :] <= rows[:, None]
        weight = self.expand.weight[e * start:e * length, :length] * mask.to(u.dtype)
        return F.gelu(torch.matmul(weight, u) + self.expand.bias[e * start:e * length, None])

    def _output(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Output rows start..end-1 from hidden rows 0..e*end-1 [B, e*end, d]."""
        e = self.expansion
        rows = torch.arange(e * end, device=hidden.device) // e
        mask = rows[None, :] <= torch.arange(start, end, device=hidden.device)[:, None]
        weight = self.contract.weight[start:end, :e * end] * mask.to(hidden.dtype)
        return torch.matmul(weight, hidden) + self.contract.bias[start:end, None]

    def init_cache(self, batch: int, n_ctx: int, width: int, new) -> Dict[str, torch.Tensor]:
        return {"u": new(batch, n_ctx, width), "hidden": new(batch, self.expansion * n_ctx, width)}

    def step(self, u: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]], start: int) -> torch.Tensor:
        if cache is None:
            return self._output(self._hidden(u, 0), 0, u.shape[1])
        e, end = self.expansion, start + u.shape[1]
        cache["u"][:, start:end] = u
        cache["hidden"][:, e * start:e * end] = self._hidden(cache["u"][:, :end], start)
        return self._output(cache["hidden"][:, :e * end], start, end)


class _Matrix(nn.Module):
    """A position-mixing matrix weight [n_out, n_in] with a per-output-row bias [n_out]."""

    def __init__(self, n_out: int, n_in: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out))

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)


# --------------------------------------------------------------------------------------------
# Mixer blocks
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear(d, m*d) -> exact (erf) GELU -> Linear(m*d, d)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class MixerBlock(nn.Module):
    """``H += TokenMixing(LN(H)); H += MLP(LN(H))``."""

    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        d, n_ctx = c["d_model"], c["n_ctx"]
        self.token_norm = nn.LayerNorm(d, eps=c["norm_eps"])
        if c["mixer_heads"] > 0:
            self.token_mixing = MultiHeadTokenMixing(d, n_ctx, c["mixer_heads"],
                                                     c.get("mixer_matrix", "general") == "toeplitz")
        elif c["mixer_expansion"] > 1:
            self.token_mixing = ExpandedTokenMixing(n_ctx, c["mixer_expansion"])
        else:
            self.token_mixing = _flat_mixing(c)
        self.mlp_norm = nn.LayerNorm(d, eps=c["norm_eps"])
        self.mlp = MLP(d, c["ffn_mult"] * d)

    def forward(self, h: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]] = None, start: int = 0):
        h = h + self.token_mixing.step(self.token_norm(h), cache, start)
        return h + self.mlp(self.mlp_norm(h))


# --------------------------------------------------------------------------------------------
# Hybrid (Llama decoder layers + flat causal token mixing)
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(length: int, head_dim: int, theta: float, device, dtype):
    """cos, sin [length, head_dim] for positions 0..length-1 (frequencies repeated twice)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    positions = torch.arange(length, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query attention with rotary q/k; projections without bias. Cache: rotated
    keys and values [B, n_kv_heads, n_ctx, head_dim]."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[Dict[str, torch.Tensor]] = None, start: int = 0) -> torch.Tensor:
        batch, length, _ = h.shape
        end = start + length
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if cache is not None:
            cache["k"][:, :, start:end] = k
            cache["v"][:, :, start:end] = v
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:   # query i (position start + i) sees keys j <= start + i
            allowed = torch.arange(end, device=h.device)[None, :] <= torch.arange(start, end, device=h.device)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, d_model: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HybridDecoderLayer(nn.Module):
    """sequential: ``a = Attn(N(h)); h = h + a + Mix(a)``; parallel: ``u = N(h); h = h + Attn(u) + Mix(u)``;
    then ``h = h + SwiGLU(N(h))``."""

    def __init__(self, c: Dict[str, Any], n_kv_heads: int, intermediate_size: int):
        super().__init__()
        d = c["d_model"]
        self.sequential = c["hybrid_mode"] == "sequential"
        self.input_layernorm = RMSNorm(d, c["norm_eps"])
        self.self_attn = Attention(d, c["n_heads"], n_kv_heads)
        self.token_mixing = _flat_mixing(c)
        self.post_attention_layernorm = RMSNorm(d, c["norm_eps"])
        self.mlp = LlamaMLP(d, intermediate_size)

    def forward(self, h, cos, sin, cache=None, start: int = 0):
        u = self.input_layernorm(h)
        a = self.self_attn(u, cos, sin, cache, start)
        h = h + a + self.token_mixing.step(a if self.sequential else u, cache, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridBackbone(nn.Module):
    """embed_tokens -> layers -> norm (Hugging Face LlamaModel's names)."""

    def __init__(self, c: Dict[str, Any], n_kv_heads: int, intermediate_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(HybridDecoderLayer(c, n_kv_heads, intermediate_size)
                                    for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])


# --------------------------------------------------------------------------------------------
# Decoding cache
# --------------------------------------------------------------------------------------------


class MmtrainCache:
    """What incremental decoding keeps: ``length`` positions processed so far and, per layer, a
    dict of tensors preallocated for n_ctx positions (only the first ``length`` hold data)."""

    def __init__(self, layers: List[Dict[str, torch.Tensor]]):
        self.layers = layers
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search)."""
        for layer in self.layers:
            for key, tensor in layer.items():
                layer[key] = tensor.index_select(0, beam_idx.to(tensor.device))


class _ContextLimit(StoppingCriteria):
    """Stops generation when the sequence reaches the model's n_ctx."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.n_ctx, dtype=torch.bool,
                          device=input_ids.device)


# --------------------------------------------------------------------------------------------
# Integrity of the weight files
# --------------------------------------------------------------------------------------------


class BundleIntegrityError(ValueError):
    """A bundle's weight file differs from the size / sha256 its config.json records."""


def _sha256(path: str, chunk: int = 1024**2) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            sha.update(block)
    return sha.hexdigest()


def verify_bundle_weights(directory: str) -> bool:
    """Check every weight file that ``<directory>/config.json`` records a digest for (size, then
    sha256); BundleIntegrityError naming each file that differs. Returns False (with a warning)
    for a bundle whose config.json records no digests, True when verified."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False   # from_pretrained reports a missing or unreadable config.json itself
    section = config.get("mmtrain") if isinstance(config, dict) else None
    digests = section.get("digests") if isinstance(section, dict) else None
    if not isinstance(digests, dict):
        warnings.warn(f"{directory}: config.json records no weight digests (a bundle written before mmtrain "
                      "recorded them); its weights are loaded unverified. Re-export it to add them.")
        return False
    problems = []
    for name, record in sorted(digests.items()):
        path = os.path.join(directory, str(name))
        # weight files sit in the bundle directory itself (a Hub cache links them elsewhere: fine)
        if os.path.basename(str(name)) != name or name in ("", ".", "..") or not isinstance(record, dict):
            problems.append(f"digest entry {str(name)[:60]!r} does not name a file of the bundle")
        elif not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != record.get("bytes"):
            problems.append(f"{path}: {os.path.getsize(path):,} bytes, config.json records {record.get('bytes')} "
                            "(truncated or replaced)")
        elif _sha256(path) != record.get("sha256"):
            problems.append(f"{path}: sha256 {_sha256(path)}, config.json records {record.get('sha256')} "
                            "(corrupted or changed after export)")
    if problems:
        raise BundleIntegrityError(f"{directory}: weight files do not match the digests in config.json; re-export "
                                   "the bundle with `mmtrain export` or restore it from a good copy:\n  - "
                                   + "\n  - ".join(problems))
    return True


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class MmtrainPreTrainedModel(PreTrainedModel):
    config_class = MmtrainConfig
    # no submodule has this name, so the bundle's tensor names load as they are
    base_model_prefix = "mmtrain_backbone"
    # the decoding cache is the model's own (MmtrainCache), not a transformers Cache
    _is_stateful = True
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.weight$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, after :func:`verify_bundle_weights` when given a
        local bundle directory."""
        directory = str(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            directory = os.path.join(directory, kwargs["subfolder"])
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(directory):
            verify_bundle_weights(directory)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (CausalMixing, ToeplitzMixing, _Matrix)):
            module.reset_parameters()


class MmtrainModel(MmtrainPreTrainedModel):
    """The network without the LM head: ``forward`` returns the final hidden states [B, L, d]
    (after the final norm) as ``last_hidden_state``, the states mmtrain pools into embeddings."""

    def __init__(self, config: MmtrainConfig):
        super().__init__(config)
        self._build_network(config)
        self.post_init()

    def _build_network(self, config: MmtrainConfig) -> None:
        """The modules of the bundle's model kind, under the bundle's tensor names."""
        c = dict(config.model_config)
        self.kind, self.n_ctx = c["kind"], c["n_ctx"]
        d = c["d_model"]
        if self.kind == "hybrid":
            self.n_heads = c["n_heads"]
            self.n_kv_heads = c["n_kv_heads"] or c["n_heads"]
            self.head_dim = d // c["n_heads"]
            self.rope_theta = float(c["rope_theta"])
            self.model = HybridBackbone(c, self.n_kv_heads, c["intermediate_size"] or 4 * d)
        else:
            self.wte = nn.Embedding(c["vocab_size"], d)
            if self.kind == "mixer":
                self.blocks = nn.ModuleList(MixerBlock(c) for _ in range(c["n_layers"]))
            else:
                self.encoder = nn.ModuleList(MixerBlock(c) for _ in range(c["encoder_layers"] or c["n_layers"]))
                compression = c["compression"]
                self.bottleneck = nn.Identity() if compression <= 1 else nn.Sequential()
                if compression > 1:
                    self.bottleneck.add_module("down", nn.Linear(d, d // compression))
                    self.bottleneck.add_module("up", nn.Linear(d // compression, d))
                self.decoder = nn.ModuleList(MixerBlock(c) for _ in range(c["decoder_layers"] or c["n_layers"]))
            self.final_norm = nn.LayerNorm(d, eps=c["norm_eps"]) if c["final_norm"] else nn.Identity()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens if self.kind == "hybrid" else self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        if self.kind == "hybrid":
            self.model.embed_tokens = value
        else:
            self.wte = value

    def new_cache(self, batch_size: int) -> MmtrainCache:
        """An empty decoding cache for ``batch_size`` sequences (model's device and dtype)."""
        if self.kind == "mixer_autoencoder":
            raise ValueError(NOT_GENERATIVE)
        param = self.get_input_embeddings().weight

        def new(*shape):
            return torch.zeros(*shape, device=param.device, dtype=param.dtype)

        d = self.config.hidden_size
        if self.kind == "mixer":
            return MmtrainCache([b.token_mixing.init_cache(batch_size, self.n_ctx, d, new) for b in self.blocks])
        kv = (batch_size, self.n_kv_heads, self.n_ctx, self.head_dim)
        return MmtrainCache([{"k": new(*kv), "v": new(*kv),
                              **layer.token_mixing.init_cache(batch_size, self.n_ctx, d, new)}
                             for layer in self.model.layers])

    def encode(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """mixer_autoencoder: input_ids [B, L] -> the embedding e [B, d] the decoder expands
        (the encoder's last position, through the bottleneck)."""
        h = self.wte(input_ids)
        for block in self.encoder:
            h = block(h)
        return self.bottleneck(h[:, -1])

    def hidden_states(self, input_ids: torch.LongTensor, cache: Optional[MmtrainCache] = None) -> torch.Tensor:
        """Final hidden states [B, T, d] of input_ids [B, T] at positions cache.length.. (0 without
        a cache); advances ``cache.length``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        start = cache.length if cache is not None else 0
        end = start + input_ids.shape[1]
        if not 1 <= end <= self.n_ctx or input_ids.shape[1] < 1:
            raise ValueError(f"sequence length {end} is outside 1..n_ctx={self.n_ctx}: the model was built for "
                             f"at most {self.n_ctx} tokens")
        layers = cache.layers if cache is not None else None
        if self.kind == "mixer":
            h = self.wte(input_ids)
            for i, block in enumerate(self.blocks):
                h = block(h, layers[i] if layers else None, start)
            h = self.final_norm(h)
        elif self.kind == "hybrid":
            h = self.model.embed_tokens(input_ids)
            cos, sin = rotary_cos_sin(end, self.head_dim, self.rope_theta, h.device, h.dtype)
            cos, sin = cos[start:end], sin[start:end]
            for i, layer in enumerate(self.model.layers):
                h = layer(h, cos, sin, layers[i] if layers else None, start)
            h = self.model.norm(h)
        else:
            if cache is not None:
                raise ValueError(NOT_GENERATIVE)
            h = self.encode(input_ids)[:, None, :].expand(-1, input_ids.shape[1], -1)
            for block in self.decoder:
                h = block(h)
            h = self.final_norm(h)
        if cache is not None:
            cache.length = end
        return h

    def _cache_for(self, input_ids, past_key_values, use_cache) -> Optional[MmtrainCache]:
        if past_key_values is not None and not isinstance(past_key_values, MmtrainCache):
            raise TypeError(f"past_key_values must be the MmtrainCache this model returned, "
                            f"got {type(past_key_values).__name__}")
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache(input_ids.shape[0])
        return past_key_values

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[MmtrainCache] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids are required")
        cache = self._cache_for(input_ids, past_key_values, use_cache)
        hidden = self.hidden_states(input_ids, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


class MmtrainForCausalLM(MmtrainModel, GenerationMixin):
    """The whole bundle: the network and its LM head (``lm_head.weight``, tied to the input
    embedding when the bundle says so). Logits [B, L, V]: position t predicts token t + 1
    (autoencoder: reconstructs token t)."""

    _tied_weights_keys = ["lm_head.weight"]
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: MmtrainConfig):
        MmtrainPreTrainedModel.__init__(self, config)
        self._build_network(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def label_shift(self) -> int:
        """1: logits at t are scored against the token at t + 1; 0 (autoencoder): against token t."""
        return 0 if self.kind == "mixer_autoencoder" else 1

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, past_key_values: Optional[MmtrainCache] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids are required")
        cache = self._cache_for(input_ids, past_key_values, use_cache)
        logits = self.lm_head(self.hidden_states(input_ids, cache))
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            shift = self.label_shift
            predictions = logits[:, :logits.shape[1] - shift].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(predictions, labels[:, shift:].reshape(-1), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Optional[MmtrainCache] = None,
                                      attention_mask: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                                      **kwargs) -> Dict[str, Any]:
        if attention_mask is not None and bool((attention_mask == 0).any()):
            raise ValueError("padded prompts cannot be generated from: positions are absolute, so a padded "
                             "prompt would shift (left padding) or interrupt (right padding) the text; "
                             "generate unpadded prompts of one length per call")
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        return {"input_ids": input_ids, "past_key_values": past_key_values,
                "use_cache": True if use_cache is None else use_cache}

    def _reorder_cache(self, past_key_values: MmtrainCache, beam_idx: torch.LongTensor) -> MmtrainCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``, stopping when the sequence reaches n_ctx; refused for
        the autoencoder."""
        if self.kind == "mixer_autoencoder":
            raise ValueError(f"cannot generate with model kind 'mixer_autoencoder': {NOT_GENERATIVE}")
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(_ContextLimit(self.n_ctx))
        return super().generate(*args, stopping_criteria=criteria, **kwargs)


class MmtrainPooling(nn.Module):
    """A sentence-transformers module: the mmtrain embedder's pooling of right-padded token
    embeddings (``features["token_embeddings"]`` [B, L, d], ``features["attention_mask"]`` [B, L]),
    ``mean`` over real tokens, ``last`` real token or ``second_to_last`` (index length - 2,
    clamped at 0) -> ``features["sentence_embedding"]`` [B, d] fp32 (normalised by the Normalize
    module after it)."""

    POOLINGS = ("mean", "last", "second_to_last")

    def __init__(self, pooling: str = "mean", embedding_dimension: Optional[int] = None):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(self.POOLINGS)}, got {pooling!r}")
        self.pooling, self.embedding_dimension = pooling, embedding_dimension

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        hidden, mask = features["token_embeddings"], features["attention_mask"]
        lengths = mask.long().sum(1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "mean":
            weights = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden * weights[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
        elif self.pooling == "last":
            pooled = hidden[rows, lengths - 1]
        else:
            pooled = hidden[rows, (lengths - 2).clamp(min=0)]
        features["sentence_embedding"] = pooled.float()
        return features

    def get_sentence_embedding_dimension(self) -> Optional[int]:
        return self.embedding_dimension

    def get_config_dict(self) -> Dict[str, Any]:
        return {"pooling": self.pooling, "embedding_dimension": self.embedding_dimension}

    def save(self, output_path: str, *args, **kwargs) -> None:
        import json
        import os

        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.get_config_dict(), fh, indent=2)

    @staticmethod
    def load(input_path: str) -> "MmtrainPooling":
        import json
        import os

        with open(os.path.join(input_path, "config.json"), encoding="utf-8") as fh:
            return MmtrainPooling(**json.load(fh))
