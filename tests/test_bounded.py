"""Bounded work (issue 12, items 4-5): JSON-schema compilation within size and time limits and Ctrl-C,
odd schemas as one line, constrained samples that are valid JSON or one line about the token budget,
devices this machine lacks, and missing optional packages naming their extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_model

from tinylm.cli import main
from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer import constrained
from tinylm.infer.constrained import JsonIndex, regex_states, schema_regex

pytest.importorskip("outlines_core")
jsonschema = pytest.importorskip("jsonschema")

CORPUS = ['{"name": "Tom", "age": 3, "tags": ["a", "b"], "ok": true}', "the cat sat on the mat"] * 30
OBJECT = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
HUNG = {"type": "string", "minLength": 100000}  # the issue's schema: minutes at full CPU, past 1.4 GB


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("bounded") / "m"
    checkpoint.save(tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_seq_len=128), path, tok)
    return path


def one_line(capsys, code: int, *words: str) -> str:
    """The single stderr line of a command that failed as a user error (exit 2), checked for `words`."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tinylm: error: "), captured.err
    assert "Traceback" not in captured.err and all(w in err[0] for w in words), err[0]
    return captured.out


def schema_file(tmp_path: Path, schema) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    return str(path)


def cli(*words: str, timeout: float = 60, **popen) -> subprocess.CompletedProcess:
    """`tinylm WORDS` in a fresh interpreter (the worktree on PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tinylm", *words], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False, **popen)


# ----- schema size and time limits --------------------------------------------------------------------------

def test_the_schema_that_hung_ends_within_seconds_with_one_line(tmp_path, ckpt):
    # The acceptance: within 5 s; a fresh interpreter under a loaded CI host gets 20 s (it takes ~0.3 s
    # after the imports; the issue measured minutes).
    start = time.monotonic()
    r = cli("generate", str(ckpt), "--prompt", "hi", "--json-schema", schema_file(tmp_path, HUNG))
    elapsed = time.monotonic() - start
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "over the limit of" in err[0] and "minLength" in err[0], r.stderr
    assert r.stdout == "" and elapsed < 20, elapsed


def test_the_hung_schema_is_refused_before_the_model_loads(tmp_path, capsys):
    start = time.monotonic()
    code = main(["generate", "no-such-model", "--prompt", "hi", "--json-schema", schema_file(tmp_path, HUNG)])
    one_line(capsys, code, "1,000,012 states", "limit of 50,000")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 40},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 30},
    {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 5},
    OBJECT,
])
def test_state_estimate_bounds_the_automaton(tok, schema):
    # The estimate is what the limits are checked on: it must not undercount the states actually built.
    index = JsonIndex(schema, tok, tok.vocab_size)
    assert regex_states(schema_regex(schema)) >= 0.5 * len(index.edges)


def test_long_repetitions_no_longer_blow_up(tok):
    # outlines-core's unanchored DFA was exponential in a string's length: minLength 20 took minutes.
    start = time.monotonic()
    index = JsonIndex({"type": "string", "minLength": 25}, tok, tok.vocab_size)
    assert time.monotonic() - start < 5 and index.min_tokens >= 3


def test_states_times_vocabulary_is_limited(tok, monkeypatch):
    monkeypatch.setattr(constrained, "MAX_STEPS", 10_000)
    with pytest.raises(TinylmError, match=r"tokens = .* steps to compile, over the limit of 10,000"):
        JsonIndex({"type": "string", "maxLength": 40}, tok, tok.vocab_size)


def test_compilation_has_a_wall_clock_limit(tok):
    start = time.monotonic()
    with pytest.raises(TinylmError, match="longer than its limit of 0.001 seconds"):
        JsonIndex({"type": "string", "maxLength": 300}, tok, tok.vocab_size, seconds=0.001)
    assert time.monotonic() - start < 2


@pytest.mark.slow
@pytest.mark.parametrize("to_thread", [False, True], ids=["to-the-process", "to-the-build-thread"])
def test_ctrl_c_during_compilation_ends_promptly(tmp_path, ckpt, to_thread):
    # A compilation slow enough to interrupt: the size limits lifted, a 20,000-character string. The kernel
    # hands a process-directed SIGINT to any of its threads; `to_thread` sends it to the build thread itself
    # (as the kernel may), where Python's handler only flags it for the main thread.
    marker = tmp_path / "compiling"
    code = (f"import sys, pathlib, threading, signal, time; import tinylm.infer.constrained as c\n"
            f"c.MAX_STATES = c.MAX_STEPS = 10**12\n"
            f"build = c.JsonIndex._build\n"
            f"def marked(*a): pathlib.Path({str(marker)!r}).touch(); return build(*a)\n"
            f"c.JsonIndex._build = marked\n"
            f"def to_build_thread():\n"
            f"    while not pathlib.Path({str(marker)!r}).with_suffix('.go').exists(): time.sleep(0.01)\n"
            f"    t = next(t for t in threading.enumerate() if t.name == 'tinylm-json-index')\n"
            f"    signal.pthread_kill(t.ident, signal.SIGINT)\n"
            f"if {to_thread}: threading.Thread(target=to_build_thread, daemon=True).start()\n"
            f"from tinylm.cli import main; sys.exit(main(sys.argv[1:]))")
    schema = schema_file(tmp_path, {"type": "string", "maxLength": 20000})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, "generate", str(ckpt), "--prompt", "hi", "--json-schema",
                             schema], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    if to_thread:
        marker.with_suffix(".go").touch()
    else:
        proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()  # not left running (and taking a core) when the assertion fails
    assert time.monotonic() - start < 5 and proc.returncode == 130, err
    assert err.strip().splitlines() == ["tinylm: interrupted"] and out == ""


# ----- odd schemas --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "(?<=a)b"}, "look-behind"),
    ({"type": "string", "pattern": "a(?!b)"}, "look-ahead"),
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "string", "pattern": "("}, "not a valid JSON schema"),
    ({"type": "string", "pattern": 5}, "not a valid JSON schema"),
    ({"$ref": "#"}, "not supported"),
    ({"$ref": "#/nowhere"}, "not supported"),
    ({"not": {}}, "not supported"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "allOf with 2 schemas at / is not supported"),
    (False, "not supported"),
    ({"enum": []}, "admits no value"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum 5 > maximum 1"),
    ({"properties": {"s": {"type": "string", "minLength": 5, "maxLength": 2}}}, "at /properties/s"),
    ({"enum": [f"word{i}" for i in range(20000)]}, "over the limit of"),
    ({"type": "array", "items": {"type": "string", "maxLength": 1000}, "maxItems": 1000}, "over the limit of"),
])
def test_odd_schemas_are_one_line_before_the_model_loads(tmp_path, capsys, schema, words):
    code = main(["generate", "no-such-model", "--prompt", "hi", "--json-schema", schema_file(tmp_path, schema)])
    one_line(capsys, code, words)


def test_unenforced_keywords_fail_as_one_line_and_print_nothing(tmp_path, capsys, ckpt):
    # outlines-core compiles this without the keyword that makes it unsatisfiable: the sample is checked
    # before it is printed.
    schema = {"type": "array", "items": {"enum": [1]}, "minItems": 2, "uniqueItems": True}
    code = main(["generate", str(ckpt), "--prompt", "hi", "--json-schema", schema_file(tmp_path, schema),
                 "--max-tokens", "20", "--seed", "0"])
    assert one_line(capsys, code, "not valid for the schema") == ""


def test_recursive_ref_decodes_valid_json(tmp_path, capsys, ckpt):
    schema = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    code = main(["generate", str(ckpt), "--prompt", "hi", "--json-schema", schema_file(tmp_path, schema),
                 "--max-tokens", "40", "--seed", "3"])
    assert code == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)


# ----- the token budget ---------------------------------------------------------------------------------------

def test_a_budget_below_the_shortest_value_is_one_line(tmp_path, capsys, ckpt, tok):
    need = JsonIndex(OBJECT, tok, tok.vocab_size).min_tokens
    code = main(["generate", str(ckpt), "--prompt", "hi", "--json-schema", schema_file(tmp_path, OBJECT),
                 "--max-tokens", str(need - 1)])
    assert one_line(capsys, code, f"--max-tokens {need - 1} is too small", f"takes {need} tokens") == ""


@pytest.mark.parametrize("seed", range(4))
def test_the_smallest_budget_still_prints_valid_json(tmp_path, capsys, ckpt, tok, seed):
    need = JsonIndex(OBJECT, tok, tok.vocab_size).min_tokens
    code = main(["generate", str(ckpt), "--prompt", "hi", "--json-schema", schema_file(tmp_path, OBJECT),
                 "--max-tokens", str(need), "--seed", str(seed), "--n", "3", "--temperature", "1.5"])
    assert code == 0
    samples = capsys.readouterr().out.split("\n---\n")
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each followed by the separator
    for text in samples[:3]:
        jsonschema.validate(json.loads(text), OBJECT)


def test_stop_strings_cannot_cut_a_constrained_sample(tmp_path, capsys):
    code = main(["generate", "no-such-model", "--prompt", "hi", "--json-schema", schema_file(tmp_path, OBJECT),
                 "--stop", "}"])
    one_line(capsys, code, "--stop cannot be combined with --json-schema")


# ----- devices --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("tpu", "not a device: 'tpu'"), ("cuda:x", "not a device"), ("", "not a device"), ("meta", "not a device"),
    ("cuda", "no CUDA device"), ("cuda:0", "no CUDA device"), ("mps", "no MPS"),
])
def test_devices_this_machine_lacks_are_one_line(monkeypatch, name, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(TinylmError, match=words):
        resolve_device(name)


def test_a_gpu_index_beyond_the_gpus_present_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TinylmError, match=r"cuda:7 asked for but this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "mps"])
def test_eval_on_a_missing_device_is_one_line(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n")
    code = main(["eval", "no-such-model", "--data", str(tmp_path / "text.txt"), "--device", device])
    one_line(capsys, code, device)


# ----- missing optional packages ----------------------------------------------------------------------------

def test_a_missing_json_package_in_a_fresh_process_is_one_line(tmp_path):
    # jsonschema is made unimportable before tinylm starts, as on a machine without the extra.
    blocked = "jsonschema"
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from tinylm.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, "generate", "no-such-model", "--prompt", "hi", "--json-schema",
                        schema_file(tmp_path, OBJECT)], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert f"--json-schema needs {blocked}" in err[0] and "pip install 'tinylm[json]'" in err[0]


def test_a_missing_outlines_core_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "outlines_core", None)
    monkeypatch.setitem(sys.modules, "outlines_core.json_schema", None)
    code = main(["generate", "no-such-model", "--prompt", "hi", "--json-schema", schema_file(tmp_path, OBJECT)])
    one_line(capsys, code, "--json-schema needs outlines_core", "pip install 'tinylm[json]'")


@pytest.mark.parametrize("blocked", ["onnx", "onnxscript"])
def test_onnx_export_without_onnx_is_one_line(tmp_path, capsys, monkeypatch, ckpt, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # importing it raises ImportError
    code = main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    one_line(capsys, code, f"export --format onnx needs {blocked}", "pip install 'tinylm[onnx]'")
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_without_tensorboard_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    code = main(["pretrain", "--run.tensorboard", "true", "--run.out", str(tmp_path / "run"), "--run.device", "cpu"])
    one_line(capsys, code, "run.tensorboard needs tensorboard", "pip install 'tinylm[tensorboard]'")
    assert not (tmp_path / "run").exists()


def test_parquet_without_pyarrow_is_one_line(tmp_path, capsys, monkeypatch, ckpt):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    code = main(["data", "prepare", str(tmp_path / "docs.parquet"), "--tokenizer", str(ckpt),
                 "--out", str(tmp_path / "data")])
    one_line(capsys, code, "needs pyarrow", "pip install 'tinylm[data]'")
    assert not (tmp_path / "data").exists()
