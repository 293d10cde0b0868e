"""Typed configuration: OmegaConf structured dataclasses in struct mode.

``load_config(Schema, [a.yaml, b.yaml], ["train.lr=3e-4"])`` merges defaults <- YAML files (in
order) <- ``key=value`` overrides. Every unknown key, wrong type and invalid value is collected
and reported in one :class:`ConfigError` that names the key and where it came from (file or
command line). The resolved config dumps to YAML (:func:`to_yaml`) and loads back identically.

Every field carries ``metadata["help"]`` (units, example); ``mmtrain config-reference`` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` lists them one per entry."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} configuration problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def _f(default: Any, help: str, choices: Optional[Sequence[Any]] = None, factory: bool = False):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    kind: str = _f("mixer", "Model family. `mixer` = masked mixer, `transformer` = Llama baseline, "
                            "`hybrid` = Llama + masked token mixing (transfixer), `bidirectional_mixer` = "
                            "forward + reverse mixer streams (encoder), `mixer_autoencoder` = mixer "
                            "encoder -> one embedding -> mixer decoder.",
                   choices=["mixer", "transformer", "hybrid", "bidirectional_mixer", "mixer_autoencoder"])
    d_model: int = _f(256, "Hidden width d (e.g. 512).")
    n_layers: int = _f(4, "Number of blocks (e.g. 8).")
    n_ctx: int = _f(128, "Context length in tokens the model is built for (e.g. 512). A mixer's "
                         "token-mixing matrices are n_ctx x n_ctx; it runs any input of length <= n_ctx.")
    vocab_size: int = _f(0, "Vocabulary size; 0 = take it from the tokenizer / shards (the usual case).")
    mixer_heads: int = _f(0, "Mixer only. 0 = flat mixer (one n_ctx x n_ctx matrix on the full width); "
                             "h >= 1 = multi-head mixer: project to h heads of width d/h, mix each with "
                             "its own masked matrix, concatenate, project back.")
    mixer_expansion: int = _f(1, "Mixer only. 1 = flat token mixing; e > 1 = expanded mixing "
                                 "n_ctx -> e*n_ctx -> n_ctx with GELU between (both masked).")
    ffn_mult: int = _f(4, "Mixer MLP hidden width as a multiple of d_model (paper: 4).")
    final_norm: bool = _f(False, "Mixer family: apply a LayerNorm before the LM head. Off by default, as in "
                                 "the paper's code (with the paper init it learned faster without one: "
                                 "benchmarks/learning.py). The transformer always has its final RMSNorm.")
    tie_embeddings: bool = _f(False, "Share the input embedding and LM head weights.")
    hybrid_mode: str = _f("sequential", "hybrid only: where the masked token mixing sits in each Llama "
                                         "layer. `sequential` (transfixer): a = Attn(N(h)); h + a + Mix(a). "
                                         "`parallel`: h + Attn(N(h)) + Mix(N(h)).",
                          choices=["sequential", "parallel"])
    encoder_layers: int = _f(0, "mixer_autoencoder only: encoder mixer blocks; 0 = n_layers (e.g. 8).")
    decoder_layers: int = _f(0, "mixer_autoencoder only: decoder mixer blocks; 0 = n_layers (e.g. 8).")
    compression: int = _f(1, "mixer_autoencoder only: bottleneck factor c; c > 1 passes the embedding "
                             "through Linear(d, d/c) -> Linear(d/c, d) before it is repeated; 1 = none.")
    n_heads: int = _f(4, "Transformer only: attention heads (paper's compute-matched baseline: 4).")
    n_kv_heads: int = _f(0, "Transformer only: key/value heads for grouped-query attention; 0 = n_heads.")
    intermediate_size: int = _f(0, "Transformer only: SwiGLU hidden width; 0 = 4 * d_model (paper).")
    rope_theta: float = _f(10000.0, "Transformer only: RoPE base frequency.")
    norm_eps: float = _f(1e-5, "Epsilon of LayerNorm (mixer) / RMSNorm (transformer; HF Llama uses 1e-6).")
    init: str = _f("auto", "Initialisation scheme. `paper`: PyTorch's defaults, as the paper's code "
                           "(embedding N(0, 1), Linear Kaiming-uniform with U(+-1/sqrt(fan_in)) biases, "
                           "token mixing U(+-1/sqrt(n_ctx))). `gpt`: N(0, init_std) for every Linear and "
                           "embedding weight, zero biases (Hugging Face Llama's init). `auto`: paper for "
                           "the mixer family (mixer, bidirectional_mixer, mixer_autoencoder), gpt for "
                           "transformer and hybrid. The three keys below override parts of it.",
                   choices=["auto", "paper", "gpt"])
    embedding_init_std: float = _f(0.0, "Std of the N(0, std) token-embedding init; 0 = the scheme's "
                                        "(paper: 1.0, gpt: init_std). A mixer needs it near 1: its token "
                                        "mixing adds unit-scale normalised neighbours to the residual stream.")
    linear_init: str = _f("auto", "Init of Linear layers (LM head included). `kaiming`: PyTorch's default "
                                  "Kaiming-uniform weights, U(+-1/sqrt(fan_in)) biases. `normal`: N(0, "
                                  "init_std) weights, zero biases. `auto` = the scheme's (paper: kaiming, "
                                  "gpt: normal).", choices=["auto", "kaiming", "normal"])
    mixing_init: str = _f("auto", "Init of the masked token-mixing matrices (mixer family, hybrid). "
                                  "`uniform`: U(+-1/sqrt(n_in)) for weights and biases, PyTorch's Conv1d "
                                  "default the paper relies on. `position`: row i (which sums i+1 live "
                                  "inputs) drawn U(+-1/sqrt(i+1)), so every output position starts at the "
                                  "same scale. `auto` = uniform.", choices=["auto", "uniform", "position"])
    init_std: float = _f(0.02, "Std of the normal init (linear_init=normal, and the embedding under the "
                               "gpt scheme), e.g. 0.02.")
    mixer_impl: str = _f("auto", "Mixer token-mixing computation (same results to fp32 rounding, different "
                                 "speed). `dense`: (W * tril) @ U under autograd, batch-first (reference). "
                                 "`triangular`: sequence-first activations and a block-triangular op that "
                                 "computes only the lower half (forward and both gradients). `auto`: the "
                                 "same op, one dense tril block for short inputs and blocks above the "
                                 "crossover measured by benchmarks/mixing.py.",
                         choices=["auto", "dense", "triangular"])
    mixer_block_size: int = _f(0, "Rows per block of the triangular op (e.g. 256); 0 = the measured default "
                                  "(auto: one dense block for L <= 256, else 128; triangular: 128).")
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in the backward pass "
                                               "(torch.utils.checkpoint, non-reentrant): less memory, ~1/3 "
                                               "more compute.")


@dataclass
class DataConfig:
    shard_dir: str = _f("data/demo", "Directory written by `mmtrain prepare`; training reads "
                                     "<shard_dir>/ctx<n_ctx>/{train,val} and its meta.json.")
    tokenizer: str = _f("", "SentencePiece .model the shards were made with; '' = the one recorded in "
                            "the shards' meta.json. A hash mismatch with the shards is an error.")
    auto_prepare: bool = _f(True, "If the shards are missing and `prepare_input` is `demo`, prepare them "
                                  "on first use (cached afterwards).")
    prepare_input: str = _f("demo", "Corpus used by auto_prepare: `demo` (built-in Python-docstring corpus).")
    num_workers: int = _f(2, "Data-loader worker processes per rank (e.g. 2).")
    shuffle: bool = _f(True, "Shuffle training samples (seeded by train.seed).")
    num_canonical_nodes: int = _f(0, "streaming's canonical node count, which fixes the sample order; "
                                     "0 = the number of physical nodes (the order then changes with the "
                                     "node count). Set it (e.g. to the largest node count you will use) "
                                     "to keep one data order when a job is resumed on a different number of nodes.")


@dataclass
class TrainConfig:
    steps: int = _f(300, "Optimizer steps to run (one step = one global batch).")
    stop_at: int = _f(0, "Stop (with a checkpoint) after this step although the LR schedule runs to "
                         "`steps`; 0 = run to the end. For staged runs: resume later with a larger stop_at.")
    max_tokens: int = _f(0, "Token budget; when > 0 training stops once this many tokens were seen "
                            "(whichever of steps / max_tokens comes first).")
    global_batch_size: int = _f(16, "Sequences per optimizer step over all ranks "
                                    "(= micro_batch_size * grad_accum * world_size).")
    micro_batch_size: int = _f(8, "Sequences per forward/backward on one rank.")
    lr: float = _f(4e-3, "Peak learning rate (e.g. 5e-4). The default suits the quick-start size (d 256, 4 "
                         "layers): of 5e-4 ... 8e-3 it was among the best for both families "
                         "(benchmarks/learning.py); larger models want less.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = _f(20, "Linear warmup steps from 0 to lr.")
    schedule: str = _f("cosine", "Decay after warmup.", choices=["cosine", "linear", "constant"])
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms, biases, embeddings, "
                                  "token-mixing biases).")
    mixing_weight_decay: bool = _f(True, "Apply weight_decay to the masked token-mixing matrices too; "
                                         "false exempts them like norms and biases.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    seed: int = _f(0, "Seed for init, data order and dropout.")
    eval_every: int = _f(100, "Evaluate on the validation shards every N steps (0 = only at the end).")
    eval_batches: int = _f(8, "Validation micro-batches per evaluation and context length.")
    eval_n_ctx: List[int] = _f(list, "Extra (shorter) context lengths to evaluate mixers at, e.g. [32, 64]; "
                                     "the training n_ctx is always evaluated.", factory=True)


@dataclass
class EngineConfig:
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage.", choices=[0, 1, 2, 3])
    precision: str = _f("fp32", "Training precision (bf16 needs zero_stage >= 1).",
                        choices=["fp32", "bf16", "fp16"])
    grad_clip: float = _f(1.0, "Global gradient-norm clip; 0 = off.")
    offload_optimizer: bool = _f(False, "ZeRO-Offload the optimizer state to CPU (stage >= 1).")
    offload_params: bool = _f(False, "ZeRO-Offload parameters to CPU (stage 3).")
    device: str = _f("auto", "`auto` = CUDA when available, else CPU.", choices=["auto", "cpu", "cuda"])
    peak_flops: float = _f(0.0, "Peak FLOP/s per device used for MFU; 0 = measure a matmul at start.")
    torch_adam: bool = _f(True, "Use torch.optim.AdamW (builds nothing). false = DeepSpeed's fused/CPU "
                                "Adam (JIT-built on first use).")
    compile: bool = _f(False, "Experimental: torch.compile the model through DeepSpeed (engine.compile()) "
                              "after the engine is built.")


@dataclass
class LoggingConfig:
    runs_root: str = _f("runs", "Parent directory of run directories.")
    name: str = _f("", "Run name; '' = <kind>-ctx<n_ctx>-<timestamp>.")
    run_dir: str = _f("", "Explicit run directory (overrides runs_root/name).")
    log_every: int = _f(10, "Log a line and TensorBoard scalars every N steps.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar on rank 0.")


@dataclass
class CheckpointConfig:
    every: int = _f(100, "Save a checkpoint every N steps (and always at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Keep the newest K checkpoints; 0 = keep all.")
    resume: str = _f("auto", "`auto` = continue from <run_dir>/checkpoints/latest when present; "
                             "`none` = start fresh; or a checkpoint directory path.")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class TokenizerSpec:
    type: str = _f("bpe", "SentencePiece model type.", choices=["bpe", "unigram"])
    vocab_size: int = _f(4096, "Vocabulary size including the 4 special ids.")
    character_coverage: float = _f(1.0, "SentencePiece character_coverage.")
    max_sentence_length: int = _f(16384, "Longest training sentence in bytes (longer ones are skipped).")
    seed: int = _f(0, "Seed of SentencePiece's random generator (matters for unigram); training reads "
                      "the first 50 M characters in corpus order, no sampling.")


@dataclass
class PrepareConfig:
    input: List[str] = _f(lambda: ["demo"], "Corpus paths, directories or globs (.txt, .jsonl, .jsonl.gz, "
                                           ".parquet); `demo` = the built-in docstring corpus.", factory=True)
    text_field: str = _f("text", "JSONL key / Parquet column holding the document text.")
    delimiter: str = _f("", "Plain text: string separating documents inside a file; '' = one document per file.")
    out: str = _f("data/demo", "Output root; one <out>/ctx<n_ctx>/ directory per context length.")
    n_ctx: List[int] = _f(lambda: [128, 512], "Context lengths to write shards for.", factory=True)
    tokenizer: str = _f("", "Existing SentencePiece .model to use; '' = train one into <out>/tokenizer.model.")
    tokenizer_spec: TokenizerSpec = field(default_factory=TokenizerSpec)
    packing: str = _f("concat", "`concat`: documents joined with EOS and cut into blocks; `pad`: each "
                                "document truncated / right-padded to one block.", choices=["concat", "pad"])
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation (by document).")
    seed: int = _f(0, "Seed of the train/validation split.")
    num_proc: int = _f(2, "Tokenizer worker processes.")
    max_docs: int = _f(0, "Use only the first N documents; 0 = all.")
    exclude_pairs: List[str] = _f(list, "Pair directories (`mmtrain prepare-pairs`) whose held-out val and test "
                                        "pairs must not leak into pretraining: documents containing the text "
                                        "of any held-out query or document are dropped.", factory=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_struct_node(schema_node: Any) -> bool:
    return isinstance(schema_node, DictConfig)


def _flatten(data: Any, schema: DictConfig, prefix: str, source: str,
             out: List[Tuple[str, Any, str]], problems: List[str]) -> None:
    """Flatten a plain dict into (dotted key, value, source) leaves, reporting unknown keys."""
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<top level>'} ({source}): expected a mapping, got "
                        f"{type(data).__name__} {data!r}")
        return
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            hint = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            where = f"'{prefix}'" if prefix else "the top level"
            msg = f"unknown key '{dotted}' ({source})"
            msg += f"; did you mean '{hint[0]}'?" if hint else f"; {where} accepts: {', '.join(map(str, schema.keys()))}"
            problems.append(msg)
            continue
        child = schema[key]
        if _is_struct_node(child) and isinstance(value, dict):
            _flatten(value, child, dotted, source, out, problems)
        else:
            out.append((dotted, value, source))


def _parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    value = yaml.load(raw, Loader=_loader()) if raw.strip() != "" else ""
    return key, value


class _Loader(yaml.SafeLoader):
    """YAML SafeLoader that also reads 1e-4 / 3E5 (no dot) as floats, as users expect (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _loader():
    return _Loader


def _read_yaml(path: str) -> Any:
    if not os.path.exists(path):
        raise ConfigError([f"config file not found: {path}"])
    with open(path, "r", encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_loader())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return {} if data is None else data


def _set_leaf(cfg: DictConfig, key: str, value: Any, source: str, problems: List[str]) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as exc:
        node = OmegaConf.select(cfg, key)
        expected = type(node).__name__ if node is not None else "?"
        if isinstance(node, (ListConfig, list)):
            expected = "list"
        reason = str(exc).splitlines()[0]
        problems.append(f"{key} ({source}): cannot use {value!r} ({type(value).__name__}); "
                        f"expected {expected}: {reason}")


def _check_choices(cfg: DictConfig, schema_cls: type, prefix: str, problems: List[str],
                   sources: dict) -> None:
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        value = cfg[f.name]
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)):
            _check_choices(value, f.type, dotted, problems, sources)
            continue
        sub = _dataclass_type(f)
        if sub is not None:
            _check_choices(value, sub, dotted, problems, sources)
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            problems.append(f"{dotted} ({sources.get(dotted, 'default')}): {value!r} is not one of "
                            f"{', '.join(map(repr, choices))}")


def _dataclass_type(f: dataclasses.Field) -> Optional[type]:
    t = f.type
    if isinstance(t, str):
        t = globals().get(t)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def load_config(schema_cls: type, files: Iterable[str] = (), overrides: Iterable[str] = ()):
    """Build a typed config: defaults <- files (in order) <- ``key=value`` overrides.

    Raises :class:`ConfigError` listing every problem (unknown keys, wrong types, invalid
    values) with the key and its source.
    """
    cfg = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(cfg, True)
    problems: List[str] = []
    sources: dict = {}
    leaves: List[Tuple[str, Any, str]] = []
    for path in files:
        data = _read_yaml(str(path))
        _flatten(data, cfg, "", str(path), leaves, problems)
    for text in overrides:
        try:
            key, value = _parse_override(text)
        except (ValueError, yaml.YAMLError) as exc:
            problems.append(f"command line: {exc}")
            continue
        parts = key.split(".")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _flatten(nested, cfg, "", "command line", leaves, problems)
    for key, value, source in leaves:
        _set_leaf(cfg, key, value, source, problems)
        sources[key] = source
    _check_choices(cfg, schema_cls, "", problems, sources)
    validator = getattr(schema_cls, "validate", None) or _VALIDATORS.get(schema_cls)
    if validator is not None and not problems:
        problems.extend(validator(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (loads back identically with :func:`load_config`)."""
    return OmegaConf.to_yaml(cfg)


def save_yaml(cfg: DictConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(to_yaml(cfg))
    os.replace(tmp, path)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(schema_cls: type, data: dict):
    """Rebuild a typed config from a plain dict (e.g. one stored in a checkpoint)."""
    cfg = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(cfg, True)
    return OmegaConf.merge(cfg, data)


# --------------------------------------------------------------------------------------------
# Semantic validation (after types are right)
# --------------------------------------------------------------------------------------------


def validate_model(m: DictConfig, prefix: str = "model") -> List[str]:
    p: List[str] = []
    for key in ("d_model", "n_layers", "n_ctx", "ffn_mult", "mixer_expansion"):
        if m[key] < 1:
            p.append(f"{prefix}.{key}: must be >= 1, got {m[key]}")
    if m.vocab_size < 0:
        p.append(f"{prefix}.vocab_size: must be >= 0, got {m.vocab_size}")
    if not (math.isfinite(m.init_std) and m.init_std > 0):
        p.append(f"{prefix}.init_std: must be a finite number > 0, got {m.init_std}")
    if not (math.isfinite(m.embedding_init_std) and m.embedding_init_std >= 0):
        p.append(f"{prefix}.embedding_init_std: must be a finite number >= 0 (0 = the init scheme's), "
                 f"got {m.embedding_init_std}")
    for key in ("init", "linear_init", "mixing_init"):
        allowed = ModelConfig.__dataclass_fields__[key].metadata["choices"]
        if m[key] not in allowed:
            p.append(f"{prefix}.{key}: {m[key]!r} is not one of {', '.join(map(repr, allowed))}")
    if m.kind in ("mixer", "mixer_autoencoder"):
        if m.mixer_heads < 0:
            p.append(f"{prefix}.mixer_heads: must be >= 0, got {m.mixer_heads}")
        elif m.mixer_heads > 0 and m.d_model % m.mixer_heads:
            p.append(f"{prefix}.mixer_heads: d_model {m.d_model} is not divisible by {m.mixer_heads} heads")
        if m.mixer_heads > 0 and m.mixer_expansion > 1:
            p.append(f"{prefix}: mixer_heads > 0 and mixer_expansion > 1 cannot be combined")
    if m.get("mixer_impl", "auto") not in ("auto", "dense", "triangular"):
        p.append(f"{prefix}.mixer_impl: {m.mixer_impl!r} is not one of 'auto', 'dense', 'triangular'")
    if m.get("mixer_block_size", 0) < 0:
        p.append(f"{prefix}.mixer_block_size: must be >= 0 (0 = auto), got {m.mixer_block_size}")
    if m.kind in ("transformer", "hybrid"):
        if m.n_heads < 1 or m.d_model % m.n_heads:
            p.append(f"{prefix}.n_heads: d_model {m.d_model} must be divisible by n_heads {m.n_heads}")
        elif (m.d_model // m.n_heads) % 2:
            p.append(f"{prefix}.n_heads: head width d_model/n_heads = {m.d_model // m.n_heads} must be even (RoPE)")
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads >= 1 and (kv < 1 or m.n_heads % kv):
            p.append(f"{prefix}.n_kv_heads: n_heads {m.n_heads} must be divisible by n_kv_heads {kv}")
    if m.kind == "bidirectional_mixer" and (m.mixer_heads != 0 or m.mixer_expansion != 1):
        p.append(f"{prefix}: bidirectional_mixer has flat token mixing only; set mixer_heads=0 and "
                 f"mixer_expansion=1 (got {m.mixer_heads} and {m.mixer_expansion})")
    if m.kind == "mixer_autoencoder":
        for key in ("encoder_layers", "decoder_layers"):
            if m[key] < 0:
                p.append(f"{prefix}.{key}: must be >= 0 (0 = n_layers), got {m[key]}")
        if m.compression < 1 or m.d_model % m.compression:
            p.append(f"{prefix}.compression: must be >= 1 and divide d_model {m.d_model}, got {m.compression}")
    return p


def validate_pretrain(cfg: DictConfig) -> List[str]:
    p = validate_model(cfg.model)
    t = cfg.train
    if t.steps < 1 and t.max_tokens < 1:
        p.append("train.steps: must be >= 1 (or set train.max_tokens)")
    p += validate_train_engine(cfg)
    if cfg.data.num_canonical_nodes < 0:
        p.append(f"data.num_canonical_nodes: must be >= 0, got {cfg.data.num_canonical_nodes}")
    for n in t.eval_n_ctx:
        if n < 1 or n > cfg.model.n_ctx:
            p.append(f"train.eval_n_ctx: {n} must be in [1, model.n_ctx={cfg.model.n_ctx}]")
    return p


def validate_train_engine(cfg: DictConfig) -> List[str]:
    """The train / engine / checkpoint checks every engine-trained config shares."""
    t, e = cfg.train, cfg.engine
    p: List[str] = []
    for key in ("global_batch_size", "micro_batch_size"):
        if t[key] < 1:
            p.append(f"train.{key}: must be >= 1, got {t[key]}")
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                 f"train.micro_batch_size {t.micro_batch_size}")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if e.precision in ("bf16", "fp16") and e.zero_stage == 0:
        p.append(f"engine.precision {e.precision} needs engine.zero_stage >= 1 "
                 "(ZeRO 0 switches to an fp16-style optimizer that drifts)")
    if e.offload_params and e.zero_stage != 3:
        p.append("engine.offload_params needs engine.zero_stage 3")
    if e.offload_optimizer and e.zero_stage == 0:
        p.append("engine.offload_optimizer needs engine.zero_stage >= 1")
    if cfg.checkpoint.keep_last < 0:
        p.append(f"checkpoint.keep_last: must be >= 0, got {cfg.checkpoint.keep_last}")
    return p


def validate_prepare(cfg: DictConfig) -> List[str]:
    p: List[str] = []
    if not cfg.input:
        p.append("input: give at least one corpus path (or `demo`)")
    if not cfg.n_ctx:
        p.append("n_ctx: give at least one context length")
    for n in cfg.n_ctx:
        if n < 2:
            p.append(f"n_ctx: {n} must be >= 2")
    if not 0.0 < cfg.val_fraction < 1.0:
        p.append(f"val_fraction: must be in (0, 1), got {cfg.val_fraction}")
    if cfg.tokenizer_spec.vocab_size < 8:
        p.append(f"tokenizer_spec.vocab_size: must be >= 8, got {cfg.tokenizer_spec.vocab_size}")
    if cfg.num_proc < 1:
        p.append(f"num_proc: must be >= 1, got {cfg.num_proc}")
    return p


_VALIDATORS = {PretrainConfig: validate_pretrain, PrepareConfig: validate_prepare}


def register_validator(schema_cls: type, fn) -> None:
    """Attach a semantic validator (cfg -> list of problems) to a schema."""
    _VALIDATORS[schema_cls] = fn


def reference(schema_cls: type, prefix: str = "") -> List[str]:
    """Markdown lines documenting every field of a schema (key, type, default, help)."""
    lines: List[str] = []
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        sub = _dataclass_type(f)
        if sub is not None:
            lines.extend(reference(sub, dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
        lines.append(f"| `{dotted}` | {tname} | `{default!r}` | {f.metadata.get('help', '')}{extra} |")
    return lines


# --------------------------------------------------------------------------------------------
# Retrieval: pair shards (`mmtrain prepare-pairs`) and contrastive training (mmtrain/retrieval.py)
# --------------------------------------------------------------------------------------------


@dataclass
class PairsConfig:
    input: List[str] = _f(lambda: ["demo"], "JSONL files (.jsonl / .jsonl.gz) of (query, document) pairs; "
                                           "`demo` = the built-in Python docstring pairs (summary line -> "
                                           "rest of the docstring).", factory=True)
    query_field: str = _f("query", "JSONL key of the query text (e.g. summary).")
    document_field: str = _f("document", "JSONL key of the document text (e.g. story).")
    bundle: str = _f("", "Exported bundle whose tokenizer is used (and whose n_ctx bounds n_ctx).")
    tokenizer: str = _f("", "A SentencePiece .model to use instead of a bundle's.")
    out: str = _f("data/pairs/demo", "Output directory: meta.json, tokenizer.model, train/ and test/ MDS shards.")
    n_ctx: int = _f(0, "Tokens per query / document (truncated, right-padded); 0 = the bundle's n_ctx.")
    append_eos: bool = _f(True, "End every query and document with EOS (kept when truncating), so "
                                "last-token pooling reads the same token everywhere.")
    test_fraction: float = _f(0.1, "Fraction of (distinct) documents held out as the test split.")
    val_fraction: float = _f(0.1, "Fraction of documents held out as the validation split (carved from "
                                  "what would be training pairs; the test split does not depend on it). "
                                  "Retrieval training evaluates on it; 0 = no val split.")
    seed: int = _f(0, "Seed of the train/val/test split (a hash of seed and document text).")
    max_pairs: int = _f(0, "Use only the first N pairs read (before deduplication); 0 = all.")
    from_documents: str = _f("", "Build pairs from unlabeled documents instead of reading labeled pairs: "
                                 "`crop` = two independent random token spans of a document (Contriever), "
                                 "`ict` = one sentence -> the rest of its passage (inverse cloze task). "
                                 "`input` is then a corpus as for `mmtrain prepare`.",
                             choices=["", "crop", "ict"])
    text_field: str = _f("text", "from_documents: JSONL key / Parquet column of the document text.")
    delimiter: str = _f("", "from_documents: plain-text separator between documents ('' = one per file).")
    max_documents: int = _f(0, "from_documents: use only the first N documents; 0 = all.")
    pairs_per_document: int = _f(1, "from_documents: pairs drawn from each document (each an independent "
                                    "crop / sentence).")
    crop_min_ratio: float = _f(0.1, "crop: shortest span as a fraction of the document's tokens.")
    crop_max_ratio: float = _f(0.5, "crop: longest span as a fraction of the document's tokens.")
    min_span_tokens: int = _f(4, "crop / ict: shortest span (query or document) in tokens.")
    min_document_tokens: int = _f(16, "from_documents: skip documents shorter than this many tokens.")
    ict_keep_fraction: float = _f(0.1, "ict: probability that the query sentence is left in its passage.")
    exclude_pairs: List[str] = _f(list, "Pair directories whose held-out (val and test) pairs must not leak "
                                        "in: input documents containing the text of any of their held-out "
                                        "queries or documents are dropped.", factory=True)
    hard_negatives: int = _f(0, "BM25-mined negatives stored per training query (top-ranked training "
                                "documents other than the query's own, via bm25s); 0 = none.")


@dataclass
class RetrievalSection:
    bundle: str = _f("", "Exported bundle (mixer or transformer) to start from (`mmtrain export`).")
    pooling: str = _f("mean", "Embedding = mean of the final hidden states over real tokens (`mean`; "
                              "docs/retrieval.md), the one at the last real token (`last`) or the one "
                              "before it (`second_to_last`, the paper's index -2); L2-normalised. Inputs "
                              "are right-padded.",
                      choices=["last", "second_to_last", "mean"])
    temperature: float = _f(0.05, "InfoNCE temperature t (logits = cosine / t); the paper's code: 0.02 "
                                  "(0.02-0.1 measured alike, docs/retrieval.md).")
    learn_temperature: bool = _f(False, "Learn the temperature (CLIP's logit scale, starting at `temperature`, "
                                        "kept >= 0.01); not with grad_cache_chunk or ZeRO 3.")
    symmetric: bool = _f(True, "Average the query->document and document->query InfoNCE.")
    extra_negatives: int = _f(0, "Extra random training documents per query, added as negatives for all "
                                 "queries (seeded per step).")
    hard_negatives: int = _f(0, "BM25-mined negatives per query (from `prepare-pairs hard_negatives=K`, "
                                "K >= this), added as negatives for all queries; 0 = none.")
    grad_cache_chunk: int = _f(0, "Gradient caching: embed in chunks of this many sequences (queries, "
                                  "documents and extras together); 0 = off (one forward pass).")
    gather_negatives: bool = _f(True, "All-gather embeddings across ranks (with gradient) so every "
                                      "rank's documents are negatives for every query.")
    eval_n_candidates: List[int] = _f(lambda: [32], "N values of the top-1-among-N evaluation (capped "
                                                    "at the test pool size).", factory=True)
    eval_split: str = _f("val", "Split evaluated during training: `val` (carved from the training pairs by "
                                "prepare-pairs; choose settings and checkpoints on it) or `test`.",
                         choices=["val", "test"])
    eval_train_pairs: int = _f(256, "Also report recall on the first N training pairs (metrics train_*), to "
                                    "tell learning from memorising; 0 = off.")
    eval_max_pairs: int = _f(0, "Evaluate on the first N pairs of eval_split only; 0 = all.")
    eval_seed: int = _f(0, "Seed of the negatives drawn for top-1 among N.")


@dataclass
class PairDataConfig:
    shard_dir: str = _f("data/pairs/demo", "Directory written by `mmtrain prepare-pairs`.")
    num_workers: int = _f(0, "Data-loader worker processes per rank.")
    shuffle: bool = _f(True, "Shuffle training pairs (seeded by train.seed).")


@dataclass
class RetrievalConfig:
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def validate_pairs(cfg: DictConfig) -> List[str]:
    p: List[str] = []
    if not cfg.input:
        p.append("input: give at least one JSONL file (or `demo`)")
    if not cfg.bundle and not cfg.tokenizer:
        p.append("bundle: give an exported bundle (or tokenizer: a .model file) to tokenize with")
    if cfg.n_ctx < 0 or cfg.n_ctx == 1:
        p.append(f"n_ctx: must be 0 (the bundle's) or >= 2, got {cfg.n_ctx}")
    if cfg.n_ctx == 0 and not cfg.bundle:
        p.append("n_ctx: 0 means the bundle's n_ctx, but no bundle is given")
    if not 0.0 < cfg.test_fraction < 1.0:
        p.append(f"test_fraction: must be in (0, 1), got {cfg.test_fraction}")
    if not 0.0 <= cfg.val_fraction < 1.0 or cfg.test_fraction + cfg.val_fraction >= 1.0:
        p.append(f"val_fraction: must be >= 0 with test_fraction + val_fraction < 1, got {cfg.val_fraction}")
    if cfg.pairs_per_document < 1:
        p.append(f"pairs_per_document: must be >= 1, got {cfg.pairs_per_document}")
    if not 0.0 < cfg.crop_min_ratio <= cfg.crop_max_ratio <= 1.0:
        p.append(f"crop_min_ratio / crop_max_ratio: need 0 < min <= max <= 1, got {cfg.crop_min_ratio} / "
                 f"{cfg.crop_max_ratio}")
    if cfg.min_span_tokens < 1 or cfg.min_document_tokens < 2:
        p.append("min_span_tokens must be >= 1 and min_document_tokens >= 2")
    if not 0.0 <= cfg.ict_keep_fraction <= 1.0:
        p.append(f"ict_keep_fraction: must be in [0, 1], got {cfg.ict_keep_fraction}")
    if cfg.hard_negatives < 0:
        p.append(f"hard_negatives: must be >= 0, got {cfg.hard_negatives}")
    if not cfg.query_field or not cfg.document_field:
        p.append("query_field / document_field: must not be empty")
    return p


def validate_retrieval(cfg: DictConfig) -> List[str]:
    r, t, e = cfg.retrieval, cfg.train, cfg.engine
    p: List[str] = []
    if not r.bundle:
        p.append("retrieval.bundle: give the exported bundle to start from (`mmtrain export ... --out DIR`)")
    if r.temperature <= 0:
        p.append(f"retrieval.temperature: must be > 0, got {r.temperature}")
    if r.extra_negatives < 0:
        p.append(f"retrieval.extra_negatives: must be >= 0, got {r.extra_negatives}")
    if r.learn_temperature and (r.grad_cache_chunk > 0 or e.zero_stage == 3):
        p.append("retrieval.learn_temperature: not available with retrieval.grad_cache_chunk > 0 or "
                 "engine.zero_stage 3 (the temperature would get no gradient / is partitioned)")
    if r.hard_negatives < 0:
        p.append(f"retrieval.hard_negatives: must be >= 0, got {r.hard_negatives}")
    if r.eval_train_pairs < 0:
        p.append(f"retrieval.eval_train_pairs: must be >= 0, got {r.eval_train_pairs}")
    if r.grad_cache_chunk < 0:
        p.append(f"retrieval.grad_cache_chunk: must be >= 0, got {r.grad_cache_chunk}")
    for n in r.eval_n_candidates:
        if n < 2:
            p.append(f"retrieval.eval_n_candidates: {n} must be >= 2")
    if t.steps < 1:
        p.append("train.steps: must be >= 1")
    if t.micro_batch_size == 1 and not (r.extra_negatives or r.hard_negatives) and not r.gather_negatives:
        p.append("train.micro_batch_size 1 leaves a query without negatives (raise it, gather across "
                 "ranks or set retrieval.extra_negatives)")
    return p + validate_train_engine(cfg)


register_validator(PairsConfig, validate_pairs)
register_validator(RetrievalConfig, validate_retrieval)


# Frozen-embedding retrieval (`mmtrain frozen-retrieval`, the paper's first retrieval method): a small bidirectional mixer
# scores candidate sets of embeddings precomputed once with a frozen bundle.


@dataclass
class FrozenEmbeddingsSection:
    bundle: str = _f("", "Exported bundle (mixer or transformer) whose frozen hidden states are the embeddings.")
    pairs: str = _f("data/pairs/demo", "Pair shards from `mmtrain prepare-pairs` made with this bundle's "
                                       "tokenizer; both splits (train, test) are embedded.")
    pooling: str = _f("second_to_last", "Embedding = final hidden state at the last real token (`last`), the "
                                        "one before it (`second_to_last`, the paper's index -2) or the mean "
                                        "(`mean`); L2-normalised.", choices=["last", "second_to_last", "mean"])
    dir: str = _f("", "Directory of the saved embeddings (embeddings.safetensors + embeddings.json), reused "
                      "when present; '' = <out_dir>/embeddings. Embeddings of another bundle, pooling or "
                      "pair shards there are an error.")
    overwrite: bool = _f(False, "Recompute the embeddings even when `dir` already holds some.")
    batch_size: int = _f(64, "Sequences per forward pass of the frozen bundle.")


@dataclass
class FrozenScorerSection:
    n_candidates: int = _f(32, "N: positions of one example [q, c_1 .. c_{N-1}], counting the query slot as "
                               "the paper does (N = 32: 31 candidates, the positive and 30 negatives).")
    n_layers: int = _f(8, "Bidirectional mixer blocks (paper: 8). Width = the embedding dimension.")
    ffn_mult: int = _f(4, "MLP hidden width as a multiple of the embedding dimension.")
    norm_eps: float = _f(1e-5, "LayerNorm epsilon.")


@dataclass
class FrozenTrainSection:
    batch_size: int = _f(128, "Queries (candidate sets) per optimizer step (paper: 128).")
    lr: float = _f(1e-4, "Peak AdamW learning rate (paper: 1e-4).")
    warmup_steps: int = _f(500, "Linear warmup steps from 0 to lr (paper: 500).")
    schedule: str = _f("linear", "Decay after warmup.", choices=["linear", "cosine", "constant"])
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of lr.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Global gradient-norm clip; 0 = off.")
    steps: int = _f(0, "Optimizer steps; when > 0 it is used instead of `epochs`.")
    epochs: float = _f(100.0, "Passes over the training queries (paper: 100-200), each with fresh candidate "
                              "sets; steps = ceil(epochs * train pairs / batch_size). Used when steps is 0.")
    seed: int = _f(0, "Seed of the scorer's init and of the training candidate sets.")
    eval_every: int = _f(0, "Evaluate on the test split every N steps (always at step 0 and at the end); 0 = "
                            "only then.")
    eval_seed: int = _f(0, "Seed of the fixed test candidate sets (the same for the scorer and the cosine "
                           "baseline).")
    log_every: int = _f(50, "Print a line and log train/loss and train/lr every N steps.")


@dataclass
class FrozenRetrievalConfig:
    embeddings: FrozenEmbeddingsSection = field(default_factory=FrozenEmbeddingsSection)
    model: FrozenScorerSection = field(default_factory=FrozenScorerSection)
    train: FrozenTrainSection = field(default_factory=FrozenTrainSection)
    out_dir: str = _f("runs/frozen-retrieval", "Output directory: tensorboard/, embeddings/ (by default) and "
                                               "scorer/ (model.safetensors + config.json, written atomically).")
    device: str = _f("auto", "`auto` = CUDA when available, else CPU.", choices=["auto", "cpu", "cuda"])


def validate_frozen_retrieval(cfg: DictConfig) -> List[str]:
    e, m, t = cfg.embeddings, cfg.model, cfg.train
    p: List[str] = []
    if not e.bundle:
        p.append("embeddings.bundle: give the exported bundle to embed with (`mmtrain export ... --out DIR`)")
    if not e.pairs:
        p.append("embeddings.pairs: give the pair shards (`mmtrain prepare-pairs`)")
    if not cfg.out_dir:
        p.append("out_dir: must not be empty")
    if m.n_candidates < 3:
        p.append(f"model.n_candidates: must be >= 3 (the query slot, the positive and at least one "
                 f"negative), got {m.n_candidates}")
    for key, section in (("embeddings.batch_size", e), ("model.n_layers", m), ("model.ffn_mult", m),
                         ("train.batch_size", t), ("train.log_every", t)):
        value = section[key.split(".")[1]]
        if value < 1:
            p.append(f"{key}: must be >= 1, got {value}")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    for key in ("warmup_steps", "steps", "eval_every"):
        if t[key] < 0:
            p.append(f"train.{key}: must be >= 0, got {t[key]}")
    if t.epochs < 0:
        p.append(f"train.epochs: must be >= 0, got {t.epochs}")
    if t.steps == 0 and t.epochs <= 0:
        p.append("train.steps / train.epochs: one of them must be > 0 (steps wins when both are)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0 or t.weight_decay < 0:
        p.append(f"train.grad_clip / train.weight_decay: must be >= 0, got {t.grad_clip} / {t.weight_decay}")
    return p


register_validator(FrozenRetrievalConfig, validate_frozen_retrieval)
