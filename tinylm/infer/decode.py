"""Fast CPU decoding: the model's own forward over a static cache, its one-token step compiled once.

The eager path (model(ids, cache=KVCache)) grows the attended keys every step, so each step has new
shapes and pays Python and dispatch overhead per op. Here the cache is a `StaticCache`: L buffers of
(B, Hkv, M, hd) and a position tensor; a step attends over all M slots with a mask, so the T=1 step has
one shape and is torch.compile'd once per (model, batch, M). One row on a CPU decodes through
`prepare_for_decode(model)`, a copy with fused and transposed projections swapped in (model/fused.py);
the forward pass is the model's, in both cases.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from tinylm.model.fused import prepare_for_decode
from tinylm.model.kvcache import StaticCache
from tinylm.model.llama import Llama


def static_step(model: nn.Module, ids: Tensor, start: Tensor, k: list[Tensor], v: list[Tensor]) -> Tensor:
    """Logits (B, T, V) of `ids` at positions start..start+T-1; their keys and values are written into k, v.

    Args:
        model: a Llama, or its `prepare_for_decode` copy.
        ids: (B, T) token ids.
        start: 0-d int64 tensor, the position of ids[:, 0].
        k, v: per layer (B, n_kv_heads, M, head_dim) caches, written in place.
    """
    return model(ids, cache=StaticCache(k, v, start))


def decode_model(model: Llama) -> nn.Module:
    """`prepare_for_decode(model)`, kept with the model until one of its tensors changes (an in-place
    update, such as an optimizer step, bumps a tensor's version). The fused float projections are copies,
    so a fast one-row decoder holds them twice."""
    key = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    per_model = _COMPILED.setdefault(model, {})
    if per_model.get("decode", (None,))[0] != key:
        if "decode" in per_model:  # the stale copy's compiled steps go with it
            _COMPILED.pop(per_model["decode"][1], None)
        per_model["decode"] = (key, prepare_for_decode(model))
    return per_model["decode"][1]


class StaticDecoder:
    """Incremental decoding over a fixed cache: eager prefill, then a compiled one-token step.

    Args:
        model: the Llama (eval mode).
        batch_size: rows decoded together.
        max_len: cache slots; rounded up to a multiple of 64 so that nearby lengths share one compiled graph.
        compile: torch.compile the one-token step.
    """

    def __init__(self, model: Llama, batch_size: int, max_len: int, compile: bool = True) -> None:
        cfg, p = model.config, next(model.parameters())
        self.max_len = -(-max_len // 64) * 64
        # Batches of rows are matrix products, for which nn.Linear's own layout is as fast or faster;
        # prefill (T rows) runs on the model itself.
        one_row_cpu = batch_size == 1 and p.device.type == "cpu"
        self.model, self.stepper = model, decode_model(model) if one_row_cpu else model
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        # one tensor per layer: the compiled step then mutates whole graph inputs in place (a slice of
        # one (L, ...) buffer would make inductor copy the buffer every step)
        self.k = [torch.zeros(shape[1:], dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape[1:], dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.pos = 0
        model.reserve(self.max_len)  # rotary tables for every slot, before any tracing
        self.stepper.reserve(self.max_len)  # (the copy holds tables of its own once either grows)
        self.step = _compiled_step(self.stepper, shape) if compile else self._eager_step
        self.checked = not compile  # eager steps have no guards to check

    def _eager_step(self, ids: Tensor, start: Tensor, k: list[Tensor], v: list[Tensor]) -> Tensor:
        return static_step(self.stepper, ids, start, k, v)

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """Logits (B, T, V) of the next T tokens; the cache advances by T."""
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"static cache full: {self.pos + T} positions > {self.max_len}")
        start = torch.tensor(self.pos, dtype=torch.long, device=ids.device)
        if T > 1:  # prefill: shapes vary, eager
            logits = static_step(self.model, ids, start, self.k, self.v)
        elif not self.checked:  # the first one-token step: dynamo checks its guards (model, shapes, weights)
            logits = self.step(ids, start, self.k, self.v)
            self.checked = True
        else:
            # Later steps pass the same model, buffers and shapes, so re-checking every guard is wasted
            # (~45 us a token, a few % of a 15m step).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self.step(ids, start, self.k, self.v)
        self.pos += T
        return logits


# per model: its compiled steps by cache shape, and its decode copy ("decode": (weights key, copy))
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _compiled_step(model: nn.Module, shape: tuple[int, ...]) -> Callable[..., Tensor]:
    """torch.compile(static_step) for one model and cache shape, built once and kept with the model."""
    per_model = _COMPILED.setdefault(model, {})
    if shape not in per_model:
        # On CPUs the C++ wrapper calls the graph's kernels without a Python frame each (~0.3 ms a step).
        options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else None
        per_model[shape] = torch.compile(partial(static_step, model), dynamic=False, fullgraph=True,
                                         options=options)
    return per_model[shape]
