"""Llama transformer baseline, numerically and by parameter name identical to Hugging Face's
``transformers.LlamaForCausalLM`` (RMSNorm, rotary embeddings with rotate_half, grouped-query
attention, SwiGLU MLP, final RMSNorm, untied LM head by default).

``LlamaLM.state_dict()`` loads into ``LlamaForCausalLM(LlamaConfig(**model.hf_config_dict()))``
with ``strict=True`` and gives the same logits. Attention is causal
``F.scaled_dot_product_attention``; positions are always ``0..L-1``.

Incremental decoding (``init_cache`` / ``forward_step``) keeps a standard KV cache: per layer the
rotated keys and the values of earlier positions; new tokens are rotated at their absolute positions.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.layers import CausalLM, DecodingCache, initialize_


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 (as HF's LlamaRMSNorm)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                   dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for positions 0..L-1 (HF's default RoPE; frequencies repeated twice).

    Computed in fp32 on every call instead of cached in a buffer, so casting the model to
    bf16/fp16 (as DeepSpeed does) never degrades the frequencies.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)                                   # [head_dim / 2]
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]                           # [L, head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)                               # [L, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (HF's convention, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, head_dim] rotated by position; cos/sin [L, head_dim]."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary q/k; projections without bias.

    h [B, L, d] -> q [B, n_heads, L, hd], k/v [B, n_kv_heads, L, hd] (each kv head serves
    n_heads / n_kv_heads query heads) -> SDPA(is_causal) -> o_proj -> [B, L, d].
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = h.shape
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self._attend(q, k, v, is_causal=True)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [B, n_heads, T, hd], k/v [B, n_kv_heads, S, hd] -> o_proj output [B, T, d]."""
        batch, _, length, _ = q.shape
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # HF's repeat_kv: kv head g serves query heads g*group .. (g+1)*group-1
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))

    def forward_step(self, h: torch.Tensor, cache: Dict[str, torch.Tensor], start: int,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] at positions start..start+T-1 (cos/sin [T, hd] of those positions) ->
        [B, T, d], appending the new rotated keys and values to ``cache`` [B, n_kv, n_ctx, hd]."""
        batch, length, _ = h.shape
        end = start + length
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cache["k"][:, :, start:end] = apply_rotary(k, cos, sin)
        cache["v"][:, :, start:end] = v
        q = apply_rotary(q, cos, sin)
        keys, values = cache["k"][:, :, :end], cache["v"][:, :, :end]
        if length == 1:            # one new token sees every cached position
            return self._attend(q, keys, values)
        if start == 0:             # a prompt from scratch: plain causal attention
            return self._attend(q, keys, values, is_causal=True)
        # several new tokens after cached ones: query i (position start+i) sees keys j <= start+i
        allowed = torch.arange(end, device=h.device)[None, :] <= torch.arange(start, end, device=h.device)[:, None]
        return self._attend(q, keys, values, attn_mask=allowed)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, d_model: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """``h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(d_model, eps)
        self.self_attn = LlamaAttention(d_model, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(d_model, eps)
        self.mlp = LlamaMLP(d_model, intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_step(self, h: torch.Tensor, cache: Dict[str, torch.Tensor], start: int,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn.forward_step(self.input_layernorm(h), cache, start, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBackbone(nn.Module):
    """HF's ``LlamaModel`` part: embed_tokens -> layers -> norm (names match HF's ``model.*``)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 intermediate_size: int, eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(d_model, n_heads, n_kv_heads, intermediate_size, eps) for _ in range(n_layers))
        self.norm = RMSNorm(d_model, eps)


class LlamaLM(CausalLM):
    """Llama causal LM (``model.kind: transformer``); ``LlamaLM(model_cfg, vocab_size=None)``.

    ``n_kv_heads = 0`` means n_heads (plain multi-head attention); ``intermediate_size = 0``
    means 4 * d_model (the paper's setting).
    """

    kind = "transformer"

    def __init__(self, model_cfg: Any, vocab_size: Optional[int] = None):
        super().__init__(model_cfg, vocab_size)
        c = self.config_dict
        self.n_heads = c["n_heads"]
        self.n_kv_heads = c["n_kv_heads"] or c["n_heads"]
        self.head_dim = c["d_model"] // c["n_heads"]
        self.intermediate_size = c["intermediate_size"] or 4 * c["d_model"]
        self.rope_theta = float(c["rope_theta"])
        self.model = self._build_backbone(c)
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        initialize_(self, c, default_scheme="gpt")  # RMSNorm weights stay 1
        if c["tie_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _build_backbone(self, c: Dict[str, Any]) -> nn.Module:
        """embed_tokens -> layers -> norm; subclasses swap in their own decoder layers."""
        return LlamaBackbone(c["vocab_size"], c["d_model"], c["n_layers"], self.n_heads,
                             self.n_kv_heads, self.intermediate_size, c["norm_eps"])

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (L <= n_ctx) -> [B, L, d] after the final RMSNorm."""
        length = self.check_length(input_ids)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(length, self.head_dim, self.rope_theta, h.device, h.dtype)
        for layer in self.model.layers:
            h = self.call_block(layer, h, cos, sin)
        return self.model.norm(h)

    def run_blocks(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """embeddings [B, L, d] through decoder layers 0..k-1 at positions 0..L-1 -> [B, L, d]
        (no final RMSNorm)."""
        h = embeddings
        cos, sin = rotary_cos_sin(h.shape[1], self.head_dim, self.rope_theta, h.device, h.dtype)
        for layer in self.model.layers[:k]:
            h = layer(h, cos, sin)
        return h

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        """Per layer a KV cache: rotated keys and values [B, n_kv_heads, n_ctx, head_dim]."""
        shape = (batch_size, self.n_kv_heads, self.n_ctx, self.head_dim)
        layers = [{"k": self._cache_tensor(*shape), "v": self._cache_tensor(*shape)} for _ in self.model.layers]
        return DecodingCache(length=0, layers=layers)

    def step_hidden_states(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        start, end = cache.length, cache.length + input_ids.shape[1]
        h = self.model.embed_tokens(input_ids)
        # Same frequencies as the full forward (computed for 0..end-1), rows of the new positions.
        cos, sin = rotary_cos_sin(end, self.head_dim, self.rope_theta, h.device, h.dtype)
        cos, sin = cos[start:end], sin[start:end]
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            h = layer.forward_step(h, layer_cache, start, cos, sin)
        return self.model.norm(h)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B::

            6 * matmul_params  +  6 * n_layers * d * (L + 1)

        matmul_params = all Linear weights incl. the LM head (not the embedding lookup):
        n_layers * (2 d^2 + 2 d * n_kv_heads * head_dim + 3 d * intermediate_size) + V * d.
        6 * n_layers * d * (L + 1) covers QK^T and AV over the causal half only: position t
        attends to t + 1 keys, 2 * 2 * d * (L + 1) / 2 forward FLOPs per token averaged over
        positions, x3 for training (PaLM's 12 * n_layers * d * L counts the full L x L scores).
        """
        length = self._sequence_length_for_flops(seq_len)
        return 6.0 * self.matmul_params() + 6.0 * self.config_dict["n_layers"] * self.d_model * (length + 1)

    def hf_config_dict(self) -> Dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig`` that rebuild this exact model."""
        c = self.config_dict
        return dict(
            vocab_size=c["vocab_size"],
            hidden_size=c["d_model"],
            intermediate_size=self.intermediate_size,
            num_hidden_layers=c["n_layers"],
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=c["n_ctx"],
            rms_norm_eps=c["norm_eps"],
            rope_theta=self.rope_theta,
            tie_word_embeddings=bool(c["tie_embeddings"]),
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            initializer_range=c["init_std"],
        )
