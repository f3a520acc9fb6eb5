"""Evaluation: loss, perplexity and bits per byte on a data split or a text file; TinyTales sample checks.

Bits per byte (Gao et al. 2020, The Pile, sec. 5) compares models whose tokenizers differ: the summed
next-token negative log-likelihood in nats, divided by ln 2 times the number of UTF-8 bytes of the text
that was predicted. For a data dir the split's byte count (meta.json) is scaled by the fraction of its
tokens evaluated; for a text file the bytes are counted exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from tinylm import checkpoint
from tinylm.config import TinylmError
from tinylm.data import TokenData
from tinylm.model import Llama
from tinylm.tokenizer import Tokenizer
from tinylm.train import eval_nats


def evaluate(model: Llama, data: TokenData | str | os.PathLike, tokenizer: Tokenizer | None = None,
             split: str = "val", max_tokens: int | None = None, seq_len: int | None = None,
             batch_size: int = 8, device: str | torch.device = "cpu",
             amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a model on a data split or a UTF-8 text file.

    Args:
        model: the model (put into eval mode here).
        data: an opened TokenData, a data dir, or a text file (tokenised with `tokenizer`).
        tokenizer: the model's tokenizer; needed for a text file.
        split: the split of a data dir.
        max_tokens: evaluate at most this many predicted tokens (None: everything).
        seq_len: context per window; default min(model max_seq_len, 1024).
        batch_size: windows per forward pass.
        device: where to run.
        amp_dtype: autocast dtype, or None for the model's dtype.

    Returns:
        {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "seq_len"}: loss in nats per token.
    """
    seq_len = seq_len or min(model.config.max_seq_len, 1024)
    if isinstance(data, TokenData) or Path(data).is_dir():
        split_data = data if isinstance(data, TokenData) else TokenData.open(data, split)
        _check_vocab(model, split_data.vocab_size)
        n_windows = None if max_tokens is None else max(1, max_tokens // seq_len)
        windows = split_data.eval_windows(seq_len, n_windows)
        byte_count = None  # scaled from the split's bytes below
    else:
        windows, byte_count = _text_windows(Path(data), tokenizer, seq_len, max_tokens)
    model.eval()
    nats, tokens = eval_nats(model, windows, batch_size, device, amp_dtype)
    if tokens == 0:
        raise TinylmError(f"{data}: nothing to evaluate (no complete window of {seq_len} tokens)")
    if byte_count is None:
        byte_count = split_data.n_bytes * tokens / split_data.n_tokens
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": nats / (math.log(2) * byte_count),
            "tokens": tokens, "bytes": byte_count, "seq_len": seq_len}


def _check_vocab(model: Llama, vocab_size: int) -> None:
    if vocab_size > model.config.vocab_size:
        raise TinylmError(f"the data's vocabulary ({vocab_size}) is larger than the model's "
                          f"({model.config.vocab_size}): it was prepared with another tokenizer")


def _text_windows(path: Path, tokenizer: Tokenizer | None, seq_len: int,
                  max_tokens: int | None) -> tuple[Iterator[Tensor], float]:
    """Windows of a text file with stride seq_len (every token after the first predicted once), and the
    UTF-8 bytes they predict. With a bos token the first text token is predicted too."""
    if tokenizer is None:
        raise TinylmError("evaluating a text file needs the model's tokenizer (the source has none)")
    if not path.is_file():
        raise TinylmError(f"no data at {path}: expected a data dir or a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TinylmError(f"{path} is not UTF-8 text") from None
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
    n_bytes = float(len(text.encode("utf-8")))
    if max_tokens is not None and max_tokens < len(ids) - 1:
        # Only a prefix is predicted: count the bytes it decodes to (a multi-byte character cut at the
        # end may count a byte or two off).
        ids = ids[:max_tokens + 1]
        n_bytes = float(len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")))
    ids_t = torch.tensor(ids, dtype=torch.long)
    windows = (ids_t[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len))
    return windows, n_bytes


def sample_tinytales(model: Llama, tokenizer: Tokenizer, n: int, seed: int = 0, max_new_tokens: int = 256,
                     temperature: float = 0.8) -> dict[str, Any]:
    """Sample n stories and score them with the TinyTales validator (tinytales.check).

    A story starts from the bos token when the tokenizer has one (data dirs store every document as
    BOS + text + EOS), else from "Once upon a time"; it ends at eos or a blank line.

    Args:
        model, tokenizer: the model and its tokenizer.
        n: number of stories.
        seed: sampling seed.
        max_new_tokens: longest story.
        temperature: sampling temperature.

    Returns:
        {"stories", "sentences", "valid_fraction", "consistent_fraction", "samples" (the first 3)}.
    """
    from tinylm import tinytales
    from tinylm.generate import generate

    with_bos = tokenizer.bos_id is not None
    prompt = "" if with_bos else "Once upon a time"
    texts = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, stop=[tinytales.SEPARATOR], n=n, add_bos=with_bos)
    texts = [prompt + t for t in ([texts] if isinstance(texts, str) else texts)]
    results = [tinytales.check(t) for t in texts]
    sentences = sum(r.n_sentences for r in results)
    return {"stories": n, "sentences": sentences,
            "valid_fraction": sum(r.n_valid for r in results) / sentences if sentences else 0.0,
            "consistent_fraction": sum(r.consistent for r in results) / n, "samples": texts[:3]}


def evaluate_source(source: str, data: str, split: str = "val", max_tokens: int | None = None,
                    seq_len: int | None = None, batch_size: int = 8, tinytales: int = 0,
                    device: str = "auto", as_json: bool = False) -> dict[str, Any]:
    """`tinylm eval`: load a model from any source, evaluate it, print the figures.

    Args:
        source: checkpoint dir, HF Llama dir, .gguf file or alias.
        data: a data dir or a UTF-8 text file.
        split, max_tokens, seq_len, batch_size: see `evaluate`.
        tinytales: also sample this many stories and score them (0: no).
        device: auto, cpu or cuda.
        as_json: print JSON instead of a table.
    """
    if not Path(data).exists():
        raise TinylmError(f"no data at {data}: expected a data dir or a UTF-8 text file")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = checkpoint.load(source, device=device)
    amp = torch.bfloat16 if torch.device(device).type == "cuda" else None
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


__all__ = ["evaluate", "evaluate_source", "format_result", "sample_tinytales"]
