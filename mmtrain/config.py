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
import sys
from dataclasses import field
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


def setting(default: Any, help: str, choices: Optional[Sequence[Any]] = None, factory: bool = False):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


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
        sub = _dataclass_type(schema_cls, f)
        if sub is not None:
            _check_choices(value, sub, dotted, problems, sources)
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            problems.append(f"{dotted} ({sources.get(dotted, 'default')}): {value!r} is not one of "
                            f"{', '.join(map(repr, choices))}")


def _check_finite(cfg: DictConfig, prefix: str, problems: List[str], sources: dict) -> None:
    """No number in a config may be inf or nan (``train.lr=inf`` would train a broken model)."""
    for key in cfg:
        value, dotted = cfg[key], f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, DictConfig):
            _check_finite(value, dotted, problems, sources)
        elif isinstance(value, ListConfig):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                problems.append(f"{dotted} ({sources.get(dotted, 'default')}): every entry must be a finite number")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{dotted} ({sources.get(dotted, 'default')}): must be a finite number, got {value}")


def _dataclass_type(schema_cls: type, f: dataclasses.Field) -> Optional[type]:
    """The nested schema of field ``f`` of ``schema_cls``, if it is one (string annotations are
    resolved in the schema's own module)."""
    t = f.type
    if isinstance(t, str):
        t = vars(sys.modules[schema_cls.__module__]).get(t)
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
    _check_finite(cfg, "", problems, sources)
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


_VALIDATORS: dict = {}


def register_validator(schema_cls: type, fn) -> None:
    """Attach a semantic validator (cfg -> list of problems) to a schema."""
    _VALIDATORS[schema_cls] = fn


def reference(schema_cls: type, prefix: str = "") -> List[str]:
    """Markdown lines documenting every field of a schema (key, type, default, help)."""
    lines: List[str] = []
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        sub = _dataclass_type(schema_cls, f)
        if sub is not None:
            lines.extend(reference(sub, dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
        lines.append(f"| `{dotted}` | {tname} | `{default!r}` | {f.metadata.get('help', '')}{extra} |")
    return lines
