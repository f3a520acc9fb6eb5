"""Fold a LoRA adapter into its base: `tinylm merge BASE --adapter DIR --out DIR`.

The adapter is a PEFT-format dir (`formats.peft`: tinylm's own or one `peft` saved); the result is an
ordinary checkpoint whose weights are W + (alpha / r) B A, with an adapter's trained token rows (PEFT's
trainable tokens: ChatML's added tokens) written into the embedding table and LM head, which
transformers loads as a plain `LlamaForCausalLM`. Over a quantised base (QLoRA) the merged model is float: the sum is not a set of
integer codes, and every other quantised layer is dequantised with it (`tinylm quantize` re-quantises).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.core.fs import check_out
from tinylm.core.recipe import validate
from tinylm.formats import checkpoint
from tinylm.formats.peft import load_adapter
from tinylm.model.llama import Llama
from tinylm.model.lora import lora_layers, merge_lora
from tinylm.model.qlinear import float_model


@dataclass
class MergeConfig:
    """What `tinylm merge` does: fold a PEFT LoRA adapter into its base model's weights."""

    source: str  # the base model: checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    adapter: str  # PEFT adapter dir (adapter_config.json + adapter_model.safetensors)
    out: str  # checkpoint dir to write (float weights, HF-loadable)
    overwrite: bool = False  # replace an existing out

    def __post_init__(self) -> None:
        validate(self)  # the declared ranges, also for a config built in Python
        check_out(self.out, self.overwrite)


def main(cfg: MergeConfig) -> None:
    """`tinylm merge`."""
    path, n = merge(cfg)
    print(f"merged {n} adapted layers into {path}")


def merge_into(model: Llama, adapter: str | Path) -> tuple[Llama, int]:
    """`model` with the adapter at `adapter` folded in (a float model), and how many layers it adapted.

    Args:
        model: the base model (float or quantised); changed in place.
        adapter: a PEFT LoRA adapter dir.
    """
    load_adapter(model, adapter)
    n = len(lora_layers(model))
    return float_model(merge_lora(model)), n


def merge(cfg: MergeConfig) -> tuple[Path, int]:
    """Load the base and the adapter, merge, and write `cfg.out`; returns (the written dir, adapted layers)."""
    loaded = checkpoint.load(cfg.source)
    model, n = merge_into(loaded.model, cfg.adapter)  # every check before anything is written
    meta = {"merged_from": {"base": str(cfg.source), "adapter": str(cfg.adapter)}}
    return checkpoint.save(model, cfg.out, loaded.tokenizer, meta=meta), n
