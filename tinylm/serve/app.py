"""The HTTP app (FastAPI on uvicorn): OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
/health and Prometheus' /metrics.

A request is read (at most max_body_bytes, else 413), checked (parse_body) and turned into a Job
(prepare.Preparer), admitted (at most max_concurrent + max_queue engine requests in the server, else
429), and answered by `Server.answer(job)`: the one seam between the endpoints and the model, an async
iterator of (sample, TokenEvent or Completion), so that a router can wrap it (answer with a small model,
fall back to another) without touching the endpoints. Replies stream as server-sent events with `stream:
true`. A client that disconnects ends its engine requests at once: the streaming response is cancelled
by Starlette when the connection drops, a plain one by a task that watches the connection; either way
closing the answer's iterator cancels what is still running.

Routing (serve.router) plugs in as `Server.router`: before the reply, its `route(job)` answers with the small
model and either hands back another model's whole Response (the request went to the fallback) or the headers
of the small model's reply, which its `answer` then replays; it starts and stops with the server.

Errors are OpenAI's body {"error": {"message", "type", "param", "code"}}; after one, the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import traceback
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tinylm.core.errors import TinylmError
from tinylm.infer.engine import Completion, TokenEvent
from tinylm.serve.metrics import CONTENT_TYPE, Metrics
from tinylm.serve.prepare import Job, Preparer, reply_calls
from tinylm.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    TokenText,
    new_id,
    now,
    parse_body,
    sse,
    usage,
)
from tinylm.serve.worker import LocalModel, Update

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Limits:
    """What one server takes at once.

    Args:
        max_concurrent: engine requests (one per sample) decoded together: the engine's batch.
        max_queue: engine requests that may wait for a batch row beyond them; a request that would exceed
            max_concurrent + max_queue is refused with 429.
        max_body_bytes: the largest request body (413 beyond).
    """

    max_concurrent: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1_000_000


def create_app(model: LocalModel, limits: Limits, metrics: Metrics) -> FastAPI:
    """The app serving `model`; its lifespan starts and stops the engine thread.

    Args:
        model: the model and its engine thread (LocalModel).
        limits: concurrency and size limits.
        metrics: the server's metrics (model's worker updates the same ones).
    """
    server = Server(model, limits, metrics)
    app = FastAPI(title="tinylm", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_CountRequests, metrics=metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TinylmError, _user_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle(request, CompletionRequest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        if name != model.name:
            raise ApiError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return server.model_card()

    @app.get("/health")
    async def health() -> Response:
        ok = model.worker.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or a one-line TinylmError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise TinylmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise TinylmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class Router(Protocol):
    """What the server asks of a router (serve.router.Router)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def route(self, job: Job) -> Response | dict[str, str]:
        """Another model's Response to the request, or the headers of the small model's own reply."""


class Server:
    """The endpoints' state: the model, the limits, the admitted count, and the `answer` seam.

    Args:
        model, limits, metrics: as create_app takes them.
    """

    def __init__(self, model: LocalModel, limits: Limits, metrics: Metrics) -> None:
        self.model, self.limits, self.metrics = model, limits, metrics
        self.prepare = Preparer(model.name, model.tokenizer, model.context, model.vocab_size,
                                limits.max_concurrent + limits.max_queue)
        self.tokens = TokenText(model.tokenizer)
        self.admitted = 0  # engine requests of the requests being answered (touched by the event loop only)
        self.created = now()
        # The seam between the endpoints and the model: Job -> (sample index, TokenEvent | Completion), each
        # sample's Completion last. A router replaces it with one that wraps it.
        self.answer: Callable[[Job], AsyncIterator[Update]] = lambda job: model.run(job.samples)
        self.router: Router | None = None  # routing (serve.router installs itself), or None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.model.worker.start()
        try:
            if self.router is not None:
                await self.router.start()
            try:
                yield
            finally:
                if self.router is not None:
                    await self.router.close()
        finally:
            self.model.worker.close()

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "tinylm",
                "max_model_len": self.model.context}

    async def handle(self, request: Request, kind: type) -> Response:
        """Read, check, prepare, admit and answer one chat or completions request; a failure of the server's own
        (a bug, a failed engine step) is a 500 in OpenAI's body, and the connection stays usable."""
        try:
            return await self._handle(request, kind)
        except (ApiError, TinylmError):
            raise
        except Exception as e:  # noqa: BLE001 - answered, not raised: uvicorn would drop the connection
            raise _failure(e) from None

    async def _handle(self, request: Request, kind: type) -> Response:
        start = time.perf_counter()
        body = parse_body(await _read_body(request, self.limits.max_body_bytes), kind)
        job = await (self.prepare.chat(body) if kind is ChatRequest else self.prepare.completion(body))
        release = self._admit(len(job.samples))
        headers: dict[str, str] = {}
        if self.router is not None:
            routed = await self._route(request, job, release)
            if isinstance(routed, Response):
                return routed
            headers = routed
        if body.stream:
            events = self._chat_events(job, start) if job.kind == "chat" else self._completion_events(job, start)
            return _EventStream(events, release, headers)
        try:
            reply = await _unless_disconnected(request, self._reply(job, start))
        finally:
            release()
        # 499: nginx's "client closed"
        return JSONResponse(reply, headers=headers) if reply is not None else Response(status_code=499)

    async def _route(self, request: Request, job: Job, release: Callable[[], None]) -> Response | dict[str, str]:
        """The router's decision (see Router); the small model's samples are counted out once another model
        answers, or once the client has gone."""
        try:
            routed = await _unless_disconnected(request, self.router.route(job))
        except BaseException:
            release()
            raise
        if not isinstance(routed, dict):
            release()
        return Response(status_code=499) if routed is None else routed

    def _admit(self, n: int) -> Callable[[], None]:
        """Count n engine requests in, or refuse with 429; returns the call that counts them out (once)."""
        capacity = self.limits.max_concurrent + self.limits.max_queue
        if self.admitted + n > capacity:
            raise ApiError(429, f"The server is busy: {self.admitted} samples are running or queued, and it holds "
                           f"{capacity}. Retry later.", code="rate_limit_exceeded", type="requests")
        self.admitted += n
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done, self.admitted = True, self.admitted - n
        return release

    # ----- answering -----

    async def _updates(self, job: Job, start: float) -> AsyncIterator[Update]:
        """The answer's updates; records the time to the first token, and makes a refused sample a 400."""
        first = True
        try:
            async with aclosing(self.answer(job)) as updates:
                async for update in updates:
                    if first and isinstance(update[1], TokenEvent):
                        self.metrics.ttft.observe(time.perf_counter() - start)
                        first = False
                    yield update
        except TinylmError as e:
            raise ApiError(400, str(e)) from None

    async def _scores(self, job: Job) -> list[tuple[list[float], list[list[tuple[int, float]]]]] | None:
        """Each prompt's log-probabilities, for a completion with echo and logprobs."""
        if not (job.echo and job.top_logprobs is not None):
            return None
        return [await self.model.score(ids, job.top_logprobs) for ids in job.prompts]

    async def _reply(self, job: Job, start: float) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        scores = await self._scores(job)
        finals: dict[int, Completion] = {}
        async for i, item in self._updates(job, start):
            if isinstance(item, Completion):
                finals[i] = item
        # a completion that asks for no new tokens (echo only) has no samples: its choices are the prompts
        done = [finals.get(i) or Completion(-1, [], "", "length", [], [], 0) for i in range(job.n * len(job.prompts))]
        if job.kind == "chat":
            choices = [self._chat_choice(job, i, c) for i, c in enumerate(done)]
            obj = "chat.completion"
        else:
            choices = [self._completion_choice(job, i, c, scores) for i, c in enumerate(done)]
            obj = "text_completion"
        return {"id": new_id("chatcmpl" if job.kind == "chat" else "cmpl"), "object": obj, "created": now(),
                "model": self.model.name, "choices": choices, "usage": _usage(job, done), "system_fingerprint": None}

    def _chat_choice(self, job: Job, i: int, c: Completion) -> dict[str, Any]:
        message, reason = self._message(job, c)
        return {"index": i, "message": message, "finish_reason": reason,
                "logprobs": self._chat_logprobs(job, c.token_ids, c.logprobs, c.top_logprobs)}

    def _message(self, job: Job, c: Completion) -> tuple[dict[str, Any], str]:
        """A chat choice's message (content, tool calls) and finish reason."""
        text, calls = (c.text, []) if job.tools is None else reply_calls(c.text, job.tools)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = [{"id": new_id("call"), "type": "function", "function": {
                "name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}} for call in calls]
        return message, "tool_calls" if calls else c.finish_reason

    def _chat_logprobs(self, job: Job, tokens: list[int], logprobs: list[float],
                       tops: list[list[tuple[int, float]]]) -> dict[str, Any] | None:
        if job.top_logprobs is None:
            return None
        return {"content": [self.tokens.chat_entry(t, lp, top) for t, lp, top in zip(tokens, logprobs, tops)]}

    def _completion_choice(self, job: Job, i: int, c: Completion, scores: list | None) -> dict[str, Any]:
        p = i // job.n
        head = job.prompt_texts[p] if job.echo else ""
        logprobs = None
        if job.top_logprobs is not None:
            tokens, lps, tops = list(c.token_ids), list(c.logprobs), list(c.top_logprobs)
            if scores is not None:
                chosen, best = scores[p]
                tokens, lps, tops = job.prompts[p] + tokens, [None, *chosen] + lps, [None, *best] + tops
            logprobs = self.tokens.completion_logprobs(tokens, lps, tops, 0)
        return {"index": i, "text": head + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    # ----- streaming -----

    def _chat_events(self, job: Job, start: float) -> AsyncIterator[str]:
        """A chat reply as server-sent events: the role, content deltas (held to the end when tools are offered,
        since a reply is a call or text only once it is complete), a last chunk with the finish reason."""
        head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": self.model.name,
                "system_fingerprint": None}

        def chunk(i: int, delta: dict[str, Any], logprobs: Any = None, reason: str | None = None) -> str:
            return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

        async def events() -> AsyncIterator[str]:
            done: dict[int, Completion] = {}
            for i in range(len(job.samples)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, item in self._updates(job, start):
                if isinstance(item, TokenEvent) and job.tools is None and (item.text or job.top_logprobs is not None):
                    yield chunk(i, {"content": item.text}, self._chat_logprobs(job, [item.token], [item.logprob],
                                                                               [item.top_logprobs]))
                elif isinstance(item, Completion):
                    done[i] = item
                    yield chunk(i, *self._last_delta(job, item))
            if job.body.stream_options is not None and job.body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": _usage(job, [done[i] for i in sorted(done)])})
        return _with_done(events())

    def _last_delta(self, job: Job, c: Completion) -> tuple[dict[str, Any], Any, str]:
        """The last chunk of a streamed chat choice: empty, or (with tools) the whole reply."""
        if job.tools is None:
            return {}, None, c.finish_reason
        message, reason = self._message(job, c)
        delta = {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
        return delta, self._chat_logprobs(job, c.token_ids, c.logprobs, c.top_logprobs), reason

    def _completion_events(self, job: Job, start: float) -> AsyncIterator[str]:
        """A completion as server-sent events: the echoed prompt first (with its log-probabilities), then each
        token's text, then the finish reason."""
        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model.name}
        offsets = [0] * (job.n * len(job.prompts))

        def chunk(i: int, text: str, tokens: list[int] = (), lps: list = (), tops: list = (),
                  reason: str | None = None) -> str:
            logprobs = None
            if job.top_logprobs is not None:
                logprobs = self.tokens.completion_logprobs(list(tokens), list(lps), list(tops), offsets[i])
            offsets[i] += len(text)
            return sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]})

        async def events() -> AsyncIterator[str]:
            scores, done = await self._scores(job), {}
            for i in range(len(offsets)):
                p = i // job.n
                if job.echo:
                    chosen, best = scores[p] if scores else ([], [])
                    yield chunk(i, job.prompt_texts[p], job.prompts[p], [None, *chosen], [None, *best],
                                None if job.samples else "length")
                elif not job.samples:
                    yield chunk(i, "", reason="length")
            async for i, item in self._updates(job, start):
                if isinstance(item, TokenEvent):
                    yield chunk(i, item.text, [item.token], [item.logprob], [item.top_logprobs])
                else:
                    done[i] = item
                    yield chunk(i, "", reason=item.finish_reason)
            if job.body.stream_options is not None and job.body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": _usage(job, [done[i] for i in sorted(done)])})
        return _with_done(events())


def _usage(job: Job, done: list[Completion]) -> dict[str, Any]:
    """Token counts: each prompt once, every generated token (an end-of-turn token included, as vLLM counts)."""
    cached = sum(c.cached_tokens for c in done[::job.n]) if done else 0
    return usage(sum(len(p) for p in job.prompts), sum(len(c.token_ids) for c in done), cached)


async def _with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, then `data: [DONE]`; an error after the response began becomes an error event."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except ApiError as e:
        yield sse(e.body())
    except TinylmError as e:
        yield sse(ApiError(400, str(e)).body())
    except Exception as e:  # noqa: BLE001 - the stream ends with the error, the server goes on
        yield sse(_failure(e).body())
    yield sse("[DONE]")


def _failure(e: Exception) -> ApiError:
    """A failure of the server's own, logged with its traceback, as OpenAI's 500."""
    traceback.print_exception(e)
    return ApiError(500, f"The server failed: {type(e).__name__}: {e}", type="server_error")


class _EventStream(StreamingResponse):
    """A server-sent event stream that counts its engine requests out however it ends (finished, client gone,
    or never started)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            await self.body_iterator.aclose()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, or 413 once it is longer than `limit` bytes (declared or read)."""
    too_big = ApiError(413, f"The request body is larger than this server's limit of {limit} bytes.", None,
                       "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None after cancelling it when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


class _CountRequests:
    """ASGI middleware: counts every answered request by endpoint and status, and times the successful
    generation requests to their last byte (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            if status[0] == 200 and path.startswith("/v1/") and path != "/v1/models":
                self.metrics.latency.observe(time.perf_counter() - start)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _user_error(request: Request, e: TinylmError) -> JSONResponse:
    """A one-line TinylmError from below (a chat template's own error, a tokenizer without an end-of-turn
    token) is the client's request at fault."""
    return await _api_error(request, ApiError(400, str(e)))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) in OpenAI's body."""
    return await _api_error(request, ApiError(e.status_code, str(e.detail)))


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    """The last resort, outside the generation endpoints (Starlette re-raises the error after it, so uvicorn
    closes the connection)."""
    return await _api_error(request, _failure(e))
