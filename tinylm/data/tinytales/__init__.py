"""TinyTales: a built-in, seeded, procedural corpus of short stories in simple English.

In the spirit of TinyStories (Eldan & Li 2023, arXiv:2305.07759): stories a small child could follow,
built from a small grammar so that a 1-5M parameter model can learn it in minutes on a CPU, and so
that its samples can be scored exactly with `check`.

The grammar
-----------
A story follows one of `SKELETONS` (lost and found, sharing, a new friend, a fear overcome, ...): a
list of beats, each a tuple of alternative passages (one drawn uniformly) or `Maybe(p, passages)`
(an optional beat, e.g. the moral). Passages are sentences with slots:

* `{A}`, `{B}`: the names of the hero and of a second character. A character's gender and name are
  drawn the first time the story needs them and stay fixed for the whole story.
* `{A:he}`, `{A:He}`, `{A:his}`, `{A:His}`, `{A:him}`, `{A:himself}`, `{A:boy}`: that character's
  pronouns (written in their masculine form, rendered in the character's gender).
* `{toy}`, `{food2}`, ...: a word of a word class (`tinylm._tinytales_words`), drawn once per story
  and slot name, so "the {toy}" is the same toy all story long.

Every filler is one word, "a" becomes "an" before a vowel, and only ASCII punctuation is used.

Corpus file format: every story is one line of text followed by a blank line (story + "\\n\\n").

Entropy bound
-------------
Each story carries `bits`, -log2 of the probability of its derivation (the sequence of random
choices that made it): a uniform choice among n options costs log2(n) bits, a `Maybe(p)` beat costs
-log2(p) if told and -log2(1-p) if not. A text may have several derivations, so
P(text) = sum over its derivations >= P(derivation), hence -log2 P(text) <= bits, and
H = E[-log2 P(text)] <= E[bits]. `corpus_stats` divides the summed bits by the summed UTF-8 bytes,
separators included (they carry no information), so `bits_per_byte` is an upper bound on the
entropy rate of the corpus: the floor that a perfect model's loss approaches from above.

Validation
----------
`check(text)` splits any text into stories (blank lines) and sentences (after . ! or ?, and the
closing quote after it), ignores a truncated last sentence, and matches each sentence against every
sentence template with each slot accepting any word of its class (a token trie, about 2 MB/s). It
tracks the hero (A) and the second character (B) across the story: each keeps one name and gender,
pronouns must agree, and a pronoun needs its character introduced first.

The word lists live in `tinylm/_tinytales_words.py`, the skeletons in `tinylm/_tinytales_plots.py`.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Iterator, TextIO

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file
from tinylm.data.tinytales import words as W
from tinylm.data.tinytales.plots import SKELETONS as _SKELETONS
from tinylm.data.tinytales.plots import Beat, Maybe

SEPARATOR = "\n\n"  # written after every story


ROLES = ("A", "B")


# pronoun form -> (feminine, masculine); gender 0 is a girl, 1 a boy.
PRONOUNS: dict[str, tuple[str, str]] = {
    "he": ("she", "he"), "He": ("She", "He"), "his": ("her", "his"), "His": ("Her", "His"),
    "him": ("her", "him"), "himself": ("herself", "himself"), "boy": ("girl", "boy"),
}


CLASSES: dict[str, tuple[str, ...]] = {
    "animal": W.ANIMALS, "toy": W.TOYS, "food": W.FOODS, "place": W.PLACES, "nature": W.NATURE,
    "adj": W.ADJECTIVES, "kind": W.KINDS, "color": W.COLORS, "act": W.ACTS, "adv": W.ADVERBS,
    "family": W.FAMILY, "job": W.JOBS, "clothes": W.CLOTHES, "furn": W.FURNITURE,
    "vehicle": W.VEHICLES, "instrument": W.INSTRUMENTS, "body": W.BODY, "tool": W.TOOLS,
    "sea": W.SEA, "age": W.AGES, "num": W.NUMBERS, "weather": W.WEATHER, "shape": W.SHAPES,
    "game": W.GAMES, "sweet": W.SWEETS, "sound": W.SOUNDS, "flower": W.FLOWERS,
    "taste": W.TASTES, "sad": W.SAD_FEELINGS, "glad": W.GLAD_FEELINGS, "good": W.GOOD,
}


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so the compiled index can be cached
class Grammar:
    """Word classes, names and plot skeletons. `GRAMMAR` is the built-in one.

    Args:
        classes: slot class -> its words (a slot `{toy2}` uses class "toy").
        names: (girl names, boy names), disjoint, at least two of each.
        skeletons: skeleton name -> its beats.
    """

    classes: dict[str, tuple[str, ...]]
    names: tuple[tuple[str, ...], tuple[str, ...]]
    skeletons: dict[str, list[Beat]]


GRAMMAR = Grammar(CLASSES, (W.GIRL_NAMES, W.BOY_NAMES), _SKELETONS)


SKELETONS: tuple[str, ...] = tuple(_SKELETONS)


@dataclass
class Story:
    """One generated story: its text, -log2 P(derivation) in bits, and its skeleton's name."""

    text: str
    bits: float
    skeleton: str


# ----- generation --------------------------------------------------------------------------------

_SLOT = re.compile(r"\{([A-Za-z]+\d*)(?::([A-Za-z]+))?\}")


_ARTICLE = re.compile(r"\b([Aa]) (?=[AEIOUaeiou])")


class _Draw:
    """A random source that adds up -log2 of the probability of every choice it makes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.bits = rng, 0.0

    def pick(self, options: tuple | list):
        """A uniform choice among len(options): log2(n) bits."""
        self.bits += math.log2(len(options))
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        """True with probability p: -log2 p bits if true, -log2 (1-p) if false."""
        hit = self.rng.random() < p
        self.bits -= math.log2(p if hit else 1.0 - p)
        return hit


@lru_cache(maxsize=None)
def _parse(passage: str) -> tuple:
    """Split a passage into literal strings and (slot, form) pairs, once per passage."""
    parts, pos = [], 0
    for m in _SLOT.finditer(passage):
        parts += [passage[pos:m.start()], (m.group(1), m.group(2))]
        pos = m.end()
    parts.append(passage[pos:])
    return tuple(p for p in parts if p != "")


def _bind_role(role: str, draw: _Draw, roles: dict, grammar: Grammar) -> tuple[int, str]:
    """Draw a new character's gender (1 bit) and a name not yet used in the story."""
    gender = draw.pick((0, 1))
    taken = {name for _, name in roles.values()}
    names = grammar.names[gender]
    roles[role] = (gender, draw.pick([n for n in names if n not in taken] if taken else names))
    return roles[role]


def _fill(slot: str, form: str | None, draw: _Draw, state: dict, grammar: Grammar) -> str:
    """The text of one slot; characters and words are drawn on first use, then reused."""
    if slot in ROLES:
        roles = state.setdefault("roles", {})
        gender, name = roles.get(slot) or _bind_role(slot, draw, roles, grammar)
        return name if form is None else PRONOUNS[form][gender]
    if slot not in state:
        state[slot] = draw.pick(grammar.classes[slot.rstrip("0123456789")])
    return state[slot]


def _render(passage: str, draw: _Draw, state: dict, grammar: Grammar) -> str:
    out = [p if isinstance(p, str) else _fill(*p, draw, state, grammar) for p in _parse(passage)]
    return _ARTICLE.sub(r"\1n ", "".join(out))


def generate_story(rng: random.Random, grammar: Grammar | None = None) -> Story:
    """Draw one story.

    Args:
        rng: the random source; the story is a deterministic function of its state.
        grammar: the grammar to draw from (default: the built-in `GRAMMAR`).
    """
    grammar = grammar or GRAMMAR
    draw, state, passages = _Draw(rng), {}, []
    name = draw.pick(tuple(grammar.skeletons))
    for beat in grammar.skeletons[name]:
        if isinstance(beat, Maybe):
            if not draw.chance(beat.p):
                continue
            beat = beat.options
        passages.append(_render(draw.pick(beat), draw, state, grammar))
    return Story(" ".join(passages), draw.bits, name)


def generate(n_stories: int, seed: int = 0) -> Iterator[str]:
    """Yield `n_stories` story texts, the same ones for the same seed.

    Args:
        n_stories: how many stories.
        seed: seed of the random.Random that draws them all, in order.
    """
    rng = random.Random(seed)
    for _ in range(n_stories):
        yield generate_story(rng).text


# ----- corpus files and statistics ---------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass
class _Tally:
    """Running corpus statistics (see `corpus_stats`)."""

    stories: int = 0
    bytes: int = 0
    words: int = 0
    bits: float = 0.0
    seconds: float = 0.0
    vocab: set = field(default_factory=set)

    def add(self, story: Story, seconds: float) -> None:
        self.stories += 1
        self.bytes += len(story.text.encode()) + len(SEPARATOR)
        self.words += len(story.text.split())
        self.bits += story.bits
        self.seconds += seconds
        self.vocab.update(w.lower() for w in _WORD.findall(story.text))

    def as_dict(self) -> dict:
        return {
            "stories": self.stories, "bytes": self.bytes, "words": self.words,
            "distinct_words": len(self.vocab), "bits": self.bits,
            "bits_per_byte": self.bits / max(self.bytes, 1),
            "mb_per_s": self.bytes / 1e6 / max(self.seconds, 1e-9),
        }


def _stories(n_stories: int, seed: int, tally: _Tally) -> Iterator[Story]:
    """Generate stories, timing only the generation itself into `tally` (checks n_stories now)."""
    if n_stories <= 0:
        raise TinylmError(f"the number of stories must be positive, got {n_stories}")
    return _timed_stories(n_stories, seed, tally)


def _timed_stories(n_stories: int, seed: int, tally: _Tally) -> Iterator[Story]:
    rng = random.Random(seed)
    for _ in range(n_stories):
        t0 = time.perf_counter()
        story = generate_story(rng)
        tally.add(story, time.perf_counter() - t0)
        yield story


def corpus_stats(n_stories: int, seed: int = 0) -> dict:
    """Generate a corpus in memory and measure it.

    Args:
        n_stories: how many stories.
        seed: the corpus seed.

    Returns:
        dict with stories, bytes (UTF-8, separators included), words (whitespace-separated),
        distinct_words (lowercased), bits (summed -log2 P(derivation)), bits_per_byte (an upper
        bound on the corpus entropy rate, see the module docstring) and mb_per_s (generation speed).
    """
    tally = _Tally()
    for _ in _stories(n_stories, seed, tally):
        pass
    return tally.as_dict()


def stream_corpus(out: TextIO, n_stories: int, seed: int = 0) -> dict:
    """Write stories to an open text stream, each followed by a blank line. Returns `corpus_stats`.

    Args:
        out: the stream (a file, sys.stdout).
        n_stories: how many stories.
        seed: the corpus seed.
    """
    tally = _Tally()
    for story in _stories(n_stories, seed, tally):
        out.write(story.text + SEPARATOR)
    return tally.as_dict()


def write_corpus(path: str | os.PathLike, n_stories: int, seed: int = 0,
                 overwrite: bool = False) -> dict:
    """Write a corpus file atomically: every story, then a blank line ("\\n\\n"). Returns its stats.

    Args:
        path: the output file.
        n_stories: how many stories.
        seed: the corpus seed.
        overwrite: replace an existing file.
    """
    with atomic_file(path, overwrite) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        return stream_corpus(f, n_stories, seed)  # a bad n_stories raises before the first write


def format_stats(stats: dict) -> str:
    """One line for people: stories, MB, distinct words, the entropy bound and generation speed."""
    return (f"{stats['stories']} stories, {stats['bytes'] / 1e6:.2f} MB, {stats['words']} words, "
            f"{stats['distinct_words']} distinct words, entropy <= {stats['bits_per_byte']:.4f} bits/byte, "
            f"generated at {stats['mb_per_s']:.2f} MB/s")


# ----- validation --------------------------------------------------------------------------------
# A sentence is valid when it matches a sentence of some passage, every slot matching any word of its
# class. The sentences of all passages are compiled into one trie over tokens, so a sentence is
# checked in time linear in its length (a regex alternation would try every template in turn).

_TEXT_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|[^\sA-Za-z]")


_TEMPLATE_TOKEN = re.compile(r"\{[^}]*\}|[A-Za-z]+(?:'[A-Za-z]+)?|[^\sA-Za-z]")


_ENDS = frozenset(".!?")


@dataclass
class CheckResult:
    """How much of a text the TinyTales grammar could have produced.

    Args:
        n_sentences: complete sentences seen (a final sentence without end punctuation is ignored).
        n_valid: sentences that match a sentence template of the grammar.
        consistent: every character keeps one name and one gender (names and pronouns agree).
        problems: the first few invalid sentences and inconsistencies.
    """

    n_sentences: int = 0
    n_valid: int = 0
    consistent: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Fraction of sentences that are valid (1.0 for a text without sentences)."""
        return self.n_valid / self.n_sentences if self.n_sentences else 1.0

    def note(self, problem: str, limit: int = 5) -> None:
        if len(self.problems) < limit:
            self.problems.append(problem)


def _split_sentences(tokens: list[str]) -> list[list[str]]:
    """Cut tokens after . ! or ? (and after the closing quote that follows it, if a quote is open).

    The unfinished tail (no end punctuation, or an unclosed quote) is dropped as truncated.
    """
    sentences, cur, quoted, pending = [], [], False, False
    for tok in tokens:
        closes = tok == '"' and quoted
        if pending and not closes:
            sentences.append(cur)
            cur, pending = [], False
        cur.append(tok)
        if tok == '"':
            quoted = not quoted
            if pending:
                sentences.append(cur)
                cur, pending = [], False
        elif tok in _ENDS:
            pending = True
    if pending and not quoted:
        sentences.append(cur)
    return sentences


def _normalize(tokens: list[str]) -> list[str] | None:
    """Fold "an" into "a" after checking the article agrees with the next word (None if not)."""
    out = list(tokens)
    for i, tok in enumerate(tokens):
        if tok in ("a", "A", "an", "An") and i + 1 < len(tokens):
            if (len(tok) == 2) != (tokens[i + 1][0] in "aeiouAEIOU"):
                return None
            out[i] = tok[0]
    return out


class _Node:
    __slots__ = ("lit", "slots", "ends")

    def __init__(self) -> None:
        self.lit: dict[str, _Node] = {}
        self.slots: dict[str, tuple[frozenset, _Node]] = {}
        self.ends: list[int] = []


@dataclass
class _Index:
    """The compiled grammar: a token trie plus, per template, where its character slots are."""

    root: _Node
    roles: list[list[tuple[int, str, str | None]]]  # template -> (position, role, pronoun form)
    gender: dict[str, int]  # name or pronoun -> 0 (girl) or 1 (boy)


def _slot_words(token: str, grammar: Grammar) -> frozenset:
    slot, form = _SLOT.fullmatch(token).groups()
    if slot in ROLES:
        return frozenset(PRONOUNS[form] if form else grammar.names[0] + grammar.names[1])
    return frozenset(grammar.classes[slot.rstrip("0123456789")])


def _insert(root: _Node, template: list[str], tid: int, grammar: Grammar) -> None:
    node = root
    for tok in template:
        if tok.startswith("{"):
            if tok not in node.slots:
                node.slots[tok] = (_slot_words(tok, grammar), _Node())
            node = node.slots[tok][1]
        else:
            node = node.lit.setdefault(tok, _Node())
    node.ends.append(tid)


def _template_sentences(grammar: Grammar) -> list[list[str]]:
    """Every distinct sentence template of every passage, as token lists."""
    passages = set()
    for beats in grammar.skeletons.values():
        for beat in beats:
            passages.update(beat.options if isinstance(beat, Maybe) else beat)
    seen = {}
    for passage in sorted(passages):
        for sent in _split_sentences(_TEMPLATE_TOKEN.findall(passage)):
            seen.setdefault(tuple(_normalize(sent) or sent), None)
    return [list(s) for s in seen]


@lru_cache(maxsize=8)
def _index(grammar: Grammar) -> _Index:
    root, roles = _Node(), []
    for tid, template in enumerate(_template_sentences(grammar)):
        _insert(root, template, tid, grammar)
        slots = [(i, *_SLOT.fullmatch(t).groups()) for i, t in enumerate(template) if t[0] == "{"]
        roles.append([s for s in slots if s[1] in ROLES])
    gender = {w: g for g in (0, 1) for w in grammar.names[g] + tuple(p[g] for p in PRONOUNS.values())}
    return _Index(root, roles, gender)


def _match(node: _Node, tokens: list[str], i: int, out: list[int]) -> None:
    """Append the ids of all templates that match tokens[i:] from this trie node."""
    if i == len(tokens):
        out.extend(node.ends)
        return
    tok = tokens[i]
    if tok in node.lit:
        _match(node.lit[tok], tokens, i + 1, out)
    for words, child in node.slots.values():
        if tok in words:
            _match(child, tokens, i + 1, out)


def _facts(index: _Index, tid: int, tokens: list[str]) -> list[tuple[str, int, object]]:
    """What a matched sentence says about characters, in text order: (role, 0, name) and
    (role, 1, gender) introduce or confirm a character; (role, 2, gender) is a pronoun, which needs
    the character to be known already."""
    facts = []
    for pos, role, form in index.roles[tid]:
        if form is None:
            facts.append((role, 0, tokens[pos]))
        kind = 2 if form not in (None, "boy") else 1
        facts.append((role, kind, index.gender[tokens[pos]]))
    return facts


def _agree(facts: list, roles: dict) -> dict | None:
    """The character table updated with `facts`, or None if they contradict it."""
    trial = {role: list(v) for role, v in roles.items()}
    for role, kind, value in facts:
        if kind == 2 and role not in trial:
            return None  # "she" for a character the story has not introduced
        known = trial.setdefault(role, [None, None])
        kind = min(kind, 1)
        if known[kind] is not None and known[kind] != value:
            return None
        known[kind] = value
    names = [v[0] for v in trial.values() if v[0] is not None]
    return trial if len(names) == len(set(names)) else None


def _check_story(story: str, index: _Index, result: CheckResult) -> None:
    roles: dict = {}
    for raw in _split_sentences(_TEXT_TOKEN.findall(story)):
        result.n_sentences += 1
        tokens, tids = _normalize(raw), []
        if tokens is not None:
            _match(index.root, tokens, 0, tids)
        if not tids:
            result.note("not in the grammar: " + " ".join(raw))
            continue
        result.n_valid += 1
        updated = next((t for t in (_agree(_facts(index, i, tokens), roles) for i in tids) if t), None)
        if updated is None:
            result.consistent = False
            result.note("inconsistent names or pronouns: " + " ".join(raw))
        else:
            roles = updated


def check(text: str, grammar: Grammar | None = None) -> CheckResult:
    """Score any text (e.g. a model's sample) against the TinyTales grammar.

    Stories are separated by blank lines; characters are tracked per story: the hero (role A) and
    the second character (B) each keep one name and gender, and a pronoun of theirs must agree.
    Sentences are compared token by token (words and punctuation), so spacing is not judged.

    Args:
        text: one or more stories.
        grammar: the grammar (default: the built-in `GRAMMAR`).
    """
    index, result = _index(grammar or GRAMMAR), CheckResult()
    for story in re.split(r"\n\s*\n", text):
        _check_story(story, index, result)
    return result


def check_many(texts: Iterable[str], grammar: Grammar | None = None) -> CheckResult:
    """`check` over several texts (each its own story or stories), summed into one result.

    Args:
        texts: the texts.
        grammar: the grammar (default: the built-in `GRAMMAR`).
    """
    total = CheckResult()
    for text in texts:
        one = check(text, grammar)
        total.n_sentences += one.n_sentences
        total.n_valid += one.n_valid
        total.consistent &= one.consistent
        for problem in one.problems:
            total.note(problem)
    return total


def _vocabulary(grammar: Grammar) -> frozenset[str]:
    """Every word (lowercased) the grammar can produce."""
    words = {w.lower() for ws in grammar.classes.values() for w in ws}
    words.update(n.lower() for ns in grammar.names for n in ns)
    words.update(w.lower() for pair in PRONOUNS.values() for w in pair)
    for template in _template_sentences(grammar):
        words.update(t.lower() for t in template if t[0].isalpha())
    words.add("an")
    return frozenset(words)


VOCABULARY: frozenset[str] = _vocabulary(GRAMMAR)
