"""The built-in fine-tuning tasks (tinylm.data.tasks): gold examples pass their checkers, rejected ones fail for
their stated reason, inflections count, exact-match function calls, the constraining schema, disjoint splits,
and `tinylm data task` / `tinylm data check`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
from helpers import chat_checkpoint, needs_smollm2, tiny_model

from tinylm.cli import main
from tinylm.data import tasks, tinytales
from tinylm.data.tasks import function_calling as FC
from tinylm.data.tasks import tinytales_instruct as TI
from tinylm.data.tasks.split import normalise
from tinylm.data.tokenizer import train_tokenizer
from tinylm.infer import constrained

TASK_NAMES = list(tasks.TASKS)


def _story(ex: dict) -> str:
    return ex["messages"][-1]["content"]


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("pairs", [False, True])
def test_the_same_seed_gives_the_same_examples(task: str, pairs: bool) -> None:
    a, b = tasks.examples(task, 30, "train", 7, pairs), tasks.examples(task, 30, "train", 7, pairs)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(tasks.examples(task, 30, "train", 8, pairs))


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gold_story_follows_its_instruction(split: str) -> None:
    examples = tasks.examples("tinytales-instruct", 300 if split == "train" else 150, split, 1)
    result = tasks.score("tinytales-instruct", examples, [_story(e) for e in examples])
    assert result["accuracy"] == 1.0, result["failures"][:3]
    for e in examples:  # the instruction says what the spec asks, word for word
        prompt = e["messages"][0]["content"]
        assert all(w in prompt for w in e["spec"]["words"]) and len(e["spec"]["words"]) == 3
        assert ("has dialogue" in prompt) == e["spec"]["dialogue"] and ("has a moral" in prompt) == e["spec"]["moral"]
        assert tinytales.check(_story(e)).fraction == 1.0
    seen = {k: sum(bool(e["spec"][k]) for e in examples) for k in ("dialogue", "moral", "name", "plot")}
    assert min(seen.values()) > 15, seen  # every feature is asked for often


def test_every_rejected_story_fails_for_its_stated_reason() -> None:
    pairs = tasks.examples("tinytales-instruct", 200, "train", 2, pairs=True)
    kinds = set()
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert TI.follows(p["spec"], chosen) == (True, [])
        assert TI.follows(p["spec"], rejected) == (False, [p["reason"]]), (p["spec"], rejected)
        assert tinytales.check(rejected).fraction == 1.0  # still TinyTales: only the instruction is broken
        kinds.add(re.sub(r"(: | named ).*", "", p["reason"]))
    assert kinds == {"missing word", "no moral", "no dialogue", "no character"}


def test_inflections_count_as_the_word() -> None:
    assert {"ran", "running", "runs"} <= TI.forms("run")
    assert {"jumped", "jumping"} <= TI.forms("jump") and {"toys"} <= TI.forms("toy")
    assert {"bigger", "biggest"} <= TI.forms("big") and {"happier", "happiest"} <= TI.forms("happy")
    assert {"baked", "baking"} <= TI.forms("bake") and {"mice"} <= TI.forms("mouse") and "ran" not in TI.forms("rain")
    rng = random.Random(0)
    story = next(s.text for s in (tinytales.generate_story(rng) for _ in range(5000))
                 if " ran " in s.text and not re.search(r"\brun\b", s.text))
    assert TI.follows({"words": ["run"]}, story) == (True, [])  # "ran" for "run"
    ok, reasons = TI.follows({"words": ["run"]}, story.replace(" ran ", " went "))
    assert not ok and reasons[0] == "missing word: run"


def test_features_are_judged_on_the_text() -> None:
    rng = random.Random(3)
    stories = [tinytales.generate_story(rng) for _ in range(400)]
    moral = next(s for s in stories if TI.has_moral(s.text))
    without = " ".join(TI.sentences(moral.text)[:-1])  # the moral is the story's last sentence
    assert not TI.has_moral(without) and TI.follows({"moral": True}, without)[1] == ["no moral"]
    quiet = next(s.text for s in stories if '"' not in s.text)
    assert TI.follows({"dialogue": True}, quiet) == (False, ["no dialogue"])
    hero = TI.names(moral.text)[0]
    assert TI.follows({"name": hero}, moral.text)[0] and not TI.follows({"name": "Nobody"}, moral.text)[0]
    for s in stories[:15]:  # a story is about its own plot and about no other one
        assert [p for p in TI.PLOTS if TI.is_about(s.text, p)] == [s.skeleton]
    scrambled = " ".join(TI.sentences(moral.text)[0].split()[::-1])  # a sentence the grammar cannot make
    ok, reasons = TI.follows({}, scrambled + " " + moral.text)
    assert not ok and reasons[0].startswith("not in the grammar")
    assert set(TI.PLOTS) == set(tinytales.SKELETONS)


def test_gold_calls_match_and_wrong_ones_do_not() -> None:
    examples = tasks.examples("function-calling", 400, "train", 0)
    assert tasks.score("function-calling", examples, [e["messages"][-1] for e in examples])["accuracy"] == 1.0
    assert {FC.gold_calls(e)[0]["name"] for e in examples} == {t["function"]["name"] for t in FC.TOOLS}
    for e in examples[:50]:
        gold = FC.gold_calls(e)
        call = json.loads(e["messages"][-1]["content"])
        reordered = {"arguments": dict(reversed(list(call["arguments"].items()))), "name": call["name"]}
        assert FC.matches(gold, json.dumps(reordered, indent=2)) == (True, [])  # key order, spacing
        openai = [{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                  for c in gold]
        assert FC.matches(gold, {"tool_calls": openai})[0]  # OpenAI style, string args
        assert "tool_calls" not in e["messages"][-1]  # the call is said once, as the content
        key = sorted(call["arguments"])[0]
        assert not FC.matches(gold, {**call, "arguments": {**call["arguments"], key: "x"}})[0]
        assert not FC.matches(gold, {**call, "arguments": {**call["arguments"], "extra": 1}})[0]
        assert not FC.matches(gold, {**call, "arguments": {k: v for k, v in call["arguments"].items() if k != key}})[0]
        assert FC.matches(gold, {**call, "name": "send_email"})[1][0].startswith("wrong function")
    timer = [{"name": "set_timer", "arguments": {"minutes": 1}}]
    assert not FC.matches(timer, '{"name": "set_timer", "arguments": {"minutes": true}}')[0]  # true is not 1
    assert FC.matches(timer, "set a timer") == (False, ["not a function call"])
    assert FC.matches(timer, '```json\n{"name": "set_timer", "arguments": {"minutes": 1}}\n```')[0]


def test_requests_state_their_arguments() -> None:
    # Every argument can be read off the request: a date's day and year, a time's hour, a text verbatim.
    rng = random.Random(5)
    for _ in range(300):
        request, call = FC.draw_request(rng)
        for key, value in call["arguments"].items():
            if key == "date":
                year, _, day = value.split("-")
                assert year in request and str(int(day)) in request, (request, call)
            elif key == "time":
                hour = int(value[:2])
                assert str(hour % 12 or 12) in request or value in request, (request, call)
            elif isinstance(value, str) and key != "field":
                assert value in request, (request, call)


def test_pairs_reject_one_wrong_argument() -> None:
    for p in tasks.examples("function-calling", 100, "test", 4, pairs=True):
        gold = FC.gold_calls({"messages": p["chosen"]})
        assert FC.matches(gold, p["chosen"][0]["content"])[0]
        ok, reasons = FC.matches(gold, p["rejected"][0]["content"])
        key = p["reason"].removeprefix("wrong argument: ")
        bad = json.loads(p["rejected"][0]["content"])["arguments"]
        assert not ok and bad[key] != gold[0]["arguments"][key]
        assert {k: v for k, v in bad.items() if k != key} == {k: v for k, v in gold[0]["arguments"].items() if k != key}


def test_every_gold_call_validates_against_the_constraining_schema() -> None:
    schema = FC.call_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for e in tasks.examples("function-calling", 300, "test", 0):
        assert validator.is_valid(json.loads(e["messages"][-1]["content"]))
    for bad in ({"name": "set_alarm", "arguments": {"time": "7am"}},  # not HH:MM
                {"name": "set_alarm", "arguments": {}},  # a required argument missing
                {"name": "set_alarm", "arguments": {"time": "07:00", "date": "2025-01-01"}},  # an unknown one
                {"name": "fly_to_the_moon", "arguments": {}},
                {"name": "lookup_contact", "arguments": {"name": "Ben", "field": "fax"}}):
        assert not validator.is_valid(bad), bad


def test_the_constraining_schema_compiles_and_admits_every_gold_call() -> None:
    pytest.importorskip("outlines_core")
    examples = tasks.examples("function-calling", 200, "train", 0)
    texts = [e["messages"][-1]["content"] for e in examples]
    tok = train_tokenizer([e["messages"][1]["content"] + " " + t for e, t in zip(examples, texts)],
                          vocab_size=400, min_frequency=1)
    schema = FC.call_schema()
    constrained.check_supported(schema)
    index = constrained.JsonIndex(schema, tok, tok.vocab_size)  # within MAX_STATES / MAX_STEPS / COMPILE_SECONDS
    for text in texts[:40]:  # the constraint lets a model write each gold call, token by token, then stop
        state = constrained.JsonConstraint(index)
        for token in tok.encode(text):
            assert state.allowed(10_000)[token], text
            state.advance(token)
        assert state.allowed(10_000)[tok.eos_id], text
    state = constrained.JsonConstraint(index)  # and does not let it write a wrong function's name
    prefix = tok.encode('{"name": "fly')
    for token in prefix:
        if not state.allowed(10_000)[token]:
            break
        state.advance(token)
    else:
        pytest.fail("the schema admitted an unknown function name")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_train_and_test_share_no_prompt(task: str) -> None:
    def prompts(split: str, seed: int) -> list[str]:
        rows = tasks.examples(task, 1500 if split == "train" else 200, split, seed)
        return [normalise(r["messages"][-2]["content"]) for r in rows]

    train, test = prompts("train", 0), prompts("test", 1)  # different seeds: disjoint all the same
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_cli_writes_jsonl_and_checks_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fc.jsonl"
    assert main(["data", "task", "function-calling", "--n", "20", "--split", "test", "--seed", "3",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == tasks.examples("function-calling", 20, "test", 3)
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"prediction": r["messages"][-1]["content"] if i % 4 else "no"}) + "\n"
                                   for i, r in enumerate(rows)))
    capsys.readouterr()
    assert main(["data", "check", "function-calling", "--data", str(out), "--predictions", str(predictions)]) == 0
    out = capsys.readouterr().out
    assert "15/20 correct (75.0%)" in out and "failing: not a function call 5" in out
    pairs = tmp_path / "pairs.jsonl"
    assert main(["data", "task", "tinytales-instruct", "--n", "5", "--pairs", "--out", str(pairs)]) == 0
    assert all({"prompt", "chosen", "rejected", "reason"} <= json.loads(line).keys()
               for line in pairs.read_text().splitlines())


def _fc_checkpoint(tmp_path: Path, n: int = 4) -> tuple[Path, Path, list[dict]]:
    rows = tasks.examples("function-calling", n, "test", 5)
    data = tmp_path / "fc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in tasks.examples("function-calling", 40) for m in r["messages"]]
    return chat_checkpoint(texts, tmp_path / "m", vocab_size=1000, max_seq_len=512), data, rows


def test_model_answers_equal_single_prompt_greedy_decoding(tmp_path: Path, capsys) -> None:
    """--model answers each example greedily through the chat template; the prefix cache shared between
    examples changes nothing: each answer equals `generate_ids` on its own prompt with a fresh cache."""
    from tinylm.data.chat import end_of_turn_id
    from tinylm.formats.checkpoint import load
    from tinylm.infer.generate import generate_ids

    ckpt, data, rows = _fc_checkpoint(tmp_path)
    saved = tmp_path / "answers.jsonl"
    assert main(["data", "check", "function-calling", "--data", str(data), "--model", str(ckpt),
                 "--max-tokens", "12", "--save", str(saved)]) == 0
    assert f"/{len(rows)} correct" in capsys.readouterr().out
    got = [json.loads(line)["prediction"] for line in saved.read_text().splitlines()]
    loaded = load(ckpt)
    tok, stops = loaded.tokenizer, [end_of_turn_id(loaded.tokenizer), loaded.tokenizer.eos_id]
    for row, answer in zip(rows, got, strict=True):
        ids = tok.encode(tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True))
        new = generate_ids(loaded.model.eval(), ids, 12, temperature=0.0, stop_ids=stops)
        assert answer == tok.decode([t for t in new if t not in stops])


def test_a_model_without_a_template_is_asked_through_default_chatml(tmp_path: Path, capsys) -> None:
    """A base model (no chat template) answers through the ChatML that sft would add: the same answers as the
    checkpoint that add_chatml makes of it."""
    from tinylm.data.chat import add_chatml
    from tinylm.formats import checkpoint

    rows = tasks.examples("tinytales-instruct", 2, "test", 1)
    data = tmp_path / "ti.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([m["content"] for r in tasks.examples("tinytales-instruct", 30) for m in r["messages"]],
                          vocab_size=400, min_frequency=2)
    tok.chat_template = None  # as a tokenizer trained elsewhere, or an HF base model's
    base = checkpoint.save(tiny_model(vocab_size=tok.vocab_size, max_seq_len=256), tmp_path / "base", tok)
    chat_tok, chat_model = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size, max_seq_len=256))
    chatml = checkpoint.save(chat_model, tmp_path / "chatml", chat_tok)
    got = {}
    for name, source in (("base", base), ("chatml", chatml)):
        assert main(["data", "check", "tinytales-instruct", "--data", str(data), "--model", str(source),
                     "--max-tokens", "20", "--save", str(tmp_path / f"{name}.jsonl")]) == 0
        got[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert "no chat template" in capsys.readouterr().err
    assert got["base"] == got["chatml"]


def test_constrained_answers_are_valid_calls(tmp_path: Path, capsys) -> None:
    """Under --constrained even an untrained model writes a call of one of the tools with valid arguments."""
    ckpt, data, rows = _fc_checkpoint(tmp_path, 3)
    saved = tmp_path / "answers.jsonl"
    assert main(["data", "check", "function-calling", "--data", str(data), "--model", str(ckpt),
                 "--max-tokens", "200", "--constrained", "--save", str(saved)]) == 0
    validator = jsonschema.Draft202012Validator(FC.call_schema())
    for line in saved.read_text().splitlines():
        validator.validate(json.loads(json.loads(line)["prediction"]))


@pytest.mark.parametrize("words, message", [
    (["data", "task", "nope", "--out", "x.jsonl"], "--task must be one of"),
    (["data", "task", "function-calling", "--n", "0", "--out", "x.jsonl"], "--n must be >= 1"),
    (["data", "task", "function-calling", "--split", "dev", "--out", "x.jsonl"], "--split must be one of"),
    (["data", "task", "function-calling"], "out is required"),
    (["data", "task", "function-calling", "--out", "exists.jsonl"], "already exists"),
    (["data", "check", "function-calling", "--data", "missing.jsonl", "--predictions", "exists.jsonl"],
     "cannot read --data"),
    (["data", "check", "function-calling", "--data", "exists.jsonl", "--predictions", "exists.jsonl"],
     "is not JSON"),
    (["data", "check", "function-calling", "--data", "fc.jsonl"], "--predictions FILE, or --model SOURCE"),
    (["data", "check", "function-calling", "--data", "fc.jsonl", "--predictions", "fc.jsonl", "--model", "m"],
     "--predictions FILE, or --model SOURCE"),
    (["data", "check", "function-calling", "--data", "fc.jsonl", "--predictions", "fc.jsonl", "--constrained"],
     "apply to --model's answers"),
    (["data", "check", "tinytales-instruct", "--data", "ti.jsonl", "--model", "m", "--constrained"],
     "--constrained is for function-calling"),
    (["data", "check", "function-calling", "--data", "fc.jsonl", "--model", "m", "--save", "exists.jsonl"],
     "already exists"),
    (["data", "check", "function-calling", "--data", "fc.jsonl", "--model", "nowhere"], "nowhere"),
])
def test_bad_options_are_one_line_exit_2(tmp_path: Path, monkeypatch, capsys, words: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.jsonl").write_text("not json\n")
    (tmp_path / "fc.jsonl").write_text(json.dumps(tasks.examples("function-calling", 1)[0]) + "\n")
    (tmp_path / "ti.jsonl").write_text(json.dumps(tasks.examples("tinytales-instruct", 1)[0]) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(words) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "exists.jsonl").read_text() == "not json\n"


@needs_smollm2
def test_the_call_is_learned_once_through_smollm2s_template() -> None:
    """SmolLM2's template ignores tool_calls; the example says the call once, as the assistant's content, so
    the loss-carrying tokens are exactly the call and the end of the turn."""
    from tinylm.data.chat import render, to_example
    from tinylm.formats.checkpoint import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    for record in tasks.examples("function-calling", 5, seed=3):
        rendered = render(to_example(record, "fc"), tok)
        said = tok.decode([i for i, m in zip(rendered.ids, rendered.mask) if m])
        assert said == FC.call_text(FC.gold_calls(record)[0]) + "<|im_end|>"


def test_constrained_without_outlines_core_fails_before_the_model_loads(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "outlines_core", None)
    data = tmp_path / "fc.jsonl"
    data.write_text(json.dumps(tasks.examples("function-calling", 1)[0]) + "\n")
    assert main(["data", "check", "function-calling", "--data", str(data), "--model", "nowhere", "--constrained"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--constrained needs outlines_core" in err[0] and "tinylm[json]" in err[0], err
