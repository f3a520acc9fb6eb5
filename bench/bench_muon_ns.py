"""Muon's Newton-Schulz iteration (5 steps, torch's coefficients) in bfloat16 vs float32 on this machine's CPU.

    OMP_NUM_THREADS=1 python bench/bench_muon_ns.py --shapes 128x128 512x128 128x512 --runs 50

Times `tinylm.train.optim.orthogonalise` (the same arithmetic as torch.optim.Muon's `_zeropower_via_newtonschulz`,
which always casts to bfloat16), alternating the two dtypes, and prints the median milliseconds per matrix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.train.optim import orthogonalise  # noqa: E402

NS = ((3.4445, -4.775, 2.0315), 5)  # torch's defaults, Keller Jordan's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["128x128", "512x128", "128x512"], help="ROWSxCOLS")
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    print("| matrix | bfloat16 ms | float32 ms | bf16 / fp32 |\n|---|---|---|---|")
    for shape in args.shapes:
        g = torch.randn(*map(int, shape.split("x")))
        times: dict[torch.dtype, list[float]] = {torch.bfloat16: [], torch.float32: []}
        for _ in range(args.runs):
            for dtype in times:  # alternated, so a change in the machine's load falls on both
                t0 = time.perf_counter()
                orthogonalise(g, *NS, 1e-7, dtype)
                times[dtype].append((time.perf_counter() - t0) * 1e3)
        bf, fp = (statistics.median(times[d]) for d in (torch.bfloat16, torch.float32))
        print(f"| {shape} | {bf:.2f} | {fp:.2f} | {bf / fp:.1f}x |")
    print(f"\ncommand: python bench/bench_muon_ns.py {' '.join(sys.argv[1:])} (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
