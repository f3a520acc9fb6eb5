"""GGUF (llama.cpp) files: a reader of config, weights and tokenizer, and a writer."""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file
from tinylm.data.tokenizer import Tokenizer
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
from tinylm.model.qlinear import float_model
from tinylm.model.surgery import export_state_dict


def numpy_to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor from a numpy array (copied, so the GGUF memmap can close)."""
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


# ----- GGUF ----------------------------------------------------------------------------------------
# GGUF tensor names -> HF names: llama.cpp's convert_hf_to_gguf.py / gguf-py tensor_mapping.py (MODEL_ARCH.LLAMA).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


GGUF_BLOCK_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


_DIGIT_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, as `gguf.GGUFReader` presents it.

    Args:
        name: the llama.cpp tensor name.
        tensor_type: a `gguf.GGMLQuantizationType`.
        shape: GGUF (ggml "ne") order, fastest-varying dimension first.
        data: numpy view of the file: typed for F16/F32/F64/I8-I64, else uint8 rows of quant blocks.
    """

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class GGUFFile:
    """A GGUF file's metadata (plain Python values, as `ReaderField.contents()` gives) and tensors."""

    fields: dict[str, Any]
    tensors: list[GGUFTensor]


# GGUF metadata value types (gguf-py constants.GGUFValueType) -> struct codes; 8 is STRING, 9 is ARRAY.
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # what export_gguf writes

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_LLAMA3_LIKE = {"llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"}

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


_GGUF_TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}  # other types are quant blocks, read as bytes


def _open_gguf(path: Path) -> GGUFFile:
    try:
        return _read_gguf(path)
    except _BigEndian:  # rare (s390x builds); gguf-py's reader swaps bytes, our fast parser does not
        return _gguf_via_reader(path)
    except Exception as e:  # damaged files: struct.error, ValueError, IndexError, UnicodeDecodeError
        raise TinylmError(f"{path}: unreadable GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class _BigEndian(Exception):
    pass


class _Cursor:
    """Reads little-endian GGUF values from a buffer, advancing `pos`."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype != _GGUF_ARRAY:
            return self.scalar(_GGUF_SCALARS[vtype])
        itype, count = self.scalar("I"), self.scalar("Q")
        if itype in _GGUF_SCALARS:  # numeric arrays in one numpy read
            items = np.frombuffer(self.buf, np.dtype("<" + _GGUF_SCALARS[itype]), count, self.pos)
            self.pos += items.nbytes
            return items.tolist()
        return [self.value(itype) for _ in range(count)]


def _read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF v2/v3 file (the layout of gguf-py's GGUFReader / llama.cpp's gguf.cpp).

    Written by hand because gguf.GGUFReader builds a numpy view per value: on SmolLM2's 49k-token
    vocabulary and 49k merges that takes seconds, this takes tens of milliseconds. Tensor data stays
    memory-mapped.
    """
    import gguf  # noqa: PLC0415 - only GGUF sources need it

    with path.open("rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf)
    if cur.scalar("I") != gguf.GGUF_MAGIC:
        raise ValueError("not a GGUF file")
    version = cur.scalar("I")
    if version & 0xFFFF == 0:
        raise _BigEndian()
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        if key in fields:
            raise KeyError(f"duplicate key {key}")
        fields[key] = cur.value(cur.scalar("I"))
    infos = [(cur.string(), [cur.scalar("Q") for _ in range(cur.scalar("I"))], cur.scalar("I"), cur.scalar("Q"))
             for _ in range(n_tensors)]
    alignment = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment  # tensor data begins at the next aligned offset
    return GGUFFile(fields, [_gguf_tensor(buf, start, *info) for info in infos])


def _gguf_tensor(buf: Any, start: int, name: str, dims: list[int], raw_type: int, offset: int) -> GGUFTensor:
    # The same arrays gguf.GGUFReader._build_tensors makes: numpy order is GGUF's reversed.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape  # noqa: PLC0415

    qtype = GGMLQuantizationType(raw_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block_size
    if start + offset + n_bytes > len(buf):
        raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
    np_dims = tuple(reversed(dims))
    if qtype.name in _GGUF_TYPED:
        data = np.frombuffer(buf, _GGUF_TYPED[qtype.name], n_bytes // type_size, start + offset)
    else:
        data = np.frombuffer(buf, np.uint8, n_bytes, start + offset)
        np_dims = quant_shape_to_byte_shape(np_dims, qtype)
    return GGUFTensor(name, qtype, tuple(dims), data.reshape(np_dims))


def _gguf_via_reader(path: Path) -> GGUFFile:
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))
    return GGUFFile({k: f.contents() for k, f in reader.fields.items()},
                    [GGUFTensor(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.data) for t in reader.tensors])


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    value = reader.fields.get(key)
    if hasattr(value, "contents"):  # a gguf.GGUFReader's ReaderField
        value = value.contents()
    return default if value is None else value


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """The ModelConfig a llama-architecture GGUF describes."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise TinylmError(f"{path}: GGUF architecture {arch!r} is not supported (tinylm loads 'llama')")
    a = "llama."
    n_heads = int(_field(reader, a + "attention.head_count"))
    dim = int(_field(reader, a + "embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, a + "vocab_size") or (len(tokens) if tokens is not None else None)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    key_length = _field(reader, a + "attention.key_length")
    return ModelConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(_field(reader, a + "block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_heads)),
        head_dim=int(key_length) if key_length else None,
        ffn_dim=int(_field(reader, a + "feed_forward_length")),
        max_seq_len=int(_field(reader, a + "context_length", 2048)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its RoPE (convert_hf_to_gguf.py `permute`):
    # HF (n_head, 2, hd/2, dim) became (n_head, hd/2, 2, dim); swap back.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader: Any, cfg: ModelConfig, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str]:
    """HF-named tensors dequantized from a llama GGUF, and the most common quant type's name."""
    from gguf import quants  # noqa: PLC0415

    state, types = {}, []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs.weight, which plain RoPE does not use
        try:
            w = quants.dequantize(t.data, t.tensor_type)  # numpy, shape reversed from GGUF's ne order
        except NotImplementedError:
            raise TinylmError(f"GGUF tensor {t.name} has quant type {t.tensor_type.name}, which the gguf "
                              "package cannot dequantize") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.n_kv_heads)
        state[name] = numpy_to_torch(w, dtype)
        types.append(t.tensor_type.name)
    common = max(set(types), key=types.count) if types else "none"
    return state, common


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_BLOCK_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_TO_HF[parts[2]]}.{parts[3]}"
    return None


def hf_to_gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of an HF Llama parameter name (the inverse of the map above)."""
    for gguf_name, name in GGUF_TO_HF.items():
        if name == hf_name:
            return gguf_name
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, module = rest.partition(".")
    module, _, suffix = module.rpartition(".")
    kinds = {v: k for k, v in GGUF_BLOCK_TO_HF.items()}
    if prefix or module not in kinds:
        raise KeyError(hf_name)
    return f"blk.{layer}.{kinds[module]}.{suffix}"


def _gguf_tokenizer(reader: Any, path: Path) -> Tokenizer | None:
    """Rebuild a GGUF's byte-level BPE ("gpt2" model) as an HF `tokenizers` tokenizer, or None."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        return None
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers  # noqa: PLC0415
    from tokenizers import Tokenizer as Backend  # noqa: PLC0415

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"), pre_tokenizers, Regex)
    backend.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type", [])
    # CONTROL (3) tokens are matched whole, as llama.cpp and transformers do; USER_DEFINED (4) too.
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    backend.add_special_tokens(specials)
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                     pad_token=token("padding_token_id"), unk_token=None,
                     chat_template=_field(reader, "tokenizer.chat_template"),
                     model_max_length=int(_field(reader, "llama.context_length", 2048)))


def _gguf_pre_tokenizer(pre: str, pre_tokenizers: Any, Regex: Any) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pattern = _LLAMA3_SPLIT if pre in _LLAMA3_LIKE else _GPT2_SPLIT
    steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
    if pre in _DIGIT_FIRST:  # "\p{N}" first: every digit its own pre-token (SmolLM2's tokenizer.json)
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


# ----- GGUF ----------------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF q/k rows (n_head, 2, hd/2, dim) ->
    # (n_head, hd/2, 2, dim), the interleaved pair layout of GGML's RoPE. _unpermute inverts it.
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
    for name, t in export_state_dict(model).items():
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
        out.append((hf_to_gguf_name(name), a, qtype))
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
    if patterns == [_LLAMA3_SPLIT] and not digits:
        return "llama-bpe"
    if (patterns == [_GPT2_SPLIT] and not byte_regex) or (not patterns and byte_regex):
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


def check_llama_arch(cfg: ModelConfig) -> None:
    """A one-line error for a model that GGUF's llama architecture cannot express, instead of a file that
    llama.cpp would run as another model: llama.cpp's llama graph has no q/k norms, and it soft-caps
    final logits only for the gemma2-family architectures."""
    if cfg.qk_norm:
        raise TinylmError("GGUF export: the model has model.qk_norm, which GGUF's llama architecture cannot "
                          "express (export it with --format hf: it is an HF Qwen3 model)")
    if cfg.logit_softcap is not None:
        raise TinylmError("GGUF export: the model has model.logit_softcap, which GGUF's llama architecture "
                          "cannot express (llama.cpp soft-caps logits only for gemma2)")


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
    check_llama_arch(model.config)
    model = float_model(model)
    tensors = _gguf_tensors(model, gguf_type)  # quantise before opening the file: errors leave nothing
    with atomic_file(out_path) as tmp:
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
    return Path(out_path)
