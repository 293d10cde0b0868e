"""The package layout is the pipeline, in layers: config / files <- models <- data <- export <- eval
<- train <- the command and entry scripts; a module imports only its own layer and those below, and
nothing imports itself back.

Every ``import`` of an mmtrain module is read from the source (top-level and inside functions).
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mmtrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set:
    """The mmtrain modules ``path`` imports (``from mmtrain.a import b`` counts mmtrain.a.b when b is
    a module, else mmtrain.a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mmtrain"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmtrain":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def package(module: str) -> str:
    """models / data / train / export / eval, or "top" for mmtrain's own modules (config, cli, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else "top"


# Lowest first. "base": the modules every layer may use (config.py: typed configs; files.py: output
# directories; optim.py: the optimizer settings, LR schedule and non-finite-loss error of every
# training loop); "entry": the package itself (its lazy ``load_pretrained``), the `mmtrain` command
# and the training scripts, which may import everything.
LAYERS = ["base", "models", "data", "export", "eval", "train", "entry"]
BASE = {"mmtrain.config", "mmtrain.files", "mmtrain.checkpoint_files", "mmtrain.optim"}

# Upward imports being moved away; each entry goes once its import has (the test then asks for it).
PENDING: set = set()


def layer(module: str) -> str:
    pkg = package(module)
    if pkg != "top":
        return pkg
    return "base" if module in BASE else "entry"


def upward_imports(name: str) -> list:
    """The imports of the modules of layer ``name`` that reach a higher layer, as (module, imported).
    ``mmtrain`` itself is no target: ``from mmtrain import __version__`` runs nothing that importing
    any mmtrain module has not run already."""
    rank = LAYERS.index(name)
    return sorted((m, d) for m, deps in GRAPH.items() if layer(m) == name
                  for d in deps if d != "mmtrain" and LAYERS.index(layer(d)) > rank)


def test_the_graph_is_read():
    assert "mmtrain.train.checkpoint" in GRAPH["mmtrain.train.trainer"]
    assert "mmtrain.models.layers" in GRAPH["mmtrain.models.mixer"]
    assert "mmtrain.eval.tags" in GRAPH["mmtrain.train.monitor"]


def test_every_module_has_a_layer():
    found = {layer(m) for m in MODULES}
    assert found <= set(LAYERS), f"packages without a layer: {sorted(found - set(LAYERS))}"
    assert found == set(LAYERS), f"layers without modules (drop them): {sorted(set(LAYERS) - found)}"


@pytest.mark.parametrize("name", LAYERS)
def test_a_layer_imports_only_its_own_and_lower_layers(name):
    upward = [(m, d) for m, d in upward_imports(name) if (m, d) not in PENDING]
    assert not upward, "\n".join(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, d in upward)


def test_pending_upward_imports_still_exist():
    found = {i for name in LAYERS for i in upward_imports(name)}
    assert PENDING <= found, f"gone, drop them from PENDING: {sorted(PENDING - found)}"


def test_an_untrained_model_reads_every_section_of_a_pretrain_config():
    """analyze-representation reads pretrain configs without the training package's schema: its own
    schema must know every section (an unknown one is an error)."""
    import dataclasses

    from mmtrain.eval.representation import UntrainedModelConfig
    from mmtrain.train.schema import PretrainConfig

    assert ([f.name for f in dataclasses.fields(UntrainedModelConfig)]
            == [f.name for f in dataclasses.fields(PretrainConfig)])


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    # a package __init__ importing its own modules is how Python packages work, not a cycle
    cycles = [c for c in cycles if not any(m == ".".join(c[0].split(".")[:2]) for m in c)]
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_one_training_loop_and_thin_entry_points():
    trainers = [(name, node.name) for name, path in MODULES.items()
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ClassDef) and node.name.endswith("Trainer")]
    assert trainers == [("mmtrain.train.trainer", "Trainer")]
    for script in ("pretrain.py", "retrieval.py"):
        assert len((PACKAGE / script).read_text().splitlines()) <= 60, script
