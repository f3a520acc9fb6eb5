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
