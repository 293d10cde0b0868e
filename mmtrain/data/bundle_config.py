"""Reading an exported bundle's ``config.json`` and tokenizer (the bundle format itself is
:mod:`mmtrain.export.bundle`, which writes bundles and loads their weights).

Pair shards made for a bundle take its tokenizer and n_ctx from here, and every command that loads
a bundle reads its config through :func:`read_bundle_config`: the "mmtrain" section is checked
against the model schema (types, ranges, kinds) and the keys loading reads before anything is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
DIGESTS_KEY = "digests"              # mmtrain section: {weight file: {"bytes": n, "sha256": hex}}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

PathLike = Union[str, Path]


class BundleError(ValueError):
    """A bundle directory that cannot be loaded: the message names the file and what is wrong."""


def bundle_file(directory: PathLike, name: str, what: str) -> Path:
    """``directory / name`` for a file a bundle's own JSON names; BundleError unless it resolves
    (symlinks followed) inside the bundle directory: a bundle never makes mmtrain open other files."""
    root = Path(directory).resolve()
    path = (root / str(name)).resolve()
    if not str(name) or os.path.isabs(str(name)) or (path != root and root not in path.parents):
        raise BundleError(f"{Path(directory)}: {what} {str(name)!r} is not a file inside the bundle directory; "
                          "refusing to read it (re-export the bundle with `mmtrain export`)")
    return path


_HEX = set("0123456789abcdef")
_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def describe_value(value: Any) -> str:
    """A config value for an error message: its JSON type and a short rendering."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else ""
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} ({text})" if text else kind


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def model_config_problems(model: Any, prefix: str = "mmtrain.model") -> List[str]:
    """Every way the model section of a bundle's config.json breaks the model schema
    (:class:`mmtrain.models.schema.ModelConfig`): unknown keys, wrong JSON types, unknown kinds and
    choices, values out of range. Empty when :func:`mmtrain.models.build_model` can build it."""
    from omegaconf import OmegaConf

    from mmtrain.models import MODELS
    from mmtrain.models.schema import ModelConfig, validate_model

    if not isinstance(model, dict):
        return [f"{prefix}: expected an object with the model config, found {describe_value(model)}"]
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    problems = [f"{prefix}.{key}: unknown key (model keys: {', '.join(fields)})"
                for key in model if key not in fields]
    typed: Dict[str, Any] = {}   # the keys whose type (and choice) is right, for the range checks
    for key, value in model.items():
        field = fields.get(key)
        if field is None:
            continue
        expected = field.type if isinstance(field.type, type) else _SCALAR_TYPES.get(field.type)
        if expected not in (bool, int, float, str):
            continue   # not a scalar setting: validate_model checks it
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = is_int(value)
        elif expected is float:
            ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[expected]
            problems.append(f"{prefix}.{key}: expected {what}, found {describe_value(value)}")
            continue
        choices = list(MODELS) if key == "kind" else field.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{prefix}.{key}: {json.dumps(value)[:40]} is not one of {', '.join(map(repr, choices))}")
            continue
        typed[key] = value
    if "kind" not in model:
        problems.append(f"{prefix}.kind: missing (one of {', '.join(map(repr, MODELS))})")
    vocab = model.get("vocab_size")
    if is_int(vocab) and vocab < 1:
        problems.append(f"{prefix}.vocab_size: must be >= 1 in a bundle, found {vocab}")
    # The range checks compare numbers: they see the well-typed keys, defaults for the others.
    defaults = dataclasses.asdict(ModelConfig())
    return problems + validate_model(OmegaConf.create({**defaults, **typed}), prefix=prefix)


def section_problems(section: Dict[str, Any]) -> List[str]:
    """Schema problems of a bundle's "mmtrain" section: the model config and the keys loading
    reads (dtype, tokenizer, weight files, digests)."""
    problems = model_config_problems(section.get("model"))
    dtype = section.get("dtype", "float32")
    if dtype not in (DTYPE_NAMES[t] for t in DTYPES.values()):
        problems.append(f"mmtrain.dtype: expected one of {', '.join(DTYPE_NAMES[t] for t in DTYPES.values())}, "
                        f"found {describe_value(dtype)}")
    tokenizer = section.get("tokenizer")
    if not isinstance(tokenizer, dict):
        problems.append("mmtrain.tokenizer: expected an object with 'file' and 'sha256', found "
                        f"{describe_value(tokenizer)}")
    else:
        if not isinstance(tokenizer.get("file"), str):
            problems.append("mmtrain.tokenizer.file: expected a file name, found "
                            f"{describe_value(tokenizer.get('file'))}")
        if not _is_sha256(tokenizer.get("sha256")):
            problems.append("mmtrain.tokenizer.sha256: expected 64 lowercase hex digits, found "
                            f"{describe_value(tokenizer.get('sha256'))}")
    files = section.get("weight_files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        problems.append(f"mmtrain.weight_files: expected a list of file names, found {describe_value(files)}")
    digests = section.get(DIGESTS_KEY)
    if digests is not None:
        if not isinstance(digests, dict):
            problems.append(f"mmtrain.{DIGESTS_KEY}: expected an object {{file: {{bytes, sha256}}}}, "
                            f"found {describe_value(digests)}")
        else:
            for name, record in digests.items():
                if not (isinstance(record, dict) and is_int(record.get("bytes")) and record["bytes"] >= 0
                        and _is_sha256(record.get("sha256"))):
                    problems.append(f"mmtrain.{DIGESTS_KEY}.{name}: expected {{\"bytes\": n >= 0, \"sha256\": "
                                    "64 hex digits}")
    return problems


REEXPORT = ("re-export the bundle from its checkpoint (`mmtrain export RUN --out BUNDLE --overwrite`) or "
            "restore it from a good copy")


def read_json(path: Path) -> Any:
    """A JSON file's value; BundleError naming the file and where it breaks (never its text)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text (byte {exc.start}); not a file written by "
                          "`mmtrain export`") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                          "restore it or re-export the bundle") from None
    except RecursionError:
        raise BundleError(f"{path}: JSON nested too deeply; not a file written by `mmtrain export`") from None


def read_bundle_config(path: PathLike) -> Dict[str, Any]:
    """The "mmtrain" section of ``<path>/config.json``; BundleError when it is not a bundle."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {CONFIG_NAME}"
        raise BundleError(f"{path} {what}: not a bundle written by `mmtrain export`")
    config = read_json(config_path)
    section = config.get("mmtrain") if isinstance(config, dict) else None
    if not isinstance(section, dict) or "model" not in section:
        raise BundleError(f"{config_path}: no 'mmtrain' section with the model config (not written by "
                          "`mmtrain export`)")
    version = section.get("format_version")
    if not is_int(version) or version > FORMAT_VERSION:
        raise BundleError(f"{config_path}: bundle format_version {describe_value(version)}; this mmtrain reads "
                          f"versions up to {FORMAT_VERSION} (upgrade mmtrain)")
    problems = section_problems(section)
    if problems:
        raise BundleError(f"{config_path}: not a valid bundle config ({REEXPORT}):\n  - " + "\n  - ".join(problems))
    return section


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
