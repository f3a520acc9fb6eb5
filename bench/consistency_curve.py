"""Consistency and validity of sampled stories at every checkpoint of TinyTales runs, with the val loss there.

For each run folder (a `tinylm pretrain` out dir with --run.ckpt_every, as `bench/speedrun.py` writes them under
WORK/runs/): the share of 20 sampled stories (seed 0) that keep names and pronouns among those at least half of
whose sentences parse, the share of valid sentences, and the val loss (nats/token) logged at that token count.
The same scoring as speedrun's tokens_to_consistency, over every checkpoint instead of up to the first hit.

    python bench/consistency_curve.py W/runs/tinytales-default-10m-0 W/runs/tinytales-fp32-10m-0
    python bench/consistency_curve.py Q/train --samples 200 --final-only   # a quickstart's model, rescored
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.evals.tinytales import sample_tinytales  # noqa: E402
from tinylm.formats import checkpoint  # noqa: E402
from tinylm.train.metrics import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--final-only", action="store_true", help="score the final model only")
    args = ap.parse_args()
    for out in args.runs:
        val = {r["tokens"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("val_loss") is not None}
        ckpts = [] if args.final_only else sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        ckpts.append(out / "final")
        print(f"{out.name}\n| tokens | consistent, parsed | valid sentences | val loss |\n|---|---|---|---|")
        for ckpt in ckpts:
            loaded = checkpoint.load(ckpt)
            st = sample_tinytales(loaded.model, loaded.tokenizer, args.samples, seed=0)
            tokens = loaded.meta["tokens"]
            loss = f"{val[tokens]:.4f}" if tokens in val else ""
            print(f"| {tokens:,} | {st['consistent_valid_fraction']:.1%} | {st['valid_fraction']:.1%} | {loss} |",
                  flush=True)


if __name__ == "__main__":
    main()
