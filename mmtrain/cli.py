"""The `mmtrain` command: one sub-command per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed arguments; returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mmtrain.config import ConfigError

# Modules that contribute sub-commands, in the order `mmtrain --help` lists them.
COMMAND_MODULES = [
    "mmtrain.data.prepare",
    "mmtrain.config_cli",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="mmtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mmtrain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
