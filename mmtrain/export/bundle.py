"""Model bundles: a directory that rebuilds a trained model without its training config or deepspeed.

Layout (written by :func:`write_bundle`, read by :func:`load_pretrained`)::

    <bundle>/config.json          section "mmtrain": model config (kind, sizes, n_ctx, vocab, norm/tie
                                  options), every tensor's name/shape/dtype/meaning, tokenizer hash,
                                  the size and sha256 of every weight file ("digests"), source
                                  checkpoint (step, tokens seen) and training summary. A
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

Loading trusts nothing in the directory: :func:`load_pretrained` validates config.json against the
model schema (types, ranges, kinds), compares the tensor shapes the config implies (a model built on
the ``meta`` device, which allocates nothing) with those in the safetensors headers, and checks
every weight file's size and sha256 against config.json before it builds the model or reads a weight.
Reading config.json and the tokenizer is :mod:`mmtrain.data.bundle_config` (pair shards made for a
bundle need only that).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mmtrain.data.bundle_config import (CONFIG_NAME, DIGESTS_KEY, DTYPE_NAMES, DTYPES, FORMAT_VERSION, REEXPORT,
                                        BundleError, PathLike, bundle_file, describe_value, is_int, read_json,
                                        read_bundle_config)
from mmtrain.data.bundle_config import load_bundle_tokenizer  # noqa: F401  (part of the bundle API)
from mmtrain.files import sha256_file
from mmtrain.models import CausalLM, build_model
from mmtrain.models.layers import init_gather
from mmtrain.models.mixer import CausalMixingMatrix, MaskedMixingMatrix

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
CARD_NAME = "model_card.md"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
MAX_HEADER_BYTES = 100 * 1024**2     # safetensors' own limit on a header


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def tied_names(model: torch.nn.Module) -> Dict[str, str]:
    """{alias: stored name} for state-dict entries that share storage (a tied LM head)."""
    first: Dict[Tuple[int, int], str] = {}
    aliases: Dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # a ZeRO-3 partitioned parameter and a meta tensor hold no local storage: known by identity
        no_storage = hasattr(tensor, "ds_id") or tensor.is_meta
        key = (id(tensor), -1) if no_storage else (tensor.data_ptr(), tensor.numel())
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


def file_digest(path: PathLike) -> Dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in one chunked pass."""
    size, digest = sha256_file(path)
    return {"bytes": size, "sha256": digest}


def weight_files(directory: PathLike) -> List[str]:
    """The files a bundle's weights are read from: ``[model.safetensors]``, or the shard index and
    the shards it names. BundleError for a missing file or one outside the bundle directory."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        index = read_json(directory / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise BundleError(f"{directory / INDEX_NAME}: no 'weight_map' of tensor names to file names "
                              "(re-export the bundle with `mmtrain export`)")
        shards = sorted(set(weight_map.values()))
        for file in shards:
            path = bundle_file(directory, file, f"{INDEX_NAME} weight file")
            if not path.is_file():
                raise BundleError(f"{path}: weight shard missing (listed in {directory / INDEX_NAME})")
        return [INDEX_NAME] + shards
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    raise BundleError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (not an exported bundle?)")


def read_weights(directory: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a bundle (single file or sharded); BundleError names missing/corrupt files."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state: Dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        if file == INDEX_NAME:
            continue
        path = bundle_file(directory, file, f"{INDEX_NAME} weight file")
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
    ("token_mixing.kernel", "Toeplitz token mixing: kernel k [n_ctx]; the matrix is M[i, j] = k[i - j] for "
                            "j <= i (k[t]: weight of the input t positions back)"),
    ("token_mixing.mixing.kernel", "multi-head Toeplitz mixing: kernels [heads, n_ctx], M_h[i, j] = k_h[i - j]"),
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
    return {name: {"shape": list(t.shape), "dtype": DTYPE_NAMES.get(t.dtype, str(t.dtype)),
                   "description": describe_tensor(name)} for name, t in state.items()}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def bundle_config(model: CausalLM, state: Dict[str, torch.Tensor], dtype: torch.dtype, weight_files: List[str],
                  tokenizer, source: Optional[Dict[str, Any]] = None,
                  training: Optional[Dict[str, Any]] = None,
                  digests: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """config.json: the "mmtrain" section, plus Hugging Face LlamaConfig keys for a transformer and
    the ``auto_map`` / size keys of the remote-code kinds (:func:`mmtrain.export.hf.hf_config_keys`).
    ``digests``: ``{weight file: {"bytes", "sha256"}}`` (:func:`file_digest`), checked at load."""
    from mmtrain import __version__
    from mmtrain.export.hf import hf_config_keys

    section = {
        "format_version": FORMAT_VERSION,
        "mmtrain_version": __version__,
        "model": dict(model.config_dict),
        "num_params": model.num_params(),
        "dtype": DTYPE_NAMES[dtype],
        "weight_files": weight_files,
        DIGESTS_KEY: digests,
        "tied_weights": tied_names(model),
        "masked_weights": "token-mixing matrices are stored already multiplied by their causal masks",
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tokenizer.sha256,
                      "special_ids": {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id,
                                      "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}},
        "source": source or {},
        "training": training or {},
        "tensors": tensor_table(state),
    }
    if digests is None:
        del section[DIGESTS_KEY]
    config: Dict[str, Any] = {}
    if model.kind == "transformer":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", **model.hf_config_dict(),
                      torch_dtype=DTYPE_NAMES[dtype], pad_token_id=tokenizer.pad_id,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    config.update(hf_config_keys(model.config_dict, tokenizer, DTYPE_NAMES[dtype]))
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
    digests = {file: file_digest(out / file) for file in files}   # of the bytes on disk, as load reads them
    shutil.copyfile(tokenizer_path, out / TOKENIZER_NAME)
    config = bundle_config(model, state, DTYPES[dtype], files, tokenizer, source, training, digests)
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
# Checking a bundle before anything is built: config schema, safetensors headers, digests
# --------------------------------------------------------------------------------------------

_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                         "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
#: Kinds whose weights hold at least one n_ctx x n_ctx token-mixing matrix per block.
_MIXING_KINDS = ("mixer", "hybrid", "bidirectional_mixer", "mixer_autoencoder")
def read_safetensors_header(path: PathLike) -> Dict[str, Tuple[str, List[int]]]:
    """``{tensor: (dtype, shape)}`` from a safetensors file's header, read without touching the
    data: 8 bytes of header length (little endian), then that much JSON. BundleError unless every
    entry is well formed and its byte range lies inside the file (so the shapes are what the file
    can really hold)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise BundleError(f"{path}: not a safetensors file (header length {length} for a file of {size} "
                              "bytes); re-export the bundle with `mmtrain export`")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: safetensors header is not UTF-8 (byte {8 + exc.start}); the file is "
                          "damaged: re-export the bundle") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: safetensors header is not valid JSON ({exc.msg} at byte {8 + exc.pos}); "
                          "the file is damaged: re-export the bundle") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: safetensors header is {describe_value(header)}, not an object; "
                          "re-export the bundle")
    data_bytes = size - 8 - length
    tensors, problems = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (dtype not in _SAFETENSORS_ITEMSIZE or not isinstance(shape, list)
                or not all(is_int(d) and d >= 0 for d in shape) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(is_int(o) for o in offsets)):
            problems.append(f"tensor {name!r}: malformed header entry")
            continue
        nbytes = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
        if not (0 <= offsets[0] <= offsets[1] <= data_bytes and offsets[1] - offsets[0] == nbytes):
            problems.append(f"tensor {name!r}: {dtype} {shape} needs {nbytes} bytes, its data_offsets "
                            f"{offsets} do not fit the file's {data_bytes} data bytes")
            continue
        tensors[name] = (dtype, shape)
    if problems:
        raise BundleError(f"{path}: damaged safetensors header (re-export the bundle):\n  - " + "\n  - ".join(problems))
    return tensors


def stored_shapes(model: CausalLM) -> Dict[str, List[int]]:
    """``{tensor: shape}`` that a bundle of ``model`` stores (:func:`export_state_dict`'s names:
    tied duplicates left out, a packed mixing matrix as its dense ``weight``); works on a model
    built on the meta device and on a ZeRO-3 partitioned one."""
    packed = {f"{name}.packed_weight": module for name, module in model.named_modules()
              if isinstance(module, CausalMixingMatrix) and module.layout == "packed"}
    aliases = tied_names(model)
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in aliases:
            continue
        shape = _shape(tensor)
        if name in packed:
            name, shape = name[:-len("packed_weight")] + "weight", shape[:-1] + [packed[name].n_ctx] * 2
        shapes[name] = shape
    return shapes


def _plausibility_problems(model_cfg: Dict[str, Any], header: Dict[str, Tuple[str, List[int]]]) -> List[str]:
    """Lower bounds any model of ``model_cfg`` puts on its weights, checked against the headers
    before a model is built (even on the meta device, a model of a million layers takes minutes
    to build)."""
    elements = sum(math.prod(shape) for _, shape in header.values())
    m = model_cfg
    layers = m["n_layers"]
    if m["kind"] == "mixer_autoencoder":
        layers = (m.get("encoder_layers") or layers) + (m.get("decoder_layers") or layers)
    needs = [(m["vocab_size"] * m["d_model"], f"vocab_size {m['vocab_size']} x d_model {m['d_model']} "
                                              "(the token embedding)")]
    if m["kind"] in _MIXING_KINDS and m.get("mixer_matrix", "general") == "toeplitz":
        needs.append((m["n_ctx"], f"an n_ctx {m['n_ctx']} Toeplitz token-mixing kernel"))
    elif m["kind"] in _MIXING_KINDS:
        needs.append((m["n_ctx"] ** 2, f"an n_ctx {m['n_ctx']} token-mixing matrix"))
    problems = [f"config.json's model needs at least {n:,} weights for {what}; the weight files hold {elements:,}"
                for n, what in needs if n > elements]
    if layers > len(header):
        problems.append(f"config.json's model has {layers} blocks; the weight files hold only {len(header)} tensors")
    return problems


def meta_model(model_cfg: Dict[str, Any]) -> CausalLM:
    """The model of ``model_cfg`` on the meta device: every shape, no memory, no initial values.
    (The first meta build in a process imports ``torch._dynamo``, which torch computes some meta
    ops through: about 1-2 s once.)"""
    with torch.device("meta"):
        return build_model(model_cfg)


def shape_problems(section: Dict[str, Any], header: Dict[str, Tuple[str, List[int]]],
                   model: Optional[CausalLM] = None) -> List[str]:
    """Differences between the tensors config.json's model stores and the weight files' headers:
    missing, unexpected and wrongly shaped tensors, and a dtype other than config.json's.
    ``model``: the model to compare with; default one built on the meta device (no memory)."""
    problems = _plausibility_problems(section["model"], header)
    if problems:
        return problems
    if model is None:
        model = meta_model(section["model"])
    expected = stored_shapes(model)
    problems = [f"missing tensor {name!r} (expected shape {shape})"
                for name, shape in expected.items() if name not in header]
    problems += [f"unexpected tensor {name!r}" for name in header if name not in expected]
    problems += [f"tensor {name!r} has shape {header[name][1]}, the model needs {shape}"
                 for name, shape in expected.items() if name in header and header[name][1] != shape]
    want = _SAFETENSORS_DTYPE.get(section.get("dtype", "float32"))
    wrong = sorted(name for name, (dtype, _) in header.items() if dtype != want)
    if wrong:
        problems.append(f"{len(wrong)} tensors are not {want} as config.json's dtype says (e.g. {wrong[0]!r} is "
                        f"{header[wrong[0]][0]})")
    return problems


def read_headers(directory: PathLike, files: List[str]) -> Dict[str, Tuple[str, List[int]]]:
    """The safetensors headers of a bundle's weight files (``files`` from :func:`weight_files`)."""
    header: Dict[str, Tuple[str, List[int]]] = {}
    for file in files:
        if file != INDEX_NAME:
            header.update(read_safetensors_header(bundle_file(directory, file, "weight file")))
    return header


def digest_problems(directory: PathLike, section: Dict[str, Any], files: List[str],
                    sizes_only: bool = False) -> List[str]:
    """Each of ``files`` whose size or sha256 differs from what config.json records (or that it
    does not record). Sizes are compared first: a truncated file costs no read. ``sizes_only``:
    compare only the sizes (instant; run before the headers are parsed)."""
    directory = Path(directory)
    digests = section[DIGESTS_KEY]
    problems = []
    for file in files:
        path = bundle_file(directory, file, "weight file")
        record = digests.get(file)
        if record is None:
            problems.append(f"{path}: config.json records no digest for it (recorded: "
                            f"{', '.join(sorted(digests)) or 'none'})")
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            problems.append(f"{path}: {size:,} bytes, config.json records {record['bytes']:,} (truncated or replaced)")
            continue
        if sizes_only:
            continue
        found = file_digest(path)["sha256"]
        if found != record["sha256"]:
            problems.append(f"{path}: sha256 {found}, config.json records {record['sha256']} (corrupted or changed "
                            "after export)")
    return problems


_WARNED_UNVERIFIED: set = set()


def verify_weights(directory: PathLike, section: Dict[str, Any], files: List[str], sizes_only: bool = False) -> bool:
    """Check the weight files' sizes and sha256 (or only their sizes) against config.json;
    BundleError naming each file that differs. A bundle written before digests were recorded loads
    with a warning on stderr (once per bundle); returns False then, True when verified."""
    directory = Path(directory)
    if section.get(DIGESTS_KEY) is None:
        key = str(directory.resolve())
        if key not in _WARNED_UNVERIFIED:
            _WARNED_UNVERIFIED.add(key)
            print(f"[mmtrain] warning: {directory}: config.json records no weight digests (a bundle written "
                  "before mmtrain recorded them); its weights are used unverified. Re-export it to add them.",
                  file=sys.stderr, flush=True)
        return False
    problems = digest_problems(directory, section, files, sizes_only)
    if problems:
        raise BundleError(f"{directory}: weight files do not match the digests in {CONFIG_NAME}; {REEXPORT}:\n  - "
                          + "\n  - ".join(problems))
    return True


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_pretrained(path: PathLike, device: Any = "cpu", dtype: Optional[torch.dtype] = None,
                    kind: Optional[str] = None, verify: bool = True) -> CausalLM:
    """Rebuild the model of a bundle in eval mode (``dtype`` default float32, whatever was stored).

    With ``kind`` (e.g. ``"mixer"``) the bundle must hold that kind of model (ValueError otherwise).

    Needs only the bundle: config.json's "mmtrain" section and the safetensors weights. Before
    anything is allocated, config.json is checked against the model schema and the tensors it
    implies against the safetensors headers (every missing, unexpected or wrongly shaped tensor is
    named in one BundleError), then each weight file's size and sha256 against config.json's
    digests (``verify``, default on, about 1 s per GB; ``verify=False`` skips only the digests).
    """
    path = Path(path)
    section = read_bundle_config(path)
    if kind is not None and section["model"]["kind"] != kind:
        raise ValueError(f"{path} holds a {section['model']['kind']!r} model, not a {kind!r} model")
    files = weight_files(path)
    try:
        header = read_headers(path, files)
    except BundleError:
        if verify:   # a truncated file is named as such rather than by what its header lacks
            verify_weights(path, section, files, sizes_only=True)
        raise
    gather = init_gather()
    # Under ZeRO-3's zero.Init every module built is partitioned, a meta one too: the shapes are
    # then compared on the (partitioned, so per-rank small) model itself, after the lower bounds.
    _refuse_mismatch(path, _plausibility_problems(section["model"], header) if gather
                     else shape_problems(section, header))
    if verify:
        verify_weights(path, section, files)
    model = build_model(section["model"])
    if gather:
        _refuse_mismatch(path, shape_problems(section, header, model))
    stored = _in_model_layout(model, read_weights(path), path)
    aliases = tied_names(model)
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


def _refuse_mismatch(path: Path, problems: List[str]) -> None:
    if problems:
        raise BundleError(f"{path}: weights do not match config.json's model:\n  - " + "\n  - ".join(problems))


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
