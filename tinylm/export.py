"""Export a model to other formats: HF (transformers) dirs, GGUF (llama.cpp) files, ONNX graphs.

This is the only module that maps tinylm's (HF) names onto other formats' names. The GGUF writer is
the real version of what llama.cpp's convert_hf_to_gguf.py does for a Llama: tensor names from
checkpoint.GGUF_TO_HF / GGUF_BLOCK_TO_HF, q/k rows permuted for llama.cpp's RoPE, and the tokenizer as
"gpt2" (byte-level BPE) metadata with the pre-tokenizer name that reproduces tinylm's pre-tokenization.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import checkpoint
from tinylm.config import TinylmError
from tinylm.generate import static_forward
from tinylm.model import Llama
from tinylm.qlinear import QLinear, swap_out
from tinylm.tokenizer import Tokenizer

FORMATS = ("hf", "gguf", "onnx")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class ExportConfig:
    """What `tinylm export` does.

    Args:
        source: any model source (checkpoint dir, HF dir, .gguf, alias); quantised checkpoints are
            dequantised first.
        format: "hf", "gguf" or "onnx".
        out: the directory (hf) or file (gguf, onnx) to write.
        gguf_type: weight type of a GGUF: f32, f16, q8_0 or q4_0 (norms stay f32, as llama.cpp does).
        overwrite: replace an existing `out`.
    """

    source: str
    format: str
    out: str
    gguf_type: str = "f16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise TinylmError(f"unknown export format {self.format!r} (known: {', '.join(FORMATS)})")
        if self.gguf_type not in GGUF_TYPES:
            raise TinylmError(f"unknown GGUF type {self.gguf_type!r} (known: {', '.join(GGUF_TYPES)})")
        if Path(self.out).exists() and not self.overwrite:
            raise TinylmError(f"{self.out} already exists (pass --overwrite to replace it)")


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


def float_model(model: Llama) -> Llama:
    """`model` itself if it is float, else a copy with every QLinear dequantised to nn.Linear."""
    if not any(isinstance(m, QLinear) for m in model.modules()):
        return model
    out = swap_out(copy.deepcopy(model))
    if out.config.tie_embeddings and out.lm_head.weight is not out.model.embed_tokens.weight:
        out.config = dataclasses.replace(out.config, tie_embeddings=False)  # the head had codes of its own
    return out


# ----- HF ------------------------------------------------------------------------------------------

def export_hf(model: Llama, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """A dir that `transformers.AutoModelForCausalLM.from_pretrained` loads: the tinylm checkpoint
    format is already HF's (STYLE.md rule 3), so this is `checkpoint.save` of a float model."""
    return checkpoint.save(float_model(model), out_dir, tokenizer, meta={"exported_to": "hf"})


# ----- GGUF ----------------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF q/k rows (n_head, 2, hd/2, dim) ->
    # (n_head, hd/2, 2, dim), the interleaved pair layout of GGML's RoPE. checkpoint._unpermute inverts it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_type(name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """The GGML type of one tensor: 1-D (norms) stay F32; rows not a multiple of the 32-wide quant
    block fall back to F16 (as convert_hf_to_gguf.py does); with q4_0 the embedding and output matrix
    are Q8_0, since llama.cpp keeps them at higher precision too (llama-quantize uses Q6_K, which
    gguf-py cannot write)."""
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "f16" or shape[-1] % 32:
        return Q.F16
    if gguf_type == "q4_0" and name in ("model.embed_tokens.weight", "lm_head.weight"):
        return Q.Q8_0
    return Q.Q8_0 if gguf_type == "q8_0" else Q.Q4_0


def _gguf_tensors(model: Llama, gguf_type: str) -> list[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, array, GGML type) for every stored tensor, q/k permuted, quantised by gguf-py."""
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415
    from gguf import quants  # noqa: PLC0415

    cfg, out = model.config, []
    for name, t in checkpoint._export_state_dict(model).items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.n_kv_heads)
        qtype = _gguf_tensor_type(name, a.shape, gguf_type)
        if qtype == Q.F16:
            a = a.astype(np.float16)
        elif qtype != Q.F32:
            a = quants.quantize(a, qtype)  # (rows, bytes per row) uint8
        out.append((checkpoint.hf_to_gguf_name(name), a, qtype))
    return out


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name whose split regex equals this tokenizer's pre-tokenization.

    tinylm's own tokenizers use ByteLevel(use_regex=True), GPT-2's regex: "gpt-2" (llama-vocab.cpp's
    name; "gpt2" is the tokenizer *model* name and is refused as a pre-tokenizer). SmolLM2's adds
    Digits(individual_digits) first: "smollm". One rebuilt from a GGUF names its regex in a Split.
    """
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if "ByteLevel" not in kinds:
        raise TinylmError("GGUF export needs a byte-level BPE tokenizer (its pre-tokenizer has no ByteLevel)")
    if patterns == [checkpoint._LLAMA3_SPLIT] and not digits:
        return "llama-bpe"
    if (patterns == [checkpoint._GPT2_SPLIT] and not byte_regex) or (not patterns and byte_regex):
        return "smollm" if digits else "gpt-2"
    raise TinylmError(f"GGUF export: llama.cpp has no pre-tokenizer matching this tokenizer's {kinds}")


def _gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (padded to the model's vocab with unused [PAD{i}], as convert_hf_to_gguf.py does), their
    GGUF token types and the BPE merges."""
    from gguf import TokenType  # noqa: PLC0415

    spec = json.loads(tokenizer.backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise TinylmError("GGUF export needs a BPE tokenizer")
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise TinylmError(f"the tokenizer has {max(by_id) + 1} tokens but the model only {vocab_size} embeddings")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _add_gguf_tokenizer(w: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    tokens, types, merges = _gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for token, add in ((tokenizer.bos_id, w.add_bos_token_id), (tokenizer.eos_id, w.add_eos_token_id),
                       (tokenizer.pad_id, w.add_pad_token_id)):
        if token is not None:
            add(token)
    w.add_add_bos_token(False)  # tinylm's encode() adds no bos unless asked; llama.cpp must not either
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _add_gguf_hparams(w: Any, model: Llama, name: str, gguf_type: str) -> None:
    import gguf  # noqa: PLC0415

    cfg = model.config
    w.add_name(name)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    w.add_file_type(int(gguf.LlamaFileType[file_types[gguf_type]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model: Llama, out_path: str | os.PathLike, tokenizer: Tokenizer | None = None,
                gguf_type: str = "f16", name: str = "tinylm") -> Path:
    """Write a llama-architecture GGUF that llama.cpp runs and `checkpoint.load` reads back.

    Args:
        model: a float Llama (a quantised one is dequantised first).
        out_path: the .gguf file; written to a temporary sibling, then renamed.
        tokenizer: written as "gpt2" BPE metadata; without one, llama.cpp cannot tokenise.
        gguf_type: f32, f16, q8_0 or q4_0.
        name: general.name.
    """
    import gguf  # noqa: PLC0415

    if gguf_type not in GGUF_TYPES:
        raise TinylmError(f"unknown GGUF type {gguf_type!r} (known: {', '.join(GGUF_TYPES)})")
    model = float_model(model)
    tensors = _gguf_tensors(model, gguf_type)  # quantise before opening the file: errors leave nothing
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _add_gguf_hparams(w, model, name, gguf_type)
        if tokenizer is not None:
            _add_gguf_tokenizer(w, tokenizer, model.config.vocab_size)
        for gname, array, qtype in tensors:
            w.add_tensor(gname, array, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                        gguf.GGMLQuantizationType.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----- ONNX ----------------------------------------------------------------------------------------

class _OnnxStep(torch.nn.Module):
    """generate.static_forward as a module: (input_ids, start, past_keys, past_values) ->
    (logits, present_keys, present_values), the cache a fixed (L, B, Hkv, max_seq_len, hd) tensor."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return static_forward(self.model, input_ids, start, past_keys, past_values, inplace=False)


def export_onnx(model: Llama, out_path: str | os.PathLike) -> Path:
    """Write an ONNX graph of one decoding step with a KV cache (torch.onnx.export, dynamo exporter).

    Inputs: input_ids (B, T) int64, start () int64 (tokens already in the cache), past_keys and
    past_values (n_layers, B, n_kv_heads, max_seq_len, head_dim) float32. Outputs: logits (B, T, V),
    present_keys, present_values (the caches with positions start..start+T-1 written). Batch and T are
    dynamic; prefill is a call with start 0 and zero caches, decoding feeds the presents back.

    Args:
        model: a float Llama (a quantised one is dequantised first).
        out_path: the .onnx file.
    """
    model = float_model(model).float().eval()
    cfg = model.config
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = torch.zeros(cfg.n_layers, 2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    args = (torch.zeros(2, 3, dtype=torch.long), torch.tensor(0), cache, cache.clone())
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    shapes = {"input_ids": {0: batch, 1: seq}, "start": None, "past_keys": {1: batch}, "past_values": {1: batch}}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with torch.no_grad():
            program = torch.onnx.export(_OnnxStep(model).eval(), args, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                        input_names=["input_ids", "start", "past_keys", "past_values"],
                                        output_names=["logits", "present_keys", "present_values"])
        program.save(str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
