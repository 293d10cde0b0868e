"""Every YAML shipped under configs/ loads against its schema, and pretrain configs build their model."""

from pathlib import Path

import pytest
import torch

from mmtrain.cli import main as cli_main
from mmtrain.config import load_config
from mmtrain.train.schema import PretrainConfig
from mmtrain.cli import SCHEMA_NAMES, schemas

SCHEMAS = schemas()  # configs/<dir>/ -> schema, as `mmtrain config-reference <dir>`
from mmtrain.models import build_model

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def test_configs_are_discovered():
    assert any(p.parent.name == "pretrain" for p in YAMLS)
    assert SCHEMA_NAMES == sorted(SCHEMAS)   # the CLI's choices are every schema


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_config_reference_documents_every_schema(schema, capsys):
    assert cli_main(["config-reference", schema]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert rows and all(line.count("|") >= 5 for line in rows)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_loads_and_builds(path):
    schema = SCHEMAS.get(path.parent.name)
    assert schema is not None, f"{path}: no schema for configs/{path.parent.name}/ (add it to SCHEMAS)"
    cfg = load_config(schema, [str(path)])
    if schema is PretrainConfig:
        with torch.device("meta"):  # full-size models without allocating their weights
            model = build_model(cfg.model, 4096)
        assert model.num_params() > 0
        assert model.n_ctx == cfg.model.n_ctx
