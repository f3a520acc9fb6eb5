"""The fixed-shape decode path (infer.decode.StaticDecoder) and the module swap it decodes one row through
(model.fused.prepare_for_decode), against the untransformed model's eager forward and full recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model

import tinylm
from tinylm.infer.decode import StaticDecoder, decode_model
from tinylm.infer.generate import generate_ids
from tinylm.model.fused import FusedAway, FusedLinear, prepare_for_decode
from tinylm.model.kvcache import StaticCache
from tinylm.model.llama import one_query_attention
from tinylm.model.qlinear import QLinear
from tinylm.stages.quantize import quantize_model


@pytest.mark.parametrize("rows", [2, 1])  # one row: the prepare_for_decode layouts and the written-out attention
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


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_prepared_modules_give_the_untransformed_logits(scheme):
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    if scheme:
        quantize_model(model, scheme, 32 if scheme == "int4" else 0)
    fast = prepare_for_decode(model)
    kinds = {type(m) for m in fast.modules()}
    # float and per-channel int8 layers are swapped; int4 (no fast kernel) keeps its QLinear modules
    assert (FusedLinear in kinds and FusedAway in kinds and QLinear not in kinds) if scheme != "int4" else \
        (FusedLinear not in kinds and QLinear in kinds)
    assert type(model.model.layers[0].self_attn.k_proj) is (QLinear if scheme else torch.nn.Linear)  # unchanged
    x = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        ref = model(x)  # (1, 24, V)
        whole = fast(x)  # the whole sequence through the swapped modules
        k = [torch.zeros(1, 2, 32, 16) for _ in range(2)]
        v = [torch.zeros(1, 2, 32, 16) for _ in range(2)]
        steps = [fast(x[:, :8], cache=StaticCache(k, v, torch.tensor(0)))]
        steps += [fast(x[:, t:t + 1], cache=StaticCache(k, v, torch.tensor(t))) for t in range(8, 24)]
    # int8 runs on bf16 activations, where a last-bit difference upstream moves a value by 2^-8
    tol = 1e-5 if scheme != "int8" else 2e-2 * ref.abs().max().item()
    assert (whole - ref).abs().max().item() <= tol
    assert (torch.cat(steps, 1) - ref).abs().max().item() <= tol


def test_one_row_layers_are_fused_and_follow_weight_updates():
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    fast = decode_model(model)
    attn = model.model.layers[1].self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t()
    fused = fast.model.layers[1].self_attn.q_proj.weight_t
    assert torch.equal(fused, qkv) and fused.is_contiguous()
    assert fast.model.embed_tokens.weight is model.model.embed_tokens.weight  # the copy shares the rest
    assert decode_model(model) is fast  # cached while the weights stand still
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # an in-place update (an optimizer step) invalidates the cache
    assert torch.equal(decode_model(model).model.layers[1].self_attn.q_proj.weight_t[:, 64:96],
                       attn.k_proj.weight.t())
    quantize_model(model, "int8", 0)
    gate_up = decode_model(model).model.layers[0].mlp.gate_proj
    mlp = model.model.layers[0].mlp
    assert torch.equal(gate_up.qweight, torch.cat([mlp.gate_proj.qweight, mlp.up_proj.qweight]))
    assert gate_up.scales.dtype == torch.bfloat16


def test_one_query_attention_equals_sdpa_with_gqa():
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    visible = torch.arange(16)[None, :] <= 9
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    assert (one_query_attention(q, k, v, visible) - ref).abs().max().item() <= 1e-6


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


def test_attention_math_lives_only_in_the_model_package():
    # STYLE.md rule 13: a faster or exported path swaps the model's modules; it never re-implements them
    root = Path(tinylm.__file__).parent
    words = ("scaled_dot_product_attention", "apply_rope", "rope_cos", "rope_sin", "_rope(", "one_query_attention")
    found = [f"{path.relative_to(root)}: {w}" for path in sorted(root.rglob("*.py"))
             if path.parent.name != "model" for w in words if w in path.read_text()]
    assert not found, found
