"""Every config field has a declared valid range or set, checked by core.recipe with the field's name in a
one-line error; a context longer than a model's is refused; zero and negative values are errors, never
replaced by defaults (issue 12, item 1)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, make_data, tiny_model

from tinylm.cli import COMMANDS, Command, main, parse
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Check, Key, config_keys, is_sectioned, spelling
from tinylm.data import tinytales
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint

# ----- the config classes of every command ------------------------------------------------------------------

def commands(table: dict[str, Command] = COMMANDS, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Command]]:
    """(verb path, command) of every runnable verb, subcommands included."""
    out = []
    for name, command in table.items():
        if command.config:
            out.append(((*path, name), command))
        out += commands(command.sub, (*path, name))
    return out


COMMAND_LIST = commands()


def config_class(command: Command) -> type:
    return getattr(importlib.import_module(f"tinylm.stages.{command.stage}"), command.config)


# Fields where any value of the type is fine, each with the reason why; every other int or float field must
# declare a range (a Check) so that the config system refuses what the code cannot use. The seeds, the obvious
# candidates, are not such fields (numpy refuses a negative seed, torch one from 2**64), so they are `Seed`, in
# [0, 2**63).
ANY_VALUE: dict[str, str] = {
    "route_threshold": "serve's routing threshold is compared with a signal (a log-probability, minus an "
                       "entropy): every finite value is a rule (above 0 it routes everything, far below none)",
}

# Values of required fields, so that a config can be built (and a bad value of another field reached).
REQUIRED = {"format": "hf", "scheme": "int8", "method": "stack", "vocab_size": 300, "keep": 300}


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) not in (list, tuple) else hint


def _keys() -> list[tuple[tuple[str, ...], Command, Key]]:
    return [(path, command, key) for path, command in COMMAND_LIST for key in config_keys(config_class(command))]


def required_words(cls: type, tmp: Path) -> list[str]:
    """Command-line words that give every required key of a flat config a usable value."""
    words = []
    for key in config_keys(cls):
        if key.default is dataclasses.MISSING:
            choices = key.check.choices if key.check is not None else ()
            value = REQUIRED.get(key.name, choices[0] if choices else str(tmp / key.name))
            words += [f"--{spelling(key.name)}", str(value)]
    return words


def test_every_command_has_a_config_and_the_walk_finds_them_all() -> None:
    names = {" ".join(path) for path, _ in COMMAND_LIST}
    assert {"pretrain", "distill", "distill cache", "eval", "generate", "prune", "data prepare", "tokenizer train",
            "quickstart", "export", "quantize", "grow", "init", "info", "trim-vocab"} <= names


@pytest.mark.parametrize("path, command", COMMAND_LIST, ids=[" ".join(p) for p, _ in COMMAND_LIST])
def test_defaults_pass_validate(path: tuple[str, ...], command: Command, tmp_path: Path) -> None:
    cls = config_class(command)
    words = [] if is_sectioned(cls) else required_words(cls, tmp_path)
    parsed = parse([*path, *words])  # load_config validates the result, and every value given
    assert parsed is not None and isinstance(parsed[1], cls)


def test_every_numeric_or_enum_field_declares_a_range() -> None:
    missing = []
    for path, _, key in _keys():
        base = _base(key.hint)
        if base in (int, float) and key.check is None and key.name not in ANY_VALUE:
            missing.append(f"{' '.join(path)} {key.name}")
    assert not missing, f"int/float fields without a declared range (Count, Positive, ...): {missing}"


def test_every_default_has_its_fields_type() -> None:
    """A float default on an int field (dpo.gamma was `Interval = 0.5`) shows in --help as "int ... default
    0.5" and refuses the very values it documents."""
    wrong = []
    for path, _, key in _keys():
        base, default = _base(key.hint), key.default
        if default is dataclasses.MISSING or default is None or base not in (int, float):
            continue
        ok = isinstance(default, int) and not isinstance(default, bool) if base is int else \
            isinstance(default, (int, float)) and not isinstance(default, bool)
        if not ok:
            wrong.append(f"{' '.join(path)} {key.name}: {base.__name__} = {default!r}")
    assert not wrong, wrong


def test_enum_like_fields_are_one_of() -> None:
    # A field whose comment lists its values as `a | b` or `a or b` and that takes no free text is a one_of.
    free = {"device", "teacher_device", "resume", "run.device", "run.resume", "distill.teacher_device",
            "text_field", "split"}
    for path, _, key in _keys():
        if _base(key.hint) is str and " | " in key.comment and key.name not in free:
            assert key.check is not None and key.check.choices, f"{' '.join(path)} {key.name}: {key.comment}"


def bad_value(check: Check, base: type) -> Any:
    """A value just outside a declared range or set."""
    if check.choices:
        return max(check.choices) + 1 if base is int else "nonesuch"
    if check.ge is not None:
        return check.ge - 1
    if check.gt is not None:
        return check.gt
    if check.lt is not None:
        return check.lt
    return check.le + 1


RANGED = [(p, c, k) for p, c, k in _keys() if k.check is not None]


@pytest.mark.parametrize("path, command, key", RANGED, ids=[f"{' '.join(p)} {k.name}" for p, _, k in RANGED])
def test_each_declared_range_is_enforced_through_the_cli(path: tuple[str, ...], command: Command, key: Key,
                                                         tmp_path: Path) -> None:
    cls = config_class(command)
    words = [] if is_sectioned(cls) else required_words(cls, tmp_path)
    value = bad_value(key.check, _base(key.hint))
    with pytest.raises(TinylmError) as e:
        parse([*path, *words, f"--{spelling(key.name)}={value}"])
    shown = key.name if "." in key.name else f"--{spelling(key.name)}"
    assert str(e.value).startswith(f"{shown} must be "), str(e.value)
    assert "\n" not in str(e.value)


FLOATS = [(p, c, k) for p, c, k in _keys() if _base(k.hint) is float]


@pytest.mark.parametrize("path, command, key", FLOATS, ids=[f"{' '.join(p)} {k.name}" for p, _, k in FLOATS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_must_be_finite(path: tuple[str, ...], command: Command, key: Key, value: str,
                                    tmp_path: Path) -> None:
    cls = config_class(command)
    words = [] if is_sectioned(cls) else required_words(cls, tmp_path)
    with pytest.raises(TinylmError, match="must be a finite number"):
        parse([*path, *words, f"--{spelling(key.name)}", value])


# ----- the cases the issue names ----------------------------------------------------------------------------

@pytest.mark.parametrize("words, message", [
    (["pretrain", "--data.micro_batch", "0"], "data.micro_batch must be >= 1, got 0"),
    (["pretrain", "--run.ckpt_every", "-1"], "run.ckpt_every must be >= 0, got -1"),
    (["pretrain", "--optim.grad_clip", "-1"], "optim.grad_clip must be >= 0, got -1.0"),
    (["pretrain", "--optim.lr", "-1e-3"], "optim.lr must be > 0, got -0.001"),  # a value, not an option
    (["pretrain", "--optim.beta1", "1.5"], "optim.beta1 must be in [0, 1), got 1.5"),
    (["pretrain", "--run.log_every", "0"], "run.log_every must be >= 1, got 0"),
    (["pretrain", "--schedule.warmup_steps", "0"], "schedule.warmup_steps must be >= 1, got 0"),
    (["eval", "m", "--data", "d", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["eval", "m", "--data", "d", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "m", "--data", "d", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["generate", "m", "--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["generate", "m", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["generate", "m", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["generate", "m", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "m", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["prune", "m", "--calib", "c", "--out", "o", "--layer-metric", "magic"],
     "--layer-metric must be one of bi, loss, got 'magic'"),
    (["distill", "--distill.losses", "[{kind: fkl, weight: -1}]"], "distill.losses[0]: weight must be >= 0"),
    (["distill", "--distill.losses", "[{kind: fkl, weight: .nan}]"], "distill.losses[0]: weight must be a finite"),
    (["distill", "--distill.losses", "[{kind: fkl, temperature: 0}]"], "distill.losses[0]: temperature"),
    (["distill", "--distill.losses", "[{kind: magic}]"], "distill.losses[0]: kind must be one of"),
    (["distill", "cache", "--cache.temperature", "0"], "cache.temperature must be > 0, got 0.0"),
    (["quantize", "m", "--out", "o", "--scheme", "int8", "--group-size", "-1"], "--group-size must be >= 0"),
])
def test_issue_cases_are_one_line_errors(words: list[str], message: str) -> None:
    with pytest.raises(TinylmError) as e:
        parse(words)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("recipe, message", [
    ("optim:\n  lr: .nan\n", "optim.lr must be a finite number, got nan"),
    ("optim:\n  lr: -1e-3\n", "optim.lr must be > 0, got -0.001"),
    ("optim:\n  beta1: 1.5\n", "optim.beta1 must be in [0, 1), got 1.5"),
    ("data:\n  micro_batch: 0\n", "data.micro_batch must be >= 1, got 0"),
    ("run:\n  ckpt_every: -1\n", "run.ckpt_every must be >= 0, got -1"),
    ("schedule:\n  kind: linear\n", "schedule.kind must be one of wsd, cosine, constant, got 'linear'"),
])
def test_recipe_values_are_checked(tmp_path: Path, recipe: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    with pytest.raises(TinylmError) as e:
        parse(["pretrain", "--config", str(path)])
    assert str(e.value) == message


def test_a_range_is_checked_before_post_init_sees_the_value(tmp_path: Path) -> None:
    # QuantizeConfig derives group_size from scheme in __post_init__: an unknown scheme must be the range
    # error, not a KeyError there; the same holds for a config built in Python.
    from tinylm.stages.quantize import QuantizeConfig

    with pytest.raises(TinylmError, match="--scheme must be one of int8, int4"):
        QuantizeConfig(source="m", scheme="int3", out=str(tmp_path / "q"))


def test_cross_field_checks_keep_their_dotted_names(data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["pretrain", *train_words(data, tmp_path / "o", 32),
                                   "--schedule.decay_shape", "exponential", "--schedule.min_lr_ratio", "0"])
    assert "schedule.min_lr_ratio must be > 0 for schedule.decay_shape exponential" in line
    assert not (tmp_path / "o").exists()


def test_sampling_config_refuses_non_finite_values() -> None:
    from tinylm.infer.sampling import SamplingConfig

    for kwargs in ({"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan},
                   {"repetition_penalty": math.inf}):
        with pytest.raises(TinylmError, match="finite"):
            SamplingConfig(**kwargs)


# ----- through the real command -----------------------------------------------------------------------------

@pytest.mark.parametrize("words, field", [
    (["generate", "nowhere", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["eval", "nowhere", "--data", "nowhere", "--seq-len", "0", "--batch-size", "0", "--max-tokens", "0"],
     "--seq-len"),  # the first bad value typed
    (["pretrain", "--optim.grad_clip", "-1", "--out", "{tmp}/run"], "optim.grad_clip"),
])
def test_subprocess_one_line_exit_2(tmp_path: Path, words: list[str], field: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tinylm", *[w.format(tmp=tmp_path) for w in words]],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tinylm: error: {field} must be "), lines
    assert not list(tmp_path.iterdir())  # nothing written


# ----- contexts longer than the model's -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose context is 64 tokens (max_position_embeddings)."""
    path = tmp_path_factory.mktemp("short") / "m"
    checkpoint.save(tiny_model(), path)  # tiny_config: max_seq_len 64, vocabulary 97
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "d", n_train=4000, n_val=1000)


def one_line_error(capsys: pytest.CaptureFixture, words: list[str], stdout: str = "") -> str:
    """Run a command in this process; it must fail with exactly one stderr line (returned) and exit 2."""
    capsys.readouterr()
    code = main(words)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tinylm: error: "), err
    assert captured.out == stdout
    return err[0]


def test_eval_refuses_a_longer_context(short_model: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["eval", str(short_model), "--data", str(data), "--seq-len", "128"])
    assert "--seq-len 128 is longer than" in line and "max_position_embeddings 64" in line
    assert main(["eval", str(short_model), "--data", str(data), "--seq-len", "64", "--max-tokens", "128"]) == 0


def test_eval_max_tokens_below_one_window_is_refused(short_model: Path, data: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["eval", str(short_model), "--data", str(data), "--seq-len", "32",
                                   "--max-tokens", "10"])
    assert "max_tokens 10 is less than one window of seq_len 32" in line


def test_prune_refuses_a_longer_context(short_model: Path, data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["prune", str(short_model), "--calib", str(data), "--out", str(tmp_path / "o"),
                                   "--dim", "24", "--seq-len", "128"])
    assert "--seq-len 128 is longer than" in line and "64" in line
    assert not (tmp_path / "o").exists()


def train_words(data: Path, out: Path, seq_len: int, **extra: object) -> list[str]:
    args = {"data.dir": data, "data.seq_len": seq_len, "data.batch_tokens": 2 * seq_len, "data.micro_batch": 2,
            "schedule.steps": 1, "schedule.warmup_steps": 1, "run.out": out, "run.eval_every": 0,
            "run.ckpt_every": 0, "run.compile": False, "run.progress": False, "run.plot": False,
            "run.device": "cpu", "run.peak_flops": 1e11, **extra}
    return [w for k, v in args.items() for w in (f"--{k}", str(v))]


def test_pretrain_init_refuses_a_longer_context_unless_extended(short_model: Path, data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["pretrain", *train_words(data, tmp_path / "o", 128,
                                                            **{"model.init": short_model})])
    assert "data.seq_len 128 is longer than the context of model.init" in line
    assert "max_position_embeddings 64" in line and "model.extend_context" in line
    assert not (tmp_path / "o").exists()
    assert main(["pretrain", *train_words(data, tmp_path / "x", 128, **{"model.init": short_model,
                                                                        "model.extend_context": "true"})]) == 0
    saved = json.loads((tmp_path / "x" / "final" / "config.json").read_text())
    assert saved["max_position_embeddings"] == 128  # the context it was trained on, not the old 64
    assert checkpoint.load(tmp_path / "x" / "final").config.max_seq_len == 128


def test_pretrain_explicit_max_seq_len_below_seq_len_is_refused(data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(capsys, ["pretrain", *train_words(data, tmp_path / "o", 128,
                                                            **{"model.max_seq_len": 64})])
    assert "data.seq_len 128 is longer than model.max_seq_len 64" in line


def test_distill_refuses_a_teacher_or_student_with_a_shorter_context(short_model: Path, data: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    long_model = tmp_path / "long"
    checkpoint.save(tiny_model(vocab_size=64, max_seq_len=256), long_model)  # the data's vocabulary
    words = train_words(data, tmp_path / "o", 128)
    line = one_line_error(capsys, ["distill", *words, "--distill.teacher", str(short_model)])
    assert "data.seq_len 128 is longer than the context of the teacher" in line and "64" in line
    line = one_line_error(capsys, ["distill", *words, "--distill.teacher", str(long_model),
                                   "--model.init", str(short_model)])
    assert "data.seq_len 128 is longer than the context of model.init" in line
    assert not (tmp_path / "o").exists()


# ----- generate --chat ----------------------------------------------------------------------------------------

def test_chat_without_a_chat_template_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = train_tokenizer(list(tinytales.generate(20, seed=5)), vocab_size=300)
    tok.chat_template = None  # a base model's tokenizer
    torch.manual_seed(0)
    checkpoint.save(tiny_model(vocab_size=tok.vocab_size), tmp_path / "m", tok)
    line = one_line_error(capsys, ["generate", str(tmp_path / "m"), "--prompt", "Once", "--chat",
                                   "--max-tokens", "2"])
    assert "--chat" in line and "no chat template" in line  # and nothing on stdout (one_line_error)
