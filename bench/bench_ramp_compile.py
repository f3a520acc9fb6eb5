"""Batch-size warmup under torch.compile: compiled for the first shape, or for any batch size from the start.

Under batch-size warmup (data.batch_warmup_tokens) the rows of a micro-batch change from step to step. A model
compiled for its first shape recompiles at the second one (dynamo's automatic dynamic shapes), and the
loss with it: one step stalls for the compile time. With `train.loop._wrap(..., dynamic_batch=True)` the loss
step marks the batch dimension dynamic (`train.losses.lm_loss`), so the first compile of the model and the
loss serves every batch size. This times both, and a run
without the ramp (full batches, compiled for their one shape: the steady step's reference), on the
quickstart's 1m model (vocabulary 2,048, rows of 256 tokens, bf16 autocast where the CPU has bf16 units as
`run.dtype auto` chooses) over the quickstart's ramp (2 rows growing to 16 over 500K tokens) and 30 full
steps after it, each mode in a fresh process with an empty inductor cache, the modes alternated:

    python bench/bench_ramp_compile.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.core.devices import Dist, _autocast  # noqa: E402
from tinylm.data.tokens import Batch  # noqa: E402
from tinylm.model.config import preset  # noqa: E402
from tinylm.model.llama import Llama  # noqa: E402
from tinylm.train.config import RunSection  # noqa: E402
from tinylm.train.loop import _amp_dtype, _wrap  # noqa: E402
from tinylm.train.losses import lm_loss  # noqa: E402
from tinylm.train.schedule import BatchRamp  # noqa: E402

ROWS, SEQ, VOCAB, RAMP_TOKENS, FULL_STEPS = 16, 256, 2048, 500_000, 30


def worker(mode: str) -> dict[str, float]:
    """Times every step of the ramp and FULL_STEPS full ones in this process; mode "none": as many steps,
    every one a full batch (no ramp), the model compiled for that one shape."""
    dynamic = mode == "dynamic"
    torch.manual_seed(0)
    model = Llama(preset("1m", vocab_size=VOCAB, max_seq_len=SEQ))
    device = torch.device("cpu")
    wrapped = _wrap(model, RunSection(compile=True), Dist(), device, dynamic_batch=dynamic)
    amp = _amp_dtype("auto", device, model.num_params())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ramp = BatchRamp.make(ROWS, SEQ, 1, RAMP_TOKENS, 0.125)
    times = []
    for step in range(len(ramp.ramp) + FULL_STEPS):
        batch = Batch(torch.randint(0, VOCAB, (ROWS if mode == "none" else ramp.rows_at(step), SEQ + 1)))
        t0 = time.perf_counter()
        with _autocast(device, amp):
            loss, _ = lm_loss(wrapped, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    ramped = len(ramp.ramp)
    return {"first_s": times[0], "stall_s": max(times[1:]), "ramp_s": sum(times[:ramped]), "total_s": sum(times),
            "full_step_ms": 1000 * statistics.median(times[ramped:]), "ramp_steps": ramped,
            "precision": "bf16" if amp == torch.bfloat16 else "fp32"}


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """`median [min, max]` of a measurement's repeats, each formatted with fmt."""
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", choices=["static", "dynamic", "none"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    runs: dict[str, list[dict[str, float]]] = {"static": [], "dynamic": [], "none": []}
    for r in range(args.rounds):
        for mode in runs:  # alternated; each in a fresh process with an empty compile cache
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--worker", mode], env=env, check=True,
                                     capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    first = runs["static"][0]
    print(f"\n1m model, {first['precision']}, {torch.get_num_threads()} threads, a ramp of {first['ramp_steps']} "
          f"steps then {FULL_STEPS} full ones; medians of {args.rounds} rounds [min, max]\n")
    cols = [("first step s (compile)", "first_s", "{:.1f}"), ("longest later step s", "stall_s", "{:.1f}"),
            ("ramp s", "ramp_s", "{:.1f}"), ("whole s", "total_s", "{:.1f}"),
            ("full-batch step ms", "full_step_ms", "{:.0f}")]
    print("| compiled for | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for mode, label in (("static", "ramp; the first shape (then dynamo recompiles)"),
                        ("dynamic", "ramp; any batch size (dynamic_batch)"), ("none", "no ramp; its one shape")):
        cells = [spread([x[key] for x in runs[mode]], fmt) for _, key, fmt in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n    python bench/bench_ramp_compile.py {' '.join(sys.argv[1:])}\n")


if __name__ == "__main__":
    main()
