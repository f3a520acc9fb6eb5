"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), dir)` loads, and what
`PeftModel.save_pretrained` writes: tensors named `base_model.model.<module>.lora_A.weight` (A: (r, in))
and `.lora_B.weight` (B: (out, r)), where <module> is the HF name of the adapted layer, which is
tinylm's own (`model.layers.0.self_attn.q_proj`). Trained rows of added tokens (`lora.train_token_rows`)
are PEFT's trainable tokens: `trainable_token_indices` in the config (a list: the embedding's rows, which
a tied output layer shares; {"embed_tokens": ids, "lm_head": ids} when untied) and the rows' values as
`base_model.model.<module>.token_adapter.trainable_tokens_delta` (n, dim). Otherwise only plain LoRA is
read; PEFT options that change the function (DoRA, biases, per-layer ranks or alphas, extra trained
modules) are refused in one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir
from tinylm.model.lora import (
    EMBED,
    HEAD,
    LoraLinear,
    apply_lora,
    lora_layers,
    lora_settings,
    token_rows,
    train_token_rows,
)
from tinylm.model.qlinear import QLinear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
TOKEN_KEY = re.compile(r"^base_model\.model\.(.+)\.token_adapter\.trainable_tokens_delta$")

# adapter_config.json keys whose non-default value changes what the adapter computes: tinylm refuses them.
UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
               "use_qalora": False, "target_parameters": None}


# ----- save ----------------------------------------------------------------------------------------

def adapter_config(model: nn.Module, base_name: str | None = None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for the model's adapters (its LoraConfig as a dict).

    Args:
        model: a model with LoraLinear layers (`model.lora.apply_lora`).
        base_name: the base model's path or hub id (`base_model_name_or_path`), if known.
    """
    s = lora_settings(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"], "use_rslora": s["use_rslora"],
            "target_modules": target_modules(model), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_dora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
            "revision": None, "trainable_token_indices": token_indices(model)}


def token_indices(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """PEFT's trainable_token_indices for the model's trainable token rows: a list for the embedding's
    alone (a tied output layer shares them), else {"embed_tokens": ids, "lm_head": ids}; None without."""
    ids = {name.rpartition(".")[2]: rows.token_indices.tolist() for name, rows in _saved_rows(model).items()}
    if not ids:
        return None
    return ids["embed_tokens"] if list(ids) == ["embed_tokens"] else ids


def _saved_rows(model: nn.Module) -> dict[str, Any]:
    """The TrainableRows whose parameter is saved: a tied output layer's is the embedding's."""
    rows = token_rows(model)
    return {n: r for n, r in rows.items() if not (n == HEAD and EMBED in rows and
                                                  r.trainable_tokens_delta is rows[EMBED].trainable_tokens_delta)}


def target_modules(model: nn.Module) -> list[str]:
    """The adapted layers as PEFT's target_modules: their last names ("q_proj") when those select exactly
    them, else their full names (PEFT matches an entry by equality or by "." + entry suffix)."""
    adapted = set(lora_layers(model))
    leaves = sorted({n.rpartition(".")[2] for n in adapted})
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QLinear, LoraLinear))
              and ".lora_" not in n and not n.endswith(".base_layer")]
    if {n for n in linear if n.rpartition(".")[2] in leaves} == adapted:
        return leaves
    return sorted(adapted)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names, detached on the CPU."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    for name, rows in _saved_rows(model).items():
        out[f"{PREFIX}{name}.token_adapter.trainable_tokens_delta"] = rows.trainable_tokens_delta.detach().contiguous().cpu()
    return out


def write_adapter(model: nn.Module, directory: str | os.PathLike, base_name: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing dir (for a caller that
    writes a checkpoint atomically, say inside `core.fs.atomic_dir`, the adapter beside the base).

    Args:
        model: a model with LoraLinear layers.
        directory: where to write.
        base_name: the base model's path or id, for base_model_name_or_path.
    """
    d = Path(directory)
    save_file(adapter_tensors(model), str(d / WEIGHTS), metadata={"format": "pt"})
    (d / CONFIG).write_text(json.dumps(adapter_config(model, base_name), indent=2) + "\n")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_name: str | None = None) -> Path:
    """An adapter dir PEFT loads (`PeftModel.from_pretrained`), written atomically; returns its path.

    Args:
        model: a model with LoraLinear layers.
        out_dir: the adapter dir (replaced if it exists).
        base_name: the base model's path or id, for base_model_name_or_path.
    """
    lora_settings(model)  # refuse a model without adapters before creating anything
    with atomic_dir(out_dir) as tmp:
        write_adapter(model, tmp, base_name)
    return Path(out_dir)


# ----- load ----------------------------------------------------------------------------------------

def is_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a PEFT adapter (its adapter_config.json)."""
    return (Path(directory) / CONFIG).is_file()


Rows = dict[str, tuple[list[int], torch.Tensor]]  # module -> (token ids, (n, dim) their trained rows)


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                        Rows]:
    """An adapter dir's checked config, its LoRA tensors as {module name: (A (r, in), B (out, r))} and its
    trainable token rows as {module name: (ids, rows)}.

    Args:
        directory: a dir with adapter_config.json and adapter_model.safetensors.
    """
    d = Path(directory)
    if not d.is_dir():
        raise TinylmError(f"no adapter at {directory}: not a directory")
    if not (d / CONFIG).is_file():
        raise TinylmError(f"{directory} is not a PEFT adapter directory (no {CONFIG})")
    config = _check_config(d / CONFIG)
    tensors = _read_tensors(d)
    rows = _token_rows(d, {k: tensors.pop(k) for k in [k for k in tensors if TOKEN_KEY.match(k)]}, config)
    return config, _pairs(d, tensors, config), rows


def _check_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinylmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TinylmError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise TinylmError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise TinylmError(f"{path}: {key} must be a positive number, got {value!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise TinylmError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, False, {}, []):
            raise TinylmError(f"{path}: {key} = {config[key]!r} is not supported by tinylm (plain LoRA only)")
    return config


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    path = d / WEIGHTS
    if not path.is_file():
        pickled = " (only adapter_model.bin, pickled: tinylm never unpickles)" if (d / "adapter_model.bin").exists() else ""
        raise TinylmError(f"{d}: no {WEIGHTS}{pickled}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TinylmError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None


def _token_rows(d: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Rows:
    """{module: (ids, rows)} from trainable_token_indices and the token tensors, each accounted for."""
    spec = config.get("trainable_token_indices") or {}
    ids = {EMBED: spec} if isinstance(spec, list) else spec
    if not isinstance(ids, dict):
        raise TinylmError(f"{d / CONFIG}: trainable_token_indices must be a list of token ids or a dict of them")
    rows: Rows = {}
    for key, idx in ids.items():
        name = next((n for n in (EMBED, HEAD) if n == key or n.endswith("." + key)), None)
        if name is None or not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                  for i in idx):
            raise TinylmError(f"{d / CONFIG}: trainable_token_indices {key!r}: {idx!r} is not a list of token ids "
                              "of embed_tokens or lm_head")
        t = tensors.pop(f"{PREFIX}{name}.token_adapter.trainable_tokens_delta", None)
        if t is None or t.ndim != 2 or len(t) != len(idx):
            raise TinylmError(f"{d / WEIGHTS}: no trained rows of shape ({len(idx)}, dim) for {name}'s tokens")
        rows[name] = (idx, t)
    if tensors:
        raise TinylmError(f"{d / WEIGHTS}: trained token rows {sorted(tensors)[0]!r} that trainable_token_indices "
                          "does not name")
    return rows


def _pairs(d: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from PEFT's tensor names, every tensor accounted for and the ranks consistent."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        if m is None:
            raise TinylmError(f"{d / WEIGHTS}: unexpected tensor {key!r} (plain LoRA has only lora_A / lora_B weights)")
        found.setdefault(m.group(1), {})[m.group(2)] = t
    if not found:
        raise TinylmError(f"{d / WEIGHTS}: no LoRA tensors")
    pairs = {}
    for name, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise TinylmError(f"{d / WEIGHTS}: {name} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] != config["r"]:
            raise TinylmError(f"{d / WEIGHTS}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                              f"are not a rank-{config['r']} pair")
        pairs[name] = (a, b)
    return pairs


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put a PEFT LoRA adapter onto `model` (frozen, adapters trainable), in place; returns `model`.

    Args:
        model: a Llama, float or quantised, without adapters.
        directory: a PEFT adapter dir (tinylm's `save_adapter` or peft's `save_pretrained`).
    """
    config, pairs, rows = read_adapter(directory)
    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            raise TinylmError(f"{directory}: the adapter adapts {name}, which the model does not have as a linear layer")
        if (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
            raise TinylmError(f"{directory}: an adapter for another model: {name} is {layer.in_features} -> "
                              f"{layer.out_features} here, the adapter's {a.shape[1]} -> {b.shape[0]}")
    if any(t.shape[1] != model.config.dim for _, t in rows.values()):
        raise TinylmError(f"{directory}: an adapter for another model: its token rows are not {model.config.dim} wide")
    apply_lora(model, int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
               targets=sorted(pairs), use_rslora=bool(config.get("use_rslora", False)))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)
    train_token_rows(model, {k: ids for k, (ids, _) in rows.items()}, {k: t for k, (_, t) in rows.items()})
    return model
