"""Index surgery on a Llama: keep a subset (or a repetition) of its tokens, channels, heads, neurons, layers.

The one operation that pruning, weight selection, Inheritune, G_stack and vocabulary trimming share
(prune.py and grow.py sit in the same layer and may not import each other, ARCHITECTURE.md "Layers"):
every output weight is a sub-block of a source weight, chosen by index tensors that are consistent
across every matrix that shares a dimension, so the result is a plain `Llama` of a smaller shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tinylm.core import devices
from tinylm.core.errors import TinylmError
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama, rope_tables


@dataclass
class Keep:
    """What to keep of a source model; None keeps the whole axis. Indices are source indices, in order.

    Args:
        tokens: vocabulary rows (new id i is old id tokens[i]).
        channels: residual-stream channels (dim).
        layers: source layer of each new layer (repeats allowed: G_stack).
        q_heads: per new layer, the source query heads kept, listed group by group: new kv group g
            holds new query heads [g * r, (g + 1) * r), r = len(q_heads) / len(kv_heads).
        kv_heads: per new layer, the source key/value heads kept.
        neurons: per new layer, the source SwiGLU neurons kept (ffn_dim).
    """

    tokens: Tensor | None = None
    channels: Tensor | None = None
    layers: list[int] | None = None
    q_heads: list[Tensor] | None = None
    kv_heads: list[Tensor] | None = None
    neurons: list[Tensor] | None = None


def _full(n: int) -> Tensor:
    return torch.arange(n, dtype=torch.long)


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Rows of a (n_heads * head_dim, ...) projection that belong to `heads`, head by head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def check_gqa(q: Tensor, kv: Tensor, n_heads: int, n_kv_heads: int) -> None:
    """Raise a one-line TinylmError unless query heads `q` sit in the kept groups `kv`, r per group.

    Args:
        q: kept source query heads, group by group.
        kv: kept source key/value heads.
        n_heads, n_kv_heads: the source's head counts.
    """
    if len(kv) == 0 or len(q) % len(kv):
        raise TinylmError(f"{len(q)} query heads do not split evenly over {len(kv)} key/value heads")
    r_src, r = n_heads // n_kv_heads, len(q) // len(kv)
    groups = (q // r_src).view(len(kv), r)  # source kv group of each kept query head
    if not torch.equal(groups, kv[:, None].expand(-1, r)):
        raise TinylmError("kept query heads must stay with their own key/value head (GQA groups)")


def keep_config(cfg: ModelConfig, keep: Keep) -> ModelConfig:
    """The config of `slice_model(model, keep)`: the source's, with the kept sizes.

    Args:
        cfg: the source config.
        keep: what is kept.
    """
    sizes = dict(
        vocab_size=len(keep.tokens) if keep.tokens is not None else cfg.vocab_size,
        dim=len(keep.channels) if keep.channels is not None else cfg.dim,
        n_layers=len(keep.layers) if keep.layers is not None else cfg.n_layers,
        n_heads=len(keep.q_heads[0]) if keep.q_heads else cfg.n_heads,
        n_kv_heads=len(keep.kv_heads[0]) if keep.kv_heads else cfg.n_kv_heads,
        ffn_dim=len(keep.neurons[0]) if keep.neurons else cfg.ffn_dim,
    )
    if keep.tokens is not None:  # special-token ids follow their rows (None when the row is dropped)
        new_of = {int(old): new for new, old in enumerate(keep.tokens)}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            sizes[name] = new_of.get(getattr(cfg, name))
    return dataclasses.replace(cfg, **sizes)


def _filled(keep: Keep, cfg: ModelConfig) -> Keep:
    """`keep` with every None replaced by the full index range of the source."""
    layers = keep.layers if keep.layers is not None else list(range(cfg.n_layers))
    n = len(layers)
    return Keep(
        tokens=keep.tokens if keep.tokens is not None else _full(cfg.vocab_size),
        channels=keep.channels if keep.channels is not None else _full(cfg.dim),
        layers=layers,
        q_heads=keep.q_heads if keep.q_heads is not None else [_full(cfg.n_heads)] * n,
        kv_heads=keep.kv_heads if keep.kv_heads is not None else [_full(cfg.n_kv_heads)] * n,
        neurons=keep.neurons if keep.neurons is not None else [_full(cfg.ffn_dim)] * n,
    )


def _check(keep: Keep, cfg: ModelConfig) -> None:
    """Indices in range, per-layer sizes equal (one config holds every layer), GQA groups whole."""
    limits = dict(tokens=cfg.vocab_size, channels=cfg.dim, layers=cfg.n_layers, q_heads=cfg.n_heads,
                  kv_heads=cfg.n_kv_heads, neurons=cfg.ffn_dim)
    for name, limit in limits.items():
        value = getattr(keep, name)
        parts = value if isinstance(value, list) and name != "layers" else [torch.as_tensor(value)]
        if any(len(p) == 0 or int(p.min()) < 0 or int(p.max()) >= limit for p in parts):
            raise TinylmError(f"keep {name}: indices must be non-empty and in [0, {limit})")
        if len({len(p) for p in parts}) > 1:
            raise TinylmError(f"keep {name}: every layer must keep the same number")
        if name != "layers" and len(parts) != 1 and len(parts) != len(keep.layers):
            raise TinylmError(f"keep {name}: one index list per kept layer expected")
    for q, kv in zip(keep.q_heads, keep.kv_heads):
        check_gqa(q, kv, cfg.n_heads, cfg.n_kv_heads)


@torch.no_grad()
def slice_model(model: Llama, keep: Keep) -> Llama:
    """A new Llama whose every weight is the sub-block of `model`'s weight that `keep` selects.

    Keeping everything returns a copy that computes the same logits. Removing channels changes the
    RMSNorm statistics (the mean runs over fewer channels), so that part is an approximation, as in
    Minitron (Muralidharan et al. 2024, sec. 2.2).

    Args:
        model: the source model (left unchanged).
        keep: what to keep; None axes are kept whole.
    """
    cfg = model.config
    k = _filled(keep, cfg)
    _check(k, cfg)
    sd = model.state_dict()
    ch, hd = k.channels, cfg.head_dim
    state = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"][k.tokens][:, ch],
        "model.norm.weight": sd["model.norm.weight"][ch],
        "lm_head.weight": sd["lm_head.weight"][k.tokens][:, ch],
    }
    for new, old in enumerate(k.layers):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        q_rows, kv_rows = _head_rows(k.q_heads[new], hd), _head_rows(k.kv_heads[new], hd)
        neurons = k.neurons[new]
        for name, rows, cols in (("self_attn.q_proj", q_rows, ch), ("self_attn.k_proj", kv_rows, ch),
                                 ("self_attn.v_proj", kv_rows, ch), ("self_attn.o_proj", ch, q_rows),
                                 ("mlp.gate_proj", neurons, ch), ("mlp.up_proj", neurons, ch),
                                 ("mlp.down_proj", ch, neurons)):
            state[dst + name + ".weight"] = sd[src + name + ".weight"][rows][:, cols].clone()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[dst + norm + ".weight"] = sd[src + norm + ".weight"][ch].clone()
    dtype = next(model.parameters()).dtype
    return build(keep_config(cfg, keep), state, dtype, where="the derived model").eval()


def evenly_spaced(n: int, k: int) -> Tensor:
    """Indices floor(i * n / k), i < k: one of every n / k along an axis of size n (the "uniform
    selection" of Xu et al. 2024, sec. 3.2); every other one when n = 2k.

    Args:
        n: size of the axis.
        k: how many to keep (1 <= k <= n).
    """
    if not 1 <= k <= n:
        raise TinylmError(f"cannot pick {k} of {n}")
    return torch.arange(k, dtype=torch.long) * n // k


def target_shape(cfg: ModelConfig, dim: int | None = None, ffn_dim: int | None = None,
                 n_heads: int | None = None, n_kv_heads: int | None = None,
                 n_layers: int | None = None, what: str = "prune") -> ModelConfig:
    """The source's config with the given sizes; each must be at most the source's.

    Heads keep the source's head_dim; n_heads alone keeps the source's n_kv_heads when it divides,
    n_heads must stay a multiple of n_kv_heads (GQA), and dim a multiple of n_heads (transformers'
    LlamaConfig checks it although head_dim is explicit).

    Args:
        cfg: the source config.
        dim, ffn_dim, n_heads, n_kv_heads, n_layers: target sizes (None: the source's).
        what: the operation, named in error messages.
    """
    want = dict(dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers)
    sizes = {k: (getattr(cfg, k) if v is None else v) for k, v in want.items()}
    if n_heads is not None and n_kv_heads is None and n_heads % cfg.n_kv_heads:
        raise TinylmError(f"{what}: n_heads {n_heads} is not a multiple of the source's n_kv_heads "
                          f"{cfg.n_kv_heads}; give --n-kv-heads too")
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise TinylmError(f"{what}: {name} must be a positive integer, got {value!r}")
        if value > getattr(cfg, name):
            raise TinylmError(f"{what}: {name} {value} is larger than the source's {getattr(cfg, name)}")
    if sizes["dim"] % sizes["n_heads"]:  # transformers' LlamaConfig refuses it, even with head_dim set
        raise TinylmError(f"{what}: dim {sizes['dim']} is not a multiple of n_heads {sizes['n_heads']} "
                          "(transformers requires it)")
    if sizes["n_heads"] % sizes["n_kv_heads"]:
        raise TinylmError(f"{what}: n_heads {sizes['n_heads']} is not a multiple of n_kv_heads {sizes['n_kv_heads']}")
    if sizes["n_heads"] // sizes["n_kv_heads"] > cfg.n_heads // cfg.n_kv_heads:
        raise TinylmError(f"{what}: {sizes['n_heads']} query heads over {sizes['n_kv_heads']} key/value heads "
                          f"needs {sizes['n_heads'] // sizes['n_kv_heads']} per group, the source has only "
                          f"{cfg.n_heads // cfg.n_kv_heads}")
    return dataclasses.replace(cfg, **sizes)


def check_memory(cfg: ModelConfig, what: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
    """Refuse a model shape whose weights would not fit in the memory available, before allocating.

    Every place that makes a model of a new shape calls this first (loading, init, grow, pretraining):
    the estimate is `ModelConfig.weight_bytes`, the memory `core.devices.available_memory`.

    Args:
        cfg: the shape.
        what: the model, named in the message ("grow: the grown model").
        dtype: the parameters' dtype.
        device: where the model will live.
    """
    shape = f"dim {cfg.dim}, {cfg.n_layers} layers, vocabulary {cfg.vocab_size}"
    devices.check_memory(cfg.weight_bytes(dtype.itemsize), device, f"{what} ({shape})")


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
          where: str = "the weights", quantization: dict[str, Any] | None = None) -> Llama:
    """A Llama of shape `cfg` holding exactly the tensors of `state` (HF names), checked first.

    Args:
        cfg: the model shape.
        state: HF-named tensors; lm_head.weight may be absent when embeddings are tied.
        dtype: the parameters' dtype (integer tensors, e.g. quantised codes, keep theirs).
        where: named in error messages.
        quantization: the "quantization" block of a quantised checkpoint (see `_quantized_shells`).
    """
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = Llama(cfg)
        if quantization:
            _quantized_shells(model, quantization)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    _check_state(expected, state, where)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v
                           for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantised head has its own codes
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model


# ----- quantised checkpoints (hook) ----------------------------------------------------------------
# A checkpoint written by `tinylm quantize` has config.json "tinylm" -> "quantization" = {"scheme",
# "group_size", "modules"} and holds <module>.qweight / <module>.scales instead of <module>.weight.
# The QLinear module and the swap live in tinylm/qlinear.py (model layer), not in the quantize stage.

def _quantized_shells(model: Llama, quantization: dict[str, Any]) -> None:
    from tinylm.model.qlinear import swap_in

    swap_in(model, quantization, quantize=False)


def _check_state(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TinylmError(f"{where}: weight {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise TinylmError(f"{where}: unexpected weight {unexpected[0]} (not a plain Llama?)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise TinylmError(f"{where}: {name} has shape {tuple(state[name].shape)} but the config "
                              f"implies {shape}")


# ----- vocabulary ----------------------------------------------------------------------------------


def trim_vocab(model: Llama, token_map: list[int] | Tensor) -> Llama:
    """Keep only the embedding and LM-head rows of `token_map` (old ids in new-id order).

    For text whose tokens are all kept, the new logits are the old logits at the kept ids.
    bos/eos/pad ids follow their rows.

    Args:
        model: the source (unchanged).
        token_map: kept old ids; new id i is old id token_map[i].
    """
    kept = torch.as_tensor(token_map, dtype=torch.long)
    if kept.ndim != 1 or len(kept) == 0 or int(kept.min()) < 0 or int(kept.max()) >= model.config.vocab_size:
        raise TinylmError(f"token map: ids must be in [0, {model.config.vocab_size})")
    if len(torch.unique(kept)) != len(kept):
        raise TinylmError("token map: an id is kept twice")
    return slice_model(model, Keep(tokens=kept))


@torch.no_grad()
def resize_vocab(model: Llama, n: int) -> Llama:
    """A copy of `model` with `n` embedding and LM-head rows: the first min(n, old) rows kept, new rows
    set to the mean of the old rows (of each matrix; a tied head stays tied).

    The mean keeps a new token's logit near the average token's instead of a random one's (Hewitt 2021,
    "Initializing New Word Embeddings for Pretrained Language Models"; transformers' `resize_token_embeddings`
    does the same). Logits of the old tokens are unchanged.

    Args:
        model: the source (unchanged).
        n: the new vocabulary size.
    """
    old = model.config.vocab_size
    if n < 1:
        raise TinylmError(f"a vocabulary of {n} tokens is too small")
    if n <= old:
        return slice_model(model, Keep(tokens=torch.arange(n)))
    if not isinstance(model.lm_head, nn.Linear) or not isinstance(model.model.embed_tokens, nn.Embedding):
        raise TinylmError("resizing the vocabulary of a quantised embedding or LM head is not supported; "
                          "resize before quantising")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[name]  # (old, dim)
        state[name] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(n - old, -1)])
    cfg = dataclasses.replace(model.config, vocab_size=n)
    return build(cfg, state, next(model.parameters()).dtype, where="the resized model").train(model.training)


def export_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores, detached on the CPU, HF names."""
    # Tied lm_head is not stored (HF does the same and re-ties from tie_word_embeddings).
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state
