"""`tinylm pretrain`: the training loop with the next-token loss."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from tinylm.train.config import TrainConfig
from tinylm.train.loop import fit, setup
from tinylm.train.losses import lm_loss_fn


def pretrain(cfg: TrainConfig) -> Path:
    """Train a model from a config; returns OUT/final. Raises KeyboardInterrupt after a signal checkpoint.

    Args:
        cfg: the training config.
    """
    run = setup(cfg)
    try:
        return fit(run, lm_loss_fn(cfg.optim.z_loss))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: TrainConfig) -> None:
    """`tinylm pretrain`."""
    print(f"wrote {pretrain(cfg)}")
