"""Packed rows: several examples in one row, positions restarting per example and attention kept inside
it. Each packed example against the same example run alone (ours and HF's LlamaForCausalLM), and against
HF given the same position ids and 4D block mask; packed losses and gradients against per-example ones;
padding; the unpacked forward left as it was; masked, packed weighting across micro-batches and ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import hf_model, tiny_model

import tinylm.model.llama as llama
from tinylm.data.tokens import Batch
from tinylm.model.llama import packed_layout
from tinylm.train.config import DataSection, RunSection, ScheduleSection, TrainConfig
from tinylm.train.losses import lm_loss

VOCAB = 97  # tiny_config's


def pack(examples: list[torch.Tensor], width: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: the examples side by side, then padding (segment -1) up to width."""
    tokens = torch.full((width,), pad_id, dtype=torch.long)
    segments = torch.full((width,), -1, dtype=torch.long)
    at = 0
    for i, ex in enumerate(examples):
        tokens[at:at + len(ex)], segments[at:at + len(ex)] = ex, i
        at += len(ex)
    return tokens, segments


def draw_examples(rng: np.random.Generator, lengths: list[int]) -> list[torch.Tensor]:
    return [torch.from_numpy(rng.integers(3, VOCAB, n)) for n in lengths]


def spans(segments: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each non-padding run of a (T,) row."""
    out, start = [], 0
    for t in range(1, len(segments) + 1):
        if t == len(segments) or segments[t] != segments[start]:
            if segments[start] >= 0:
                out.append((start, t))
            start = t
    return out


# ----- the forward -------------------------------------------------------------------------------------

def test_packed_layout_positions_and_mask() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [5, 5, 2, 2, 5, -1]])  # a repeated id is a new run
    positions, mask = packed_layout(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 0, 0]]
    want = torch.zeros(2, 6, 6, dtype=torch.bool)
    for b, runs in enumerate([[(0, 3), (3, 5), (5, 6)], [(0, 2), (2, 4), (4, 5), (5, 6)]]):
        for s, e in runs:
            want[b, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0], want)


def test_packed_row_equals_each_example_alone_and_hf(rng: np.random.Generator) -> None:
    model = tiny_model(seed=4)
    ref = hf_model(model)
    ref.config._attn_implementation = "eager"  # HF's own softmax(QK^T + mask) V, not the SDPA kernel we call
    rows = [draw_examples(rng, [5, 9, 4]), draw_examples(rng, [7, 11])]
    packed = [pack(r, 21) for r in rows]
    tokens, segments = torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])  # (2, 21)
    positions, mask = packed_layout(segments)
    with torch.no_grad():
        ours = model(tokens, segments=segments)  # (2, 21, V)
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # (2, 1, 21, 21)
        theirs = ref(input_ids=tokens, attention_mask=bias, position_ids=positions).logits
        for b, examples in enumerate(rows):
            for ex, (s, e) in zip(examples, spans(segments[b])):
                alone = model(ex[None])[0]  # (n, V)
                torch.testing.assert_close(ours[b, s:e], alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ours[b, s:e], ref(input_ids=ex[None]).logits[0], atol=1e-5, rtol=1e-5)
    real = segments >= 0
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    # the test can fail: the same row read as one sequence gives other logits from the second example on
    with torch.no_grad():
        plain = model(tokens)
    assert (plain[0, 5:14] - ours[0, 5:14]).abs().max() > 1e-2


def test_padding_changes_no_other_logit_and_carries_no_loss(rng: np.random.Generator) -> None:
    model = tiny_model(seed=5)
    examples = draw_examples(rng, [6, 8])
    tokens, segments = pack(examples, 20)  # 6 padding tokens at the end
    segments = torch.cat([torch.full((3,), -1), segments[:-3]])  # and 3 at the start
    tokens = torch.cat([torch.zeros(3, dtype=torch.long), tokens[:-3]])
    other = tokens.clone()
    other[segments < 0] = torch.from_numpy(rng.integers(3, VOCAB, int((segments < 0).sum())))
    real = segments >= 0
    with torch.no_grad():
        a = model(tokens[None], segments=segments[None])[0]
        b = model(other[None], segments=segments[None])[0]
        torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)
        assert torch.isfinite(a).all()  # padding sees itself: no empty softmax
        batch = Batch(tokens[None], segments=segments[None])
        assert batch.weight == (6 - 1) + (8 - 1)  # no target from or into padding, none across examples
        loss, _ = lm_loss(model, batch)
        per_example = [lm_loss(model, Batch(ex[None]))[0] * (len(ex) - 1) for ex in examples]
    torch.testing.assert_close(loss, sum(per_example) / batch.weight, atol=1e-5, rtol=1e-5)


def test_forward_without_segments_is_the_plain_causal_path(monkeypatch: pytest.MonkeyPatch,
                                                           rng: np.random.Generator) -> None:
    model = tiny_model(seed=6)
    tokens = torch.from_numpy(rng.integers(0, VOCAB, (2, 17)))
    with torch.no_grad():
        one_example = model(tokens, segments=torch.zeros_like(tokens))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    def no_layout(segments: torch.Tensor) -> None:
        raise AssertionError("packed_layout called without segments")

    monkeypatch.setattr(llama.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(llama, "packed_layout", no_layout)
    with torch.no_grad():
        plain = model(tokens)
        again = model(tokens, segments=None)
    assert calls == [(None, True)] * (2 * model.config.n_layers)  # is_causal, no mask tensor
    assert torch.equal(plain, again)
    # one example filling the row is the plain forward, through the mask path
    torch.testing.assert_close(one_example, plain, atol=1e-5, rtol=1e-5)


# ----- losses and gradients ----------------------------------------------------------------------------

def packed_batch(rng: np.random.Generator, lengths: list[list[int]], width: int,
                 masked: bool) -> tuple[Batch, list[list[Batch]]]:
    """A packed batch, and each of its examples as a batch of its own (with the same part of the mask)."""
    rows, alone = [], []
    for row_lengths in lengths:
        examples = draw_examples(rng, row_lengths)
        masks = [torch.from_numpy(rng.random(len(ex) - 1) < 0.6) if masked else None for ex in examples]
        tokens, segments = pack(examples, width)
        mask = torch.zeros(width - 1, dtype=torch.bool)
        at = 0
        for ex, m in zip(examples, masks):
            mask[at:at + len(ex) - 1] = True if m is None else m
            at += len(ex)
        rows.append((tokens, segments, mask))
        alone.append([Batch(ex[None], mask=None if m is None else m[None]) for ex, m in zip(examples, masks)])
    tokens, segments, mask = (torch.stack(x) for x in zip(*rows))
    return Batch(tokens, mask=mask if masked else None, segments=segments), alone


@pytest.mark.parametrize("masked", [False, True], ids=["all-targets", "assistant-only"])
def test_packed_loss_per_example_equals_unpacked(rng: np.random.Generator, masked: bool) -> None:
    model = tiny_model(seed=7)
    batch, alone = packed_batch(rng, [[6, 9, 5], [12, 7]], 24, masked)
    with torch.no_grad():
        logits = model(batch.inputs, segments=batch.input_segments).float()  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")  # (B, T)
        for b, row in enumerate(alone):
            starts = [s for s, _ in spans(batch.segments[b])]
            for ex, s in zip(row, starts):
                n = ex.tokens.shape[1] - 1
                counted = batch.mask[b, s:s + n]
                assert torch.equal(counted, ex.mask[0] if masked else torch.ones(n, dtype=torch.bool))
                if counted.any():
                    packed_loss = nll[b, s:s + n][counted].sum() / counted.sum()
                    torch.testing.assert_close(packed_loss, lm_loss(model, ex)[0], atol=1e-5, rtol=1e-5)
                # the target from this example's last token into the next one's first never counts
                assert not batch.mask[b, s + n]
        total = sum(ex.weight for row in alone for ex in row)
        assert batch.weight == total
        want = sum(lm_loss(model, ex)[0] * ex.weight for row in alone for ex in row) / total
        torch.testing.assert_close(lm_loss(model, batch)[0], want, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_the_sum_of_per_example_gradients(rng: np.random.Generator) -> None:
    model = tiny_model(seed=8).train()
    batch, alone = packed_batch(rng, [[5, 8, 6], [10, 9]], 22, masked=True)
    # the loss is a mean over counted targets: weighted by its count it is the sum of per-target losses
    (lm_loss(model, batch)[0] * batch.weight).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for ex in (ex for row in alone for ex in row):
        (lm_loss(model, ex)[0] * ex.weight).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert max(float(g.abs().max()) for g in packed.values()) > 1e-3  # gradients that could differ


# ----- micro-batches and ranks -------------------------------------------------------------------------

ROWS, SEQ = 8, 16


def packed_source(step: int, start: int, count: int) -> Batch:
    """Rows of 1-4 packed examples with an assistant-only-like mask, each a pure function of (step, row)."""
    tokens, segments, masks = [], [], []
    for row in range(start, start + count):
        rng = np.random.default_rng([step, row])
        lengths = rng.integers(2, 9, rng.integers(1, 5))
        lengths = lengths[np.cumsum(lengths) <= SEQ + 1]
        t, s = pack(draw_examples(rng, list(lengths)), SEQ + 1)
        tokens.append(t)
        segments.append(s)
        masks.append(torch.from_numpy(rng.random(SEQ) < 0.5))
    return Batch(torch.stack(tokens), step * ROWS + start, mask=torch.stack(masks), segments=torch.stack(segments))


def _config(micro: int, out: Path) -> TrainConfig:
    return TrainConfig(data=DataSection(seq_len=SEQ, batch_tokens=ROWS * SEQ, micro_batch=micro),
                       schedule=ScheduleSection(kind="constant", steps=3, warmup_steps=1),
                       run=RunSection(device="cpu", compile=False, out=str(out)))


def _steps(run) -> list[list[float]]:
    from tinylm.train.loop import train_step

    return [[s["loss"], s["grad_norm"]] for s in (train_step(run, lm_loss) for _ in range(3))]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from tinylm.core.devices import init_distributed
    from tinylm.train.loop import _assemble

    d, device = init_distributed("cpu")
    cfg = _config(2, Path(out))  # 2 ranks x 2 micro-steps x 2 rows
    run = _assemble(cfg, tiny_model(seed=9).train(), packed_source, d, device, 3, Path(out))
    assert run.accum == 2
    stats = _steps(run)
    if rank == 0:
        Path(out, "stats.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def test_masked_packed_batches_weigh_the_same_over_micro_batches_and_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tinylm.train.loop import setup_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    two = json.loads((tmp_path / "stats.json").read_text())
    one = _steps(setup_model(_config(ROWS, tmp_path / "one"), tiny_model(seed=9), packed_source))
    weights = [packed_source(0, r, 2).weight for r in range(0, ROWS, 2)]
    print("counted targets per micro-batch of step 1:", weights)
    assert len(set(weights)) > 1  # unequal micro-batches: a plain mean of their losses would be wrong
    np.testing.assert_allclose(two, one, rtol=1e-5)
    with torch.no_grad():  # the first step's loss is the masked mean over the whole global batch
        want = lm_loss(tiny_model(seed=9).train(), packed_source(0, 0, ROWS))[0]
    assert one[0][0] == pytest.approx(float(want), rel=1e-5)
