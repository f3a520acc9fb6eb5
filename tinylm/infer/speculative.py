"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a cheap drafter proposes k tokens, the
target scores all of them in ONE forward over k+1 positions of its KV cache, and a rejection rule keeps a
prefix of the draft plus one token of the target's own, so that every emitted token has exactly the
distribution plain decoding would give it (greedy: exactly the same tokens).

Two drafters share one small interface (`Drafter`): a smaller model over the same vocabulary
(`ModelDrafter`, its own KV cache rolled back to the accepted prefix on every proposal) and prompt lookup
(`NgramDrafter`, Saxena 2023: no model, the tokens that followed the latest earlier occurrence of the
context's last n tokens). The draft length adapts to how much of the drafts the target accepts
(`DraftLength`). `speculative_generate_ids` is the single-stream loop; the engine (engine.py) runs the same
`verify` over its paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from tinylm.infer.sampling import SamplingConfig, filter_logits, penalize_repetition
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama


@dataclass
class Draft:
    """Proposed tokens and the distributions they were drawn from.

    Args:
        tokens: the proposed ids, in order (may be empty: nothing to propose).
        q: (len(tokens), V) the draft probabilities each token was sampled from; None when the tokens are
            deterministic (greedy drafting, prompt lookup): q is then one-hot at each token.
    """

    tokens: list[int]
    q: Tensor | None = None


class Drafter(Protocol):
    """What speculative decoding needs of a drafter."""

    def propose(self, tokens: Sequence[int], k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Draft:
        """Up to k tokens to follow `tokens` (the whole context so far; it only grows between calls)."""
        ...

    def fresh(self) -> "Drafter":
        """A drafter of the same kind with no per-sequence state, for another sequence."""
        ...


@dataclass
class SpecStats:
    """Counts of a speculative decode (add several with `add`).

    Args:
        steps: target forwards that verified a draft (an empty draft counts: it is a plain step).
        drafted: draft tokens proposed.
        accepted: draft tokens the target accepted.
    """

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def record(self, drafted: int, accepted: int) -> None:
        self.steps, self.drafted, self.accepted = self.steps + 1, self.drafted + drafted, self.accepted + accepted

    def add(self, other: "SpecStats") -> None:
        self.steps, self.drafted, self.accepted = (self.steps + other.steps, self.drafted + other.drafted,
                                                   self.accepted + other.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per verification step; each step also emits one token of the target's."""
        return self.accepted / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (f"{self.accepted}/{self.drafted} drafted tokens accepted ({100 * self.acceptance_rate:.0f}%), "
                f"mean accepted length {self.mean_accepted:.2f}, "
                f"{self.mean_accepted + 1:.2f} tokens per target forward over {self.steps} steps")


class DraftLength:
    """The number of tokens to draft next: one more after a step that accepted the whole draft, one fewer
    after a step that accepted less than half of it, within [1, k_max]. (A gentler form of transformers'
    "heuristic" schedule for assisted generation, +2 / -1, which oscillates more on short drafts.)

    Args:
        k_max: the most tokens a draft may have; the first draft has this many.
    """

    def __init__(self, k_max: int) -> None:
        self.k_max, self.k = k_max, k_max

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:  # nothing was proposed: no evidence about the length
            return
        if accepted == drafted:
            self.k = min(self.k + 1, self.k_max)
        elif 2 * accepted < drafted:
            self.k = max(self.k - 1, 1)


class NgramDrafter:
    """Prompt lookup decoding (Saxena 2023): match the context's last n tokens, n from max_n down to 1,
    against the earlier context, and propose the tokens that followed the latest match.

    An index from every n-gram to where its latest occurrence ends grows with the context, so a proposal
    costs O(max_n), not a scan. The context must only grow between calls (a shorter one starts over).

    Args:
        max_n: the longest suffix to match.
    """

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self.indexed = 0  # context length whose n-grams are in `ends`

    def fresh(self) -> "NgramDrafter":
        return NgramDrafter(self.max_n)

    def propose(self, tokens: Sequence[int], k: int, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Draft:
        """The tokens that followed the latest earlier occurrence of the longest matching suffix (<= k)."""
        self._extend(tokens)
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return Draft(list(tokens[end:end + k]))
        return Draft([])

    def _extend(self, tokens: Sequence[int]) -> None:
        # index the n-grams that end before the last token (those with a token after them)
        if len(tokens) < self.indexed:
            self.ends, self.indexed = {}, 0
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in range(1, min(self.max_n, end) + 1):
                self.ends[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))


class ModelDrafter:
    """A smaller model over the target's vocabulary drafts autoregressively from its own KV cache.

    Each proposal first rolls the cache back to the longest common prefix of what it holds and the new
    context (the target rejected the rest), then feeds the context's new tokens and drafts k more.

    Args:
        model: the draft model (eval mode), on the target's device.
        vocab_size: the target's vocabulary size: the draft's logits are cut to it, or padded with -inf
            (a model's vocabulary may be padded past its tokenizer's).
    """

    def __init__(self, model: Llama, vocab_size: int | None = None) -> None:
        self.model, self.vocab_size = model, vocab_size or model.config.vocab_size
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # the ids whose keys and values the cache holds, in order

    def fresh(self) -> "ModelDrafter":
        return ModelDrafter(self.model, self.vocab_size)

    @torch.no_grad()
    def propose(self, tokens: Sequence[int], k: int, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Draft:
        """k tokens drawn from the draft model as plain sampling would draw them (greedy: argmax)."""
        logits = self._sync(tokens)  # (1, V) after the last context token
        seen, drafted, qs = list(tokens), [], []
        for i in range(k):
            if sampling.repetition_penalty != 1.0:
                logits = penalize_repetition(logits, _ids(seen, logits.device), sampling.repetition_penalty)
            if sampling.temperature == 0:
                token = int(logits.argmax(-1))
            else:
                q = probs(logits, sampling)  # (1, V)
                token = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q[0])
            drafted.append(token)
            seen.append(token)
            if i + 1 < k:
                logits = self._feed([token])
        return Draft(drafted, torch.stack(qs) if qs else None)

    def _sync(self, tokens: Sequence[int]) -> Tensor:
        """Roll the cache back to its common prefix with `tokens` (keeping at least the last token to feed),
        feed the rest; returns the logits after the last token."""
        limit = min(len(self.fed), len(tokens) - 1)
        keep = next((i for i in range(limit) if self.fed[i] != tokens[i]), limit)
        if self.cache is not None:
            self.cache.pos = keep  # positions past it are overwritten by the next writes
        del self.fed[keep:]
        return self._feed(tokens[keep:])

    def _feed(self, ids: Sequence[int]) -> Tensor:
        self._reserve(len(self.fed) + len(ids))
        logits = self.model(_ids(ids, self.cache.k.device), cache=self.cache)[:, -1]  # (1, V_draft)
        self.fed += ids
        V = self.vocab_size
        if logits.shape[-1] >= V:
            return logits[:, :V]
        return torch.cat([logits, logits.new_full((1, V - logits.shape[-1]), float("-inf"))], dim=-1)

    def _reserve(self, length: int) -> None:
        # a cache with room for `length` positions, doubling (and copying) when it runs out
        if self.cache is not None and length <= self.cache.max_len:
            return
        old = self.cache
        self.cache = KVCache.new(self.model, 1, max(length, 256, 2 * (old.max_len if old else 0)))
        if old is not None:
            self.cache.k[..., :old.pos, :] = old.k[..., :old.pos, :]
            self.cache.v[..., :old.pos, :] = old.v[..., :old.pos, :]
            self.cache.pos = old.pos


def _ids(ids: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)


def probs(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """(n, V) the distributions plain sampling draws from: temperature, then top-k and top-p (sample_next's)."""
    return filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)


def penalize_rows(logits: Tensor, tokens: Sequence[int], draft: Sequence[int], penalty: float) -> Tensor:
    """CTRL's repetition penalty on verification logits: row j has seen `tokens` and draft[:j].

    Args:
        logits: (n, V) the target's logits at the last context token and the draft tokens.
        tokens: the context; draft: the proposed ids; penalty: as in SamplingConfig (1: off).
    """
    if penalty == 1.0:
        return logits
    seen = _ids(list(tokens) + list(draft), logits.device)  # (1, len(tokens) + len(draft))
    return torch.cat([penalize_repetition(logits[j:j + 1], seen[:, :len(tokens) + j], penalty)
                      for j in range(logits.shape[0])])


def residual(p: Tensor, q: Tensor | None, token: int) -> Tensor:
    """Where a rejected draft token's replacement is drawn from: norm(max(0, p - q)), unnormalised. A
    one-hot q (q=None) removes just the rejected token from p."""
    if q is None:
        out = p.clone()
        out[token] = 0.0
    else:
        out = (p - q).clamp_min(0.0)
    return out if out.sum() > 0 else p  # p == q up to rounding: nothing is left to correct


def verify(logits: Tensor, draft: Draft, sampling: SamplingConfig,
           generator: torch.Generator | None = None) -> list[int]:
    """The tokens one verification step emits: the accepted prefix of the draft, then one token of the
    target's (a replacement for the first rejected token, or a bonus token after the whole draft).

    Sampling follows Leviathan et al. 2023 (Algorithm 1) on the distributions plain sampling uses (after
    penalty, temperature, top-k and top-p): accept draft token d with probability min(1, p(d) / q(d)); on
    rejection draw from norm(max(0, p - q)); after k acceptances draw the bonus from the last row's p. Every
    emitted token then has the target's distribution. Greedy accepts d while d is the target's argmax. With an
    empty draft this is plain decoding (the same draw from the same generator).

    Args:
        logits: (k+1, V) the target's logits (penalty applied) at the last context token and the k draft tokens.
        draft: the proposal (its q on any device).
        sampling: temperature (0: greedy), top_k, top_p.
        generator: source of randomness.
    """
    k = len(draft.tokens)
    if sampling.temperature == 0:
        best = logits.argmax(-1).tolist()
        m = next((j for j in range(k) if draft.tokens[j] != best[j]), k)
        return draft.tokens[:m] + [best[m]]
    p = probs(logits, sampling)  # (k+1, V)
    m = k
    if k:
        d = torch.tensor(draft.tokens, device=p.device)
        rows = torch.arange(k, device=p.device)
        q_d = draft.q.to(p.device)[rows, d] if draft.q is not None else torch.ones(k, device=p.device)
        u = torch.rand(k, generator=generator, device=p.device)
        ok = (u * q_d < p[rows, d]).tolist()  # u < p/q: accepted with probability min(1, p/q)
        m = ok.index(False) if False in ok else k
    if m < k:
        q = draft.q[m].to(p.device) if draft.q is not None else None
        last = residual(p[m], q, draft.tokens[m])
    else:
        last = p[k]
    return draft.tokens[:m] + [int(torch.multinomial(last, 1, generator=generator))]


@torch.no_grad()
def speculative_generate_ids(model: Llama, prompt_ids: Sequence[int], drafter: Drafter, max_new_tokens: int = 128,
                             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                             repetition_penalty: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                             on_token: Callable[[int, int], bool] | None = None, k_max: int = 5,
                             cache: KVCache | None = None) -> tuple[list[int], SpecStats]:
    """Continue one prompt with speculative decoding; the same contract as generate_ids for one row.

    Args:
        model: the target model (eval mode).
        prompt_ids: the prompt's ids (non-empty).
        drafter: proposes draft tokens (a fresh one per sequence: see Drafter.fresh).
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed: as in generate_ids.
        stop_ids: the decode ends after one of these (kept in the output).
        on_token: called as on_token(0, token) for each new token; returning True ends the decode.
        k_max: the most draft tokens per step (the length adapts in [1, k_max]).
        cache: a one-row KVCache holding the keys and values of the first `cache.pos` prompt ids (fewer than
            all of them); it ends holding every id but the last new one. Needs max_len >= prompt +
            max_new_tokens + k_max (a verification step writes up to k_max positions past its last token).

    Returns:
        the new ids, and the step's acceptance counts.
    """
    cfg = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens, out, stop = list(prompt_ids), [], set(stop_ids)
    need = len(tokens) + max_new_tokens + k_max
    if cache is not None and (cache.pos >= len(tokens) or cache.max_len < need):
        raise ValueError("a given KV cache needs a prefix of the prompt and room for the drafts")
    cache = cache if cache is not None else KVCache.new(model, 1, need)
    if len(tokens) - 1 > cache.pos:  # the last prompt token is fed with the first draft
        model(_ids(tokens[cache.pos:-1], device), cache=cache)
    length, stats = DraftLength(k_max), SpecStats()
    while True:  # here the cache holds every token but the last
        k = min(length.k, max_new_tokens - len(out) - 1)  # the step emits at most k + 1 tokens
        draft = drafter.propose(tokens, k, cfg, generator) if k > 0 else Draft([])
        start = cache.pos
        logits = model(_ids([tokens[-1]] + draft.tokens, device), cache=cache)[0]  # (k+1, V)
        new = verify(penalize_rows(logits, tokens, draft.tokens, repetition_penalty), draft, cfg, generator)
        cache.pos = start + len(new)  # roll back past the rejected draft tokens (the last new one is not fed)
        stats.record(len(draft.tokens), len(new) - 1)
        length.update(len(draft.tokens), len(new) - 1)
        for token in new:
            out.append(token)
            tokens.append(token)
            ended = token in stop
            if on_token is not None and on_token(0, token):
                ended = True
            if ended or len(out) >= max_new_tokens:
                return out, stats
