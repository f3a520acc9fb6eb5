"""Next-token sampling: temperature, top-k, top-p and repetition penalty (transformers-exact)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError


@dataclass
class SamplingConfig:
    """How the next token is chosen.

    Args:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the k most likely tokens (None or 0: all).
        top_p: nucleus sampling, keep the smallest set whose probability reaches p (Holtzman et al. 2020).
        repetition_penalty: CTRL's penalty (Keskar et al. 2019) on tokens already in the sequence; 1 = off.
        seed: seed of the sampling generator (None: nondeterministic).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise TinylmError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise TinylmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TinylmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise TinylmError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise TinylmError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty as transformers applies it: divide positive logits, multiply negative ones.

    Args:
        logits: (B, V) next-token logits.
        seen: (B, S) ids already in each sequence (prompt included).
        penalty: > 1 discourages repeats.
    """
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Choose one token per row.

    Args:
        logits: (B, V) float logits.
        cfg: temperature / top-k / top-p.
        generator: source of randomness.

    Returns:
        (B,) int64 token ids.
    """
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf the logits that top-k, then top-p, filtering removes (transformers' order and ties).

    Args:
        logits: (B, V) float logits (already divided by the temperature).
        top_k: keep the k largest (ties with the k-th kept too); None or 0: no filter.
        top_p: keep the smallest most-likely set whose probability reaches top_p; None or 1: no filter.
    """
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # Computed as transformers' TopPLogitsWarper does (ascending, drop while the cumulative mass of
        # the least likely tokens is <= 1 - p), so float rounding at the boundary falls the same way.
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # (B, V)
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits
