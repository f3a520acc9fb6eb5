"""run.minutes: the planner of train.budget against fake clocks (constant speed, a slowdown mid-run, a
first step that compiles, time between steps, batch-size warmup), its WSD staying valid through every
re-plan, a budgeted run resumed (the budget counts the whole run), and one short run on the real clock."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from helpers import make_data, tiny_train_args

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.train.budget import TAIL, UNBOUNDED, Budget, Plan, replan
from tinylm.train.config import ScheduleSection, TrainConfig
from tinylm.train.loop import fit, setup
from tinylm.train.losses import lm_loss
from tinylm.train.metrics import read_metrics
from tinylm.train.schedule import BatchRamp, decay_progress, lr_factor
from tinylm.train.state import latest_checkpoint

WSD = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="linear")


class FakeClock:
    """A clock that moves only when told to: a step 'takes' what the test says."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(seconds: float, step_s: Callable[[float, int], float], sched: ScheduleSection = WSD,
             ramp: BatchRamp = BatchRamp(8, 16), gap_s: Callable[[int], float] = lambda step: 0.0,
             ) -> tuple[float, list[float], Budget]:
    """The loop's use of the planner without a model: (seconds taken, lr factor of every step, budget).

    step_s(now, rows) is how long a step of `rows` rows takes at fake time `now`; gap_s(step) the time
    after step `step` (validation, checkpoints)."""
    clock = FakeClock()
    budget = Budget(seconds, ramp, sched, clock=clock)
    plan, step, lrs = Plan(UNBOUNDED), 0, []
    while step < plan.total:
        budget.step_started()
        lrs.append(lr_factor(step, plan.total, sched, plan.anchor))
        clock.t += step_s(clock.t, ramp.rows_at(step))
        step += 1
        plan = budget.step_done(step, plan)
        clock.t += gap_s(step)
    return clock.t, lrs, budget


def check_wsd(lrs: list[float], sched: ScheduleSection = WSD) -> None:
    """Warmup, then never rising, decayed at the end."""
    w = sched.warmup_steps
    assert lrs[:w] == pytest.approx([(i + 1) / w for i in range(w)])
    after = np.array(lrs[w:])
    assert np.all(np.diff(after) <= 1e-12), "the lr rose after warmup"
    assert after[-1] < 0.5 * after[0], "the last step's lr is not decayed"


# ----- the planner, simulated ------------------------------------------------------------------------

def test_constant_speed_ends_within_5_percent() -> None:
    taken, lrs, _ = simulate(60.0, lambda now, rows: 0.1)
    print(f"took {taken:.2f} s of 60 in {len(lrs)} steps")
    assert abs(taken - 60.0) <= 0.05 * 60.0
    check_wsd(lrs)
    decaying = sum(1 for x in lrs[WSD.warmup_steps:] if x < 1.0)
    assert decaying == pytest.approx(WSD.decay_fraction * len(lrs), abs=3)  # the planned decay length


def test_halved_speed_mid_run_overruns_at_most_10_percent() -> None:
    taken, lrs, _ = simulate(60.0, lambda now, rows: 0.1 if now < 30.0 else 0.2)
    plain, plain_lrs, _ = simulate(60.0, lambda now, rows: 0.1)
    print(f"took {taken:.2f} s of 60 in {len(lrs)} steps (steady speed: {len(plain_lrs)} steps)")
    assert taken <= 1.10 * 60.0 and taken >= 0.9 * 60.0
    assert len(lrs) < 0.8 * len(plain_lrs)  # it planned fewer steps: it noticed
    check_wsd(lrs)


def test_slowdown_inside_the_decay_shortens_it_without_a_jump() -> None:
    # the speed drops to a third at 90% of the budget, inside the decay (the last 20% of the steps)
    sched = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="linear")
    taken, lrs, _ = simulate(60.0, lambda now, rows: 0.1 if now < 54.0 else 0.3, sched)
    assert taken <= 1.10 * 60.0
    check_wsd(lrs, sched)
    drops = -np.diff(lrs[sched.warmup_steps:])
    assert drops.max() < 0.1  # a squeezed decay, not a cliff (a straight 120-step decay drops 1/120 a step)


def test_compile_time_of_the_first_step_and_time_between_steps_are_budgeted() -> None:
    def step_s(now: float, rows: int) -> float:
        return 0.1

    clock_first = {"first": True}

    def with_compile(now: float, rows: int) -> float:
        first, clock_first["first"] = clock_first["first"], False
        return 8.0 if first else 0.1  # compiling: 8 s, 13% of the budget

    taken, lrs, _ = simulate(60.0, with_compile, gap_s=lambda step: 0.5 if step % 50 == 0 else 0.0)
    print(f"took {taken:.2f} s of 60 in {len(lrs)} steps")
    assert abs(taken - 60.0) <= 0.05 * 60.0
    check_wsd(lrs)


def test_batch_warmup_steps_are_planned_by_their_tokens() -> None:
    ramp = BatchRamp.make(16, 16, 1, tokens=20_000, start=0.125)
    assert ramp.ramp[0] == 2 and len(ramp.ramp) > 50
    taken, lrs, _ = simulate(60.0, lambda now, rows: 0.01 * rows, ramp=ramp)  # a step's time grows with its rows
    print(f"took {taken:.2f} s of 60 in {len(lrs)} steps")
    assert abs(taken - 60.0) <= 0.05 * 60.0


def test_one_stalled_step_mid_run_is_not_a_slowdown() -> None:
    # a recompile 10 s in (a new batch shape) takes 15% of the budget; the steps after it are as fast
    ramp = BatchRamp.make(16, 16, 1, tokens=20_000, start=0.125)
    stalled = {"yet": False}

    def step_s(now: float, rows: int) -> float:
        if now > 10.0 and not stalled["yet"]:
            stalled["yet"] = True
            return 9.0
        return 0.01 * rows

    taken, lrs, _ = simulate(60.0, step_s, ramp=ramp)
    assert abs(taken - 60.0) <= 0.05 * 60.0
    check_wsd(lrs)
    decaying = sum(1 for x in lrs[WSD.warmup_steps:] if x < 1.0)
    assert decaying <= WSD.decay_fraction * len(lrs) + 3  # the decay is the planned last 20%, not begun at the stall


def test_a_budget_too_short_for_the_probe_still_ends_decayed() -> None:
    taken, lrs, _ = simulate(0.2, lambda now, rows: 0.1)  # two steps' worth: the probe alone takes three
    assert len(lrs) <= 3 + TAIL
    assert lrs[-1] < lrs[-2]  # the tail decayed


def test_constant_schedule_and_cap() -> None:
    const = ScheduleSection(kind="constant", warmup_steps=5)
    taken, lrs, _ = simulate(30.0, lambda now, rows: 0.1, const)
    assert abs(taken - 30.0) <= 0.05 * 30.0 and lrs[-1] == 1.0
    clock = FakeClock()
    budget = Budget(30.0, BatchRamp(8, 16), WSD, cap=40, clock=clock)
    for step in range(1, 4):
        budget.step_started()
        clock.t += 0.1
        plan = budget.step_done(step, Plan(40))
    assert plan.total == 40  # schedule.steps caps what 30 s would allow (300 steps)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "exponential"])
def test_replan_keeps_the_lr_of_every_step_done_and_the_next(shape: str, rng: np.random.Generator) -> None:
    sched = ScheduleSection(kind="wsd", warmup_steps=5, decay_fraction=0.3, decay_shape=shape, min_lr_ratio=0.05)
    plan, step, lrs, progress = Plan(200), 0, [], -1.0
    while step < plan.total:
        if rng.random() < 0.2:  # re-plan to a random total, sometimes one already past the decay's start
            low = step - 5 if step > 30 else step + 1  # later, sometimes out of time (a total <= step)
            new = replan(step, plan, int(rng.integers(low, step + 150)), sched)
            assert lr_factor(step, new.total, sched, new.anchor) == pytest.approx(
                lr_factor(step, plan.total, sched, plan.anchor), abs=1e-12), (step, plan, new)
            plan = new
        if step >= sched.warmup_steps or plan.anchor is not None:  # where the decay sets the lr
            p = decay_progress(step, plan.total, sched, plan.anchor)
            assert p >= progress - 1e-12 or progress < 0, (step, plan)  # a decay never goes back
            progress = max(progress, p)
        lrs.append(lr_factor(step, plan.total, sched, plan.anchor))
        step += 1
    assert np.all(np.diff(lrs[sched.warmup_steps:]) <= 1e-12)
    assert lrs[-1] < max(lrs)


def test_cosine_and_decay_branches_refuse_a_budget(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    for extra, words in (({"schedule.kind": "cosine"}, "cosine"), ({"run.decay_from": str(tmp_path)}, "decay_from")):
        with pytest.raises(TinylmError, match=words):
            setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "o", **extra)))


# ----- the loop with a fake clock ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def tiny_args(data: Path, out: Path, minutes: float = 0.25, **extra: object) -> dict[str, object]:
    return tiny_train_args(data, out, **{"model.n_layers": 1, "data.batch_tokens": 64, "run.minutes": minutes,
                                         "schedule.warmup_steps": 4, "schedule.decay_shape": "linear", **extra})


def fake_run(args: dict[str, object], step_s: Callable[[float], float], clock: FakeClock,
             stop_at: int | None = None):
    """setup + fit with the budget on `clock`; a step 'takes' step_s(now) (spread over its micro-batches);
    stop_at: a SIGINT arrives during that step (checkpoint, then KeyboardInterrupt)."""
    run = setup(load_config(TrainConfig, None, args))
    run.budget.clock = clock

    def loss(model, batch):
        clock.t += step_s(clock.t) / run.accum
        if stop_at is not None and run.step + 1 == stop_at:
            run.stop_signal = 2
        return lm_loss(model, batch)

    return run, fit(run, loss)


@pytest.mark.slow
def test_fit_on_a_fake_clock_ends_on_time_and_when_slowed(data: Path, tmp_path: Path) -> None:
    budget = 15.0  # 0.25 fake minutes at 0.25 s a step: ~60 steps
    clock = FakeClock()
    run, _ = fake_run(tiny_args(data, tmp_path / "steady"), lambda now: 0.25, clock)
    print(f"steady: {clock.t:.2f} s of {budget} in {run.step} steps")
    assert abs(clock.t - budget) <= 0.05 * budget
    lrs = [r["lr"] for r in read_metrics(tmp_path / "steady" / "metrics.jsonl")]
    check_wsd([x / 3e-3 for x in lrs], ScheduleSection(warmup_steps=4))
    slow = FakeClock()
    halved, _ = fake_run(tiny_args(data, tmp_path / "halved"), lambda now: 0.25 if now < 7.5 else 0.5, slow)
    print(f"halved: {slow.t:.2f} s of {budget} in {halved.step} steps")
    assert slow.t <= 1.10 * budget and halved.step < 0.85 * run.step


@pytest.mark.slow
def test_resumed_budget_counts_the_whole_run(data: Path, tmp_path: Path) -> None:
    args = tiny_args(data, tmp_path / "run", **{"run.resume": "auto"})
    first = FakeClock()
    with pytest.raises(KeyboardInterrupt):
        fake_run(args, lambda now: 0.25, first, stop_at=30)
    ckpt = latest_checkpoint(tmp_path / "run")
    info = json.loads((ckpt / "train_state" / "state.json").read_text())
    assert info["step"] == 30 and info["budget"]["spent_s"] == pytest.approx(first.t)
    second = FakeClock()
    run, _ = fake_run(args, lambda now: 0.25, second)
    print(f"{first.t:.2f} + {second.t:.2f} s of 15 in {run.step} steps")
    assert abs(first.t + second.t - 15.0) <= 0.05 * 15.0
    resumed = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] == 31][-1]
    anchor = tuple(info["budget"]["anchor"]) if info["budget"]["anchor"] else None
    assert resumed["lr"] == pytest.approx(3e-3 * lr_factor(30, info["total_steps"], ScheduleSection(
        warmup_steps=4, decay_fraction=0.25, decay_shape="linear"), anchor))  # the saved plan goes on


@pytest.mark.slow
def test_a_real_short_run_completes_decayed(data: Path, tmp_path: Path) -> None:
    # the real clock: no timing assertion, only that the run ends and its last step's lr is decayed
    out = tmp_path / "real"
    fit(setup(load_config(TrainConfig, None, tiny_args(data, out, minutes=0.05))))
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    print(f"{len(lrs)} steps; lr {lrs[0]:.2e} ... {lrs[-1]:.2e}")
    assert (out / "final" / "model.safetensors").is_file()
    assert lrs[-1] < max(lrs) and math.isfinite(lrs[-1])
