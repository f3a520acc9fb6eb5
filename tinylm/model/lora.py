"""LoRA and QLoRA: low-rank adapters swapped in over a model's linear layers.

LoRA (Hu et al. 2021) freezes a weight W (out, in) and learns y = W x + (alpha / r) * B A dropout(x), with
A (r, in) and B (out, r); QLoRA (Dettmers et al. 2023) does the same over a frozen quantised W (here
tinylm's int8 / int4 `QLinear`). `apply_lora` walks `named_modules()` and swaps each target for a
`LoraLinear` holding the old module as `base_layer`, PEFT's layout, so adapter tensors are named as PEFT
names them (`model.layers.0.self_attn.q_proj.lora_A.weight`) and `formats.peft` only adds PEFT's prefix.

Initialisation follows PEFT's default: A kaiming-uniform with a = sqrt(5) (nn.Linear's own init,
uniform(-1/sqrt(in), 1/sqrt(in))), B = 0, so a fresh adapter leaves the model's function unchanged.
LoftQ (Li et al. 2023) instead alternates quantising W - s B A and a rank-r SVD of W - Q, so that
Q + s B A starts closer to W than Q alone.

Rows of tokens added to the vocabulary (ChatML's, `data.chat.add_chatml`) are new: LoRA on the linear
layers never reaches them, and a model that cannot move them never learns to emit <|im_end|>.
`train_token_rows` makes just those rows of the embedding table and the output layer trainable, as PEFT's
trainable tokens (`LoraConfig.trainable_token_indices`) do.

Merging folds s B A into the weight. Over a quantised base the sum cannot be held in the base's codes,
so a merged QLoRA layer is a float nn.Linear holding dequant(Q) + s B A (re-quantise afterwards if
wanted; that rounds the adapter's contribution away in part).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.core.errors import TinylmError
from tinylm.model.qlinear import QLinear, pack, quantize_weight

ALL_LINEAR = "all-linear"


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear or QLinear) plus a trainable low-rank update.

    Args:
        base: the layer to adapt; its parameters are frozen.
        r: the adapter's rank.
        alpha: the scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter's input (PEFT applies it before A only).
        use_rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise TinylmError(f"LoRA rank must be at least 1, got {r}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        # Adapters are kept in fp32 whatever the base's dtype (PEFT's autocast_adapter_dtype does the same).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.quantized_base: QLinear | None = None  # the codes a merged QLoRA layer was folded from

    def reset(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A kaiming-uniform (a = sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """s B A, the (out, in) update the adapter adds to the base's weight (fp32)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged:
            return y
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s B A into the base weight; a QLinear base becomes a float nn.Linear (kept for unmerge)."""
        if self.merged:
            return
        base = self.base_layer
        if isinstance(base, QLinear):
            self.quantized_base = base
            weight = base.dequantized(torch.float32)
            base = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device)
            base.weight.data = weight
            base.requires_grad_(False)
            self.base_layer = base
        base.weight.data = (base.weight.float() + self.delta_weight()).to(base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (a QLoRA layer gets its codes back exactly)."""
        if not self.merged:
            return
        if self.quantized_base is not None:
            self.base_layer, self.quantized_base = self.quantized_base, None
        else:
            w = self.base_layer.weight
            w.data = (w.float() - self.delta_weight()).to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class TrainableRows(nn.Module):
    """A frozen embedding table or output layer whose rows for some token ids train.

    PEFT's `TrainableTokensLayer`: the parameter `trainable_tokens_delta` (n, dim) holds those rows'
    values (not a difference from the base), written over the base weight in every forward, so every
    other row stays the base's exactly.

    Args:
        base: an nn.Embedding or nn.Linear with a (V, dim) weight; frozen.
        ids: the token ids whose rows train.
        values: the rows' parameter to share (a tied output layer shares the embedding's); None: a new
            one holding the base's rows.
    """

    def __init__(self, base: nn.Module, ids: list[int], values: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        weight = base.weight
        self.register_buffer("token_indices", torch.tensor(ids, dtype=torch.long, device=weight.device),
                             persistent=False)
        if values is None:
            values = nn.Parameter(weight.detach()[self.token_indices].clone().float())
        self.trainable_tokens_delta = values

    @property
    def weight(self) -> Tensor:
        """(V, dim) the base weight with the trained rows in place."""
        w = self.base_layer.weight
        return w.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, self.weight)  # (B, T, dim)
        return F.linear(x, self.weight)  # (B, T, V)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The base layer with the trained rows written into its weight (in place)."""
        w = self.base_layer.weight
        w[self.token_indices] = self.trainable_tokens_delta.to(w.dtype)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.tolist()}"


EMBED, HEAD = "model.embed_tokens", "lm_head"  # the layers whose rows are tokens


def train_token_rows(model: nn.Module, ids: dict[str, list[int]],
                     values: dict[str, Tensor] | None = None) -> nn.Module:
    """Make the rows of some token ids trainable in the embedding table and the output layer (PEFT's
    trainable tokens), in place; returns `model`. With tied embeddings the output layer shares the
    embedding's rows, one parameter, as PEFT ties them.

    Args:
        model: a Llama, frozen (with LoRA adapters, say).
        ids: {"model.embed_tokens": ids[, "lm_head": ids (untied only)]}; an empty list trains nothing.
        values: the same keys -> (n, dim) rows to start from (a saved adapter's); None: the base's rows.
    """
    tied = bool(model.config.tie_embeddings)
    allowed = {EMBED} if tied else {EMBED, HEAD}
    if set(ids) - allowed:
        raise TinylmError(f"trainable token rows are for {' and '.join(sorted(allowed))}" +
                          (" (lm_head is tied to it)" if tied else "") + f", not {', '.join(sorted(set(ids) - allowed))}")
    if token_rows(model):
        raise TinylmError("the model already has trainable token rows")
    vocab = model.config.vocab_size
    for name, rows in ids.items():
        if any(not 0 <= i < vocab for i in rows) or len(set(rows)) != len(rows):
            raise TinylmError(f"trainable token ids for {name} must be distinct and below {vocab}, got {rows}")
    given = {k: nn.Parameter(v.detach().clone().float()) for k, v in (values or {}).items()}
    if ids.get(EMBED):
        model.model.embed_tokens = TrainableRows(model.model.embed_tokens, ids[EMBED], given.get(EMBED))
        if tied:
            model.lm_head = TrainableRows(model.lm_head, ids[EMBED], model.model.embed_tokens.trainable_tokens_delta)
    if ids.get(HEAD):
        model.lm_head = TrainableRows(model.lm_head, ids[HEAD], given.get(HEAD))
    return model


def token_rows(model: nn.Module) -> dict[str, TrainableRows]:
    """The model's TrainableRows modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainableRows)}


def _device_of(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()])).device


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoraLinear modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the linear layers `targets` selects, matched as PEFT matches `target_modules`.

    Args:
        model: a Llama (float or quantised).
        targets: "all-linear" (every linear layer but lm_head, as PEFT), or names: an entry selects a
            layer whose name equals it or ends with "." + entry ("q_proj", "model.layers.0.mlp.up_proj").
    """
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QLinear))
              and ".lora_" not in n and not n.endswith(".base_layer")]
    if targets == ALL_LINEAR:
        return [n for n in linear if n != "lm_head"]
    if isinstance(targets, str) or not targets:
        raise TinylmError(f"LoRA targets must be {ALL_LINEAR!r} or a non-empty list of layer names, got {targets!r}")
    chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in chosen):
            leaves = sorted({n.rpartition(".")[2] for n in linear})
            raise TinylmError(f"LoRA target {t!r} names no linear layer of the model (its layers: {', '.join(leaves)})")
    if "lm_head" in chosen and getattr(model.config, "tie_embeddings", False):
        raise TinylmError("LoRA on lm_head needs untied embeddings (its weight is the embedding table's)")
    return chosen


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets: list[str] | str = ALL_LINEAR,
               seed: int = 0, use_rslora: bool = False, quantize: str | None = None, group_size: int = 0,
               loftq_iters: int = 0) -> nn.Module:
    """Freeze `model` and wrap its target layers in LoraLinear, in place; returns `model`.

    Args:
        model: a Llama, float or quantised (a QLinear target gets QLoRA over its codes).
        r, alpha, dropout, use_rslora: the adapters' rank, scale numerator, input dropout and scaling rule.
        targets: "all-linear" or layer names (`find_targets`).
        seed: seeds A's init (a private generator: the global RNG is untouched).
        quantize: QLoRA from a float model: "int8" or "int4" quantises every linear layer but lm_head
            (the output layer stays float, as transformers' bitsandbytes loading does) before adapting.
        group_size: inputs per quantisation scale (0: per output row), with `quantize`.
        loftq_iters: LoftQ initialisation with this many alternations (0: PEFT's default init); needs
            `quantize`, since LoftQ reads the float weights.
    """
    if loftq_iters < 0:
        raise TinylmError(f"loftq_iters must be at least 0, got {loftq_iters}")
    if loftq_iters and quantize is None:
        raise TinylmError("LoftQ initialisation needs quantize (int8 or int4): it starts from the float weights")
    if lora_layers(model):
        raise TinylmError("the model already has LoRA adapters (merge or unload them first)")
    names = find_targets(model, targets)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        if quantize is not None and isinstance(base, QLinear):
            raise TinylmError(f"{name} is already quantised: drop quantize, or start from the float model")
        if loftq_iters:
            base, a, b = loftq(base.weight.detach().float(), quantize, group_size, r, loftq_iters,
                               alpha / math.sqrt(r) if use_rslora else alpha / r)
        elif quantize is not None:
            base = QLinear.from_linear(base, quantize, group_size)
        layer = LoraLinear(base, r, alpha, dropout, use_rslora)
        layer.reset(generator)
        if loftq_iters:
            with torch.no_grad():
                layer.lora_A.weight.copy_(a)
                layer.lora_B.weight.copy_(b)
        _set_module(model, name, layer)
    if quantize is not None:  # the layers without an adapter are frozen and quantised too (QLoRA's memory)
        for name, m in list(model.named_modules()):
            if type(m) is nn.Linear and name != "lm_head" and ".lora_" not in name and "base_layer" not in name:
                _set_module(model, name, QLinear.from_linear(m, quantize, group_size))
    return model


def _qlinear_of(w: Tensor, scheme: str, group_size: int) -> QLinear:
    """A QLinear quantising the float weight w (out, in)."""
    q = QLinear(w.shape[1], w.shape[0], scheme, group_size)
    codes, scales = quantize_weight(w, scheme, q.group_size)
    q.qweight, q.scales = pack(codes, scheme).to(w.device), scales.to(w.device)
    return q


@torch.no_grad()
def loftq(w: Tensor, scheme: str, group_size: int, r: int, iters: int, scaling: float) -> tuple[QLinear, Tensor, Tensor]:
    """LoftQ (Li et al. 2023, Algorithm 1): Q = quant(W - s B A), then s B A = the rank-r SVD of W - Q,
    alternated `iters` times from B A = 0, as PEFT's `loftq_init` does.

    PEFT ignores the scaling s (it is right for alpha = r only); here A and B are divided by sqrt(s) so
    that the adapter's output, s B A x, is the SVD's.

    Args:
        w: the float weight (out, in).
        scheme, group_size: the quantisation ("int8" / "int4", inputs per scale, 0 = per row).
        r: the adapter's rank.
        iters: alternations (at least 1).
        scaling: the adapter's s (alpha / r, or alpha / sqrt(r) with rslora).

    Returns:
        (the quantised base, A (r, in), B (out, r)).
    """
    if iters < 1:
        raise TinylmError(f"LoftQ needs at least one iteration, got {iters}")
    residual = w
    for _ in range(iters):
        q = _qlinear_of(residual, scheme, group_size)
        u, s, vh = torch.linalg.svd(w - q.dequantized(torch.float32), full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in): left @ right = rank-r part
        residual = w - left @ right
    return q, right / math.sqrt(scaling), left / math.sqrt(scaling)


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter into its base weight, in place; returns `model`.

    Args:
        model: a model with LoraLinear layers (and TrainableRows).
        unload: replace each LoraLinear by its merged base layer (PEFT's merge_and_unload), leaving a
            plain model whose QLoRA layers are float nn.Linear, and write trained token rows into their
            tables; False keeps the adapters, marked merged, for `unmerge_lora` (PEFT's merge_adapter),
            and the token rows as they are (they compute the same either way).
    """
    for name, layer in lora_layers(model).items():
        layer.merge()
        if unload:
            _set_module(model, name, layer.base_layer)
    if unload:
        for name, rows in token_rows(model).items():
            _set_module(model, name, rows.merge())
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, unload=False)`, in place; returns `model`."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging them (each LoraLinear becomes its base), in place."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        _set_module(model, name, layer.base_layer)
    for name, rows in token_rows(model).items():
        _set_module(model, name, rows.base_layer)
    return model


def base_model(model: nn.Module) -> nn.Module:
    """A view of `model` without its adapters and trainable token rows, sharing every tensor with it: what
    to save as the base an adapter goes with (`checkpoint.save(base_model(model), dir)`), while training
    continues on `model`. Merged adapters are unmerged first."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    unmerge_lora(model)
    out = copy.deepcopy(model, memo=shared)  # new modules, same tensors
    for name, layer in [*lora_layers(out).items(), *token_rows(out).items()]:
        _set_module(out, name, layer.base_layer)
    return out


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (`model.layers.0.self_attn.q_proj.lora_A.weight`, ...)."""
    return {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def lora_settings(model: nn.Module) -> dict[str, object]:
    """r, alpha, dropout and rslora shared by the model's adapters (one setting for all, as saved)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise TinylmError("the model has no LoRA adapters")
    first = layers[0]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    settings = {"r": first.r, "alpha": first.alpha, "dropout": dropout, "use_rslora": first.use_rslora}
    if any((m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora) for m in layers):
        raise TinylmError("the model's adapters differ in rank or alpha; one setting for all is supported")
    return settings
