"""bf16 training on a CPU with bf16 matrix units: when `run.dtype auto` picks it, attention kept in fp32
under CPU autocast, and the compiled loss of compiled models (against eager F.cross_entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

import tinylm.core.devices as devices
import tinylm.train.loop as loop
from tinylm.data.tokens import IGNORE_INDEX
from tinylm.model.llama import Attention
from tinylm.train.losses import _compiled_nll, _nll

CPU = torch.device("cpu")


@pytest.mark.parametrize("units", [False, True])
def test_auto_dtype_is_bf16_exactly_where_the_cpu_has_bf16_units(monkeypatch: pytest.MonkeyPatch,
                                                                  units: bool) -> None:
    monkeypatch.setattr(loop, "cpu_bf16_units", lambda: units)
    big, small = loop.BF16_CPU_MIN_PARAMS, loop.BF16_CPU_MIN_PARAMS - 1
    assert loop._amp_dtype("auto", CPU, big) == (torch.bfloat16 if units else None)
    assert loop._amp_dtype("auto", CPU, small) is None  # too small to gain from bf16
    assert loop._amp_dtype("float32", CPU, big) is None  # an explicit choice is kept either way
    assert loop._amp_dtype("bfloat16", CPU, small) == torch.bfloat16


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("avx512_bf16", [False, True])
def test_bf16_units_are_avx512_bf16_with_or_without_amx(monkeypatch: pytest.MonkeyPatch, amx: bool,
                                                       avx512_bf16: bool) -> None:
    """An AMD EPYC with AVX512-BF16 and no AMX steps 1.99x faster in bf16 (BENCHMARKS.md): auto picks it there."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert devices.cpu_bf16_units() is avx512_bf16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert devices.cpu_bf16_units() is False  # a torch without the check


def test_cpu_autocast_attends_in_fp32_and_matches_fp32_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    seen = []
    attend = Attention._attend

    def spy(self, q, k, v, mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(self, q, k, v, mask)

    monkeypatch.setattr(Attention, "_attend", spy)
    with torch.no_grad():
        want = model(ids)
        assert seen and all(d == (torch.float32,) * 3 for d in seen)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids)
    assert seen and all(d == (torch.float32,) * 3 for d in seen)  # not bf16, though q, k, v were projected in bf16
    assert got.dtype == torch.bfloat16  # the projections and the head did run in bf16
    err = (got.float() - want).abs().max().item()
    assert 0 < err < 0.05 * want.abs().max().item()  # bf16 rounding, nothing more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_loss_equals_eager_cross_entropy(dtype: torch.dtype, reduction: str) -> None:
    logits = (3 * torch.randn(40, 64)).to(dtype)
    targets = torch.randint(0, 64, (40,))
    targets[::7] = IGNORE_INDEX
    losses, grads = [], []
    for fn in (_compiled_nll(), lambda x, t, r: F.cross_entropy(x.float(), t, ignore_index=IGNORE_INDEX, reduction=r),
               _nll):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, reduction)
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad.float())
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(losses[0], loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert grads[0][::7].abs().max() == 0  # ignored targets: no gradient
