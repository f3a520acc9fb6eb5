"""One training step with Muon against the same step with AdamW: what Muon's Newton-Schulz costs on this CPU;
or any two sides of the quickstart's shape (`--side`), per token.

Both sides are the quickstart's shape (`bench_train.ours`: the 1m preset, vocab 2,048, 256-token rows,
compiled, `--dtype`), built in one process; after warm-up steps the rounds alternate the two, --steps timed
steps each, the order swapped round by round, and the script prints each side's median ms per step and per
1,000 tokens and the median of the per-round ratios of the second side to the first, per token. To see the cost
on an AVX2-only CPU from a newer one, cap every library's instruction set before Python starts (PyTorch's
kernels, MKL's and oneDNN's GEMMs):

    python bench/bench_muon_step.py --rounds 7
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/bench_muon_step.py --rounds 7 --dtype float32
    python bench/bench_muon_step.py --side b16 16 optim.name=muon --side b8 8 optim.name=muon
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

SEQ_LEN = 256
DEFAULT_SIDES = [["adamw", "16", "optim.name=adamw"], ["muon", "16", "optim.name=muon"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    ap.add_argument("--dtype", default="float32", help="run.dtype of both sides")
    ap.add_argument("--side", nargs="+", action="append", metavar="NAME ROWS KEY=VALUE",
                    help="a side: its name, rows of 256 tokens per step, and recipe overrides (twice; default: "
                         "AdamW and Muon at 16 rows)")
    args = ap.parse_args()
    spec = args.side or DEFAULT_SIDES
    if (len(spec) != 2 or spec[0][0] == spec[1][0]
            or any(len(s) < 2 or not s[1].isdigit() or int(s[1]) < 1 or any("=" not in kv for kv in s[2:])
                   for s in spec)):
        ap.error("give --side NAME ROWS [KEY=VALUE ...] twice, two names, ROWS at least 1")
    rows = {s[0]: int(s[1]) for s in spec}
    extra = {s[0]: dict(kv.split("=", 1) for kv in s[2:]) for s in spec}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", 2048)
        sides = {name: ours("1m", data, Path(tmp) / name, SEQ_LEN, rows[name], compile_=True, dtype=args.dtype,
                            extra=extra[name])[1] for name in rows}
        for step in sides.values():
            timed(step, 5)  # compile, allocator, optimizer state
        ms: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                ms[name].append(1000 * timed(sides[name], args.steps) / args.steps)
    first, second = rows
    per_k = {k: [m * 1000 / (rows[k] * SEQ_LEN) for m in v] for k, v in ms.items()}
    ratios = [b / a for a, b in zip(per_k[first], per_k[second])]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {args.dtype}")
    for name, v in ms.items():
        print(f"{name} ({rows[name]} rows): {statistics.median(v):.1f} ms/step [{min(v):.1f}, {max(v):.1f}], "
              f"{statistics.median(per_k[name]):.2f} ms per 1K tokens")
    print(f"{second} / {first} per token, per round: {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}]")
    print(f"\n    python bench/bench_muon_step.py {' '.join(sys.argv[1:])}\n")


if __name__ == "__main__":
    main()
