"""What `tinylm synth` asks a teacher, and the checks its answers must pass (the generation is stages/synth.py).

Prompts are drawn per row from `random.Random(f"{seed}:{index}")`, so row `index`'s prompt does not depend on
any other row, and a resumed run draws the same prompts:

* stories: TinyStories' recipe (Eldan & Li 2023, arXiv:2305.07759, section 2): a verb, a noun and an adjective
  a small child knows (the TinyTales word classes of `data.tasks.tinytales_instruct`) and one or two features
  (dialogue, a twist, a moral, a bad ending, foreshadowing) the story must have;
* instructions: self-instruct (Wang et al. 2022, arXiv:2212.10560): three seed tasks shown, a new task asked
  for, then answered in a second question;
* rationales: distilling step-by-step (Hsieh et al. 2023, arXiv:2305.02301): a word problem with a known
  answer, answered with step-by-step reasoning and a last line "Answer: N" (the answer is checked).

Checks (a row failing one is rejected, counted by its reason): the seed words appear in any inflection
(`forms`), a story's words are simple (a share in the TinyTales vocabulary, inflections included), length in
words, an exact or near (MinHash, `data.dedup.NearDedup`) duplicate of an accepted row, a wrong or missing
answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from typing import Any

from tinylm.data import tinytales as T
from tinylm.data.tasks import tinytales_instruct as TI
from tinylm.data.tinytales import words as W

KINDS = ("stories", "instructions", "rationales", "pairs")
FEATURES = {  # TinyStories-Instruct's features, as the instruction states them
    "dialogue": "at least one line of dialogue in quotes",
    "twist": "a plot twist",
    "moral": "a moral, a lesson the story teaches",
    "bad ending": "a bad ending",
    "foreshadowing": "foreshadowing, a hint early on of what happens later",
}
SEED_TASKS = (  # self-instruct's seed tasks, kept simple for small students
    "Give three tips for staying healthy.", "Explain why the sky is blue in two sentences.",
    "Write a short poem about a cat.", "List four fruits that are red.", "Turn this sentence into a question: "
    "The dog is sleeping.", "Tell me a fun fact about the moon.", "Name three things you can find in a kitchen.",
    "Describe a rainy day in one sentence.", "What is the opposite of 'happy'?", "Sort these numbers from "
    "small to big: 7, 2, 9, 4.", "Suggest a name for a friendly robot.", "Explain what a noun is to a child.",
)
ANSWER = re.compile(r"answer\s*:\s*\$?(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)


def row_rng(seed: int, index: int) -> random.Random:
    """The random source of row `index`'s prompt."""
    return random.Random(f"{seed}:{index}")


def _pick(rng: random.Random, words: frozenset[str]) -> str:
    return rng.choice(sorted(words))


def story_prompt(rng: random.Random) -> dict[str, Any]:
    """A TinyStories-style instruction: {"prompt", "seeds": {"verb", "noun", "adjective"}, "features"}."""
    seeds = {"verb": _pick(rng, TI.VERBS), "noun": _pick(rng, TI.NOUNS), "adjective": _pick(rng, TI.ADJECTIVES)}
    features = rng.sample(sorted(FEATURES), rng.choice((1, 2)))
    prompt = ("Write a short story (3-5 paragraphs) that uses only very simple words a 3 year old child would "
              f"understand. The story should use the verb \"{seeds['verb']}\", the noun \"{seeds['noun']}\" and "
              f"the adjective \"{seeds['adjective']}\". The story should have {' and '.join(FEATURES[f] for f in features)}. "
              "Remember to only use simple words! Write only the story.")
    return {"prompt": prompt, "seeds": seeds, "features": features}


def instruction_prompt(rng: random.Random) -> dict[str, Any]:
    """A self-instruct question: {"prompt", "seeds": {"tasks": the three examples}, "features": []}."""
    shown = rng.sample(SEED_TASKS, 3)
    listed = "\n".join(f"{i}. {t}" for i, t in enumerate(shown, 1))
    prompt = (f"Here are some tasks people ask a helpful assistant:\n{listed}\nWrite one new task of the same kind, "
              "different from these. Reply with the task only.")
    return {"prompt": prompt, "seeds": {"tasks": shown}, "features": []}


def word_problem(rng: random.Random) -> dict[str, Any]:
    """A one-step word problem with its answer: {"prompt", "seeds": {"question", "gold"}, "features": []}."""
    name, thing = rng.choice(W.GIRL_NAMES + W.BOY_NAMES), rng.choice(W.TOYS + W.FOODS)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    op = rng.choice(("more", "less", "times"))
    if op == "more":
        q, gold = f"{name} has {a} {thing}s and gets {b} more. How many {thing}s does {name} have now?", a + b
    elif op == "less":
        q, gold = f"{name} has {a + b} {thing}s and gives {b} away. How many {thing}s are left?", a
    else:
        q, gold = f"{name} has {a} boxes with {b} {thing}s in each box. How many {thing}s are there?", a * b
    prompt = f"{q}\nThink step by step, then write the final answer on a last line as \"Answer: N\"."
    return {"prompt": prompt, "seeds": {"question": q, "gold": gold}, "features": []}


PROMPTS = {"stories": story_prompt, "instructions": instruction_prompt, "rationales": word_problem,
           "pairs": story_prompt}


def content_id(kind: str, prompt: str, text: str) -> str:
    """A row's key: the first 16 hex digits of the SHA-256 of its kind, prompt and text."""
    return hashlib.sha256(json.dumps([kind, prompt, text]).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def simple_words() -> frozenset[str]:
    """The TinyTales vocabulary with every word's inflections (what a small child's story may use)."""
    return frozenset(f for w in T.VOCABULARY for f in TI.forms(w))


def simple_share(text: str) -> float:
    """The share of `text`'s words in `simple_words` (1.0 for a text without words)."""
    words = TI.story_words(text)
    return sum(w in simple_words() for w in words) / len(words) if words else 1.0


def missing_seeds(seeds: dict[str, str], text: str) -> list[str]:
    """The seed words of which `text` has no inflection."""
    have = set(TI.story_words(text))
    return [w for w in seeds.values() if not have & TI.forms(w)]


def final_answer(text: str) -> float | None:
    """The number on the rationale's last "Answer: N" line, or None."""
    found = ANSWER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def reject_reason(kind: str, item: dict[str, Any], text: str, min_words: int, max_words: int,
                  min_simple: float, seed_words: bool) -> str | None:
    """Why the teacher's `text` for `item` (a PROMPTS dict) is rejected, or None (duplicates are checked later).

    Args:
        kind: one of KINDS.
        item: the row's prompt, seeds and features.
        text: the teacher's answer.
        min_words, max_words: the length filter, in words.
        min_simple: stories: the least share of simple words.
        seed_words: stories: the seed words must appear.
    """
    n = len(text.split())
    if n < min_words:
        return "too short"
    if n > max_words:
        return "too long"
    if kind in ("stories", "pairs"):
        if seed_words and missing_seeds(item["seeds"], text):
            return "missing seed word"
        if "dialogue" in item["features"] and seed_words and not TI.has_dialogue(text):
            return "no dialogue"
        if simple_share(text) < min_simple:
            return "not simple"
    if kind == "rationales":
        answer = final_answer(text)
        if answer is None:
            return "no answer line"
        if answer != item["seeds"]["gold"]:
            return "wrong answer"
    return None


def checker_points(item: dict[str, Any], text: str) -> float:
    """How well a story meets its prompt, to rank a pair without a judge: seed words present, dialogue when
    asked, and the share of simple words."""
    points = len(item["seeds"]) - len(missing_seeds(item["seeds"], text)) + simple_share(text)
    return points + ("dialogue" in item["features"] and TI.has_dialogue(text))
