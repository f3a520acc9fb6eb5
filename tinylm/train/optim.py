"""AdamW with width-aware learning rates; or Muon for the hidden matrices beside AdamW for the rest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.optim._muon import _adjust_lr  # Muon's lr shape factor, torch's own

from tinylm.model.llama import Llama
from tinylm.train.config import OptimSection

# ----- optimizer -------------------------------------------------------------------------------------

def param_groups(model: Llama, cfg: OptimSection) -> list[dict[str, Any]]:
    """AdamW parameter groups with width-aware learning rates and weight decay on hidden matrices.

    Learning rate: MiniCPM's "wind tunnel" rule (Hu et al. 2024, sec. 3; muP for Adam, Yang et al. 2022,
    Table 3): the lr tuned at width base_width (MiniCPM's dim_model_base = 256) carries over to width
    dim if hidden matrices (q, k, v, o, gate, up, down) use lr * base_width / dim, while vector-like
    parameters (token embeddings, an untied lm_head treated as the embedding's mirror, RMSNorm gains)
    keep lr. tinylm does not add muP's forward multipliers (scale_emb, logit scaling), so exported
    models stay plain HF Llama; the default peak 3e-3 at width 256 is for this standard parametrisation.

    Weight decay applies to hidden matrices only: not to norms (scale-free gains), and not to
    embeddings, whose rare-token rows get few gradients and would only shrink (OLMo 2, Team OLMo 2024,
    sec. 3.1 removes it too).

    Args:
        model: the (unwrapped) model.
        cfg: the optim section.
    """
    scale = cfg.base_width / model.config.dim if cfg.width_scaling else 1.0
    hidden, other = [], []
    for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
        if not p.requires_grad:  # frozen (a LoRA base): no gradient, no optimizer state
            continue
        (hidden if is_hidden_matrix(name, p) else other).append(p)
    return [dict(params=hidden, lr_scale=scale, weight_decay=cfg.weight_decay),
            dict(params=other, lr_scale=1.0, weight_decay=0.0)]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside the blocks (attention and MLP projections), not the embedding or the head."""
    return p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name


class Optimizers:
    """Several torch optimizers over disjoint parameters, stepped as one (Muon beside AdamW).

    `param_groups` lists every group of every part, so `set_lr` reaches them all; iterating yields the
    parts, which is what torch.distributed.checkpoint's get_state_dict / set_state_dict take for
    several optimizers (resumable checkpoints store their state under parameter names, as for one).
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.parts)


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 off the GPU.

    torch runs the iteration in bfloat16, which suits a GPU's matrix units; a CPU without bf16 matrix
    instructions emulates those products. Measured on the 2-core reference machine, one thread: 10-24x
    slower than float32 for 128x128 to 128x512 matrices, so a Muon step of the 1m preset cost 2.2x an
    AdamW step (BENCHMARKS.md, "Speedrun: Muon vs AdamW"). Everything else is torch's: the state (one
    momentum buffer per matrix, so checkpoints are interchangeable), Nesterov momentum, decoupled weight
    decay and the lr shape factor. Written here because torch exposes no option for the iteration's dtype.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            for p, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration X <- a X + b (X X^T) X + c (X X^T)^2 X from X = G / ||G||_F
    (Jordan et al. 2024), on the wide orientation of G, in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def make_optimizer(model: Llama, cfg: OptimSection, device: torch.device) -> Optimizers:
    """optim.name adamw: AdamW over every group of `param_groups`, fused where this PyTorch build has it
    for the device (one kernel for all parameters). muon: Muon (torch's, float32 off the GPU) for the hidden
    matrices at muon_lr (the orthogonalised update's own shape factor sqrt(max(1, rows / cols)), Keller Jordan's
    "original" adjustment, replaces the width scaling), AdamW as above for the rest."""
    groups = param_groups(model, cfg)
    fused = device.type in ("cuda", "cpu")
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        for g in groups:
            g["lr"] = cfg.lr * g["lr_scale"]
        return Optimizers([torch.optim.AdamW(groups, **adamw)])
    hidden, other = groups
    parts = [torch.optim.AdamW([{**other, "lr": cfg.lr}], **adamw)]
    if hidden["params"]:  # a LoRA run may train no full matrix
        # lr_scale muon_lr / lr: set_lr's one peak lr drives both (the schedule scales them alike)
        muon = dict(params=hidden["params"], lr_scale=cfg.muon_lr / cfg.lr, weight_decay=cfg.weight_decay)
        parts.insert(0, Muon([muon], lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True))
    return Optimizers(parts)


def set_lr(optimizer: Optimizers | torch.optim.Optimizer, peak: float, factor: float) -> float:
    """Set every group's lr to peak * factor * its lr_scale; return peak * factor."""
    for g in optimizer.param_groups:
        g["lr"] = peak * factor * g["lr_scale"]
    return peak * factor
