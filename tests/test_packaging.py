"""The built wheel, installed outside the repository: it holds every file of the package (the recipes are
package data), and `tinylm quickstart` finds its recipe in the installed package, where it parses into
the same config as the repository's copy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from tinylm.core.recipe import load_config
from tinylm.train.config import TrainConfig

PROBE = """
import dataclasses, json
from pathlib import Path
import tinylm
from tinylm.core.recipe import load_config
from tinylm.stages.quickstart import RECIPE
from tinylm.train.config import TrainConfig

recipe = Path(str(RECIPE))
config = dataclasses.asdict(load_config(TrainConfig, recipe))
print(json.dumps({"package": tinylm.__file__, "recipe": str(recipe), "config": config}))
"""


def _package_files(root: Path) -> set[str]:
    """Paths of the package's files below root/tinylm, compiled Python left out."""
    return {p.relative_to(root).as_posix() for p in (root / "tinylm").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources (so that building leaves no build/ or egg-info in the
    checkout), installed with --target into a folder it returns."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    shutil.copytree(REPO / "tinylm", src / "tinylm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "setup.py", "_tinylm_lm_eval.py", "tinylm-lm-eval.pth"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run = dict(capture_output=True, text=True, cwd=tmp_path)
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(src)], **run)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "dist").glob("tinylm-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               **run)
    assert installed.returncode == 0, installed.stderr
    return site


@pytest.mark.slow
def test_installed_wheel_has_every_file_and_finds_the_quickstart_recipe(installed: Path, tmp_path: Path) -> None:
    site = installed
    run = dict(capture_output=True, text=True, cwd=tmp_path)
    assert _package_files(site) == _package_files(REPO)
    assert (site / "bin" / "tinylm").is_file()  # the console script

    # The installed copy first on the path; the dependencies come from this environment's site-packages.
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, **run)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(site), found["package"]
    assert Path(found["recipe"]) == site / "tinylm" / "recipes" / "quickstart.yaml"
    want = dataclasses.asdict(load_config(TrainConfig, REPO / "tinylm" / "recipes" / "quickstart.yaml"))
    assert found["config"] == json.loads(json.dumps(want))


LM_EVAL_PROBE = """
import site, sys
site.addsitedir(sys.argv[1])  # what the interpreter does for site-packages: runs tinylm-lm-eval.pth
assert "tinylm" not in sys.modules and "torch" not in sys.modules  # the hook imports neither
from lm_eval.api.registry import get_model
print(get_model("tinylm").__module__)
"""


@pytest.mark.slow
def test_installed_wheel_registers_the_lm_eval_backend(installed: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    entry_points = next(installed.glob("tinylm-*.dist-info")) / "entry_points.txt"
    assert "[lm_eval.models]\ntinylm = tinylm.evals.harness:TinylmLM" in entry_points.read_text()
    probe = subprocess.run([sys.executable, "-c", LM_EVAL_PROBE, str(installed)], capture_output=True, text=True,
                           cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["tinylm.evals.harness"]
