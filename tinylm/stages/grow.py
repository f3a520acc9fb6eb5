"""Models from other models without training: grow (HyperCloning, G_stack) or shrink by selection
(weight selection, Inheritune), or start fresh in the same shape (the baseline).

- HyperCloning (Samragh et al. 2024, "Scaling Smart: Accelerating Large Language Model Pre-training
  with Small Model Initialization"): width x n by replicating every channel, head and neuron n times,
  so that the grown model computes the source's logits exactly.
- G_stack (Du et al. 2024, "Stacking Your Transformers"): depth x g by repeating the whole block stack.
- Weight selection (Xu et al. 2024, "Initializing Models with Larger Ones"): evenly spaced layers and,
  along every dimension, evenly spaced indices shared by all matrices that have that dimension.
- Inheritune (Sanyal et al. 2024, "Inheritune: Training Smaller Yet More Attentive Language Models"):
  the first k blocks with the embeddings, final norm and LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.core.recipe import Count, NonNegative, Seed, one_of
from tinylm.formats import checkpoint
from tinylm.model.growth import hypercloning, stack

# ----- the stages ----------------------------------------------------------------------------------

GROW_METHODS = ("hypercloning", "stack")


@dataclass
class GrowConfig:
    """What `tinylm grow` does: function-preserving growth, HyperCloning (width) or G_stack (depth)."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    out: str  # checkpoint dir to write
    method: one_of(*GROW_METHODS)  # hypercloning (needs --dim) or stack (needs --factor)
    dim: Count | None = None  # hypercloning: the new width, a multiple of the source's
    factor: Count | None = None  # stack: copies of the block stack
    noise: NonNegative = 0.0  # hypercloning: function-preserving symmetry-breaking noise (relative std)
    seed: Seed = 0  # noise seed
    overwrite: bool = False  # replace an existing out


def main(cfg: GrowConfig) -> None:
    """`tinylm grow`."""
    print(f"wrote {grow(cfg)}")


def grow(cfg: GrowConfig) -> Path:
    """Load, grow, save; returns the checkpoint dir."""
    needed = "dim" if cfg.method == "hypercloning" else "factor"
    if getattr(cfg, needed) is None:
        raise TinylmError(f"grow: --method {cfg.method} needs --{needed}")
    check_out(cfg.out, cfg.overwrite)
    loaded = checkpoint.load(cfg.source)
    if cfg.method == "hypercloning":
        model = hypercloning(loaded.model, cfg.dim, cfg.noise, cfg.seed)
    else:
        model = stack(loaded.model, cfg.factor)
    meta = {"derived_from": str(cfg.source), "method": cfg.method, "noise": cfg.noise}
    return checkpoint.save(model, cfg.out, tokenizer=loaded.tokenizer, meta=meta)
