"""Masked mixer autoencoder (the masked-mixer papers' autoencoders): how much of a block of text one
d-dimensional vector can hold.

::

    H = encoder(wte(ids))               encoder_layers x MixerBlock (causal), ids [B, L]
    e = H[:, -1]                        the last token's final hidden state, [B, d]
    e = up(down(e))                     optional bottleneck Linear(d, d/c) -> Linear(d/c, d) (c = compression > 1)
    D = decoder(repeat(e, L))           decoder_layers x MixerBlock (causal) over L copies of e
    logits = lm_head(final_norm(D))     [B, L, V]
    loss = CE(logits, ids)              **unshifted**: position t reconstructs token t

The blocks are the mixer's :class:`~mmtrain.models.mixer.MixerBlock` (so ``mixer_heads`` and
``mixer_expansion`` apply to both stacks). The logits depend on the input only through ``e``: the
decoder sees nothing but L copies of it and tells positions apart by its token-mixing weights and
per-position biases. The decoder is causal over its own input positions, the encoder over the
tokens; e sits at the last position, so it has read every token (right padding included, which the
loss then ignores). Length L <= n_ctx works as for the mixer.

``label_shift = 0``: the model defines its own loss (:meth:`MixerAutoencoderLM.compute_loss`) and
tells the trainer and ``eval-lm`` to score position t against token t. ``mmtrain generate`` refuses
it: it reconstructs a given text rather than continuing one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.layers import IGNORE_INDEX, CausalLM, DecodingCache, _numel
from mmtrain.models.mixer import MixerBlock

NOT_GENERATIVE = ("a mixer_autoencoder reconstructs its whole input from one embedding of it; it does not "
                  "predict next tokens, so it cannot continue a prompt; score it with `mmtrain eval-lm`")


def reconstruction_loss(logits: torch.Tensor, labels: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unshifted cross-entropy ``CE(logits[:, t], labels[:, t])`` averaged over counted positions.

    logits [B, L, V], labels [B, L] (``-100`` = ignore), attention_mask [B, L] or None (0 = ignore).
    Computed in fp32 (NaN when nothing is counted, as in PyTorch).
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class Bottleneck(nn.Module):
    """e [B, d] -> up(down(e)): Linear(d, d/c) -> Linear(d/c, d), both with bias."""

    def __init__(self, d_model: int, compression: int):
        super().__init__()
        self.down = nn.Linear(d_model, d_model // compression)
        self.up = nn.Linear(d_model // compression, d_model)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(e))


class MixerAutoencoderLM(CausalLM):
    """Mixer autoencoder (``model.kind: mixer_autoencoder``).

    Config keys: the mixer's (d_model, n_ctx, ffn_mult, mixer_heads, mixer_expansion, norm_eps,
    final_norm, tie_embeddings) plus ``encoder_layers`` / ``decoder_layers`` (0 = n_layers) and
    ``compression``. State-dict names: ``wte.weight``, ``encoder.{i}.*`` and ``decoder.{i}.*``
    (mixer block names), ``bottleneck.{down,up}.*`` when compression > 1, ``final_norm.*``,
    ``lm_head.weight``.
    """

    kind = "mixer_autoencoder"
    label_shift = 0
    generation_unsupported = NOT_GENERATIVE

    def __init__(self, model_cfg: Any, vocab_size: Optional[int] = None):
        super().__init__(model_cfg, vocab_size)
        c = self.config_dict
        d = c["d_model"]
        self.encoder_layers = c["encoder_layers"] or c["n_layers"]
        self.decoder_layers = c["decoder_layers"] or c["n_layers"]

        def block() -> MixerBlock:
            return MixerBlock(d, c["n_ctx"], c["ffn_mult"], c["mixer_heads"], c["mixer_expansion"], c["norm_eps"],
                              c["mixer_block_size"], c["mixer_layout"], c["mixer_matrix"], c["mixer_fft_min_length"])

        self.wte = nn.Embedding(c["vocab_size"], d)
        self.encoder = nn.ModuleList(block() for _ in range(self.encoder_layers))
        self.bottleneck = Bottleneck(d, c["compression"]) if c["compression"] > 1 else nn.Identity()
        self.decoder = nn.ModuleList(block() for _ in range(self.decoder_layers))
        self._finish_mixer_lm()

    @property
    def embedding(self) -> nn.Embedding:
        return self.wte

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> e [B, d]: the encoder's last-position state, through the bottleneck."""
        self.check_length(input_ids)
        h = self.wte(input_ids)
        for block in self.encoder:
            h = self.call_block(block, h)
        return self.bottleneck(h[:, -1])

    def decoder_hidden_states(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder blocks + final norm on any input h [B, L, d] (causal over its positions)."""
        for block in self.decoder:
            h = self.call_block(block, h)
        return self.final_norm(h)

    def decode(self, e: torch.Tensor, length: int) -> torch.Tensor:
        """e [B, d] -> decoder hidden states [B, length, d] (length <= n_ctx)."""
        return self.decoder_hidden_states(e[:, None, :].expand(-1, length, -1))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, d]: decode(encode(input_ids), L)."""
        return self.decode(self.encode(input_ids), input_ids.shape[1])

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return reconstruction_loss(logits, labels, attention_mask)

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        raise NotImplementedError(NOT_GENERATIVE)

    def step_hidden_states(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        raise NotImplementedError(NOT_GENERATIVE)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per input token (forward + backward = 3 x forward) at sequence length L::

            6 * (matmul_params - bottleneck) + 6 * bottleneck / L
              + 3 * (encoder_layers + decoder_layers) * mixing_forward_flops_per_token

        Every encoder and decoder position runs its blocks and the LM head runs on every decoder
        position (matmul_params = all Linear weights incl. the LM head); the bottleneck runs once
        per sequence. Token mixing is counted as the mixer counts it (its blocks' own
        ``forward_flops_per_token``).
        """
        length = self._sequence_length_for_flops(seq_len)
        bottleneck = sum(_numel(m.weight) for m in self.bottleneck.modules() if isinstance(m, nn.Linear))
        blocks = list(self.encoder) + list(self.decoder)
        mixing = sum(block.token_mixing.forward_flops_per_token(length, self.d_model) for block in blocks)
        return 6.0 * (self.matmul_params() - bottleneck) + 6.0 * bottleneck / length + 3.0 * mixing
