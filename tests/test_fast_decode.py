"""The fixed-shape decode path (generate.StaticDecoder) against the eager KV-cache path and full recompute."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from tinylm.infer.decode import StaticDecoder, _one_query_attention, decode_weights
from tinylm.infer.generate import generate_ids
from tinylm.stages.quantize import quantize_model


@pytest.mark.parametrize("rows", [2, 1])  # one row: the decode_weights layouts and the written-out attention
@pytest.mark.parametrize("scheme", [None, "int4", "int8"])
def test_static_steps_equal_full_recompute(scheme, rows):
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    if scheme:
        quantize_model(model, scheme, 32 if scheme == "int4" else 0)  # the static step calls the swapped modules
    x = torch.randint(0, 97, (rows, 40))
    with torch.no_grad():
        ref = model(x)  # (rows, 40, V)
    dec = StaticDecoder(model, rows, 40, compile=False)
    chunks = [dec(x[:, :13]), dec(x[:, 13:14]), dec(x[:, 14:30]), *[dec(x[:, t:t + 1]) for t in range(30, 40)]]
    assert dec.max_len == 64  # rounded up so that nearby lengths share a compiled graph
    # int8 runs on bf16 activations, where a last-bit difference upstream moves a value by 2^-8
    tol = 1e-5 if scheme != "int8" else 2e-2 * ref.abs().max().item()
    assert (torch.cat(chunks, 1) - ref).abs().max().item() <= tol


def test_one_row_weights_are_fused_and_follow_weight_updates():
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    w = decode_weights(model)
    attn = model.model.layers[1].self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t()
    assert torch.equal(w["model.layers.1.qkv"], qkv) and w["model.layers.1.qkv"].is_contiguous()
    assert decode_weights(model) is w  # cached while the weights stand still
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # an in-place update (an optimizer step) invalidates the cache
    assert torch.equal(decode_weights(model)["model.layers.1.qkv"][:, 64:96], attn.k_proj.weight.t())
    quantize_model(model, "int8", 0)
    codes, scales = decode_weights(model)["model.layers.0.gate_up"]
    mlp = model.model.layers[0].mlp
    assert torch.equal(codes, torch.cat([mlp.gate_proj.qweight, mlp.up_proj.qweight]))
    assert scales.dtype == torch.bfloat16


def test_one_query_attention_equals_sdpa_with_gqa():
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    visible = torch.arange(16)[None, :] <= 9
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    assert (_one_query_attention(q, k, v, visible) - ref).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_compiled_decoding_equals_eager_token_for_token():
    # One torch.compile (tens of seconds on a 2-core CPU), shared by a greedy and a sampled run.
    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert generate_ids(model, prompts, 40, temperature=0.0, fast=True) == generate_ids(model, prompts, 40, temperature=0.0)
    sampled = dict(temperature=1.0, top_k=20, seed=11, stop_ids=[2])
    assert generate_ids(model, prompts, 30, fast=True, **sampled) == generate_ids(model, prompts, 30, **sampled)


@pytest.mark.slow
def test_compiled_one_row_int8_decoding_equals_eager():
    # The one-row graph: fused int8 projections through the C++ wrapper, written-out attention.
    model = quantize_model(tiny_model(n_kv_heads=2), "int8", 0)
    assert generate_ids(model, [5, 6, 7, 8], 40, temperature=0.0, fast=True) == \
        generate_ids(model, [5, 6, 7, 8], 40, temperature=0.0)
