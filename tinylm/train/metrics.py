"""metrics.jsonl, TensorBoard scalars and the loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tinylm.core.fs import atomic_file

# ----- logging -----------------------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl (one JSON object per line), plus TensorBoard scalars if asked and installed."""

    def __init__(self, out: Path, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("tinylm: tensorboard is not installed; writing metrics.jsonl only")

    def _truncate(self, start_step: int) -> None:
        # A resumed run drops lines written after its checkpoint, so the log has each step once.
        if self.path.is_file():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            with atomic_file(self.path) as tmp:  # a kill here must not cut the log of the steps kept
                tmp.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a last line cut off by a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics: Path, png: Path) -> None:
    """Train and validation loss (left axis, log-scaled steps not needed) and learning rate (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    train = [(r["step"], r["loss"], r["lr"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], label="train loss", lw=1)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    if train:
        ax2 = ax.twinx()
        ax2.plot([t[0] for t in train], [t[2] for t in train], color="gray", ls="--", lw=1)
        ax2.set_ylabel("learning rate (dashed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
