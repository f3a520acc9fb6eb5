"""`tinylm trim-vocab`: keep only some tokens' embedding and LM-head rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.core.recipe import Count
from tinylm.data.tokenizer import read_token_map
from tinylm.data.vocab import trimmed_tokenizer
from tinylm.formats import checkpoint
from tinylm.model.surgery import trim_vocab


@dataclass
class TrimConfig:
    """What `tinylm trim-vocab` does: keep the rows of a token map, or of the K most used tokens of a corpus."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    out: str  # checkpoint dir to write
    token_map: str | None = None  # a `tinylm tokenizer trim` dir (token_map.json); or --corpus and --keep
    corpus: str | None = None  # text to count token use on (file, dir, tinytales:N)
    keep: Count | None = None  # tokens to keep with --corpus
    overwrite: bool = False  # replace an existing out


def main(cfg: TrimConfig) -> None:
    """`tinylm trim-vocab`."""
    print(f"wrote {trim(cfg)}")


def trim(cfg: TrimConfig) -> Path:
    """Load, trim the vocabulary, save with the trimmed tokenizer; returns the checkpoint dir."""
    if (cfg.token_map is None) == (cfg.corpus is None or cfg.keep is None):
        raise TinylmError("trim-vocab: give either --token-map DIR, or --corpus DATA and --keep K")
    check_out(cfg.out, cfg.overwrite)
    loaded = checkpoint.load(cfg.source)
    if cfg.token_map:
        kept, tok = read_token_map(cfg.token_map, loaded.config.vocab_size)
    else:
        kept, tok = trimmed_tokenizer(loaded.tokenizer, cfg.corpus, cfg.keep)
    model = trim_vocab(loaded.model, kept)
    meta = {"derived_from": str(cfg.source), "method": "trim-vocab", "vocab_trimmed_from": loaded.config.vocab_size}
    return checkpoint.save(model, cfg.out, tokenizer=tok, meta=meta)
