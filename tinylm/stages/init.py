"""`tinylm init --from`: a smaller model from a larger one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.formats import checkpoint
from tinylm.model.config import PRESETS, ModelConfig, preset
from tinylm.model.growth import INIT_METHODS, derive


@dataclass
class InitConfig:
    """`tinylm init --from SOURCE`: a smaller model by selection, inheritance or fresh initialisation.

    Args:
        source: model source to derive from.
        out: checkpoint dir to write.
        method: select, inherit or random.
        preset: a shape preset (its dim, n_layers, heads, ffn_dim; head_dim and vocabulary stay the
            source's); explicit sizes override it.
        dim, ffn_dim, n_heads, n_kv_heads, n_layers: target sizes (None: the preset's or the source's).
        seed: random initialisation seed.
        overwrite: replace an existing out.
    """

    source: str
    out: str
    method: str = "select"
    preset: str | None = None
    dim: int | None = None
    ffn_dim: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    n_layers: int | None = None
    seed: int = 0
    overwrite: bool = False


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
    if cfg.method not in INIT_METHODS:
        raise TinylmError(f"init: unknown method {cfg.method!r} (known: {', '.join(INIT_METHODS)})")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise TinylmError(f"init: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})")
    check_out(cfg.out, cfg.overwrite)
    loaded = checkpoint.load(cfg.source)
    model = derive(loaded.model, cfg.method, _sizes(cfg, loaded.config), cfg.seed)
    meta = {"derived_from": str(cfg.source), "method": cfg.method}
    return checkpoint.save(model, cfg.out, tokenizer=loaded.tokenizer, meta=meta)
