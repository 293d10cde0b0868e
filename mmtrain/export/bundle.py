"""Model bundles: a directory that rebuilds a trained model without its training config or deepspeed.

Layout (written by :func:`write_bundle`, read by :func:`load_pretrained`)::

    <bundle>/config.json          section "mmtrain": model config (kind, sizes, n_ctx, vocab, norm/tie
                                  options), every tensor's name/shape/dtype/meaning, tokenizer hash,
                                  source checkpoint (step, tokens seen) and training summary. A
                                  transformer's config.json also holds Hugging Face LlamaConfig keys,
                                  so ``transformers.LlamaForCausalLM.from_pretrained(<bundle>)`` works.
    <bundle>/model.safetensors    the weights; above ``max_shard_size`` bytes Hugging Face's sharded
                                  layout instead: model-0000i-of-0000N.safetensors + model.safetensors.index.json
    <bundle>/tokenizer.model      the SentencePiece model the weights were trained with
    <bundle>/model_card.md        README-style summary (see :mod:`mmtrain.export.model_card`)
    <bundle>/tokenizer_config.json, special_tokens_map.json, tokenization_mmtrain.py,
    generation_config.json, modeling_mmtrain.py
                                  Hugging Face files (see :mod:`mmtrain.export.hf`): the tokenizer
                                  and, for the mixer, hybrid and mixer autoencoder, the model classes
                                  that config.json's ``auto_map`` names (``trust_remote_code=True``)

Weights are stored as the model computes with them: token-mixing matrices already multiplied by
their causal masks, and a tied LM head stored once (under the embedding's name).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mmtrain.models import CausalLM, build_model
from mmtrain.models.layers import init_gather
from mmtrain.models.mixer import CausalMixingMatrix, MaskedMixingMatrix

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
CARD_NAME = "model_card.md"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

PathLike = Union[str, Path]


class BundleError(ValueError):
    """A bundle directory that cannot be loaded: the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def tied_names(model: torch.nn.Module) -> Dict[str, str]:
    """{alias: stored name} for state-dict entries that share storage (a tied LM head)."""
    first: Dict[Tuple[int, int], str] = {}
    aliases: Dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # a ZeRO-3 partitioned parameter holds no local storage: it is known by identity
        key = (id(tensor), -1) if hasattr(tensor, "ds_id") else (tensor.data_ptr(), tensor.numel())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def export_state_dict(model: CausalLM, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The tensors a bundle stores: masked token-mixing weights (a packed matrix as the dense
    ``weight`` it holds, in its place), no tied duplicates, ``dtype``, CPU."""
    masked = {f"{name}.weight": module for name, module in model.named_modules()
              if isinstance(module, MaskedMixingMatrix) or
              isinstance(module, CausalMixingMatrix) and module.layout == "dense"}
    packed = {f"{name}.packed_weight": module for name, module in model.named_modules()
              if isinstance(module, CausalMixingMatrix) and module.layout == "packed"}
    aliases = tied_names(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in aliases:
            continue
        tensor = tensor.detach()
        if name in masked:  # exact: multiplying by 1 or 0
            tensor = tensor * masked[name].mask.to(tensor.dtype)
        elif name in packed:
            module = packed[name]
            tensor, name = module.unpack(tensor), name[:-len("packed_weight")] + "weight"
        state[name] = tensor.to(device="cpu", dtype=dtype).contiguous().clone()
    return state


def parse_size(text: Union[str, int]) -> int:
    """'2GB', '500MB', '64KiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    if unit not in units or not number:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 500MB, 1048576)")
    return int(float(number) * units[unit])


def shard_plan(state: Dict[str, torch.Tensor], max_shard_size: int) -> List[List[str]]:
    """Tensor names per shard, in state-dict order, each shard at most ``max_shard_size`` bytes
    (a single larger tensor gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_weights(state: Dict[str, torch.Tensor], directory: PathLike, max_shard_size: int) -> List[str]:
    """Write ``model.safetensors`` or HF-style shards + index; returns the files written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    plan = shard_plan(state, max_shard_size)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    umask = os.umask(0)
    os.umask(umask)

    def save(tensors, path: Path) -> None:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, 0o666 & ~umask)   # safetensors writes 0600; the bundle's other files follow the umask

    if len(plan) == 1:
        save(state, directory / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, names in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save({n: state[n] for n in names}, directory / file)
        weight_map.update({n: file for n in names})
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files + [INDEX_NAME]


def bundle_file(directory: PathLike, name: str, what: str) -> Path:
    """``directory / name`` for a file a bundle's own JSON names; BundleError unless it resolves
    (symlinks followed) inside the bundle directory: a bundle never makes mmtrain open other files."""
    root = Path(directory).resolve()
    path = (root / str(name)).resolve()
    if not str(name) or os.path.isabs(str(name)) or (path != root and root not in path.parents):
        raise BundleError(f"{Path(directory)}: {what} {str(name)!r} is not a file inside the bundle directory; "
                          "refusing to read it (re-export the bundle with `mmtrain export`)")
    return path


def read_weights(directory: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a bundle (single file or sharded); BundleError names missing/corrupt files."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        index = _read_json(directory / INDEX_NAME)
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise BundleError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (not an exported bundle?)")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        path = bundle_file(directory, file, f"{INDEX_NAME} weight file")
        if not path.is_file():
            raise BundleError(f"{path}: weight shard missing (listed in {directory / INDEX_NAME})")
        try:
            state.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own SafetensorError on damage
            raise BundleError(f"{path}: unreadable safetensors file ({exc})") from None
    return state


# --------------------------------------------------------------------------------------------
# Documentation of the tensors (for other code that loads a bundle)
# --------------------------------------------------------------------------------------------

_TENSOR_DOCS = [
    ("wte.weight", "token embedding [vocab, d]"),
    ("token_norm.", "LayerNorm before token mixing (weight/bias [d])"),
    ("mlp_norm.", "LayerNorm before the MLP (weight/bias [d])"),
    ("token_mixing.weight", "token-mixing matrix W [n_ctx, n_ctx] (row = output position, column = "
                            "input position), stored lower-triangular (already masked)"),
    ("token_mixing.bias", "per-position bias b [n_ctx] of token mixing, broadcast over d"),
    ("token_mixing.in_proj.", "multi-head mixing: input projection Linear(d, d) (y = x W^T + b)"),
    ("token_mixing.out_proj.", "multi-head mixing: output projection Linear(d, d)"),
    ("token_mixing.mixing.weight", "multi-head mixing matrices [heads, n_ctx, n_ctx], lower-triangular"),
    ("token_mixing.mixing.bias", "multi-head per-position biases [heads, n_ctx]"),
    ("token_mixing.expand.weight", "expanded mixing, first matrix [e*n_ctx, n_ctx]; hidden row r "
                                   "belongs to position r // e and reads inputs j <= r // e (masked)"),
    ("token_mixing.expand.bias", "expanded mixing, hidden-row bias [e*n_ctx]"),
    ("token_mixing.contract.weight", "expanded mixing, second matrix [n_ctx, e*n_ctx]; output i reads "
                                     "hidden rows r with r // e <= i (masked)"),
    ("token_mixing.contract.bias", "expanded mixing, per-position bias [n_ctx]"),
    ("reverse_norm.", "bidirectional mixer: LayerNorm before the reverse stream's token mixing"),
    ("reverse_mixing.weight", "bidirectional mixer, reverse stream: W_r [n_ctx, n_ctx], stored masked with "
                              "triu(diagonal=2) (output n reads inputs n+2 ..)"),
    ("reverse_mixing.bias", "bidirectional mixer, reverse stream: per-position bias [n_ctx]"),
    ("bottleneck.down.", "mixer autoencoder: bottleneck Linear(d, d/compression) on the embedding"),
    ("bottleneck.up.", "mixer autoencoder: bottleneck Linear(d/compression, d)"),
    ("mlp.fc_in.", "MLP Linear(d, ffn_mult*d), then exact-erf GELU"),
    ("mlp.fc_out.", "MLP Linear(ffn_mult*d, d)"),
    ("final_norm.", "final LayerNorm before the LM head"),
    ("lm_head.weight", "LM head [vocab, d], no bias"),
    ("model.embed_tokens.weight", "token embedding [vocab, d] (Hugging Face Llama name)"),
    ("input_layernorm.", "RMSNorm before attention"),
    ("post_attention_layernorm.", "RMSNorm before the MLP"),
    ("self_attn.", "attention projection, no bias (Hugging Face Llama layout)"),
    ("mlp.gate_proj.", "SwiGLU gate projection"),
    ("mlp.up_proj.", "SwiGLU up projection"),
    ("mlp.down_proj.", "SwiGLU down projection"),
    ("model.norm.", "final RMSNorm"),
]


def describe_tensor(name: str) -> str:
    for pattern, text in _TENSOR_DOCS:
        if pattern in name:
            return text
    return ""


def tensor_table(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    return {name: {"shape": list(t.shape), "dtype": _DTYPE_NAMES.get(t.dtype, str(t.dtype)),
                   "description": describe_tensor(name)} for name, t in state.items()}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def bundle_config(model: CausalLM, state: Dict[str, torch.Tensor], dtype: torch.dtype, weight_files: List[str],
                  tokenizer, source: Optional[Dict[str, Any]] = None,
                  training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json: the "mmtrain" section, plus Hugging Face LlamaConfig keys for a transformer and
    the ``auto_map`` / size keys of the remote-code kinds (:func:`mmtrain.export.hf.hf_config_keys`)."""
    from mmtrain import __version__
    from mmtrain.export.hf import hf_config_keys

    section = {
        "format_version": FORMAT_VERSION,
        "mmtrain_version": __version__,
        "model": dict(model.config_dict),
        "num_params": model.num_params(),
        "dtype": _DTYPE_NAMES[dtype],
        "weight_files": weight_files,
        "tied_weights": tied_names(model),
        "masked_weights": "token-mixing matrices are stored already multiplied by their causal masks",
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tokenizer.sha256,
                      "special_ids": {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id,
                                      "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}},
        "source": source or {},
        "training": training or {},
        "tensors": tensor_table(state),
    }
    config: Dict[str, Any] = {}
    if model.kind == "transformer":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", **model.hf_config_dict(),
                      torch_dtype=_DTYPE_NAMES[dtype], pad_token_id=tokenizer.pad_id,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    config.update(hf_config_keys(model.config_dict, tokenizer, _DTYPE_NAMES[dtype]))
    config["mmtrain"] = section
    return config


def write_bundle(model: CausalLM, out: PathLike, tokenizer_path: PathLike, *, dtype: str = "fp32",
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, source: Optional[Dict[str, Any]] = None,
                 training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``model`` as a bundle into the (new or empty) directory ``out``; returns config.json's dict.

    ``tokenizer_path`` must be the SentencePiece model the weights were trained with (its vocabulary
    size must equal the model's). ``source`` / ``training`` are recorded in config.json and the card.
    """
    from mmtrain.data.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces, the model's "
                         f"vocab_size is {model.vocab_size}: not the tokenizer it was trained with")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    state = export_state_dict(model, DTYPES[dtype])
    files = save_weights(state, out, max_shard_size)
    shutil.copyfile(tokenizer_path, out / TOKENIZER_NAME)
    config = bundle_config(model, state, DTYPES[dtype], files, tokenizer, source, training)
    rewrite_config(out, config)
    return config


def rewrite_config(out: PathLike, config: Dict[str, Any]) -> None:
    """(Re)write config.json, the model card and the Hugging Face files rendered from it."""
    from mmtrain.export.hf import write_hf_files
    from mmtrain.export.model_card import render_model_card

    out = Path(out)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / CARD_NAME).write_text(render_model_card(config), encoding="utf-8")
    write_hf_files(out, config)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable or not valid JSON ({exc})") from None


def read_bundle_config(path: PathLike) -> Dict[str, Any]:
    """The "mmtrain" section of ``<path>/config.json``; BundleError when it is not a bundle."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {CONFIG_NAME}"
        raise BundleError(f"{path} {what}: not a bundle written by `mmtrain export`")
    section = _read_json(config_path).get("mmtrain")
    if not isinstance(section, dict) or "model" not in section:
        raise BundleError(f"{config_path}: no 'mmtrain' section with the model config (not written by "
                          "`mmtrain export`)")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{config_path}: bundle format_version {version!r}; this mmtrain reads "
                          f"versions up to {FORMAT_VERSION} (upgrade mmtrain)")
    return section


def load_pretrained(path: PathLike, device: Any = "cpu", dtype: Optional[torch.dtype] = None,
                    kind: Optional[str] = None) -> CausalLM:
    """Rebuild the model of a bundle in eval mode (``dtype`` default float32, whatever was stored).

    With ``kind`` (e.g. ``"mixer"``) the bundle must hold that kind of model (ValueError otherwise).

    Needs only the bundle: config.json's "mmtrain" section and the safetensors weights. Every
    missing, unexpected or wrongly shaped tensor is named in one BundleError.
    """
    path = Path(path)
    section = read_bundle_config(path)
    if kind is not None and section["model"]["kind"] != kind:
        raise ValueError(f"{path} holds a {section['model']['kind']!r} model, not a {kind!r} model")
    model = build_model(section["model"])
    stored = _in_model_layout(model, read_weights(path), path)
    aliases = tied_names(model)
    expected = {name: _shape(t) for name, t in model.state_dict(keep_vars=True).items() if name not in aliases}
    problems = [f"missing tensor {name!r} (expected shape {shape})"
                for name, shape in expected.items() if name not in stored]
    problems += [f"unexpected tensor {name!r}" for name in stored if name not in expected]
    problems += [f"tensor {name!r} has shape {list(stored[name].shape)}, the model needs {shape}"
                 for name, shape in expected.items() if name in stored and list(stored[name].shape) != shape]
    if problems:
        raise BundleError(f"{path}: weights do not match config.json's model:\n  - " + "\n  - ".join(problems))
    gather = init_gather()
    # One module's own parameters at a time; when the model was built partitioned (ZeRO-3,
    # deepspeed.zero.Init) they are whole only while gathered.
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = {f"{prefix}.{n}" if prefix else n: p for n, p in module.named_parameters(recurse=False)}
            if not own:
                continue
            with (gather(list(own.values())) if gather else contextlib.nullcontext()):
                for name, param in own.items():
                    if name not in aliases:
                        param.data.copy_(stored[name])
    if gather:
        return model.eval()   # the partitions already live where zero.Init put them
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def _in_model_layout(model: CausalLM, stored: Dict[str, torch.Tensor], path: PathLike) -> Dict[str, torch.Tensor]:
    """The bundle's tensors as ``model`` names them: the dense ``weight`` a bundle stores for each
    packed causal mixing matrix becomes its ``packed_weight`` (after checking its shape)."""
    stored, problems = dict(stored), []
    for prefix, module in model.named_modules():
        if not (isinstance(module, CausalMixingMatrix) and module.layout == "packed"):
            continue
        dense_key = f"{prefix}.weight" if prefix else "weight"
        if dense_key not in stored:
            continue
        want = _shape(module.packed_weight)[:-1] + [module.n_ctx, module.n_ctx]
        dense = stored.pop(dense_key)
        if list(dense.shape) != want:
            problems.append(f"tensor {dense_key!r} has shape {list(dense.shape)}, the model needs {want}")
            continue
        stored[dense_key[:-len("weight")] + "packed_weight"] = module.pack(dense)
    if problems:
        raise BundleError(f"{path}: weights do not match config.json's model:\n  - " + "\n  - ".join(problems))
    return stored


def _shape(tensor: torch.Tensor) -> List[int]:
    """The full shape, also of a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return list(getattr(tensor, "ds_shape", tensor.shape))


def load_bundle_tokenizer(path: PathLike):
    """The bundle's tokenizer; BundleError if it is missing or not the one config.json records."""
    from mmtrain.data.tokenizer import load_tokenizer

    section = read_bundle_config(path)
    tok_path = bundle_file(path, section["tokenizer"]["file"], "config.json tokenizer file")
    if not tok_path.is_file():
        raise BundleError(f"{tok_path}: tokenizer missing from the bundle")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.sha256 != section["tokenizer"]["sha256"]:
        raise BundleError(f"{tok_path}: sha256 {tokenizer.sha256[:12]}… is not the tokenizer config.json "
                          f"records ({section['tokenizer']['sha256'][:12]}…)")
    return tokenizer
