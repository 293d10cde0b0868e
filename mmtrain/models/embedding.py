"""The embedding head: a causal LM as a sentence embedder.

The embedding of a right-padded sequence is its final hidden states pooled over the real tokens
(``mean``; ``last``: the state at the last real token, ``length - 1``; ``second_to_last``: the one
before it, the paper's index -2), L2-normalised in fp32. The models being causal, padding never
changes a real token's state.

:class:`Embedder` is the module retrieval training trains: the LM (as ``lm``), the pooling, and
optionally CLIP's learned logit scale (``logit_scale``, temperature = exp(-logit_scale)). One call
``embedder(input_ids, lengths)`` embeds, so under ZeRO-3 the engine gathers every parameter the
embedding needs; export takes the ``lm`` submodule's weights.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

POOLINGS = ("last", "second_to_last", "mean")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """[B, L, d] hidden states of right-padded sequences of ``lengths`` -> [B, d] L2-normalised fp32."""
    lengths = lengths.to(hidden.device).long()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        out = hidden[rows, lengths - 1]
    elif pooling == "second_to_last":
        out = hidden[rows, (lengths - 2).clamp(min=0)]
    elif pooling == "mean":
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        out = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return F.normalize(out.float(), dim=-1)


def embed(model, input_ids: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Embeddings [B, d] of right-padded ``input_ids`` [B, L]; the pad tail beyond the longest is cut."""
    longest = int(lengths.max())
    return pool(model.hidden_states(input_ids[:, :longest]), lengths, pooling)


class Embedder(torch.nn.Module):
    """A causal LM as an embedder: ``forward(input_ids, lengths)`` -> [B, d] L2-normalised fp32.

    ``temperature``: when given, a learned InfoNCE temperature starts there (CLIP's logit scale,
    trained at :data:`LOGIT_SCALE_LR` x the learning rate, kept >= :data:`MIN_TEMPERATURE`)."""

    #: the learned temperature's parameter; not part of the exported LM (its value goes to the embedder settings)
    LOGIT_SCALE = "logit_scale"
    #: Adam steps are ~lr in parameter space: at retrieval LRs the log-temperature would otherwise barely move
    LOGIT_SCALE_LR = 100.0
    MIN_TEMPERATURE = 0.01

    def __init__(self, lm: torch.nn.Module, pooling: str = "mean", temperature: Optional[float] = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.lm, self.pooling = lm, pooling
        self.logit_scale = (torch.nn.Parameter(torch.full((1,), -math.log(temperature)))
                            if temperature is not None else None)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return embed(self.lm, input_ids, lengths, self.pooling)

    def learned_temperature(self) -> Optional[torch.Tensor]:
        """exp(-logit_scale), at least MIN_TEMPERATURE (a tensor with gradient); None when fixed."""
        if self.logit_scale is None:
            return None
        return torch.exp(-self.logit_scale[0]).clamp(min=self.MIN_TEMPERATURE)

    def scaled_parameters(self) -> List[Tuple[torch.nn.Parameter, float]]:
        """Parameters trained at a multiple of the learning rate, without weight decay."""
        return [(self.logit_scale, self.LOGIT_SCALE_LR)] if self.logit_scale is not None else []

    def num_params(self) -> int:
        return self.lm.num_params()

    def stored_params(self) -> int:
        return self.lm.stored_params() if hasattr(self.lm, "stored_params") else self.lm.num_params()


def lm_state_dict(state: dict) -> dict:
    """The LM's weights out of a trained :class:`Embedder`'s state dict (``lm.`` names; the logit
    scale left out); a state dict of a bare LM passes through without its ``logit_scale``."""
    if any(k.startswith("lm.") for k in state):
        return {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
    return {k: v for k, v in state.items() if k != Embedder.LOGIT_SCALE}
