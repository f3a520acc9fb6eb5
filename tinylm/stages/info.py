"""`tinylm info`: a model's shape, parameters, vocabulary, size and FLOPs per token."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tinylm.core.fs import disk_size
from tinylm.formats.checkpoint import load

# ----- info ----------------------------------------------------------------------------------------

@dataclass
class InfoConfig:
    """What `tinylm info` describes, and how."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    json: bool = False  # print JSON instead of a table


def main(cfg: InfoConfig) -> None:
    """`tinylm info`."""
    describe(cfg.source, as_json=cfg.json)


def describe(source: str | os.PathLike, as_json: bool = False) -> dict[str, Any]:
    """Print (and return) what a model is: shape, parameters, vocabulary, dtype, size, FLOPs/token.

    Args:
        source: any model source.
        as_json: print JSON instead of a table.
    """
    loaded = load(source)
    cfg = loaded.config
    info = {
        "source": str(loaded.source), "format": loaded.kind, "architecture": "LlamaForCausalLM",
        "parameters": cfg.param_count(),  # from the shape: a quantised layer's codes stand for its weights
        "non_embedding_parameters": cfg.param_count(include_embeddings=False),
        "vocab_size": cfg.vocab_size, "tokenizer_vocab": loaded.tokenizer.vocab_size if loaded.tokenizer else None,
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim, "max_seq_len": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "tie_embeddings": cfg.tie_embeddings, "dtype": loaded.stored_dtype,
        "quantization": _quantization_label(loaded.meta.get("quantization")),
        "size_on_disk_bytes": disk_size(loaded.source),
        "forward_flops_per_token": cfg.flops_per_token(),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            print(f"{key:<{width}}  {shown}")
    return info


def _quantization_label(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "none"
    group = spec.get("group_size") or "per-channel"
    return f"{spec.get('scheme')} (group {group}, {len(spec.get('modules', []))} layers)"
