"""Loss functions over a batch and the summed negative log-likelihood of evaluation."""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.core.devices import _autocast
from tinylm.data.tokens import IGNORE_INDEX, Batch

# ----- the loss step and evaluation ------------------------------------------------------------------

# (model, micro-batch) -> (scalar loss, metrics to log beside it). The loss is a mean over batch.weight
# units (its counted targets by default); the loop weights micro-batches by it. Metric values (floats
# or 0-d tensors) are averaged the same way and written to metrics.jsonl.
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, Tensor | float]]]


def lm_loss(model: nn.Module, batch: Batch, z_loss: float = 0.0) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Mean next-token cross-entropy of one micro-batch over its counted targets, in fp32.

    Args:
        model: the (wrapped) language model.
        batch: tokens (B, T + 1), a (B, T) mask of the targets that count (None: all of them), and
            for packed rows their example ids (the batch has already masked targets across examples).
        z_loss: PaLM's z-loss coefficient (Chowdhery et al. 2022, sec. 5): adds z_loss * log(Z)^2, the
            mean over the counted targets of the squared log-normaliser of the softmax, which keeps
            log Z near 0. A training regulariser: with gradients off (evaluation) the loss is the plain
            cross-entropy. Bind it with `lm_loss_fn`.

    Returns:
        (the loss, no extra metrics; with z_loss in training, {"z_loss": the mean log(Z)^2}).
    """
    rows = _varying_rows(model)
    packed = {} if batch.segments is None else {"segments": rows(batch.input_segments)}  # unpacked: the plain call
    logits = rows(model(rows(batch.inputs), **packed).flatten(0, 1))  # (B * T, V)
    counted = None if batch.mask is None else batch.labels.flatten() != IGNORE_INDEX  # (B * T,)
    nll = _compiled_nll() if hasattr(model, "_orig_mod") else _nll  # a compiled model: a compiled loss too
    if counted is None:
        loss = nll(logits, rows(batch.targets.flatten()), "mean")
    else:
        # sum / count rather than reduction="mean": a micro-batch with every target masked gives 0, not NaN
        loss = nll(logits, rows(batch.labels.flatten()), "sum") / max(batch.weight, 1.0)
    if not z_loss or not torch.is_grad_enabled():
        return loss, {}
    logits = logits.float()
    z2 = logits.logsumexp(-1).pow(2)  # (B * T,)
    z2 = z2.mean() if counted is None else (z2 * counted).sum() / max(batch.weight, 1.0)
    return loss + z_loss * z2, {"z_loss": z2.detach()}


def _nll(logits: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """Cross-entropy in fp32 of (N, V) logits of any float dtype; IGNORE_INDEX targets do not count."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def _varying_rows(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """For a model compiled with dynamic_batch (batch-size warmup, train.loop._wrap): marks a tensor's first
    dimension (rows, or rows x positions) dynamic, so that the compiled model and loss serve every batch
    size of the ramp from their first compile and keep the other dimensions static. Otherwise: the tensor."""
    if not getattr(model, "dynamic_batch", False):
        return lambda t: t

    def mark(t: Tensor) -> Tensor:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    return mark


@functools.cache
def _compiled_nll() -> Callable[[Tensor, Tensor, str], Tensor]:
    """`_nll` compiled, for compiled models: inductor fuses the fp32 cast, log-softmax and gather that
    eager runs as separate passes over the (tokens x vocab) logits; on a CPU the loss's forward and
    backward take 4x less time (BENCHMARKS.md, "bf16 on a CPU with AMX")."""
    return torch.compile(_nll)


def lm_loss_fn(z_loss: float = 0.0) -> LossFn:
    """The LM loss step of a run: `lm_loss` itself, or with optim.z_loss bound when it is on."""
    return lm_loss if not z_loss else functools.partial(lm_loss, z_loss=z_loss)


def is_lm_loss(loss_fn: LossFn) -> bool:
    """`lm_loss`, with or without a z-loss bound (its values are then mean negative log-likelihoods)."""
    return getattr(loss_fn, "func", loss_fn) is lm_loss


# exp(-1e4) is 0 in fp32 and bf16: a log-probability of -inf (a token of probability 0) is clamped to it
# so that 0 * log 0 terms are 0 with finite gradients instead of NaN.
_LOG_ZERO = -1e4


@torch.no_grad()
def eval_nats(model: nn.Module, windows: Iterable[Tensor], batch_size: int = 8,
              device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens.

    Args:
        model: the language model (called in no-grad mode; switch it to eval() yourself if it matters).
        windows: (T + 1,) token tensors; each predicts its T last tokens. Lengths may differ.
        batch_size: windows per forward pass (equal-length windows are batched together).
        device: where to run.
        amp_dtype: autocast dtype, or None for the model's own.
    """
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        with _autocast(torch.device(device), amp_dtype):
            logits = model(batch[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


@torch.no_grad()
def eval_batches(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu",
                 amp_dtype: torch.dtype | None = None,
                 loss_fn: LossFn = lm_loss) -> tuple[float, float, dict[str, float]]:
    """The loss of held-out Batches, summed over what it averages (batch.weight), with its metrics.

    Args:
        model: the language model (called in no-grad mode; switch it to eval() yourself if it matters).
        batches: Batches, e.g. held-out chat examples packed into rows, or held-out preference pairs.
        device: where to run.
        amp_dtype: autocast dtype, or None for the model's own.
        loss_fn: the run's loss step (default the masked LM loss: the sums are then nats of the targets
            that count, the mask and segments honoured).

    Returns:
        (summed loss, summed weight, each metric summed weighted by batch.weight).
    """
    total, count, sums = 0.0, 0.0, {}
    for batch in batches:
        batch = batch.to(device)
        with _autocast(torch.device(device), amp_dtype):
            loss, metrics = loss_fn(model, batch)  # means over batch.weight units
        total += float(loss) * batch.weight
        count += batch.weight
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * batch.weight
    return total, count, sums


def _batches(windows: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    pending: list[Tensor] = []
    for w in windows:
        if pending and (len(pending) == size or len(w) != len(pending[0])):
            yield torch.stack(pending)
            pending = []
        pending.append(w)
    if pending:
        yield torch.stack(pending)


# ----- divergences -------------------------------------------------------------------------------------

def kl_div(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) over the last dim, from log-probabilities.

    Args:
        p_log, q_log: (..., C) log-probabilities; -inf entries (probability 0) are allowed.

    Returns:
        (...,) divergences.
    """
    p_log, q_log = p_log.clamp_min(_LOG_ZERO), q_log.clamp_min(_LOG_ZERO)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def js_div(p_log: Tensor, q_log: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1):
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q. beta = 0.5 is the usual JSD.

    Args:
        p_log, q_log: (..., C) log-probabilities (teacher, student).
        beta: mixing weight in (0, 1).
    """
    p_log, q_log = p_log.clamp_min(_LOG_ZERO), q_log.clamp_min(_LOG_ZERO)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log1p(-beta))  # (..., C)
    return beta * kl_div(p_log, m_log) + (1 - beta) * kl_div(q_log, m_log)


def divergence(kind: str, p_log: Tensor, q_log: Tensor, beta: float = 0.5) -> Tensor:
    """The divergence `kind` (fkl | rkl | jsd) between teacher p and student q, per position."""
    if kind == "fkl":
        return kl_div(p_log, q_log)
    if kind == "rkl":
        return kl_div(q_log, p_log)
    return js_div(p_log, q_log, beta)


def truncate(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k tokens of a distribution plus one bucket for the rest.

    Args:
        log_probs: (N, V) log-probabilities.
        k: tokens to keep (k < V).

    Returns:
        ids (N, k) most probable first, and (N, k + 1) log-probabilities: the k tokens, then log(rest).
    """
    top, ids = log_probs.topk(k, dim=-1)  # (N, k)
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return ids, torch.cat([top, rest], dim=-1)


def coarse_grain(log_probs: Tensor, ids: Tensor) -> Tensor:
    """A distribution over (N, V) restricted to the tokens `ids` (N, K) plus a bucket for the rest: (N, K + 1)."""
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([log_probs.gather(-1, ids), rest], dim=-1)
