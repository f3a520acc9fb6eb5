"""LLM-as-judge: rubric grades and pairwise verdicts decoded under a JSON schema, and a calibration report.

Rubrics:

* tinystories: TinyStories' grading (Eldan & Li 2023, arXiv:2305.07759, section 3): a story's grammar,
  creativity, consistency with its beginning or instruction and plot, each 1-10, and an estimate of the
  writer's age group;
* instruction: an answer's instruction following, correctness, helpfulness and clarity, each 1-10;
* pairwise: which of two answers is better ("A", "B" or "tie"), asked in both orders, since judges favour
  one position (MT-Bench, Zheng et al. 2023, arXiv:2306.05685, section 3.3): a side wins only when both
  orders agree, else it is a tie.

Every grade is asked with the rubric's JSON schema: a local judge decodes under it (the engine's
constraint), an endpoint gets it as `response_format`; the reply is then validated against it, so every
score parses (an endpoint that ignores the schema is a one-line error, not a missing score).

`Judge(teacher, rubric).score(prompts, responses)` is the reward form: one float per (prompt, response), the
rubric's mean grade on 1-10 (GRPO's `--reward judge` calls it on a group's samples).

Calibration (`calibration_items`, `calibrate`): TinyTales stories that pass the validator, and the same
stories corrupted three ways (two characters' names swapped halfway, sentences shuffled, words dropped),
which the validator rejects. A judge that can be trusted grades each valid story above its corruption and
prefers it in a pairwise comparison; the report gives that agreement and a confusion table per corruption.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tinylm.core.errors import TinylmError
from tinylm.infer.teacher import Ask

SCALE = list(range(1, 11))  # every criterion is an integer 1-10, as in TinyStories' grading prompt
AGES = ["3 or under", "4-5", "6-7", "8-9", "10-12", "13-16"]  # TinyStories' age groups A-F
RUBRICS = ("tinystories", "instruction", "pairwise")
CRITERIA = {"tinystories": ("grammar", "creativity", "consistency", "plot"),
            "instruction": ("following", "correctness", "helpfulness", "clarity")}
VERDICTS = ("A", "B", "tie")
SYSTEM = "You are a strict, fair teacher who grades writing. Answer only with the JSON object asked for."


def schema(rubric: str) -> dict[str, Any]:
    """The JSON schema a grade of `rubric` is decoded under (properties in the order they are written)."""
    if rubric == "pairwise":
        props: dict[str, Any] = {"winner": {"enum": list(VERDICTS)}}
    else:
        props = {c: {"enum": SCALE} for c in CRITERIA[rubric]}
        if rubric == "tinystories":
            props["age"] = {"enum": AGES}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _keys(rubric: str) -> str:
    return ", ".join(f'"{k}"' for k in schema(rubric)["properties"])


def grade_messages(rubric: str, prompt: str, response: str) -> list[dict[str, str]]:
    """The judge's conversation for one graded response (tinystories or instruction rubric)."""
    if rubric == "tinystories":
        task = ("Below is the beginning or instruction a young student was given, and the story the student "
                "wrote. Grade the student's story for grammar, creativity, consistency with the beginning or "
                "instruction, and whether the plot makes sense, each from 1 (very poor) to 10 (excellent), and "
                f"guess the student's age group, one of: {', '.join(AGES)}.")
    else:
        task = ("Below is an instruction and an answer to it. Grade the answer for following the instruction, "
                "correctness, helpfulness and clarity, each from 1 (very poor) to 10 (excellent).")
    text = (f"{task}\n\n[Instruction or beginning]\n{prompt}\n\n[Answer]\n{response}\n\n"
            f"Reply with a JSON object with the keys {_keys(rubric)}.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def pair_messages(prompt: str, a: str, b: str) -> list[dict[str, str]]:
    """The judge's conversation comparing answer A with answer B to one prompt."""
    text = ("Below is an instruction and two answers to it, A and B. Which answer is better: more correct, more "
            "helpful, better written and truer to the instruction? Do not let the order or the length of the "
            f"answers sway you.\n\n[Instruction]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
            'Reply with a JSON object {"winner": "A"}, {"winner": "B"} or {"winner": "tie"}.')
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


@dataclass
class Judge:
    """A teacher model asked to grade.

    Args:
        teacher: anything with `answer(asks, on_done) -> list[str]` and a `name` (infer.teacher.LocalTeacher,
            serve.client.Endpoint).
        rubric: one of RUBRICS.
        max_tokens: the most tokens of one grade (a grade's JSON is about 40 tokens).
        seed: the judge's sampling seed (grades are greedy; the seed matters only to an endpoint that samples).
    """

    teacher: Any
    rubric: str = "tinystories"
    max_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rubric not in RUBRICS:
            raise TinylmError(f"unknown rubric {self.rubric!r}; choose one of {', '.join(RUBRICS)}")

    def grade(self, prompts: Sequence[str], responses: Sequence[str],
              on_done: Callable[[], object] | None = None) -> list[dict[str, Any]]:
        """Rubric grades of each (prompt, response): the criteria's scores, "age" (tinystories) and "overall",
        their mean.

        Args:
            prompts, responses: equally long.
            on_done: called after each grade.
        """
        if self.rubric == "pairwise":
            raise TinylmError("the pairwise rubric compares two answers: use `compare`")
        grades = self._asked([grade_messages(self.rubric, p, r) for p, r in zip(prompts, responses)], self.rubric,
                             on_done)
        for g in grades:
            g["overall"] = sum(g[c] for c in CRITERIA[self.rubric]) / len(CRITERIA[self.rubric])
        return grades

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                on_done: Callable[[], object] | None = None) -> list[dict[str, Any]]:
        """Pairwise verdicts, each pair asked in both orders: {"first_as_a": verdict with `first` shown as A,
        "first_as_b": verdict with `first` shown as B, "winner": "first" | "second" | "tie" (a side wins
        only when both orders agree), "consistent": both orders gave the same side or both a tie}.

        Args:
            prompts, first, second: equally long.
            on_done: called after each verdict (two per pair).
        """
        n = len(prompts)
        asks = [pair_messages(p, a, b) for p, a, b in zip(prompts, first, second)]
        asks += [pair_messages(p, b, a) for p, a, b in zip(prompts, first, second)]
        verdicts = [v["winner"] for v in self._asked(asks, "pairwise", on_done)]
        out = []
        for ab, ba in zip(verdicts[:n], verdicts[n:]):
            side_ab = {"A": "first", "B": "second"}.get(ab, "tie")
            side_ba = {"A": "second", "B": "first"}.get(ba, "tie")
            out.append({"first_as_a": ab, "first_as_b": ba, "winner": side_ab if side_ab == side_ba else "tie",
                        "consistent": side_ab == side_ba})
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response), for a reward: the rubric's mean grade on 1-10 (tinystories or
        instruction rubric; a pairwise judge has no score of one response: use `compare`).

        Args:
            prompts, responses: equally long lists of plain text.
        """
        if len(prompts) != len(responses):
            raise TinylmError(f"{len(prompts)} prompts and {len(responses)} responses: one response per prompt")
        return [g["overall"] for g in self.grade(prompts, responses)]

    def _asked(self, conversations: list[list[dict[str, str]]], rubric: str,
               on_done: Callable[[], object] | None) -> list[dict[str, Any]]:
        """The teacher's replies to `conversations` under `rubric`'s schema, parsed and validated."""
        from tinylm.infer.constrained import validate

        shape = schema(rubric)
        asks = [Ask(c, self.max_tokens, 0.0, self.seed, shape) for c in conversations]
        texts = self.teacher.answer(asks, on_done)
        try:
            return [validate(t, shape) for t in texts]
        except TinylmError as e:
            raise TinylmError(f"the judge {self.teacher.name} answered a grade outside the {rubric} schema "
                              f"({e}); an endpoint must honour response_format json_schema") from None


# ----- calibration on TinyTales ----------------------------------------------------------------------------

CORRUPTIONS = ("names swapped", "sentences shuffled", "words dropped")
_SENTENCE = re.compile(r"[^.!?]*[.!?]+[\"”]?\s*")


def _sentences(story: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(story) if s.strip()]


def corrupt(story: str, kind: str, rng: random.Random) -> str | None:
    """`story` corrupted one way (one of CORRUPTIONS), or None when it cannot be (one character only, one
    sentence).

    Args:
        story: a TinyTales story.
        kind: names swapped (the two characters' names exchanged from the middle sentence on), sentences
            shuffled (a new order), words dropped (a quarter of the words, at random).
        rng: the random source.
    """
    from tinylm.data.tasks.tinytales_instruct import names

    sentences = _sentences(story)
    if kind == "names swapped":
        who = names(story)[:2]
        if len(who) < 2 or len(sentences) < 2:
            return None
        half = len(sentences) // 2
        swap = {who[0]: who[1], who[1]: who[0]}
        tail = re.sub(rf"\b({who[0]}|{who[1]})\b", lambda m: swap[m.group(1)], " ".join(sentences[half:]))
        return " ".join(sentences[:half] + [tail])
    if kind == "sentences shuffled":
        if len(sentences) < 3:
            return None
        order = list(range(len(sentences)))
        while order == sorted(order):
            rng.shuffle(order)
        return " ".join(sentences[i] for i in order)
    if kind == "words dropped":
        words = story.split()
        drop = set(rng.sample(range(len(words)), max(1, len(words) // 4)))
        return " ".join(w for i, w in enumerate(words) if i not in drop)
    raise ValueError(f"unknown corruption {kind!r}")


def calibration_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` labelled stories: valid TinyTales stories and the same stories corrupted, in (valid, corrupted)
    pairs: [{"story", "label": "valid" or a corruption, "pair": index of the valid story}, ...].

    Args:
        n: valid stories (each gives one corrupted twin, the corruptions taken in turn).
        seed: the stories' and corruptions' seed.
    """
    from tinylm.data import tinytales

    rng, items, stories = random.Random(seed), [], tinytales.generate(10 * n + 10, seed)
    for story in stories:
        if len(items) == 2 * n:
            break
        kind = CORRUPTIONS[(len(items) // 2) % len(CORRUPTIONS)]
        check = tinytales.check(story)
        broken = corrupt(story, kind, rng)
        if broken is None or not check.consistent or check.n_valid != check.n_sentences:
            continue
        items += [{"story": story, "label": "valid", "pair": len(items)},
                  {"story": broken, "label": kind, "pair": len(items)}]
    return items


def calibrate(judge: Judge, items: list[dict[str, Any]], threshold: float = 6.0,
              on_done: Callable[[], object] | None = None) -> dict[str, Any]:
    """How far to trust `judge` on stories with known labels (from `calibration_items`).

    Rubric judges grade every story: a story is judged good when its overall grade >= `threshold`; the report
    gives the agreement of that call with the labels, the confusion table (label -> judged good / bad), and the
    pair agreement: the share of (valid, corrupted) pairs whose valid story has the higher grade (a tie counts
    half). A pairwise judge compares each pair in both orders; its agreement is the share of pairs where the
    valid story wins, its table label -> valid wins / tie / corrupted wins, with the orders' consistency.

    Args:
        judge: the judge.
        items: labelled stories in (valid, corrupted) pairs.
        threshold: a rubric grade at or above it calls a story good.
        on_done: called after each grade or verdict.
    """
    prompt = "Write a short story for young children."
    valid, broken = items[0::2], items[1::2]
    if judge.rubric == "pairwise":
        verdicts = judge.compare([prompt] * len(valid), [v["story"] for v in valid], [b["story"] for b in broken],
                                 on_done)
        table = {k: {"valid wins": 0, "tie": 0, "corrupted wins": 0} for k in CORRUPTIONS}
        for b, v in zip(broken, verdicts):
            table[b["label"]][{"first": "valid wins", "second": "corrupted wins"}.get(v["winner"], "tie")] += 1
        wins = sum(v["winner"] == "first" for v in verdicts)
        return {"rubric": "pairwise", "pairs": len(verdicts), "agreement": wins / max(1, len(verdicts)),
                "consistent": sum(v["consistent"] for v in verdicts) / max(1, len(verdicts)), "table": table}
    grades = judge.grade([prompt] * len(items), [i["story"] for i in items], on_done)
    table = {k: {"judged good": 0, "judged bad": 0} for k in ("valid", *CORRUPTIONS)}
    right = 0
    for item, g in zip(items, grades):
        good = g["overall"] >= threshold
        table[item["label"]]["judged good" if good else "judged bad"] += 1
        right += good == (item["label"] == "valid")
    ranked = [1.0 if a["overall"] > b["overall"] else 0.5 if a["overall"] == b["overall"] else 0.0
              for a, b in zip(grades[0::2], grades[1::2])]
    return {"rubric": judge.rubric, "items": len(items), "threshold": threshold,
            "agreement": right / max(1, len(items)), "pair_agreement": sum(ranked) / max(1, len(ranked)),
            "table": table}


def format_calibration(report: dict[str, Any]) -> str:
    """The calibration report as a markdown table and a summary line."""
    cols = list(next(iter(report["table"].values())))
    lines = [f"| label | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | {' | '.join(str(row[c]) for c in cols)} |" for label, row in report["table"].items()]
    if report["rubric"] == "pairwise":
        lines.append(f"agreement {report['agreement']:.1%} (valid story preferred in both orders) over "
                     f"{report['pairs']} pairs; orders consistent {report['consistent']:.1%}")
    else:
        lines.append(f"agreement {report['agreement']:.1%} (grade >= {report['threshold']:g} = good) over "
                     f"{report['items']} stories; pair agreement {report['pair_agreement']:.1%} (valid graded "
                     "above its corruption)")
    return "\n".join(lines)



# ----- a model's answers to grade ------------------------------------------------------------------------------

def model_answers(model: Any, rubric: str, n: int, max_tokens: int, temperature: float = 0.8,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a model asked `n` built-in prompts for `rubric`: tinystories: the beginnings
    (first two sentences) of TinyTales stories, continued by the model; instruction: the held-out
    TinyTales-Instruct instructions.

    Args:
        model: the model as a teacher (infer.teacher.LocalTeacher).
        rubric: tinystories or instruction.
        n: prompts.
        max_tokens: the most tokens of one answer.
        temperature: sampling temperature (each prompt seeded by `seed` and its index).
        seed: the prompts' and samples' seed.
    """
    from tinylm.data import tasks, tinytales

    if rubric == "pairwise":
        raise TinylmError("the pairwise rubric compares two answers: give a pairs JSONL file to judge")
    chat = bool(getattr(getattr(model, "tokenizer", None), "chat_template", None))
    if rubric == "tinystories":
        prompts = [" ".join(_sentences(s)[:2]) for s in tinytales.generate(n, seed)]
        questions = [f"Continue this story:\n{p}" if chat else p for p in prompts]
    else:
        rows = tasks.examples("tinytales-instruct", n, "test", seed)
        prompts = questions = [r["messages"][-2]["content"] for r in rows]
    asks = [Ask([{"role": "user", "content": q}], max_tokens, temperature, seed * 1_000_003 + i, None)
            for i, q in enumerate(questions)]
    return prompts, [a.strip() for a in model.answer(asks, None)]


def summary(grades: list[dict[str, Any]], rubric: str) -> dict[str, Any]:
    """The mean of each criterion and of the overall grade, and (tinystories) the age groups' counts."""
    keys = [*CRITERIA[rubric], "overall"]
    out: dict[str, Any] = {"n": len(grades), **{k: sum(g[k] for g in grades) / max(1, len(grades)) for k in keys}}
    if rubric == "tinystories":
        out["ages"] = {a: sum(g["age"] == a for g in grades) for a in AGES if any(g["age"] == a for g in grades)}
    return out
