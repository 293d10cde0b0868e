"""Bidirectional ("double") masked mixer (from the masked-mixer follow-up work): an encoder that reads both sides of a
position but never the token it is trained to predict.

Two streams start from the same embeddings ``x = y = wte(ids)`` and run through every block side by
side; they are summed only after the last block::

    block:   x = x + Mix_fwd(LN_x(x))          Mix_fwd = (W_f ⊙ tril(1))[:L, :L] · U + b_f
             y = y + Mix_rev(LN_y(y))          Mix_rev = (W_r ⊙ triu(1, diagonal=2))[:L, :L] · U + b_r
             x = x + MLP(LN(x));  y = y + MLP(LN(y))     (MLP and its LayerNorm shared by the streams)
    output:  logits = lm_head(final_norm(x + y))

The forward stream at position n reads tokens <= n; the reverse stream at n reads token n itself
(its residual) and tokens >= n+2, never n+1 (the reverse mask's diagonal 2 skips it). Summing
per block instead would leak: x_{n+1} holds token n+1 and y_n would read it at the next block.

**What the loss means.** Training uses the ordinary shifted cross-entropy ``CE(logits[:, :-1],
ids[:, 1:])``: position n predicts token n+1 from every other token of the block (<= n and >= n+2),
a fill-in-the-blank task, not language modelling. Its loss is therefore not comparable with a
causal model's next-token loss (it is lower for the same data), and the model cannot generate text
left to right: ``mmtrain generate`` refuses it. ``eval-lm`` reports the same fill-in loss.
The reverse stream reads right padding like any other token (padding is never a target);
train and evaluate on shards of the same packing.

The forward stream uses the mixer's flat token mixing; a model built for n_ctx runs any length
L <= n_ctx with the top-left L x L blocks of both matrices. With ``model.mixer_matrix: toeplitz``
both are Toeplitz: the forward one ``k_f[i - j]`` (j <= i), the reverse one ``k_r[j - n]`` (j >= n+2,
:class:`~mmtrain.models.toeplitz.ReverseToeplitzMixing`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from mmtrain.models.layers import CausalLM, DecodingCache, _numel
from mmtrain.models.mixer import MLP, CausalMixingMatrix, flat_token_mixing
from mmtrain.models.toeplitz import ReverseToeplitzMixing

NOT_GENERATIVE = ("a bidirectional_mixer reads tokens after the position it predicts (n+2 onwards), so "
                  "it cannot continue a text left to right; use it with `mmtrain eval-lm` or as an encoder")


class ReverseTokenMixing(CausalMixingMatrix):
    """``(W ⊙ triu(1, 2))[:L, :L] · U + b[:L, None]``: output n mixes inputs n+2 .. L-1.

    U [B, L, d] -> [B, L, d]. Parameters: the matrix (packed: the lower triangle of ``Wᵀ``, about
    half of n_ctx^2; dense: weight [n_ctx, n_ctx] with a mask) and bias [n_ctx]; the last two rows
    have no live input (only their bias). Forward cost per token, counting the live entries
    ((L-1)(L-2)/2 of them) as the mixer counts its lower triangle: d * (L-1) * (L-2) / L FLOPs.
    """

    def __init__(self, n_ctx: int, layout: str = "packed", block_size: int = 0):
        super().__init__(n_ctx, layout=layout, block_size=block_size, diagonal=-2, transposed=True)

    def forward_flops_per_token(self, seq_len: int, d_model: int) -> float:
        return float(d_model * (seq_len - 1) * (seq_len - 2)) / seq_len


class BidirectionalMixerBlock(nn.Module):
    """One block of both streams: (x, y) [B, L, d] each -> (x, y)."""

    def __init__(self, d_model: int, n_ctx: int, ffn_mult: int, eps: float, layout: str = "packed",
                 block_size: int = 0, matrix: str = "general", fft_min_length: int = 0):
        super().__init__()
        self.token_norm = nn.LayerNorm(d_model, eps=eps)
        self.token_mixing = flat_token_mixing(n_ctx, block_size, layout, matrix, fft_min_length)
        self.reverse_norm = nn.LayerNorm(d_model, eps=eps)
        self.reverse_mixing = (ReverseToeplitzMixing(n_ctx, 2, fft_min_length) if matrix == "toeplitz"
                               else ReverseTokenMixing(n_ctx, layout, block_size))
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, ffn_mult * d_model)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.token_mixing(self.token_norm(x))
        y = y + self.reverse_mixing(self.reverse_norm(y))
        return x + self.mlp(self.mlp_norm(x)), y + self.mlp(self.mlp_norm(y))


class BidirectionalMixerLM(CausalLM):
    """Bidirectional masked mixer (``model.kind: bidirectional_mixer``).

    Config keys: d_model, n_layers, n_ctx, ffn_mult, norm_eps, final_norm, tie_embeddings (flat
    token mixing only). State-dict names: ``wte.weight``, ``blocks.{i}.{token_norm, token_mixing,
    reverse_norm, reverse_mixing, mlp_norm, mlp.fc_in, mlp.fc_out}.*``, ``final_norm.*``,
    ``lm_head.weight``.
    """

    kind = "bidirectional_mixer"
    generation_unsupported = NOT_GENERATIVE

    def __init__(self, model_cfg: Any, vocab_size: Optional[int] = None):
        super().__init__(model_cfg, vocab_size)
        c = self.config_dict
        d = c["d_model"]
        self.wte = nn.Embedding(c["vocab_size"], d)
        self.blocks = nn.ModuleList(BidirectionalMixerBlock(d, c["n_ctx"], c["ffn_mult"], c["norm_eps"], c["mixer_layout"],
                                                            c["mixer_block_size"], c["mixer_matrix"],
                                                            c["mixer_fft_min_length"])
                                    for _ in range(c["n_layers"]))
        self._finish_mixer_lm()

    @property
    def embedding(self) -> nn.Embedding:
        return self.wte

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (L <= n_ctx) -> final_norm(x + y) [B, L, d]; row n never depends on
        token n+1."""
        self.check_length(input_ids)
        x = y = self.wte(input_ids)
        for block in self.blocks:
            x, y = self.call_block(block, x, y)
        return self.final_norm(x + y)

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        raise NotImplementedError(NOT_GENERATIVE)

    def step_hidden_states(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        raise NotImplementedError(NOT_GENERATIVE)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length L::

            6 * (n_layers * 2 * 2 * ffn_mult * d^2 + V * d)  +  3 * n_layers * (fwd_mixing + rev_mixing)

        Both streams go through the (shared) MLP, so each MLP weight is used twice per token; the
        LM head runs once, on x + y. The two masked products count their live entries: the forward
        one as the mixer counts it (``FlatTokenMixing.forward_flops_per_token``), the reverse one
        d * (L-1) * (L-2) / L per token (:class:`ReverseTokenMixing`).
        """
        length = self._sequence_length_for_flops(seq_len)
        mlp = sum(_numel(block.mlp.fc_in.weight) + _numel(block.mlp.fc_out.weight) for block in self.blocks)
        head = _numel(self.lm_head.weight)
        mixing = sum(block.token_mixing.forward_flops_per_token(length, self.d_model)
                     + block.reverse_mixing.forward_flops_per_token(length, self.d_model) for block in self.blocks)
        return 6.0 * (2 * mlp + head) + 3.0 * mixing
