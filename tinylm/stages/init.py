"""`tinylm init --from`: a smaller model from a larger one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.core.fs import check_out
from tinylm.core.recipe import Count, Seed, one_of
from tinylm.formats import checkpoint
from tinylm.model.config import PRESETS, ModelConfig, preset
from tinylm.model.growth import INIT_METHODS, derive


@dataclass
class InitConfig:
    """What `tinylm init --from SOURCE` does: a smaller model by selection, inheritance or fresh initialisation."""

    source: str  # model source to derive from (checkpoint dir, HF dir, .gguf, alias)
    out: str  # checkpoint dir to write
    method: one_of(*INIT_METHODS) = "select"  # select (weight selection), inherit (the first --n-layers blocks) or random
    preset: one_of(*PRESETS) | None = None  # target shape preset (head_dim, vocabulary stay the source's); sizes below override it
    dim: Count | None = None  # target width (none: the preset's or the source's)
    ffn_dim: Count | None = None  # target SwiGLU width (none: the preset's or the source's)
    n_heads: Count | None = None  # target query heads (none: the preset's or the source's)
    n_kv_heads: Count | None = None  # target key/value heads (none: the preset's or the source's)
    n_layers: Count | None = None  # target blocks (none: the preset's or the source's)
    seed: Seed = 0  # seed of --method random
    overwrite: bool = False  # replace an existing out


def main(cfg: InitConfig) -> None:
    """`tinylm init`."""
    print(f"wrote {init(cfg)}")


def _sizes(cfg: InitConfig, source: ModelConfig) -> dict[str, int | None]:
    """Target sizes: the preset's, overridden by the explicit ones.

    A preset's key/value heads are capped at the source's: selection keeps whole key/value groups, so
    a multi-head preset (15m: 6 heads, 6 kv heads) taken from a grouped-query source (SmolLM2: 3 kv
    heads) keeps the largest number of groups that divides its heads and the source has.
    """
    sizes: dict[str, int | None] = {}
    if cfg.preset is not None:
        p = preset(cfg.preset)  # a one-line error for an unknown name
        kv = p.n_kv_heads
        if kv > source.n_kv_heads:
            kv = max(d for d in range(1, source.n_kv_heads + 1) if p.n_heads % d == 0)
        sizes = dict(dim=p.dim, ffn_dim=p.ffn_dim, n_heads=p.n_heads, n_kv_heads=kv, n_layers=p.n_layers)
    explicit = dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                    n_layers=cfg.n_layers)
    return {**sizes, **{k: v for k, v in explicit.items() if v is not None}}


def init(cfg: InitConfig) -> Path:
    """Load the source, derive the new model, save it with the source's tokenizer; returns the dir."""
    check_out(cfg.out, cfg.overwrite)
    loaded = checkpoint.load(cfg.source)
    model = derive(loaded.model, cfg.method, _sizes(cfg, loaded.config), cfg.seed)
    meta = {"derived_from": str(cfg.source), "method": cfg.method}
    return checkpoint.save(model, cfg.out, tokenizer=loaded.tokenizer, meta=meta)
