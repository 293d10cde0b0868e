"""`mmtrain config-reference` and `mmtrain show-config`: the config keys, documented."""

from __future__ import annotations

from mmtrain import config as C

SCHEMAS = {"pretrain": C.PretrainConfig, "prepare": C.PrepareConfig, "retrieval": C.RetrievalConfig,
           "pairs": C.PairsConfig, "frozen_retrieval": C.FrozenRetrievalConfig}


def _reference(args) -> int:
    schema = SCHEMAS[args.schema]
    print("| key | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(C.reference(schema)))
    return 0


def _show(args) -> int:
    cfg = C.load_config(SCHEMAS[args.schema], args.config or [], args.overrides)
    print(C.to_yaml(cfg), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("config-reference", help="print every config key with its type, default and meaning")
    p.add_argument("schema", choices=sorted(SCHEMAS), nargs="?", default="pretrain")
    p.set_defaults(func=_reference)
    p = sub.add_parser("show-config", help="print the resolved config (defaults <- YAML files <- overrides)")
    p.add_argument("schema", choices=sorted(SCHEMAS))
    p.add_argument("--config", action="append", help="YAML file (repeatable; later files win)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=_show)
