"""Export a model to other formats: HF (transformers) dirs, GGUF (llama.cpp) files, ONNX graphs.

This is the only module that maps tinylm's (HF) names onto other formats' names. The GGUF writer is
the real version of what llama.cpp's convert_hf_to_gguf.py does for a Llama: tensor names from
checkpoint.GGUF_TO_HF / GGUF_BLOCK_TO_HF, q/k rows permuted for llama.cpp's RoPE, and the tokenizer as
"gpt2" (byte-level BPE) metadata with the pre-tokenizer name that reproduces tinylm's pre-tokenization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.core.recipe import one_of, validate
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats import checkpoint
from tinylm.formats.gguf import GGUF_TYPES, export_gguf
from tinylm.formats.onnx import export_onnx
from tinylm.model.llama import Llama
from tinylm.model.qlinear import float_model

FORMATS = ("hf", "gguf", "onnx")




@dataclass
class ExportConfig:
    """What `tinylm export` does (a quantised checkpoint is dequantised first)."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    format: one_of(*FORMATS)  # hf, gguf or onnx
    out: str  # dir (hf) or file (gguf, onnx) to write
    gguf_type: one_of(*GGUF_TYPES) = "f16"  # GGUF weight type: f32, f16, q8_0 or q4_0 (norms stay f32, as llama.cpp does)
    overwrite: bool = False  # replace an existing out

    def __post_init__(self) -> None:
        validate(self)  # the declared ranges, also for a config built in Python
        check_out(self.out, self.overwrite, kind="dir" if self.format == "hf" else "file")


def main(cfg: ExportConfig) -> None:
    """`tinylm export`."""
    print(f"wrote {export(cfg)}")


def export(cfg: ExportConfig) -> Path:
    """Load `cfg.source` and write it in `cfg.format` to `cfg.out`; returns the written path."""
    loaded = checkpoint.load(cfg.source)
    model = float_model(loaded.model)  # a quantised checkpoint becomes float (other formats have their own quants)
    name = Path(str(loaded.source)).stem
    if cfg.format == "hf":
        return export_hf(model, cfg.out, loaded.tokenizer)
    if cfg.format == "gguf":
        return export_gguf(model, cfg.out, loaded.tokenizer, cfg.gguf_type, name=name)
    return export_onnx(model, cfg.out)


# ----- HF ------------------------------------------------------------------------------------------

def export_hf(model: Llama, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """A dir that `transformers.AutoModelForCausalLM.from_pretrained` loads: the tinylm checkpoint
    format is already HF's (STYLE.md rule 3), so this is `checkpoint.save` of a float model (a qk_norm
    model is an HF Qwen3). A logit soft-cap, which no HF Llama or Qwen3 applies, is refused."""
    if model.config.logit_softcap is not None:
        raise TinylmError("HF export: the model has model.logit_softcap, which HF LlamaForCausalLM cannot "
                          "express (it would load as a model with other logits)")
    return checkpoint.save(float_model(model), out_dir, tokenizer, meta={"exported_to": "hf"})
