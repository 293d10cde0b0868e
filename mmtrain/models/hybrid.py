"""Transformer + masked mixer hybrid ("transfixer", arXiv 2409.01482).

Every Llama decoder layer gets a learned, causally masked ``n_ctx x n_ctx`` token-mixing matrix
(the mixer's :class:`~mmtrain.models.mixer.FlatTokenMixing`: ``Mix(U) = (W ⊙ tril)[:L, :L] · U + b``)
next to its attention. ``model.hybrid_mode`` says where::

    sequential (the transfixer):  a = Attn(RMSNorm(h));  h = h + a + Mix(a)
    parallel:                     u = RMSNorm(h);        h = h + Attn(u) + Mix(u)
    then, both:                   h = h + SwiGLU(RMSNorm(h))

Everything else is the Llama baseline of :mod:`mmtrain.models.transformer` (RMSNorm, RoPE,
grouped-query attention, SwiGLU, final RMSNorm, untied head by default), with the same parameter
names plus ``model.layers.{i}.token_mixing.{weight,bias}``. Both attention and the masked matrix are
causal, so the hybrid is a causal LM: the logits at position t depend only on tokens <= t, and a
model built for n_ctx runs any length L <= n_ctx exactly.

Incremental decoding keeps, per layer, the attention KV cache and the inputs of the token mixing
(the attention outputs in sequential mode, the normalised inputs in parallel mode): a new token
costs O(L * d) per layer for both, as in the transformer and the mixer.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from mmtrain.models.layers import DecodingCache
from mmtrain.models.mixer import flat_token_mixing
from mmtrain.models.transformer import LlamaAttention, LlamaLM, LlamaMLP, RMSNorm

Cache = Dict[str, torch.Tensor]
MODES = ("sequential", "parallel")


class HybridDecoderLayer(nn.Module):
    """A Llama decoder layer with masked token mixing on the attention output (``sequential``) or
    beside the attention on the same normalised input (``parallel``). h [B, L, d] -> [B, L, d]."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, intermediate_size: int, eps: float,
                 n_ctx: int, mode: str, layout: str = "packed", block_size: int = 0, matrix: str = "general",
                 fft_min_length: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.hybrid_mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.input_layernorm = RMSNorm(d_model, eps)
        self.self_attn = LlamaAttention(d_model, n_heads, n_kv_heads)
        self.token_mixing = flat_token_mixing(n_ctx, block_size, layout, matrix, fft_min_length)
        self.post_attention_layernorm = RMSNorm(d_model, eps)
        self.mlp = LlamaMLP(d_model, intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        u = self.input_layernorm(h)
        a = self.self_attn(u, cos, sin)
        h = h + a + self.token_mixing(a if self.mode == "sequential" else u)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_step(self, h: torch.Tensor, cache: Cache, start: int,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same layer for new positions start..start+T-1 only: h [B, T, d] -> [B, T, d]."""
        u = self.input_layernorm(h)
        a = self.self_attn.forward_step(u, cache, start, cos, sin)
        h = h + a + self.token_mixing.forward_step(a if self.mode == "sequential" else u, cache, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridBackbone(nn.Module):
    """embed_tokens -> layers -> norm (the names of Hugging Face's ``LlamaModel``)."""

    def __init__(self, c: Dict[str, Any], n_kv_heads: int, intermediate_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(
            HybridDecoderLayer(c["d_model"], c["n_heads"], n_kv_heads, intermediate_size, c["norm_eps"],
                               c["n_ctx"], c["hybrid_mode"], c["mixer_layout"], c["mixer_block_size"],
                               c["mixer_matrix"], c["mixer_fft_min_length"])
            for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])


class HybridLM(LlamaLM):
    """Transformer + masked mixer hybrid (``model.kind: hybrid``); ``HybridLM(model_cfg, vocab_size=None)``.

    The Llama model of :class:`~mmtrain.models.transformer.LlamaLM` (same construction, forward,
    incremental decoding and ``run_blocks``) with :class:`HybridDecoderLayer` layers. Config keys:
    the transformer's (n_heads, n_kv_heads, intermediate_size, rope_theta, norm_eps) plus
    ``hybrid_mode`` (sequential | parallel). Token mixing keeps the mixer's init
    U(-1/sqrt(n_ctx), 1/sqrt(n_ctx)); linear and embedding weights are N(0, init_std).
    """

    kind = "hybrid"

    def _build_backbone(self, c: Dict[str, Any]) -> nn.Module:
        return HybridBackbone(c, self.n_kv_heads, self.intermediate_size)

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        """Per layer: rotated keys and values [B, n_kv_heads, n_ctx, head_dim] and what its token
        mixing reads (the mixer's own cache layout)."""
        shape = (batch_size, self.n_kv_heads, self.n_ctx, self.head_dim)
        layers = []
        for layer in self.model.layers:
            mixing = layer.token_mixing.init_cache(batch_size, self.d_model, self._cache_tensor)
            if {"k", "v"} & set(mixing):
                raise RuntimeError(f"token-mixing cache keys {sorted(mixing)} clash with the KV cache's k/v")
            layers.append({"k": self._cache_tensor(*shape), "v": self._cache_tensor(*shape), **mixing})
        return DecodingCache(length=0, layers=layers)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length L
        (default n_ctx)::

            transformer's count  +  3 * n_layers * mixing_forward_flops_per_token

        The transformer's count is :meth:`LlamaLM.flops_per_token` applied to this model
        (6 * matmul_params, every Linear incl. the LM head, plus attention's QK^T and AV); each
        layer's token mixing is counted as the mixer counts it
        (``FlatTokenMixing.forward_flops_per_token``).
        """
        length = self._sequence_length_for_flops(seq_len)
        mixing = sum(layer.token_mixing.forward_flops_per_token(length, self.d_model)
                     for layer in self.model.layers)
        return super().flops_per_token(length) + 3.0 * mixing
