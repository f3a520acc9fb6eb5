"""`tinylm eval`: loss, perplexity and bits per byte of a model on a data split or text file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats import checkpoint


def evaluate_source(source: str, data: str, split: str = "val", max_tokens: int | None = None,
                    seq_len: int | None = None, batch_size: int = 8, tinytales: int = 0,
                    device: str = "auto", as_json: bool = False) -> dict[str, Any]:
    """`tinylm eval`: load a model from any source, evaluate it, print the figures.

    Args:
        source: checkpoint dir, HF Llama dir, .gguf file or alias.
        data: a data dir or a UTF-8 text file.
        split, max_tokens, seq_len, batch_size: see `evaluate`.
        tinytales: also sample this many stories and score them (0: no).
        device: auto, cpu, cuda or cuda:N.
        as_json: print JSON instead of a table.
    """
    if not Path(data).exists():
        raise TinylmError(f"no data at {data}: expected a data dir or a UTF-8 text file")
    device = resolve_device(device)
    loaded = checkpoint.load(source, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    result = {"source": str(source), "data": str(data),
              **evaluate(loaded.model, data, loaded.tokenizer, split, max_tokens, seq_len, batch_size, device, amp)}
    if tinytales:
        if loaded.tokenizer is None:
            raise TinylmError(f"{source} has no tokenizer to sample TinyTales stories with")
        result["tinytales"] = sample_tinytales(loaded.model, loaded.tokenizer, tinytales)
    print(json.dumps(result, indent=2) if as_json else format_result(result))
    return result


def format_result(r: dict[str, Any]) -> str:
    """A small markdown table of an evaluation result."""
    rows = [("loss (nats/token)", f"{r['loss']:.4f}"), ("perplexity", f"{r['perplexity']:.3f}"),
            ("bits per byte", f"{r['bits_per_byte']:.4f}"), ("tokens", f"{r['tokens']:,}"),
            ("bytes", f"{r['bytes']:,.0f}"), ("seq_len", str(r["seq_len"]))]
    if "tinytales" in r:
        t = r["tinytales"]
        rows += [("TinyTales valid sentences", f"{t['valid_fraction']:.1%} of {t['sentences']}"),
                 ("TinyTales consistent stories", f"{t['consistent_fraction']:.1%} of {t['stories']}")]
    lines = [f"| {r['source']} on {r['data']} | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
