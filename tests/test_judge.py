"""`tinylm judge` and evals/judge.py: grades decoded under the rubric's JSON schema (local and behind `tinylm
serve`), pairwise verdicts in both orders, the calibration items and report, the reward form, `eval --judge`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import chat_checkpoint, needs_smollm2, serving

from tinylm import cli
from tinylm.data import tinytales
from tinylm.data.tasks.tinytales_instruct import names as names_of
from tinylm.evals.judge import (
    AGES,
    CORRUPTIONS,
    CRITERIA,
    Judge,
    calibrate,
    calibration_items,
    corrupt,
)
from tinylm.formats.checkpoint import load
from tinylm.infer.teacher import LocalTeacher
from tinylm.serve.client import open_teacher

CONTEXT = 2048  # a pairwise prompt with two stories is ~1200 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return chat_checkpoint(list(tinytales.generate(200, 0)), tmp_path_factory.mktemp("judge") / "ck",
                           max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def local(ckpt) -> LocalTeacher:
    return LocalTeacher(load(ckpt), "tiny")


def _valid_grade(g: dict[str, Any], rubric: str) -> None:
    crits = CRITERIA[rubric]
    assert set(g) == {*crits, "overall", *(["age"] if rubric == "tinystories" else [])}, g
    assert all(isinstance(g[c], int) and 1 <= g[c] <= 10 for c in crits), g
    assert g["overall"] == sum(g[c] for c in crits) / len(crits)
    if rubric == "tinystories":
        assert g["age"] in AGES


STORIES = list(tinytales.generate(3, 5))


@pytest.mark.parametrize("rubric", ["tinystories", "instruction"])
def test_every_grade_of_a_random_weight_judge_parses(local, rubric):
    # a random model writes JSON only because it decodes under the schema
    grades = Judge(local, rubric).grade(["Write a story."] * 3, STORIES)
    for g in grades:
        _valid_grade(g, rubric)


def test_pairwise_verdicts_of_a_random_weight_judge_parse(local):
    verdicts = Judge(local, "pairwise").compare(["Write a story."] * 2, STORIES[:2], STORIES[1:3])
    for v in verdicts:
        assert v["first_as_a"] in ("A", "B", "tie") and v["first_as_b"] in ("A", "B", "tie")


class Scripted:
    """A judge whose replies come from `reply(messages) -> dict`; it records what it was asked."""

    name = "scripted"

    def __init__(self, reply: Any) -> None:
        self.reply, self.asked = reply, []

    def answer(self, asks: list[Any], on_done: Any = None) -> list[str]:
        self.asked += asks
        return [json.dumps(self.reply(a.messages[-1]["content"])) for a in asks]


def _answers(text: str) -> tuple[str, str]:
    a, b = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nReply", text, re.S).groups()
    return a, b


def test_pairwise_asks_both_orders_and_a_side_wins_only_when_both_agree():
    prompts, first, second = ["p1", "p2", "p3"], ["GOOD one", "meh", "GOOD x"], ["meh", "GOOD two", "GOOD y"]

    def by_content(text: str) -> dict[str, str]:
        a, b = _answers(text)
        return {"winner": "A" if "GOOD" in a and "GOOD" not in b else "B" if "GOOD" in b and "GOOD" not in a
                else "tie"}

    judge = Scripted(by_content)
    verdicts = Judge(judge, "pairwise").compare(prompts, first, second)
    shown = [_answers(a.messages[-1]["content"]) for a in judge.asked]
    assert shown == list(zip(first, second)) + list(zip(second, first))  # every pair in both orders
    assert [v["winner"] for v in verdicts] == ["first", "second", "tie"]
    assert [(v["first_as_a"], v["first_as_b"]) for v in verdicts] == [("A", "B"), ("B", "A"), ("tie", "tie")]
    biased = Judge(Scripted(lambda _: {"winner": "A"}), "pairwise").compare(prompts, first, second)
    assert [v["winner"] for v in biased] == ["tie"] * 3 and not any(v["consistent"] for v in biased)


def test_score_is_the_mean_of_the_criteria_per_pair():
    def grade(text: str) -> dict[str, Any]:
        n = len(re.search(r"\[Answer\]\n(.*)\n\nReply", text, re.S).group(1))
        return {"grammar": n % 10 + 1, "creativity": 3, "consistency": 10, "plot": 1, "age": AGES[0]}

    responses = ["a", "bbbb", "ccccccc"]
    scores = Judge(Scripted(grade), "tinystories").score(["p"] * 3, responses)
    assert scores == [((len(r) % 10 + 1) + 3 + 10 + 1) / 4 for r in responses]


def test_a_grade_outside_the_schema_is_one_line():
    from tinylm.core.errors import TinylmError

    with pytest.raises(TinylmError, match="outside the tinystories schema"):
        Judge(Scripted(lambda _: {"grammar": 11}), "tinystories").grade(["p"], ["r"])


# ----- calibration --------------------------------------------------------------------------------------------

def test_calibration_items_are_valid_stories_and_their_corruptions():
    items = calibration_items(6, seed=3)
    assert len(items) == 12 and [i["label"] for i in items[1::2]] == list(CORRUPTIONS) * 2
    for valid, broken in zip(items[0::2], items[1::2]):
        check = tinytales.check(valid["story"])
        assert check.consistent and check.n_valid == check.n_sentences > 0
        a, b = valid["story"], broken["story"]
        assert a != b
        if broken["label"] == "sentences shuffled":
            assert sorted(_split(a)) == sorted(_split(b)) and _split(a) != _split(b)
        elif broken["label"] == "words dropped":
            words = a.split()
            assert len(b.split()) == len(words) - max(1, len(words) // 4)
        else:  # the same words, but from the middle on the two characters' names exchanged
            wa, wb = a.split(), b.split()
            names = set(names_of(a)[:2])
            assert len(wa) == len(wb) and any(x != y for x, y in zip(wa, wb))
            assert all(x == y or {x.strip(".,!?\"'"), y.strip(".,!?\"'")} == names for x, y in zip(wa, wb))


def _split(story: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.!?]*[.!?]+[\"”]?", story) if s.strip()]


def test_corruptions_keep_what_they_should():
    rng = random.Random(0)
    story = next(s for s in tinytales.generate(50, 1) if len(re.findall(r"[.!?]", s)) >= 4)
    sentences = re.findall(r"[^.!?]*[.!?]+[\"”]?", story)
    shuffled = corrupt(story, "sentences shuffled", rng)
    assert sorted(s.strip() for s in sentences) == sorted(s.strip() for s in re.findall(r"[^.!?]*[.!?]+[\"”]?",
                                                                                     shuffled))
    dropped = corrupt(story, "words dropped", rng).split()
    it = iter(story.split())
    assert all(w in it for w in dropped)  # a subsequence of the story's words


def _oracle_grade(text: str) -> dict[str, Any]:
    story = re.search(r"\[Answer\]\n(.*)\n\nReply", text, re.S).group(1)
    good = story in VALID
    return {"grammar": 9 if good else 2, "creativity": 5, "consistency": 9 if good else 2, "plot": 5,
            "age": AGES[1]}


ITEMS = calibration_items(6, seed=0)
VALID = {i["story"] for i in ITEMS if i["label"] == "valid"}


def test_calibration_report_of_an_oracle_and_of_a_constant_judge():
    report = calibrate(Judge(Scripted(_oracle_grade), "tinystories"), ITEMS, threshold=6)
    assert report["agreement"] == 1.0 and report["pair_agreement"] == 1.0
    assert report["table"]["valid"] == {"judged good": 6, "judged bad": 0}
    assert all(report["table"][k] == {"judged good": 0, "judged bad": 2} for k in CORRUPTIONS)
    flat = calibrate(Judge(Scripted(lambda _: {c: 5 for c in (*CRITERIA["tinystories"], "age")} | {"age": AGES[0]}),
                           "tinystories"), ITEMS, threshold=6)
    assert flat["agreement"] == 0.5 and flat["pair_agreement"] == 0.5  # every story "bad"; every pair a tie


def test_pairwise_calibration_counts_wins_ties_and_consistency():
    def prefers_valid(text: str) -> dict[str, str]:
        a, b = _answers(text)
        return {"winner": "A" if a in VALID else "B"}

    report = calibrate(Judge(Scripted(prefers_valid), "pairwise"), ITEMS)
    assert report["agreement"] == 1.0 and report["consistent"] == 1.0
    assert all(report["table"][k] == {"valid wins": 2, "tie": 0, "corrupted wins": 0} for k in CORRUPTIONS)
    biased = calibrate(Judge(Scripted(lambda _: {"winner": "B"}), "pairwise"), ITEMS)
    assert biased["agreement"] == 0.0 and biased["consistent"] == 0.0
    assert all(biased["table"][k]["tie"] == 2 for k in CORRUPTIONS)


# ----- the command ----------------------------------------------------------------------------------------------

def test_judge_a_file_writes_every_row_with_a_grade(ckpt, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Tell a story."},
                                                      {"role": "assistant", "content": s}]}) + "\n" for s in STORIES))
    out = tmp_path / "graded.jsonl"
    assert cli.main(["judge", str(rows), "--judge", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
    graded = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["messages"][1]["content"] for g in graded] == STORIES
    for g in graded:
        _valid_grade(g["judge"], "tinystories")
    table = capsys.readouterr().out
    mean = sum(g["judge"]["grammar"] for g in graded) / 3
    assert f"| grammar (1-10) | {mean:.2f} |" in table


@pytest.mark.parametrize("rubric", ["tinystories", "instruction"])
def test_judge_a_model_grades_its_answers_to_built_in_prompts(ckpt, tmp_path, rubric):
    out = tmp_path / "graded.jsonl"
    assert cli.main(["judge", str(ckpt), "--judge", str(ckpt), "--rubric", rubric, "--n", "2", "--max-tokens", "8",
                     "--out", str(out), "--device", "cpu"]) == 0
    graded = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(graded) == 2
    for g in graded:
        _valid_grade(g["judge"], rubric)
    if rubric == "tinystories":  # the prompts are the first two sentences of TinyTales stories
        assert [g["prompt"] for g in graded] == [" ".join(_split(s)[:2]) for s in tinytales.generate(2, 0)]


def test_judge_calibrate_prints_agreement_and_a_confusion_table(ckpt, capsys):
    assert cli.main(["judge", "--calibrate", "3", "--judge", str(ckpt), "--rubric", "pairwise", "--device", "cpu",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and sum(sum(r.values()) for r in report["table"].values()) == 3
    assert report["agreement"] == sum(r["valid wins"] for r in report["table"].values()) / 3


@pytest.fixture(scope="module")
def url(ckpt) -> Iterator[str]:
    from tinylm.stages.serve import ServeConfig, build_app

    with serving(build_app(ServeConfig(str(ckpt), name="tiny-judge", max_concurrent=4, max_queue=64))) as base:
        yield base + "/v1"


def test_a_judge_behind_tinylm_serve_grades_under_the_schema(url, local):
    remote = open_teacher(url, "--judge")
    assert remote.name == "tiny-judge"
    grades = Judge(remote, "tinystories").grade(["Write a story."] * 3, STORIES)
    for g in grades:
        _valid_grade(g, "tinystories")
    # the server decodes greedily under the same schema: the local judge's grades
    assert grades == Judge(local, "tinystories").grade(["Write a story."] * 3, STORIES)
    verdicts = Judge(remote, "pairwise").compare(["Write a story."], STORIES[:1], STORIES[1:2])
    assert verdicts[0]["first_as_a"] in ("A", "B", "tie") and verdicts[0]["first_as_b"] in ("A", "B", "tie")


def test_eval_judge_adds_the_judges_grades_to_the_table(ckpt, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text("\n\n".join(tinytales.generate(20, 9)))
    assert cli.main(["eval", str(ckpt), "--data", str(text), "--judge", str(ckpt), "--judge-n", "2",
                     "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["judge"]["n"] == 2
    assert all(1 <= result["judge"][c] <= 10 for c in CRITERIA["tinystories"])
    assert cli.main(["eval", str(ckpt), "--data", str(text), "--judge", str(ckpt), "--judge-n", "2",
                     "--device", "cpu"]) == 0
    assert "| judge grammar (1-10) |" in capsys.readouterr().out


@pytest.mark.slow
@needs_smollm2
def test_smollm2_as_judge_grades_parse():
    judge = Judge(open_teacher("smollm2-135m", "--judge", device="cpu"), "tinystories")
    for g in judge.grade(["Write a story."] * 2, STORIES[:2]):
        _valid_grade(g, "tinystories")
