"""Linear layers laid out for one-row CPU decoding, and the module swap that puts them into a model.

One row on a CPU is a chain of matrix-vector products, bound by reading the weights (BENCHMARKS.md,
Deploy): MKL's gemv reads a float weight held transposed, (in, out), ~3x faster than nn.Linear's
(out, in) once a layer outgrows the cache; layers that read one input (q/k/v, gate/up) run as one
product; per-channel int8 layers keep their codes for PyTorch's weight-only int8 kernel
(`int8_matmul`). `prepare_for_decode` swaps such layers into a copy of the model, as quantisation swaps
in QLinear; the model's own forward calls them through `project`, so there is one forward pass.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tinylm.model.qlinear import QLinear, int8_matmul

# Children of one module that read the same input, fused into one product (HF Llama names).
GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",), ("lm_head",)]


class FusedLinear(nn.Module):
    """Bias-free linear layers of one input as one product: a transposed float weight (in, sum of outs),
    or per-channel int8 codes (sum of outs, in) with bf16 scales. Its output is the layers' outputs
    side by side; `project` splits them.

    Args:
        layers: float nn.Linear without bias, or per-channel int8 QLinear (`fusable`).
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.in_features, self.out_sizes = layers[0].in_features, [m.out_features for m in layers]
        with torch.no_grad():
            if isinstance(layers[0], QLinear):
                self.register_buffer("weight_t", None)
                self.register_buffer("qweight", torch.cat([m.qweight for m in layers]).contiguous())
                self.register_buffer("scales", torch.cat([m.scales.view(-1) for m in layers]).to(torch.bfloat16))
            else:
                self.register_buffer("weight_t", torch.cat([m.weight.detach() for m in layers]).t().contiguous())

    @staticmethod
    def fusable(layers: list[nn.Module]) -> bool:
        """All float bias-free nn.Linear, or all per-channel int8 QLinear (what the fast kernels read)."""
        return (all(type(m) is nn.Linear and m.bias is None for m in layers)
                or all(isinstance(m, QLinear) and m.per_channel_int8 for m in layers))

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_t is not None:
            return x @ self.weight_t  # (..., in) @ (in, sum of outs)
        return int8_matmul(x, self.qweight, self.scales)

    def extra_repr(self) -> str:
        kind = "float (in, out)" if self.weight_t is not None else "int8"
        return f"{self.in_features}, {self.out_sizes}, {kind}"


class FusedAway(nn.Module):
    """Stands where a layer was whose weight now sits in the FusedLinear of its group's first layer."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"this layer is fused into {self.into}: call both through fused.project")

    def extra_repr(self) -> str:
        return f"into={self.into}"


def project(x: Tensor, *layers: nn.Module) -> tuple[Tensor, ...]:
    """Each layer applied to x, as one product when `prepare_for_decode` fused them into the first.

    Args:
        x: (..., in) the layers' common input.
        layers: the layers in their group's order (q, k, v or gate, up).
    """
    first = layers[0]
    if len(layers) > 1 and isinstance(first, FusedLinear):
        return first(x).split(first.out_sizes, dim=-1)
    return tuple(layer(x) for layer in layers)


def prepare_for_decode(model: nn.Module) -> nn.Module:
    """A copy of `model` for one-row CPU decoding, `model` itself unchanged.

    Walks named_modules() and replaces each group of GROUPS whose layers are `FusedLinear.fusable` by one
    FusedLinear (the group's other layers by FusedAway); a group mixing kinds, or quantised other than
    per-channel int8, keeps its modules. The copy shares every other parameter and buffer with `model`,
    so it costs the fused weights only; they are copies, to be rebuilt when `model`'s weights change.

    Args:
        model: a Llama, float or quantised.
    """
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo=shared)  # new modules, same tensors
    for parent in list(out.modules()):
        for group in GROUPS:
            layers = [getattr(parent, name, None) for name in group]
            if all(isinstance(m, nn.Module) for m in layers) and FusedLinear.fusable(layers):
                setattr(parent, group[0], FusedLinear(layers))
                for name in group[1:]:
                    setattr(parent, name, FusedAway(group[0]))
    return out
