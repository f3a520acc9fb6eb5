"""Everything read from disk is checked where it is opened (issue 12, item 2): a model's config.json, the
memory its shape would take, its tokenizer against its embedding rows, a data dir's meta.json and token
ids, a checkpoint's train_state/state.json, and `--resume auto` over a checkpoint that does not verify.

Each bad input goes through the CLI in-process and must give exit code 2, exactly one stderr line
`tinylm: error: ...`, no traceback and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_bitwise, make_data, tiny_model, weights

from tinylm.cli import main
from tinylm.core.recipe import load_config
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.train.config import TrainConfig
from tinylm.train.loop import fit, setup


def cli_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    """Run `tinylm WORDS` in-process; assert the one-line error contract and return the line."""
    code = main([str(w) for w in words])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinylm: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint.save(tiny_model(), tmp_path_factory.mktemp("m") / "model")


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    hf.update(changes)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


# ----- config.json --------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"rope_theta": "fast"}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),  # json.dumps writes NaN, which json.loads reads
    ({"initializer_range": float("inf")}, "initializer_range"),
    ({"tinylm": "not an object"}, '"tinylm" block'),
    ({"tinylm": {"quantization": [1, 2]}}, "tinylm.quantization"),
    ({"hidden_size": -48}, "hidden_size"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    ({"num_attention_heads": 7, "num_key_value_heads": 7, "head_dim": None}, "n_heads 7"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
]


@pytest.mark.parametrize(("changes", "named"), BAD_CONFIGS, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_CONFIGS)])
def test_bad_config_json_is_one_line_naming_file_and_field(model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, changes: dict,
                                                          named: str) -> None:
    bad = _with_config(model_dir, tmp_path / "bad", **changes)
    line = cli_error(capsys, "info", bad)
    assert str(bad / "config.json") in line and named in line


def test_config_json_not_an_object(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    (bad / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in cli_error(capsys, "info", bad)
    (bad / "config.json").write_text('{"vocab_size": 9')
    assert "not valid JSON" in cli_error(capsys, "info", bad)


# ----- memory ---------------------------------------------------------------------------------------

def test_shape_too_big_for_memory_is_refused_with_the_estimate(model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    # 97 x 48 embedding -> 10^12 rows: 4.8e13 parameters, ~190 TB in fp32, on no machine today
    bad = _with_config(model_dir, tmp_path / "huge", vocab_size=10**12)
    line = cli_error(capsys, "info", bad)
    assert "would need" in line and "GB for its weights" in line and "available" in line


def test_grow_beyond_memory_is_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The case (a 64-wide source grown to 6,400,000 was OOM-killed at 24 GB): here 48 -> 4,800,000.
    line = cli_error(capsys, "grow", model_dir, "--out", tmp_path / "g", "--method", "hypercloning",
                     "--dim", 4_800_000)
    assert "grow: the grown model" in line and "would need" in line
    line = cli_error(capsys, "grow", model_dir, "--out", tmp_path / "g", "--method", "stack", "--factor", 10**9)
    assert "would need" in line
    assert not (tmp_path / "g").exists()


def test_pretrain_shape_beyond_memory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_data(tmp_path / "data", n_train=400, n_val=100)
    line = cli_error(capsys, "pretrain", "--data", data, "--out", tmp_path / "run", "--preset", "1m",
                     "--model.dim", 2_000_000, "--model.n_heads", 4, "--run.device", "cpu")
    assert "model.preset 1m" in line and "would need" in line
    assert not (tmp_path / "run").exists()


# ----- tokenizer vs embedding rows -----------------------------------------------------------------

@pytest.fixture(scope="module")
def big_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 97-row model saved with a 280-token tokenizer (one from another model)."""
    tok = train_tokenizer(["the cat sat on the mat, said Lily. " * 3] * 50, vocab_size=300, min_frequency=1)
    assert tok.vocab_size == 280  # the corpus holds no more merges
    return checkpoint.save(tiny_model(), tmp_path_factory.mktemp("t") / "model", tokenizer=tok)


@pytest.mark.parametrize("words", [
    ["generate", "{m}", "--prompt", "hi", "--max-tokens", "2"],
    ["eval", "{m}", "--data", "{text}"],
    ["quantize", "{m}", "--scheme", "int8", "--out", "{out}"],
    ["export", "{m}", "--format", "hf", "--out", "{out}"],
    ["info", "{m}"],
], ids=lambda w: w[0])
def test_tokenizer_larger_than_embedding_is_one_line(big_tok_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, words: list[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 20)
    line = cli_error(capsys, *(w.format(m=big_tok_dir, text=text, out=tmp_path / "out") for w in words))
    assert "280 tokens" in line and "97 embedding rows" in line
    assert not (tmp_path / "out").exists()


def test_tokenizer_smaller_than_embedding_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = train_tokenizer(["the cat sat on the mat. " * 3] * 50, vocab_size=270, min_frequency=1)
    model = checkpoint.save(tiny_model(vocab_size=tok.vocab_size + 30), tmp_path / "m", tokenizer=tok)
    assert main(["info", str(model)]) == 0
    capsys.readouterr()


# ----- data dirs ------------------------------------------------------------------------------------

@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "data", vocab=64, n_train=600, n_val=200)


def _meta(d: Path) -> dict:
    return json.loads((d / "meta.json").read_text())


def _pretrain(data: Path, out: Path, *extra: object) -> list[object]:
    return ["pretrain", "--data", data, "--out", out, "--model.dim", 32, "--model.n_layers", 1,
            "--model.n_heads", 4, "--data.seq_len", 16, "--data.batch_tokens", 64, "--schedule.steps", 2,
            "--run.device", "cpu", "--run.compile", "false", "--run.progress", "false", "--run.plot", "false",
            "--run.peak_flops", "1e11", *extra]


def test_prepare_records_each_splits_max_token_id(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = train_tokenizer(["the cat sat on the mat, said Lily. " * 3] * 50, vocab_size=280, min_frequency=1)
    tok.save(tmp_path / "tok")
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(f"the cat {i} sat on the mat" for i in range(60)) + "\n")
    assert main(["data", "prepare", str(text), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "d"), "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    meta = _meta(tmp_path / "d")
    for info in meta["splits"].values():
        ids = np.concatenate([np.fromfile(tmp_path / "d" / s["file"], dtype=meta["dtype"]) for s in info["shards"]])
        assert info["max_token_id"] == int(ids.max())


@pytest.mark.parametrize("record", [False, True], ids=["computed", "recorded"])
def test_token_ids_beyond_the_vocabulary(small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         model_dir: Path, record: bool) -> None:
    ids = np.fromfile(small_data / "val_0000.bin", dtype=np.uint16)
    ids[5] = 500  # beyond the 64 tokens of the data's vocabulary and the 97 rows of model_dir
    ids.tofile(small_data / "val_0000.bin")
    if record:  # as `data prepare` writes it
        meta = _meta(small_data)
        meta["splits"]["val"]["max_token_id"] = 500
        (small_data / "meta.json").write_text(json.dumps(meta))
    line = cli_error(capsys, *_pretrain(small_data, tmp_path / "run"))
    assert "token id 500" in line and "64" in line
    assert not (tmp_path / "run").exists()
    line = cli_error(capsys, "eval", model_dir, "--data", small_data)
    assert "token id 500" in line and "97" in line


META_DAMAGE = {
    "missing": lambda d: (d / "meta.json").unlink(),
    "truncated": lambda d: (d / "meta.json").write_text((d / "meta.json").read_text()[:40]),
    "not an object": lambda d: (d / "meta.json").write_text("[]"),
    "vocab_size": lambda d: _patch_meta(d, vocab_size="64"),
    "dtype": lambda d: _patch_meta(d, dtype="float64"),
    "splits": lambda d: _patch_meta(d, splits=[]),
    "shards": lambda d: _patch_meta(d, splits={"train": {"shards": [{"file": "../x.bin", "tokens": 5}]}}),
    "tokens": lambda d: _patch_meta(d, splits={"train": {"shards": [{"file": "train_0000.bin", "tokens": -1}]}}),
    "shard size": lambda d: (d / "train_0000.bin").write_bytes(b"\0\0" * 10),
    "max_token_id": lambda d: _patch_meta(d, splits={"train": {**_meta(d)["splits"]["train"], "max_token_id": "x"}}),
}


def _patch_meta(d: Path, **changes: object) -> None:
    (d / "meta.json").write_text(json.dumps({**_meta(d), **changes}))


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_bad_data_dir_is_one_line(small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  model_dir: Path, damage: str) -> None:
    META_DAMAGE[damage](small_data)
    cli_error(capsys, *_pretrain(small_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    cli_error(capsys, "eval", model_dir, "--data", small_data, "--split", "train")


# ----- train_state/state.json and --resume -----------------------------------------------------------

def _train_args(data: Path, out: Path) -> dict[str, object]:
    return {"data.dir": str(data), "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
            "data.seq_len": 16, "data.batch_tokens": 128, "data.micro_batch": 4, "schedule.steps": 8,
            "schedule.warmup_steps": 2, "schedule.decay_fraction": 0.25, "run.out": str(out),
            "run.eval_every": 0, "run.ckpt_every": 4, "run.log_every": 1, "run.compile": False,
            "run.progress": False, "run.plot": False, "run.device": "cpu", "run.peak_flops": 1e11}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) of an uninterrupted 8-step run with checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("run")
    data = make_data(root / "data", n_train=3000, n_val=300)
    fit(setup(load_config(TrainConfig, None, _train_args(data, root / "run"))))
    return data, root / "run"


STATE_DAMAGE = {
    "truncated": '{"step": 4, "total_st',
    "step is a string": '{"step": "two", "total_steps": 8}',
    "missing step": '{"total_steps": 8}',
    "negative step": '{"step": -1, "total_steps": 8}',
    "not an object": '"step"',
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_bad_state_json_is_one_line(short_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                    damage: str) -> None:
    data, run = short_run
    ckpt = shutil.copytree(run / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    (ckpt / "train_state" / "state.json").write_text(STATE_DAMAGE[damage])
    line = cli_error(capsys, *_pretrain(data, tmp_path / "out", "--resume", ckpt))
    assert "state.json" in line
    assert not (tmp_path / "out").exists()


def _resume_auto(data: Path, out: Path, capsys: pytest.CaptureFixture) -> str:
    args = {**_train_args(data, out), "run.resume": "auto"}
    fit(setup(load_config(TrainConfig, None, args)))
    return capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated weights", "truncated optimizer", "bad state.json", "missing file"])
def test_resume_auto_skips_a_checkpoint_that_does_not_verify(short_run: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, damage: str) -> None:
    data, run = short_run
    out = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(out / "final")
    latest = out / "checkpoints" / "step_0000008"
    if damage.startswith("truncated"):
        f = latest / ("model.safetensors" if damage == "truncated weights" else "train_state/optimizer.safetensors")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "bad state.json":
        (latest / "train_state" / "state.json").write_text('{"step": "two"}')
    else:
        (latest / "model.safetensors").unlink()
    capsys.readouterr()
    err = _resume_auto(data, out, capsys)
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "resuming from step_0000004" in skipped[0] and "step_0000008" in skipped[0], err
    # resumed from step 4, the run ends bit for bit where the uninterrupted one did
    assert_bitwise(weights(run / "final"), weights(out / "final"))


def test_resume_auto_with_no_checkpoint_that_verifies_is_one_line(short_run: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data, run = short_run
    out = shutil.copytree(run, tmp_path / "run")
    for step in ("step_0000004", "step_0000008"):
        (out / "checkpoints" / step / "train_state" / "state.json").write_text("{")
    line = cli_error(capsys, *_pretrain(data, out, "--resume", "auto"))
    assert "no checkpoint" in line and "step_0000004" in line


# ----- quantised sources --------------------------------------------------------------------------

def test_growing_a_quantised_model_is_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(model_dir), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    for words in (["grow", "--method", "stack", "--factor", "2"], ["grow", "--method", "hypercloning", "--dim", "96"],
                  ["init", "--n-layers", "1"]):
        src = ["--from", tmp_path / "q"] if words[0] == "init" else [tmp_path / "q"]
        line = cli_error(capsys, words[0], *src, *words[1:], "--out", tmp_path / "g")
        assert "quantised" in line
        assert not (tmp_path / "g").exists()
