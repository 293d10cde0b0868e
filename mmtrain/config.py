"""Typed configuration: OmegaConf structured dataclasses in struct mode.

``load_config(Schema, [a.yaml, b.yaml], ["train.lr=3e-4"])`` merges defaults <- YAML files (in
order) <- ``key=value`` overrides. Every unknown key, wrong type and invalid value is collected
and reported in one :class:`ConfigError` that names the key and where it came from (file or
command line). The resolved config dumps to YAML (:func:`to_yaml`) and loads back identically.

Every field carries ``metadata["help"]`` (units, example) and every numeric field its valid range
(``metadata["range"]``, declared with ``setting(..., ge=1)`` etc.); ``mmtrain config-reference``
prints both, and :func:`load_config` reports every value outside its range.

YAML files are read defensively: a directory, an unreadable, oversized or non-UTF-8 file, a tag, a
recursive alias or aliases that expand to more than :data:`MAX_YAML_NODES` values are refused with
a :class:`ConfigError` that names the file and never quotes its contents.
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


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: optional lower (``ge`` / ``gt``) and upper (``le`` /
    ``lt``) bounds. For a list setting, every entry must lie in it."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        lo = _bound(self.ge if self.ge is not None else self.gt)
        hi = _bound(self.le if self.le is not None else self.lt)
        if lo is not None and hi is not None:
            return f"{'[' if self.ge is not None else '('}{lo}, {hi}{']' if self.le is not None else ')'}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {lo}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {hi}"
        return "any"

    def describe(self, is_float: bool = False) -> str:
        """The range as the end of "must be ...": ``>= 1``, ``in [0, 1)``, or for a float with one
        bound ``a finite number > 0`` (an interval excludes inf by itself)."""
        text = str(self)
        if text[0] in "[(":
            return f"in {text}"
        return f"a finite number {text}" if is_float else text


def _bound(x: Optional[float]) -> Optional[str]:
    if x is None:
        return None
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# The largest value Python's, NumPy's and SentencePiece's seeding accepts (np.random.seed: < 2**32).
MAX_SEED = 2**32 - 1


#: What a setting does to a run, read by resume checks, the HParams dashboard and config-reference:
#: ``train`` changes what is trained (a resume that changes it is refused unless
#: checkpoint.allow_changes names it; a hyperparameter); ``layout`` says how or where the same
#: training runs (may change on resume, checked or converted there; a hyperparameter);
#: ``watch`` only changes how the run is watched or fed (may change on resume; not a hyperparameter).
ROLES = ("train", "layout", "watch")


def setting(default: Any, help: str, choices: Optional[Sequence[Any]] = None, factory: bool = False, *,
            ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
            lt: Optional[float] = None, role: Optional[str] = None):
    """A schema field: its default, its help text, its valid values (``choices``, or a numeric
    range from the bounds ``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <) and its :data:`ROLES` entry
    (default: the section's ``ROLE`` class attribute, else ``train``)."""
    meta: dict = {"help": help}
    if role is not None:
        assert role in ROLES, role
        meta["role"] = role
    if choices is not None:
        meta["choices"] = list(choices)
    if any(b is not None for b in (ge, gt, le, lt)):
        meta["range"] = Range(ge=ge, gt=gt, le=le, lt=lt)
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def seed_setting(default: int, help: str):
    """A seed: any integer the random generators it feeds accept."""
    return setting(default, help, ge=0, le=MAX_SEED)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_struct_node(schema_node: Any) -> bool:
    return isinstance(schema_node, DictConfig)


def _flatten(data: Any, schema: DictConfig, prefix: str, source: str,
             out: List[Tuple[str, Any, str]], problems: List[str]) -> None:
    """Flatten a plain dict into (dotted key, value, source) leaves, reporting unknown keys."""
    if not isinstance(data, dict):
        # No repr of the value: a wrong file given as --config parses as one big string.
        problems.append(f"{prefix or '<top level>'} ({source}): expected a mapping of sections and keys "
                        f"(e.g. `train:` / `  lr: 1e-3`), got a {type(data).__name__}")
        return
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            hint = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            where = f"'{prefix}'" if prefix else "the top level"
            msg = f"unknown key {_short(dotted)} ({source})"
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
    try:
        value = yaml.load(raw, Loader=_loader()) if raw.strip() != "" else ""
    except YAMLTooLarge as exc:
        raise ValueError(f"{key}: refused: the YAML value {exc}") from None
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


# A config has a few hundred values at most; these bounds only stop abuse (a huge file, an alias
# bomb) before it costs time or memory. OmegaConf takes ~0.3 ms per list entry, so a document at
# the node limit still loads in a few seconds.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000


class YAMLTooLarge(yaml.YAMLError):
    """A YAML document whose aliases expand beyond :data:`MAX_YAML_NODES` values, or refer to themselves."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Number of nodes of ``root`` once every alias is expanded, computed on the composed graph
    (where an alias is the same node object again), so a "billion laughs" document costs as many
    steps as it has distinct nodes. Raises :class:`YAMLTooLarge` above ``limit`` or on a cycle."""
    sizes: dict = {}          # id(node) -> expanded size
    on_path: set = set()      # nodes being expanded, to detect a node that contains itself
    # Iterative post-order walk: a deeply nested document must not hit Python's recursion limit.
    stack: List[Tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            if total > limit:
                raise YAMLTooLarge(f"expands to more than {limit} values (aliases included); "
                                   "a config needs far fewer: write the values out")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YAMLTooLarge("has an alias that refers to a node containing it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> List[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _BoundedLoader(_Loader):
    """:class:`_Loader` that refuses a document whose alias expansion is too large, before any
    Python object is built from it."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, MAX_YAML_NODES)
        return node


def _loader():
    return _BoundedLoader


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line with its position, without PyYAML's quoted snippet of the file."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = exc.problem or exc.context or "syntax error"
        return f"{where}{what}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _read_text(path: str) -> str:
    """The file's text: refuses (naming the file, never quoting it) what is not a readable, small,
    UTF-8 text file."""
    if not os.path.exists(path):
        raise ConfigError([f"config file not found: {path}"])
    if os.path.isdir(path):
        raise ConfigError([f"{path}: is a directory; --config takes a YAML file (e.g. {path.rstrip('/')}/<name>.yaml)"])
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)   # bounded: a device or a pipe may never end
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or type(exc).__name__}"]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_YAML_BYTES} bytes; a config file is a few KB of YAML "
                           "(is this the right file?)"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}: not UTF-8 text (invalid byte at offset {exc.start}, line {line}); "
                           "save the file as UTF-8"]) from None


def _read_yaml(path: str) -> Any:
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_loader())
    except YAMLTooLarge as exc:
        raise ConfigError([f"{path}: refused: the YAML {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {_yaml_problem(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: refused: the YAML is nested too deeply"]) from None
    return {} if data is None else data


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error quotes a value, not a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _item_schema(node: Any) -> Optional[type]:
    """The dataclass the entries of a list setting are (``List[StreamSpec]``), else None."""
    item = getattr(getattr(node, "_metadata", None), "element_type", None)
    return item if isinstance(item, type) and dataclasses.is_dataclass(item) else None


def _set_leaf(cfg: DictConfig, key: str, value: Any, source: str, problems: List[str]) -> None:
    node = OmegaConf.select(cfg, key)
    item = _item_schema(node) if isinstance(node, ListConfig) else None
    if item is not None and isinstance(value, list):
        # a list of sections: every entry a mapping of the section's keys
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                problems.append(f"{key}[{i}] ({source}): expected a mapping of {', '.join(f.name for f in dataclasses.fields(item))}, "
                                f"got {_short(entry)}")
                return
            unknown = [k for k in entry if k not in {f.name for f in dataclasses.fields(item)}]
            if unknown:
                hint = difflib.get_close_matches(str(unknown[0]), [f.name for f in dataclasses.fields(item)], n=1)
                problems.append(f"{key}[{i}] ({source}): unknown key {_short(unknown[0])}"
                                + (f"; did you mean '{hint[0]}'?" if hint else
                                   f"; accepts: {', '.join(f.name for f in dataclasses.fields(item))}"))
                return
    # Every other list setting holds single values; OmegaConf would take nested lists / mappings as entries.
    elif isinstance(node, ListConfig) and isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        problems.append(f"{key} ({source}): every entry must be a single value, not a list or mapping")
        return
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as exc:
        expected = type(node).__name__ if node is not None else "?"
        if isinstance(node, (ListConfig, list)):
            expected = "list"
        reason = re.sub(r"Value '(.*?)' (?=of type|is not|could not)", lambda m: f"Value {_short(m.group(1))} ",
                        str(exc).splitlines()[0])
        problems.append(f"{key} ({source}): cannot use {_short(value)} ({type(value).__name__}); "
                        f"expected {expected}: {reason}")


def _leaf_fields(schema_cls: type, cfg: Any, prefix: str = ""):
    """(dotted key, field, value) for every leaf field of a schema, nested sections included."""
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        value = cfg[f.name]
        sub = _dataclass_type(schema_cls, f)
        item = _list_item_type(schema_cls, f)
        if sub is not None:
            yield from _leaf_fields(sub, value, dotted)
        elif item is not None:
            for i, entry in enumerate(value):
                yield from _leaf_fields(item, entry, f"{dotted}[{i}]")
        else:
            yield dotted, f, value


def _check_choices(cfg: DictConfig, schema_cls: type, prefix: str, problems: List[str],
                   sources: dict) -> None:
    for dotted, f, value in _leaf_fields(schema_cls, cfg, prefix):
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            problems.append(f"{dotted} ({sources.get(dotted, 'default')}): {_short(value)} is not one of "
                            f"{', '.join(map(repr, choices))}")


def _is_number(value: Any, finite_only: bool) -> bool:
    # bool is an int in Python, but never a number a range applies to.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) or not finite_only


def check_ranges(cfg: Any, schema_cls: type, prefix: str = "", sources: Optional[dict] = None,
                 finite_checked: bool = False) -> List[str]:
    """Every value of ``cfg`` (a config of ``schema_cls``, or a section) outside its field's declared
    range, one problem each, naming the key, its source (when ``sources`` is given), the value and
    the range. inf and nan are outside every range, unless ``finite_checked`` (already reported)."""
    problems: List[str] = []
    for dotted, f, value in _leaf_fields(schema_cls, cfg, prefix):
        valid = f.metadata.get("range")
        if valid is None:
            continue
        where = f" ({sources.get(dotted, 'default')})" if sources is not None else ""
        if isinstance(value, (ListConfig, list, tuple)):
            bad = [v for v in value if _is_number(v, finite_checked) and v not in valid]
            if bad:
                problems.append(f"{dotted}: every entry must be {valid.describe()}, got "
                                f"{', '.join(map(repr, bad))}{where}")
        elif _is_number(value, finite_checked) and value not in valid:
            problems.append(f"{dotted}: must be {valid.describe(isinstance(value, float))}, got {value!r}{where}")
    return problems


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


def _list_item_type(schema_cls: type, f: dataclasses.Field) -> Optional[type]:
    """The section type of a ``List[Section]`` field of ``schema_cls``, else None."""
    t = f.type
    if isinstance(t, str):
        match = re.fullmatch(r"(?:typing\.)?List\[(\w+)\]", t)
        t = vars(sys.modules[schema_cls.__module__]).get(match.group(1)) if match else None
        return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None
    args = getattr(t, "__args__", None) or ()
    return args[0] if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]) else None


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
    # The cross-field validator needs well-typed values, but copes with out-of-range ones, so a
    # range problem is reported together with everything the validator finds.
    well_typed = not problems
    problems.extend(check_ranges(cfg, schema_cls, "", sources, finite_checked=True))
    validator = getattr(schema_cls, "validate", None) or _VALIDATORS.get(schema_cls)
    if validator is not None and well_typed:
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


# --------------------------------------------------------------------------------------------
# Semantic validation (after types are right)
# --------------------------------------------------------------------------------------------


_VALIDATORS: dict = {}


def register_validator(schema_cls: type, fn) -> None:
    """Attach a semantic validator (cfg -> list of problems) to a schema."""
    _VALIDATORS[schema_cls] = fn


REFERENCE_HEADER = "| key | type | default | range | role | meaning |\n|---|---|---|---|---|---|"


def _role(schema_cls: type, f: dataclasses.Field, inherited: str) -> str:
    return f.metadata.get("role") or getattr(schema_cls, "ROLE", None) or inherited


def setting_roles(schema_cls: type, prefix: str = "", inherited: str = "train") -> dict:
    """dotted key -> :data:`ROLES` entry for every setting of a schema (a list of sections is one
    setting)."""
    out: dict = {}
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        sub = _dataclass_type(schema_cls, f)
        if sub is not None:
            out.update(setting_roles(sub, dotted, _role(schema_cls, f, inherited)))
        else:
            out[dotted] = _role(schema_cls, f, inherited)
    return out


def reference(schema_cls: type, prefix: str = "", inherited: str = "train") -> List[str]:
    """Markdown rows documenting every field of a schema (key, type, default, valid range, role,
    help), under :data:`REFERENCE_HEADER`."""
    lines: List[str] = []
    for f in dataclasses.fields(schema_cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        role = _role(schema_cls, f, inherited)
        sub = _dataclass_type(schema_cls, f)
        if sub is not None:
            lines.extend(reference(sub, dotted, role))
            continue
        item = _list_item_type(schema_cls, f)
        if item is not None:
            lines.append(f"| `{dotted}` | List[{item.__name__}] | `[]` | | {role} | {f.metadata.get('help', '')} |")
            lines.extend(reference(item, f"{dotted}[]", role))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
        valid = f.metadata.get("range")
        shown = "" if valid is None else (f"each {valid}" if tname.startswith("List") else str(valid))
        if choices and tname in ("int", "float"):
            shown = f"one of {', '.join(map(str, choices))}"
        lines.append(f"| `{dotted}` | {tname} | `{default!r}` | {shown} | {role} | {f.metadata.get('help', '')}{extra} |")
    return lines
