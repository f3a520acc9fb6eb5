"""The command line is generated from the stage configs: every key is an option with its comment, type and
default in --help; recipes and options meet in one config; every README command line still parses."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import readme_commands

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Parser, add_options, config_from_args, config_keys, help_text, spelling

REPO = Path(__file__).resolve().parents[1]


def all_commands() -> list[tuple[list[str], cli.Command]]:
    out = []
    for name, command in cli.COMMANDS.items():
        if command.config:
            out.append(([name], command))
        out += [([name, sub], c) for sub, c in command.sub.items()]
    return out


COMMANDS = all_commands()
IDS = [" ".join(path) for path, _ in COMMANDS]


def config_of(command: cli.Command) -> type:
    return getattr(importlib.import_module(f"tinylm.stages.{command.stage}"), command.config)


def squeeze(text: str) -> str:
    return "".join(text.split())  # argparse wraps help lines anywhere, hyphens included


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_help_lists_every_key_with_type_default_and_comment(path, command, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*path, "--help"])
    assert done.value.code == 0
    shown = squeeze(capsys.readouterr().out)
    for key in config_keys(config_of(command)):
        assert key.comment, f"{' '.join(path)}: {key.name} has no comment"
        shown_as = key.name.upper() if key.name in command.positional else f"--{spelling(key.name)}"
        assert shown_as in shown, key.name
        assert squeeze(help_text(key).replace("%%", "%")) in shown, key.name


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_table_entries_point_at_real_stage_functions(path, command) -> None:
    module = importlib.import_module(f"tinylm.stages.{command.stage}")
    assert callable(getattr(module, command.run))
    names = {k.name for k in config_keys(config_of(command))}
    assert set(command.positional) <= names and set(command.aliases.values()) <= names


def test_top_level_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys\nfrom tinylm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'tinylm --help imported torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "pretrain" in done.stdout and "distill" in done.stdout


# ----- the generator on a config of its own --------------------------------------------------------------

@dataclass
class Toy:
    """A flat config like a stage's."""

    source: str  # where from
    out: str  # where to
    max_tokens: int = 128  # new tokens per sample
    temperature: float | None = 0.8  # sampling temperature
    fast: bool = False  # go fast
    dedup: bool = True  # drop duplicates
    corpus: list[str] = field(default_factory=list)  # texts (several words, or repeated)
    order: tuple[str, ...] = ("width", "depth")  # stages in order
    # a comment on the line above
    note: str = ""


def toy(words: list[str], recipe: Path | None = None) -> Toy:
    parser = Parser(prog="toy")
    add_options(parser, Toy, positional=("source",), aliases={"--to": "out"})
    args, extra = parser.parse_known_args(words + (["--config", str(recipe)] if recipe else []))
    return config_from_args(Toy, args, extra)


def test_flat_options_from_the_dataclass() -> None:
    cfg = toy(["src", "--to", "o", "--max-tokens", "7", "--temperature", "none", "--fast", "--no-dedup",
               "--corpus", "a", "b", "--corpus", "c", "--order", "depth,width"])
    assert cfg == Toy("src", "o", 7, None, True, False, ["a", "b", "c"], ("depth", "width"))
    assert toy(["--source", "s", "--out", "o", "--max_tokens", "1e3"]).max_tokens == 1000  # both spellings
    assert toy(["s", "--out", "o"]) == Toy("s", "o")  # defaults are the dataclass's


def test_zero_and_negative_values_are_kept() -> None:
    cfg = toy(["s", "--out", "o", "--max-tokens", "0", "--temperature", "-1"])
    assert (cfg.max_tokens, cfg.temperature) == (0, -1.0)


def test_comments_come_from_the_source() -> None:
    comments = {k.name: k.comment for k in config_keys(Toy)}
    assert comments["max_tokens"] == "new tokens per sample" and comments["note"] == "a comment on the line above"


def test_recipe_then_command_line(tmp_path: Path) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("source: from-yaml\nout: o\nmax_tokens: 5\ncorpus: [x, y]\n")
    assert toy(["--max-tokens", "9"], recipe) == Toy("from-yaml", "o", 9, corpus=["x", "y"])
    assert toy(["cli-src"], recipe).source == "cli-src"


@pytest.mark.parametrize("words, message", [
    (["s", "--out", "o", "--max-tokens", "many"], "max_tokens must be int, got 'many'"),
    (["s", "--out", "o", "--bogus", "1"], "unknown key bogus"),
    (["s"], "out is required"),
    (["s", "--out", "o", "extra"], "unexpected argument 'extra'"),
    (["s", "--out"], "expected one argument"),
])
def test_flat_errors_are_one_line(words: list[str], message: str) -> None:
    with pytest.raises(TinylmError, match=message) as err:
        toy(words)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("words, message", [
    (["grow", "m", "--out", "o", "--method", "stack", "--factor", "two"], "factor must be int or none, got 'two'"),
    (["grow", "m", "--out", "o", "--method", "stack", "--colour", "red"], "unknown key colour"),
    (["grow", "m", "--method", "stack"], "out is required"),
    (["pretrain", "--optim.l", "1"], "unknown key optim.l"),  # no abbreviations
    (["distill", "--distill.teacher_dtype"], "expected one argument"),
    (["nonesuch"], "invalid choice"),
    (["data", "nonesuch"], "invalid choice"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, words: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(words) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tinylm: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and not list(tmp_path.iterdir())


# ----- every README command line still means what it meant ---------------------------------------------

README = readme_commands()


@pytest.mark.parametrize("line", README)
def test_readme_command_lines_parse(line: str, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # recipes/ are relative to the repository; no output path exists there
    parsed = cli.parse(shlex.split(line)[1:])
    assert parsed is not None and dataclasses.is_dataclass(parsed[1])


def test_readme_spellings_reach_their_keys(monkeypatch) -> None:
    monkeypatch.chdir(REPO)

    def cfg(line: str) -> object:
        return cli.parse(shlex.split(line))[1]

    g = cfg('generate smollm2-135m --chat --prompt "What is it?" --greedy --max-tokens 5 --stop x --stop y')
    assert (g.source, g.prompt, g.chat, g.temperature, g.max_tokens, g.stop) == \
        ("smollm2-135m", ["What is it?"], True, 0.0, 5, ["x", "y"])
    p = cfg("prune smollm2-135m --calib tinytales:2000 --trim-vocab 8192 --target-params 45e6 --out smol45m/")
    assert (p.target_params, p.trim_vocab, p.order) == (45_000_000, 8192, ("width", "depth"))
    d = cfg("distill --teacher smollm2-135m --preset 5m --data data/ --out runs/kd5m --distill.teacher_dtype int8")
    assert (d.distill.teacher, d.model.preset, d.data.dir, d.run.out, d.distill.teacher_dtype) == \
        ("smollm2-135m", "5m", "data/", "runs/kd5m", "int8")
    c = cfg("distill cache --teacher smollm2-135m --data data/ --top-k 64 --out teacher-cache/ --overwrite")
    assert (c.cache.top_k, c.cache.out, c.cache.overwrite, c.distill.teacher) == \
        (64, "teacher-cache/", True, "smollm2-135m")
    t = cfg("pretrain --config recipes/tinytales-1m.yaml --resume auto --decay-from ck --run.compile false")
    assert (t.run.resume, t.run.decay_from, t.run.compile) == ("auto", "ck", False)
    i = cfg("init --from smollm2-135m --method inherit --n-layers 8 --out o/")
    assert (i.source, i.method, i.n_layers) == ("smollm2-135m", "inherit", 8)
    s = cfg("tokenizer stats tok/ --corpus a.txt b.txt")
    assert (s.tokenizer, s.corpus) == ("tok/", ["a.txt", "b.txt"])
    prep = cfg("data prepare a.txt b/ --tokenizer tok/ --out data/ --no-dedup")
    assert (prep.inputs, prep.dedup, prep.progress) == (["a.txt", "b/"], False, None)


def test_readme_lists_the_pipeline() -> None:
    verbs = {re.split(r"\s+", line)[1] for line in README}
    assert {"generate", "data", "tokenizer", "pretrain", "prune", "distill", "quantize", "export"} <= verbs


def test_a_closed_pipe_is_no_traceback(tmp_path) -> None:
    # `tinylm --help | head -1`: the reader leaves early; the writer stops quietly (128 + SIGPIPE)
    import subprocess
    import sys

    words = [sys.executable, "-c", "import sys; from tinylm.cli import main; sys.exit(main(['data', 'tinytales', "
             "'--stories', '2000']))"]
    proc = subprocess.Popen(words, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err, err
