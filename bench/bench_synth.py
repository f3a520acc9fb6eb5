"""`tinylm synth` throughput: rows/s with a local teacher asked through the engine in batches (continuous
batching) against the same rows asked one request at a time, and the acceptance rate by rejection reason.

    python bench/bench_synth.py --teacher smollm2-135m --kind stories --rows 64 --batch 16 --max-tokens 256 --threads 4

Both runs ask for the same `--rows` rows (the same prompts and sampling seeds: row i's depend only on the
seed and i) with `--attempts` = `--rows`, so every row is asked once whether it passes the checks or not; the
teacher is loaded once, before either clock starts. rows/s counts rows asked (accepted or not) per second of
asking and checking; the acceptance table is the batched run's (the one-at-a-time run's differs only where
batched arithmetic changes a sampled token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.serve.client import open_teacher
from tinylm.stages.synth import SynthConfig, synth


def _run(teacher: object, args: argparse.Namespace, batch: int, out: Path) -> dict:
    cfg = SynthConfig(args.kind, args.teacher, str(out), n=args.rows, attempts=args.rows, batch=batch,
                      max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, progress=False,
                      overwrite=True, device="cpu")
    teacher.max_batch = batch  # a local teacher decodes `batch` rows together; 1: one request at a time
    return synth(cfg, teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m", help="a local model source (an alias, a dir, a .gguf)")
    parser.add_argument("--kind", default="stories", choices=("stories", "instructions", "rationales", "pairs"))
    parser.add_argument("--rows", type=int, default=64, help="rows asked in each run")
    parser.add_argument("--batch", type=int, default=16, help="rows decoded together in the batched run")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = open_teacher(args.teacher, "--teacher", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        batched = _run(teacher, args, args.batch, Path(tmp) / "batched.jsonl")
        single = _run(teacher, args, 1, Path(tmp) / "single.jsonl")
    rate_b, rate_s = batched["asked"] / batched["seconds"], single["asked"] / single["seconds"]
    print(f"| {args.teacher}, {args.kind}, {args.rows} rows, {args.max_tokens} max tokens | rows/s |")
    print("|---|---|")
    print(f"| engine, batch {args.batch} | {rate_b:.2f} |")
    print(f"| one request at a time | {rate_s:.2f} |")
    print(f"| speed-up | {rate_b / rate_s:.1f}x |")
    print()
    print("| batched run | rows | share |")
    print("|---|---|---|")
    asked = max(1, batched["asked"])
    print(f"| accepted | {batched['written']} | {batched['written'] / asked:.0%} |")
    for reason, count in batched["rejected"].items():
        print(f"| rejected: {reason} | {count} | {count / asked:.0%} |")
    print()
    print("command: python bench/bench_synth.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
