"""Sampling and decoding on top of the model's KV cache: greedy, temperature, top-k, top-p,
repetition penalty, stop tokens and stop strings, streaming, several samples at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from tinylm.config import TinylmError
from tinylm.model import KVCache, Llama
from tinylm.tokenizer import Tokenizer


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
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_ids(model: Llama, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int, int], bool] | None = None) -> list[int] | list[list[int]]:
    """Continue one prompt (a list of ids) or a batch of equal-length prompts; return the new ids.

    Args:
        model: the model (eval mode).
        prompt_ids: ids of one prompt, or a list of prompts of the same length (one row each).
        max_new_tokens: the most tokens to add to each row.
        temperature, top_k, top_p, repetition_penalty, seed: see SamplingConfig.
        stop_ids: a row ends after it emits one of these (the stop id is kept in its output).
        on_token: called as on_token(row, token_id) for each new token; returning True ends that row.

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
    seq = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T)
    cache = KVCache.new(model, len(rows), seq.shape[1] + max_new_tokens)
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    logits = model(seq, cache=cache)[:, -1]  # (B, V)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        if cfg.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seq, cfg.repetition_penalty)
        nxt = sample_next(logits, cfg, generator)  # (B,)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done = _record(nxt, done, out, stop, on_token)
        if bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out[0] if single else out


def _record(nxt: Tensor, done: Tensor, out: list[list[int]], stop: Tensor,
            on_token: Callable[[int, int], bool] | None) -> Tensor:
    # Append each unfinished row's token; mark rows that hit a stop id or whose callback asks to stop.
    done = done.clone()
    for row, token in enumerate(nxt.tolist()):
        if done[row]:
            continue
        out[row].append(token)
        ended = bool((stop == token).any()) if stop.numel() else False
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
             n: int = 1, add_bos: bool = False,
             write: Callable[[str], object] | None = None) -> str | list[str]:
    """Continue a text prompt; return the new text (or n of them).

    Args:
        model, tokenizer: the model and its tokenizer.
        prompt: the text to continue (already chat-formatted if wanted).
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed: see SamplingConfig.
        stop: strings that end a sample; the eos token always does.
        n: number of samples, decoded as one batch.
        add_bos: put the tokenizer's bos token first.
        write: stream the text of the first sample to this callable as it is generated.
    """
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if not ids:
        raise TinylmError("the prompt is empty; give some text or use --add-bos")
    streams = [TextStream(tokenizer, stop, write if row == 0 else None) for row in range(n)]
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]
    generate_ids(model, [ids] * n, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                 stop_ids, on_token=lambda row, tok: tok in stop_ids or streams[row].push(tok))
    texts = [s.finish() for s in streams]
    return texts[0] if n == 1 else texts


@dataclass
class GenerateConfig:
    """What `tinylm generate` does.

    Args:
        prompts: the prompts, each continued `n` times.
        chat: wrap each prompt as a user message in the tokenizer's chat template.
        system: a system message for chat.
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, n, add_bos: see `generate`.
    """

    prompts: list[str]
    chat: bool = False
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: Sequence[str] = ()
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise TinylmError("--max-tokens and --n must be at least 1")
        SamplingConfig(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """Prompts from arguments, from a file (one per line), or from stdin ("-")."""
    import sys
    from pathlib import Path

    if prompts:
        return prompts
    if prompt_file is None:
        raise TinylmError("give a prompt: --prompt TEXT or --prompt-file FILE (- for stdin)")
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinylmError(f"cannot read prompts from {prompt_file}: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TinylmError(f"no prompts in {prompt_file}")
    return lines


def run(model: Llama, tokenizer: Tokenizer | None, cfg: GenerateConfig, out: Callable[[str], object] | None = None) -> list[str]:
    """Generate for every prompt, streaming to `out` (default stdout); return the texts."""
    import sys

    if tokenizer is None:
        raise TinylmError("this model has no tokenizer; generation needs one")
    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    results: list[str] = []
    for prompt in cfg.prompts:
        text = prompt
        if cfg.chat:
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
                {"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for i in range(cfg.n):
            if not cfg.chat:
                write(prompt)
            seed = None if cfg.seed is None else cfg.seed + i
            sample = generate(model, tokenizer, text, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.repetition_penalty, seed, cfg.stop, 1, cfg.add_bos, write)
            write("\n" if cfg.n == 1 and len(cfg.prompts) == 1 else "\n---\n")
            results.append(sample)
    return results
