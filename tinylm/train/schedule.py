"""Learning-rate schedules: WSD (MiniCPM), cosine, constant; WSD decay branches."""

from __future__ import annotations

import math

from tinylm.core.errors import TinylmError
from tinylm.train.config import ScheduleSection

# ----- learning-rate schedules ---------------------------------------------------------------------

def decay_steps(total: int, fraction: float) -> int:
    """Length of the WSD decay phase: round(fraction * total), at least 1."""
    return max(1, round(fraction * total))


def lr_factor(step: int, total: int, sched: ScheduleSection) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak.

    warmup (all kinds): (step + 1) / warmup_steps while step < warmup_steps.
    constant: 1.
    cosine: m + (1 - m) * (1 + cos(pi * p)) / 2, p = (step - W) / (total - W) (Loshchilov & Hutter 2017).
    wsd (MiniCPM, Hu et al. 2024, sec. 4): 1 until the decay starts at D0 = total - round(f * total),
        then with p = (step - D0) / round(f * total): exponential m ** p, linear 1 - (1 - m) p,
        1-sqrt m + (1 - m)(1 - sqrt(p)) (Hagele et al. 2024, sec. 3).

    Args:
        step: optimizer step, 0-based.
        total: number of steps of the run.
        sched: the schedule section (kind, warmup_steps, decay_fraction, decay_shape, min_lr_ratio).
    """
    w, m = sched.warmup_steps, sched.min_lr_ratio
    if step < w:
        return (step + 1) / w
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "cosine":
        p = (step - w) / max(1, total - w)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    d = decay_steps(total, sched.decay_fraction)
    p = (step - (total - d)) / d
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


def planned_steps(s: ScheduleSection, tokens_per_step: int) -> int:
    """The run's optimizer steps: schedule.steps, or schedule.tokens over the tokens of a global batch.

    Args:
        s: the schedule section (exactly one of steps and tokens set).
        tokens_per_step: rows per global batch times seq_len.
    """
    if (s.steps is None) == (s.tokens is None):
        raise TinylmError("set exactly one of schedule.steps and schedule.tokens")
    total = s.steps if s.steps is not None else math.ceil(s.tokens / tokens_per_step)
    if total < 1:
        raise TinylmError("the schedule has no steps; raise schedule.steps or schedule.tokens")
    return total
