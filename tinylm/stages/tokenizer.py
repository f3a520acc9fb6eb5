"""`tinylm tokenizer train | stats | trim`: byte-level BPE tokenizers trained, measured and trimmed on a corpus."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tinylm.core.recipe import Count
from tinylm.data.vocab import tokenizer_stats_on, train_tokenizer_on, trim_tokenizer_on


@dataclass
class TrainTokenizerConfig:
    """What `tinylm tokenizer train` does."""

    inputs: list[str]  # corpus inputs, as for `tinylm data prepare`
    vocab_size: Count  # final vocabulary size (bytes and special tokens included)
    out: str  # tokenizer dir to write
    min_frequency: Count = 2  # minimum pair count for a merge
    text_field: str = "text"  # JSON field / column holding the text
    overwrite: bool = False  # replace an existing out


def train_main(cfg: TrainTokenizerConfig) -> None:
    """`tinylm tokenizer train`."""
    tok = train_tokenizer_on(cfg.inputs, cfg.vocab_size, cfg.out, cfg.min_frequency, cfg.text_field, cfg.overwrite)
    print(f"wrote {cfg.out}: {tok.vocab_size} tokens")


@dataclass
class StatsConfig:
    """What `tinylm tokenizer stats` measures."""

    tokenizer: str  # tokenizer dir, checkpoint dir, .gguf or alias
    corpus: list[str]  # corpus inputs, as for `tinylm data prepare`
    text_field: str = "text"  # JSON field / column holding the text


def stats_main(cfg: StatsConfig) -> None:
    """`tinylm tokenizer stats`: bytes per token, tokens per word and vocabulary coverage, as JSON."""
    print(json.dumps(tokenizer_stats_on(cfg.tokenizer, cfg.corpus, cfg.text_field), indent=2))


@dataclass
class TrimTokenizerConfig:
    """What `tinylm tokenizer trim` does: keep the K most used tokens of a tokenizer on a corpus."""

    source: str  # tokenizer dir, checkpoint dir, .gguf or alias
    corpus: list[str]  # corpus inputs, as for `tinylm data prepare`
    keep: Count  # tokens to keep, bytes and special tokens included
    out: str  # tokenizer dir to write (with token_map.json)
    text_field: str = "text"  # JSON field / column holding the text
    overwrite: bool = False  # replace an existing out


def trim_main(cfg: TrimTokenizerConfig) -> None:
    """`tinylm tokenizer trim`."""
    tok, _ = trim_tokenizer_on(cfg.source, cfg.corpus, cfg.keep, cfg.out, cfg.text_field, cfg.overwrite)
    print(f"wrote {cfg.out}: {tok.vocab_size} tokens kept")
