"""Evaluation: loss, perplexity and bits per byte on a data split or a text file; TinyTales sample checks.

Bits per byte (Gao et al. 2020, The Pile, sec. 5) compares models whose tokenizers differ: the summed
next-token negative log-likelihood in nats, divided by ln 2 times the number of UTF-8 bytes of the text
that was predicted. For a data dir the split's byte count (meta.json) is scaled by the fraction of its
tokens evaluated; for a text file the bytes are counted exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import TokenData
from tinylm.model.llama import Llama
from tinylm.train.losses import eval_nats


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
    seq_len = min(model.config.max_seq_len, 1024) if seq_len is None else seq_len
    if isinstance(data, TokenData) or Path(data).is_dir():
        split_data = data if isinstance(data, TokenData) else TokenData.open(data, split)
        split_data.check_vocab(model.config.vocab_size)
        if max_tokens is not None and max_tokens < seq_len:
            raise TinylmError(f"max_tokens {max_tokens} is less than one window of seq_len {seq_len} tokens")
        n_windows = None if max_tokens is None else max_tokens // seq_len
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
    windows = TokenData.from_ids(ids, tokenizer.vocab_size).eval_windows(seq_len, partial=True)
    return windows, n_bytes
