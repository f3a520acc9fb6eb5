"""STYLE.md rule 14 for the test suite itself, kept true by parsing the tests: a test module imports no
other test module and not conftest.py (shared helpers live in helpers.py); random generators are seeded;
no test skips because a tinylm module fails to import (that skip would hide the failure it should report).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in the tree, lazy ones inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):  # `from . import x`: tests/ is not a package
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def problems(tests: Path) -> list[str]:
    """Every breach of the rules in the .py files of `tests`, one line each."""
    files = sorted(tests.glob("*.py"))
    test_modules = {p.stem for p in files if p.stem.startswith("test_")}
    out = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for line, module in _imported(tree):
            top = module.split(".")[0]
            if top in test_modules or top in ("tests", "conftest") or module.startswith("."):
                out.append(f"{path.name}:{line} imports {module}; shared helpers go in helpers.py")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name in ("default_rng", "Random") and not node.args and not node.keywords:
                out.append(f"{path.name}:{node.lineno} {name}() is unseeded; use the rng fixture or a seed")
            first = node.args[0] if node.args else None
            if (name == "importorskip" and isinstance(first, ast.Constant) and isinstance(first.value, str)
                    and first.value.split(".")[0] == "tinylm"):
                out.append(f"{path.name}:{node.lineno} skips when {first.value} fails to import; import it")
    return out


def test_the_tests_keep_rule_14() -> None:
    found = problems(TESTS)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("bad", [
    "from test_train import make_data",
    "import test_train",
    "def f():\n    from test_train import make_data",  # lazy imports count too
    "from tests.test_train import make_data",
    "from conftest import tiny_model",
    "from tests.conftest import tiny_model",
    "rng = np.random.default_rng()",
    "rng = random.Random()",
    "cp = pytest.importorskip('tinylm.formats.checkpoint')",
])
def test_a_breach_is_caught(tmp_path: Path, bad: str) -> None:
    (tmp_path / "test_train.py").write_text("")
    (tmp_path / "helpers.py").write_text("from tinylm.core.errors import TinylmError\n")
    (tmp_path / "test_b.py").write_text(textwrap.dedent(bad) + "\n")
    found = problems(tmp_path)
    assert len(found) == 1 and found[0].startswith("test_b.py:"), found


def test_allowed_imports_and_seeded_generators_pass(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(textwrap.dedent("""\
        from helpers import make_data
        import numpy as np, random, pytest
        rng, r = np.random.default_rng(0), random.Random(seed)
        ort = pytest.importorskip("onnxruntime")
        """))
    assert problems(tmp_path) == []
