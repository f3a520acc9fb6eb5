"""Tests for tokenizer training, statistics and trimming (tinylm.tokenizer), on tokenizers trained here."""

from __future__ import annotations

import json
import random

import pytest
from helpers import needs_smollm2
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_to_unicode,
    tokenizer_stats,
    train_tokenizer,
    trim_tokenizer,
)

WORDS = ["the", "little", "cat", "sat", "on", "a", "mat", "Lily", "Tom", "happy", "tree", "ran", "park",
         "über", "naïve", "café", "日本語", "🙂", "said", "played", "with", "ball", "sun", "1234", "—"]


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + rng.choice([".", "!", "?\n"])
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(400), vocab_size=400, min_frequency=2)


def test_trained_tokenizer_layout(tok):
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    vocab = tok.backend.get_vocab()
    assert all(ch in vocab for ch in bytes_to_unicode())  # the full byte alphabet, seen or not
    assert len(SPECIAL_TOKENS) + 256 < tok.vocab_size <= 400
    # the corpus' frequent words became single tokens
    assert len(tok.encode("little")) == 1 and len(tok.encode(" little")) == 1
    with pytest.raises(TinylmError):
        train_tokenizer(_corpus(10), vocab_size=200)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(text):
    # built once per process: hypothesis forbids function-scoped fixtures
    tok = _roundtrip_tok()
    assert tok.decode(tok.encode(text)) == text


_CACHE: dict[str, Tokenizer] = {}


def _roundtrip_tok() -> Tokenizer:
    if "tok" not in _CACHE:
        base = train_tokenizer(_corpus(400), vocab_size=400)
        _CACHE["tok"] = base
        _CACHE["trimmed"] = trim_tokenizer(base, _corpus(100, seed=1), keep=300)[0]
    return _CACHE["tok"]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_trimmed_roundtrip_any_unicode(text):
    _roundtrip_tok()
    trimmed = _CACHE["trimmed"]
    assert trimmed.decode(trimmed.encode(text)) == text


def test_autotokenizer_encodes_identically(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = _corpus(20, seed=3) + ["", "  leading spaces", "tabs\tand\nnewlines\n\n", "<s>inside</s> specials",
                                   "unseen: Ωμέγα ß ∑ 中文 \U0001F680", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, False)


def test_stats_against_direct_counts(tok):
    texts = _corpus(50, seed=5) + ["unseen characters 中文 Ωμέγα"]
    stats = tokenizer_stats(tok, texts)
    ids = [i for t in texts for i in tok.encode(t)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert stats["tokens"] == len(ids) and stats["bytes"] == n_bytes
    assert stats["bytes_per_token"] == pytest.approx(n_bytes / len(ids))
    assert stats["tokens_per_word"] == pytest.approx(len(ids) / sum(len(t.split()) for t in texts))
    assert stats["coverage"] == pytest.approx(len(set(ids)) / tok.vocab_size)
    # a lone non-ASCII byte decodes to U+FFFD: that is what byte_fallback_rate counts
    partial = sum(1 for i in ids if "\ufffd" in tok.decode([i]))
    assert partial > 0 and stats["byte_fallback_rate"] == pytest.approx(partial / len(ids))
    assert stats["unk_rate"] == 0.0


def _check_trim(tok: Tokenizer, corpus: list[str], probe: list[str], keep: int) -> None:
    """The trim invariants: size, bytes and specials kept, merges closed, identical tokenisation up to
    renumbering for texts whose old tokens are all kept, round-trips."""
    trimmed, kept = trim_tokenizer(tok, corpus, keep)
    assert trimmed.vocab_size == len(kept) == keep and kept == sorted(set(kept))
    old_vocab = tok.backend.get_vocab()
    assert {old_vocab[ch] for ch in bytes_to_unicode() if ch in old_vocab} <= set(kept)
    spec = json.loads(trimmed.backend.to_str())
    old_added = json.loads(tok.backend.to_str())["added_tokens"]
    assert {a["content"] for a in spec["added_tokens"]} == {a["content"] for a in old_added}
    new_vocab = spec["model"]["vocab"]
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        assert left in new_vocab and right in new_vocab and left + right in new_vocab
    new_of = {old: new for new, old in enumerate(kept)}
    checked = 0
    for text in probe:
        old = tok.encode(text)
        if all(i in new_of for i in old):
            assert trimmed.encode(text) == [new_of[i] for i in old], text
            checked += 1
        assert trimmed.decode(trimmed.encode(text)) == text
    assert checked >= len(probe) // 4  # the invariant was exercised, not skipped
    assert trimmed.bos_id == new_of[tok.bos_id] and trimmed.eos_id == new_of[tok.eos_id]


def _probes(corpus: list[str]) -> list[str]:
    """Short phrases of the corpus (whole documents rarely use only kept tokens) and unseen text."""
    words = [w for text in corpus[:50] for w in text.split()]
    return [" ".join(words[i:i + 3]) for i in range(0, len(words) - 3, 7)] + ["unseen 中文 Ωμέγα"]


def test_trim_trained_tokenizer(tok):
    corpus = _corpus(200, seed=7)
    _check_trim(tok, corpus, _probes(corpus), keep=330)
    with pytest.raises(TinylmError):
        trim_tokenizer(tok, corpus, keep=100)  # below the 256 bytes + 5 specials


@needs_smollm2
def test_trim_smollm2_tokenizer():
    from tinylm.formats import checkpoint

    tok = checkpoint.load_tokenizer("smollm2-135m")
    corpus = _corpus(300, seed=9)
    _check_trim(tok, corpus, _probes(corpus), keep=1500)


def test_cli_train_stats_trim(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_corpus(300, seed=11)) + "\n")
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "350", "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size <= 350 and tok.chat_template
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "350", "--out", str(tmp_path / "tok")]) == 2
    capsys.readouterr()
    assert main(["tokenizer", "stats", str(tmp_path / "tok"), "--corpus", str(corpus)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 300 and stats["bytes_per_token"] > 1
    assert main(["tokenizer", "trim", str(tmp_path / "tok"), "--corpus", str(corpus), "--keep", "300",
                 "--out", str(tmp_path / "small")]) == 0
    token_map = json.loads((tmp_path / "small" / "token_map.json").read_text())
    assert token_map["old_vocab_size"] == tok.vocab_size and len(token_map["kept"]) == 300
    assert Tokenizer.load(tmp_path / "small").vocab_size == 300
    assert main(["tokenizer", "trim", str(tmp_path / "tok"), "--corpus", str(corpus), "--keep", "10",
                 "--out", str(tmp_path / "tiny")]) == 2
    assert not (tmp_path / "tiny").exists()
