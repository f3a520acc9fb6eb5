"""Routing: `tinylm serve SMALL --fallback SOURCE_or_URL` and `tinylm route calibrate`.

A tiny random small model and a second tiny model with a tokenizer and shape of its own as the fallback;
thresholds of -inf and +inf force each outcome, and the reply must be the greedy single-stream output of the
model that the `model` field and the x-tinylm-routed-to header name. The signal in the header is checked
against the model's own log_softmax and entropy; a URL fallback is a second `tinylm serve` in the process; a
small model that only ever says "{" fails a tool call and falls back whatever its confidence. The threshold
chooser is checked on pairs worked by hand, and `tinylm route calibrate` end to end on labels made from
signals computed here.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import sys
import types
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from helpers import chat_checkpoint, hang_up_while_running, metric, serving

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.data import tasks
from tinylm.data.chat import end_of_turn_id
from tinylm.formats import checkpoint
from tinylm.infer.engine import Completion
from tinylm.infer.generate import generate_ids
from tinylm.serve.protocol import ChatRequest, parse_body
from tinylm.serve.router import schema_failure
from tinylm.serve.routing import answer_entropies, choose, curve, read_route, signal
from tinylm.stages.serve import ServeConfig, build_app

CORPUS = ['{"name": "Tom", "age": 3, "city": "Paris"}', '{"name": "Ann", "age": 41, "city": "Rome"}',
          "the cat sat on the mat. the dog ran to the park. ", "what is the weather in Paris today? "] * 30
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12}},
                                                "required": ["city"], "additionalProperties": False}}}
CONTEXT = 768  # the Hermes tools preamble alone is ~550 tokens of the tiny tokenizer
ASK = [{"role": "user", "content": "the cat sat on"}]


@pytest.fixture(scope="module")
def small_ck(tmp_path_factory) -> Path:
    return chat_checkpoint(CORPUS, tmp_path_factory.mktemp("route") / "small", max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def big_ck(tmp_path_factory) -> Path:
    """The fallback: another shape, seed and tokenizer (its replies are its own, not the small model's)."""
    return chat_checkpoint(CORPUS, tmp_path_factory.mktemp("route") / "big", vocab_size=280, max_seq_len=CONTEXT,
                           seed=1, dim=64, n_heads=4, n_layers=3, ffn_dim=96)


@pytest.fixture(scope="module")
def small(small_ck):
    return checkpoint.load(small_ck)


@pytest.fixture(scope="module")
def big(big_ck):
    return checkpoint.load(big_ck)


@pytest.fixture(scope="module")
def app(small_ck, big_ck):
    return build_app(ServeConfig(str(small_ck), name="small", fallback=str(big_ck), fallback_model="big",
                                 route_threshold=-1e9, max_concurrent=4))


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@contextlib.contextmanager
def threshold(app, value: float, name: str = "mean_logprob"):
    """The router's rule set to (name, value) for a while."""
    router = app.state.server.router
    old = router.signal_name, router.threshold
    router.signal_name, router.threshold = name, value
    try:
        yield router
    finally:
        router.signal_name, router.threshold = old


def _chat_ids(ref, messages: list[dict[str, Any]]) -> list[int]:
    return ref.tokenizer.encode(ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _greedy(ref, ids: list[int], max_tokens: int, stops: list[int]) -> tuple[list[int], str]:
    """Single-stream greedy decoding (not the engine): the new ids and their text without the stop id."""
    out = generate_ids(ref.model, ids, max_tokens, temperature=0.0, stop_ids=stops)
    return out, ref.tokenizer.decode([t for t in out if t not in stops])


def _chat_greedy(ref, messages: list[dict[str, Any]], max_tokens: int) -> tuple[list[int], list[int], str]:
    ids = _chat_ids(ref, messages)
    out, text = _greedy(ref, ids, max_tokens, [end_of_turn_id(ref.tokenizer)])
    return ids, out, text


def _logp(ref, ids: list[int]) -> torch.Tensor:
    """(T - 1, V) log-probabilities of each next token under the model, computed directly."""
    with torch.no_grad():
        return ref.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)


def _answer_logprobs(ref, ids: list[int], out: list[int]) -> torch.Tensor:
    """(len(out), V): the distribution each answer token came from."""
    return _logp(ref, ids + out)[len(ids) - 1:]


def _stream_text(raw) -> tuple[str, set[str]]:
    """The streamed chat content and the `model` of its chunks."""
    chunks = list(raw.parse())
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), {c.model for c in chunks}


# ----- the decision --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, route", [(-math.inf, "small"), (math.inf, "fallback")])
def test_the_threshold_decides_which_model_answers(app, client, small, big, value, route):
    ref, name = (small, "small") if route == "small" else (big, "big")
    _, _, want = _chat_greedy(ref, ASK, 12)
    prompt_ids = ref.tokenizer.encode("the dog ran")
    _, want_completion = _greedy(ref, prompt_ids, 8, [ref.tokenizer.eos_id])
    with threshold(app, value):
        raw = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=12,
                                                               temperature=0)
        reply = raw.parse()
        assert raw.headers["x-tinylm-routed-to"] == route and reply.model == name
        assert reply.choices[0].message.content == want
        streamed = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=12,
                                                                    temperature=0, stream=True)
        assert streamed.headers["x-tinylm-routed-to"] == route
        assert _stream_text(streamed) == (want, {name})
        done = client.completions.with_raw_response.create(model="small", prompt="the dog ran", max_tokens=8,
                                                           temperature=0)
        assert done.headers["x-tinylm-routed-to"] == route
        assert (done.parse().model, done.parse().choices[0].text) == (name, want_completion)


def test_the_signal_is_the_small_models_own(app, client, small):
    """The header's signal against log_softmax and entropy computed here; a request stays with the small model
    exactly when its signal is at least the threshold."""
    ids, out, _ = _chat_greedy(small, ASK, 12)
    logp = _answer_logprobs(small, ids, out)  # (len(out), V)
    chosen = logp.gather(1, torch.tensor(out)[:, None])[:, 0]
    want = {"mean_logprob": float(chosen.mean()), "min_logprob": float(chosen.min()),
            "neg_entropy": -float(torch.distributions.Categorical(logits=logp).entropy().mean())}
    for name, value in want.items():
        with threshold(app, -math.inf, name):
            raw = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=12,
                                                                   temperature=0)
        assert float(raw.headers["x-tinylm-route-signal"]) == pytest.approx(value, abs=1e-4), name
    got = want["mean_logprob"]
    for rule, route in [(got - 1e-3, "small"), (got + 1e-3, "fallback")]:
        with threshold(app, rule):
            raw = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=12,
                                                                   temperature=0)
        assert raw.headers["x-tinylm-routed-to"] == route


def test_answer_entropies_equal_the_full_distributions(small):
    ids, out, _ = _chat_greedy(small, ASK, 6)
    want = torch.distributions.Categorical(logits=_answer_logprobs(small, ids, out)).entropy()
    assert answer_entropies(small.model, ids, out) == pytest.approx(want.tolist(), abs=1e-5)
    assert signal("neg_entropy", [-1.0] * len(out), want.tolist()) == pytest.approx(-float(want.mean()))
    assert (signal("mean_logprob", [-1.0, -3.0]), signal("min_logprob", [-1.0, -3.0]), signal("min_logprob", [])) \
        == (-2.0, -3.0, 0.0)


def test_metrics_report_routes_share_and_signals(app, client, url):
    before = {r: metric(url, f'tinylm_routed_requests_total{{route="{r}"}}') for r in ("small", "fallback")}
    seen = metric(url, "tinylm_route_signal_count")
    for value in (-math.inf, -math.inf, math.inf):
        with threshold(app, value):
            client.chat.completions.create(model="small", messages=ASK, max_tokens=4, temperature=0)
    after = {r: metric(url, f'tinylm_routed_requests_total{{route="{r}"}}') for r in ("small", "fallback")}
    assert (after["small"] - before["small"], after["fallback"] - before["fallback"]) == (2, 1)
    assert metric(url, "tinylm_fallback_share") == pytest.approx(after["fallback"] / sum(after.values()))
    assert metric(url, "tinylm_route_signal_count") == seen + 3


def test_a_client_that_leaves_while_the_small_model_answers_frees_its_slot(app, url):
    """The decision waits for the small model's whole answer; a client gone meanwhile cancels it."""
    cancelled = metric(url, 'tinylm_finished_requests_total{reason="cancelled"}')
    hang_up_while_running(url, {"model": "small", "prompt": "the cat sat on the mat.", "max_tokens": CONTEXT - 32,
                                "temperature": 1.0, "seed": 1, "stream": True})
    assert metric(url, "tinylm_running_requests") == 0
    assert metric(url, 'tinylm_finished_requests_total{reason="cancelled"}') == cancelled + 1
    assert app.state.server.admitted == 0 and not app.state.server.router.kept


# ----- a URL fallback --------------------------------------------------------------------------------------------

def test_a_url_fallback_answers_and_an_unreachable_one_is_a_502(small_ck, big_ck, big):
    _, _, want = _chat_greedy(big, ASK, 10)
    with contextlib.ExitStack() as stack:
        with serving(build_app(ServeConfig(str(big_ck), name="big", max_concurrent=2, max_queue=2))) as big_url:
            routed = build_app(ServeConfig(str(small_ck), name="small", fallback=f"{big_url}/v1",
                                           route_threshold=1e9))  # the URL's only model: big
            base = stack.enter_context(serving(routed))
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
            reply = client.chat.completions.create(model="small", messages=ASK, max_tokens=10, temperature=0)
            assert (reply.model, reply.choices[0].message.content) == ("big", want)
            streamed = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=10,
                                                                        temperature=0, stream=True)
            assert streamed.headers["x-tinylm-route-reason"] == "signal"
            assert _stream_text(streamed) == (want, {"big"})
            with pytest.raises(openai.BadRequestError) as info:  # the fallback's own 400, relayed: it holds 4
                client.chat.completions.create(model="small", messages=ASK, max_tokens=2, n=6)
            assert info.value.body["param"] == "n"
        # the fallback has gone: a 502 in OpenAI's body, and the server goes on
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="small", messages=ASK, max_tokens=4)
        assert info.value.status_code == 502 and info.value.body["code"] == "fallback_unavailable"
        with threshold(routed, -math.inf):
            assert client.chat.completions.create(model="small", messages=ASK, max_tokens=4).model == "small"
        assert routed.state.server.admitted == 0


def test_an_unreachable_url_is_refused_at_start(small_ck):
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now, and nothing listens on it
    with pytest.raises(TinylmError, match="cannot reach it"):
        build_app(ServeConfig(str(small_ck), fallback=f"http://127.0.0.1:{port}/v1", route_threshold=-1.0))


def test_routing_without_its_client_is_one_line(small_ck, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "httpx2", None)  # import httpx2 raises ImportError
    assert cli.main(["serve", str(small_ck), "--fallback", str(small_ck), "--route-threshold", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "httpx2" in err and "pip install 'tinylm[serve]'" in err, err


# ----- schema failures -----------------------------------------------------------------------------------------

def _parrot(directory: Path, text: str) -> Path:
    """A checkpoint whose model says `text` (one token) after any prompt, sure of it: dimension 0 of the residual
    stream is 1 at every position (a constant embedding column that no block writes to), the final norm keeps only
    it, and the LM head maps it to that token alone."""
    ck = chat_checkpoint(CORPUS, directory, max_seq_len=CONTEXT, tie=False)
    loaded = checkpoint.load(ck)
    (token,) = loaded.tokenizer.encode(text)
    m = loaded.model
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = 1.0
        for block in m.model.layers:
            block.self_attn.o_proj.weight[0] = 0.0
            block.mlp.down_proj.weight[0] = 0.0
        m.model.norm.weight.zero_()
        m.model.norm.weight[0] = 1.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[token, 0] = 30.0
    return checkpoint.save(m, ck, loaded.tokenizer)


def test_a_failed_tool_call_falls_back_however_sure_the_small_model_is(tmp_path, big_ck, big):
    parrot = _parrot(tmp_path / "parrot", "{")
    app = build_app(ServeConfig(str(parrot), name="small", fallback=str(big_ck), fallback_model="big",
                                route_threshold=-1e9))
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        plain = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=5,
                                                                 temperature=0)
        assert plain.parse().choices[0].message.content == "{" * 5 and plain.headers["x-tinylm-routed-to"] == "small"
        assert float(plain.headers["x-tinylm-route-signal"]) > -0.01  # sure of it
        called = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=5,
                                                                  temperature=0, tools=[WEATHER])
        assert (called.headers["x-tinylm-routed-to"], called.headers["x-tinylm-route-reason"]) == ("fallback", "schema")
        assert called.parse().model == "big"
        # constrained JSON is valid whatever the model wants: it stays
        obj = client.chat.completions.with_raw_response.create(model="small", messages=ASK, max_tokens=30,
                                                               temperature=0, response_format={"type": "json_object"})
        assert obj.headers["x-tinylm-routed-to"] == "small"
        assert isinstance(json.loads(obj.parse().choices[0].message.content), dict)
        assert metric(base, "tinylm_route_schema_failures_total") == 1


def _job(body: dict[str, Any]) -> Any:
    parsed = parse_body(json.dumps({"model": "m", "messages": ASK, **body}).encode(), ChatRequest)
    offered = parsed.tools and parsed.tool_choice != "none"  # as serve.prepare: tool_choice none shows no tools
    tools = [t.model_dump(exclude_none=True) for t in parsed.tools] if offered else None
    return types.SimpleNamespace(kind="chat", body=parsed, tools=tools)


def _said(text: str) -> list[Completion]:
    return [Completion(0, [], text, "stop", [], [], 0)]


SCHEMA = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}


@pytest.mark.parametrize("body, text, fails", [
    ({}, "{{{", False),  # nothing asked
    ({"response_format": {"type": "json_object"}}, '{"a": 1}', False),
    ({"response_format": {"type": "json_object"}}, '{"a": 1', True),
    ({"response_format": {"type": "json_object"}}, "[1]", True),
    ({"response_format": SCHEMA}, '{"age": 3}', False),
    ({"response_format": SCHEMA}, '{"age": "old"}', True),
    ({"tools": [WEATHER]}, "It is sunny.", False),  # text is an answer when a call is optional
    ({"tools": [WEATHER]}, '{"name": "get_weather", "arguments": {"city": "Oslo"}}', False),
    ({"tools": [WEATHER]}, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', False),
    ({"tools": [WEATHER]}, '{"name": "get_weather", "arguments": {"city": "Oslo"', True),  # a call cut short
    ({"tools": [WEATHER]}, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', True),
    ({"tools": [WEATHER]}, '{"name": "get_weather", "arguments": {"town": "Oslo"}}', True),
    ({"tools": [WEATHER], "tool_choice": "required"}, "It is sunny.", True),
    ({"tools": [WEATHER], "tool_choice": "none"}, "{{{", False),
])
def test_schema_failures(body, text, fails):
    assert (schema_failure(_job(body), _said(text)) is not None) == fails


# ----- calibration --------------------------------------------------------------------------------------------

def test_the_curve_and_the_choice_by_hand():
    # signals, and whether the small model was right; the fallback always is (unless told)
    signals, ok = [-3.0, -2.0, -2.0, -1.0, -0.5], [False, True, False, False, True]
    points = curve(signals, ok)
    # routing nothing: 2/5; then -3 (wrong: +1), both -2s together (+1), -1 (+1), -0.5 (right already: +0)
    assert [(p.threshold, p.routed, p.quality) for p in points[:-1]] == \
        [(-3.0, 0, 0.4), (-2.5, 1, 0.6), (-1.5, 3, 0.8), (-0.75, 4, 1.0)]
    assert points[-1].routed == 5 and points[-1].quality == 1.0 and -0.5 < points[-1].threshold < -0.4999
    assert [p.share for p in points] == [0.0, 0.2, 0.6, 0.8, 1.0]
    assert choose(points, target_quality=0.8).threshold == -1.5
    assert choose(points, target_quality=0.75).threshold == -1.5
    assert choose(points, target_quality=1.0).threshold == -0.75
    assert choose(points, target_quality=0.3).routed == 0
    assert choose(points, fallback_share=0.5).threshold == -2.5
    assert choose(points, fallback_share=0.6).threshold == -1.5
    assert choose(points, fallback_share=0.0).routed == 0
    # the rule at a chosen threshold routes exactly what the point counts: signal < threshold
    for p in points:
        assert sum(s < p.threshold for s in signals) == p.routed
    # a fallback that is wrong on the second -2 makes routing that pair win nothing
    worse = curve(signals, ok, [True, True, False, True, True])
    assert [p.quality for p in worse] == [0.4, 0.6, 0.6, 0.8, 0.8]
    with pytest.raises(TinylmError, match="no threshold reaches quality 0.9: the best is 0.8000"):
        choose(worse, target_quality=0.9)
    with pytest.raises(TinylmError, match="one target"):
        choose(points)


def _rows(small, n: int) -> list[dict[str, Any]]:
    """n chats, with the small model's greedy answer and mean log-prob computed here."""
    words = "the cat sat on the mat dog ran to park what is weather in Paris today Tom Ann Rome".split()
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": " ".join(words[(3 * i) % len(words):][:2 + i % 4])}]
        ids, out, text = _chat_greedy(small, messages, 8)
        chosen = _answer_logprobs(small, ids, out).gather(1, torch.tensor(out)[:, None])[:, 0]
        rows.append({"messages": messages, "answer": text, "signal": float(chosen.mean())})
    return rows


def test_calibrate_routes_the_unsure_half(small, small_ck, big_ck, tmp_path, capsys):
    """Labels that make the small model wrong exactly on its less sure half (half of them by a label, half by a
    reference to compare with): a target of 1.0 must route that half, at a threshold between the two middle
    signals; `serve --route-config` then reads it."""
    rows = _rows(small, 8)
    signals = sorted(r["signal"] for r in rows)
    assert len(set(signals)) == len(signals), "signals tie: pick other prompts"
    middle = (signals[3] + signals[4]) / 2
    data = tmp_path / "labelled.jsonl"
    with data.open("w") as f:
        for i, r in enumerate(rows):
            right = r["signal"] > middle
            label = {"acceptable": right} if i % 2 else {"reference": r["answer"] if right else r["answer"] + "!"}
            f.write(json.dumps({"messages": r["messages"], **label}) + "\n")
    out, png = tmp_path / "route.json", tmp_path / "curve.png"
    assert cli.main(["route", "calibrate", "--small", str(small_ck), "--data", str(data), "--target-quality", "1",
                     "--max-tokens", "8", "--out", str(out), "--plot", str(png)]) == 0
    record = json.loads(out.read_text())
    assert (record["signal"], record["share"], record["quality"], record["n"]) == ("mean_logprob", 0.5, 1.0, 8)
    assert record["threshold"] == pytest.approx(middle, abs=1e-4)
    assert [p["share"] for p in record["curve"]] == [k / 8 for k in range(9)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "50.0%" in printed and "quality 1.0000" in printed
    assert read_route(str(out)) == ("mean_logprob", record["threshold"])
    app = build_app(ServeConfig(str(small_ck), fallback=str(big_ck), route_config=str(out)))
    assert (app.state.server.router.signal_name, app.state.server.router.threshold) == read_route(str(out))
    # a fixed share instead: the two least sure
    assert cli.main(["route", "calibrate", "--small", str(small_ck), "--data", str(data), "--fallback-share",
                     "0.3", "--max-tokens", "8", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["threshold"] == pytest.approx((signals[1] + signals[2]) / 2, abs=1e-4)


def test_calibrate_judges_a_task_with_its_checker(small_ck, tmp_path):
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tasks.examples("tinytales-instruct", 3, "test")))
    out = tmp_path / "route.json"
    assert cli.main(["route", "calibrate", "--small", str(small_ck), "--data", str(data), "--task",
                     "tinytales-instruct", "--target-quality", "1", "--max-tokens", "6", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    # six tokens of a random model are no story with the asked words: all three go to the (assumed right) fallback
    assert record["curve"][0]["quality"] == 0.0 and record["share"] == 1.0


def test_read_route_refuses_what_calibrate_did_not_write(tmp_path):
    for name, text, says in [("a.json", "{", "not JSON"), ("b.json", "[1]", "format"),
                             ("c.json", '{"format": "tinylm-route-v1", "signal": "vibes", "threshold": 1}', "vibes"),
                             ("d.json", '{"format": "tinylm-route-v1", "signal": "min_logprob", "threshold": "low"}',
                              "'low'")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(TinylmError, match=says):
            read_route(str(tmp_path / name))
