"""Validation loss at equal token counts, and the speed after the start, read from runs' metrics.jsonl.

For each run folder (a `tinylm pretrain` out dir, or a `tinylm quickstart` out dir, whose training is in
train/): the val loss (nats/token) of the first val pass at or past each --tokens count (blank where the run
ended before it), and its training speed after --after tokens (the median of the tokens_per_s logged from
there on: the first compile and the warmup left out, and the val passes, which the logged speed excludes). No
model is loaded; this reads only the logged figures. With --to-loss L1 L2 ...: instead of the val losses, the
tokens of the first val pass at or below each loss (blank: never), the tokens a run needed to get there. With
--val-cost: what the val passes (and the checkpoints saved at the same steps) cost each run's training time, from
the logged times: the median logged window that starts at a val pass, less the median of the others (after
--after tokens), times the number of val passes.

    python bench/val_at_tokens.py W/def-0 W/qs-0 W/def-1 W/qs-1 --tokens 1e6 2e6 3e6 4e6 5e6 6e6 8e6 10e6
    python bench/val_at_tokens.py W/runs/tinytales-*-5m-* --to-loss 0.8 0.7 0.6
    python bench/val_at_tokens.py Q-0 Q-1 --val-cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.train.metrics import read_metrics  # noqa: E402


def metrics_of(run: Path) -> list[dict]:
    for path in (run / "metrics.jsonl", run / "train" / "metrics.jsonl"):
        if path.is_file():
            return read_metrics(path)
    print(f"error: no metrics.jsonl in {run} or {run / 'train'}", file=sys.stderr)
    raise SystemExit(2)


def val_at(rows: list[dict], tokens: float) -> float | None:
    """The val loss of the first val pass at or past `tokens`; None if the run ended before."""
    return next((r["val_loss"] for r in rows if r.get("val_loss") is not None and r["tokens"] >= tokens), None)


def tokens_to(rows: list[dict], loss: float) -> int | None:
    """The tokens of the first val pass at or below `loss`; None if there is none."""
    return next((r["tokens"] for r in rows if r.get("val_loss") is not None and r["val_loss"] <= loss), None)


def speed_after(rows: list[dict], tokens: float) -> float | None:
    """The median logged tokens/s of the rows at or past `tokens`; None if there are none."""
    speeds = [r["tokens_per_s"] for r in rows if r["tokens"] >= tokens and r.get("tokens_per_s")]
    return statistics.median(speeds) if speeds else None


def val_cost(rows: list[dict], tokens: float) -> tuple[float, int] | None:
    """(seconds a val pass adds to its logged window, val passes in the run), from the windows between logged
    rows at or past `tokens` of one length in steps; None without both kinds of window."""
    logged = [r for r in rows if "time_s" in r and "step" in r]
    if len(logged) < 2:
        return None
    every = logged[1]["step"] - logged[0]["step"]  # the log's window, in steps
    after_val, plain = [], []
    for a, b in zip(logged, logged[1:]):
        if a["tokens"] >= tokens and b["step"] - a["step"] == every:
            (after_val if a.get("val_loss") is not None else plain).append(b["time_s"] - a["time_s"])
    if not after_val or not plain:
        return None
    return statistics.median(after_val) - statistics.median(plain), sum(r.get("val_loss") is not None for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e6, 2e6, 3e6, 4e6, 5e6, 6e6, 8e6, 10e6])
    ap.add_argument("--after", type=float, default=1e6, help="tokens/s counted from this many tokens on")
    ap.add_argument("--to-loss", type=float, nargs="+", help="the tokens to each of these val losses instead")
    ap.add_argument("--val-cost", action="store_true", help="what the val passes cost each run's training time")
    args = ap.parse_args()
    runs = {run: [r for r in metrics_of(run) if "tokens" in r] for run in args.runs}  # every run read first
    if args.val_cost:
        print(f"| run | val passes | s a pass adds to its window (after {args.after / 1e6:g}M tokens) | their total s "
              "| training s |\n|---|---|---|---|---|")
        for run, rows in runs.items():
            cost = val_cost(rows, args.after)
            cells = [f"{cost[1]}", f"{cost[0]:.3f}", f"{cost[0] * cost[1]:.1f}"] if cost else ["", "", ""]
            print(f"| {run} | {' | '.join(cells)} | {rows[-1].get('time_s', 0) if rows else 0:.0f} |")
        return
    heads = ([f"tokens to {x:g}" for x in args.to_loss] if args.to_loss else [f"{t / 1e6:g}M" for t in args.tokens])
    names = [run.name for run in runs]  # a folder's name, or its last two parts where names repeat
    label = {run: run.name if names.count(run.name) == 1 else "/".join(run.parts[-2:]) for run in runs}
    print(f"| run | tokens trained | tokens/s after {args.after / 1e6:g}M | {' | '.join(heads)} |")
    print("|---" * (len(heads) + 3) + "|")
    for run, rows in runs.items():
        speed = speed_after(rows, args.after)
        if args.to_loss:
            cells = [f"{n:,}" if (n := tokens_to(rows, x)) is not None else "" for x in args.to_loss]
        else:
            cells = [f"{v:.3f}" if (v := val_at(rows, t)) is not None else "" for t in args.tokens]
        trained = f"{rows[-1]['tokens']:,}" if rows else ""
        print(f"| {label[run]} | {trained} | {f'{speed:,.0f}' if speed else ''} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
