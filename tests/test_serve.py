"""`tinylm serve`: the real server (uvicorn in a background thread, on a free loopback port) driven by the
official `openai` client, its answers checked against the model itself.

Greedy replies equal single-stream `generate_ids` on the same prompt (alone and 32 at once), log-probabilities
equal the model's own log_softmax, echo returns the prompt's log-probabilities, constrained replies parse and
validate, tool calls come back parsed; bad requests get OpenAI's error body and the server goes on; a client
that disconnects mid-stream leaves no engine request behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import openai
import pytest
import torch
from helpers import (
    REPO,
    chat_checkpoint,
    hang_up_while_running,
    metric,
    needs_smollm2,
    serving,
)

from tinylm import cli
from tinylm.data.chat import end_of_turn_id, format_tool_call, parse_tool_calls
from tinylm.formats import checkpoint
from tinylm.infer.generate import generate_ids
from tinylm.stages.serve import ServeConfig, build_app

CORPUS = ['{"name": "Tom", "age": 3, "city": "Paris"}', '{"name": "Ann", "age": 41, "city": "Rome"}',
          "the cat sat on the mat. the dog ran to the park. ", "what is the weather in Paris today? "] * 30
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12}},
                                                "required": ["city"], "additionalProperties": False}}}
CONTEXT = 768  # the Hermes tools preamble alone is ~550 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return chat_checkpoint(CORPUS, tmp_path_factory.mktemp("serve") / "ck", max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def ref(ckpt):
    """The same model loaded on its own: the reference the server's answers are checked against."""
    return checkpoint.load(ckpt)


@pytest.fixture(scope="module")
def app(ckpt):
    return build_app(ServeConfig(str(ckpt), name="tiny", max_concurrent=8, max_queue=64, max_body_bytes=20_000))


@pytest.fixture(scope="module")
def url(app) -> Iterator[str]:
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _chat_ids(ref, messages: list[dict[str, Any]]) -> list[int]:
    return ref.tokenizer.encode(ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _greedy(ref, ids: list[int], max_tokens: int, stops: list[int]) -> tuple[list[int], str]:
    """Single-stream greedy decoding (not the engine): the new ids and their text without the stop id."""
    out = generate_ids(ref.model, ids, max_tokens, temperature=0.0, stop_ids=stops)
    return out, ref.tokenizer.decode([t for t in out if t not in stops])


def _logp(ref, ids: list[int]) -> torch.Tensor:
    """(T - 1, V) log-probabilities of each next token under the model, computed directly."""
    with torch.no_grad():
        return ref.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)


def _post(url: str, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----- answers against the model ----------------------------------------------------------------------------

def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert json.loads(urllib.request.urlopen(url + "/health", timeout=30).read()) == {"status": "ok"}


def test_chat_greedy_equals_single_stream_decoding(client, ref):
    messages = [{"role": "system", "content": "you answer"}, {"role": "user", "content": "the cat sat on"}]
    eot = end_of_turn_id(ref.tokenizer)
    ids = _chat_ids(ref, messages)
    out, text = _greedy(ref, ids, 12, [eot])
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if out[-1] == eot else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(out))


def test_chat_logprobs_are_the_models_log_softmax(client, ref):
    messages = [{"role": "user", "content": "what is the weather"}]
    ids = _chat_ids(ref, messages)
    out, _ = _greedy(ref, ids, 10, [end_of_turn_id(ref.tokenizer)])
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    logp = _logp(ref, ids + out)[len(ids) - 1:]  # (len(out), V): the distribution each new token came from
    assert len(entries) == len(out)
    for k, (token, entry) in enumerate(zip(out, entries)):
        assert entry.logprob == pytest.approx(float(logp[k, token]), abs=1e-4)
        best = logp[k].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert bytes(entry.bytes) == ref.tokenizer.decode([token]).encode() or "\ufffd" in ref.tokenizer.decode([token])
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4  # greedy: the chosen token is the best one


def test_streamed_chat_equals_the_whole_reply(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "the dog ran"}], max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_echo_returns_prompt_logprobs(client, ref):
    prompt = "the cat sat on the mat."
    ids = ref.tokenizer.encode(prompt)
    out, text = _greedy(ref, ids, 4, [ref.tokenizer.eos_id])
    reply = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=4, temperature=0)
    choice = reply.choices[0]
    assert choice.text == prompt + text
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    logp = _logp(ref, ids + out)
    want = [float(logp[t, tok]) for t, tok in enumerate((ids + out)[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert len(lp.tokens) == len(ids) + len(out)
    # lm-eval's loglikelihood request: token ids in, one new token, the prompt scored
    scored = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert scored.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(want[:len(ids) - 1], abs=1e-4)
    only = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=0, max_tokens=0)
    assert only.choices[0].text == prompt and only.choices[0].logprobs.token_logprobs[1:] == \
        pytest.approx(want[:len(ids) - 1], abs=1e-4)


def test_streamed_completion_equals_the_whole_one(client):
    kwargs = dict(model="tiny", prompt=["the cat sat", "the dog"], echo=True, logprobs=2, max_tokens=6, n=2,
                  temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [x for c in mine if c.logprobs for x in c.logprobs.token_logprobs] == choice.logprobs.token_logprobs
        assert [x for c in mine if c.logprobs for x in c.logprobs.text_offset] == choice.logprobs.text_offset
        assert mine[-1].finish_reason == choice.finish_reason
    assert [c.index for c in whole.choices] == [0, 1, 2, 3] and whole.choices[0].text == whole.choices[1].text


def test_completion_stop_string_cuts_the_text(client, ref):
    ids = ref.tokenizer.encode("the dog")
    _, text = _greedy(ref, ids, 20, [ref.tokenizer.eos_id])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop and len(text) > 4, text
    reply = client.completions.create(model="tiny", prompt="the dog", max_tokens=20, temperature=0, stop=[stop])
    assert reply.choices[0].text == text[:text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_n_samples_are_seeded(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=8, n=3,
                  temperature=1.0, top_p=0.9, seed=7)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # sample j is seeded with seed + j


def test_json_schema_reply_parses_and_validates(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a person"}], max_tokens=40, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=30,
                                         temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_required_tool_call_is_parsed(client):
    messages = [{"role": "user", "content": "what is the weather in Paris today?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], stream=True,
                                                   tool_choice="required", max_tokens=40, temperature=0))
    calls = [t for c in streamed if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in calls] == [(call.function.name, call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    assert client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5).choices


def test_tool_calls_are_read_from_tags_and_bare_json():
    from tinylm.serve.prepare import reply_calls

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    text = "Let me look.\n" + format_tool_call(call)
    assert parse_tool_calls(text) == ("Let me look.", [call])
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert reply_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [WEATHER]) == \
        ("", [{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    assert reply_calls('{"name": "other", "arguments": {}}', [WEATHER])[1] == []  # not one of the tools: text


def test_32_concurrent_requests_equal_their_single_stream_output(client, ref):
    prompts = [" ".join(["the cat sat", "the dog ran", "what is the", "Paris"][i % 4] for _ in range(1 + i % 5))
               for i in range(32)]
    lengths = [4 + (7 * i) % 17 for i in range(32)]
    eos = ref.tokenizer.eos_id

    def ask(i: int) -> str:
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0
                                         ).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    want = [_greedy(ref, ref.tokenizer.encode(p), n, [eos])[1] for p, n in zip(prompts, lengths)]
    assert got == want


def test_metrics_count_tokens_and_time_requests(client, url):
    before = metric(url, "tinylm_generated_tokens_total")
    reply = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
    # exact at once: the engine thread counts each token before its callback hands it to the reply (it used to
    # count a step's tokens after the callbacks, and CI once read 682 for 683)
    assert metric(url, "tinylm_generated_tokens_total") == before + reply.usage.completion_tokens
    assert metric(url, "tinylm_request_latency_seconds_count") >= 1
    assert metric(url, "tinylm_time_to_first_token_seconds_count") >= 1
    assert metric(url, 'tinylm_http_requests_total{endpoint="/v1/completions",status="200"}') >= 1


# ----- bad requests and limits ------------------------------------------------------------------------------

def _error(call) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize("change, status, param", [
    ({"model": "gpt-9"}, 404, "model"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + max_tokens beyond the context: refused, not clamped
    ({"messages": [{"role": "user", "content": "cat " * CONTEXT}]}, 400, "messages"),  # never truncated
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     400, "response_format"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"temperature": 3}, 400, "temperature"),
    ({"tool_choice": "required"}, 400, "tool_choice"),  # without tools
    ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, None),  # over max_body_bytes
])
def test_bad_request_gets_an_openai_error_and_the_server_goes_on(client, change, status, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **change}
    code, error = _error(lambda: client.chat.completions.create(**body))
    assert code == status and set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content is not None


def test_malformed_json_and_unknown_paths_get_error_bodies(url, client):
    for path, data, status in [("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
                               ("/v1/chat/completions", b"[1, 2]", 400), ("/v1/nothing", b"{}", 404)]:
        code, body = _post(url, path, data)
        assert code == status and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices[0].text is not None


def test_a_full_server_answers_429_then_serves_again(ckpt):
    app = build_app(ServeConfig(str(ckpt), name="tiny", max_concurrent=1, max_queue=1))
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        kwargs = dict(model="tiny", prompt="the cat", max_tokens=200, temperature=0, stream=True)
        running, queued = client.completions.create(**kwargs), client.completions.create(**kwargs)
        code, error = _error(lambda: client.completions.create(model="tiny", prompt="the", max_tokens=2))
        assert code == 429 and error["code"] == "rate_limit_exceeded"
        running.close()
        queued.close()
        deadline = time.monotonic() + 30
        while app.state.server.admitted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices[0].text is not None


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, url, app, ref):
    prompt, max_tokens = "the cat sat on the mat.", 200
    out, _ = _greedy(ref, ref.tokenizer.encode(prompt), max_tokens, [ref.tokenizer.eos_id])
    assert len(out) == max_tokens, "the reply must be long enough to be cut (pick another prompt)"
    cancelled = metric(url, 'tinylm_finished_requests_total{reason="cancelled"}')
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):  # a few tokens, then hang up
        pass
    stream.close()
    engine = app.state.server.model.worker
    deadline = time.monotonic() + 30
    while (metric(url, "tinylm_running_requests") or metric(url, "tinylm_queue_depth")) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(url, "tinylm_running_requests") == 0 and metric(url, "tinylm_queue_depth") == 0
    assert metric(url, 'tinylm_finished_requests_total{reason="cancelled"}') == cancelled + 1
    assert not engine.tickets and app.state.server.admitted == 0


def test_a_client_that_disconnects_while_waiting_for_a_whole_reply_frees_its_slot(url, app):
    """Without streaming nothing is written until the end, so a task watches the connection instead."""
    cancelled = metric(url, 'tinylm_finished_requests_total{reason="cancelled"}')
    hang_up_while_running(url, {"model": "tiny", "prompt": "the cat sat on the mat.", "max_tokens": CONTEXT - 32,
                                "temperature": 1.0, "seed": 1})
    assert metric(url, "tinylm_running_requests") == 0
    assert metric(url, 'tinylm_finished_requests_total{reason="cancelled"}') == cancelled + 1
    assert app.state.server.admitted == 0


def test_a_failed_engine_step_is_a_500_and_the_server_goes_on(client, app, monkeypatch):
    worker = app.state.server.model.worker

    def broken_step() -> None:
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(worker.engine, "step", broken_step)  # the worker replaces its engine after a failure
    code, error = _error(lambda: client.completions.create(model="tiny", prompt="the cat", max_tokens=3))
    assert code == 500 and error["type"] == "server_error" and "a kernel failed" in error["message"]
    assert client.completions.create(model="tiny", prompt="the cat", max_tokens=3).choices[0].text is not None


# ----- the command --------------------------------------------------------------------------------------------

def test_serve_without_the_extra_is_one_line(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert cli.main(["serve", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tinylm[serve]'" in err, err


@pytest.mark.slow
def test_the_command_serves_until_sigterm(ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", "serve", str(ckpt), "--port", "0", "--name", "tiny",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        base = re.search(r"at (http://\S+)/v1", line).group(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny", prompt="the cat", max_tokens=3).choices[0].text is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, proc.stderr.read()


# ----- the real SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_template_and_tools():
    app = build_app(ServeConfig("smollm2-135m", max_concurrent=4))
    server = app.state.server
    ref_model, tok = server.model.model, server.model.tokenizer
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
        ids = tok.encode(tok.apply_chat_template(messages))  # SmolLM2's own template (its default system line)
        stops = [end_of_turn_id(tok)]
        out = generate_ids(ref_model, ids, 16, temperature=0.0, stop_ids=stops)
        assert reply.choices[0].message.content == tok.decode([t for t in out if t not in stops])
        assert "Paris" in reply.choices[0].message.content
        ask = [{"role": "user", "content": "What's the weather like in Rome?"}]
        called = client.chat.completions.create(model="smollm2-135m", messages=ask, tools=[WEATHER],
                                                tool_choice="required", max_tokens=40, temperature=0)
        (call,) = called.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        # README's Serving example, run as written against this server
        snippet = (REPO / "README.md").read_text().split("## Serving", 1)[1].split("```python", 1)[1].split("```")[0]
        exec(snippet.replace("http://127.0.0.1:8000/v1", f"{base}/v1"), {})
