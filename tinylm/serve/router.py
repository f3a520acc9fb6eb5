"""Routing for `tinylm serve SMALL --fallback SOURCE_or_URL`: the small model answers every request; when its
signal (serve.routing) is below the threshold, or its answer fails the JSON schema or tool call the request
asked for, the request goes to the fallback, whose whole answer is returned instead.

The fallback is an OpenAI-compatible endpoint: a URL (another server, a hosted API), or a local model served
in-process by its own app and engine thread, reached through httpx2's ASGI transport, so both take the same
path: the request is sent again with the fallback's model id, and its response is relayed as it came (its
`model` field names the model that answered; its tokenizer and chat template are its own).

Which model answered: the reply's `model` field (the small model's id or the fallback's), and the headers
`x-tinylm-routed-to: small|fallback`, `x-tinylm-route-signal` (the small model's signal, the lowest of its
samples') and, when it fell back, `x-tinylm-route-reason: signal|schema`. /metrics counts the requests per
route, the schema failures, the share sent to the fallback, and the signals' histogram.

Streaming: the small model's answer must be whole before the decision, so it is decoded first and its events
then sent at once; a fallback's stream is relayed as it comes from a URL (a local fallback's arrives whole:
the in-process transport reads the whole response). A completion with `echo` (scoring a prompt) is the small
model's alone; a completion prompt given as token ids is sent as it is, so it means the same only to a
fallback with the small model's tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from contextlib import aclosing
from typing import Any, AsyncIterator

import httpx2
import jsonschema
import referencing.exceptions
from fastapi.responses import Response, StreamingResponse

from tinylm.infer.engine import Completion
from tinylm.serve.app import Limits, Server, create_app
from tinylm.serve.client import check_endpoint, one_line
from tinylm.serve.metrics import Metrics
from tinylm.serve.prepare import Job, reply_calls
from tinylm.serve.protocol import ApiError, ToolChoice, sse
from tinylm.serve.routing import answer_entropies, signal
from tinylm.serve.worker import LocalModel, Update

ROUTED_TO, SIGNAL, REASON = "x-tinylm-routed-to", "x-tinylm-route-signal", "x-tinylm-route-reason"
# signals are <= 0 (log-probabilities, minus entropies); a 49k vocabulary's uniform entropy is 10.8 nats
SIGNAL_BUCKETS = (-12.0, -10.0, -8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, 0.0)
TIMEOUT = httpx2.Timeout(600.0, connect=10.0)  # a long answer of a big model under load takes minutes


class Fallback:
    """An OpenAI-compatible endpoint that answers what the small model is unsure of.

    Args:
        name: the model id it is asked for.
        base_url: its base URL, up to /v1.
        headers: sent with every request (an API key).
        local: a local model served by `transport` (its engine thread starts and stops with the server).
        transport: httpx2's transport to it (an ASGI transport for a local model; None: the network).
    """

    def __init__(self, name: str, base_url: str, headers: dict[str, str] | None = None,
                 local: LocalModel | None = None, transport: Any = None) -> None:
        self.name, self.base_url, self.headers = name, base_url, headers or {}
        self.local, self.transport = local, transport
        self.client: httpx2.AsyncClient | None = None

    async def start(self) -> None:
        if self.local is not None:
            self.local.worker.start()
        self.client = httpx2.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=TIMEOUT,
                                         transport=self.transport)

    async def close(self) -> None:
        await self.client.aclose()
        if self.local is not None:
            self.local.worker.close()

    async def respond(self, job: Job, headers: dict[str, str]) -> Response:
        """The fallback's response to the job's request (its status and body, streamed or not), with `headers`.

        Args:
            job: the request as the small model got it (its checked body is sent again, for this model).
            headers: added to the response.
        """
        body = {**job.body.model_dump(mode="json", by_alias=True, exclude_unset=True), "model": self.name}
        path = "chat/completions" if job.kind == "chat" else "completions"
        try:
            reply = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx2.HTTPError as e:
            raise self._failed(e) from None
        kind = reply.headers.get("content-type", "application/json")
        if not body.get("stream") or reply.status_code != 200:
            try:
                content = await reply.aread()
            except httpx2.HTTPError as e:
                raise self._failed(e) from None
            finally:
                await reply.aclose()
            retry = {"Retry-After": reply.headers["retry-after"]} if "retry-after" in reply.headers else {}
            return Response(content, reply.status_code, headers={**headers, **retry}, media_type=kind)
        return _Relay(reply, {**headers, "Cache-Control": "no-cache"}, self._failed)

    def _failed(self, e: Exception) -> ApiError:
        return ApiError(502, f"The fallback model '{self.name}' at {self.base_url} did not answer: "
                        f"{one_line(e)}", type="server_error", code="fallback_unavailable")


class _Relay(StreamingResponse):
    """A fallback's event stream relayed as it comes; its connection is closed however the relay ends (an error
    on the way becomes an error event)."""

    def __init__(self, reply: httpx2.Response, headers: dict[str, str], failed: Any) -> None:
        super().__init__(self._chunks(reply, failed), media_type="text/event-stream", headers=headers)
        self.reply = reply

    @staticmethod
    async def _chunks(reply: httpx2.Response, failed: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in reply.aiter_raw():
                yield chunk
        except httpx2.HTTPError as e:
            yield sse(failed(e).body()).encode()
            yield sse("[DONE]").encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.reply.aclose()


def remote_fallback(url: str, model: str | None, key_env: str) -> Fallback:
    """A fallback at an OpenAI-compatible URL, checked now: it must answer GET /models and list `model` (or
    list only one model, when `model` is None); else a one-line error.

    Args:
        url: its base URL (http://host:port/v1).
        model: the model id to ask for, or None.
        key_env: the environment variable that holds its API key (unset or empty: no key is sent).
    """
    name, base, headers = check_endpoint(url, model, key_env, "--fallback")
    return Fallback(name, base, headers)


def local_fallback(model: LocalModel, limits: Limits) -> Fallback:
    """A fallback served in-process: the model's own app (its own limits and metrics) behind an ASGI transport.

    Args:
        model: the fallback model with its engine.
        limits: its concurrency and size limits.
    """
    app = create_app(model, limits, Metrics())
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    return Fallback(model.name, "http://fallback/v1/", local=model, transport=transport)


class Router:
    """Answers with the small model, then keeps its answer or sends the request to the fallback.

    Args:
        small: the small model (the server's own).
        fallback: where unsure answers go.
        signal_name: the signal compared with the threshold (serve.routing.SIGNALS).
        threshold: a request whose signal is below it goes to the fallback.
        metrics: the server's metrics (the routing counters join its registry).
    """

    def __init__(self, small: LocalModel, fallback: Fallback, signal_name: str, threshold: float,
                 metrics: Metrics) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.small, self.fallback, self.signal_name, self.threshold = small, fallback, signal_name, threshold
        self.kept: dict[int, list[Update]] = {}  # id(job) -> the small model's answer, until replayed
        self.counts = {"small": 0, "fallback": 0}  # requests per route (the share gauge reads them)
        r = metrics.registry
        self.routed = Counter("tinylm_routed_requests", "Routed requests, by the model that answered", ["route"],
                              registry=r)
        for route in ("small", "fallback"):
            self.routed.labels(route)
        self.schema_failures = Counter("tinylm_route_schema_failures", "Requests sent to the fallback because the "
                                       "small model's answer failed their JSON schema or tool call", registry=r)
        self.signals = Histogram("tinylm_route_signal", f"The small model's signal ({signal_name}) per routed "
                                 "request", buckets=SIGNAL_BUCKETS, registry=r)
        share = Gauge("tinylm_fallback_share", "Share of routed requests sent to the fallback", registry=r)
        share.set_function(self._share)

    def install(self, server: Server) -> None:
        """Route `server`'s requests (its answer seam replays the kept answers)."""
        server.router, server.answer = self, self.answer

    async def start(self) -> None:
        await self.fallback.start()

    async def close(self) -> None:
        await self.fallback.close()

    async def route(self, job: Job) -> Response | dict[str, str]:
        """The fallback's Response when the small model is unsure or failed the request's format; else the
        headers of the small model's reply (kept for `answer`)."""
        if not job.samples or job.echo:
            return {ROUTED_TO: "small"}
        async with aclosing(self.small.run(job.samples)) as updates:
            answer = [u async for u in updates]
        done = {i: item for i, item in answer if isinstance(item, Completion)}
        failure = schema_failure(job, [done[i] for i in sorted(done)])
        value = await self._signal(job, done)
        self.signals.observe(value)
        headers = {SIGNAL: f"{value:.6g}"}
        if failure is None and value >= self.threshold:
            self._count("small")
            self.kept[id(job)] = answer
            weakref.finalize(job, self.kept.pop, id(job), None)  # a reply that never started drops it too
            return {**headers, ROUTED_TO: "small"}
        if failure is not None:
            self.schema_failures.inc()
        self._count("fallback")
        return await self.fallback.respond(job, {**headers, ROUTED_TO: "fallback",
                                                 REASON: "schema" if failure else "signal"})

    async def answer(self, job: Job) -> AsyncIterator[Update]:
        """The small model's kept answer to a routed job, or its answer now (a job the router left alone)."""
        kept = self.kept.pop(id(job), None)
        if kept is not None:
            for update in kept:
                yield update
            return
        async with aclosing(self.small.run(job.samples)) as updates:
            async for update in updates:
                yield update

    async def _signal(self, job: Job, done: dict[int, Completion]) -> float:
        """The lowest signal of the job's samples (the least sure answer decides)."""
        values = []
        for i, c in done.items():
            entropies = None
            if self.signal_name == "neg_entropy":  # a forward pass on the engine thread, between its steps
                ids = job.samples[i].prompt_ids
                entropies = await asyncio.wrap_future(self.small.worker.call(
                    lambda ids=ids, c=c: answer_entropies(self.small.model, ids, c.token_ids)))
            values.append(signal(self.signal_name, c.logprobs, entropies))
        return min(values)

    def _count(self, route: str) -> None:
        self.counts[route] += 1
        self.routed.labels(route).inc()

    def _share(self) -> float:
        total = self.counts["small"] + self.counts["fallback"]
        return self.counts["fallback"] / total if total else 0.0


def schema_failure(job: Job, done: list[Completion]) -> str | None:
    """Why a chat answer fails what its request asked for, or None: with response_format json_object or
    json_schema, content that is not JSON valid under the schema; with tools, a reply that is no valid call when
    tool_choice is "required" or names a function, or that tries a call (<tool_call>, or a reply opening with
    `{`, `[` or a code fence) that does not parse into valid calls of the offered tools.

    Args:
        job: the request.
        done: its samples' completions (any failing sample fails the request).
    """
    if job.kind != "chat":
        return None
    fmt = job.body.response_format
    schema = None if fmt is None or fmt.type == "text" else \
        {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.json_schema
    for c in done:
        why = _json_failure(c.text, schema) if schema is not None else None
        why = why or (_call_failure(c.text, job) if job.tools else None)
        if why:
            return why
    return None


def _json_failure(text: str, schema: dict[str, Any]) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "not JSON"
    return None if _valid(value, schema) else "JSON that fails the schema"


def _call_failure(text: str, job: Job) -> str | None:
    _, calls = reply_calls(text, job.tools)
    choice = job.body.tool_choice
    required = choice == "required" or isinstance(choice, ToolChoice)
    tried = "<tool_call>" in text or text.lstrip().startswith(("{", "[", "```"))
    if not calls:
        return "no tool call" if required else "a tool call that does not parse" if tried else None
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in job.tools}
    for call in calls:
        if call["name"] not in tools:
            return f"a call of an unknown tool {call['name']!r}"
        if not _valid(call["arguments"], tools[call["name"]]):
            return f"arguments that fail {call['name']}'s parameters"
    return None


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` is valid under `schema` (a schema jsonschema cannot read judges nothing: valid)."""
    try:
        return jsonschema.validators.validator_for(schema)(schema).is_valid(value)
    except (jsonschema.SchemaError, jsonschema.exceptions.UnknownType, referencing.exceptions.Unresolvable):
        return True

