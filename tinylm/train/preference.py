"""Preference losses over (chosen, rejected) pairs: sigmoid DPO, IPO and the reference-free SimPO.

A preference Batch holds one pair per row: `tokens` / `mask` are the chosen sequence and its response
mask, extras["rejected"] / extras["rejected_mask"] the rejected one, and extras["ref_chosen"] /
extras["ref_rejected"] (B,) the reference model's summed response log-probabilities, computed once
before training (`stages.dpo`), so no reference model is held during training. The loss is a mean over
the pairs (batch.weight = B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.data.tokens import Batch

LOSSES = ("sigmoid", "ipo", "simpo")


def response_logps(model: nn.Module, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of each row's response tokens, and their number.

    Args:
        model: the language model.
        tokens: (B, T + 1) token ids; inputs tokens[:, :-1], targets tokens[:, 1:].
        mask: (B, T) True on the targets that belong to the response.

    Returns:
        (B,) fp32 summed log-probabilities of the masked targets, and (B,) their counts.
    """
    logits = model(tokens[:, :-1]).float()  # (B, T, V)
    logp = torch.gather(F.log_softmax(logits, -1), -1, tokens[:, 1:, None]).squeeze(-1)  # (B, T)
    return (logp * mask).sum(-1), mask.sum(-1).float()


@dataclass
class PairLogps:
    """(B,) summed response log-probabilities and response lengths of a batch of pairs."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    len_chosen: Tensor
    len_rejected: Tensor


def preference_losses(kind: str, p: PairLogps, beta: float, label_smoothing: float = 0.0,
                      gamma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected responses.

    sigmoid (DPO, Rafailov et al. 2023, eq. 7; conservative DPO's label smoothing eps as in TRL):
        h = beta ((pi_c - ref_c) - (pi_r - ref_r)), loss = -(1 - eps) log s(h) - eps log s(-h),
        rewards beta (pi - ref) on summed log-probabilities.
    ipo (Azar et al. 2023, eq. 17): h = (pi_c - ref_c) - (pi_r - ref_r) on per-token average
        log-probabilities (as TRL 1.16 does), loss = (h - 1 / (2 beta))^2, rewards beta (pi - ref) on the
        sums (the rewards TRL logs for every loss).
    simpo (Meng et al. 2024, eq. 6): reference-free, h = beta (pi_c / |y_c| - pi_r / |y_r|) - gamma,
        loss = -(1 - eps) log s(h) - eps log s(-h), rewards beta pi / |y|.

    Args:
        kind: "sigmoid", "ipo" or "simpo".
        p: the pairs' log-probabilities (the reference ones are ignored by simpo).
        beta: the inverse temperature (DPO's KL weight; IPO's regularisation is 1 / (2 beta)).
        label_smoothing: eps, the assumed share of flipped labels (sigmoid and simpo).
        gamma: SimPO's target reward margin.

    Returns:
        (B,) losses, (B,) chosen rewards, (B,) rejected rewards.
    """
    if kind == "sigmoid":
        chosen, rejected = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
        return _smoothed(chosen - rejected, label_smoothing), chosen, rejected
    if kind == "ipo":
        c = p.chosen / p.len_chosen - p.ref_chosen / p.len_chosen  # per-token log-ratio of the chosen
        r = p.rejected / p.len_rejected - p.ref_rejected / p.len_rejected
        rewards = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
        return (c - r - 1 / (2 * beta)) ** 2, *rewards
    if kind == "simpo":
        chosen, rejected = beta * p.chosen / p.len_chosen, beta * p.rejected / p.len_rejected
        return _smoothed(chosen - rejected - gamma, label_smoothing), chosen, rejected
    raise ValueError(f"unknown preference loss {kind!r} (known: {', '.join(LOSSES)})")


def _smoothed(h: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def pair_logps(model: nn.Module, batch: Batch) -> PairLogps:
    """The policy's log-probabilities of a preference Batch's pairs, chosen and rejected in one forward."""
    rejected, rejected_mask = batch.extras["rejected"], batch.extras["rejected_mask"]
    n = len(batch.tokens)
    logps, counts = response_logps(model, torch.cat([batch.tokens, rejected]), torch.cat([batch.mask, rejected_mask]))
    return PairLogps(logps[:n], logps[n:], batch.extras["ref_chosen"], batch.extras["ref_rejected"],
                     counts[:n].clamp_min(1), counts[n:].clamp_min(1))


PairLoss = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, Tensor | float]]]  # a train.losses.LossFn


def preference_loss(kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairLoss:
    """The loop's loss step (a LossFn) for `preference_losses(kind, ...)`: the mean over the batch's pairs,
    with the mean chosen and rejected rewards, their margin and the share of pairs whose chosen reward
    is higher (reward accuracy) as metrics.

    Args:
        kind, beta, label_smoothing, gamma: see `preference_losses`.
    """
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        losses, chosen, rejected = preference_losses(kind, pair_logps(model, batch), beta, label_smoothing, gamma)
        metrics = reward_metrics(chosen.detach(), rejected.detach())
        return losses.mean(), metrics

    return loss_fn


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor | float]:
    """Means over the pairs: reward_chosen, reward_rejected, reward_margin, reward_accuracy (chosen > rejected)."""
    return {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(), "reward_accuracy": (chosen > rejected).float().mean()}
