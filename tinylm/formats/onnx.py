"""ONNX export of the model's one-token decode step."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tinylm.core.errors import optional_import
from tinylm.core.fs import atomic_file
from tinylm.model.kvcache import StaticCache
from tinylm.model.llama import Llama
from tinylm.model.qlinear import float_model

# ----- ONNX ----------------------------------------------------------------------------------------

class _OnnxStep(torch.nn.Module):
    """The model's forward over a StaticCache as a module: (input_ids, start, past_keys, past_values) ->
    (logits, present_keys, present_values), the cache a fixed (L, B, Hkv, max_seq_len, hd) tensor."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = StaticCache(past_keys, past_values, start, inplace=False)  # returns updated copies
        logits = self.model(input_ids, cache=cache)
        return logits, torch.stack(cache.k), torch.stack(cache.v)


def export_onnx(model: Llama, out_path: str | os.PathLike) -> Path:
    """Write an ONNX graph of one decoding step with a KV cache (torch.onnx.export, dynamo exporter).

    Inputs: input_ids (B, T) int64, start () int64 (tokens already in the cache), past_keys and
    past_values (n_layers, B, n_kv_heads, max_seq_len, head_dim) float32. Outputs: logits (B, T, V),
    present_keys, present_values (the caches with positions start..start+T-1 written). Batch and T are
    dynamic; prefill is a call with start 0 and zero caches, decoding feeds the presents back.

    Args:
        model: a float Llama (a quantised one is dequantised first).
        out_path: the .onnx file.
    """
    for module in ("onnx", "onnxscript"):  # torch.onnx's dynamo exporter imports both
        optional_import(module, "onnx", "export --format onnx")
    model = float_model(model).float().eval()
    cfg = model.config
    cache = torch.zeros(cfg.n_layers, 2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    args = (torch.zeros(2, 3, dtype=torch.long), torch.tensor(0), cache, cache.clone())
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    shapes = {"input_ids": {0: batch, 1: seq}, "start": None, "past_keys": {1: batch}, "past_values": {1: batch}}
    with torch.no_grad():
        program = torch.onnx.export(_OnnxStep(model).eval(), args, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                    input_names=["input_ids", "start", "past_keys", "past_values"],
                                    output_names=["logits", "present_keys", "present_values"])
    with atomic_file(out_path) as tmp:
        program.save(str(tmp))
    return Path(out_path)
