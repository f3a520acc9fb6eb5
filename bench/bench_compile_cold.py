"""The quickstart model's first compile on a fresh machine: the whole model, or each block on its own.

A fresh machine has an empty inductor cache (/tmp/torchinductor_$USER), so the first training step of the
first `tinylm quickstart` compiles every kernel with the C++ compiler; later runs load them from the cache.
This times the first step (the compile) and the steady step of the quickstart's 1m model (vocabulary 2,048,
16 rows of 256 tokens, bf16 autocast where the CPU has bf16 units, as `run.dtype auto` chooses; the compiled
loss of `train.losses`) compiled two ways, each in a fresh process with an empty cache, the two alternated:
"whole", as `tinylm` compiles it (torch.compile of the model), and "regional" (each decoder block compiled on
its own, `nn.Module.compile`; the blocks share one compiled graph, so there is a quarter as much to lower).

    python bench/bench_compile_cold.py --rounds 2
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

from bench_ramp_compile import spread  # noqa: E402  (bench/ is the script's folder, first on sys.path)

from tinylm.core.devices import _autocast  # noqa: E402
from tinylm.model.config import preset  # noqa: E402
from tinylm.model.llama import Llama  # noqa: E402
from tinylm.train.loop import _amp_dtype  # noqa: E402
from tinylm.train.losses import _compiled_nll  # noqa: E402

ROWS, SEQ, VOCAB, STEPS = 16, 256, 2048, 40


def worker(mode: str) -> dict[str, float]:
    """The first step's time and the median of the steps after the fifth, compiled as `mode` says."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train.loop._wrap sets it on a CPU
    torch.manual_seed(0)
    model = Llama(preset("1m", vocab_size=VOCAB, max_seq_len=SEQ))
    if mode == "regional":
        for layer in model.model.layers:
            layer.compile()
        fn: torch.nn.Module = model
    else:
        fn = torch.compile(model)
    amp = _amp_dtype("auto", torch.device("cpu"), model.num_params())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nll = _compiled_nll()
    times = []
    for _ in range(STEPS):
        x = torch.randint(0, VOCAB, (ROWS, SEQ + 1))
        t0 = time.perf_counter()
        with _autocast(torch.device("cpu"), amp):
            loss = nll(fn(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), "mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "step_ms": 1000 * statistics.median(times[5:]),
            "precision": "bf16" if amp == torch.bfloat16 else "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", choices=["whole", "regional"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    runs: dict[str, list[dict[str, float]]] = {"whole": [], "regional": []}
    for r in range(args.rounds):
        for mode in (("whole", "regional") if r % 2 == 0 else ("regional", "whole")):
            with tempfile.TemporaryDirectory() as cache:  # a fresh machine's empty inductor cache
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--worker", mode], env=env, check=True,
                                     capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    print(f"\n1m model, {runs['whole'][0]['precision']}, {torch.get_num_threads()} threads, {ROWS} x {SEQ} tokens a "
          f"step, an empty inductor cache; medians of {args.rounds} rounds [min, max]\n")
    print("| compiled | first step s (the compile) | steady step ms |\n|---|---|---|")
    for mode, label in (("whole", "the whole model (tinylm)"), ("regional", "each block on its own")):
        cells = [spread([x[key] for x in runs[mode]], fmt) for key, fmt in (("first_s", "{:.1f}"), ("step_ms", "{:.0f}"))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n    python bench/bench_compile_cold.py --rounds {args.rounds}\n")


if __name__ == "__main__":
    main()
