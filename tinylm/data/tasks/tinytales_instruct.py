"""TinyTales-Instruct: "write a story that uses the words X, Y and Z and has ..." with gold TinyTales stories.

After TinyStories-Instruct (Eldan & Li 2023, arXiv:2305.07759, section 4.2), whose prompts list words a
story must use and features it must have. Here every feature is one the TinyTales generator
(`tinylm.data.tinytales`) really controls and `follows` can verify exactly:

* words: three words of the story (a verb, a noun and an adjective where the story has them); a story
  uses a word if it contains any inflection of it ("ran" for "run", "toys" for "toy", `forms`);
* dialogue: quoted speech (a pair of double quotes);
* a moral: a sentence that matches one of the grammar's moral lines ("Sharing makes everyone happy.");
* a character named X: the hero's name appears;
* a plot: every sentence comes from one skeleton's passages ("is about making a new friend").

The instruction spec is a JSON-able dict: {"words": [...], "dialogue": bool, "moral": bool, "name": str or
None, "plot": skeleton name or None}. The story must also be TinyTales: every sentence passes the
grammar's validator (`tinytales.check`) and names and pronouns agree.

Splits: an example is in the test split when the SHA-256 of its normalised instruction falls in one bucket of
ten (`split.in_test_split`), whatever the seed, so train and test never share an instruction.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

from tinylm.data import tinytales as T
from tinylm.data.tasks.split import in_test_split, normalise
from tinylm.data.tinytales import words as W
from tinylm.data.tinytales.plots import END, INTRO, SKELETONS, Maybe

# What each plot is about, for the instruction ("... and is about <description>").
PLOTS: dict[str, str] = {
    "lost_and_found": "losing a toy and finding it", "sharing": "sharing a treat with a friend",
    "new_friend": "making a new friend", "fear_of_the_dark": "being afraid of the dark",
    "rainy_day": "a rainy day", "snow_day": "a snow day", "pet_care": "caring for a pet",
    "helping_at_home": "helping at home", "a_trip": "a family trip", "birthday": "a birthday",
    "garden": "growing a flower", "bedtime": "not wanting to go to bed",
    "first_day_of_school": "the first day of school", "broken_toy": "fixing a broken toy",
    "lost_pet": "a lost pet", "the_race": "a race", "sick_friend": "a sick friend", "picnic": "a picnic",
    "beach_day": "a day at the beach", "zoo_visit": "getting lost at the zoo",
    "learning_to_ride": "learning to ride a bike", "making_music": "learning to play music",
    "painting": "painting a picture", "saying_sorry": "saying sorry", "surprise_gift": "making a surprise gift",
    "rescue": "rescuing an animal from a tree", "tidy_room": "tidying a messy room",
    "telling_the_truth": "telling the truth", "waiting": "waiting for a treat",
    "counting_stars": "counting the stars", "camping": "going camping",
    "lost_in_the_woods": "getting lost in the woods", "learning_to_swim": "learning to swim",
    "the_storm": "a storm", "bird_nest": "a bird that fell from its nest",
}

# Word classes that required words are drawn from, by part of speech (adverbs, numbers and names are not).
VERBS = frozenset(W.ACTS)
NOUNS = frozenset(W.ANIMALS + W.TOYS + W.FOODS + W.PLACES + W.NATURE + W.CLOTHES + W.FURNITURE + W.VEHICLES
                  + W.INSTRUMENTS + W.BODY + W.TOOLS + W.SEA + W.SWEETS + W.FLOWERS + W.JOBS + W.FAMILY)
ADJECTIVES = frozenset(W.ADJECTIVES + W.KINDS + W.COLORS + W.TASTES + W.FEELINGS + W.SAD_FEELINGS
                       + W.GLAD_FEELINGS)

# Irregular forms of the words the grammar uses (verbs of ACTS and of the passages, nouns, adjectives).
IRREGULAR: dict[str, tuple[str, ...]] = {
    "run": ("ran",), "swim": ("swam", "swum"), "sing": ("sang", "sung"), "ride": ("rode", "ridden"),
    "dig": ("dug",), "build": ("built",), "draw": ("drew", "drawn"), "fly": ("flew", "flown", "flies"),
    "hide": ("hid", "hidden"), "write": ("wrote", "written"), "sew": ("sewn",), "feed": ("fed",),
    "throw": ("threw", "thrown"), "dream": ("dreamt",), "spin": ("spun",), "swing": ("swung",),
    "slide": ("slid",), "seek": ("sought",), "make": ("made",), "fall": ("fell", "fallen"),
    "find": ("found",), "eat": ("ate", "eaten"), "go": ("went", "gone"), "see": ("saw", "seen"),
    "come": ("came",), "give": ("gave", "given"), "take": ("took", "taken"), "break": ("broke", "broken"),
    "get": ("got",), "sit": ("sat",), "say": ("said",), "tell": ("told",), "think": ("thought",),
    "bring": ("brought",), "catch": ("caught",), "hold": ("held",), "know": ("knew", "known"),
    "grow": ("grew", "grown"), "blow": ("blew", "blown"), "lose": ("lost",), "win": ("won",),
    "feel": ("felt",), "keep": ("kept",), "sleep": ("slept",), "leave": ("left",), "meet": ("met",),
    "hear": ("heard",), "stand": ("stood",), "wear": ("wore", "worn"), "begin": ("began", "begun"),
    "drink": ("drank", "drunk"), "knit": ("knitted",), "read": ("read",), "buy": ("bought",),
    "mouse": ("mice",), "goose": ("geese",), "foot": ("feet",), "tooth": ("teeth",), "leaf": ("leaves",),
    "wolf": ("wolves",), "shelf": ("shelves",), "calf": ("calves",), "knife": ("knives",),
    "good": ("better", "best"), "bad": ("worse", "worst"), "little": ("less", "least"),
}

_WORD = re.compile(r"[A-Za-z]+")


def forms(word: str) -> frozenset[str]:
    """The word and its inflections: plural / 3rd person (-s, -es, -ies), past (-ed, -d, -ied), -ing,
    comparative and superlative (-er, -est), with a doubled final consonant where English doubles it, and
    the irregular forms in IRREGULAR. Over-generation ("runned") is harmless: it only ever widens a match.

    Args:
        word: the base form, lowercase.
    """
    w, out = word.lower(), {word.lower(), *IRREGULAR.get(word.lower(), ())}
    stems = [w]
    if w.endswith("e"):
        stems.append(w[:-1])  # bake -> bak+ed / bak+ing
    if len(w) >= 3 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
        stems.append(w + w[-1])  # run -> runn+ing, big -> bigg+er
    if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        stems.append(w[:-1] + "i")  # happy -> happi+er, cry -> cri+ed
    out.update({w + "s", w + "es", w + "'s"})
    out.update(s + suffix for s in stems for suffix in ("ed", "ing", "er", "est", "es"))
    return frozenset(out)


def story_words(story: str) -> list[str]:
    """The story's words, lowercase, in order ("dog's" gives "dog" and "s")."""
    return [w.lower() for w in _WORD.findall(story)]


def sentences(story: str) -> list[str]:
    """The story cut into sentences as TinyTales' validator cuts it: after . ! or ?, or after the closing
    quote that follows one."""
    out, cur = [], []
    for word in story.split():
        cur.append(word)
        if word.rstrip('"')[-1:] in ".!?" and word.rstrip('"'):
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def _grammar(skeletons: dict[str, list]) -> T.Grammar:
    return T.Grammar(T.CLASSES, T.GRAMMAR.names, skeletons)


@lru_cache(maxsize=None)
def _plot_grammar(plot: str) -> T.Grammar:
    return _grammar({plot: SKELETONS[plot]})


MORALS = _grammar({"morals": [b for beats in SKELETONS.values() for b in beats if isinstance(b, Maybe)]})
FRAME = _grammar({"frame": [INTRO, END]})  # shared by every plot, so it tells no plot apart


def has_moral(story: str) -> bool:
    """Some sentence is one of the grammar's moral lines."""
    return T.check(story, MORALS).n_valid > 0


def has_dialogue(story: str) -> bool:
    """The story quotes someone: it holds a pair of double quotes."""
    return story.count('"') >= 2


def is_about(story: str, plot: str) -> bool:
    """Every sentence comes from the plot's passages, and some sentence is not from the shared intro and end."""
    mine, frame = T.check(story, _plot_grammar(plot)), T.check(story, FRAME)
    return mine.n_sentences > 0 and mine.n_valid == mine.n_sentences and frame.n_valid < frame.n_sentences


def names(story: str) -> list[str]:
    """The character names in the story, in order of first appearance (names are capitalised)."""
    known = set(T.GRAMMAR.names[0] + T.GRAMMAR.names[1])
    return list(dict.fromkeys(w for w in _WORD.findall(story) if w in known))


def follows(spec: dict[str, Any], story: str) -> tuple[bool, list[str]]:
    """Whether a story follows its instruction, and why not.

    Args:
        spec: the instruction: {"words": [...], "dialogue": bool, "moral": bool, "name": str or None,
            "plot": a key of PLOTS or None} (absent keys ask for nothing).
        story: the story to judge (a model's sample, say).

    Returns:
        (True, []) or (False, reasons): "missing word: X", "no dialogue", "no moral", "no character named X",
        "not about P", or the validator's problems ("not in the grammar: ...", "inconsistent names or
        pronouns: ...", "no complete sentence").
    """
    present = set(story_words(story))
    reasons = [f"missing word: {w}" for w in spec.get("words", ()) if not forms(w) & present]
    if spec.get("dialogue") and not has_dialogue(story):
        reasons.append("no dialogue")
    if spec.get("moral") and not has_moral(story):
        reasons.append("no moral")
    if spec.get("name") and spec["name"] not in names(story):
        reasons.append(f"no character named {spec['name']}")
    if spec.get("plot") and not is_about(story, spec["plot"]):
        reasons.append(f"not about {PLOTS[spec['plot']]}")
    result = T.check(story)
    if result.n_sentences == 0:
        reasons.append("no complete sentence")
    reasons += result.problems if result.n_valid < result.n_sentences or not result.consistent else []
    return not reasons, reasons


def instruction(spec: dict[str, Any]) -> str:
    """The prompt for a spec: "Write a story that uses the words run, ball and happy, has dialogue, has a
    moral, has a character named Lily and is about a picnic."
    """
    clauses = [f"uses the words {_and(spec['words'])}"]
    clauses += ["has dialogue"] * bool(spec.get("dialogue")) + ["has a moral"] * bool(spec.get("moral"))
    if spec.get("name"):
        clauses.append(f"has a character named {spec['name']}")
    if spec.get("plot"):
        clauses.append(f"is about {PLOTS[spec['plot']]}")
    return f"Write a story that {_and(clauses, ', ')}."


def _and(items: list[str], sep: str = ", ") -> str:
    return items[0] if len(items) == 1 else sep.join(items[:-1]) + " and " + items[-1]


# ----- drawing specs and examples ------------------------------------------------------------------

def draw_spec(story: T.Story, rng: random.Random) -> dict[str, Any]:
    """An instruction that `story` follows: three of its words (a verb, a noun and an adjective first), and
    each feature it has asked for with probability 1/2.

    Args:
        story: a generated TinyTales story.
        rng: the random source.
    """
    present = list(dict.fromkeys(w for w in story_words(story.text) if len(w) > 2))
    groups = [[w for w in present if w in pos] for pos in (VERBS, NOUNS, ADJECTIVES)]
    words: list[str] = []
    for group in groups:
        choices = [w for w in group if w not in words]
        if choices:
            words.append(rng.choice(choices))
    rest = [w for w in present if w not in words and any(w in pos for pos in (VERBS, NOUNS, ADJECTIVES))]
    words += rng.sample(rest, min(len(rest), 3 - len(words)))
    rng.shuffle(words)
    return {"words": words, "dialogue": has_dialogue(story.text) and rng.random() < 0.5,
            "moral": has_moral(story.text) and rng.random() < 0.5,
            "name": names(story.text)[0] if rng.random() < 0.5 else None,
            "plot": story.skeleton if rng.random() < 0.5 else None}


def _without_word(story: str, word: str, rng: random.Random) -> str | None:
    """The story with `word` swapped everywhere for another word of its class that the story lacks."""
    classes = [ws for ws in T.CLASSES.values() if word in ws]
    if not classes:
        return None
    present = set(story_words(story))
    pool = [w for w in rng.choice(classes) if w != word and not forms(w) & present and not forms(w) & forms(word)
            and (w[0] in "aeiou") == (word[0] in "aeiou")]  # the same sound keeps "a" / "an" right
    return re.sub(rf"\b{word}\b", rng.choice(pool), story) if pool else None


def _without_sentences(story: str, drop: Any) -> str:
    kept, quoted = [], False
    for s in sentences(story):
        inside = quoted or '"' in s
        quoted ^= s.count('"') % 2 == 1
        if not drop(s, inside):
            kept.append(s)
    return " ".join(kept)


def _renamed(story: str, name: str, rng: random.Random) -> str | None:
    gender = 0 if name in T.GRAMMAR.names[0] else 1
    taken = set(names(story))
    return re.sub(rf"\b{name}\b", rng.choice([n for n in T.GRAMMAR.names[gender] if n not in taken]), story)


def break_story(spec: dict[str, Any], story: str, rng: random.Random) -> tuple[str, str] | None:
    """A story that breaks the instruction for exactly one reason, made from the gold `story` by one edit:
    a required word swapped for another of its class, the moral or the dialogue removed, or the hero
    renamed. Returns (rejected story, the reason `follows` gives), or None if no edit breaks just one thing.

    Args:
        spec: the instruction, which `story` follows.
        story: the gold story.
        rng: the random source.
    """
    edits = [("word", w) for w in spec["words"]]
    edits += [("moral", None)] * bool(spec.get("moral")) + [("dialogue", None)] * bool(spec.get("dialogue"))
    edits += [("name", spec["name"])] * bool(spec.get("name"))
    rng.shuffle(edits)
    for kind, arg in edits:
        if kind == "word":
            bad, why = _without_word(story, arg, rng), f"missing word: {arg}"
        elif kind == "moral":
            bad, why = _without_sentences(story, lambda s, inside: T.check(s, MORALS).n_valid > 0), "no moral"
        elif kind == "dialogue":
            bad, why = _without_sentences(story, lambda s, inside: inside), "no dialogue"
        else:
            bad, why = _renamed(story, arg, rng), f"no character named {arg}"
        if bad and follows(spec, bad)[1] == [why]:  # an edit that also broke a sentence is not used
            return bad, why
    return None


def examples(n: int, split: str = "train", seed: int = 0, pairs: bool = False) -> list[dict[str, Any]]:
    """`n` examples of one split, the same for the same seed.

    Args:
        n: how many.
        split: "train" or "test" (disjoint: see `in_test_split`).
        seed: the seed of the stories and specs.
        pairs: preference pairs ({"prompt", "chosen", "rejected"} in chat form, with "reason": how the
            rejected story breaks the instruction) instead of SFT examples ({"messages"}); both carry "spec".
    """
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        story = T.generate_story(rng)
        spec = draw_spec(story, rng)
        prompt = instruction(spec)
        if in_test_split(prompt) != (split == "test") or normalise(prompt) in seen:
            continue
        user = [{"role": "user", "content": prompt}]
        if not pairs:
            out.append({"messages": user + [{"role": "assistant", "content": story.text}], "spec": spec})
        elif broken := break_story(spec, story.text, rng):
            out.append({"prompt": user, "chosen": [{"role": "assistant", "content": story.text}],
                        "rejected": [{"role": "assistant", "content": broken[0]}], "reason": broken[1], "spec": spec})
        else:
            continue
        seen.add(normalise(prompt))
    return out
