"""`tinylm data prepare` (corpus -> token shards) and `tinylm data tinytales` (the built-in story corpus)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tinylm.core.recipe import Count, Seed
from tinylm.data import tinytales
from tinylm.data.prepare import PrepareConfig, prepare


def prepare_main(cfg: PrepareConfig) -> None:
    """`tinylm data prepare`: write the data dir and say what went in.

    Args:
        cfg: the command's config.
    """
    meta = prepare(cfg)
    splits = ", ".join(f"{s} {v['documents']} docs {v['tokens']} tokens" for s, v in meta["splits"].items())
    print(f"wrote {cfg.out}: {splits}; removed {meta['filters']}; skipped {len(meta['skipped_files'])} files")


@dataclass
class TinytalesConfig:
    """What `tinylm data tinytales` generates."""

    stories: Count = 10_000  # number of stories
    seed: Seed = 0  # corpus seed: the same seed gives the same stories
    out: str | None = None  # text file to write: each story, then a blank line (none: stdout, or nothing with --stats)
    overwrite: bool = False  # replace an existing --out file
    stats: bool = False  # print stories, MB, distinct words, the entropy bound in bits/byte and MB/s


def tinytales_main(cfg: TinytalesConfig) -> None:
    """`tinylm data tinytales`: the corpus to a file or stdout, and its statistics.

    Args:
        cfg: the command's config.
    """
    if cfg.out:
        stats = tinytales.write_corpus(cfg.out, cfg.stories, cfg.seed, cfg.overwrite)
    elif cfg.stats:
        stats = tinytales.corpus_stats(cfg.stories, cfg.seed)
    else:
        stats = tinytales.stream_corpus(sys.stdout, cfg.stories, cfg.seed)
    if cfg.stats:
        print(tinytales.format_stats(stats))
