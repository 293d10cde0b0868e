"""The `mmtrain` command: one sub-command per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed arguments; returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mmtrain.config import ConfigError

# Sub-command -> module that registers it, in the order `mmtrain --help` lists them. Only the
# module of the command being run is imported (several import torch, which takes seconds).
COMMANDS = {
    "prepare": "mmtrain.data.prepare",
    "prepare-pairs": "mmtrain.data.pairs",
    "export": "mmtrain.export",
    "export-embedder": "mmtrain.retrieval_eval",
    "eval-lm": "mmtrain.evaluate",
    "eval-retrieval": "mmtrain.retrieval_eval",
    "frozen-retrieval": "mmtrain.frozen_retrieval",
    "generate": "mmtrain.generate",
    "analyze-representation": "mmtrain.representation",
    "report": "mmtrain.report",
    "config-reference": "mmtrain.config_cli",
    "show-config": "mmtrain.config_cli",
}


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


if __name__ == "__main__":
    sys.exit(main())
