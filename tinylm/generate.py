"""Sampling and decoding on top of the model's KV cache: greedy, temperature, top-k, top-p,
repetition penalty, stop tokens and stop strings, streaming, several samples at once."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.config import TinylmError
from tinylm.model import KVCache, Llama, apply_rope
from tinylm.qlinear import QLinear, int8_matmul
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


@torch.no_grad()
def generate_ids(model: Llama, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int, int], bool] | None = None, constraints: Sequence[Any] | None = None,
                 fast: bool = False) -> list[int] | list[list[int]]:
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
    if fast:
        step: Callable[[Tensor], Tensor] = StaticDecoder(model, len(rows), T + max_new_tokens)
    else:
        step = partial(_cached_forward, model, KVCache.new(model, len(rows), T + max_new_tokens))
    if constraints is not None:
        on_token = _with_constraints(constraints, on_token)
    out: list[list[int]] = [[] for _ in rows]
    done, stop = [False] * len(rows), set(stop_ids)  # per-token bookkeeping in Python, not tiny tensors
    logits = step(seq[:, :T])[:, -1]  # (B, V)
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
    return model(ids, cache=cache)


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
             constraint: Callable[[], Any] | None = None, fast: bool = False) -> str | list[str]:
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
    """
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if not ids:
        raise TinylmError("the prompt is empty; give some text or use --add-bos")
    streams = [TextStream(tokenizer, stop, write if row == 0 else None) for row in range(n)]
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]
    generate_ids(model, [ids] * n, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                 stop_ids, on_token=lambda row, tok: tok in stop_ids or streams[row].push(tok),
                 constraints=[constraint() for _ in range(n)] if constraint else None, fast=fast)
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
        constraint: a per-sample constraint factory (JSON schema); the prompt is then not echoed.
        fast: decode with StaticDecoder (compiled one-token step).
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
    constraint: Callable[[], Any] | None = None
    fast: bool = False

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
            if not cfg.chat and cfg.constraint is None:
                write(prompt)
            seed = None if cfg.seed is None else cfg.seed + i
            sample = generate(model, tokenizer, text, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.repetition_penalty, seed, cfg.stop, 1, cfg.add_bos, write, cfg.constraint, cfg.fast)
            write("\n" if cfg.n == 1 and len(cfg.prompts) == 1 else "\n---\n")
            results.append(sample)
    return results


# ----- fast decoding: a fixed-shape step over a static cache, compiled once (deploy) ----------------
# The eager path (model(ids, cache=KVCache)) grows the attended keys every step, so each step has new
# shapes and pays Python and dispatch overhead per op. Here the cache is fixed: L buffers of
# (B, Hkv, M, hd); a step attends over all M slots with a mask (keys after the current position are hidden),
# and the T=1 step is torch.compile'd once per (model, batch, M). The same function, out of place, is
# the graph `export.export_onnx` writes.
#
# One row on a CPU is a chain of matrix-vector products, bound by reading the weights. `decode_weights`
# lays them out for that (measured in BENCHMARKS.md, Deploy): float weights transposed to (in, out),
# which MKL's gemv reads ~3x faster than nn.Linear's (out, in) once a layer outgrows the cache; q/k/v
# and gate/up fused into one product each; per-channel int8 layers as codes + bf16 scales for PyTorch's
# weight-only int8 kernel (`torch.ops.aten._weight_int8pack_mm`, the kernel gpt-fast uses).

DecodeWeight = Tensor | tuple[Tensor, Tensor]  # (in, out) float weight, or (int8 codes (out, in), bf16 scales (out,))


def static_forward(model: Llama, ids: Tensor, start: Tensor, k_cache: Tensor | list[Tensor],
                   v_cache: Tensor | list[Tensor], inplace: bool = True,
                   weights: dict[str, DecodeWeight] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of `ids` at positions start..start+T-1, reading and writing a fixed-size cache.

    Args:
        model: the Llama (its submodules are called, so quantised layers work too).
        ids: (B, T) token ids.
        start: 0-d int64 tensor, the position of ids[:, 0] (= tokens already in the cache).
        k_cache, v_cache: (n_layers, B, n_kv_heads, M, head_dim) keys/values of positions < M, or
            lists of n_layers (B, n_kv_heads, M, head_dim) tensors.
        inplace: write the new keys/values into the caches (True) or return updated copies (ONNX).
        weights: `decode_weights(model)`: the projections it holds are computed from it, the others by
            calling their module.

    Returns:
        (logits (B, T, V), k_cache, v_cache).
    """
    cfg, (B, T), M = model.config, ids.shape, k_cache[0].shape[2]
    w = weights or {}
    positions = start + torch.arange(T, device=ids.device)  # (T,)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (T, hd)
    visible = torch.arange(M, device=ids.device)[None, :] <= positions[:, None]  # (T, M) causal over slots
    x = model.model.embed_tokens(ids)  # (B, T, dim)
    keys, values = [], []
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i, block in enumerate(model.model.layers):
        attn, mlp, h, name = block.self_attn, block.mlp, block.input_layernorm(x), f"model.layers.{i}."
        if name + "qkv" in w:
            q, k, v = _project(w[name + "qkv"], h).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        if inplace:
            ks, vs = k_cache[i].index_copy_(2, positions, k), v_cache[i].index_copy_(2, positions, v)
        else:
            ks, vs = k_cache[i].index_copy(2, positions, k), v_cache[i].index_copy(2, positions, v)
            keys.append(ks)
            values.append(vs)
        if T == 1 and inplace:
            y = _one_query_attention(q, ks, vs, visible)
        else:
            y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=visible,
                                               enable_gqa=cfg.n_kv_heads != cfg.n_heads)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, q_dim)
        x = x + (_project(w[name + "o"], y) if name + "o" in w else attn.o_proj(y))
        h = block.post_attention_layernorm(x)
        if name + "gate_up" in w:
            gate, up = _project(w[name + "gate_up"], h).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        y = F.silu(gate) * up
        x = x + (_project(w[name + "down"], y) if name + "down" in w else mlp.down_proj(y))
    h = model.model.norm(x)
    logits = _project(w["lm_head"], h) if "lm_head" in w else model.lm_head(h)  # (B, T, V)
    if not inplace:
        k_cache, v_cache = torch.stack(keys), torch.stack(values)
    return logits, k_cache, v_cache


def _project(weight: DecodeWeight, h: Tensor) -> Tensor:
    """h @ W^T from a `decode_weights` entry."""
    if isinstance(weight, Tensor):
        return h @ weight
    return int8_matmul(h, *weight)


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """scaled_dot_product_attention for one query per row, written out so that the compiler fuses it
    (the CPU flash kernel takes ~20% of a fast int8 decode step at T = 1).

    Args:
        q: (B, H, 1, hd); k, v: (B, Hkv, M, hd), query head h reading key head h // (H / Hkv) as GQA does;
        visible: (1, M) bool, the slots the query may attend to.
    """
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, hd)  # query heads grouped under their key head
    scores = (qg @ k.transpose(-1, -2)) * hd**-0.5  # (B, Hkv, G, M)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, hd)


def decode_weights(model: Llama) -> dict[str, DecodeWeight]:
    """The model's projections laid out for one-row CPU decoding (see the section comment): keys
    "model.layers.{i}.qkv" / "o" / "gate_up" / "down" and "lm_head". A group mixing float and quantised
    layers, or quantised other than per-channel int8, is left out (its modules are called instead).
    Cached with the model until one of its weights changes (in-place updates bump a tensor's version).
    Float weights are copied, so a fast one-row decoder holds the float projections twice.
    """
    groups = {"lm_head": [model.lm_head]}
    for i, block in enumerate(model.model.layers):
        a, m, name = block.self_attn, block.mlp, f"model.layers.{i}."
        groups.update({name + "qkv": [a.q_proj, a.k_proj, a.v_proj], name + "o": [a.o_proj],
                       name + "gate_up": [m.gate_proj, m.up_proj], name + "down": [m.down_proj]})
    sources = [t for mods in groups.values() for mod in mods for t in mod.state_dict().values()]
    key = ("decode_weights", tuple((t.data_ptr(), t._version) for t in sources))
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        for old in [k for k in per_model if k[0] == "decode_weights"]:
            del per_model[old]
        per_model[key] = {name: packed for name, mods in groups.items()
                          if (packed := _pack_group(mods)) is not None}
    return per_model[key]


@torch.no_grad()
def _pack_group(modules: list[nn.Module]) -> DecodeWeight | None:
    if all(type(m) is nn.Linear and m.bias is None for m in modules):
        return torch.cat([m.weight.detach() for m in modules]).t().contiguous()  # (in, sum of outs)
    if all(isinstance(m, QLinear) and m.per_channel_int8 for m in modules):
        return (torch.cat([m.qweight for m in modules]).contiguous(),
                torch.cat([m.scales.view(-1) for m in modules]).to(torch.bfloat16))
    return None


class StaticDecoder:
    """Incremental decoding over a fixed cache: eager prefill, then a compiled one-token step.

    Args:
        model: the Llama (eval mode).
        batch_size: rows decoded together.
        max_len: cache slots; rounded up to a multiple of 64 so that nearby lengths share one compiled graph.
        compile: torch.compile the one-token step (falls back to eager if compilation fails).
    """

    def __init__(self, model: Llama, batch_size: int, max_len: int, compile: bool = True) -> None:
        cfg, p = model.config, next(model.parameters())
        self.model, self.max_len = model, -(-max_len // 64) * 64
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        # one tensor per layer: the compiled step then mutates whole graph inputs in place (a slice of
        # one (L, ...) buffer would make inductor copy the buffer every step)
        self.k = [torch.zeros(shape[1:], dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape[1:], dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.pos = 0
        model._rope(0, self.max_len)  # make sure the rope tables cover every slot
        step = _compiled_step(model, shape) if compile else partial(static_forward, model)
        # Batches of rows are matrix products, for which nn.Linear's own layout is as fast or faster.
        one_row_cpu = batch_size == 1 and p.device.type == "cpu"
        self.step = partial(step, weights=decode_weights(model)) if one_row_cpu else step
        self.checked = not compile  # eager steps have no guards to check

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """Logits (B, T, V) of the next T tokens; the cache advances by T."""
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"static cache full: {self.pos + T} positions > {self.max_len}")
        start = torch.tensor(self.pos, dtype=torch.long, device=ids.device)
        if T > 1:  # prefill: shapes vary, eager
            logits = static_forward(self.model, ids, start, self.k, self.v)[0]
        elif not self.checked:  # the first one-token step: dynamo checks its guards (model, shapes, weights)
            logits = self.step(ids, start, self.k, self.v)[0]
            self.checked = True
        else:
            # Later steps pass the same model, buffers and shapes, so re-checking every guard is wasted
            # (~45 us a token, a few % of a 15m step).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self.step(ids, start, self.k, self.v)[0]
        self.pos += T
        return logits


_COMPILED: "weakref.WeakKeyDictionary[Llama, dict]" = weakref.WeakKeyDictionary()


def _compiled_step(model: Llama, shape: tuple[int, ...]) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """torch.compile(static_forward) for one model and cache shape, built once and kept with the model."""
    per_model = _COMPILED.setdefault(model, {})
    if shape not in per_model:
        # On CPUs the C++ wrapper calls the graph's kernels without a Python frame each (~0.3 ms a step).
        options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else None
        per_model[shape] = torch.compile(partial(static_forward, model), dynamic=False, fullgraph=True,
                                         options=options)
    return per_model[shape]
