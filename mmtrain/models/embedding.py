"""The embedding head: a causal LM as a sentence embedder.

The embedding of a right-padded sequence is its final hidden states pooled over the real tokens
(``mean``; ``last``: the state at the last real token, ``length - 1``; ``second_to_last``: the one
before it, the paper's index -2), L2-normalised in fp32. The models being causal, padding never
changes a real token's state. ``CausalLM.forward(input_ids, lengths=...)`` returns these
embeddings, so a training engine wraps the LM itself (same parameters, same checkpoint names).
"""

from __future__ import annotations

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
