"""Function-preserving growth and small-from-large initialisation: HyperCloning, G_stack, weight selection, Inheritune."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
from tinylm.model.qlinear import QLinear
from tinylm.model.surgery import (
    Keep,
    build,
    check_memory,
    evenly_spaced,
    slice_model,
    target_shape,
)

INIT_METHODS = ("select", "inherit", "random")


def check_plain(model: Llama, what: str) -> None:
    """Growth and selection copy float weights: a quantised model (`tinylm quantize`) is a one-line error."""
    if any(isinstance(m, QLinear) for m in model.modules()):
        raise TinylmError(f"{what}: the source is quantised (int8/int4 layers); use the float model it was "
                          "quantised from, and quantise the result")


# ----- HyperCloning --------------------------------------------------------------------------------


def _clone(w: Tensor, n_out: int, n_in: int, scale: float, noise: float, gen: torch.Generator | None) -> Tensor:
    """Tile w (out, in) into (n_out * out, n_in * in) blocks, each w * scale / n_in, so that a tiled input
    [x, ..., x] gives the tiled output [y, ..., y] * scale.

    With noise > 0, each row of blocks gets zero-sum noise across its n_in blocks (std noise * w.std()):
    the blocks differ, but their sum over identical input copies, and so the function, is unchanged.
    """
    big = w.repeat(n_out, n_in) * (scale / n_in)
    if noise > 0 and n_in > 1:
        z = torch.randn(n_out, n_in, *w.shape, generator=gen) * (noise * float(w.std()) / n_in)
        z = z - z.mean(1, keepdim=True)  # (n_out, n_in, out, in): zero sum over the input copies
        big = big + z.permute(0, 2, 1, 3).reshape(big.shape).to(big.dtype)
    return big


@torch.no_grad()
def hypercloning(model: Llama, dim: int, noise: float = 0.0, seed: int = 0) -> Llama:
    """Grow width by n = dim / model dim: n copies of every channel, query and key/value head and SwiGLU
    neuron (head_dim kept, GQA groups copied whole); the logits stay the source's.

    Residual stream: [x, ..., x] * c. RMSNorm over the copies sees mean square c^2 * ms(x), so its eps
    becomes eps * c^2 and its output is exactly [x_hat, ..., x_hat]. Projections into the residual
    (o_proj, down_proj) carry the factor c. With tied embeddings the same matrix embeds (needs c) and
    reads out (needs 1 / n on its n copies), so c = 1 / n; untied, c = 1 and eps is unchanged.

    Args:
        model: the source (unchanged).
        dim: the new width, a multiple of the source's.
        noise: std (relative to each matrix's std) of function-preserving noise that breaks the
            symmetry between copies; 0 (default) gives exact copies.
        seed: noise seed.
    """
    cfg = model.config
    check_plain(model, "grow")
    if dim <= cfg.dim or dim % cfg.dim:
        raise TinylmError(f"grow: --dim {dim} must be a multiple of the source's {cfg.dim} (and larger)")
    n = dim // cfg.dim
    c = 1.0 / n if cfg.tie_embeddings else 1.0
    new = dataclasses.replace(cfg, dim=dim, n_heads=n * cfg.n_heads, n_kv_heads=n * cfg.n_kv_heads,
                              ffn_dim=n * cfg.ffn_dim, norm_eps=cfg.norm_eps * c * c)
    check_memory(new, "grow: the grown model", next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, w in model.state_dict().items():
        if w.ndim == 1:  # RMSNorm weights
            state[name] = w.repeat(n)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # (V, dim): only the channels grow
            embed = name == "model.embed_tokens.weight"  # embeds [e, ..., e] * c; lm_head reads W / n per copy
            state[name] = _clone(w, 1, n, c * n if embed else 1.0, 0.0, gen)
        else:
            writes_residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            state[name] = _clone(w, n, n, c if writes_residual else 1.0, noise, gen)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return build(new, state, next(model.parameters()).dtype, where="the grown model").eval()


# ----- G_stack, selection, Inheritune --------------------------------------------------------------


def stack(model: Llama, factor: int) -> Llama:
    """Grow depth by repeating the whole stack of blocks `factor` times (G_stack's G_direct).

    Args:
        model: the source (unchanged).
        factor: number of copies of the stack (>= 2).
    """
    if factor < 2:
        raise TinylmError(f"grow: --factor must be at least 2, got {factor}")
    check_plain(model, "grow")
    grown = dataclasses.replace(model.config, n_layers=model.config.n_layers * factor)
    check_memory(grown, "grow: the grown model", next(model.parameters()).dtype)
    return slice_model(model, Keep(layers=list(range(model.config.n_layers)) * factor))


def selection_keep(cfg: ModelConfig, target: ModelConfig) -> Keep:
    """Weight selection's indices: evenly spaced layers, channels and neurons, evenly spaced key/value
    groups and, inside each, evenly spaced query heads (one index set per dimension, shared by every
    matrix with that dimension, the same in every layer)."""
    r, r_new = cfg.n_heads // cfg.n_kv_heads, target.n_heads // target.n_kv_heads
    kv = evenly_spaced(cfg.n_kv_heads, target.n_kv_heads)
    q = torch.cat([g * r + evenly_spaced(r, r_new) for g in kv.tolist()])
    n = target.n_layers
    return Keep(channels=evenly_spaced(cfg.dim, target.dim), layers=evenly_spaced(cfg.n_layers, n).tolist(),
                q_heads=[q] * n, kv_heads=[kv] * n, neurons=[evenly_spaced(cfg.ffn_dim, target.ffn_dim)] * n)


def select(model: Llama, target: ModelConfig) -> Llama:
    """Weight selection (Xu et al. 2024) of `model` to the shape of `target` (every size <= the source's).

    Args:
        model: the source (unchanged).
        target: the shape, from `surgery.target_shape`.
    """
    return slice_model(model, selection_keep(model.config, target))


def inherit(model: Llama, n_layers: int) -> Llama:
    """Inheritune (Sanyal et al. 2024): the first `n_layers` blocks, embeddings, final norm, LM head.

    Args:
        model: the source (unchanged).
        n_layers: blocks to keep (1 .. the source's).
    """
    if not 1 <= n_layers <= model.config.n_layers:
        raise TinylmError(f"init: --n-layers {n_layers} must be between 1 and the source's {model.config.n_layers}")
    return slice_model(model, Keep(layers=list(range(n_layers))))


def random_like(cfg: ModelConfig, seed: int = 0) -> Llama:
    """A freshly initialised model of shape `cfg` (Llama.init_weights), the baseline the others beat."""
    check_memory(cfg, "init: the new model")
    torch.manual_seed(seed)
    return Llama(cfg).eval()


def derive(model: Llama, method: str, sizes: dict[str, int | None], seed: int = 0) -> Llama:
    """The model that `tinylm init --from` makes from `model`: select, inherit or random.

    Args:
        model: the source (unchanged).
        method: select, inherit or random.
        sizes: target dim, ffn_dim, n_heads, n_kv_heads, n_layers (None: the source's).
        seed: random initialisation seed.
    """
    if method not in INIT_METHODS:
        raise TinylmError(f"init: unknown method {method!r} (known: {', '.join(INIT_METHODS)})")
    check_plain(model, "init")
    target = target_shape(model.config, what="init", **sizes)
    if method == "inherit":
        widths = ("dim", "ffn_dim", "n_heads", "n_kv_heads")
        if any(getattr(target, k) != getattr(model.config, k) for k in widths):
            raise TinylmError("init: --method inherit keeps the width; give only --n-layers (or use select)")
        return inherit(model, target.n_layers)
    return select(model, target) if method == "select" else random_like(target, seed)
