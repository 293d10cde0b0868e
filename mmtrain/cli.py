"""The `mmtrain` command: one sub-command per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed arguments; returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mmtrain import config as C
from mmtrain.config import ConfigError
from mmtrain.files import OutputError

# Sub-command -> module that registers it, in the order `mmtrain --help` lists them. Only the
# module of the command being run is imported (several import torch, which takes seconds).
COMMANDS = {
    "prepare": "mmtrain.data.prepare",
    "prepare-pairs": "mmtrain.data.pairs",
    "export": "mmtrain.export.exporter",
    "export-embedder": "mmtrain.export.exporter",
    "eval-lm": "mmtrain.eval.lm",
    "eval-harness": "mmtrain.eval.harness",
    "eval-retrieval": "mmtrain.eval.retrieval",
    "frozen-retrieval": "mmtrain.eval.frozen_retrieval",
    "generate": "mmtrain.eval.generate",
    "analyze-representation": "mmtrain.eval.representation",
    "report": "mmtrain.eval.report",
    "verify": "mmtrain.export.verify",
    "config-reference": "mmtrain.cli",
    "show-config": "mmtrain.cli",
}


def schemas() -> dict:
    """``config-reference`` / ``show-config`` schema name -> schema (each lives with the code it configures)."""
    from mmtrain.data.schema import PairsConfig, PrepareConfig
    from mmtrain.eval.schema import FrozenRetrievalConfig
    from mmtrain.train.schema import PretrainConfig, RetrievalConfig

    return {"pretrain": PretrainConfig, "prepare": PrepareConfig, "retrieval": RetrievalConfig,
            "pairs": PairsConfig, "frozen_retrieval": FrozenRetrievalConfig}


def _reference(args) -> int:
    schema = schemas()[args.schema]
    print(C.REFERENCE_HEADER)
    print("\n".join(C.reference(schema)))
    print("\nrole: `train` changes what is trained (a resume that changes it is refused unless "
          "checkpoint.allow_changes names it); `layout` how or where the same training runs (may change on "
          "resume); `watch` how the run is watched or fed (may change on resume; not in the HParams dashboard)")
    return 0


def _show(args) -> int:
    cfg = C.load_config(schemas()[args.schema], args.config or [], args.overrides)
    print(C.to_yaml(cfg), end="")
    return 0


SCHEMA_NAMES = ["frozen_retrieval", "pairs", "prepare", "pretrain", "retrieval"]


def register(sub) -> None:
    p = sub.add_parser("config-reference", help="print every config key: type, default, valid range, meaning")
    p.add_argument("schema", choices=SCHEMA_NAMES, nargs="?", default="pretrain")
    p.set_defaults(func=_reference)
    p = sub.add_parser("show-config", help="print the resolved config (defaults <- YAML files <- overrides)")
    p.add_argument("schema", choices=SCHEMA_NAMES)
    p.add_argument("--config", action="append", help="YAML file (repeatable; later files win)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=_show)


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="mmtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = [a for a in (argv or []) if a in COMMANDS][:1]
    modules = [COMMANDS[wanted[0]]] if wanted else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides given after an option (`--config a.yaml x=1`) land in `extra`.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mmtrain {args.command}: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:   # an output directory that is not ours, locked, or a full disk
        print(f"mmtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
