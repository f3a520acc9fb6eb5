"""A wall-clock budget for a training run (`run.minutes`): plan the steps, then re-plan while running.

The run starts with a provisional length (schedule.steps / schedule.tokens if given, which stay a cap,
else unbounded); after a probe of its first steps the planner measures the seconds per token of a
training step and the seconds spent between steps (validation, checkpoints, logging), and sets the
total so that warmup + stable + decay end when the budget does. Every `replan` of the budget it measures
again over the steps since the last plan and re-plans, so a machine that slows down starts its decay
earlier (or shortens a decay already under way) instead of overrunning, and one that speeds up trains
longer.

The schedule stays a valid WSD: while the run is in its stable phase a new total only moves the start
of the decay (the lr is the peak either way); once the decay has begun, a new total re-anchors it
(`schedule.decay_progress`): its progress goes on from where it is, linearly to 1 at the new end, so
the lr is continuous and never rises again.

The budget counts the whole run, over every resume: a checkpoint records the seconds trained so far
(`state`) and a resumed run has the rest. The first step of each session is timed but not used as a
rate (it compiles). Clocks are injectable (`clock`), so tests drive the planner deterministically.

Written by hand: no training library plans a WSD run by wall-clock (nanoGPT, litgpt and torchtune stop
at a step count; HF Trainer's max_time stops abruptly, without a decay).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from tinylm.core.errors import TinylmError
from tinylm.train.config import ScheduleSection
from tinylm.train.schedule import Anchor, BatchRamp, decay_progress

# The planner's constants (not fitted: a re-plan every 2% of the budget reacts to a slowdown within
# ~1% of the budget's time; the first plan comes after 3 steps, the first of which compiles).
REPLAN_FRACTION = 0.02
PROBE_STEPS = 3
UNBOUNDED = 2**40  # the provisional total before the first plan: far beyond any decay start
RATE_STEPS = 16  # a rate is the median of at least this many steps (fewer only in the probe)
TAIL = 2  # steps a run out of time still takes: its decay's last two (the second's lr is below the peak)


@dataclass
class Plan:
    """What the planner decides: the run's total steps and, once its decay was re-planned, the anchor."""

    total: int
    anchor: Anchor | None = None


def replan(step: int, plan: Plan, new_total: int, sched: ScheduleSection) -> Plan:
    """The plan that ends at `new_total` instead, keeping the lr of steps < `step` and its continuity.

    Before the decay: the new total (its decay starts at new_total - round(f * new_total), or now if that
    is already past, anchored at progress 0). In the decay: anchored at the current progress.
    Out of time (new_total <= step): the run ends within TAIL more steps, its decay squeezed into them
    (begun now if it had not begun), so that however late a run is, its last step's lr is decayed.

    Args:
        step: the next optimizer step (0-based); steps before it are done.
        plan: the current plan.
        new_total: the total wanted; `step` or less: no time left.
        sched: the schedule section (kind, decay_fraction).
    """
    out_of_time = new_total <= step
    if out_of_time:
        new_total = min(plan.total, step + TAIL)
    if new_total == plan.total or sched.kind != "wsd":
        return Plan(new_total, plan.anchor)
    p = decay_progress(step, plan.total, sched, plan.anchor)
    if plan.anchor is None and step < sched.warmup_steps:
        p = min(p, -1.0)  # an unanchored decay does not reach into the warmup's lr (lr_factor): not begun
    if p < 0:  # stable phase: only the decay's start moves
        if not out_of_time and decay_progress(step, new_total, sched) < 0:
            return Plan(new_total)
        p = 0.0  # the new decay would have begun already: it begins now
    return Plan(new_total, (step, min(p, 1.0)))


@dataclass
class Budget:
    """The measurements and plan of one budgeted run.

    Args:
        seconds: the whole budget.
        ramp: the run's batch sizes (tokens per step).
        sched: the schedule section.
        cap: the most steps (schedule.steps / schedule.tokens), or None.
        end_tokens: the work after the last step (the final validation), in training-token equivalents.
        clock: seconds, monotonic (time.perf_counter; a fake one in tests).
        spent: seconds trained in earlier sessions of this run (a resume).
        min_total: the fewest steps, whatever the budget (the quickstart's model always trains some).
    """

    seconds: float
    ramp: BatchRamp
    sched: ScheduleSection
    cap: int | None = None
    end_tokens: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    spent: float = 0.0
    min_total: int = 1
    replan_s: float = field(init=False)
    _t0: float | None = field(default=None, init=False)
    _step_t: float = field(default=0.0, init=False)
    _last_end: float | None = field(default=None, init=False)
    _last_plan: float | None = field(default=None, init=False)
    _steps: int = field(default=0, init=False)  # steps this session
    _final: bool = field(default=False, init=False)  # out of time: the plan's tail is fixed
    _window: list[float] = field(default_factory=list, init=False)  # seconds per token of each step since the plan
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_STEPS), init=False)  # the same, last steps
    _gaps: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0], init=False)  # sum, count, max

    def __post_init__(self) -> None:
        self.replan_s = REPLAN_FRACTION * self.seconds

    def elapsed(self) -> float:
        """Seconds of the budget used so far, earlier sessions included."""
        return self.spent + (0.0 if self._t0 is None else self.clock() - self._t0)

    def step_started(self) -> None:
        now = self.clock()
        if self._t0 is None:
            self._t0 = self._last_plan = now
        if self._last_end is not None:  # the time between two steps: validation, checkpoints, logging
            gap = now - self._last_end
            self._gaps = [self._gaps[0] + gap, self._gaps[1] + 1, max(self._gaps[2], gap)]
        self._step_t = now

    def step_done(self, step: int, plan: Plan) -> Plan:
        """Record optimizer step `step - 1` (just done) and return the plan, re-planned when it is time.

        Args:
            step: the steps done now.
            plan: the current plan.
        """
        now = self.clock()
        self._steps += 1
        self._last_end = now
        if self._steps > 1:  # the first step of a session compiles: no rate from it
            tokens = self.ramp.tokens_at(step) - self.ramp.tokens_at(step - 1)
            self._window.append((now - self._step_t) / max(tokens, 1))
            self._recent.append(self._window[-1])
        if self._final or self._steps < PROBE_STEPS or (self._steps > PROBE_STEPS
                                                        and now - self._last_plan < self.replan_s):
            return plan
        self._last_plan = now
        total = self.total_for(step)
        self._final, self._window = total <= step, []
        return replan(step, plan, total, self.sched)

    def total_for(self, step: int) -> int:
        """The largest total whose remaining steps, at the measured rates, end within the budget."""
        # the median step since the last plan (or of the last RATE_STEPS, if fewer), not the mean: one
        # stalled step (a recompile when the batch shape changes under batch-size warmup: 44 s of a 5-minute
        # run) is time spent, which elapsed() counts, not a rate; taken as a rate it started the decay at a
        # fifth of the run
        rates = self._window if len(self._window) >= RATE_STEPS else self._recent
        s_per_token = statistics.median(rates) if rates else 0.0
        gap = self._gaps[0] / self._gaps[1] if self._gaps[1] else 0.0
        left = self.seconds - self.elapsed() - max(self._gaps[2], self.end_tokens * s_per_token)

        def cost(total: int) -> float:
            return (self.ramp.tokens_at(total) - self.ramp.tokens_at(step)) * s_per_token + (total - step) * gap

        if cost(step + 1) > left:  # not one more step fits (replan ends the run within TAIL steps)
            return max(step, min(self.min_total, self.cap or self.min_total))
        hi = step + 1
        while cost(hi) <= left and hi < UNBOUNDED:  # exponential search, then bisection
            hi = step + 2 * (hi - step)
        lo = step + 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
        lo = max(lo, self.min_total)
        return min(lo, self.cap) if self.cap is not None else lo

    def state(self, anchor: Anchor | None) -> dict[str, Any]:
        """What a checkpoint records (train_state/state.json "budget")."""
        return {"minutes": self.seconds / 60, "spent_s": self.elapsed(),
                "anchor": list(anchor) if anchor is not None else None}


def read_budget_state(info: dict[str, Any]) -> tuple[float, Anchor | None] | None:
    """(seconds spent, decay anchor) from a checkpoint's state.json, None if it has no budget; a
    malformed entry is a one-line error."""
    b = info.get("budget")
    if b is None:
        return None
    ok = (isinstance(b, dict) and _real(b.get("spent_s")) and b["spent_s"] >= 0
          and (b.get("anchor") is None or (isinstance(b["anchor"], list) and len(b["anchor"]) == 2
                                           and all(map(_real, b["anchor"])))))
    if not ok:
        raise TinylmError(f"budget must be {{\"spent_s\": seconds, \"anchor\": [step, progress] or null}}, got {b!r}")
    anchor = b.get("anchor")
    return float(b["spent_s"]), (int(anchor[0]), float(anchor[1])) if anchor is not None else None


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_budget(cfg: Any) -> None:
    """The checks across sections of run.minutes."""
    if cfg.run.minutes is None:
        return
    if cfg.schedule.kind == "cosine":
        raise TinylmError("run.minutes needs schedule.kind wsd or constant (a cosine's lr depends on the "
                          "total at every step, which the budget re-plans)")
    if cfg.run.decay_from:
        raise TinylmError("run.minutes and run.decay_from do not go together (a decay branch has its own length)")
