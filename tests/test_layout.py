"""The package layout is the pipeline: models <- data <- export <- eval / train, without import cycles.

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


def test_the_graph_is_read():
    assert "mmtrain.train.checkpoint" in GRAPH["mmtrain.train.trainer"]
    assert "mmtrain.models.layers" in GRAPH["mmtrain.models.mixer"]


@pytest.mark.parametrize("pkg, allowed", [
    ("models", {"mmtrain.config"}),
    # pairs made for a bundle read its tokenizer and n_ctx: the bundle format is the one export module
    # mmtrain.files: how every command writes its output directory (ownership, lock, atomic swap)
    ("data", {"mmtrain.config", "mmtrain.export.bundle", "mmtrain.files"}),
])
def test_lower_layers_import_nothing_above_them(pkg, allowed):
    offending = {m: sorted(d for d in deps if package(d) != pkg and d not in allowed)
                 for m, deps in GRAPH.items() if package(m) == pkg}
    assert not {m: d for m, d in offending.items() if d}, offending


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
