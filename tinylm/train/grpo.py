"""Group-relative policy optimisation (GRPO, Shao et al. 2024, DeepSeekMath sec. 4.1): advantages and the loss.

A GRPO Batch holds one sampled completion per row: `tokens` are the prompt followed by the completion (padded),
`mask` is True on the completion's targets, and extras hold per row its group-relative advantage
("advantages", (B,)), and per target the log-probabilities the completion had when it was sampled
("old_logps", (B, T), only when a sampling round is trained on more than once) and under the reference model
("ref_logps", (B, T), only with a KL term). Both are computed once, when the group is sampled (`stages.grpo`),
so the loss step runs one forward of the policy and nothing else.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.data.tokens import Batch

LOSSES = ("sequence", "token")

# The std's epsilon in the advantages, TRL's GRPOTrainer's (1e-4): a group whose rewards are all equal gets
# advantages 0, not a division by zero.
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """Outcome-supervised advantages (DeepSeekMath sec. 4.1.2): each reward minus its group's mean, divided by
    the group's standard deviation (Bessel-corrected, as TRL's) plus STD_EPS; without `scale`, the mean-centred
    rewards only (Dr. GRPO, Liu et al. 2025, drops the division).

    Args:
        rewards: (G * n,) rewards, the n groups one after another.
        group_size: G, the completions sampled per prompt (at least 2).
        scale: divide by the group's standard deviation.

    Returns:
        (G * n,) fp32 advantages.
    """
    r = rewards.float().view(-1, group_size)  # (n, G)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + STD_EPS)
    return centred.flatten()


def token_logps(model: nn.Module, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T) fp32 log-probability of every target tokens[:, 1:] under `model` sampled at `temperature`: the
    policy GRPO optimises is the one the completions came from (TRL's GRPOTrainer divides the logits too).

    Args:
        model: the language model.
        tokens: (B, T + 1) token ids.
        temperature: the sampling temperature.
    """
    logits = model(tokens[:, :-1]).float() / temperature  # (B, T, V)
    return torch.gather(F.log_softmax(logits, -1), -1, tokens[:, 1:, None]).squeeze(-1)


def grpo_token_losses(logps: Tensor, old: Tensor, ref: Tensor | None, advantages: Tensor, beta: float,
                      eps_low: float, eps_high: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """The per-token GRPO objective, negated (DeepSeekMath eq. 3):
        -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL,   rho = exp(logp - old),
    with KL DeepSeekMath's unbiased k3 estimator (eq. 4; Schulman 2020): exp(ref - logp) - (ref - logp) - 1.
    eps_high above eps_low is DAPO's clip-higher (Yu et al. 2025).

    Args:
        logps: (B, T) the policy's log-probabilities of the targets (with gradients).
        old: (B, T) the same at sampling time (`logps.detach()` when sampled by these very weights).
        ref: (B, T) the reference model's (None: no KL term; beta must then be 0).
        advantages: (B,) one per completion.
        beta: the KL coefficient.
        eps_low, eps_high: the clipping range of the ratio.

    Returns:
        (B, T) losses, (B, T) the KL estimate (None without ref), (B, T) True where the ratio was clipped
        (the clipped term was the smaller).
    """
    ratio = torch.exp(logps - old)
    a = advantages[:, None]  # (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    losses = -torch.min(ratio * a, clipped * a)
    was_clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    if ref is None:
        return losses, None, was_clipped
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    return losses + beta * kl, kl, was_clipped


def reduce_losses(per_token: Tensor, mask: Tensor, kind: str) -> Tensor:
    """The SUM over the batch's completions of what the loss averages (the loop divides by batch.weight).

    sequence: each completion's mean over its tokens (DeepSeekMath eq. 3's 1 / |o_i|; TRL's loss_type "grpo"),
        the loss then a mean over completions (weight = completions);
    token: every completion token counted once (DAPO's token-level loss; TRL's "bnpo"), the loss a mean over
        the batch's completion tokens (weight = tokens).

    Args:
        per_token: (B, T) losses.
        mask: (B, T) True on completion targets.
        kind: "sequence" or "token".
    """
    masked = per_token * mask
    if kind == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp_min(1)).sum()
    if kind == "token":
        return masked.sum()
    raise ValueError(f"unknown GRPO loss {kind!r} (known: {', '.join(LOSSES)})")


def batch_weight(mask: Tensor, kind: str) -> float:
    """What a GRPO Batch's loss averages over: its completions (sequence) or their tokens (token)."""
    return float(len(mask)) if kind == "sequence" else float(mask.sum())


GrpoLoss = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, Tensor | float]]]  # a train.losses.LossFn


def grpo_loss(kind: str, beta: float, eps_low: float, eps_high: float, temperature: float = 1.0) -> GrpoLoss:
    """The loop's loss step (a LossFn) for GRPO Batches: `grpo_token_losses` reduced by `reduce_losses`, with
    the mean KL, the share of clipped tokens and the sampling round's reward statistics (extras "reward",
    "reward_std", "flat_groups": the same for every row of a step) as metrics.

    Args:
        kind: "sequence" or "token" (see `reduce_losses`).
        beta, eps_low, eps_high: see `grpo_token_losses`.
        temperature: the sampling temperature (see `token_logps`).
    """
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        mask = batch.mask.float()
        logps = token_logps(model, batch.tokens, temperature)
        old = batch.extras.get("old_logps", logps.detach())
        ref = batch.extras.get("ref_logps")
        per_token, kl, clipped = grpo_token_losses(logps, old, ref, batch.extras["advantages"], beta, eps_low,
                                                   eps_high)
        loss = reduce_losses(per_token, mask, kind) / max(batch.weight, 1.0)
        tokens = mask.sum().clamp_min(1)
        metrics: dict[str, Tensor | float] = {"clip_ratio": (clipped * mask).sum() / tokens}
        if kl is not None:
            metrics["kl"] = (kl.detach() * mask).sum() / tokens
        for k in ("reward", "reward_std", "flat_groups", "completion_tokens"):
            if k in batch.extras:
                metrics[k] = batch.extras[k][0]
        return loss, metrics

    return loss_fn
