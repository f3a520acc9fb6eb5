"""The key/value cache of incremental decoding."""

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

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, n_kv, T, hd) at positions [pos, pos+T); return everything so far (B, n_kv, pos+T, hd)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0
