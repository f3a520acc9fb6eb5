"""The automatic recipe of train.rules against its written-out formulas (DeepSeek LLM's batch and lr power
laws with the coefficients the speedrun sweep fitted, Muennighoff et al.'s repeated-data discount), and the
properties a budget rule must have."""

from __future__ import annotations

import math

import pytest

from tinylm.train import rules
from tinylm.train.rules import auto_recipe, effective_tokens, expected_tokens_per_s


def test_recipe_is_the_documented_formula() -> None:
    # 5 minutes at 10k tokens/s of a model of 6e6 training FLOPs per token, on 1M tokens of text
    r = auto_recipe(data_tokens=1_000_000, budget_s=300, tokens_per_s=10_000, flops_per_token=6e6, seq_len=256)
    d = 3e6  # tokens: three epochs of the data, two of them repeats
    d_eff = 1e6 + 1e6 * 15.4 * (1 - math.exp(-2 / 15.4))
    c = 6e6 * d_eff
    rows = max(1, min(round(0.06708 * c**0.3271 / 256), int(d / 200 // 256)))
    assert r.run_tokens == d and r.effective_tokens == pytest.approx(d_eff) and r.compute == pytest.approx(c)
    assert r.batch_tokens == (rows if rows <= 8 else rows - rows % 8) * 256
    assert r.lr == pytest.approx(0.02978 * c**-0.125)
    assert r.warmup_steps == min(200, max(1, round(0.02 * d / r.batch_tokens)))
    assert r.decay_fraction == 0.2
    print(r)


def test_repeats_are_discounted() -> None:
    assert effective_tokens(5e5, 1e6) == 5e5  # fresh data: every token counts
    values = [effective_tokens(d, 1e6) for d in (1e6, 2e6, 1e7, 1e8, 1e10)]
    assert values == sorted(values) and all(v <= d for v, d in zip(values, (1e6, 2e6, 1e7, 1e8, 1e10)))
    assert values[-1] == pytest.approx(1e6 * (1 + rules.REPEAT_DECAY), rel=1e-6)  # the ceiling U (1 + R*)
    small, big = (auto_recipe(data, 600, 10_000, 6e6, 128) for data in (1e5, 1e8))
    assert small.lr > big.lr  # the same budget on little data is less compute: a higher lr, a smaller batch
    assert small.batch_tokens <= big.batch_tokens


@pytest.mark.parametrize("seq_len", [64, 256])
def test_longer_budgets_get_lower_lr_bigger_batches_and_enough_steps(seq_len: int) -> None:
    recipes = [auto_recipe(10**9, minutes * 60, 10_000, 6e6, seq_len) for minutes in (1, 2, 5, 20, 120)]
    lrs = [r.lr for r in recipes]
    assert lrs == sorted(lrs, reverse=True)
    batches = [r.batch_tokens for r in recipes]
    assert batches == sorted(batches) and all(b % seq_len == 0 and b >= seq_len for b in batches)
    for r in recipes:
        assert r.run_tokens / r.batch_tokens >= rules.MIN_STEPS or r.batch_tokens == seq_len
        assert 1 <= r.warmup_steps <= rules.WARMUP_MAX
        rows = r.batch_tokens // seq_len
        assert rows <= rules.ROW_MULTIPLE or rows % rules.ROW_MULTIPLE == 0  # whole micro-batches, never prime


def test_expected_speed_is_the_assumed_share_of_the_peak() -> None:
    assert expected_tokens_per_s(1e11, 5e6) == pytest.approx(rules.ASSUMED_MFU * 2e4)


def test_a_budget_long_for_its_data_is_capped_at_max_epochs() -> None:
    # 20 minutes at 10k tokens/s on 120K tokens would read 100 epochs: capped at 1 + R* of them
    long = auto_recipe(data_tokens=120_000, budget_s=1200, tokens_per_s=10_000, flops_per_token=6e6, seq_len=256)
    cap = math.ceil((1 + 15.4) * 120_000)
    assert long.token_cap == cap and long.run_tokens == cap and long.overrides()["schedule.tokens"] == cap
    assert long.effective_tokens == pytest.approx(120_000 * (1 + 15.4 * (1 - math.exp(-1))))  # R = R* repeats
    for minutes in (40, 600):  # a longer budget changes nothing once capped
        assert auto_recipe(120_000, minutes * 60, 10_000, 6e6, 256) == long
    short = auto_recipe(data_tokens=120_000, budget_s=60, tokens_per_s=10_000, flops_per_token=6e6, seq_len=256)
    assert short.token_cap is None and "schedule.tokens" not in short.overrides()  # 5 epochs: the whole budget
