"""`tinylm eval`: loss, perplexity and bits per byte of a model on a data split or text file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Count, Interval, check_context
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats import checkpoint


@dataclass
class EvalConfig:
    """What `tinylm eval` measures: loss, perplexity and bits per byte of a model on some text."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    data: str  # a data dir (tinylm data prepare) or a UTF-8 text file
    split: str = "val"  # split of a data dir
    max_tokens: Count | None = None  # evaluate at most this many tokens (none: all)
    seq_len: Count | None = None  # context per window, at most the model's max_seq_len (none: min(max_seq_len, 1024))
    batch_size: Count = 8  # windows per forward pass
    tinytales: Interval = 0  # also sample this many stories and score them with the TinyTales validator
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    json: bool = False  # print JSON instead of a table


def evaluate_source(cfg: EvalConfig) -> dict[str, Any]:
    """`tinylm eval`: load a model from any source, evaluate it, print the figures.

    Args:
        cfg: the command's config.
    """
    if not Path(cfg.data).exists():
        raise TinylmError(f"no data at {cfg.data}: expected a data dir or a UTF-8 text file")
    device = resolve_device(cfg.device)
    loaded = checkpoint.load(cfg.source, device=device)
    check_context("--seq-len", cfg.seq_len, loaded.config.max_seq_len)
    amp = torch.bfloat16 if device.type == "cuda" else None
    result = {"source": str(cfg.source), "data": str(cfg.data),
              **evaluate(loaded.model, cfg.data, loaded.tokenizer, cfg.split, cfg.max_tokens, cfg.seq_len,
                         cfg.batch_size, device, amp)}
    if cfg.tinytales:
        if loaded.tokenizer is None:
            raise TinylmError(f"{cfg.source} has no tokenizer to sample TinyTales stories with")
        result["tinytales"] = sample_tinytales(loaded.model, loaded.tokenizer, cfg.tinytales)
    print(json.dumps(result, indent=2) if cfg.json else format_result(result))
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
