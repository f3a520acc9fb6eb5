"""Weight-only quantised linear layers and the module swap that puts them into a model.

This sits at the model layer (imports torch and config only) so that `checkpoint.py` can rebuild a
quantised checkpoint without importing the `quantize` stage. Symmetric per-group quantisation: each
row of a weight (out, in) is cut into groups of `group_size` inputs; a group stores one fp16 scale
(absmax / qmax) and integer codes round(w / scale). int8 codes are int8; int4 codes are packed two per
byte (low nibble = even column), offset by 8 so they fit 0..15, as GGML's Q4_0 does.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.core.errors import TinylmError

# qmax per scheme: int8 codes lie in [-127, 127] (symmetric, -128 unused); int4 codes in [-8, 7].
QMAX = {"int8": 127, "int4": 7}


QMIN = {"int8": -127, "int4": -8}


class QLinear(nn.Module):
    """A bias-free linear layer whose weight is held as integer codes and per-group scales.

    Args:
        in_features, out_features: shape of the float weight (out_features, in_features).
        scheme: "int8" or "int4".
        group_size: inputs per scale; 0 means one scale per output row (per-channel).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int) -> None:
        super().__init__()
        if scheme not in QMAX:
            raise TinylmError(f"unknown quantization scheme {scheme!r} (known: {', '.join(QMAX)})")
        group = group_size or in_features
        if in_features % group:
            raise TinylmError(f"group size {group_size} does not divide a layer's {in_features} inputs")
        if scheme == "int4" and group % 2:
            raise TinylmError(f"int4 needs an even group size, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group
        packed = in_features if scheme == "int8" else in_features // 2
        code_dtype = torch.int8 if scheme == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=code_dtype))
        self.register_buffer("scales", torch.ones(out_features, in_features // group, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int) -> "QLinear":
        """Quantise a float nn.Linear (no bias)."""
        if linear.bias is not None:
            raise TinylmError("quantization supports bias-free linear layers only")
        q = cls(linear.in_features, linear.out_features, scheme, group_size)
        codes, scales = quantize_weight(linear.weight.detach().float(), scheme, q.group_size)
        q.qweight = pack(codes, scheme)
        q.scales = scales
        return q

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # safetensors hands out tensors at arbitrary offsets into one file buffer; the int8 kernel
        # below crashes on codes that are not 64-byte aligned, and a fresh allocation is.
        # (load_state_dict gives each module a shallow copy of the dict, so replacing an entry is local.)
        if prefix + "qweight" in state_dict:
            state_dict[prefix + "qweight"] = state_dict[prefix + "qweight"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in) the codes stand for."""
        codes = unpack(self.qweight, self.scheme).to(dtype)  # (out, in)
        codes = codes.view(self.out_features, -1, self.group_size)  # (out, n_groups, G)
        return (codes * self.scales.to(dtype)[..., None]).view(self.out_features, self.in_features)

    @property
    def per_channel_int8(self) -> bool:
        """Codes PyTorch's int8 kernel can read directly (`int8_matmul`)."""
        return self.scheme == "int8" and self.group_size == self.in_features

    def forward(self, x: Tensor) -> Tensor:
        # the int8 kernel has no backward: when a gradient must flow through x (QLoRA training, adapters
        # below this layer), multiply by the dequantised weight instead
        if self.per_channel_int8 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            return int8_matmul(x, self.qweight, self.scales)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}, group_size={self.group_size}"


def int8_matmul(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x @ (codes * scales)^T on PyTorch's weight-only int8 CPU kernel (the one gpt-fast uses).

    It reads the int8 codes directly, ~9x faster than dequantising a big layer first, but only with bf16
    activations (BENCHMARKS.md, Deploy): x is rounded to bf16 and the result cast back to x's dtype.

    Args:
        x: (..., in) activations; codes: (out, in) int8, 64-byte aligned; scales: (out,) or (out, 1).
    """
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), codes,
                                           scales.to(torch.bfloat16).view(-1))
    return y.to(x.dtype).view(*x.shape[:-1], codes.shape[0])


def quantize_weight(w: Tensor, scheme: str, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-group codes (out, in) int8 and fp16 scales (out, in // group_size).

    Args:
        w: float weight (out, in).
        scheme: "int8" or "int4".
        group_size: inputs per scale (divides in).
    """
    out, inp = w.shape
    groups = w.view(out, inp // group_size, group_size)  # (out, n_groups, G)
    scales = (groups.abs().amax(-1) / QMAX[scheme]).to(torch.float16)  # fp16 first: codes use the stored scale
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]  # all-zero group -> codes 0
    codes = (groups / safe).round().clamp(QMIN[scheme], QMAX[scheme]).to(torch.int8)
    return codes.view(out, inp), scales


def pack(codes: Tensor, scheme: str) -> Tensor:
    """int8 codes as stored: unchanged for int8, two nibbles per uint8 byte for int4."""
    if scheme == "int8":
        return codes.contiguous()
    u = (codes + 8).to(torch.uint8)  # [-8, 7] -> [0, 15]
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack(stored: Tensor, scheme: str) -> Tensor:
    """The int8 codes (out, in) from what `pack` stored."""
    if scheme == "int8":
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).view(stored.shape[0], -1)  # interleave back: col 2j, 2j+1


def target_modules(model: nn.Module, skip_lm_head: bool = False) -> list[str]:
    """Names of the nn.Linear modules a weight-only scheme replaces.

    The lm_head is included even when tied: it is usually the biggest matrix a decoded token reads, so
    it gets its own codes while the embedding table (read one row per token) stays float.

    Args:
        model: a Llama.
        skip_lm_head: keep the lm_head in float.
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not (name == "lm_head" and skip_lm_head)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_in(model: nn.Module, spec: dict[str, Any], quantize: bool = True) -> nn.Module:
    """Replace the linear layers that `spec` names by QLinear, in place.

    Args:
        model: a Llama (float weights, or on the meta device when building from a checkpoint).
        spec: {"scheme": "int8"|"int4", "group_size": int, "modules": [names]}, the block a
            quantised checkpoint keeps in config.json under "tinylm" -> "quantization".
        quantize: quantise the current weights; False puts empty QLinear shells to be loaded into.
    """
    try:
        scheme, group, names = spec["scheme"], int(spec["group_size"]), list(spec["modules"])
    except (KeyError, TypeError, ValueError):
        raise TinylmError(f"bad quantization block {spec!r}: needs scheme, group_size and modules") from None
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TinylmError(f"quantization: {name} is not a linear layer")
        if quantize:
            q = QLinear.from_linear(linear, scheme, group)
        else:
            q = QLinear(linear.in_features, linear.out_features, scheme, group)
        _set_module(model, name, q)
    return model


def swap_out(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QLinear by a float nn.Linear holding its dequantised weight, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=False, dtype=dtype, device=m.qweight.device)
            linear.weight = nn.Parameter(m.dequantized(dtype), requires_grad=False)
            _set_module(model, name, linear)
    return model


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The spec of a model's QLinear layers (None for a float model)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not found:
        return None
    first = found[0][1]
    group = 0 if first.group_size == first.in_features else first.group_size
    return {"scheme": first.scheme, "group_size": group, "modules": [n for n, _ in found]}


def float_model(model: nn.Module) -> nn.Module:
    """`model` itself if it is float, else a copy with every QLinear dequantised to nn.Linear."""
    if not any(isinstance(m, QLinear) for m in model.modules()):
        return model
    out = swap_out(copy.deepcopy(model))
    if out.config.tie_embeddings and out.lm_head.weight is not out.model.embed_tokens.weight:
        out.config = dataclasses.replace(out.config, tie_embeddings=False)  # the head had codes of its own
    return out
