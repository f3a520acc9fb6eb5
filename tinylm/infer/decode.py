"""Fast one-row CPU decoding over a static cache, compiled once."""

from __future__ import annotations

import weakref
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.model.llama import Llama, apply_rope
from tinylm.model.qlinear import QLinear, int8_matmul

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
