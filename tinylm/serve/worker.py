"""The engine's one thread, and its asyncio face.

`Engine` is single-threaded. `EngineWorker` owns it in a thread of its own that takes submissions,
cancellations and calls from a thread-safe queue between steps and steps while any request waits or
runs; it sleeps on the queue when idle. `LocalModel` is what the HTTP handlers call: `run(samples)` submits
engine requests and yields their TokenEvents and Completions as they come (every engine callback hops to
the event loop with `loop.call_soon_threadsafe`, into a per-call asyncio queue), and cancels whatever is
still going when its caller stops early, such as a client that disconnects; `score(ids)` computes a
prompt's log-probabilities on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

from tinylm.core.errors import TinylmError
from tinylm.formats.checkpoint import Loaded
from tinylm.infer.engine import Completion, Engine, EngineConfig, Request, TokenEvent
from tinylm.model.llama import Llama
from tinylm.serve.metrics import Metrics

Update = tuple[int, "TokenEvent | Completion"]  # (the sample's index in its call, what it produced)


@dataclass
class Ticket:
    """A submitted request: its engine id once the engine thread has taken it."""

    request: Request
    on_error: Callable[[BaseException], object]
    rid: int | None = None


class EngineWorker:
    """Runs an Engine in one background thread; every other thread talks to it through `submit`, `cancel`
    and `call`, which only put a job on its queue.

    Args:
        engine: the engine (used by this thread only from `start` on).
        metrics: tokens counted as they are generated; the gauges and finish reasons updated after every step.
    """

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.tickets: dict[int, Ticket] = {}  # engine id -> ticket, while the request is live
        self.thread = threading.Thread(target=self._run, name="tinylm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop the thread after the jobs already queued (live requests are dropped)."""
        self.inbox.put(("stop", None))
        self.thread.join()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, request: Request, on_error: Callable[[BaseException], object]) -> Ticket:
        """Queue a request for the engine; `on_error` gets a refusal (a TinylmError) or a failed step, from the
        engine thread. The request's own callbacks are called from the engine thread too."""
        ticket = Ticket(request, on_error)
        self.inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End a submitted request at the next chance (a finished one is left alone)."""
        self.inbox.put(("cancel", ticket))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps (the model is not shared between threads)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", (fn, future)))
        return future

    # ----- the thread -----

    def _run(self) -> None:
        while self._take(block=not self.engine.busy):
            if self.engine.busy:
                self._step()
            self._publish()

    def _take(self, block: bool) -> bool:
        """Do every queued job (waiting for one when idle); False once asked to stop."""
        jobs = [self.inbox.get()] if block else []
        while True:
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, arg in jobs:
            if kind == "stop":
                return False
            getattr(self, f"_{kind}")(arg)
        return True

    def _submit(self, ticket: Ticket) -> None:
        # each token is counted before its callback hands it on, so that a client holding its reply finds
        # every token of it counted (counted after the step, a reply could arrive a moment before its count)
        request = dataclasses.replace(ticket.request, on_token=self._counted(ticket.request.on_token))
        try:
            ticket.rid = self.engine.submit(request)
        except TinylmError as e:
            ticket.on_error(e)
            return
        self.tickets[ticket.rid] = ticket
        self.metrics.prompt_tokens.inc(len(ticket.request.prompt_ids))

    def _counted(self, on_token: Callable[[TokenEvent], object] | None) -> Callable[[TokenEvent], object]:
        def count_then_call(event: TokenEvent) -> None:
            self.metrics.generated(1)
            if on_token is not None:
                on_token(event)
        return count_then_call

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.rid is not None:
            self.engine.cancel(ticket.rid)

    def _call(self, job: tuple[Callable[[], Any], concurrent.futures.Future]) -> None:
        fn, future = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # noqa: BLE001 - a bug or out of memory: fail the live requests, keep serving
            traceback.print_exc()
            self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        """Hand `error` to every live request and start over with a fresh engine (the old one's state is
        unknown after a failed step)."""
        for ticket in self.tickets.values():
            self.metrics.finished.labels("error").inc()
            ticket.on_error(error)
        self.tickets.clear()
        self.engine = Engine(self.engine.model, self.engine.tokenizer, self.engine.cfg)

    def _publish(self) -> None:
        """Drop finished requests from the engine and the tickets; update the gauges."""
        for rid in list(self.engine.completions):
            done = self.engine.pop(rid)
            self.tickets.pop(rid, None)
            self.metrics.finished.labels(done.finish_reason).inc()
        self.metrics.running.set(len(self.engine.running))
        self.metrics.queue_depth.set(len(self.engine.waiting))


@torch.no_grad()
def prompt_logprobs(model: Llama, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The log-probability of each prompt token after the first given the ones before it, and the `top` most
    likely tokens at each of those positions (raw logits, as the engine reports generated tokens).

    Args:
        model: the model (eval mode).
        ids: the prompt's ids (at least one).
        top: how many of the most likely tokens to report per position.
    """
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    logp = model(x)[0, :-1].float().log_softmax(-1)  # (T - 1, V): position t predicts token t + 1
    chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()  # (T - 1,)
    if not top:
        return chosen, [[] for _ in chosen]
    best = logp.topk(top, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]


class LocalModel:
    """A loaded model served by its engine thread: the backend the HTTP handlers call.

    Args:
        loaded: the model and tokenizer (checkpoint.load).
        name: the model id clients send.
        cfg: the engine's batching and KV cache.
        metrics: the server's metrics.
    """

    def __init__(self, loaded: Loaded, name: str, cfg: EngineConfig, metrics: Metrics) -> None:
        if loaded.tokenizer is None:
            raise TinylmError("this model has no tokenizer; serving it needs one")
        self.name, self.model, self.tokenizer = name, loaded.model, loaded.tokenizer
        self.context, self.vocab_size = loaded.config.max_seq_len, loaded.config.vocab_size
        self.worker = EngineWorker(Engine(loaded.model, loaded.tokenizer, cfg), metrics)

    async def run(self, samples: list[Request]) -> AsyncIterator[Update]:
        """Decode `samples` together with whatever else is running; yield (index, TokenEvent or Completion)
        as they come, each sample's Completion last. Closing the iterator early cancels the unfinished ones.

        Args:
            samples: engine requests (their callbacks are replaced).
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        tickets = [self.worker.submit(dataclasses.replace(s, on_token=lambda e, i=i: put((i, e)),
                                                          on_finish=lambda c, i=i: put((i, c))),
                                      on_error=lambda e, i=i: put((i, e)))
                   for i, s in enumerate(samples)]
        unfinished = set(range(len(samples)))
        try:
            while unfinished:
                i, item = await updates.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Completion):
                    unfinished.discard(i)
                yield i, item
        finally:
            for i in unfinished:
                self.worker.cancel(tickets[i])

    async def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """`prompt_logprobs` of `ids`, computed on the engine thread between steps."""
        return await asyncio.wrap_future(self.worker.call(lambda: prompt_logprobs(self.model, ids, top)))
