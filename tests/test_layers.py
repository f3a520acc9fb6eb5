"""ARCHITECTURE.md's layers, kept true by parsing imports.

Every module of the package (walked recursively) belongs to exactly one group of LAYERS; a module may
import only from groups to its left, so two modules of one group never import each other. The packages
follow the pipeline (core -> model -> data's tokenizer -> formats -> data -> infer -> train -> evals ->
stages -> cli); inside a package, the modules others build on come first (model.config before
model.llama, data.sources before data.prepare), so the order inside a package is checked as strictly
as the order between packages. There are no exceptions: a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinylm"

LAYERS: list[tuple[str, ...]] = [
    ("core", "model", "formats", "data", "infer", "train", "evals", "serve", "stages"),  # empty package faces
    ("core.errors",),
    ("core.fs", "core.recipe", "core.devices"),
    ("model.config",),
    ("model.kvcache", "model.qlinear"),
    ("model.fused",),
    ("model.llama",),
    ("model.surgery",),
    ("model.growth",),
    ("model.lora",),
    ("data.tinytales.words", "data.tinytales.plots"),
    # the tokenizer comes before formats: every model source carries one (a GGUF file holds its vocabulary)
    ("data.tinytales", "data.tokenizer"),
    ("formats.gguf", "formats.onnx", "formats.peft"),
    ("formats.checkpoint",),
    ("data.sources", "data.dedup", "data.tokens"),
    ("data.prepare", "data.chat"),
    ("data.vocab",),
    ("data.tasks.split",),
    ("data.tasks.tinytales_instruct", "data.tasks.function_calling"),
    ("data.tasks",),
    ("data.synth",),
    ("infer.sampling", "infer.constrained", "infer.decode"),
    ("infer.speculative",),
    ("infer.generate",),
    ("infer.engine",),
    ("infer.teacher",),
    ("train.config",),
    ("train.schedule", "train.optim", "train.metrics", "train.losses",
     "train.preference", "train.rules", "train.grpo"),
    ("train.budget",),
    ("train.state", "train.finetune"),
    ("train.loop",),
    ("evals.perplexity", "evals.tinytales", "evals.tasks", "evals.loglik", "evals.scaling", "evals.rewards",
     "evals.judge"),
    ("evals.benchmarks", "evals.harness"),
    ("serve.protocol", "serve.metrics", "serve.routing", "serve.client"),
    ("serve.worker", "serve.prepare"),
    ("serve.app",),
    ("serve.router",),
    ("stages.*",),
    ("cli",),
    ("__main__", ""),  # "" is the package's face, tinylm/__init__.py
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str, layers: list[tuple[str, ...]]) -> int:
    """The index of the group naming `name` (a `pkg.*` entry covers every module of pkg)."""
    for i, group in enumerate(layers):
        for entry in group:
            if entry == name or (entry.endswith(".*") and name.startswith(entry[:-1])):
                return i
    return -1


def imports(path: Path, me: str, root: Path) -> set[str]:
    """Modules of the package that `path` imports, as dotted names below `tinylm`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinylm":
            base = node.module.partition(".")[2]
            for alias in node.names:  # `from tinylm.formats import checkpoint` imports a module
                found.add(f"{base}.{alias.name}".strip(".") if _is_module(f"{base}.{alias.name}", root) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("tinylm.")}
    return {f for f in found if f != me}


def _is_module(dotted: str, root: Path) -> bool:
    path = root.joinpath(*dotted.strip(".").split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(root: Path, layers: list[tuple[str, ...]]) -> list[str]:
    """Every import that does not point left, and every module that is in no group."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer_of(me, layers)
        if mine < 0:
            problems.append(f"tinylm.{me} is in no layer; add it to LAYERS")
            continue
        for dep in sorted(imports(path, me, root)):
            if me.startswith(dep + ".") or dep == "":  # a module's own package face, or __version__
                continue
            theirs = layer_of(dep, layers)
            if theirs < 0 or theirs >= mine:
                problems.append(f"tinylm.{me} imports tinylm.{dep}, which is not to its left")
    return problems


def test_every_import_points_left() -> None:
    assert not violations(PACKAGE, LAYERS), "\n".join(violations(PACKAGE, LAYERS))


@pytest.mark.parametrize("bad", [
    "from tinylm.train.loop import fit",  # model -> train: to the right
    "from tinylm.model import surgery",  # a module of the same package to its right, as a module import
    "def f():\n    from tinylm.stages.prune import prune",  # lazy imports count too
])
def test_a_bad_import_is_caught(tmp_path: Path, bad: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "llama.py").write_text(textwrap.dedent(bad) + "\n")
    (tmp_path / "model" / "surgery.py").write_text("")
    found = violations(tmp_path, [("model.llama",), ("model.surgery",), ("model",)])
    assert len(found) == 1 and "tinylm.model.llama imports" in found[0], found


def test_a_module_in_no_layer_is_caught(tmp_path: Path) -> None:
    (tmp_path / "extra.py").write_text("")
    assert violations(tmp_path, [("core.errors",)]) == ["tinylm.extra is in no layer; add it to LAYERS"]
