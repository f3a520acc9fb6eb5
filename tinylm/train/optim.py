"""AdamW with width-aware learning rates."""

from __future__ import annotations

from typing import Any

import torch

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
        is_hidden = p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
        (hidden if is_hidden else other).append(p)
    return [dict(params=hidden, lr_scale=scale, weight_decay=cfg.weight_decay),
            dict(params=other, lr_scale=1.0, weight_decay=0.0)]


def make_optimizer(model: Llama, cfg: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where this PyTorch build has it for the device (one kernel for all parameters)."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    """Set every group's lr to peak * factor * its lr_scale; return peak * factor."""
    for g in optimizer.param_groups:
        g["lr"] = peak * factor * g["lr_scale"]
    return peak * factor
