"""The key/value caches of incremental decoding: a growing one for eager decoding, a fixed-shape one
for compiled steps and exported graphs. Both are read and written by `Attention` through `update`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinylm.model.config import ModelConfig


class KVCache:
    """A static key/value cache for incremental decoding: preallocated, written in place.

    Args:
        n_layers, batch_size, n_kv_heads, max_len, head_dim: shape of the cache.
        device, dtype: where and how the keys and values are kept.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # number of positions already written

    @classmethod
    def new(cls, model_or_cfg: "nn.Module | ModelConfig", batch_size: int, max_len: int,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KVCache":
        """A cache sized for a model (or config); device and dtype default to the model's."""
        if isinstance(model_or_cfg, ModelConfig):
            cfg = model_or_cfg
        else:  # a model: its config, device and dtype
            cfg, p = model_or_cfg.config, next(model_or_cfg.parameters())
            device, dtype = device or p.device, dtype or p.dtype
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, device, dtype or torch.float32)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write (B, n_kv, T, hd) at positions [pos, pos+T).

        Returns:
            keys and values so far (B, n_kv, pos+T, hd), and the (T, pos+T) bool mask of the keys each
            new query sees, or None where plain causal attention is right (no past, or one query).
        """
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        mask = None
        if self.pos and T > 1:  # chunked prefill: query i sees keys [0, pos + i]
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def reset(self) -> None:
        self.pos = 0


class StaticCache:
    """A fixed-shape cache whose position is a tensor, so that one traced graph serves every step.

    Attention reads all `max_len` slots, the ones after the current position masked out; a step's shapes
    never change, so the one-token step compiles once (infer/decode.py) and exports as one ONNX graph.

    Args:
        k, v: per layer (B, n_kv_heads, max_len, head_dim) keys and values of positions < max_len: a list
            of tensors, or one (n_layers, B, n_kv_heads, max_len, head_dim) tensor.
        start: 0-d int64 tensor, the position of the next token (= tokens already in the cache).
        inplace: write new keys and values into the given tensors (decoding), or replace this cache's
            entries by updated copies and leave the inputs alone (a traced graph that returns the cache).
    """

    def __init__(self, k: Tensor | list[Tensor], v: Tensor | list[Tensor], start: Tensor,
                 inplace: bool = True) -> None:
        self.k, self.v, self.pos, self.inplace = list(k), list(v), start, inplace
        self.max_len = self.k[0].shape[2]
        self._slots: tuple[Tensor, Tensor, Tensor] | None = None  # (pos, positions, visible) of this step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write (B, n_kv, T, hd) at positions pos..pos+T-1.

        Returns:
            all slots' keys and values (B, n_kv, max_len, hd), and the (T, max_len) bool mask of the
            slots each new query sees (causal: slots up to its own position).
        """
        positions, visible = self._positions(k.shape[2], k.device)
        if self.inplace:
            ks, vs = self.k[layer].index_copy_(2, positions, k), self.v[layer].index_copy_(2, positions, v)
        else:
            ks, vs = self.k[layer].index_copy(2, positions, k), self.v[layer].index_copy(2, positions, v)
            self.k[layer], self.v[layer] = ks, vs
        return ks, vs, visible

    def _positions(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # once per step, shared by the layers; a new `pos` (the model advances it) starts a new step
        if self._slots is None or self._slots[0] is not self.pos:
            positions = self.pos + torch.arange(T, device=device)  # (T,)
            visible = torch.arange(self.max_len, device=device)[None, :] <= positions[:, None]  # (T, M)
            self._slots = (self.pos, positions, visible)
        return self._slots[1], self._slots[2]


class PagedCache:
    """One step's view of a shared pool of key/value positions: B rows, each at its own position, each
    reading and writing its own pool positions (paged attention's block table, Kwon et al. 2023, spelled
    out per position). No row stores padding; a step gathers each row's keys into a (B, Hkv, S, hd) batch,
    the positions past a row's end masked out.

    Args:
        k, v: (n_layers, N, n_kv_heads, head_dim) pools, written in place.
        slots: (B, S) int64: the pool position of each row's context position s < S; S is the longest
            row's pos + T, and a shorter row's tail holds any valid index (masked).
        pos: each row's count of positions already in the pool (where its new tokens go).
    """

    def __init__(self, k: Tensor, v: Tensor, slots: Tensor, pos: list[int]) -> None:
        self.k, self.v, self.slots, self.rows = k, v, slots, list(pos)
        self.pos = torch.tensor(pos, dtype=torch.long, device=slots.device)  # (B,) the model advances it
        self.max_len = slots.shape[1]
        self._step: tuple[Tensor, Tensor | None] | None = None  # (write index, mask), shared by the layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write (B, n_kv, T, hd) at each row's positions pos..pos+T-1.

        Returns:
            each row's keys and values (B, n_kv, S, hd), and the mask of the keys each new query sees:
            (B, 1, T, S) bool, or for one row what KVCache returns (so one row decodes as KVCache does).
        """
        B, H, T, hd = k.shape
        where, mask = self._layout(T)
        self.k[layer].index_copy_(0, where, k.transpose(1, 2).reshape(B * T, H, hd))
        self.v[layer].index_copy_(0, where, v.transpose(1, 2).reshape(B * T, H, hd))
        keys = self.k[layer][self.slots].transpose(1, 2)  # (B, S, Hkv, hd) -> (B, Hkv, S, hd)
        return keys, self.v[layer][self.slots].transpose(1, 2), mask

    def _layout(self, T: int) -> tuple[Tensor, Tensor | None]:
        # once per step: the pool positions the new tokens go to (B*T,), and the mask
        if self._step is None:
            device, S = self.slots.device, self.slots.shape[1]
            start = torch.tensor(self.rows, dtype=torch.long, device=device)[:, None]  # (B, 1)
            at = start + torch.arange(T, device=device)  # (B, T) context positions of the new tokens
            where = self.slots.gather(1, at).flatten()  # (B*T,)
            if len(self.rows) == 1:  # KVCache's mask: None for causal or one query, else chunked prefill
                mask = None if self.rows[0] == 0 or T == 1 else torch.ones(
                    T, S, dtype=torch.bool, device=device).tril(diagonal=self.rows[0])
            else:
                mask = (torch.arange(S, device=device) <= at[:, :, None])[:, None]  # (B, 1, T, S)
            self._step = (where, mask)
        return self._step
