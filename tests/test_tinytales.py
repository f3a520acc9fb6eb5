"""Tests of the TinyTales corpus generator and its validator (tinylm/tinytales.py)."""

from __future__ import annotations

import lzma
import math
import random
import re
from collections import Counter

import pytest

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data import tinytales as T
from tinylm.data.tinytales.plots import Maybe

N = 10_000


@pytest.fixture(scope="module")
def stories() -> list[T.Story]:
    rng = random.Random(1234)
    return [T.generate_story(rng) for _ in range(N)]


def test_every_story_passes_its_own_validator(stories):
    result = T.check_many(s.text for s in stories)
    assert result.n_sentences > 10 * N
    assert result.fraction == 1.0 and result.consistent, result.problems


def test_stories_are_distinct_and_sized(stories):
    texts = [s.text for s in stories]
    assert len(set(texts)) >= 0.99 * N
    words = [len(t.split()) for t in texts]
    assert 60 <= min(words) and max(words) <= 300


def test_plain_ascii_one_line_stories(stories):
    for s in stories[:1000]:
        assert s.text.isascii() and "\n" not in s.text and s.text.count('"') % 2 == 0


def test_vocabulary_and_skeletons_are_used(stories):
    used = {w.lower() for s in stories for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", s.text)}
    assert used <= T.VOCABULARY
    names = {n.lower() for ns in T.GRAMMAR.names for n in ns}
    assert len(used - names) >= 1500  # words a child knows, not counting names
    assert Counter(s.skeleton for s in stories).keys() == set(T.SKELETONS)


def test_deterministic_for_a_seed():
    assert list(T.generate(50, seed=7)) == list(T.generate(50, seed=7))
    assert list(T.generate(50, seed=7)) != list(T.generate(50, seed=8))


def _toy_grammar() -> T.Grammar:
    skeletons = {
        "a": [("{A} had a {toy}.", "{A} lost a {toy}."), Maybe(0.25, ("{A:He} smiled.",))],
        "b": [("{A} and {B} met.",)],
    }
    return T.Grammar({"toy": ("ball", "apple")}, (("Ann", "Eve"), ("Bob", "Dan")), skeletons)


def test_bits_are_exact_log_probabilities_on_a_toy_grammar():
    # Every toy text has one derivation, so 2^-bits is its exact probability: the probabilities of
    # all texts sum to 1 and match the observed frequencies.
    rng, grammar, n = random.Random(0), _toy_grammar(), 40_000
    counts, bits = Counter(), {}
    for _ in range(n):
        story = T.generate_story(rng, grammar)
        counts[story.text] += 1
        assert bits.setdefault(story.text, story.bits) == story.bits
    # skeleton a: 2 genders x 2 names x 2 passages x 2 toys x (moral or not); b: 4 x 3 name pairs
    assert len(counts) == 32 + 12
    assert sum(2.0 ** -b for b in bits.values()) == pytest.approx(1.0, abs=1e-12)
    for text, c in counts.items():
        p = 2.0 ** -bits[text]
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, text
    assert "Eve had an apple." in counts  # the article rule


def test_entropy_bound_is_reported_and_below_lzma():
    stats = T.corpus_stats(3000, seed=5)
    text = "".join(t + T.SEPARATOR for t in T.generate(3000, seed=5)).encode()
    assert stats["bytes"] == len(text) and stats["stories"] == 3000
    assert stats["words"] == len(text.split())
    # Both are upper bounds on the entropy rate; the exact derivation count must be far tighter
    # than a general-purpose compressor, yet above the skeleton-choice floor.
    lzma_bpb = 8 * len(lzma.compress(text, preset=9)) / len(text)
    floor = 3000 * (math.log2(len(T.SKELETONS)) + 1) / len(text)
    assert floor < stats["bits_per_byte"] < lzma_bpb
    words = {w.lower() for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text.decode())}
    assert stats["distinct_words"] == len(words)


def _swap_pronouns(text: str) -> str:
    swap = {"he": "she", "she": "he", "He": "She", "She": "He", "his": "her", "her": "his",
            "His": "Her", "Her": "His", "him": "her", "himself": "herself", "herself": "himself"}
    return re.sub(r"\b[A-Za-z]+\b", lambda m: swap.get(m.group(), m.group()), text)


def test_swapped_pronouns_are_inconsistent(stories):
    for s in stories[:200]:
        result = T.check(_swap_pronouns(s.text))
        assert not result.consistent, s.text
        assert any("inconsistent" in p for p in result.problems)


_ALL_NAMES = set(T.GRAMMAR.names[0] + T.GRAMMAR.names[1])


def _names_in(text: str) -> list[str]:
    return list(dict.fromkeys(w for w in re.findall(r"[A-Z][a-z]+", text) if w in _ALL_NAMES))


def test_one_swapped_pronoun_is_inconsistent(stories):
    # In stories with a single character, flip the gender of the last pronoun only.
    flip = {"he": "she", "she": "he", "He": "She", "She": "He", "his": "her", "His": "Her",
            "him": "her", "her": "his"}
    solo = [s.text for s in stories if len(_names_in(s.text)) == 1][:200]
    assert len(solo) == 200
    inconsistent = 0
    for text in solo:
        m = list(re.finditer(r"\b(" + "|".join(flip) + r")\b", text))[-1]
        result = T.check(text[:m.start()] + flip[m.group()] + text[m.end():])
        assert result.fraction < 1.0 or not result.consistent  # "her" -> "him" may be ungrammatical
        inconsistent += not result.consistent
    assert inconsistent >= 0.8 * len(solo)


def test_a_second_name_for_the_hero_is_inconsistent(stories):
    for s in stories[:200]:
        hero = _names_in(s.text)[0]
        same_gender = T.GRAMMAR.names[0] if hero in T.GRAMMAR.names[0] else T.GRAMMAR.names[1]
        other = next(n for n in same_gender if n not in s.text.split())
        head, tail = s.text.split(". ", 1)  # keep the introduction, rename the hero afterwards
        result = T.check(head + ". " + re.sub(rf"\b{hero}\b", other, tail))
        assert result.fraction == 1.0 and not result.consistent, s.text


def _shuffle_sentences(text: str, rng: random.Random) -> str:
    out = []
    for sentence in re.findall(r'[^.!?]+[.!?]"?', text):
        words = sentence.strip()[:-1].split()
        rng.shuffle(words)
        out.append(" ".join(words) + sentence.strip()[-1])
    return " ".join(out)


def test_shuffled_words_are_rejected(stories):
    rng = random.Random(0)
    result = T.check_many(_shuffle_sentences(s.text, rng) for s in stories[:300])
    assert result.n_sentences > 1000 and result.fraction < 0.1


def test_random_english_is_rejected():
    text = ("The committee approved the budget yesterday. Stock prices fell sharply in the morning. "
            "Please restart your computer to finish the update. She had a red ball. "
            "Lily went to the park to play tennis. He was a kind boy named Lily.")
    result = T.check(text)
    assert result.n_sentences == 6 and result.n_valid == 0
    assert "not in the grammar" in result.problems[0]


def test_articles_must_agree(stories):
    text = stories[0].text
    bad = re.sub(r"\ban\b", "a", text) if " an " in text else re.sub(r"\ba (\w)", r"an \1", text, count=1)
    assert T.check(bad).fraction < 1.0


def test_truncated_last_sentence_is_ignored(stories):
    text = stories[0].text
    full = T.check(text)
    cut = T.check(text[: text.rstrip(".!?\"").rfind(" ")])  # ends mid-sentence
    assert cut.fraction == 1.0 and cut.consistent
    assert cut.n_sentences == full.n_sentences - 1
    assert T.check("").n_sentences == 0 and T.check("").fraction == 1.0


def test_check_many_adds_up(stories):
    texts = [s.text for s in stories[:20]]
    one = T.check("\n\n".join(texts))
    many = T.check_many(texts)
    assert (one.n_sentences, one.n_valid) == (many.n_sentences, many.n_valid)


def test_write_corpus_and_errors(tmp_path):
    path = tmp_path / "tt.txt"
    stats = T.write_corpus(path, 30, seed=3)
    data = path.read_text()
    assert data.split(T.SEPARATOR)[:-1] == list(T.generate(30, seed=3))
    assert stats["bytes"] == len(data.encode())
    with pytest.raises(TinylmError):
        T.write_corpus(path, 30, seed=3)
    with pytest.raises(TinylmError):
        T.write_corpus(tmp_path / "new.txt", 0)
    assert not (tmp_path / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tt.txt"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "c.txt"
    assert main(["data", "tinytales", "--stories", "20", "--seed", "1", "--out", str(out), "--stats"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert out.read_text().split(T.SEPARATOR)[:-1] == list(T.generate(20, seed=1))
    assert main(["data", "tinytales", "--stories", "20", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["data", "tinytales", "--stories", "20", "--out", str(out), "--overwrite"]) == 0
    assert main(["data", "tinytales", "--stories", "0", "--stats"]) == 2
    assert main(["data", "tinytales", "--stories", "3", "--seed", "2"]) == 0
    assert capsys.readouterr().out.split(T.SEPARATOR)[:-1] == list(T.generate(3, seed=2))
