"""Fast-decode speed of two checkouts of tinylm, measured in turns in the same time window.

One warmed process per checkout (PYTHONPATH set to it) holds the 15m and 1m presets, random weights,
in int8 and fp32, each compiled by one untimed `generate_ids(..., fast=True)`; then the two processes
take turns, one timed 128-token greedy decode each, the order swapped every round. The per-round ratio
after/before cancels most of a shared machine's drift; the script prints medians.

    git worktree add ../before <commit>
    python bench/bench_ab.py ../before . --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = [("int8", "15m"), ("int8", "1m"), ("fp32", "15m"), ("fp32", "1m")]

# The child imports either layout of the package: the subpackages (after the restructure) or the flat
# modules (before it), so one script compares the two.
CHILD = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
try:
    from tinylm.infer.generate import generate_ids
    from tinylm.model.config import preset
    from tinylm.model.llama import Llama
    from tinylm.stages.quantize import quantize_model
except ImportError:
    from tinylm.generate import generate_ids
    from tinylm.config import preset
    from tinylm.model import Llama
    from tinylm.quantize import quantize_model
PROMPT, NEW = list(range(10, 26)), int(sys.argv[2])
models = {}
for scheme in ("int8", "fp32"):
    for name in ("15m", "1m"):
        torch.manual_seed(0)
        m = Llama(preset(name)).eval()
        if scheme == "int8":
            quantize_model(m, "int8", 0)
        generate_ids(m, PROMPT, NEW, temperature=0.0, fast=True)  # compile, untimed
        models[scheme, name] = m
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    generate_ids(models[tuple(line.split())], PROMPT, NEW, temperature=0.0, fast=True)
    print(NEW / (time.perf_counter() - t), flush=True)
"""


def start(tree: Path, threads: int, new: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(new)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tree)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"{tree}: the decoding process did not start")
    return proc


def timed(proc: subprocess.Popen, case: tuple[str, str]) -> float:
    proc.stdin.write(" ".join(case) + "\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="checkout measured first in even rounds")
    p.add_argument("after", type=Path, help="the other checkout")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=128, help="tokens per timed decode")
    args = p.parse_args()
    procs = {"before": start(args.before, args.threads, args.new), "after": start(args.after, args.threads, args.new)}
    speeds: dict[tuple[tuple[str, str], str], list[float]] = {}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for case in CASES:
            for side in order:
                speeds.setdefault((case, side), []).append(timed(procs[side], case))
    print("| weights | model | before tok/s (median) | after tok/s (median) | median paired ratio after/before |")
    print("|---|---|---|---|---|")
    for case in CASES:
        before, after = speeds[case, "before"], speeds[case, "after"]
        ratio = statistics.median(a / b for a, b in zip(after, before))
        print(f"| {case[0]} | {case[1]} | {statistics.median(before):.0f} | {statistics.median(after):.0f} | "
              f"{ratio:.3f} |")
    print(f"\n`python bench/bench_ab.py {args.before} {args.after} --rounds {args.rounds} --threads {args.threads} "
          f"--new {args.new}`")
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
