"""The automatic recipe for a time budget on a user's own text: batch size, peak lr, warmup and decay.

One function, `auto_recipe`, holds every rule, so that the constants below can be refitted in one place.
The forms are published fits (named beside each); the batch and lr coefficients are refitted to tinylm
by the speedrun sweep (`bench/speedrun.py --sweep`, BENCHMARKS.md "The automatic recipe"): the
best batch and peak lr of a batch x lr grid on real text (CPython's documentation, 120K tokens, the
quickstart's 1m model) at 2 and 5 minutes, the exponents kept. DeepSeek LLM's own coefficients, fitted
at 1e17-3e20 FLOPs, chose 10x the best lr and 2-4x the best batch at this scale (1e12-1e13 FLOPs): 33-50%
worse bits per byte.

The rules, for a run of D tokens (the budget's seconds times the expected tokens per second) on U tokens
of data, with a model of M training FLOPs per token:
  1. repeated data is worth less: the effective tokens are D' = D while D <= U, else
     D' = U + U R* (1 - exp(-R / R*)), R = D / U - 1 epochs repeated (Muennighoff et al. 2023, eq. 5);
  2. the compute is C = M D' (DeepSeek LLM's C = M D, Bi et al. 2024, sec. 3.1);
  3. batch B = b C^0.3271 tokens and peak lr a C^-0.125 (the exponents of DeepSeek LLM, eq. 1; b and a
     fitted by the sweep), the batch in whole rows (the nearest count; a multiple of ROW_MULTIPLE rows
     above it), at least one, and small enough to leave MIN_STEPS optimizer steps;
  4. warmup: WARMUP_FRACTION of the steps (at least 1, at most WARMUP_MAX); decay: the last
     DECAY_FRACTION of the steps (a 20% cool-down matches a cosine run, Hagele et al. 2024, sec. 4);
  5. the run reads at most MAX_EPOCHS = 1 + R* epochs of the data (a token cap, schedule.tokens, that
     ends the run and its decay before the budget does): in rule 1's fit, repeats past R* add little
     (D' reaches 63% of its ceiling U (1 + R*) there), and on a small text they cost: the sweep's 20-minute
     runs on 120K tokens reached their lowest val loss at 16-20 epochs and rose after, so a budget that
     is long for its data trains this far, decays, and stops.
The expected tokens per second come from the measured matmul peak: ASSUMED_MFU of it, over M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- constants (see the module docstring for where each comes from) --------------------------------------
REPEAT_DECAY = 15.4  # R*, Muennighoff et al. 2023 (Table 2's fit)
# B_opt = BATCH_COEF C^BATCH_EXP tokens, lr_opt = LR_COEF C^LR_EXP: DeepSeek LLM's exponents (eq. 1; its
# coefficients are 0.2920 and 0.3118); the coefficients are the speedrun sweep's fit, the geometric mean
# over 2 and 5 minutes of the coefficient that puts each budget on its best grid point (1,024 tokens, 7.5e-4)
BATCH_COEF, BATCH_EXP = 0.06708, 0.3271
LR_COEF, LR_EXP = 0.02978, -0.1250
MIN_STEPS = 200  # the batch shrinks below B_opt so that a short budget still has this many steps
ROW_MULTIPLE = 8  # above this many rows the batch is a multiple of it (a prime row count would force
#                   micro-batches of one row: 19 rows ran as 19 one-row passes, several times slower a token)
WARMUP_FRACTION, WARMUP_MAX = 0.02, 200  # a short warmup (modded-nanogpt's speedruns warm up briefly)
DECAY_FRACTION = 0.2  # Hagele et al. 2024, sec. 4
MAX_EPOCHS = 1 + REPEAT_DECAY  # rule 5: the epochs of the data a run reads at most
ASSUMED_MFU = 0.5  # the quickstart's 1m model trained at 48-72% of the measured fp32 matmul peak (BENCHMARKS.md)


@dataclass
class AutoRecipe:
    """What the rules chose, with the figures they chose it from."""

    batch_tokens: int  # data.batch_tokens
    lr: float  # optim.lr
    warmup_steps: int  # schedule.warmup_steps
    decay_fraction: float  # schedule.decay_fraction
    run_tokens: float  # D: the tokens the budget is expected to train on (at most MAX_EPOCHS of the data)
    effective_tokens: float  # D': those tokens with repeats discounted
    compute: float  # C = M D', FLOPs
    token_cap: int | None = None  # schedule.tokens: MAX_EPOCHS of the data, when the budget would read more

    def overrides(self) -> dict[str, object]:
        """The recipe keys these set (schedule.tokens only when the run is capped)."""
        cap = {} if self.token_cap is None else {"schedule.tokens": self.token_cap}
        return {"data.batch_tokens": self.batch_tokens, "optim.lr": self.lr,
                "schedule.warmup_steps": self.warmup_steps, "schedule.decay_fraction": self.decay_fraction, **cap}


def expected_tokens_per_s(peak_flops: float, flops_per_token: float) -> float:
    """Training tokens per second at ASSUMED_MFU of a measured matmul peak (core.devices.measure_peak_flops).

    Args:
        peak_flops: FLOP/s.
        flops_per_token: training FLOPs per token (ModelConfig.flops_per_token(seq_len, training=True)).
    """
    return ASSUMED_MFU * peak_flops / flops_per_token


def effective_tokens(run_tokens: float, data_tokens: float) -> float:
    """D' of rule 1: the worth of `run_tokens` tokens read from `data_tokens` unique ones."""
    if run_tokens <= data_tokens:
        return run_tokens
    repeats = run_tokens / data_tokens - 1
    return data_tokens + data_tokens * REPEAT_DECAY * (1 - math.exp(-repeats / REPEAT_DECAY))


def auto_recipe(data_tokens: int, budget_s: float, tokens_per_s: float, flops_per_token: float,
                seq_len: int) -> AutoRecipe:
    """Batch size, peak lr, warmup and decay for a budget on some data, by the rules of this module.

    Args:
        data_tokens: U, the training split's tokens.
        budget_s: seconds of training.
        tokens_per_s: the expected training speed (`expected_tokens_per_s`).
        flops_per_token: M, training FLOPs per token.
        seq_len: tokens per row (the batch is whole rows).
    """
    run_tokens = max(budget_s * tokens_per_s, float(seq_len))
    cap = max(math.ceil(MAX_EPOCHS * data_tokens), seq_len)
    token_cap = cap if run_tokens > cap else None
    run_tokens = min(run_tokens, float(cap))
    d_eff = effective_tokens(run_tokens, max(data_tokens, 1))
    compute = flops_per_token * d_eff
    rows = max(1, min(round(BATCH_COEF * compute**BATCH_EXP / seq_len), int(run_tokens / MIN_STEPS // seq_len)))
    if rows > ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    batch_tokens = rows * seq_len
    steps = max(1.0, run_tokens / batch_tokens)
    warmup = min(WARMUP_MAX, max(1, round(WARMUP_FRACTION * steps)))
    return AutoRecipe(batch_tokens, LR_COEF * compute**LR_EXP, warmup, DECAY_FRACTION, run_tokens, d_eff, compute,
                      token_cap)


def micro_batch(rows: int, most: int) -> int:
    """The largest micro-batch of at most `most` rows that divides a batch of `rows` rows evenly."""
    return max(m for m in range(1, min(most, rows) + 1) if rows % m == 0)
