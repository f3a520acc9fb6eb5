"""Sampling and decoding on top of the model's KV cache: greedy, temperature, top-k, top-p,
repetition penalty, stop tokens and stop strings, streaming, several samples at once."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.decode import StaticDecoder
from tinylm.infer.sampling import SamplingConfig, penalize_repetition, sample_next
from tinylm.infer.speculative import Drafter, SpecStats, speculative_generate_ids
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama


@torch.no_grad()
def generate_ids(model: Llama, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int, int], bool] | None = None, constraints: Sequence[Any] | None = None,
                 fast: bool = False, cache: KVCache | None = None) -> list[int] | list[list[int]]:
    """Continue one prompt (a list of ids) or a batch of equal-length prompts; return the new ids.

    Args:
        model: the model (eval mode).
        prompt_ids: ids of one prompt, or a list of prompts of the same length (one row each).
        max_new_tokens: the most tokens to add to each row.
        temperature, top_k, top_p, repetition_penalty, seed: see SamplingConfig.
        stop_ids: a row ends after it emits one of these (the stop id is kept in its output).
        on_token: called as on_token(row, token_id) for each new token; returning True ends that row.
        constraints: one per row, objects with `allowed(remaining) -> (V,) bool` (tokens allowed next,
            given the tokens left) and `advance(token) -> bool` (True ends the row), e.g.
            jsonschema_fsm.JsonConstraint.
        fast: decode with StaticDecoder (fixed-shape cache, compiled one-token step); same tokens.
        cache: a one-row KVCache holding the keys and values of the first `cache.pos` prompt ids (fewer than
            all of them), e.g. the previous turn of a chat; only the rest of the prompt is computed, and the
            cache keeps every id fed (all but the last new one). Needs max_len >= prompt + max_new_tokens.

    Returns:
        the new ids of the prompt, or a list of them per row.
    """
    single = len(prompt_ids) == 0 or isinstance(prompt_ids[0], int)
    rows = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise TinylmError("generation needs non-empty prompts of equal length")
    cfg = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    T = len(rows[0])
    # every id so far, for the repetition penalty; filled in place (no per-token concatenation)
    seq = torch.empty(len(rows), T + max_new_tokens, dtype=torch.long, device=device)  # (B, T + new)
    seq[:, :T] = torch.tensor(rows, dtype=torch.long, device=device)
    if cache is not None and (fast or len(rows) != 1 or cache.pos >= T or cache.max_len < T + max_new_tokens):
        raise ValueError("a given KV cache needs one row, eager decoding, a prefix of the prompt and room")
    if fast:
        step: Callable[[Tensor], Tensor] = StaticDecoder(model, len(rows), T + max_new_tokens)
    else:
        cache = cache if cache is not None else KVCache.new(model, len(rows), T + max_new_tokens)
        step = partial(_cached_forward, model, cache)
    if constraints is not None:
        on_token = _with_constraints(constraints, on_token)
    out: list[list[int]] = [[] for _ in rows]
    done, stop = [False] * len(rows), set(stop_ids)  # per-token bookkeeping in Python, not tiny tensors
    start = cache.pos if cache is not None else 0  # ids already in a given cache
    logits = step(seq[:, start:T])[:, -1]  # (B, V)
    for i in range(max_new_tokens):
        if cfg.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seq[:, :T + i], cfg.repetition_penalty)
        if constraints is not None:
            logits = _constrain(logits, constraints, max_new_tokens - i)
        nxt = sample_next(logits, cfg, generator)  # (B,)
        seq[:, T + i] = nxt
        done = _record(nxt.tolist(), done, out, stop, on_token)
        if all(done):
            break
        logits = step(nxt[:, None])[:, -1]
    return out[0] if single else out


def _cached_forward(model: Llama, cache: KVCache, ids: Tensor) -> Tensor:
    return model(ids, cache=cache, last_only=True)  # (B, 1, V): generate_ids reads the last position only


def _constrain(logits: Tensor, constraints: Sequence[Any], remaining: int) -> Tensor:
    # -inf for every token a row's constraint forbids; (B, V)
    allowed = torch.stack([c.allowed(remaining) for c in constraints]).to(logits.device)
    return logits.masked_fill(~allowed, float("-inf"))


def _with_constraints(constraints: Sequence[Any], on_token: Callable[[int, int], bool] | None
                      ) -> Callable[[int, int], bool]:
    # Advance the row's constraint on every token; the row ends when either the constraint or on_token says so.
    def call(row: int, token: int) -> bool:
        finished = constraints[row].advance(token)
        return bool(on_token(row, token)) or finished if on_token is not None else finished
    return call


def _record(nxt: list[int], done: list[bool], out: list[list[int]], stop: set[int],
            on_token: Callable[[int, int], bool] | None) -> list[bool]:
    # Append each unfinished row's token; mark rows that hit a stop id or whose callback asks to stop.
    done = list(done)
    for row, token in enumerate(nxt):
        if done[row]:
            continue
        out[row].append(token)
        ended = token in stop
        if on_token is not None and on_token(row, token):
            ended = True
        done[row] = ended
    return done


class TextStream:
    """Turns ids into text as they come, holding back incomplete UTF-8 and possible stop-string prefixes.

    Args:
        tokenizer: decodes ids.
        stops: strings that end the text (not included in it).
        write: receives each new piece of text (e.g. sys.stdout.write).
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), write: Callable[[str], object] | None = None):
        self.tokenizer, self.stops, self.write = tokenizer, [s for s in stops if s], write
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already written
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add a token; returns True once a stop string has appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
        else:
            self.text = text
        self._flush(final=self.stopped)
        return self.stopped

    def _flush(self, final: bool) -> None:
        safe = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                safe = len(self.text.rstrip("\ufffd"))
            for s in self.stops:  # hold back a tail that could be the start of a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        if self.write and safe > self.shown:
            self.write(self.text[self.shown:safe])
            self.shown = safe

    def finish(self) -> str:
        self._flush(final=True)
        return self.text


def generate(model: Llama, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             n: int = 1, add_bos: bool = False, write: Callable[[str], object] | None = None,
             constraint: Callable[[], Any] | None = None, fast: bool = False, drafter: Drafter | None = None,
             draft_k: int = 5, stats: SpecStats | None = None) -> str | list[str]:
    """Continue a text prompt; return the new text (or n of them).

    Args:
        model, tokenizer: the model and its tokenizer.
        prompt: the text to continue (already chat-formatted if wanted).
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed: see SamplingConfig.
        stop: strings that end a sample; the eos token always does.
        n: number of samples, decoded as one batch.
        add_bos: put the tokenizer's bos token first.
        write: stream the text of the first sample to this callable as it is generated.
        constraint: makes a fresh per-sample constraint (see generate_ids), e.g. for JSON schemas.
        fast: decode with StaticDecoder (compiled one-token step).
        drafter: decode speculatively with this drafter (speculative.py; one sample, no constraint, not fast),
            drafting up to `draft_k` tokens per step; its acceptance counts are added to `stats`.
    """
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if not ids:
        raise TinylmError("the prompt is empty; give some text or use --add-bos")
    streams = [TextStream(tokenizer, stop, write if row == 0 else None) for row in range(n)]
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]
    if drafter is not None:
        if n != 1 or constraint is not None or fast:
            raise ValueError("speculative decoding takes one sample, no constraint, and no fast path")
        _, counts = speculative_generate_ids(model, ids, drafter, max_new_tokens, temperature, top_k, top_p,
                                             repetition_penalty, seed, stop_ids, k_max=draft_k,
                                             on_token=lambda row, tok: tok in stop_ids or streams[0].push(tok))
        if stats is not None:
            stats.add(counts)
        return streams[0].finish()
    generate_ids(model, [ids] * n, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                 stop_ids, on_token=lambda row, tok: tok in stop_ids or streams[row].push(tok),
                 constraints=[constraint() for _ in range(n)] if constraint else None, fast=fast)
    texts = [s.finish() for s in streams]
    return texts[0] if n == 1 else texts
