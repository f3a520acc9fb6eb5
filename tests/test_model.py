"""The model against HF LlamaForCausalLM, and KV-cache decoding against full recomputation."""

import pytest
import torch
from helpers import hf_model, tiny_config, tiny_model

from tinylm.core.errors import TinylmError
from tinylm.model.config import PRESETS, ModelConfig, preset
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 6])
def test_logits_equal_transformers(tie, n_kv_heads):
    model = tiny_model(tie=tie, n_kv_heads=n_kv_heads)
    ref = hf_model(model)
    x = torch.randint(0, model.config.vocab_size, (3, 50))
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_hidden_states_equal_transformers(tiny):
    ref = hf_model(tiny)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        logits, hidden = tiny(x, output_hidden_states=True)
        out = ref(x, output_hidden_states=True)
    assert len(hidden) == tiny.config.n_layers + 1
    for ours, theirs in zip(hidden[:-1], out.hidden_states[:-1]):  # HF's last entry is after the final norm
        assert (ours - theirs).abs().max().item() <= 1e-5
    assert (tiny.model.norm(hidden[-1]) - out.hidden_states[-1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("batch", [1, 4])
def test_kv_cache_equals_full_recompute(tiny, batch):
    x = torch.randint(0, 97, (batch, 40))
    with torch.no_grad():
        full = tiny(x)
        cache = KVCache.new(tiny, batch, 64)
        parts = [tiny(x[:, :7], cache=cache), tiny(x[:, 7:12], cache=cache)]  # prefill, then a chunk
        parts += [tiny(x[:, t:t + 1], cache=cache) for t in range(12, 40)]  # one token at a time
    assert cache.pos == 40
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_kv_greedy_decode_token_for_token(tiny):
    x = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        seq = x.clone()
        for _ in range(20):  # full recompute every step
            seq = torch.cat([seq, tiny(seq)[:, -1:].argmax(-1)], 1)
        cache = KVCache.new(tiny, 3, 64)
        nxt = tiny(x, cache=cache)[:, -1:].argmax(-1)
        cached = [x, nxt]
        for _ in range(19):
            nxt = tiny(nxt, cache=cache)[:, -1:].argmax(-1)
            cached.append(nxt)
    assert torch.equal(torch.cat(cached, 1), seq)


def test_rope_beyond_max_seq_len_matches_transformers():
    model = tiny_model(max_seq_len=16)
    ref = hf_model(model)
    x = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-5


def test_param_count_matches_module():
    for tie in (True, False):
        cfg = tiny_config(tie=tie)
        assert Llama(cfg).num_params() == cfg.param_count()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_param_count_formula(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == cfg.param_count()


def test_llama2c_preset_sizes():
    # llama2.c README table: 260K, 15M, 42M, 110M parameters.
    assert abs(preset("260k").param_count() - 260e3) / 260e3 < 0.1
    assert abs(preset("15m").param_count() - 15e6) / 15e6 < 0.05
    assert abs(preset("42m").param_count() - 42e6) / 42e6 < 0.05
    assert abs(preset("110m").param_count() - 110e6) / 110e6 < 0.05
    assert abs(preset("smollm2-135m").param_count() - 134_515_008) == 0  # HF's num_parameters()


def test_flops_per_token_formula():
    cfg = tiny_config(tie=False)
    n_matmul = sum(p.numel() for n, p in Llama(cfg).named_parameters() if p.dim() == 2 and "embed" not in n)
    attn = 4 * cfg.n_layers * 32 * cfg.n_heads * cfg.head_dim
    assert cfg.flops_per_token(32) == 2 * n_matmul + attn
    assert cfg.flops_per_token(32, training=True) == 3 * (2 * n_matmul + attn)


def test_init_is_documented_scheme():
    cfg = ModelConfig(vocab_size=1000, dim=256, n_layers=8, n_heads=4, init_std=0.02)
    torch.manual_seed(0)
    m = Llama(cfg)
    assert abs(m.model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(m.model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 3e-4  # / sqrt(2 * 8)
    assert torch.all(m.model.norm.weight == 1)


@pytest.mark.parametrize("bad", [dict(dim=50, n_heads=6), dict(n_heads=6, n_kv_heads=4), dict(n_layers=0)])
def test_bad_config_is_one_line_error(bad):
    with pytest.raises(TinylmError) as e:
        ModelConfig(**{**dict(vocab_size=10, dim=48, n_layers=2, n_heads=6), **bad})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cached", [False, True])
def test_last_only_is_the_last_position_of_the_full_logits(cached):
    from tinylm.model.kvcache import KVCache

    model = tiny_model(n_kv_heads=2, logit_softcap=30.0)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(x)
        if cached:  # a prefill after a cached prefix, as generate_ids and the engine run it
            cache = KVCache.new(model, 2, 16)
            model(x[:, :4], cache=cache)
            last = model(x[:, 4:], cache=cache, last_only=True)
            assert cache.pos == 9
        else:
            last = model(x, last_only=True)
    assert last.shape == (2, 1, 97)
    assert (last - full[:, -1:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_logits_for_a_subset_of_the_vocabulary(quantized):
    model = tiny_model(n_kv_heads=2)
    if quantized:
        from tinylm.model.qlinear import swap_in, target_modules

        swap_in(model, {"scheme": "int4", "group_size": 16, "modules": target_modules(model)})
    x, ids = torch.randint(0, 97, (2, 9)), torch.tensor([5, 0, 96, 41, 41])
    with torch.no_grad():
        full = model(x)
        part, hidden = model(x, output_hidden_states=True, logits_for=ids)
    assert part.shape == (2, 9, 5) and len(hidden) == model.config.n_layers + 1
    assert (part - full[..., ids]).abs().max().item() <= 1e-5
