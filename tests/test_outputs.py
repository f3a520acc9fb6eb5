"""Output paths and interrupted commands: a wrong path is one line and exit 2 before any work, nothing a user
made is replaced without --overwrite, a signal cleans up, and kill -9 never leaves a partial output under its
final name (the next run into the same place succeeds and leaves no temporary)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, make_data, tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir, atomic_file, check_out, remove_stale
from tinylm.data.tinytales import generate
from tinylm.data.tokenizer import train_tokenizer
from tinylm.data.tokens import TokenData
from tinylm.formats import checkpoint
from tinylm.stages import quickstart

INPUTS = ("corpus.txt", "tok", "model", "data97", "teacher", "data64")
DEAD_PID = 4_999_999  # above Linux's PID_MAX_LIMIT (2**22): never a live process
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus and a tokenizer for `data prepare`, a tiny model with a data dir on its vocabulary, and a
    teacher with a data dir for `distill cache`."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text("\n\n".join(generate(300, seed=1)) + "\n")
    train_tokenizer(list(generate(200, seed=2)), vocab_size=300).save(d / "tok")
    checkpoint.save(tiny_model(seed=1), d / "model")
    make_data(d / "data97", vocab=97, n_train=4000, n_val=400)
    checkpoint.save(tiny_model(seed=5, vocab_size=64), d / "teacher")
    make_data(d / "data64", vocab=64, n_train=4000, n_val=400)
    return {k: d / k for k in INPUTS}


def commands(i: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """One command line per command that writes, each writing `out`."""
    model = str(i["model"])
    train = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--data.seq_len", "16",
             "--data.batch_tokens", "128", "--data.micro_batch", "4", "--schedule.steps", "4",
             "--schedule.warmup_steps", "2", "--run.device", "cpu", "--run.compile", "false", "--run.peak_flops", "1e11"]
    return {
        "data prepare": ["data", "prepare", str(i["corpus.txt"]), "--tokenizer", str(i["tok"]), "--out", str(out)],
        "quantize": ["quantize", model, "--scheme", "int8", "--out", str(out)],
        "export gguf": ["export", model, "--format", "gguf", "--out", str(out)],
        "export hf": ["export", model, "--format", "hf", "--out", str(out)],
        "prune": ["prune", model, "--calib", str(i["data97"]), "--out", str(out), "--dim", "36", "--seq-len", "32",
                  "--calib-batches", "2", "--batch-size", "2"],
        "distill cache": ["distill", "cache", "--teacher", str(i["teacher"]), "--data", str(i["data64"]),
                          "--top-k", "8", "--out", str(out), *train],
        "data tinytales": ["data", "tinytales", "--stories", "20", "--out", str(out)],
        "tokenizer train": ["tokenizer", "train", str(i["corpus.txt"]), "--vocab-size", "280", "--out", str(out)],
        "trim-vocab": ["trim-vocab", model, "--corpus", str(i["data97"]), "--keep", "50", "--out", str(out)],
        "init": ["init", "--from", model, "--method", "random", "--dim", "24", "--out", str(out)],
        "grow": ["grow", model, "--method", "stack", "--factor", "2", "--out", str(out)],
        "pretrain": ["pretrain", "--data", str(i["data97"]), "--out", str(out), *train],
        "distill": ["distill", "--teacher", str(i["teacher"]), "--data", str(i["data64"]), "--out", str(out),
                    *train],
        "quickstart": ["quickstart", "--out", str(out), "--stories", "100"],
    }


FILE_OUTPUTS = {"export gguf", "data tinytales"}  # the others write a directory


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` with a hash of its bytes ("dir" for a directory): the before/after picture."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----- wrong paths: one line, exit 2, before any work, nothing created or changed ---------------------------

@pytest.mark.parametrize("name", sorted(commands(dict.fromkeys(INPUTS, Path()), Path())))
def test_the_wrong_kind_at_out_is_refused_even_with_overwrite(name: str, inputs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    if name in FILE_OUTPUTS:  # a directory where a file is written
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    else:  # a file where a directory is written
        out.write_text("keep me")
    words = commands(inputs, out)[name]
    before = tree(tmp_path)
    overwrite = [] if name in ("pretrain", "distill") else ["--overwrite"]  # a run dir is resumed, not replaced
    assert main([*words, *overwrite]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and ("is a file" in err or "is a directory" in err), err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["data prepare", "export gguf", "quantize", "tokenizer train", "pretrain"])
@pytest.mark.parametrize("where", ["parent is a file", "ancestor is a file", "unwritable parent"])
def test_a_parent_that_cannot_hold_out_is_refused(name: str, where: str, inputs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("keep me")
    if where == "unwritable parent":
        if os.geteuid() == 0:  # root writes through permission bits: take a directory the kernel refuses
            if not Path("/sys").is_dir():
                pytest.skip("no /sys to stand for an unwritable directory")
            out = Path("/sys/tinylm-test-out")
        else:
            (tmp_path / "ro").mkdir(mode=0o555)
            out = tmp_path / "ro" / "out"
    else:
        out = tmp_path / "afile" / ("out" if where == "parent is a file" else "a/b/out")
    before = tree(tmp_path)
    assert main(commands(inputs, out)[name]) == 2
    err = one_error_line(capsys)
    assert f"cannot write {out}" in err, err
    assert tree(tmp_path) == before and not out.exists()


def test_existing_outputs_are_kept_without_overwrite(inputs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # quickstart used to replace a tinytales.txt of the user's in --out
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "tinytales.txt").write_text("my own stories")
    (tmp_path / "c.txt").write_text("my own corpus")
    before = tree(tmp_path)
    for words in (commands(inputs, tmp_path / "q")["quickstart"], commands(inputs, tmp_path / "c.txt")["data tinytales"]):
        assert main(words) == 2
        assert "already exists (pass --overwrite" in one_error_line(capsys)
    assert tree(tmp_path) == before


# ----- failures part way leave nothing behind --------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True])
def test_quickstart_failing_part_way_leaves_nothing_it_created(existing: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def failing_tokenizer(*args: object, **kwargs: object) -> None:
        assert (out / "tinytales.txt").is_file()  # the corpus step ran: this is part way
        raise TinylmError("the tokenizer step failed")

    monkeypatch.setattr(quickstart, "train_tokenizer_on", failing_tokenizer)
    out = tmp_path / "q"
    if existing:
        out.mkdir()
        (out / "notes.md").write_text("mine")
    before = tree(tmp_path)
    assert main(["quickstart", "--out", str(out), "--stories", "100"]) == 2
    assert "tokenizer step failed" in one_error_line(capsys)
    assert tree(tmp_path) == before


def test_pretrain_on_a_bad_data_dir_leaves_no_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_data(tmp_path / "data", vocab=64, n_train=2000, n_val=200)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 16}))  # the shards hold ids up to 63
    before = tree(tmp_path)
    words = commands(dict.fromkeys(INPUTS, Path()) | {"data97": data}, tmp_path / "run")["pretrain"]
    with contextlib.suppress(IndexError):  # until the data dir's ids are checked when it opens (the disk item)
        assert main(words) == 2
        one_error_line(capsys)
    assert tree(tmp_path) == before


# ----- temporaries of interrupted commands -----------------------------------------------------------------

def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def start(words: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinylm", *words], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_temporary(proc: subprocess.Popen, out: Path) -> bool:
    """Poll until the command's temporary sibling of `out` appears (True) or the command ends (False)."""
    while proc.poll() is None:
        if any(name.startswith(f".{out.name}.tmp-") for name in temporaries(out)):
            return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("signum,code,line", [
    (signal.SIGTERM, 143, "tinylm: terminated"),
    pytest.param(signal.SIGINT, 130, "tinylm: interrupted", marks=pytest.mark.slow)])
def test_a_signal_during_data_prepare_cleans_up_and_says_one_line(signum: int, code: int, line: str,
                                                                  inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = start(["data", "prepare", "tinytales:200000", "--tokenizer", str(inputs["tok"]), "--out", str(out)])
    assert wait_for_temporary(proc, out), proc.stderr.read()
    proc.send_signal(signum)
    returncode, err = proc.wait(timeout=60), proc.stderr.read()
    assert returncode == code and err.splitlines() == [line], (returncode, err[-3000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary


def test_stale_temporaries_are_removed_by_the_next_write(inputs: dict[str, Path], tmp_path: Path) -> None:
    out, corpus = tmp_path / "data", tmp_path / "c.txt"
    assert main(commands(inputs, out)["data prepare"]) == 0
    for name in (f".data.tmp-{DEAD_PID}", f".data.old-{DEAD_PID + 1}", f".data.tmp-{os.getppid()}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text("{")
    (tmp_path / f".c.txt.tmp-{DEAD_PID}").write_text("half a sto")
    (tmp_path / ".other.tmp-1").mkdir()  # another output's, or another program's: not ours to remove
    assert main([*commands(inputs, out)["data prepare"], "--overwrite"]) == 0
    assert main(commands(inputs, corpus)["data tinytales"]) == 0
    # the dead processes' temporaries are gone; a live writer's (the parent process stands for one) stays
    assert temporaries(out) == [f".data.tmp-{os.getppid()}"] and temporaries(corpus) == []
    assert (tmp_path / ".other.tmp-1").is_dir()
    assert TokenData.open(out, "train").meta["splits"]["train"]["documents"] > 0


def test_a_dir_moved_aside_by_a_killed_writer_is_put_back(tmp_path: Path) -> None:
    # killed between its two renames: OUT moved to .OUT.old-PID, the new one not yet renamed in
    out = tmp_path / "model"
    (tmp_path / f".model.old-{DEAD_PID}").mkdir()
    (tmp_path / f".model.old-{DEAD_PID}" / "config.json").write_text("{}")
    assert remove_stale(out) == []
    assert (out / "config.json").read_text() == "{}" and temporaries(out) == []
    with pytest.raises(TinylmError, match="already exists"):
        check_out(out, overwrite=False)


def test_a_failed_write_removes_its_temporary_and_the_parents_it_made(tmp_path: Path) -> None:
    for helper in (atomic_file, atomic_dir):
        with pytest.raises(RuntimeError), helper(tmp_path / "a" / "b" / "out") as tmp:
            (tmp / "x" if tmp.is_dir() else tmp).write_text("half")
            raise RuntimeError("failed part way")
        assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_link_to_a_dir_with_the_new_dir(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "kept.txt").write_text("the link's target is not touched")
    (tmp_path / "out").symlink_to(tmp_path / "old")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert not (tmp_path / "out").is_symlink() and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert (tmp_path / "old" / "kept.txt").is_file() and temporaries(tmp_path / "out") == []


@pytest.mark.slow
def test_concurrent_prepares_into_one_place_leave_one_consistent_dataset(inputs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "data"
    words = [*commands(inputs, out)["data prepare"], "--overwrite"]
    procs = [start(words), start([*words, "--seed", "1"])]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    meta = json.loads((out / "meta.json").read_text())
    for info in meta["splits"].values():  # every shard the meta names, with its token count
        for shard in info["shards"]:
            assert (out / shard["file"]).stat().st_size == shard["tokens"] * np.dtype(meta["dtype"]).itemsize
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", "tokenizer"] + [
        s["file"] for info in meta["splits"].values() for s in info["shards"]])
    assert temporaries(out) == []


# ----- kill -9 at a random moment of the write (the acceptance of issue 12) ------------------------------

# Each is a subprocess of several seconds (most of it importing torch): one runs in the quick suite.
KILLED = ["data prepare", *(pytest.param(name, marks=pytest.mark.slow) for name in
                            ("quantize", "export gguf", "export hf", "prune", "distill cache"))]


def fingerprint(out: Path) -> dict[str, str]:
    """What an output holds, less what depends on timing (the cache's teacher tokens/s)."""
    if out.is_file():
        return {"": hashlib.sha256(out.read_bytes()).hexdigest()}
    picture = tree(out)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        meta.pop("teacher_tokens_per_s", None)
        picture["meta.json"] = json.dumps(meta, sort_keys=True)
    return picture


@pytest.mark.parametrize("name", KILLED)
def test_kill9_leaves_no_partial_output_and_the_next_run_succeeds(name: str, inputs: dict[str, Path],
                                                                 tmp_path: Path, rng: np.random.Generator,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("model.gguf" if name == "export gguf" else "out")
    words = commands(inputs, out)[name]
    delay = float(rng.uniform(0, 0.02))  # after the temporary appears: inside the write, or at its rename
    note = f"(killed {delay * 1000:.1f} ms after the temporary appeared; TINYLM_TEST_SEED draws it again)"
    proc = start(words)
    if wait_for_temporary(proc, out):
        time.sleep(delay)
        proc.kill()
    if proc.wait(timeout=120) != -signal.SIGKILL:
        note = "(the command ended before the kill)"
    survived = fingerprint(out) if out.exists() else None  # the old output (none) or the whole new one
    assert main([*words, "--overwrite"]) == 0, note
    capsys.readouterr()
    assert temporaries(out) == [], note
    assert survived is None or survived == fingerprint(out), f"a partial output under its final name {note}"
    if name == "data prepare":
        assert TokenData.open(out, "train").meta["splits"]["train"]["documents"] > 0
    elif name not in ("distill cache", "export gguf"):
        assert checkpoint.is_complete(out)
