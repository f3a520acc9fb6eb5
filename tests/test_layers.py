"""ARCHITECTURE.md's layers, kept true by parsing imports: a module imports only from layers to its left,
and stage modules of one layer do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinylm"

# ARCHITECTURE.md: config, model, tokenizer -> checkpoint, data, generate, tinytales -> train, evaluate
# -> distill, prune, grow, quantize, export, ... -> cli. config is the base every module may import.
LAYERS = [
    {"config"},
    {"model", "tokenizer", "qlinear"},
    {"checkpoint", "data", "generate", "tinytales"},
    {"train", "evaluate", "surgery"},
    {"distill", "prune", "grow", "quantize", "export", "finetune", "serve", "quickstart", "jsonschema_fsm"},
    {"cli", "__main__", "__init__"},
]
BASE = {"config"}
# Documented exceptions, each one-directional and lazy (imported inside the function that needs it):
ALLOWED: set[tuple[str, str]] = {
    # `data prepare` reads `tinytales:<n>` as an input source; tinytales imports nothing but config.
    ("data", "tinytales"),
    # `data prepare --tokenizer` takes any model source (.gguf, alias); resolving sources is checkpoint's job.
    ("data", "checkpoint"),
    # `tinylm eval` and training's validation are one computation (train.eval_nats), not two that drift.
    ("evaluate", "train"),
}


def _layer_of(name: str) -> int:
    owner = name.lstrip("_").split("_")[0] if name.startswith("_") else name  # _tinytales_words -> tinytales
    for i, layer in enumerate(LAYERS):
        if owner in layer or name in layer:
            return i
    raise AssertionError(f"tinylm/{name}.py is in no layer of ARCHITECTURE.md; add it to LAYERS")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinylm"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tinylm.")}
    return found


def _owner(name: str) -> str:
    return name.lstrip("_").split("_")[0] if name.startswith("_") else name


def test_every_import_points_left():
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        me = path.stem
        for dep in _imports(path) - {"__version__"}:
            if (me, dep) in ALLOWED or dep in BASE or _owner(dep) == _owner(me):
                continue
            if _layer_of(dep) >= _layer_of(me) and me not in {"__init__", "__main__"}:
                problems.append(f"{me} imports {dep}")
    assert not problems, "layer violations: " + "; ".join(problems)
