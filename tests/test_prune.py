"""Pruning and vocabulary trimming against references: masking the pruned units in the source, the
importance formulas, HF transformers loading the pruned checkpoint, the source's logits at kept ids."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import train_tokenizer, trim_tokenizer
from tinylm.formats import checkpoint
from tinylm.model.surgery import target_shape, trim_vocab
from tinylm.stages.prune import (
    calib_batches,
    importance,
    open_tokens,
    prune_iterative,
    prune_model,
    target_for_params,
)

TEXTS = [f"The cat number {i} sat on the mat and looked at the {w} dog." for i, w in
         zip(range(60), ["red", "big", "small", "old", "happy", "sad"] * 10)]


def batches(n: int = 2, vocab: int = 97, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 25), generator=g) for _ in range(n)]


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("tie", [True, False])
def test_prune_to_own_shape_is_identity(tie):
    model = tiny_model(tie=tie)
    x = torch.randint(0, 97, (2, 30))
    pruned = prune_model(model, batches(), model.config)
    assert pruned is not model and pruned.config == model.config
    assert torch.equal(logits(pruned, x), logits(model, x))


def test_importance_is_deterministic_and_matches_formulas():
    model, data = tiny_model(), batches()
    a, b = importance(model, data), importance(model, data)
    for name in ("channels", "heads", "neurons", "layers"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # reference: recompute layer 0's SwiGLU activations and every block's Block Influence by hand
    neurons, bi = torch.zeros(model.config.ffn_dim), torch.zeros(model.config.n_layers)
    blk = model.model.layers[0]
    with torch.no_grad():
        for batch in data:
            x = batch[:, :-1]
            _, hidden = model(x, output_hidden_states=True)
            cos, sin = model._rope(0, x.shape[1])
            mid = hidden[0] + blk.self_attn(blk.input_layernorm(hidden[0]), cos, sin, None)
            h = blk.post_attention_layernorm(mid)
            act = F.silu(blk.mlp.gate_proj(h)) * blk.mlp.up_proj(h)  # (B, T, ffn_dim)
            neurons += act.abs().mean(1).pow(2).sum(0)
            for i in range(model.config.n_layers):
                bi[i] += (1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)).sum()
    assert torch.allclose(a.neurons[0], neurons.sqrt(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.layers, bi, rtol=1e-5)


def test_head_with_zero_values_has_zero_importance():
    model = tiny_model()
    with torch.no_grad():  # kv head 1 of layer 0 outputs zeros: its query heads 3, 4, 5 too (r = 3)
        model.model.layers[0].self_attn.v_proj.weight[8:16] = 0
    imp = importance(model, batches())
    assert torch.all(imp.heads[0, 3:] == 0) and torch.all(imp.heads[0, :3] > 0)
    q = prune_model(model, batches(), target_shape(model.config, n_heads=3, n_kv_heads=1))
    assert torch.equal(q.model.layers[0].self_attn.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight[:8])


def masked_heads(model, kept_q: list[list[int]]):
    """The source with the o_proj columns of every dropped query head zeroed."""
    ref, hd = copy.deepcopy(model), model.config.head_dim
    with torch.no_grad():
        for layer, keep in zip(ref.model.layers, kept_q):
            for h in set(range(model.config.n_heads)) - set(keep):
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return ref


@pytest.mark.parametrize("src_kv,n_heads,n_kv", [(3, 4, 2), (2, 4, 2), (2, 2, 1), (6, 3, 3)])
def test_gqa_head_pruning_equals_masking(src_kv, n_heads, n_kv):
    model, data = tiny_model(n_kv_heads=src_kv), batches()
    pruned = prune_model(model, data, target_shape(model.config, n_heads=n_heads, n_kv_heads=n_kv))
    assert (pruned.config.n_heads, pruned.config.n_kv_heads) == (n_heads, n_kv)
    imp, r = importance(model, data), 6 // src_kv
    kept = []
    for scores in imp.heads:  # the kept query heads, recomputed from the scores
        groups = scores.view(src_kv, r).sum(1).argsort(descending=True)[:n_kv].sort().values
        kept.append([g * r + int(h) for g in groups.tolist()
                     for h in scores.view(src_kv, r)[g].argsort(descending=True)[:n_heads // n_kv]])
    x = torch.randint(0, 97, (2, 30))
    assert (logits(pruned, x) - logits(masked_heads(model, kept), x)).abs().max() <= 1e-5


def test_ffn_and_depth_pruning_equal_masking_and_skipping():
    model, data = tiny_model(n_layers=3), batches()
    imp = importance(model, data)
    pruned = prune_model(model, data, target_shape(model.config, ffn_dim=40, n_layers=2), order=["width", "depth"])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            drop = imp.neurons[i].argsort()[:40]  # the 40 least important neurons
            layer.mlp.down_proj.weight[:, drop] = 0
    imp2 = importance(prune_model(model, data, target_shape(model.config, ffn_dim=40)), data)
    keep_layers = sorted(imp2.layers.argsort(descending=True)[:2].tolist())
    ref.model.layers = torch.nn.ModuleList(ref.model.layers[i] for i in keep_layers)
    x = torch.randint(0, 97, (2, 30))
    assert (logits(pruned, x) - logits(ref, x)).abs().max() <= 1e-5


def test_layer_metric_loss_drops_the_least_harmful_block():
    model, data = tiny_model(n_layers=3), batches()
    imp = importance(model, data, layer_metric="loss")
    base = sum(float(F.cross_entropy(logits(model, b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())) for b in data)
    skipped = copy.deepcopy(model)
    del skipped.model.layers[1]
    loss = sum(float(F.cross_entropy(logits(skipped, b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())) for b in data)
    assert imp.layers[1].item() == pytest.approx((loss - base) / len(data), abs=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_pruned_checkpoint_loads_in_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie=tie, n_layers=3)
    target = target_shape(model.config, dim=32, ffn_dim=48, n_heads=4, n_kv_heads=2, n_layers=2)
    pruned = prune_model(model, batches(), target)
    assert pruned.num_params() == target.param_count() < model.num_params()
    checkpoint.save(pruned, tmp_path / "p", meta={"derived_from": "tiny", "method": "prune"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - pruned(x)).abs().max() <= 1e-5
    assert checkpoint.load(tmp_path / "p").meta["method"] == "prune"


def test_iterative_pruning_reaches_the_target(tmp_path):
    model = tiny_model(n_layers=3)
    data = open_tokens_from_ids(torch.randint(0, 97, (4000,)))
    target = target_shape(model.config, dim=32, ffn_dim=40, n_heads=4, n_layers=2)
    lines = []
    out = prune_iterative(model, data, target, steps=2, steps_between=3, batch_size=4, seq_len=16, n_batches=1,
                          log=lines.append)
    assert out.config == target and len(lines) == 3  # two pruning steps, one training in between


def open_tokens_from_ids(ids: torch.Tensor):
    from tinylm.data.tokens import TokenData

    return TokenData({"vocab_size": 97, "splits": {"train": {"bytes": len(ids)}}}, [ids.numpy()], "train")


def test_target_for_params_fits_the_budget():
    cfg = tiny_config(n_layers=6, dim=512, n_heads=8, n_kv_heads=4, ffn_dim=1376, vocab_size=4000)
    for fraction in (0.3, 0.5, 0.8):
        budget = int(fraction * cfg.param_count())
        t = target_for_params(cfg, budget)
        assert 0.95 * budget < t.param_count() <= budget and t.dim % t.n_heads == 0
        assert t.ffn_dim / cfg.ffn_dim < t.dim / cfg.dim  # the MLP shrinks fastest
        assert (t.n_heads, t.n_kv_heads, t.n_layers) == (cfg.n_heads, cfg.n_kv_heads, cfg.n_layers)
    with pytest.raises(TinylmError):
        target_for_params(cfg, cfg.param_count() + 1)


# ----- vocabulary -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 3, vocab_size=320, min_frequency=2)


def model_for(tok, tie=True):
    return tiny_model(tie=tie, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)


@pytest.mark.parametrize("tie", [True, False])
def test_trim_vocab_keeps_logits_of_kept_tokens(tok, tie):
    model = model_for(tok, tie)
    new_tok, kept = trim_tokenizer(tok, TEXTS, keep=290)
    small = trim_vocab(model, kept)
    text = "The cat sat on the mat and looked at the dog."
    old_ids = tok.encode(text)
    assert set(old_ids) <= set(kept)  # the premise: every token of the text is kept
    new_ids = new_tok.encode(text)
    assert new_ids == [kept.index(i) for i in old_ids]
    ref = logits(model, torch.tensor([old_ids]))[..., kept]
    assert torch.equal(logits(small, torch.tensor([new_ids])), ref)
    assert small.config.vocab_size == 290 and small.config.bos_token_id == kept.index(tok.bos_id)


def test_trim_vocab_rejects_bad_maps():
    model = tiny_model()
    for bad in ([0, 97], [3, 3], []):
        with pytest.raises(TinylmError):
            trim_vocab(model, bad)


def test_text_calibration_tokens(tmp_path, tok):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(TEXTS))
    data = open_tokens(str(path), tok)
    expected = sum(len(tok.encode(t)) + 2 for t in TEXTS)  # BOS + text + EOS
    assert data.n_tokens == expected
    a, b = calib_batches(data, 2, 3, 8), calib_batches(data, 2, 3, 8)
    assert all(torch.equal(x, y) and x.shape == (3, 9) for x, y in zip(a, b))


# ----- CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path, tok):
    return str(checkpoint.save(model_for(tok), tmp_path / "src", tokenizer=tok))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS))
    return str(path)


def test_cli_prune_with_vocab_trim(tmp_path, source, corpus, tok, capsys):
    out = tmp_path / "out"
    code = main(["prune", source, "--calib", corpus, "--out", str(out), "--trim-vocab", "290", "--dim", "32",
                 "--n-heads", "4", "--n-layers", "1", "--calib-batches", "2", "--batch-size", "2", "--seq-len", "16"])
    assert code == 0
    loaded = checkpoint.load(out)
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_layers) == (290, 32, 4, 1)
    assert loaded.tokenizer.vocab_size == 290 and loaded.meta["derived_from"] == source
    assert loaded.meta["vocab_trimmed_from"] == tok.vocab_size


def test_cli_trim_vocab_from_token_map(tmp_path, source, corpus, tok):
    assert main(["tokenizer", "trim", source, "--corpus", corpus, "--keep", "300", "--out", str(tmp_path / "t")]) == 0
    assert main(["trim-vocab", source, "--token-map", str(tmp_path / "t"), "--out", str(tmp_path / "o")]) == 0
    kept = json.loads((tmp_path / "t" / "token_map.json").read_text())["kept"]
    small, big = checkpoint.load(tmp_path / "o").model, checkpoint.load(source).model
    assert torch.equal(small.model.embed_tokens.weight, big.model.embed_tokens.weight[kept])


def test_cli_prune_on_a_data_dir_trims_the_vocabulary_last(tmp_path, source, corpus):
    from tinylm.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(inputs=[corpus], tokenizer=source, out=str(tmp_path / "data"), val_fraction=0.0))
    assert main(["tokenizer", "trim", source, "--corpus", corpus, "--keep", "300", "--out", str(tmp_path / "t")]) == 0
    assert main(["prune", source, "--calib", str(tmp_path / "data"), "--token-map", str(tmp_path / "t"),
                 "--ffn-dim", "40", "--calib-batches", "1", "--batch-size", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "o")]) == 0
    cfg = checkpoint.load(tmp_path / "o").config
    assert (cfg.vocab_size, cfg.ffn_dim) == (300, 40)
    assert main(["prune", source, "--calib", str(tmp_path / "data"), "--trim-vocab", "300", "--ffn-dim", "40",
                 "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.parametrize("args", [
    ["--dim", "64"],  # larger than the source's 48
    ["--dim", "40"],  # not a multiple of the 6 heads (transformers refuses it)
    ["--n-heads", "5"],  # not a multiple of n_kv_heads 2
    ["--n-heads", "4", "--n-kv-heads", "1"],  # 4 per group, the source has 3
    ["--target-params", "1e9"],  # larger than the source
    ["--dim", "32", "--order", "width,sideways"],  # unknown stage
    ["--dim", "32", "--layer-metric", "magic", "--n-layers", "1"],  # unknown metric
    ["--dim", "32", "--trim-vocab", "100000"],  # more tokens than the vocabulary
])
def test_cli_impossible_prune_is_one_line_error(tmp_path, source, corpus, capsys, args):
    out = tmp_path / "out"
    code = main(["prune", source, "--calib", corpus, "--out", str(out), "--calib-batches", "1",
                 "--batch-size", "2", "--seq-len", "8", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_target_params_with_a_token_map_budgets_the_trimmed_vocabulary(tmp_path, source, corpus):
    import dataclasses

    from tinylm.data.prepare import PrepareConfig, prepare
    from tinylm.stages.prune import target_for_params

    prepare(PrepareConfig(inputs=[corpus], tokenizer=source, out=str(tmp_path / "data"), val_fraction=0.0))
    assert main(["tokenizer", "trim", source, "--corpus", corpus, "--keep", "300", "--out", str(tmp_path / "t")]) == 0
    src = checkpoint.load(source).config
    budget = src.param_count() // 2
    assert main(["prune", source, "--calib", str(tmp_path / "data"), "--token-map", str(tmp_path / "t"),
                 "--target-params", str(budget), "--calib-batches", "1", "--batch-size", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "o")]) == 0
    got = checkpoint.load(tmp_path / "o").config
    expected = target_for_params(dataclasses.replace(src, vocab_size=300), budget)
    assert got.vocab_size == 300 and got.param_count() == expected.param_count() <= budget
