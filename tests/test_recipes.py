"""Every recipe in recipes/ parses into its stage's config; bad keys and types fail with one line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.model.config import PRESETS
from tinylm.train.config import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# recipe file prefix -> (module, config class); anything else is a pretraining recipe
STAGES = {"distill-": ("tinylm.stages.distill", "DistillConfig"),
          "scaling-": ("tinylm.stages.scaling", "ScalingConfig")}


def config_class(recipe: Path) -> type:
    for prefix, (module, name) in STAGES.items():
        if recipe.name.startswith(prefix):
            return getattr(importlib.import_module(module), name)
    return TrainConfig


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_parses(recipe: Path) -> None:
    cfg = load_config(config_class(recipe), recipe)
    raw = yaml.safe_load(recipe.read_text())
    for section, body in raw.items():  # every value in the file reached the config
        for key, value in body.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, str) and got == float(value)), f"{section}.{key}"
    if isinstance(cfg, TrainConfig):
        assert cfg.model.init or cfg.model.preset in PRESETS
        assert (cfg.schedule.steps is None) != (cfg.schedule.tokens is None)
        assert cfg.data.batch_tokens % cfg.data.seq_len == 0


def test_pretraining_recipes_exist() -> None:
    names = {r.name for r in RECIPES}
    assert {"tinytales-1m.yaml", "tinytales-15m.yaml", "quickstart.yaml", "smollm2-135m-continue.yaml"} <= names


def test_command_line_wins_over_yaml() -> None:
    recipe = next(r for r in RECIPES if r.name == "tinytales-1m.yaml")
    cfg = load_config(TrainConfig, recipe, ["--data.seq_len", "64", "--optim.lr=1e-3", "--run.compile", "false",
                                            "--schedule.steps", "1e3", "--schedule.tokens", "none"])
    assert (cfg.data.seq_len, cfg.optim.lr, cfg.run.compile, cfg.schedule.steps) == (64, 1e-3, False, 1000)
    assert cfg.schedule.tokens is None and cfg.model.preset == "1m"


@pytest.mark.parametrize("words, message", [
    (["--model.bogus", "1"], "unknown key model.bogus"),
    (["--optim.lr", "fast"], "optim.lr must be float, got 'fast'"),
    (["--data.seq_len", "2.5"], "data.seq_len must be int"),
    (["--run.compile", "maybe"], "run.compile must be bool or none"),
    (["--nosection", "1"], "unknown option --nosection"),
    (["--zzz.key", "1"], "unknown option --zzz.key"),
])
def test_bad_override_is_one_line(words: list[str], message: str) -> None:
    with pytest.raises(TinylmError, match=message) as err:
        load_config(TrainConfig, None, words)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("data:\n  seq_len: abc\n", "data.seq_len must be int, got 'abc'"),
    ("data:\n  seq_len: '128'\n", "data.seq_len must be int"),
    ("optim:\n  betas: [0.9, 0.95]\n", "unknown key optim.betas"),
    ("training:\n  steps: 3\n", "unknown section 'training'"),
    ("run:\n  plot: 3\n", "run.plot must be bool"),
    ("- just a list\n", "a recipe is a mapping"),
    ("model: [1, 2\n", "not valid YAML"),
])
def test_bad_yaml_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(TinylmError, match=message) as err:
        load_config(TrainConfig, recipe)
    assert "\n" not in str(err.value)


def test_cli_reports_bad_key_in_one_line(capsys: pytest.CaptureFixture) -> None:
    recipe = next(r for r in RECIPES if r.name == "tinytales-1m.yaml")
    assert cli.main(["pretrain", "--config", str(recipe), "--optim.lrr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinylm: error: unknown key optim.lrr") and "\n" not in err
