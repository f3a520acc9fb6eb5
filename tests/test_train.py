"""Pretraining loop: schedules against their formulas, bitwise resume after kill -9, WSD decay branches,
DDP against one process, and non-finite losses/gradients stopping the run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    assert_bitwise,
    kill_note,
    make_data,
    run_and_kill,
    tiny_model,
    tiny_train_args,
    weights,
)

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.data.tokens import TokenData
from tinylm.formats import checkpoint
from tinylm.train.config import DataSection, RunSection, ScheduleSection, TrainConfig
from tinylm.train.loop import Batch, BatchSource, fit, setup, setup_model, train_step
from tinylm.train.losses import lm_loss
from tinylm.train.metrics import read_metrics
from tinylm.train.schedule import branch_total, decay_steps, lr_factor
from tinylm.train.state import latest_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def tiny_args(data: Path, out: Path, steps: int = 24, **extra: object) -> dict[str, object]:
    return tiny_train_args(data, out, **{"schedule.steps": steps, "run.eval_every": 8, "run.eval_tokens": 256,
                                         "run.ckpt_every": 8, **extra})


def train(args: dict[str, object], loss_fn=lm_loss) -> Path:
    return fit(setup(load_config(TrainConfig, None, args)), loss_fn)


# ----- schedules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["exponential", "linear", "1-sqrt"])
def test_wsd_matches_formula(shape: str) -> None:
    s = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.1)
    total, start = 100, 80  # decay over the last round(0.2 * 100) = 20 steps
    for step in range(total):
        if step < 10:
            want = (step + 1) / 10
        elif step < start:
            want = 1.0
        else:
            p = (step - start) / 20
            want = {"exponential": 0.1 ** p, "linear": 1 - 0.9 * p, "1-sqrt": 0.1 + 0.9 * (1 - p ** 0.5)}[shape]
        assert lr_factor(step, total, s) == pytest.approx(want, abs=1e-12), step


def test_cosine_and_constant_match_formula() -> None:
    cos = ScheduleSection(kind="cosine", warmup_steps=5, min_lr_ratio=0.1)
    const = ScheduleSection(kind="constant", warmup_steps=5)
    for step in range(5, 50):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 5) / 45))
        assert lr_factor(step, 50, cos) == pytest.approx(want, abs=1e-12)
        assert lr_factor(step, 50, const) == 1.0
    assert lr_factor(0, 50, cos) == pytest.approx(1 / 5)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.37])
def test_branch_total_starts_decay_at_checkpoint(fraction: float) -> None:
    for start in range(5, 300, 7):
        total = branch_total(start, fraction)
        assert total - decay_steps(total, fraction) == start
        assert total == start + 1 or (total - 1) - decay_steps(total - 1, fraction) < start


def test_decay_branch_equals_straight_run(data: Path, tmp_path: Path) -> None:
    f = 0.25
    stable_at = 18  # a checkpoint of the long run, in its stable phase
    straight_total = branch_total(stable_at, f)
    straight = train(tiny_args(data, tmp_path / "straight", steps=straight_total, **{"run.ckpt_every": 0}))
    train(tiny_args(data, tmp_path / "long", steps=40, **{"run.ckpt_every": 6, "run.keep_last": 10}))
    src = tmp_path / "long" / "checkpoints" / f"step_{stable_at:07d}"
    branch = train(tiny_args(data, tmp_path / "branch", steps=None, **{"run.decay_from": str(src)}))
    assert_bitwise(weights(straight), weights(branch))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "branch" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < lrs[0]
    with pytest.raises(TinylmError, match="stable phase"):  # a checkpoint already decaying is refused
        late = tmp_path / "long" / "checkpoints" / f"step_{36:07d}"
        setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "b2", **{"run.decay_from": str(late)})))


# ----- losses and micro-batches ----------------------------------------------------------------------

def masked_batches(data: Path, rows: int, seq_len: int) -> BatchSource:
    """The pretraining windows with uneven masks: row i of the global batch leaves out its first
    3i mod seq_len targets, so micro-batches count different numbers of targets."""
    windows = TokenData.open(data).batches(0, rows, seq_len)

    def source(step: int, start: int, count: int) -> Batch:
        b = windows(step, start, count)
        skip = torch.tensor([3 * (start + i) % seq_len for i in range(count)])
        return Batch(b.tokens, b.index, mask=torch.arange(seq_len)[None, :] >= skip[:, None])  # (count, T)

    return source


def test_masked_lm_loss_is_the_mean_over_unmasked_targets() -> None:
    model = tiny_model(seed=1, vocab_size=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 13), generator=g)
    mask = torch.rand(3, 12, generator=g) < 0.6
    print("unmasked targets:", int(mask.sum()))
    with torch.no_grad():
        loss, _ = lm_loss(model, Batch(tokens, mask=mask))
        logits = model(tokens[:, :-1]).float()  # (B, T, V)
        labels = tokens[:, 1:].masked_fill(~mask, -100)
        ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        nll = -F.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T)
        by_hand = nll[mask].sum() / mask.sum()
        plain, _ = lm_loss(model, Batch(tokens))
        nothing, _ = lm_loss(model, Batch(tokens, mask=torch.zeros_like(mask)))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(plain, nll.mean())
    assert float(nothing) == 0.0  # nothing counted: 0, not NaN


def test_micro_batches_average_as_one_batch(data: Path) -> None:
    rows, seq_len = 8, 16
    runs = {}
    for micro in (8, 2):  # one micro-batch of 8 rows, or 4 of 2 rows each with its own count of targets
        cfg = TrainConfig(data=DataSection(seq_len=seq_len, batch_tokens=rows * seq_len, micro_batch=micro),
                          schedule=ScheduleSection(kind="constant", steps=3, warmup_steps=1),
                          run=RunSection(device="cpu", compile=False))
        run = setup_model(cfg, tiny_model(seed=2, vocab_size=64), masked_batches(data, rows, seq_len))
        stats = [train_step(run, lm_loss) for _ in range(3)]
        runs[micro] = (run, [s["loss"] for s in stats], [s["grad_norm"] for s in stats])
    (_, one_losses, one_norms), (acc, acc_losses, acc_norms) = runs[8], runs[2]
    assert acc.accum == 4
    # the same losses and gradients (their norms; AdamW's first steps magnify float noise in the weights)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    np.testing.assert_allclose(acc_norms, one_norms, rtol=1e-5)
    # the reference: the masked mean over the whole first batch, computed at once
    first = masked_batches(data, rows, seq_len)(0, 0, rows)
    with torch.no_grad():
        want = lm_loss(tiny_model(seed=2, vocab_size=64).train(), first)[0]
        naive = np.mean([float(lm_loss(tiny_model(seed=2, vocab_size=64), masked_batches(data, rows, seq_len)(
            0, i, 2))[0]) for i in range(0, rows, 2)])
    assert acc_losses[0] == pytest.approx(float(want), rel=1e-5)
    assert abs(naive - float(want)) > 1e-3  # the mean of micro-batch means would differ: the test can fail


# ----- resume ----------------------------------------------------------------------------------------

def cli_words(args: dict[str, object]) -> list[str]:
    words = [sys.executable, "-m", "tinylm", "pretrain"]
    for k, v in args.items():
        words += [f"--{k}", str(v)]
    return words


@pytest.mark.slow
def test_compiled_kill9_then_resume_is_bitwise_identical(data: Path, tmp_path: Path,
                                                         rng: np.random.Generator) -> None:
    # Both runs in subprocesses: compiling on a CPU switches on PyTorch's (process-wide) deterministic mode.
    steps, env = 30, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    compiled = {"run.compile": True, "run.eval_every": 0, "run.keep_last": 3}
    straight = tiny_args(data, tmp_path / "straight", steps=steps, **compiled, **{"run.ckpt_every": 0})
    done = subprocess.run(cli_words(straight), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = tiny_args(data, tmp_path / "killed", steps=steps, **compiled, **{"run.ckpt_every": 4})
    kill_at = int(rng.integers(6, 24))
    run_and_kill(cli_words(args), tmp_path / "killed" / "metrics.jsonl", kill_at, env)
    resumed = subprocess.run(cli_words({**args, "run.resume": "auto"}), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, f"{kill_note(kill_at)} {resumed.stderr}"
    assert_bitwise(weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final"), kill_note(kill_at))


def test_kill9_then_resume_is_bitwise_identical(data: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    steps = 80
    args = tiny_args(data, tmp_path / "killed", steps=steps, **{"run.ckpt_every": 10, "run.keep_last": 3,
                                                                  "run.eval_every": 40})
    reference = train(tiny_args(data, tmp_path / "straight", steps=steps, **{"run.ckpt_every": 0,
                                                                            "run.eval_every": 40}))
    kill_at = int(rng.integers(12, 60))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    metrics = tmp_path / "killed" / "metrics.jsonl"
    run_and_kill(cli_words(args), metrics, kill_at, env)
    last = latest_checkpoint(tmp_path / "killed")
    # A write cut off mid-way: a leftover temporary dir and a newer, incomplete checkpoint dir.
    ckpts = tmp_path / "killed" / "checkpoints"
    (ckpts / ".step_0000070.tmp-999").mkdir()
    (ckpts / ".step_0000070.tmp-999" / "config.json").write_text("{}")
    partial = ckpts / "step_0000070"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"")
    (partial / "train_state").mkdir()
    assert latest_checkpoint(tmp_path / "killed") == last, kill_note(kill_at)
    resumed = subprocess.run(cli_words({**args, "run.resume": "auto"}), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, f"{kill_note(kill_at)} {resumed.stderr}"
    assert_bitwise(weights(reference), weights(tmp_path / "killed" / "final"), kill_note(kill_at))
    steps_logged = [r["step"] for r in read_metrics(metrics) if "loss" in r]
    assert steps_logged == list(range(1, steps + 1)), kill_note(kill_at)


def test_resume_never_refuses_existing_checkpoints(data: Path, tmp_path: Path) -> None:
    train(tiny_args(data, tmp_path / "r", steps=8))
    with pytest.raises(TinylmError, match="already holds checkpoints"):
        setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "r", steps=8)))


def test_sigterm_writes_a_checkpoint(data: Path, tmp_path: Path) -> None:
    args = tiny_args(data, tmp_path / "t", steps=2000, **{"run.ckpt_every": 0})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cli_words(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143  # 128 + SIGTERM
    last = latest_checkpoint(tmp_path / "t")
    assert last is not None and checkpoint.load_train_state(last)[1]["step"] >= 5


# ----- non-finite values -----------------------------------------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g * float("inf")


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_stops_with_last_checkpoint_intact(data: Path, tmp_path: Path, what: str) -> None:
    calls = {"n": 0}
    bad_from = 11 * 2  # micro-steps: 2 per optimizer step, so step 12 goes bad

    def poisoned(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        if calls["n"] > bad_from:
            return (loss * float("nan") if what == "loss" else _InfGrad.apply(loss)), metrics
        return loss, metrics

    out = tmp_path / what
    with pytest.raises(TinylmError, match=f"non-finite {what}.* at step 12") as err:
        train(tiny_args(data, out, steps=20), poisoned)
    assert "\n" not in str(err.value)
    last = latest_checkpoint(out)
    assert last is not None and last.name == "step_0000008" and str(last) in str(err.value)
    loaded = checkpoint.load(last).model
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert not (out / "final").exists()
    # the checkpoint is the one an unpoisoned run writes at step 8
    clean = tmp_path / "clean"
    train(tiny_args(data, clean, steps=20, **{"run.keep_last": 5}))
    assert_bitwise(weights(last), weights(clean / "checkpoints" / "step_0000008"))


# ----- several processes -----------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, args: dict[str, object]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tinylm.stages.pretrain import pretrain

    pretrain(load_config(TrainConfig, None, args))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_ddp_two_processes_match_one(data: Path, tmp_path: Path, fsdp: bool) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = {"run.ckpt_every": 0, "run.eval_every": 0, "data.micro_batch": 2}  # 2 ranks x 2 micro-steps x 2 rows
    sharded = {"run.fsdp": True} if fsdp else {}
    mp.spawn(_ddp_worker, args=(2, port, tiny_args(data, tmp_path / "ddp", steps=10, **extra, **sharded)), nprocs=2)
    train(tiny_args(data, tmp_path / "one", steps=10, **extra))
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    two = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 11))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) < 1e-4


# ----- the checkpoint of lowest validation loss (run.keep_best) ----------------------------------------

def test_keep_best_holds_the_weights_of_the_lowest_val_loss(data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tinylm.train import loop

    scripted = iter([3.0, 2.0, 2.5, 1.5, 1.8, 1.9])  # the val passes at steps 4, 8, ..., 24: lowest at 16
    monkeypatch.setattr(loop, "validate", lambda run, loss_fn: {"val_loss": next(scripted)})
    out = tmp_path / "run"
    args = tiny_args(data, out, **{"run.eval_every": 4, "run.ckpt_every": 4, "run.keep_last": 100,
                                   "run.keep_best": True})
    train(args)
    best = checkpoint.load(out / "best")
    assert (best.meta["step"], best.meta["val_loss"]) == (16, 1.5)
    assert_bitwise(weights(out / "best"), weights(out / "checkpoints" / "step_0000016"))
    assert not (out / "best" / "train_state").exists()  # weights only: not a checkpoint to resume
    monkeypatch.undo()
    train(tiny_args(data, tmp_path / "off", **{"run.eval_every": 4}))
    assert not (tmp_path / "off" / "best").exists()  # off by default


def test_keep_best_needs_a_val_split(tmp_path: Path) -> None:
    no_val = make_data(tmp_path / "data")
    meta = json.loads((no_val / "meta.json").read_text())
    del meta["splits"]["val"]
    (no_val / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TinylmError, match="run.keep_best needs validation data"):
        setup(load_config(TrainConfig, None, tiny_args(no_val, tmp_path / "run", **{"run.keep_best": True})))
    assert not (tmp_path / "run").exists()


def test_cpu_training_reuses_freed_memory(data: Path, tmp_path: Path) -> None:
    """A CPU run's setup makes glibc's malloc keep freed blocks (`core.devices.keep_freed_cpu_memory`): a 48 MiB
    tensor allocated and freed again faults its pages in once, not every time (fixed-batch steps 8-13% faster:
    BENCHMARKS.md)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    args = json.dumps(tiny_args(data, tmp_path / "run"), default=str)
    code = f"""
import json, resource, torch
from tinylm.core.recipe import load_config
from tinylm.train.config import TrainConfig
from tinylm.train.loop import setup

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(12 << 20)  # 48 MiB, freed at once: above the 32 MiB where glibc's own threshold stops adapting
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
setup(load_config(TrainConfig, None, json.loads({args!r})))
faults()  # the heap grows to hold the block, once
print(plain, faults())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    plain, kept = map(int, done.stdout.split()[-2:])
    assert plain > 0 and kept * 10 < plain, (plain, kept)
