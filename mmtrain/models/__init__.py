"""Model registry: ``build_model(model_cfg, vocab_size)`` picks the class by ``model.kind``.

Models are plain PyTorch modules sharing the :class:`~mmtrain.models.layers.CausalLM`
interface; none of them imports deepspeed. To add a variant, subclass ``CausalLM`` (set its
``kind``) and add it to :data:`MODELS`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from mmtrain.models.layers import CausalLM, CausalLMOutput, causal_lm_loss, resolve_model_config
from mmtrain.models.autoencoder import MixerAutoencoderLM
from mmtrain.models.bidirectional import BidirectionalMixerLM
from mmtrain.models.hybrid import HybridLM
from mmtrain.models.mixer import MaskedMixerLM
from mmtrain.models.transformer import LlamaLM

MODELS: Dict[str, Type[CausalLM]] = {
    "mixer": MaskedMixerLM,
    "transformer": LlamaLM,
    "hybrid": HybridLM,
    "bidirectional_mixer": BidirectionalMixerLM,
    "mixer_autoencoder": MixerAutoencoderLM,
}


def build_model(model_cfg: Any, vocab_size: Optional[int] = None) -> CausalLM:
    """Build the model described by ``model_cfg`` (DictConfig / ModelConfig / dict).

    ``vocab_size`` (from the tokenizer or shards) is used when ``model_cfg.vocab_size`` is 0;
    a positive ``model_cfg.vocab_size`` that differs from it raises ValueError naming both.
    """
    config = resolve_model_config(model_cfg, vocab_size)
    kind = config["kind"]
    if kind not in MODELS:
        raise ValueError(f"model.kind: unknown model kind {kind!r}; known kinds: {', '.join(sorted(MODELS))}")
    return MODELS[kind](config)


__all__ = ["MODELS", "BidirectionalMixerLM", "CausalLM", "CausalLMOutput", "HybridLM", "LlamaLM",
           "MaskedMixerLM", "MixerAutoencoderLM", "build_model",
           "causal_lm_loss", "resolve_model_config"]
