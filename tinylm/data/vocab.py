"""Tokenizers trained, measured and trimmed on corpus inputs."""

from __future__ import annotations

import json
import os
from typing import Any

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir, check_out
from tinylm.data.prepare import load_tokenizer_source
from tinylm.data.sources import iter_texts
from tinylm.data.tokenizer import (
    Tokenizer,
    tokenizer_stats,
    train_tokenizer,
    trim_tokenizer,
)

# ----- tokenizer commands on files (the document reader lives here, so these do too) ----------------------

def train_tokenizer_on(inputs: list[str], vocab_size: int, out: str | os.PathLike, min_frequency: int = 2,
                       text_field: str = "text", overwrite: bool = False) -> Tokenizer:
    """Train a byte-level BPE on the cleaned documents of `inputs` and save it atomically to `out`.

    Args:
        inputs: as for `prepare`.
        vocab_size: final vocabulary size.
        out: tokenizer dir to write (AutoTokenizer.from_pretrained loads it).
        min_frequency: minimum pair count for a merge.
        text_field: JSON field / column holding the text.
        overwrite: replace an existing `out`.
    """

    check_out(out, overwrite)
    tok = train_tokenizer(iter_texts(inputs, text_field), vocab_size, min_frequency)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tok.save(tmp)
    return tok


def tokenizer_stats_on(source: str, corpus: list[str], text_field: str = "text") -> dict[str, Any]:
    """`tokenizer_stats` of the tokenizer at `source` on the documents of `corpus`.

    Args:
        source: tokenizer dir or model source.
        corpus: inputs as for `prepare`.
        text_field: JSON field / column holding the text.
    """
    return tokenizer_stats(load_tokenizer_source(source), iter_texts(corpus, text_field))


def trim_tokenizer_on(source: str, corpus: list[str], keep: int, out: str | os.PathLike,
                      text_field: str = "text", overwrite: bool = False) -> tuple[Tokenizer, list[int]]:
    """Trim the tokenizer at `source` to its `keep` most used tokens on `corpus`; write it and
    token_map.json ({"old_vocab_size", "kept": old ids in new-id order}) atomically to `out`.

    Args:
        source: tokenizer dir or model source.
        corpus: inputs as for `prepare`.
        keep: tokens in the new vocabulary (bytes and special tokens included).
        out: tokenizer dir to write.
        text_field: JSON field / column holding the text.
        overwrite: replace an existing `out`.
    """

    check_out(out, overwrite)
    tok = load_tokenizer_source(source)
    trimmed, kept = trim_tokenizer(tok, iter_texts(corpus, text_field), keep)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        trimmed.save(tmp)
        (tmp / "token_map.json").write_text(json.dumps({"old_vocab_size": tok.vocab_size, "kept": kept}) + "\n")
    return trimmed, kept


def trimmed_tokenizer(tokenizer: Tokenizer | None, corpus: str, keep: int,
                      text_field: str = "text") -> tuple[list[int], Tokenizer]:
    """Trim `tokenizer` to its `keep` most used tokens on `corpus`: (kept old ids, new tokenizer)."""
    if tokenizer is None:
        raise TinylmError("vocabulary trim needs the model's tokenizer, and the model has none")
    if keep >= tokenizer.vocab_size:
        raise TinylmError(f"--trim-vocab {keep} is not below the vocabulary's {tokenizer.vocab_size}")
    new, kept = trim_tokenizer(tokenizer, iter_texts([corpus], text_field), keep)
    return kept, new
