"""One training step with Muon against the same step with AdamW: what Muon's Newton-Schulz costs on this CPU.

Both sides are the quickstart's shape (`bench_train.ours`: the 1m preset, vocab 2,048, 16 rows of 256 tokens,
compiled, `--dtype`), built in one process; after warm-up steps the rounds alternate the two, --steps timed
steps each, the order swapped round by round, and the script prints each side's median ms per step and the
median of the per-round ratios muon/adamw. To see the cost on an AVX2-only CPU from a newer one, cap every
library's instruction set before Python starts (PyTorch's kernels, MKL's and oneDNN's GEMMs):

    python bench/bench_muon_step.py --rounds 7
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/bench_muon_step.py --rounds 7 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_data, ours, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    ap.add_argument("--dtype", default="float32", help="run.dtype of both sides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", 2048)
        sides = {name: ours("1m", data, Path(tmp) / name, 256, 16, compile_=True, dtype=args.dtype,
                            extra={"optim.name": name})[1] for name in ("adamw", "muon")}
        for step in sides.values():
            timed(step, 5)  # compile, allocator, optimizer state
        ms: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                ms[name].append(1000 * timed(sides[name], args.steps) / args.steps)
    ratios = [m / a for m, a in zip(ms["muon"], ms["adamw"])]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {args.dtype}")
    for name, v in ms.items():
        print(f"{name}: {statistics.median(v):.1f} ms/step [{min(v):.1f}, {max(v):.1f}]")
    print(f"muon / adamw, per round: {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    print(f"\n    python bench/bench_muon_step.py {' '.join(sys.argv[1:])}\n")


if __name__ == "__main__":
    main()
