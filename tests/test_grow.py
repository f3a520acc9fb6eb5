"""Growth and selection against references: HyperCloning keeps the source's logits (and HF loads it),
a stacked model trains, selected weights are the source's sub-blocks, Inheritune is the truncated source."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data.tokens import Batch
from tinylm.formats import checkpoint
from tinylm.model.growth import derive, hypercloning, inherit, select, selection_keep, stack
from tinylm.model.surgery import evenly_spaced, target_shape
from tinylm.train.config import OptimSection
from tinylm.train.losses import lm_loss
from tinylm.train.optim import make_optimizer


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads,factor", [(2, 2), (6, 3), (1, 2)])
def test_hypercloning_keeps_logits(tie, n_kv_heads, factor):
    model = tiny_model(tie=tie, n_kv_heads=n_kv_heads)
    big = hypercloning(model, factor * 48)
    cfg = big.config
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim) == (
        factor * 48, factor * 6, factor * n_kv_heads, factor * 80, 8)
    x = torch.randint(0, 97, (2, 40))
    assert (logits(big, x) - logits(model, x)).abs().max() <= 1e-4
    assert big.num_params() > 3 * model.num_params()


def test_hypercloning_noise_breaks_symmetry_not_function():
    model = tiny_model()
    exact, noisy = hypercloning(model, 96), hypercloning(model, 96, noise=0.5, seed=1)
    w = noisy.model.layers[0].mlp.up_proj.weight  # (160, 96): the two input copies now differ
    assert not torch.allclose(w[:, :48], w[:, 48:])
    assert torch.allclose(exact.model.layers[0].mlp.up_proj.weight, (w[:, :48] + w[:, 48:]).repeat(1, 2) / 2, atol=1e-6)
    x = torch.randint(0, 97, (2, 40))
    assert (logits(noisy, x) - logits(model, x)).abs().max() <= 1e-4


def test_hypercloned_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    checkpoint.save(hypercloning(model, 96), tmp_path / "g")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


def test_stacked_model_repeats_blocks_and_trains():
    model = tiny_model(n_layers=2)
    deep = stack(model, 3)
    assert deep.config.n_layers == 6
    for i in range(6):
        assert torch.equal(deep.model.layers[i].mlp.up_proj.weight, model.model.layers[i % 2].mlp.up_proj.weight)
    torch.manual_seed(0)
    batch = torch.randint(0, 97, (4, 33))
    deep.train()
    opt = make_optimizer(deep, OptimSection(lr=3e-3), torch.device("cpu"))
    losses = []
    for _ in range(8):
        loss, _ = lm_loss(deep, Batch(batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and all(map(torch.isfinite, map(torch.tensor, losses)))


def test_select_to_own_shape_is_identity():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 30))
    assert torch.equal(logits(select(model, model.config), x), logits(model, x))


def test_selected_weights_are_consistent_sub_blocks():
    model = tiny_model(n_layers=3, n_kv_heads=2)
    target = target_shape(model.config, dim=24, ffn_dim=40, n_heads=4, n_kv_heads=2, n_layers=2)
    small = select(model, target)
    ch, ff = evenly_spaced(48, 24), evenly_spaced(80, 40)
    assert ch.tolist() == list(range(0, 48, 2)) and evenly_spaced(3, 2).tolist() == [0, 1]
    keep = selection_keep(model.config, target)
    assert keep.kv_heads[0].tolist() == [0, 1] and keep.q_heads[0].tolist() == [0, 1, 3, 4]  # 2 of 3 per group
    q_rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in (0, 1, 3, 4)])
    src, dst = model.model.layers[1], small.model.layers[1]  # layers 0 and 1 of 3 are kept
    assert torch.equal(dst.self_attn.q_proj.weight, src.self_attn.q_proj.weight[q_rows][:, ch])
    assert torch.equal(dst.self_attn.o_proj.weight, src.self_attn.o_proj.weight[ch][:, q_rows])
    assert torch.equal(dst.mlp.down_proj.weight, src.mlp.down_proj.weight[ch][:, ff])
    assert torch.equal(small.model.embed_tokens.weight, model.model.embed_tokens.weight[:, ch])
    assert torch.equal(small.model.norm.weight, model.model.norm.weight[ch])


def test_inherit_is_the_truncated_source():
    model = tiny_model(n_layers=3)
    small = inherit(model, 2)
    ref = copy.deepcopy(model)
    ref.model.layers = ref.model.layers[:2]
    x = torch.randint(0, 97, (2, 30))
    assert torch.equal(logits(small, x), logits(ref, x))


def test_random_init_has_the_shape_and_is_seeded():
    model = tiny_model()
    a = derive(model, "random", dict(dim=32, n_heads=4), seed=3)
    b = derive(model, "random", dict(dim=32, n_heads=4), seed=3)
    assert a.config == target_shape(model.config, dim=32, n_heads=4)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    with pytest.raises(TinylmError):
        derive(model, "inherit", dict(dim=32), seed=0)


# ----- CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path):
    return str(checkpoint.save(tiny_model(), tmp_path / "src"))


def test_cli_grow_and_init(tmp_path, source):
    x = torch.randint(0, 97, (1, 20))
    ref = logits(checkpoint.load(source).model, x)
    assert main(["grow", source, "--method", "hypercloning", "--dim", "96", "--out", str(tmp_path / "g")]) == 0
    grown = checkpoint.load(tmp_path / "g")
    assert grown.meta["method"] == "hypercloning" and (logits(grown.model, x) - ref).abs().max() <= 1e-4
    assert main(["grow", source, "--method", "stack", "--factor", "2", "--out", str(tmp_path / "s")]) == 0
    assert checkpoint.load(tmp_path / "s").config.n_layers == 4
    assert main(["init", "--from", source, "--method", "inherit", "--n-layers", "1", "--out", str(tmp_path / "i")]) == 0
    assert checkpoint.load(tmp_path / "i").config.n_layers == 1
    assert main(["init", "--from", source, "--method", "select", "--dim", "24", "--ffn-dim", "40",
                 "--out", str(tmp_path / "sel")]) == 0
    assert checkpoint.load(tmp_path / "sel").config.dim == 24


@pytest.mark.parametrize("argv", [
    ["grow", "{src}", "--method", "hypercloning", "--dim", "100"],  # not a multiple of 48
    ["grow", "{src}", "--method", "widen", "--dim", "96"],  # unknown method
    ["grow", "{src}", "--method", "stack"],  # no --factor
    ["init", "--from", "{src}", "--method", "clone"],  # unknown method
    ["init", "--from", "{src}", "--method", "select", "--dim", "96"],  # larger than the source
    ["init", "--from", "{src}", "--method", "select", "--n-heads", "5"],  # heads do not divide
    ["init", "--from", "{src}", "--method", "inherit", "--n-layers", "9"],  # more layers than the source
    ["init", "--from", "{src}", "--preset", "nonesuch"],  # unknown preset
    ["init", "--from", "{tmp}/missing", "--method", "select"],  # no such source
])
def test_cli_impossible_requests_are_one_line_errors(tmp_path, source, capsys, argv):
    out = tmp_path / "out"
    code = main([a.format(src=source, tmp=tmp_path) for a in argv] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_init_preset_keeps_at_most_the_sources_kv_heads() -> None:
    # 15m is multi-head (6 of 6); SmolLM2 has 3 key/value groups: selection keeps 3, which divides 6.
    from tinylm.model.config import preset
    from tinylm.stages.init import InitConfig, _sizes

    sizes = _sizes(InitConfig(source="smollm2-135m", out="x", preset="15m"), preset("smollm2-135m"))
    assert sizes["n_heads"] == 6 and sizes["n_kv_heads"] == 3
    two_kv = preset("smollm2-135m", n_heads=9, n_kv_heads=1)
    assert _sizes(InitConfig(source="s", out="x", preset="15m"), two_kv)["n_kv_heads"] == 1
    explicit = InitConfig(source="s", out="x", preset="15m", n_kv_heads=2)  # an explicit size wins
    assert _sizes(explicit, preset("smollm2-135m"))["n_kv_heads"] == 2
