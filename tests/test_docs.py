"""The fault table names real tests: every ``test_file.py::test_name`` in docs/fault-tolerance.md exists."""

import ast
import re

from conftest import ROOT

DOC = ROOT / "docs" / "fault-tolerance.md"


def defined_tests(path) -> set:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_named_in_the_fault_table_exists():
    named = set(re.findall(r"(?:tests/)?(test_\w+\.py)::(test_\w+)", DOC.read_text()))
    assert len(named) > 40, "the fault table names its tests as `test_file.py::test_name`"
    missing = sorted(f"{f}::{t}" for f, t in named
                     if not (ROOT / "tests" / f).is_file() or t not in defined_tests(ROOT / "tests" / f))
    assert not missing, f"docs/fault-tolerance.md names tests that do not exist: {missing}"
