"""Pieces every language model in mmtrain shares.

- :func:`resolve_model_config`: any form of :class:`~mmtrain.models.schema.ModelConfig` (OmegaConf node,
  dataclass, plain dict) -> a validated plain dict with ``vocab_size`` resolved. The dict is what
  a model stores as ``model.config_dict`` and what export code needs to rebuild the model.
- :func:`causal_lm_loss`: shifted next-token cross-entropy with ``-100`` ignored.
- :class:`CausalLM`: the base class fixing the model interface (``forward``, ``hidden_states``,
  ``num_params``, ``flops_per_token``, incremental decoding with ``init_cache`` / ``forward_step``;
  embeddings: :class:`mmtrain.models.embedding.Embedder`). Loading a bundle is
  :func:`mmtrain.export.bundle.load_pretrained`.
- :class:`DecodingCache`: what incremental decoding keeps between calls (per-layer tensors).

Models are plain single-device PyTorch: nothing here (or in any model file) imports deepspeed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmtrain.config import ConfigError
from mmtrain.models.schema import ModelConfig, validate_model

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What every model's ``forward`` returns.

    logits: [B, L, V] next-token logits (position t predicts token t+1).
    loss:   scalar shifted cross-entropy, or None when no labels were given.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


@dataclass
class DecodingCache:
    """State of incremental decoding for one batch of sequences.

    length: positions 0..length-1 have been processed (the next token goes to position ``length``).
    layers: one dict of preallocated tensors per block, each with an ``n_ctx`` position axis
            (what is cached is model specific: normalised inputs for a mixer, keys/values for
            the transformer); only the first ``length`` positions hold data.
    """

    length: int
    layers: List[Dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _as_plain_dict(model_cfg: Any) -> Dict[str, Any]:
    if isinstance(model_cfg, DictConfig):
        return dict(OmegaConf.to_container(model_cfg, resolve=True))
    if dataclasses.is_dataclass(model_cfg) and not isinstance(model_cfg, type):
        return dataclasses.asdict(model_cfg)
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise TypeError(f"model config must be a DictConfig, a ModelConfig dataclass or a dict, "
                    f"got {type(model_cfg).__name__}")


def resolve_model_config(model_cfg: Any, vocab_size: Optional[int] = None) -> Dict[str, Any]:
    """Validated plain-dict copy of a model config with ``vocab_size`` resolved.

    ``model_cfg`` is a DictConfig of :class:`ModelConfig`, the dataclass itself, or a plain dict
    (missing keys take ModelConfig's defaults; unknown keys are an error).

    Vocabulary rule: ``model_cfg.vocab_size == 0`` means "take it from the tokenizer / shards",
    so the ``vocab_size`` argument is used. A positive ``model_cfg.vocab_size`` must agree with
    the argument when both are given. Raises ValueError (``ConfigError``) otherwise.
    """
    raw = _as_plain_dict(model_cfg)
    defaults = dataclasses.asdict(ModelConfig())
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConfigError([f"model.{k}: unknown key; model accepts: {', '.join(defaults)}" for k in unknown])
    config = {**defaults, **raw}

    configured = int(config["vocab_size"])
    if vocab_size is not None and configured > 0 and configured != int(vocab_size):
        raise ValueError(f"model.vocab_size={configured} in the config differs from vocab_size={vocab_size} "
                         "of the tokenizer / shards; set model.vocab_size=0 to take it from the data, "
                         "or make them agree")
    if configured == 0:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError("model.vocab_size is 0 (= take it from the data) but no vocab_size was given "
                             f"(got {vocab_size!r})")
        config["vocab_size"] = int(vocab_size)

    problems = validate_model(OmegaConf.create(config), prefix="model")
    if problems:
        raise ConfigError(problems)
    return config


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shifted next-token cross-entropy: ``CE(logits[:, :-1], labels[:, 1:])``.

    logits [B, L, V], labels [B, L] (``-100`` = ignore, e.g. pads), attention_mask [B, L] or None
    (positions where it is 0 are ignored too). Mean over the counted target tokens, computed in
    fp32 whatever the logits' dtype (NaN if no target token is counted, as in PyTorch).
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    vocab = logits.shape[-1]
    predictions = logits[:, :-1, :].reshape(-1, vocab).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


def _numel(param: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local numel() is 0)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


class CausalLM(nn.Module):
    """Interface shared by all mmtrain language models.

    Subclasses set ``kind`` (the registry key), build ``lm_head`` (an ``nn.Linear(d, V)``) and
    ``embedding`` (the input ``nn.Embedding``), and implement :meth:`hidden_states` and
    :meth:`flops_per_token`.
    """

    kind: str = ""

    def __init__(self, model_cfg: Any, vocab_size: Optional[int] = None):
        super().__init__()
        self.config_dict: Dict[str, Any] = resolve_model_config(model_cfg, vocab_size)
        if self.kind and self.config_dict["kind"] != self.kind:
            raise ValueError(f"{type(self).__name__} builds model.kind={self.kind!r}, "
                             f"but the config says kind={self.config_dict['kind']!r}")
        self.n_ctx: int = self.config_dict["n_ctx"]
        self.vocab_size: int = self.config_dict["vocab_size"]
        self.d_model: int = self.config_dict["d_model"]

    # -- to implement ---------------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def _finish_mixer_lm(self) -> None:
        """The end of every mixer-family constructor (after ``self.wte`` and the blocks exist):
        ``final_norm`` (LayerNorm when model.final_norm, else identity), the bias-free LM head,
        the model.init scheme (:func:`initialize_`; ``auto`` = ``paper`` for the mixer family),
        and the tied head when model.tie_embeddings."""
        c = self.config_dict
        self.final_norm = nn.LayerNorm(c["d_model"], eps=c["norm_eps"]) if c["final_norm"] else nn.Identity()
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        initialize_(self, c, default_scheme="paper")
        if c["tie_embeddings"]:
            self.lm_head.weight = self.wte.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, d] for input_ids [B, L] (after the final norm, if any)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        raise NotImplementedError

    def init_cache(self, batch_size: int = 1) -> DecodingCache:
        """An empty :class:`DecodingCache` for ``batch_size`` sequences (on the model's device/dtype)."""
        raise NotImplementedError

    def step_hidden_states(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        """Hidden states [B, T, d] of input_ids [B, T] placed at positions cache.length..+T-1,
        reading earlier positions from ``cache`` and writing these T into it (not ``cache.length``)."""
        raise NotImplementedError

    def run_blocks(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """The first k blocks applied to embeddings [B, L, d] -> [B, L, d] (no final norm).
        Called through :meth:`block_outputs`, which checks the arguments."""
        raise NotImplementedError(f"{type(self).__name__} (model.kind={self.kind!r}) cannot run its first k "
                                  "blocks on given embeddings: it does not implement run_blocks "
                                  "(needed by `mmtrain analyze-representation`)")

    @property
    def num_blocks(self) -> int:
        """Number of blocks :meth:`block_outputs` can run (model.n_layers)."""
        return int(self.config_dict["n_layers"])

    def block_outputs(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """Output O = f_k(E) of the first ``k`` blocks (1..num_blocks) for input embeddings E [B, L, d]
        (L <= n_ctx), before any final norm: the target of input-representation analysis.
        Differentiable with respect to ``embeddings``."""
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}.block_outputs: embeddings must be [batch, length, "
                             f"d_model={self.d_model}], got shape {tuple(embeddings.shape)}")
        if not 1 <= embeddings.shape[1] <= self.n_ctx:
            raise ValueError(f"{type(self).__name__}.block_outputs: length {embeddings.shape[1]} is outside "
                             f"1..n_ctx={self.n_ctx}")
        if not 1 <= int(k) <= self.num_blocks:
            raise ValueError(f"{type(self).__name__}.block_outputs: k={k} blocks, expected 1..{self.num_blocks}")
        return self.run_blocks(embeddings, int(k))

    # -- shared ---------------------------------------------------------------------------
    def call_block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        """``block(*args)``; with ``model.activation_checkpointing`` on (and autograd recording)
        through ``torch.utils.checkpoint`` (non-reentrant), so the block's activations are
        recomputed in the backward pass instead of stored."""
        if self.config_dict.get("activation_checkpointing") and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> "CausalLMOutput":
        """input_ids [B, L] (L <= n_ctx) -> :class:`CausalLMOutput` (logits [B, L, V]; loss when
        labels [B, L] are given).

        ``attention_mask`` [B, L] only removes positions from the loss: the models are causal,
        so right padding never changes the outputs at real tokens. Embeddings:
        :class:`mmtrain.models.embedding.Embedder`.
        """
        logits = self.lm_head(self.hidden_states(input_ids))
        loss = None if labels is None else self.compute_loss(logits, labels, attention_mask)
        return CausalLMOutput(logits=logits, loss=loss)

    #: The logits at position t are scored against the label at t + label_shift: 1 = next-token
    #: prediction (every causal LM), 0 = reconstruction of the input (the mixer autoencoder).
    #: Code that scores or counts targets outside ``forward`` (trainers, eval-lm) reads it.
    label_shift: int = 1

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss ``forward`` returns: shifted next-token cross-entropy (:func:`causal_lm_loss`).
        A model with another objective overrides it together with ``label_shift``."""
        return causal_lm_loss(logits, labels, attention_mask)

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        """Incremental decoding: logits [B, T, V] for input_ids [B, T] that continue the sequences
        held in ``cache`` (T = prompt length for the first call, then usually 1).

        Equal (up to float rounding) to ``forward(all_ids).logits[:, -T:]`` on the whole sequence
        so far, at a cost per new token that grows with the current length L (O(L * d) per layer)
        instead of a full forward pass. Advances ``cache.length`` by T; ValueError past n_ctx.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"{type(self).__name__}.forward_step: input_ids must be [batch, T>=1], "
                             f"got shape {tuple(input_ids.shape)}")
        end = cache.length + input_ids.shape[1]
        if end > self.n_ctx:
            raise ValueError(f"{type(self).__name__}: decoding to position {end} would exceed "
                             f"n_ctx={self.n_ctx} (the model was built for at most {self.n_ctx} tokens)")
        hidden = self.step_hidden_states(input_ids, cache)
        cache.length = end
        return self.lm_head(hidden)

    def _cache_tensor(self, *shape: int) -> torch.Tensor:
        """A zero tensor on the model's device and floating dtype (for cache buffers)."""
        param = self.lm_head.weight
        return torch.zeros(*shape, device=param.device, dtype=param.dtype)

    def check_length(self, input_ids: torch.Tensor) -> int:
        """The sequence length of input_ids [B, L]; ValueError if it is not 1..n_ctx."""
        if input_ids.dim() != 2:
            raise ValueError(f"{type(self).__name__}: input_ids must be [batch, length], "
                             f"got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if not 1 <= length <= self.n_ctx:
            raise ValueError(f"{type(self).__name__}: input length {length} is outside 1..n_ctx={self.n_ctx}; "
                             f"the model was built for at most {self.n_ctx} tokens (model.n_ctx)")
        return length

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters, each token-mixing matrix counted as its dense
        ``n_ctx x n_ctx`` (the paper's count, the same in every storage layout; see
        :meth:`stored_params` for what the parameters hold).

        exclude_embeddings=True drops the input embedding table. When the LM head is tied to it
        the shared matrix is kept, because it is still the output projection (nanoGPT's rule).
        """
        total = self.stored_params()
        for module in self.modules():
            if getattr(module, "is_token_mixing", False):
                total += module.dense_numel() - _numel(module.mixing_parameter)
        if exclude_embeddings and self.lm_head.weight is not self.embedding.weight:
            total -= _numel(self.embedding.weight)
        return total

    def stored_params(self) -> int:
        """Values the (unique) parameters hold: what gradients, optimizer moments and ZeRO
        partitions are sized by (a packed token-mixing matrix stores about half of n_ctx^2)."""
        return sum(_numel(p) for p in self.parameters())

    def matmul_params(self) -> int:
        """Weights of all dense projections (every ``nn.Linear``, the LM head included, tied or
        not); excludes the embedding lookup, biases, norms and token-mixing matrices."""
        return sum(_numel(m.weight) for m in self.modules() if isinstance(m, nn.Linear))

    def _sequence_length_for_flops(self, seq_len: Optional[int]) -> int:
        return self.n_ctx if seq_len is None else int(seq_len)


#: Embedding std of the ``paper`` scheme: PyTorch's ``nn.Embedding`` default, N(0, 1).
PAPER_EMBEDDING_STD = 1.0


@dataclass(frozen=True)
class InitPlan:
    """What :func:`initialize_` does, resolved from a model config (see :func:`resolve_init`)."""

    scheme: str             # paper | gpt
    embedding_std: float    # N(0, embedding_std) token embeddings
    linear: str             # kaiming | normal
    linear_std: float       # std of the normal Linear init
    mixing: str             # auto | uniform | position | kaiming


def resolve_init(c: Mapping[str, Any], default_scheme: str) -> InitPlan:
    """The init a model config asks for. ``model.init: auto`` takes ``default_scheme`` (the
    family's: ``paper`` for the mixer family, ``gpt`` for transformer / hybrid);
    ``embedding_init_std`` (0 = scheme's), ``linear_init`` and ``mixing_init`` (``auto`` =
    scheme's) override its parts."""
    scheme = default_scheme if c.get("init", "auto") == "auto" else c["init"]
    std = float(c.get("init_std", 0.02))
    embedding_std = float(c.get("embedding_init_std", 0.0)) or (PAPER_EMBEDDING_STD if scheme == "paper" else std)
    linear = c.get("linear_init", "auto")
    linear = ("kaiming" if scheme == "paper" else "normal") if linear == "auto" else linear
    mixing = c.get("mixing_init", "auto")   # auto: each token-mixing module's own (its default_init)
    return InitPlan(scheme, embedding_std, linear, std, mixing)


_INIT_GATHER: contextvars.ContextVar = contextvars.ContextVar("mmtrain_init_gather", default=None)


@contextlib.contextmanager
def gathered_init(gather: Callable[[List[nn.Parameter]], Any]):
    """Build models whose modules are partitioned as they are constructed (ZeRO-3's
    ``deepspeed.zero.Init``): :func:`initialize_` then wraps each module's own parameters in
    ``gather(params)``, a context in which they are whole and after which they are written back.
    The same draws happen in the same order as without it, so a seed gives the same model."""
    token = _INIT_GATHER.set(gather)
    try:
        yield
    finally:
        _INIT_GATHER.reset(token)


def init_gather() -> Optional[Callable[[List[nn.Parameter]], Any]]:
    """The ``gather`` of the enclosing :func:`gathered_init`, else None (parameters are whole)."""
    return _INIT_GATHER.get()


def initialize_(model: nn.Module, c: Mapping[str, Any], default_scheme: str) -> InitPlan:
    """Initialise every parameter of a freshly built model as the config's init asks.

    - Linear: ``normal`` = N(0, init_std) weights and zero biases; ``kaiming`` = PyTorch's
      default (``nn.Linear.reset_parameters``: Kaiming-uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in))
      weights, and U(+-1/sqrt(fan_in)) biases).
    - Embedding: N(0, embedding_std).
    - LayerNorm: weight 1, bias 0 (RMSNorm weights stay 1).
    - Masked token mixing (modules with ``is_token_mixing = True`` and ``reset_parameters(mode)``): ``uniform``
      U(+-1/sqrt(n_in)) or ``position`` (row i U(+-1/sqrt(i+1))), masked entries zeroed; Toeplitz
      kernels ``kaiming`` (N(0, 2/n_ctx), zero bias) or ``uniform``. ``auto`` keeps the draw of
      the module's constructor (its ``default_init``: uniform, Toeplitz kaiming).

    Modules are visited in ``model.modules()`` order, so a seed gives one init. The ``gpt``
    scheme draws exactly what ``model.apply(init_normal_)`` draws (the init of earlier versions).
    Returns the resolved :class:`InitPlan`.
    """
    plan = resolve_init(c, default_scheme)
    gather = init_gather()

    def visit(module: nn.Module) -> None:
        if gather is None:
            init_module(module)
            return
        own = list(module.parameters(recurse=False))
        if own:
            with gather(own):
                init_module(module)

    def init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if plan.linear == "normal":
                init_normal_(module, plan.linear_std)
            else:
                module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=plan.embedding_std)
        elif isinstance(module, nn.LayerNorm):
            init_normal_(module, plan.linear_std)
        elif (getattr(module, "is_token_mixing", False)
              and plan.mixing not in ("auto", getattr(module, "default_init", "uniform"))):
            module.reset_parameters(plan.mixing)

    model.apply(visit)
    return plan


def init_normal_(module: nn.Module, std: float) -> None:
    """The default init used by ``model.apply``: N(0, std) for Linear / Embedding weights, zero
    biases, LayerNorm weight 1 and bias 0. Other modules initialise themselves."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
