"""Judge calibration: how often a judge's grades agree with known labels, on TinyTales stories that pass the
validator and the same stories corrupted (names swapped, sentences shuffled, words dropped).

    python bench/bench_judge.py --judges smollm2-135m http://localhost:8080/v1 --n 30 --rubrics tinystories pairwise

For each judge and rubric: the agreement with the labels, the confusion table per corruption, and for rubric
grades the pair agreement (valid story graded above its own corruption) -- `tinylm judge --calibrate N` on
each. A URL judge needs the model id in $TINYLM_JUDGE_MODEL when it serves several, and its key in
$OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.evals.judge import Judge, calibrate, calibration_items, format_calibration
from tinylm.serve.client import open_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judges", nargs="+", default=["smollm2-135m"], help="model sources or OpenAI URLs")
    parser.add_argument("--rubrics", nargs="+", default=["tinystories", "pairwise"],
                        choices=("tinystories", "pairwise"))
    parser.add_argument("--n", type=int, default=30, help="valid stories (each with one corrupted twin)")
    parser.add_argument("--threshold", type=float, default=6.0, help="a rubric grade at or above it is 'good'")
    parser.add_argument("--batch", type=int, default=16, help="grades asked together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    items = calibration_items(args.n, args.seed)
    summary = []
    for source in args.judges:
        teacher = open_teacher(source, "--judge", max_batch=args.batch, device="cpu")
        for rubric in args.rubrics:
            report = calibrate(Judge(teacher, rubric, seed=args.seed), items, args.threshold)
            print(f"### {source}, {rubric}\n\n{format_calibration(report)}\n")
            pair = report.get("pair_agreement", report["agreement"])
            summary.append(f"| {source} | {rubric} | {report['agreement']:.1%} | {pair:.1%} |")
    print("| judge | rubric | agreement | pair agreement |\n|---|---|---|---|")
    print("\n".join(summary))
    print("\ncommand: python bench/bench_judge.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
