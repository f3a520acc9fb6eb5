"""LoRA / QLoRA adapters against their references: the base model (B = 0), the merged weights, the formula
over dequantised QLoRA bases, LoftQ's SVD bound, and peft itself (adapters saved by tinylm load in
`peft.PeftModel` on the HF export with equal logits, and the other way round); `tinylm merge` writes a
model transformers loads, and refuses bad adapters in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.formats import checkpoint
from tinylm.formats.peft import load_adapter, save_adapter
from tinylm.model.lora import (
    LoraLinear,
    apply_lora,
    base_model,
    find_targets,
    loftq,
    lora_layers,
    lora_parameters,
    merge_lora,
    token_rows,
    unload_lora,
    unmerge_lora,
)
from tinylm.model.qlinear import QLinear, quantization_of, swap_in

IDS = torch.tensor([[5, 17, 3, 42, 8, 91, 60, 2, 33, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero B (and fresh A) in every adapter, so the adapters change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.2)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


# ----- the module --------------------------------------------------------------------------------------

def test_zero_b_gives_the_base_logits_exactly() -> None:
    model = tiny_model()
    want = logits(model)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear", seed=0)
    assert len(lora_layers(model)) == 2 * 7 and "lm_head" not in lora_layers(model)  # PEFT's all-linear
    assert torch.equal(logits(model.eval()), want)


def test_init_is_pefts_kaiming_uniform_and_seeded() -> None:
    a = apply_lora(tiny_model(), r=4, alpha=8, seed=3)
    b = apply_lora(tiny_model(), r=4, alpha=8, seed=3)
    for (name, p), q in zip(lora_parameters(a).items(), lora_parameters(b).values()):
        assert torch.equal(p, q), name
        if ".lora_A." in name:  # kaiming_uniform(a=sqrt(5)): uniform(-1/sqrt(in), 1/sqrt(in))
            bound = p.shape[1] ** -0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound and p.std() > 0.4 * bound, name
        else:
            assert not p.any(), name


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_the_formula(rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    layer = randomise_layer(LoraLinear(copy.deepcopy(base), r=3, alpha=6, use_rslora=rslora))
    x = torch.randn(2, 5, 12)
    scale = 6 / 3**0.5 if rslora else 6 / 3
    want = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * scale
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def randomise_layer(layer: LoraLinear) -> LoraLinear:
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    return layer


def test_merged_equals_unmerged_and_unmerge_restores() -> None:
    model = randomise(apply_lora(tiny_model(tie=False), r=4, alpha=16, targets=["q_proj", "v_proj", "up_proj",
                                                                                  "lm_head"]))
    base_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    want = logits(model)
    assert (want - logits(base_model(model))).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(logits(merge_lora(model, unload=False)), want, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    merged = merge_lora(model)
    assert not lora_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-5)


def test_unload_and_base_model_give_the_base() -> None:
    want = logits(tiny_model())
    model = randomise(apply_lora(tiny_model(), r=2, alpha=4))
    assert torch.equal(logits(base_model(model)), want)
    assert lora_layers(model)  # base_model is a view: the model keeps its adapters
    assert torch.equal(logits(unload_lora(model)), want)


def test_gradients_reach_only_the_adapters() -> None:
    model = randomise(apply_lora(tiny_model(), r=4, alpha=8, dropout=0.1, targets=["k_proj", "down_proj"]))
    model.train()
    out = model(IDS[:, :-1])
    F.cross_entropy(out.flatten(0, 1), IDS[:, 1:].flatten()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 2 * 2 * 2
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_targets_are_matched_as_peft_does_and_unknown_ones_refused() -> None:
    model = tiny_model()
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(TinylmError, match="qq_proj"):
        find_targets(model, ["qq_proj"])
    with pytest.raises(TinylmError, match="untied"):
        find_targets(model, ["lm_head"])  # tiny_model ties its head to the embeddings
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(TinylmError, match="already"):
        apply_lora(model, r=2, alpha=2)


# ----- QLoRA and LoftQ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, group", [("int8", 16), ("int4", 16), ("int8", 0)])
def test_qlora_forward_is_dequantised_base_plus_adapter(scheme: str, group: int) -> None:
    torch.manual_seed(0)
    q = QLinear.from_linear(nn.Linear(48, 80, bias=False), scheme, group)
    layer = randomise_layer(LoraLinear(q, r=4, alpha=8))
    x = torch.randn(3, 7, 48)
    want = x @ q.dequantized().T + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2
    # per-channel int8 runs PyTorch's int8 kernel on bf16 activations (qlinear.int8_matmul)
    atol = 5e-2 if group == 0 else 1e-5
    torch.testing.assert_close(layer(x), want, rtol=0, atol=atol)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_qlora_model_merges_to_float_with_equal_logits(scheme: str) -> None:
    model = randomise(apply_lora(tiny_model(), r=4, alpha=8, quantize=scheme, group_size=16))
    layers = lora_layers(model)
    assert all(isinstance(m.base_layer, QLinear) for m in layers.values())
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QLinear)
    assert type(model.lm_head) is nn.Linear  # the output layer stays float
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in lora_parameters(model))
    want = logits(model)
    merge_lora(model, unload=False)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert all(isinstance(m.base_layer, QLinear) for m in layers.values())  # the codes are back
    merged = merge_lora(model)
    assert quantization_of(merged) is None  # every adapted layer is float once merged
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-5)


def test_loftq_reduces_the_quantisation_error_to_the_svd_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(80, 48) * 0.05
    q0 = QLinear.from_linear(_linear(w), "int4", 16)
    plain_error = torch.linalg.norm(w - q0.dequantized())
    scaling = 8 / 4
    q, a, b = loftq(w, "int4", 16, r=4, iters=1, scaling=scaling)
    error = torch.linalg.norm(w - (q.dequantized() + scaling * b @ a))
    # one iteration: Q = quant(W) and s B A = the best rank-4 approximation of W - Q (Eckart-Young)
    s = torch.linalg.svdvals(w - q0.dequantized())
    torch.testing.assert_close(error, s[4:].square().sum().sqrt(), rtol=1e-4, atol=0)
    assert error < plain_error
    q5, a5, b5 = loftq(w, "int4", 16, r=4, iters=5, scaling=scaling)
    assert torch.linalg.norm(w - (q5.dequantized() + scaling * b5 @ a5)) < plain_error


def _linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    return layer


def test_loftq_model_starts_closer_to_the_float_model() -> None:
    want = logits(tiny_model())
    plain = logits(apply_lora(tiny_model(), r=4, alpha=8, quantize="int4", group_size=16))
    lofted = logits(apply_lora(tiny_model(), r=4, alpha=8, quantize="int4", group_size=16, loftq_iters=2))
    assert (lofted - want).abs().mean() < (plain - want).abs().mean()
    with pytest.raises(TinylmError, match="LoftQ"):
        apply_lora(tiny_model(), r=4, alpha=8, loftq_iters=2)


# ----- PEFT's format, against peft ---------------------------------------------------------------------------

def hf_and_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM
    return LoraConfig, PeftModel, get_peft_model, LlamaForCausalLM


@pytest.mark.parametrize("targets, rslora, tie", [("all-linear", False, True), (["q_proj", "v_proj"], True, True),
                                                  (["model.layers.1.mlp.down_proj", "lm_head"], False, False)])
def test_peft_loads_a_tinylm_adapter_with_equal_logits(tmp_path: Path, targets, rslora: bool, tie: bool) -> None:
    _, PeftModel, _, LlamaForCausalLM = hf_and_peft()
    model = randomise(apply_lora(tiny_model(tie=tie), r=4, alpha=12, dropout=0.05, targets=targets,
                                 use_rslora=rslora)).eval()
    checkpoint.save(base_model(model), tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", base_name=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")) or targets != "all-linear"
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", [None, "int4"])
def test_an_adapter_peft_made_loads_into_tinylm_with_equal_logits(tmp_path: Path, scheme: str | None) -> None:
    LoraConfig, _, get_peft_model, LlamaForCausalLM = hf_and_peft()
    checkpoint.save(tiny_model(), tmp_path / "base")
    torch.manual_seed(0)  # peft draws A and B from the global generator
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = checkpoint.load(tmp_path / "base").model
    if scheme is not None:  # an adapter onto a quantised base: the base's own numbers change, the adapter's not
        swap_in(model, {"scheme": scheme, "group_size": 16, "modules": find_targets(model, "all-linear")})
    load_adapter(model, tmp_path / "adapter")
    assert len(lora_layers(model)) == 3 * 2 and not lora_parameters(model)["model.layers.0.mlp.up_proj.lora_B.weight"].eq(0).all()
    if scheme is None:
        torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=1e-5)
    else:  # reference: peft over a base holding the dequantised weights
        for name, m in base_model(model).named_modules():
            if isinstance(m, QLinear):
                layer = peft_model.get_submodule("base_model.model." + name)
                getattr(layer, "base_layer", layer).weight.data = m.dequantized()
        torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_peft_trainable_token_rows_load_into_tinylm_and_merge_with_equal_logits(tmp_path: Path, tie: bool) -> None:
    LoraConfig, _, get_peft_model, LlamaForCausalLM = hf_and_peft()
    checkpoint.save(tiny_model(tie=tie), tmp_path / "base")
    rows = [3, 42, 90]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                        trainable_token_indices=rows if tie else {"embed_tokens": rows, "lm_head": rows[:2]})
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    with torch.no_grad():  # trained rows: PEFT starts them as the base's
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_adapter(checkpoint.load(tmp_path / "base").model, tmp_path / "adapter").eval()
    assert sorted(token_rows(model)) == ["lm_head", "model.embed_tokens"]
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=1e-5)
    save_adapter(model, tmp_path / "again")  # and back: the same config entry and tensors
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["trainable_token_indices"] == config.trainable_token_indices
    saved, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("adapter", "again"))
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
    base = checkpoint.load(tmp_path / "base").model.state_dict()
    merged = merge_lora(model)
    torch.testing.assert_close(logits(merged), logits(peft_model), rtol=0, atol=1e-5)
    for key, ids in [("model.embed_tokens.weight", rows), ("lm_head.weight", rows if tie else rows[:2])]:
        w, old = merged.state_dict()[key], [i for i in range(97) if i not in ids]
        assert torch.equal(w[old], base[key][old]) and not torch.equal(w[ids], base[key][ids]), key


# ----- tinylm merge ------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True])
def test_cli_merge_writes_a_model_transformers_loads(tmp_path: Path, capsys, quantized: bool) -> None:
    _, _, _, LlamaForCausalLM = hf_and_peft()
    base = tiny_model()
    meta = None
    if quantized:  # QLoRA: the adapter was trained over an int8 checkpoint
        spec = {"scheme": "int8", "group_size": 16, "modules": find_targets(base, "all-linear")}
        swap_in(base, spec)
        meta = {"quantization": quantization_of(base)}
    checkpoint.save(base, tmp_path / "base", meta=meta)
    model = randomise(apply_lora(checkpoint.load(tmp_path / "base").model, r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert "merged 14 adapted layers" in capsys.readouterr().out
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(hf), logits(model), rtol=0, atol=1e-5)
    assert cli.main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


EMB_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens


def _bad_adapters(root: Path) -> dict[str, tuple[Path, str]]:
    """Broken adapter dirs, each with the words its error must contain."""
    good = root / "good"
    save_adapter(randomise(apply_lora(tiny_model(), r=2, alpha=4)), good)
    other = root / "other-shapes"
    save_adapter(randomise(apply_lora(tiny_model(dim=32, n_heads=4), r=2, alpha=4)), other)
    cases = {"missing": (root / "nowhere", "nowhere"), "other-shapes": (other, "another model")}
    for name, change in {"ia3": lambda c, t: c.update(peft_type="IA3"), "dora": lambda c, t: c.update(use_dora=True),
                         "r": lambda c, t: c.update(r="four"),
                         "key": lambda c, t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
                         "half": lambda c, t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"),
                         "nonesuch": lambda c, t: t.update({
                             "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(2, 48),
                             "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(80, 2)}),
                         "rows-missing": lambda c, t: c.update(trainable_token_indices=[3, 4]),
                         "rows-ids": lambda c, t: (c.update(trainable_token_indices=[3, 500]),
                                                   t.update({f"{EMB_ROWS}": torch.zeros(2, 48)})),
                         "rows-orphan": lambda c, t: t.update({f"{EMB_ROWS}": torch.zeros(2, 48)}),
                         "rows-tied": lambda c, t: (c.update(trainable_token_indices={"lm_head": [3]}), t.update(
                             {"base_model.model.lm_head.token_adapter.trainable_tokens_delta": torch.zeros(1, 48)}))
                         }.items():
        d = root / name
        d.mkdir()
        c = json.loads((good / "adapter_config.json").read_text())
        t = load_file(str(good / "adapter_model.safetensors"))
        change(c, t)
        (d / "adapter_config.json").write_text(json.dumps(c))
        save_file(t, str(d / "adapter_model.safetensors"))
    cases.update(ia3=(root / "ia3", "IA3"), dora=(root / "dora", "use_dora"), r=(root / "r", "r must be"),
                 key=(root / "key", "unexpected tensor"), half=(root / "half", "partner"),
                 nonesuch=(root / "nonesuch", "layers.9"), **{"rows-missing": (root / "rows-missing", "no trained rows"),
                 "rows-ids": (root / "rows-ids", "distinct and below 97"), "rows-tied": (root / "rows-tied", "tied"),
                 "rows-orphan": (root / "rows-orphan", "trainable_token_indices does not name")})
    (root / "no-weights").mkdir()
    (root / "no-weights" / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (root / "not-json").mkdir()
    (root / "not-json" / "adapter_config.json").write_text("{r: 4")
    cases.update({"no-weights": (root / "no-weights", "adapter_model.safetensors"),
                  "not-json": (root / "not-json", "JSON"), "not-adapter": (root / "base", "adapter_config.json")})
    return cases


def test_bad_adapters_are_one_line_exit_2_and_write_nothing(tmp_path: Path, capsys) -> None:
    checkpoint.save(tiny_model(), tmp_path / "base")
    for name, (adapter, says) in _bad_adapters(tmp_path).items():
        out = tmp_path / f"out-{name}"
        code = cli.main(["merge", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1, (name, err)
        assert says in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*")), name
