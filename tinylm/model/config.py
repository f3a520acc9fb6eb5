"""Model configuration: one flat dataclass, presets as plain dicts; and the two things every layer\nshares: the user-error type and atomic directory writes.\n\nNo torch here: this module sits at the bottom of the layer stack and everything imports it.\n"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tinylm.core.errors import TinylmError


def _ffn_dim_for(dim: int, multiple_of: int = 32) -> int:
    # llama2.c / Llama rule: SwiGLU hidden = 2/3 * 4 * dim, rounded up to a multiple (llama2.c model.py).
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-style decoder; maps one-to-one onto HF `LlamaConfig`.

    Args:
        vocab_size: number of token embeddings (rows of embed_tokens and lm_head).
        dim: residual stream width (HF hidden_size).
        n_layers: decoder blocks (HF num_hidden_layers).
        n_heads: query heads (HF num_attention_heads).
        n_kv_heads: key/value heads for grouped-query attention; None means n_heads (plain MHA).
        head_dim: width of one head; None means dim // n_heads. Pruned heads keep head_dim.
        ffn_dim: SwiGLU hidden width (HF intermediate_size); None derives the llama2.c value.
        max_seq_len: longest sequence the model is meant for (HF max_position_embeddings).
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: lm_head shares the embedding matrix.
        init_std: std of the normal initialisation of linear and embedding weights.
        bos_token_id, eos_token_id, pad_token_id: written to config.json for HF tools.
        qk_norm: RMSNorm (over head_dim, one gain per channel shared by the heads) on queries and keys
            before RoPE, as OLMo 2 and Qwen3 do; such a model is exactly HF's Qwen3 (to_hf writes it so).
        logit_softcap: C > 0: logits = C * tanh(logits / C) (Gemma 2); None: off. HF Llama has no such
            head: config.json keeps it under Gemma 2's key, and `tinylm export` refuses the model.
    """

    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    qk_norm: bool = False
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise TinylmError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = _ffn_dim_for(self.dim)
        self.validate()

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "head_dim", "ffn_dim"):
                continue  # derived in __post_init__
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TinylmError(f"model config: {name} must be a positive integer, got {value!r}")

    def validate(self) -> None:
        """Raise a one-line TinylmError for an impossible shape or a non-finite number."""
        if None in (self.n_kv_heads, self.head_dim, self.ffn_dim):
            raise TinylmError("model config: n_kv_heads, head_dim and ffn_dim must be set")
        self._check_sizes()
        if self.n_heads % self.n_kv_heads:
            raise TinylmError(
                f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.dim % self.n_heads:  # transformers' LlamaConfig refuses it even with an explicit head_dim
            raise TinylmError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads} "
                              "(transformers cannot load such a Llama)")
        if self.head_dim % 2:
            raise TinylmError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value < math.inf:
                raise TinylmError(f"model config: {name} must be a positive finite number, got {value!r}")
        if not _is_real(self.init_std) or not 0 <= self.init_std < math.inf:
            raise TinylmError(f"model config: init_std must be a finite number >= 0, got {self.init_std!r}")
        for name in ("tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TinylmError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        cap = self.logit_softcap
        if cap is not None and (not _is_real(cap) or not 0 < cap < math.inf):
            raise TinylmError(f"model config: logit_softcap must be a positive finite number or null, got {cap!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise TinylmError(f"model config: {name} must be a token id (an integer >= 0) or null, got {value!r}")

    # ----- derived figures -------------------------------------------------------------------

    def param_count(self, include_embeddings: bool = True) -> int:
        """Number of parameters. Tied embeddings count once.

        Args:
            include_embeddings: count the token embedding (and an untied lm_head).
        """
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o + k, v
        attn += 2 * hd if self.qk_norm else 0  # q_norm, k_norm gains
        mlp = 3 * d * self.ffn_dim  # gate, up, down
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        total = self.n_layers * per_layer + d  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def weight_bytes(self, bytes_per_param: int = 4) -> int:
        """Memory the model's tensors take: its parameters plus the RoPE cos/sin tables (fp32).

        The one estimate that every place building a model checks against the free memory
        (`surgery.check_memory`) before allocating.

        Args:
            bytes_per_param: bytes of one parameter (4 for fp32, 2 for bf16).
        """
        return self.param_count() * bytes_per_param + 2 * self.max_seq_len * self.head_dim * 4

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> int:
        """Matmul FLOPs to process one token, PaLM convention (Chowdhery et al. 2022, app. B).

        Forward = 2 * (matmul weights, lm_head included, embedding lookup excluded)
                  + 4 * n_layers * seq_len * n_heads * head_dim (scores QK^T and weighted sum AV,
                  counted over the full context, not halved for causality).
        Training (forward + backward) is three times the forward.

        Args:
            seq_len: context length used for the attention term; default max_seq_len.
            training: return forward + backward FLOPs.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        norms = self.n_layers * (2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)) + self.dim
        matmul = self.param_count(include_embeddings=False) - norms
        matmul += self.vocab_size * self.dim  # lm_head is a matmul even when tied
        forward = 2 * matmul + 4 * self.n_layers * t * self.n_heads * self.head_dim
        return 3 * forward if training else forward

    # ----- conversion --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict; an unknown key is a one-line error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TinylmError(f"model config: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def to_hf(self) -> dict[str, Any]:
        """The HF `LlamaConfig` keys for config.json; with qk_norm, HF `Qwen3Config`'s, which describe
        exactly this model (Qwen3 is Llama with q_norm / k_norm over head_dim, before RoPE); with
        logit_softcap, Gemma 2's `final_logit_softcapping` key beside them (which HF Llama ignores)."""
        hf = self._llama_hf()
        if self.qk_norm:
            hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                      sliding_window=None, max_window_layers=self.n_layers)
            hf.pop("mlp_bias"), hf.pop("pretraining_tp")
        if self.logit_softcap is not None:
            hf["final_logit_softcapping"] = self.logit_softcap
        return hf

    def _llama_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read an HF Llama config.json dict; anything tinylm cannot express, a missing key or a value of
        the wrong type or range is a one-line error naming the HF key."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen3"):
            raise TinylmError(f"unsupported model_type {model_type!r}: tinylm loads Llama (and Qwen3) models")
        if model_type == "qwen3" and hf.get("use_sliding_window"):
            raise TinylmError("unsupported Qwen3 variant: use_sliding_window")
        if hf.get("hidden_act", "silu") != "silu":
            raise TinylmError(f"unsupported hidden_act {hf['hidden_act']!r}: tinylm uses SwiGLU (silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise TinylmError("unsupported Llama variant: biases in attention or MLP")
        rope_scaling = _hf_object(hf, "rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise TinylmError(f"unsupported rope_scaling {rope_scaling!r}")
        theta = hf.get("rope_theta")
        if theta is None:  # transformers >= 5 may nest it under rope_parameters
            theta = _hf_object(hf, "rope_parameters").get("rope_theta", 10000.0)
        n_heads = _hf_int(hf, "num_attention_heads")
        return cls(
            vocab_size=_hf_int(hf, "vocab_size"), dim=_hf_int(hf, "hidden_size"),
            n_layers=_hf_int(hf, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=_hf_int(hf, "num_key_value_heads", n_heads), head_dim=_hf_int(hf, "head_dim", None),
            ffn_dim=_hf_int(hf, "intermediate_size"), max_seq_len=_hf_int(hf, "max_position_embeddings", 2048),
            rope_theta=_hf_float("rope_theta", theta), norm_eps=_hf_float("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=_hf_bool(hf, "tie_word_embeddings"),
            init_std=_hf_float("initializer_range", hf.get("initializer_range", 0.02), low=0.0),
            bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")), qk_norm=model_type == "qwen3",
            logit_softcap=None if hf.get("final_logit_softcapping") is None else
            _hf_float("final_logit_softcapping", hf["final_logit_softcapping"]),
        )


_MISSING = object()


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _hf_int(hf: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """hf[key] as a positive integer (a JSON null means the default); a one-line error naming the key."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise TinylmError(f"config.json lacks the key {key!r}")
        return default
    if isinstance(value, float) and value.is_integer():  # 64.0 from a hand-written file
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TinylmError(f"{key} must be a positive integer, got {value!r}")
    return value


def _hf_float(key: str, value: Any, low: float | None = None) -> float:
    """`value` (of HF key `key`) as a finite number, > 0 (or >= low); a one-line error naming the key."""
    ok = _is_real(value) and math.isfinite(value) and (value > 0 if low is None else value >= low)
    if not ok:
        want = "a positive finite number" if low is None else f"a finite number >= {low:g}"
        raise TinylmError(f"{key} must be {want}, got {value!r}")
    return float(value)


def _hf_bool(hf: dict[str, Any], key: str) -> bool:
    value = hf.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TinylmError(f"{key} must be true or false, got {value!r}")
    return value


def _hf_object(hf: dict[str, Any], key: str) -> dict[str, Any]:
    value = hf.get(key) or {}
    if not isinstance(value, dict):
        raise TinylmError(f"{key} must be a JSON object or null, got {value!r}")
    return value


def _first(x: Any) -> int | None:
    # HF allows a list of eos ids; tinylm keeps the first. Older configs write -1 for "none".
    x = x[0] if isinstance(x, list) and x else x
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


# Presets. 260k/15m/42m/110m are the llama2.c TinyStories shapes (karpathy/llama2.c README, "models"
# table); 1m and 5m fill the gap between them; smollm2-135m is HuggingFaceTB/SmolLM2-135M's config.json.
# vocab_size is the natural one for each; pretraining replaces it with the tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    "260k": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512),
    "1m": dict(dim=128, n_layers=4, n_heads=4, vocab_size=2048, max_seq_len=256),
    "5m": dict(dim=256, n_layers=5, n_heads=8, vocab_size=4096, max_seq_len=256),
    "15m": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256),
    "42m": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024),
    "110m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                         init_std=0.041666666666666664, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name, with field overrides.

    Args:
        name: a key of PRESETS.
        overrides: ModelConfig fields that replace the preset's.
    """
    if name not in PRESETS:
        raise TinylmError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
