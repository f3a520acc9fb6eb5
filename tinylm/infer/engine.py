"""The inference engine: many requests decoded together with continuous batching.

Requests join and leave between steps (Yu et al. 2022, Orca's iteration-level scheduling); each has its own
sampling settings and seeded generator, stop ids and strings, JSON-schema constraint and token limit. Their
keys and values live in one pool of fixed-size blocks (vLLM's PagedAttention, Kwon et al. 2023): a request
reserves the blocks of its whole context (prompt + max_tokens) when it is admitted, so it is never
preempted, and no block holds padding. Full blocks are found again by the hash of the tokens up to their end,
so a prompt prefix that an earlier or a running request computed (a system prompt, a chat's previous turn) is
reused, not recomputed. A step prefills the requests admitted in it one at a time, chooses one token for
every running request, and runs one batched forward of the model's own `forward` over a `PagedCache`.

Given a drafter, every step is a speculative one instead (speculative.py): each running request drafts up to
`draft_k` tokens, one batched forward verifies every row's draft over its own positions, and each row keeps
its accepted prefix plus one token of the model's; rejected positions are rolled back by moving the row's
position (the pool slots past it are simply written again). Each row's greedy output stays its plain one.

The server and routing build on `submit`, `step` and `cancel`; every token comes back
as a `TokenEvent` with its text delta (multi-byte UTF-8 and stop-string prefixes held back, as TextStream
does), its log-probability and optionally the top log-probabilities.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Count
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.generate import TextStream
from tinylm.infer.sampling import SamplingConfig, penalize_repetition, sample_next
from tinylm.infer.speculative import (
    Draft,
    Drafter,
    DraftLength,
    SpecStats,
    penalize_rows,
    verify,
)
from tinylm.model.kvcache import PagedCache
from tinylm.model.llama import Llama


@dataclass
class EngineConfig:
    """How the engine batches and caches."""

    max_batch: Count = 16  # requests decoded together; the others wait in the queue
    block_size: Count = 16  # positions per KV-cache block (the unit of allocation and prefix reuse)
    kv_tokens: Count = 65536  # most positions the KV pool may hold, all requests together (grows up to it)
    prefix_cache: bool = True  # reuse the cached blocks of a prompt prefix computed before
    draft_k: Count = 5  # with a drafter: the most draft tokens per step (the length adapts between 1 and this)


@dataclass
class TokenEvent:
    """One generated token of one request.

    Args:
        request: the request's id (from `Engine.submit`).
        token: the token id.
        text: the new text it completes (may be empty: a held-back partial character or stop prefix).
        logprob: its log-probability under the model's raw logits (before penalty, temperature, filters).
        top_logprobs: the request's `top_logprobs` most likely (token, log-probability) pairs, best first.
        finish_reason: None while the request goes on; "stop" or "length" on its last token.
    """

    request: int
    token: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None


@dataclass
class Completion:
    """A finished request.

    Args:
        request: its id.
        token_ids: the generated ids (a stop id or the token that completed a stop string included).
        text: the generated text, cut before a stop string (empty without a tokenizer).
        finish_reason: "stop" (a stop id, stop string or finished constraint), "length" or "cancelled".
        logprobs, top_logprobs: per generated token, as in TokenEvent.
        cached_tokens: prompt tokens whose keys and values came from the prefix cache.
    """

    request: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    cached_tokens: int


@dataclass
class Request:
    """What to generate for one prompt.

    Args:
        prompt_ids: the prompt's token ids (non-empty).
        max_tokens: the most tokens to generate.
        sampling: temperature (0: greedy), top_k, top_p, repetition penalty and seed of this request.
        stop: strings that end the text (cut from it); need the engine's tokenizer.
        stop_ids: ids that end the request, kept in its ids; None: the tokenizer's (else the model's) eos.
        constraint: this request's own constraint object (`allowed(remaining)`, `advance(token)`), such as
            constrained.JsonConstraint.
        top_logprobs: how many of the most likely tokens to report with each token.
        on_token: called with each TokenEvent as it is generated (streaming).
        on_finish: called with the Completion when the request ends (cancelled ones included).
    """

    prompt_ids: Sequence[int]
    max_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] | None = None
    constraint: Any = None
    top_logprobs: int = 0
    on_token: Callable[[TokenEvent], object] | None = None
    on_finish: Callable[[Completion], object] | None = None


class BlockPool:
    """Keys and values of every request in fixed-size blocks, with reference counts and a prefix cache.

    A full block is registered under the digest of all tokens up to its end (a SHA-256 chain over the
    blocks); it stays cached after its requests end and is evicted, least recently released first, only
    when no free block is left and the pool cannot grow.

    Args:
        model: the model whose keys and values are stored (shape, device, dtype).
        block_size: positions per block.
        max_blocks: the most blocks the pool grows to.
    """

    def __init__(self, model: Llama, block_size: int, max_blocks: int) -> None:
        cfg, p = model.config, next(model.parameters())
        self.block_size, self.max_blocks = block_size, max_blocks
        self.k = torch.zeros(cfg.n_layers, 0, cfg.n_kv_heads, cfg.head_dim, dtype=p.dtype, device=p.device)
        self.v = torch.zeros_like(self.k)  # (L, n_blocks * block_size, Hkv, hd)
        self.refs: list[int] = []
        self.digest_of: list[bytes | None] = []
        self.by_digest: dict[bytes, int] = {}
        self.free: list[int] = []
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.evicted = 0  # cached blocks reused for other content so far

    @property
    def n_blocks(self) -> int:
        return len(self.refs)

    def digests(self, tokens: Sequence[int], n: int, prev: Sequence[bytes] = ()) -> list[bytes]:
        """The digests of the first n full blocks of `tokens`, extending the already known `prev`."""
        out, bs = list(prev), self.block_size
        for j in range(len(out), n):
            parent = out[-1] if out else b""
            out.append(hashlib.sha256(parent + array("q", tokens[j * bs:(j + 1) * bs]).tobytes()).digest())
        return out

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The cached blocks that hold the first blocks of `tokens`, at most `limit` of them."""
        found: list[int] = []
        for digest in self.digests(tokens, limit):
            if digest not in self.by_digest:
                break
            found.append(self.by_digest[digest])
        return found

    def available(self, reused: Sequence[int]) -> int:
        """Blocks a request could take besides `reused` (free, evictable, or still to grow)."""
        held = sum(1 for b in reused if self.refs[b] == 0)  # evictable blocks it would take as reused
        return len(self.free) + len(self.evictable) - held + self.max_blocks - self.n_blocks

    def take(self, reused: Sequence[int], n_new: int) -> list[int]:
        """Reference `reused` and `n_new` new blocks (free, then grown, then evicted); returns them in order."""
        for b in reused:
            self.evictable.pop(b, None)
            self.refs[b] += 1
        if n_new > len(self.free) and self.n_blocks < self.max_blocks:
            self._grow(n_new - len(self.free))
        new = []
        for _ in range(n_new):
            b = self.free.pop() if self.free else self._evict()
            self.refs[b] = 1
            new.append(b)
        return list(reused) + new

    def register(self, blocks: Sequence[int], digests: Sequence[bytes]) -> None:
        """Cache full blocks under their digests (a block whose content another one already caches stays out)."""
        for b, digest in zip(blocks, digests):
            if self.digest_of[b] is None and digest not in self.by_digest:
                self.by_digest[digest], self.digest_of[b] = b, digest

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones become evictable (cached) or free."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0 and self.digest_of[b] is not None:
                self.evictable[b] = None
            elif self.refs[b] == 0:
                self.free.append(b)

    def slots(self, tables: Sequence[Sequence[int]], length: int) -> Tensor:
        """(B, length) pool positions of context positions 0..length-1 of each row's block table."""
        width = max(len(t) for t in tables)
        table = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], device=self.k.device)
        s = torch.arange(length, device=self.k.device)
        return table[:, s // self.block_size] * self.block_size + s % self.block_size  # (B, length)

    def _grow(self, at_least: int) -> None:
        """Double the pool (or more, to fit `at_least` new blocks), up to max_blocks; copies the old pool."""
        n = min(self.max_blocks, max(2 * self.n_blocks, self.n_blocks + at_least))
        shape = (self.k.shape[0], n * self.block_size, *self.k.shape[2:])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :self.k.shape[1]], v[:, :self.v.shape[1]] = self.k, self.v
        self.k, self.v = k, v
        self.free += range(n - 1, self.n_blocks - 1, -1)  # popped from the end: lowest ids first
        self.refs += [0] * (n - self.n_blocks)
        self.digest_of += [None] * (n - len(self.digest_of))

    def _evict(self) -> int:
        b, _ = self.evictable.popitem(last=False)
        del self.by_digest[self.digest_of[b]]
        self.digest_of[b] = None
        self.evicted += 1
        return b


@dataclass
class _Live:
    """A request being decoded: its blocks, tokens so far and the logits of its next token."""

    id: int
    req: Request
    stop_ids: set[int]
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt + generated ids
    pos: int = 0  # positions whose keys and values are in the pool
    cached: int = 0  # prompt positions reused from the prefix cache
    digests: list[bytes] = field(default_factory=list)  # of its full blocks, as far as computed
    logits: Tensor | None = None  # (1, V) of the next token
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    pending: list[str] = field(default_factory=list)  # text the stream wrote since the last event
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    drafter: Drafter | None = None  # this request's own drafter (speculative decoding)
    length: DraftLength | None = None  # its adaptive draft length


class Engine:
    """Continuous batching over one model: submit requests, step until they finish, cancel any between steps
    (or from a callback). Not thread-safe: one thread (a server's loop) calls submit, step and cancel.

    Args:
        model: the model (eval mode), on any device.
        tokenizer: decodes text deltas and stop strings (None: ids only).
        cfg: batch size, block size, KV pool size, prefix caching, draft length.
        drafter: decode speculatively with (a fresh copy of) this drafter per request (speculative.py).
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, cfg: EngineConfig | None = None,
                 drafter: Drafter | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.drafter = model, tokenizer, cfg or EngineConfig(), drafter
        self.spec_stats = SpecStats()  # acceptance counts of every speculative step so far
        self.device = next(model.parameters()).device
        self.pool = BlockPool(model, self.cfg.block_size, -(-self.cfg.kv_tokens // self.cfg.block_size))
        self.waiting: OrderedDict[int, Request] = OrderedDict()
        self.running: dict[int, _Live] = {}
        self.completions: dict[int, Completion] = {}  # finished requests, until `pop`ped
        self._next_id = 0

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. Bad requests are one-line TinylmErrors, raised here.

        Args:
            request: what to generate.
        """
        self._check(request)
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting[rid] = request
        return rid

    def cancel(self, rid: int) -> None:
        """End a waiting or running request now, freeing its blocks; its Completion says "cancelled".

        Args:
            rid: the request's id; an unknown or finished one is ignored.
        """
        if rid in self.waiting:
            self._finish(_Live(rid, self.waiting.pop(rid), set()), "cancelled")
        elif rid in self.running:
            self._finish(self.running[rid], "cancelled")

    def pop(self, rid: int) -> Completion:
        """The Completion of a finished request, removed from the engine."""
        return self.completions.pop(rid)

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefilling their prompts), choose one token for every running request,
        and run the batched forward of those that go on (with a drafter: one speculative step, which emits
        one or more tokens per request). Returns this step's events."""
        self._admit()
        if self.drafter is not None:
            return self._speculate(list(self.running.values()))
        # (a callback may cancel requests: those are skipped)
        events = [self._choose(live) for live in list(self.running.values()) if live.id in self.running]
        if self.running:
            self._decode(list(self.running.values()))
        return events

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Submit `requests`, step until they all finish, and return their Completions in order."""
        ids = [self.submit(r) for r in requests]
        while any(i not in self.completions for i in ids):
            self.step()
        return [self.pop(i) for i in ids]

    # ----- admission and prefill -----

    def _check(self, r: Request) -> None:
        vocab = self.model.config.vocab_size
        if not r.prompt_ids:
            raise TinylmError("a request needs a non-empty prompt")
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab:
            raise TinylmError(f"a prompt token id is outside the model's vocabulary [0, {vocab})")
        if r.max_tokens < 1 or not 0 <= r.top_logprobs <= vocab:
            raise TinylmError(f"max_tokens must be >= 1 and top_logprobs in [0, {vocab}], got {r.max_tokens} "
                              f"and {r.top_logprobs}")
        if r.stop and self.tokenizer is None:
            raise TinylmError("stop strings need a tokenizer")
        need = self._context(len(r.prompt_ids), r.max_tokens)
        if need > self.pool.max_blocks * self.cfg.block_size:
            raise TinylmError(f"a request of {need} tokens (prompt + max_tokens, + draft_k with a drafter) exceeds "
                              f"the KV cache's {self.pool.max_blocks * self.cfg.block_size} positions (kv_tokens)")

    def _admit(self) -> None:
        """Start waiting requests in order while a batch row and their blocks are free."""
        while self.waiting and len(self.running) < self.cfg.max_batch:
            rid, req = next(iter(self.waiting.items()))
            prompt = list(req.prompt_ids)
            n_blocks = -(-self._context(len(prompt), req.max_tokens) // self.cfg.block_size)
            # at least the last prompt token is computed: its logits choose the first new token
            reused = self.pool.lookup(prompt, (len(prompt) - 1) // self.cfg.block_size) if self.cfg.prefix_cache else []
            if self.pool.available(reused) < n_blocks - len(reused):
                return  # wait for running requests to free blocks
            del self.waiting[rid]
            live = self._start(rid, req, prompt)
            live.blocks = self.pool.take(reused, n_blocks - len(reused))
            live.pos = live.cached = len(reused) * self.cfg.block_size
            self._prefill(live)
            self.running[rid] = live

    def _context(self, prompt: int, max_tokens: int) -> int:
        # positions a request may write: a verification step writes up to draft_k past its last token
        return prompt + max_tokens + (self.cfg.draft_k if self.drafter is not None else 0)

    def _start(self, rid: int, req: Request, prompt: list[int]) -> _Live:
        eos = self.tokenizer.eos_id if self.tokenizer is not None else self.model.config.eos_token_id
        stop_ids = set(req.stop_ids) if req.stop_ids is not None else {eos} - {None}
        live = _Live(rid, req, stop_ids, tokens=prompt)
        if req.sampling.seed is not None:
            live.generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        if self.tokenizer is not None:
            live.stream = TextStream(self.tokenizer, req.stop, live.pending.append)
        if self.drafter is not None:
            live.drafter, live.length = self.drafter.fresh(), DraftLength(self.cfg.draft_k)
        return live

    def _prefill(self, live: _Live) -> None:
        """Compute the prompt after its cached prefix; keep the last position's logits. Speculative decoding
        leaves the last prompt token out: the first verification step feeds it with the first draft."""
        end = len(live.tokens) - (self.drafter is not None)
        if end > live.pos:
            ids = torch.tensor([live.tokens[live.pos:end]], device=self.device)  # (1, T)
            cache = PagedCache(self.pool.k, self.pool.v, self.pool.slots([live.blocks], end), [live.pos])
            live.logits = self.model(ids, cache=cache, last_only=True)[:, -1]  # (1, V)
        live.pos = end
        self._register(live)

    def _register(self, live: _Live) -> None:
        # cache the full blocks whose keys and values are all written
        if self.cfg.prefix_cache:
            n = live.pos // self.cfg.block_size
            live.digests = self.pool.digests(live.tokens, n, live.digests)
            self.pool.register(live.blocks[:n], live.digests)

    # ----- decoding -----

    def _choose(self, live: _Live) -> TokenEvent:
        """Choose a running request's next token as generate_ids does (penalty, constraint, sampling), record
        it and emit its event; ends the request on a stop or its token limit."""
        req, logits = live.req, live.logits
        logp = logits[0].float().log_softmax(-1)  # (V,)
        if req.sampling.repetition_penalty != 1.0:
            seen = torch.tensor([live.tokens], device=self.device)  # (1, S)
            logits = penalize_repetition(logits, seen, req.sampling.repetition_penalty)
        logits = self._constrain(live, logits)
        token = int(sample_next(logits, req.sampling, live.generator)[0])
        return self._emit(live, token, logp)

    def _emit(self, live: _Live, token: int, logp: Tensor) -> TokenEvent:
        """Record a request's next token (logp: (V,) its position's raw log-probabilities) and emit its
        event; ends the request on a stop or its token limit."""
        req = live.req
        top = logp.topk(req.top_logprobs) if req.top_logprobs else None
        live.out.append(token)
        live.tokens.append(token)
        live.logprobs.append(float(logp[token]))
        live.top.append(list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])
        reason = "stop" if self._ends(live, token) else "length" if len(live.out) >= req.max_tokens else None
        if reason is not None and live.stream is not None:
            live.stream.finish()  # the held-back text goes out with the last token
        event = TokenEvent(live.id, token, "".join(live.pending), live.logprobs[-1], live.top[-1], reason)
        live.pending.clear()
        if req.on_token is not None:
            req.on_token(event)
        if reason is not None and live.id in self.running:  # on_finish after the last event (unless cancelled)
            self._finish(live, reason)
        return event

    def _constrain(self, live: _Live, logits: Tensor) -> Tensor:
        # -inf for the tokens the request's constraint forbids next; logits (1, V)
        if live.req.constraint is None:
            return logits
        allowed = live.req.constraint.allowed(live.req.max_tokens - len(live.out)).to(self.device)  # (V,)
        return logits.masked_fill(~allowed, float("-inf"))

    def _ends(self, live: _Live, token: int) -> bool:
        # generate()'s order: the constraint advances on every token, the stream sees every non-stop id
        finished = live.req.constraint.advance(token) if live.req.constraint is not None else False
        if token in live.stop_ids:
            return True
        stopped = live.stream.push(token) if live.stream is not None else False
        return stopped or finished

    def _decode(self, rows: list[_Live]) -> None:
        """One batched forward of every running request's last token, each at its own position."""
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (B, 1)
        pos = [r.pos for r in rows]
        cache = PagedCache(self.pool.k, self.pool.v, self.pool.slots([r.blocks for r in rows], max(pos) + 1), pos)
        logits = self.model(ids, cache=cache)[:, -1]  # (B, V)
        for i, r in enumerate(rows):
            r.logits, r.pos = logits[i:i + 1], r.pos + 1
            if r.pos % self.cfg.block_size == 0:
                self._register(r)

    # ----- speculative decoding -----

    def _speculate(self, rows: list[_Live]) -> list[TokenEvent]:
        """One speculative step: every row drafts, one batched forward scores each row's last token and draft
        (shorter drafts padded), and each row emits its accepted prefix plus one token of the model's."""
        if not rows:
            return []
        drafts = [self._draft(r) for r in rows]
        K = max(len(d.tokens) for d in drafts)
        ids = torch.tensor([[r.tokens[-1]] + d.tokens + [0] * (K - len(d.tokens)) for r, d in zip(rows, drafts)],
                           device=self.device)  # (B, K+1); a padded position is scored, never used
        pos = [r.pos for r in rows]
        slots = self.pool.slots([r.blocks for r in rows], max(pos) + K + 1)  # within each row's blocks (_context)
        logits = self.model(ids, cache=PagedCache(self.pool.k, self.pool.v, slots, pos))  # (B, K+1, V)
        events: list[TokenEvent] = []
        for i, (r, d) in enumerate(zip(rows, drafts)):
            if r.id in self.running:  # (a callback may have cancelled it)
                events += self._accept(r, d, logits[i, :len(d.tokens) + 1])
        return events

    def _draft(self, live: _Live) -> Draft:
        # no draft where the step may emit only one token, or under a constraint (it cannot judge a draft)
        k = min(live.length.k, live.req.max_tokens - len(live.out) - 1)
        if k <= 0 or live.req.constraint is not None:
            return Draft([])
        return live.drafter.propose(live.tokens, k, live.req.sampling, live.generator)

    def _accept(self, live: _Live, draft: Draft, logits: Tensor) -> list[TokenEvent]:
        """Verify a row's draft (logits: (k+1, V)), emit the tokens it keeps, and roll its position back to
        the last kept token that was fed (its last token is fed by the next step)."""
        req, logp = live.req, logits.float().log_softmax(-1)  # (k+1, V)
        logits = self._constrain(live, logits)  # a constrained row has no draft: one row of logits
        logits = penalize_rows(logits, live.tokens, draft.tokens, req.sampling.repetition_penalty)
        new = verify(logits, draft, req.sampling, live.generator)
        self.spec_stats.record(len(draft.tokens), len(new) - 1)
        live.length.update(len(draft.tokens), len(new) - 1)
        base, events = live.pos + 1, []  # the row's last token is now in the pool
        for j, token in enumerate(new):
            live.pos = base + min(j + 1, len(new) - 1)  # accepted draft tokens are in the pool, the last is not
            events.append(self._emit(live, token, logp[j]))
            if live.id not in self.running:
                return events
        self._register(live)
        return events

    def _finish(self, live: _Live, reason: str) -> None:
        """Record the Completion, free the request's blocks (full ones stay cached) and call on_finish."""
        text = live.stream.finish() if live.stream is not None else ""
        if live.blocks:
            self._register(live)
            self.pool.release(live.blocks)
        self.running.pop(live.id, None)
        done = Completion(live.id, live.out, text, reason, live.logprobs, live.top, live.cached)
        self.completions[live.id] = done
        if live.req.on_finish is not None:
            live.req.on_finish(done)
