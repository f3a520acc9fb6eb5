"""The fixed-shape decode path (generate.StaticDecoder) against the eager KV-cache path and full recompute."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from tinylm.generate import StaticDecoder, generate_ids
from tinylm.quantize import quantize_model


@pytest.mark.parametrize("quantized", [False, True])
def test_static_steps_equal_full_recompute(quantized):
    model = tiny_model(dim=64, n_heads=4, ffn_dim=128)
    if quantized:
        quantize_model(model, "int4", 32)  # the static step calls the (swapped) submodules
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = model(x)  # (2, 40, V)
    dec = StaticDecoder(model, 2, 40, compile=False)
    chunks = [dec(x[:, :13]), dec(x[:, 13:14]), dec(x[:, 14:30]), *[dec(x[:, t:t + 1]) for t in range(30, 40)]]
    assert dec.max_len == 64  # rounded up so that nearby lengths share a compiled graph
    assert (torch.cat(chunks, 1) - ref).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_compiled_decoding_equals_eager_token_for_token():
    # One torch.compile (tens of seconds on a 2-core CPU), shared by a greedy and a sampled run.
    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert generate_ids(model, prompts, 40, temperature=0.0, fast=True) == generate_ids(model, prompts, 40, temperature=0.0)
    sampled = dict(temperature=1.0, top_k=20, seed=11, stop_ids=[2])
    assert generate_ids(model, prompts, 30, fast=True, **sampled) == generate_ids(model, prompts, 30, **sampled)
