"""Export round trips: GGUF (read back by tinylm, by gguf-py and by transformers), HF dirs, ONNX, llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import needs_smollm2, padded_model, tiny_model

from tinylm.cli import main
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.formats import gguf as gguf_format
from tinylm.formats import onnx as onnx_format
from tinylm.model.qlinear import quantization_of
from tinylm.stages.quantize import quantize_model

TEXTS = ["Once upon a time, a little cat named Tom sat on the mat. 12345 apples!",
         "The dog said: \"hello\" and ran away.\n\nThen   it  rained 3.5 days.", "café naïve 日本語 🤖"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok):
    # rows a multiple of 32 so that q8_0 / q4_0 blocks fit; untied to exercise output.weight; 3 padding logits
    return padded_model(tok, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, tie=False, bos_token_id=tok.bos_id)


def _logits(m, x):
    with torch.no_grad():
        out = m(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("gguf_type, tol", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.25)])
def test_gguf_round_trip(tmp_path, tok, model, gguf_type, tol):
    path = gguf_format.export_gguf(model, tmp_path / "m.gguf", tok, gguf_type)
    loaded = checkpoint.load(path)
    x = torch.randint(0, model.config.vocab_size, (2, 30))
    ref = _logits(model, x)
    err = (_logits(loaded.model, x) - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, err
    # GGUF keeps eps as float32, and the pad id comes from the tokenizer
    same = lambda c: {**c.to_dict(), "norm_eps": round(c.norm_eps, 9), "pad_token_id": None}  # noqa: E731
    assert same(loaded.config) == same(model.config)
    for text in TEXTS[:3]:
        assert loaded.tokenizer.encode(text) == tok.encode(text)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


def test_gguf_metadata_and_types(tmp_path, tok, model):
    import gguf

    gguf_format.export_gguf(model, tmp_path / "m.gguf", tok, "q4_0", name="tiny")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_id and field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == tok.chat_template
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == model.config.vocab_size and tokens[-1] == f"[PAD{model.config.vocab_size - 1}]"
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"


def test_gguf_f32_matches_transformers_gguf_loader(tmp_path, tok, model):
    # An independent reader of the llama.cpp layout (its own q/k un-permute and tokenizer conversion).
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_format.export_gguf(model, tmp_path / "m.gguf", tok, "f32")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 30))
    assert (_logits(ref, x) - _logits(model, x)).abs().max().item() <= 1e-5
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS[:3]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_hf_export_of_a_quantized_checkpoint(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    m = tiny_model(dim=64, n_heads=4, ffn_dim=96, vocab_size=tok.vocab_size)
    quantize_model(m, "int4", 32)
    checkpoint.save(m, tmp_path / "q", tok, meta={"quantization": quantization_of(m)})
    assert main(["export", str(tmp_path / "q"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, tok.vocab_size, (2, 20))
    assert (_logits(ref, x) - _logits(m, x)).abs().max().item() <= 1e-5  # dequantised weights, exactly


@pytest.mark.parametrize("argv, words", [
    (["--format", "tflite"], "--format must be one of hf, gguf, onnx"),
    (["--format", "gguf", "--gguf-type", "q3_k"], "--gguf-type must be one of"),
])
def test_bad_export_options_are_one_line_errors(tmp_path, capsys, argv, words):
    checkpoint.save(tiny_model(), tmp_path / "m")
    code = main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0] and not (tmp_path / "o").exists()


def test_cli_gguf_export_refuses_to_overwrite(tmp_path, capsys, tok, model):
    checkpoint.save(model, tmp_path / "m", tok)
    assert main(["export", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err


@needs_smollm2
def test_smollm2_tokenizer_keeps_its_pre_tokenizer_name():
    assert gguf_format._pre_tokenizer_name(checkpoint.load_tokenizer("smollm2-135m")) == "smollm"


# ----- ONNX ----------------------------------------------------------------------------------------

def test_onnx_logits_equal_torch_with_kv_cache(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = tiny_model(max_seq_len=32)
    path = onnx_format.export_onnx(m, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path))
    x = torch.randint(0, 97, (2, 12))
    ref = _logits(m, x).numpy()
    cfg = m.config
    k = np.zeros((cfg.n_layers, 2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim), np.float32)
    v = np.zeros_like(k)
    # prefill 8 tokens, then 4 single-token steps through the returned cache
    logits, k, v = sess.run(None, {"input_ids": x[:, :8].numpy(), "start": np.array(0, np.int64),
                                   "past_keys": k, "past_values": v})
    outs = [logits]
    for t in range(8, 12):
        logits, k, v = sess.run(None, {"input_ids": x[:, t:t + 1].numpy(), "start": np.array(t, np.int64),
                                       "past_keys": k, "past_values": v})
        outs.append(logits)
    assert np.abs(np.concatenate(outs, 1) - ref).max() <= 1e-4


# ----- llama.cpp -----------------------------------------------------------------------------------

def test_llama_cpp_runs_the_f32_gguf_as_tinylm_does(tmp_path, tok, model):
    """Same tokens, same greedy continuation, same perplexity (within 1%). Skips without llama-cpp-python
    (it builds from source in minutes; bench/bench_deploy.py --llama-cpp runs the same check on a trained model)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tinylm.infer.generate import generate_ids
    from tinylm.stages.quantize import perplexity

    gguf_format.export_gguf(model, tmp_path / "m.gguf", tok, "f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    for text in TEXTS[:3]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    prompt = tok.encode(TEXTS[0])[:8]
    ours = generate_ids(model, prompt, 16, temperature=0.0)
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == ours
    ids = tok.encode(" ".join(TEXTS[:6]))[:57]
    llm.reset()
    llm.eval(ids[:-1])
    logp = torch.tensor(np.array(llm.scores[: len(ids) - 1])).log_softmax(-1)
    ppl_cpp = torch.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()).item()
    assert abs(ppl_cpp / perplexity(model, ids, seq_len=56) - 1) <= 0.01
