"""Weight-only quantisation: codes and packing against formulas, checkpoints that reload exactly,
perplexity cost on a (briefly) trained model, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.core.fs import disk_size
from tinylm.data import tinytales
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer.generate import generate_ids
from tinylm.model.qlinear import QLinear, pack, quantization_of, unpack
from tinylm.model.surgery import export_state_dict
from tinylm.stages.info import describe
from tinylm.stages.quantize import QuantizeConfig, perplexity, quantize_model, weight_bytes


def test_int4_pack_unpack_is_lossless_for_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)  # (3, 64): every pair of nibbles appears
    codes = codes[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    packed = pack(codes, "int4")
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert torch.equal(unpack(packed, "int4"), codes)


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int8", 16), ("int4", 32), ("int4", 8)])
def test_codes_reconstruct_within_half_a_step(scheme, group):
    w = torch.randn(24, 64) * torch.logspace(-2, 1, 24)[:, None]  # rows of very different magnitude
    w[3, :32] = 0  # an all-zero group must not divide by zero
    linear = torch.nn.Linear(64, 24, bias=False).requires_grad_(False)
    linear.weight.copy_(w)
    q = QLinear.from_linear(linear, scheme, group)
    deq = q.dequantized()
    G = q.group_size
    scale = q.scales.float().repeat_interleave(G, dim=1)  # (out, in)
    qmax = 127 if scheme == "int8" else 7
    # symmetric absmax: scale = max|w| / qmax per group; rounding error at most scale / 2
    ref_scale = w.view(24, -1, G).abs().amax(-1).div(qmax).half().float().repeat_interleave(G, dim=1)
    assert torch.equal(scale, ref_scale)
    assert ((deq - w).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(deq[3, :32], torch.zeros(32))
    x = torch.randn(5, 64)
    if scheme == "int8" and group == 0:
        # per-channel int8 runs PyTorch's int8 kernel: bf16 activations and scales, fp32 sums, bf16 out
        codes = unpack(q.qweight, scheme).float()
        ref = (x.bfloat16().float() @ codes.T) * q.scales.bfloat16().float().T
        assert torch.allclose(q(x), ref.bfloat16().float(), rtol=2**-7, atol=1e-6)
        assert torch.allclose(q(x), x @ deq.T, rtol=2e-2, atol=2e-2 * (x @ deq.T).abs().max().item())
    else:
        assert torch.allclose(q(x), x @ deq.T, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few hundred steps on TinyTales, and held-out token ids."""
    torch.manual_seed(0)
    tok = train_tokenizer(tinytales.generate(400, seed=1), vocab_size=320)
    ids = torch.tensor([i for s in tinytales.generate(400, seed=1) for i in tok.encode(s, add_eos=True)])
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=tok.vocab_size,
                       max_seq_len=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s:s + 65] for s in starts])  # (16, 65)
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = [i for s in tinytales.generate(60, seed=2) for i in tok.encode(s, add_eos=True)][:4097]
    return model.eval(), tok, held_out


def test_perplexity_matches_transformers_loss(trained):
    from helpers import hf_model

    model, _, ids = trained
    x = torch.tensor(ids[:64 * 4 + 1])
    # window i predicts tokens i*64+1 .. i*64+64; HF shifts labels itself, so give it the 65 tokens
    windows = torch.stack([x[i * 64:i * 64 + 65] for i in range(4)])
    with torch.no_grad():
        loss = hf_model(model)(windows, labels=windows).loss
    assert math.isclose(perplexity(model, ids[:64 * 4 + 1], seq_len=64), math.exp(loss.item()), rel_tol=1e-5)


@pytest.mark.parametrize("scheme, group, budget", [("int8", 0, 0.02), ("int4", 32, 0.10)])
def test_quantized_perplexity_within_budget_and_checkpoint_reloads(tmp_path, trained, scheme, group, budget):
    import copy

    model, tok, ids = trained
    base = perplexity(model, ids, seq_len=64)
    assert base < 30  # the model learned something: the budgets below mean something
    q = quantize_model(copy.deepcopy(model), scheme, group)
    after = perplexity(q, ids, seq_len=64)
    assert after / base - 1 <= budget, (base, after)
    checkpoint.save(q, tmp_path / "q", tok, meta={"quantization": quantization_of(q)})
    loaded = checkpoint.load(tmp_path / "q")
    x = torch.tensor(ids[:60]).view(2, 30)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))  # exactly the same codes and scales
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, QLinear)
    assert isinstance(loaded.model.lm_head, QLinear)  # the tied head has codes of its own
    info = describe(tmp_path / "q", as_json=True)  # `tinylm info`: the float model's count
    assert info["parameters"] == model.num_params() and info["quantization"].startswith(scheme)
    assert all(m.qweight.data_ptr() % 64 == 0 for m in loaded.model.modules() if isinstance(m, QLinear))
    assert generate_ids(loaded.model, ids[:5], 12, temperature=0.0) == generate_ids(q, ids[:5], 12, temperature=0.0)
    # bytes: float tensors (embedding, norms) stay 4 per value; each linear: codes + one fp16 scale per group
    expected = sum(4 * t.numel() for n, t in export_state_dict(model).items() if "_proj" not in n)
    for m in q.modules():
        if isinstance(m, QLinear):
            per_code = 1 if scheme == "int8" else 0.5
            expected += m.out_features * m.in_features * per_code + 2 * m.out_features * (m.in_features // m.group_size)
    assert weight_bytes(q) == expected < weight_bytes(model) * (0.6 if scheme == "int8" else 0.45)


def test_cli_quantize_reports_and_writes(tmp_path, capsys, trained):
    model, tok, ids = trained
    checkpoint.save(model, tmp_path / "m", tok)
    (tmp_path / "held.txt").write_text(tok.decode(ids))
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "int4", "--out", str(tmp_path / "q"),
                 "--eval-text", str(tmp_path / "held.txt")]) == 0
    out = capsys.readouterr().out
    assert "int4 (group 32)" in out and "perplexity" in out
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["tinylm"]["quantization"]["scheme"] == "int4" and cfg["tinylm"]["quantization"]["group_size"] == 32
    assert disk_size(tmp_path / "q" / "model.safetensors") < disk_size(tmp_path / "m" / "model.safetensors")


@pytest.mark.parametrize("argv, words", [
    (["--scheme", "int3"], "--scheme must be one of int8, int4"),
    (["--scheme", "int4", "--group-size", "24"], "does not divide"),
    (["--scheme", "int8", "--group-size", "-1"], "--group-size"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, words):
    checkpoint.save(tiny_model(dim=64, n_heads=4, ffn_dim=128), tmp_path / "m")
    code = main(["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "q"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "q").exists()


def test_quantizing_twice_is_refused():
    m = quantize_model(tiny_model(dim=64, n_heads=4, ffn_dim=128), "int8", 0)
    with pytest.raises(TinylmError, match="already"):
        quantize_model(m, "int8", 0)


def test_quantize_config_defaults():
    assert QuantizeConfig(source="x", scheme="int4", out="/nonexistent/q").group_size == 32
    assert QuantizeConfig(source="x", scheme="int8", out="/nonexistent/q").group_size == 0
