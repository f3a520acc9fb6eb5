"""Learning-rate schedules: WSD (MiniCPM), cosine, constant; WSD decay branches; batch-size warmup."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass

from tinylm.core.errors import TinylmError
from tinylm.train.config import ScheduleSection

# ----- learning-rate schedules ---------------------------------------------------------------------

def decay_steps(total: int, fraction: float) -> int:
    """Length of the WSD decay phase: round(fraction * total), at least 1."""
    return max(1, round(fraction * total))


Anchor = tuple[int, float]  # (step, decay progress there): a WSD decay re-planned mid-way (train.budget)


def decay_progress(step: int, total: int, sched: ScheduleSection, anchor: Anchor | None = None) -> float:
    """How far a WSD decay is at optimizer step `step`: < 0 before it starts, 0 at its start, 1 at `total`.

    Without an anchor the decay is the last round(decay_fraction * total) steps. With one, (s, p): the
    decay was re-planned at step s, where its progress was p, to end at `total` instead, so from s on the
    progress runs linearly from p to 1 (continuous, never back: a budgeted run shortens or stretches the
    rest of its decay when its speed changes; train.budget).

    Args:
        step: optimizer step, 0-based.
        total: number of steps of the run.
        sched: the schedule section (decay_fraction).
        anchor: (step, progress) of the last re-plan inside the decay, or None.
    """
    if anchor is not None:
        s, p = anchor
        return p + (1 - p) * (step - s) / max(1, total - s)
    d = decay_steps(total, sched.decay_fraction)
    return (step - (total - d)) / d


def lr_factor(step: int, total: int, sched: ScheduleSection, anchor: Anchor | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak.

    warmup (all kinds): (step + 1) / warmup_steps while step < warmup_steps.
    constant: 1.
    cosine: m + (1 - m) * (1 + cos(pi * p)) / 2, p = (step - W) / (total - W) (Loshchilov & Hutter 2017).
    wsd (MiniCPM, Hu et al. 2024, sec. 4): 1 until the decay starts at D0 = total - round(f * total),
        then with p = (step - D0) / round(f * total): exponential m ** p, linear 1 - (1 - m) p,
        1-sqrt m + (1 - m)(1 - sqrt(p)) (Hagele et al. 2024, sec. 3); p is `decay_progress`.

    Args:
        step: optimizer step, 0-based.
        total: number of steps of the run.
        sched: the schedule section (kind, warmup_steps, decay_fraction, decay_shape, min_lr_ratio).
        anchor: a WSD decay re-planned mid-way (see decay_progress).
    """
    w = sched.warmup_steps
    if step < w:  # a decay re-planned to begin inside the warmup scales it (a budget that ran out early)
        return (step + 1) / w * (1.0 if anchor is None else _after_warmup(step, total, sched, anchor))
    return _after_warmup(step, total, sched, anchor)


def _after_warmup(step: int, total: int, sched: ScheduleSection, anchor: Anchor | None) -> float:
    w, m = sched.warmup_steps, sched.min_lr_ratio
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "cosine":
        p = (step - w) / max(1, total - w)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    p = decay_progress(step, total, sched, anchor)
    if p < 0:
        return 1.0
    p = min(p, 1.0)
    if sched.decay_shape == "exponential":
        return m ** p
    if sched.decay_shape == "linear":
        return 1 - (1 - m) * p
    return m + (1 - m) * (1 - math.sqrt(p))


def branch_total(start: int, fraction: float) -> int:
    """Total steps of the WSD run whose decay starts at step `start`: the smallest S with
    S - round(fraction * S) == start, so a decay branch from a stable checkpoint at `start` follows
    exactly the schedule of a straight run of S steps.

    Args:
        start: the step of the stable-phase checkpoint.
        fraction: schedule.decay_fraction.
    """
    total = start + 1
    while total - decay_steps(total, fraction) < start:
        total += 1
    if total - decay_steps(total, fraction) != start:
        raise TinylmError(f"no WSD run with decay_fraction {fraction} starts its decay at step {start}")
    return total


def _check_schedule(s: ScheduleSection) -> None:
    """The checks across fields; each field's own range is declared in ScheduleSection."""
    if s.kind == "wsd" and s.decay_shape == "exponential" and s.min_lr_ratio <= 0:
        raise TinylmError(f"schedule.min_lr_ratio must be > 0 for schedule.decay_shape exponential, "
                          f"got {s.min_lr_ratio}")


def planned_steps(s: ScheduleSection, tokens_per_step: int, ramp: BatchRamp | None = None) -> int:
    """The run's optimizer steps: schedule.steps, or schedule.tokens over the tokens of a global batch.

    Args:
        s: the schedule section (exactly one of steps and tokens set).
        tokens_per_step: rows per global batch times seq_len.
        ramp: a batch-size warmup, whose small first batches take more steps to read schedule.tokens.
    """
    if (s.steps is None) == (s.tokens is None):
        raise TinylmError("set exactly one of schedule.steps and schedule.tokens")
    if s.steps is not None:
        total = s.steps
    elif ramp is not None:
        total = ramp.steps_for(s.tokens)
    else:
        total = math.ceil(s.tokens / tokens_per_step)
    if total < 1:
        raise TinylmError("the schedule has no steps; raise schedule.steps or schedule.tokens")
    return total


# ----- batch-size warmup -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchRamp:
    """The global batch of every step under batch-size warmup (data.batch_warmup_tokens).

    The batch grows linearly with the tokens already read, from `start` of the full batch to all of it
    over the first `tokens` tokens (GPT-3's batch ramp, Brown et al. 2020, sec. 2.3 and app. B, grows it
    linearly over the first few billion tokens), in whole rows, a multiple of the process count.
    A pure function of the config: a resumed run reads the same batches.

    Args:
        rows: rows of the full global batch.
        seq_len: tokens per row.
        ramp: rows of the global batch of each step before the full batch is reached.
    """

    rows: int
    seq_len: int
    ramp: tuple[int, ...] = ()

    @classmethod
    def make(cls, rows: int, seq_len: int, world: int, tokens: int, start: float) -> BatchRamp:
        """The ramp over `tokens` tokens from `start` * rows (0 tokens: no ramp)."""
        ramp, seen, first = [], 0, rows * start
        while seen < tokens:
            r = max(world, int(first + (rows - first) * seen / tokens) // world * world)
            if r >= rows:
                break
            ramp.append(r)
            seen += r * seq_len
        return cls(rows, seq_len, tuple(ramp))

    def rows_at(self, step: int) -> int:
        """Rows of the global batch of optimizer step `step` (0-based)."""
        return self.ramp[step] if step < len(self.ramp) else self.rows

    def tokens_at(self, step: int) -> int:
        """Tokens read by steps [0, step)."""
        ramped = min(step, len(self.ramp))
        head = self._cumulative[ramped - 1] if ramped else 0
        return head * self.seq_len + max(0, step - len(self.ramp)) * self.rows * self.seq_len

    @functools.cached_property
    def _cumulative(self) -> list[int]:  # rows read by the ramp's first i + 1 steps
        return list(itertools.accumulate(self.ramp))

    def steps_for(self, tokens: int) -> int:
        """The fewest steps that read at least `tokens` tokens."""
        rows = math.ceil(tokens / self.seq_len)
        if self.ramp and rows <= self._cumulative[-1]:
            return bisect.bisect_left(self._cumulative, rows) + 1
        done = self._cumulative[-1] if self.ramp else 0
        return len(self.ramp) + math.ceil((rows - done) / self.rows)
