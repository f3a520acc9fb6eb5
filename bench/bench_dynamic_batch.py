"""The full-batch training step compiled for one batch size, or with the batch dimension dynamic.

Under batch-size warmup (data.batch_warmup_tokens) the loss step marks the rows dynamic
(`train.losses._varying_rows`), so one compile serves every batch size of the ramp; the steps after the
ramp then run that same dynamic-shape code at the full batch. This measures what that costs a full step
against the code compiled for the full batch alone, on the quickstart's 1m model (vocabulary 2,048, 16 rows
of 256 tokens, bf16 autocast where the CPU has bf16 units, as `run.dtype auto` chooses), the two modes
alternated in one process: each segment resets dynamo, recompiles (from inductor's cache after the first
round), runs WARM untimed steps and times --steps steps. Printed: each mode's median step, and the median over
rounds of the per-round ratio dynamic / static, and the deciles of every timed step (a busy host only adds
time, so the low deciles are the nearest to each code's own speed).

    python bench/bench_dynamic_batch.py --rounds 16 --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ramp_compile import spread  # noqa: E402  (bench/ is the script's folder, first on sys.path)

from tinylm.core.devices import Dist, _autocast  # noqa: E402
from tinylm.data.tokens import Batch  # noqa: E402
from tinylm.model.config import preset  # noqa: E402
from tinylm.model.llama import Llama  # noqa: E402
from tinylm.train.config import RunSection  # noqa: E402
from tinylm.train.loop import _amp_dtype, _wrap  # noqa: E402
from tinylm.train.losses import lm_loss  # noqa: E402

ROWS, SEQ, VOCAB, WARM = 16, 256, 2048, 3


def segment(model: Llama, optimizer: torch.optim.Optimizer, dynamic: bool, amp: torch.dtype | None,
            steps: int) -> list[float]:
    """The times (ms) of `steps` full-batch steps, compiled afresh for one batch size or any."""
    torch._dynamo.reset()
    wrapped = _wrap(model, RunSection(compile=True), Dist(), torch.device("cpu"), dynamic_batch=dynamic)
    times = []
    for step in range(WARM + steps):
        batch = Batch(torch.randint(0, VOCAB, (ROWS, SEQ + 1)))
        t0 = time.perf_counter()
        with _autocast(torch.device("cpu"), amp):
            loss, _ = lm_loss(wrapped, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARM:
            times.append(1000 * (time.perf_counter() - t0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15, help="timed steps a segment")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Llama(preset("1m", vocab_size=VOCAB, max_seq_len=SEQ))
    amp = _amp_dtype("auto", torch.device("cpu"), model.num_params())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ms: dict[bool, list[float]] = {False: [], True: []}  # each segment's median step
    every: dict[bool, list[float]] = {False: [], True: []}  # every timed step
    for r in range(args.rounds):
        for dynamic in ((False, True) if r % 2 == 0 else (True, False)):  # alternated, each order in turn
            times = segment(model, optimizer, dynamic, amp, args.steps)
            ms[dynamic].append(statistics.median(times))
            every[dynamic] += times
            print(f"round {r} {'dynamic' if dynamic else 'static'}: {ms[dynamic][-1]:.1f} ms", file=sys.stderr,
                  flush=True)
    ratios = [d / s for s, d in zip(ms[False], ms[True])]
    print(f"\n1m model, {'bf16' if amp == torch.bfloat16 else 'fp32'}, {torch.get_num_threads()} threads, "
          f"{ROWS} x {SEQ} tokens a step; medians of {args.rounds} rounds [min, max]\n")
    q = lambda v: statistics.quantiles(v, n=10)  # noqa: E731
    print("| compiled for | full-batch step ms, segment medians | every step: 10th percentile | 50th | 90th |")
    print("|---|---|---|---|---|")
    for dynamic, label in ((False, "one batch size (no ramp)"), (True, "any batch size (dynamic_batch, as under a ramp)")):
        p = q(every[dynamic])
        print(f"| {label} | {spread(ms[dynamic])} | {p[0]:.1f} | {statistics.median(every[dynamic]):.1f} | {p[-1]:.1f} |")
    print(f"\ndynamic / static, per round: {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}]\n\n    python bench/bench_dynamic_batch.py --rounds {args.rounds} --steps {args.steps}\n")


if __name__ == "__main__":
    main()
