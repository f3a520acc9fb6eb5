"""Log-likelihoods of continuations given contexts: what multiple-choice benchmarks and lm-evaluation-harness's
`loglikelihood` requests ask of a model.

Requests come in groups that share a context (a benchmark item's choices). A group's shared tokens run once;
its continuations then run as a batch behind them, each row reading the shared keys and values from the
cache (KV-cache reuse). Rows are right-padded and each sits at its own position with its own mask
(`PagedCache`), so a row's figures do not depend on what else is in its batch: the batch size and the padding
change nothing but rounding. Tokenisation follows lm-evaluation-harness's HF backend (`encode_pair`), so the
numbers are comparable with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.model.kvcache import PagedCache
from tinylm.model.llama import Llama

MIN_TOKENS = 16  # the fewest positions a forward pass holds (see _run_window)
KEY_BLOCK = 64  # a pass's keys per row are a multiple of this (see _run_window)
PASS_COST = 16  # what a forward pass costs beyond its positions, in positions (see _passes)
WINDOW = 4  # a window of groups holds up to this many passes' worth of rows (see _run_window)
PREFIX_BUDGET = 8192  # a window's most cached prefix positions (SmolLM2-135M: 46 KB of keys and values each)


@dataclass(frozen=True)
class Scored:
    """One continuation's score.

    Args:
        logprob: the summed log-probability (nats) of the continuation's tokens given the context.
        greedy: whether every continuation token is the model's argmax (lm-eval's `is_greedy`).
        tokens: how many tokens the continuation has.
    """

    logprob: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-evaluation-harness's HF backend makes them (`_encode_pair`).

    Trailing whitespace of the context moves to the continuation; the continuation's ids are those of the
    whole text after the context's ids (so a token that spans the boundary belongs to the continuation). An
    empty context becomes the bos token (else eos), as lm-eval's prefix token.

    Args:
        tokenizer: the model's tokenizer.
        context, continuation: the request's two texts.
    """
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise TinylmError("a request with an empty context needs a bos or eos token to condition on")
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class _Group:
    """One group's requests as token sequences (context + continuation) and the prefix they share."""

    index: int
    seqs: list[list[int]]  # each request's tokens; the model reads all but the last
    n_scored: list[int]  # continuation tokens of each request (the last ones of its sequence)
    prefix: int  # leading positions every request shares and none scores: computed once

    def tail(self, r: int) -> list[int]:
        """Request r's input tokens after the shared prefix (at least one)."""
        return self.seqs[r][self.prefix:-1]


def loglikelihoods(model: Llama, groups: Sequence[Sequence[tuple[list[int], list[int]]]], batch_size: int = 16,
                   reuse: bool = True, progress: Callable[[int], object] | None = None) -> list[list[Scored]]:
    """Score each (context ids, continuation ids) request; requests of a group share a context.

    A sequence longer than the model's context keeps its last max_seq_len + 1 tokens (lm-eval's rule).

    Args:
        model: the model (eval mode).
        groups: requests grouped by shared context, e.g. one benchmark item's choices.
        batch_size: continuation rows per forward pass; a group with more rows is split, its prefix still
            computed once.
        reuse: run each group's shared prefix once and its rows against the cached prefix (False: every
            request runs whole, the reference the tests compare against).
        progress: called with the number of groups done after each batch.

    Returns:
        per group, per request, its Scored.
    """
    prepared = [_prepare(i, g, model.config.max_seq_len, reuse) for i, g in enumerate(groups)]
    # longest first: neighbours have similar lengths, so passes pad less; the order changes no figure
    prepared.sort(key=lambda g: -max(len(x) for x in g.seqs))
    out: list[list[Scored]] = [[] for _ in groups]
    done = 0
    for window in _windows(prepared, batch_size):
        for group, scores in zip(window, _run_window(model, window, batch_size)):
            out[group.index] = scores
        done += len(window)
        if progress is not None:
            progress(done)
    return out


def _prepare(index: int, requests: Sequence[tuple[list[int], list[int]]], max_len: int, reuse: bool) -> _Group:
    seqs, n_scored = [], []
    for context, continuation in requests:
        if not continuation:
            raise TinylmError("a continuation encodes to no tokens: there is nothing to score")
        whole = (list(context) + list(continuation))[-(max_len + 1):]
        if len(whole) < 2:
            raise TinylmError("a request needs at least one context token before its continuation")
        seqs.append(whole)
        n_scored.append(min(len(continuation), len(whole) - 1))
    prefix = 0
    if reuse and len(seqs) > 1:  # shared input positions, stopping before the first one that is scored
        limit = min(len(x) - 1 - n for x, n in zip(seqs, n_scored))
        while prefix < limit and all(x[prefix] == seqs[0][prefix] for x in seqs):
            prefix += 1
    return _Group(index, seqs, n_scored, prefix)


def _windows(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Consecutive groups with at most WINDOW * batch_size rows and PREFIX_BUDGET cached prefix positions
    together (a larger group alone)."""
    out: list[list[_Group]] = []
    rows = cached = 0
    for g in groups:
        if out and rows + len(g.seqs) <= WINDOW * batch_size and cached + g.prefix <= PREFIX_BUDGET:
            out[-1].append(g)
            rows, cached = rows + len(g.seqs), cached + g.prefix
        else:
            out.append([g])
            rows, cached = len(g.seqs), g.prefix
    return out


@torch.no_grad()
@sdpa_kernel(SDPBackend.MATH)
def _run_window(model: Llama, groups: list[_Group], batch_size: int) -> list[list[Scored]]:
    """The groups' shared prefixes in passes of at most batch_size sequences, longest first, cached in one
    pool; then all their rows in passes of at most batch_size rows, sorted by length, each row reading its
    group's prefix from the pool. Sorting inside a window is what keeps padding low: a group's choices and
    the prefixes of neighbouring groups differ in length, rows of similar length rarely share a group.

    One attention kernel serves every batch shape: a lone row without a mask would get the fused causal
    kernel, which rounds differently from the masked one a batch gets (4.5e-5 nats apart on SmolLM2-135M's
    summed log-likelihoods), and a figure must not depend on the batch size. For the same reason a pass holds
    at least MIN_TOKENS positions (padding added): BLAS multiplies one or two rows by its matrix-vector path,
    which rounds differently from the matrix-matrix one; and every row reads a multiple of KEY_BLOCK keys (the
    ones past its end masked), since the vectorised softmax and products round a key count's remainder
    differently from whole blocks, and the key count of a batch is its longest row's."""
    device = next(model.parameters()).device
    cfg = model.config
    shared = sorted((gi for gi, g in enumerate(groups) if g.prefix), key=lambda gi: -groups[gi].prefix)
    prefix_passes = [shared[i:j] for i, j in _passes([groups[gi].prefix for gi in shared], batch_size)]
    widths = [max(groups[p[0]].prefix, -(-MIN_TOKENS // len(p))) for p in prefix_passes]
    rows = sorted(((gi, r) for gi, g in enumerate(groups) for r in range(len(g.seqs))),
                  key=lambda row: -len(groups[row[0]].tail(row[1])))
    row_passes = _passes([len(groups[gi].tail(r)) for gi, r in rows], batch_size)
    longest_row = max(len(groups[rows[0][0]].tail(rows[0][1])), MIN_TOKENS)
    # pool positions: each prefix pass's sequences (padded to its longest), then one pass of rows
    first_row_slot = sum(len(p) * w for p, w in zip(prefix_passes, widths))
    pool_k = torch.zeros(cfg.n_layers, first_row_slot + min(batch_size, len(rows)) * longest_row, cfg.n_kv_heads, cfg.head_dim,
                         device=device, dtype=next(model.parameters()).dtype)
    pool_v = torch.zeros_like(pool_k)
    prefix_slots = [torch.zeros(0, dtype=torch.long, device=device) for _ in groups]
    offset = 0
    for passed, width in zip(prefix_passes, widths):
        slots = offset + torch.arange(len(passed) * width, device=device).view(len(passed), width)
        offset += len(passed) * width
        for k, gi in enumerate(passed):
            prefix_slots[gi] = slots[k, :groups[gi].prefix]
        ids = _padded([groups[gi].seqs[0][:groups[gi].prefix] for gi in passed], width, device)
        cache = PagedCache(pool_k, pool_v, _blocked(slots), [0] * len(passed))
        # the prefix's logits are never scored: compute one vocabulary column instead of all of them
        model(ids, cache=cache, logits_for=torch.zeros(1, dtype=torch.long, device=device))
    scores: dict[tuple[int, int], Scored] = {}
    for i, j in row_passes:
        part = rows[i:j]
        tails = [groups[gi].tail(r) for gi, r in part]
        width = max(len(tails[0]), -(-MIN_TOKENS // len(part)))
        own = first_row_slot + torch.arange(len(part) * width, device=device).view(len(part), width)
        starts = [groups[gi].prefix for gi, _ in part]
        slots = _row_slots([prefix_slots[gi] for gi, _ in part], own)
        cache = PagedCache(pool_k, pool_v, slots, starts)
        logits = model(_padded(tails, width, device), cache=cache)  # (R, width, V)
        for i, (gi, r) in enumerate(part):
            scores[gi, r] = _score(logits[i], groups[gi], r)
    return [[scores[gi, r] for r in range(len(g.seqs))] for gi, g in enumerate(groups)]


def _passes(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """Cut a list of lengths (longest first) into consecutive passes of at most `limit` sequences, each padded
    to its first (longest) length, minimising the padded positions plus PASS_COST per pass (a pass reads every
    weight once, whatever its size): a dynamic programme over the cut points. Returns (start, end) pairs."""
    best, cut = [0.0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        for i in range(max(0, j - limit), j):
            cost = best[i] + max((j - i) * lengths[i], MIN_TOKENS) + PASS_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(lengths)
    while j:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _padded(seqs: list[list[int]], width: int, device: torch.device) -> Tensor:
    """(B, width) ids, each row right-padded with its own last token (any id would do: padding comes after
    every real token, so no real token attends to it)."""
    return torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], device=device)


def _row_slots(prefixes: list[Tensor], own: Tensor) -> Tensor:
    """(R, S) pool positions of each row's context positions: its group's prefix slots, then its own slots;
    the tail past a row's end repeats its first own slot (masked, never read)."""
    width = own.shape[1]
    S = max(len(p) for p in prefixes) + width
    rows = [torch.cat([p, own[i], own[i, :1].expand(S - len(p) - width)]) for i, p in enumerate(prefixes)]
    return _blocked(torch.stack(rows))


def _blocked(slots: Tensor) -> Tensor:
    """(B, S') slots, S' = S rounded up to a multiple of KEY_BLOCK by repeating each row's last slot: keys
    that no query sees (past every query's position), so only the rounding of the sums they join changes."""
    extra = -slots.shape[1] % KEY_BLOCK
    return torch.cat([slots, slots[:, -1:].expand(-1, extra)], dim=1)


def _score(row_logits: Tensor, group: _Group, r: int) -> Scored:
    """Summed log-probability and greediness of request r's continuation from its row's logits (width, V)."""
    n = group.n_scored[r]
    end = len(group.tail(r))  # the row's real positions; the last n predict the continuation
    logp = row_logits[end - n:end].float().log_softmax(-1)  # (n, V)
    targets = torch.tensor(group.seqs[r][-n:], device=logp.device)
    picked = logp.gather(1, targets[:, None])[:, 0].double()  # summed in float64
    logprob = float(picked.sum())
    if math.isnan(logprob):
        raise TinylmError("the model's log-probabilities are NaN: its weights are broken")
    return Scored(logprob, bool((logp.argmax(-1) == targets).all()), n)
