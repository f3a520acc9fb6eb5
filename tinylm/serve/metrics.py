"""The server's Prometheus metrics, in a registry of its own (so two servers in one process do not share them).

Engine requests are samples (a request with n = 3 makes three). Gauges: engine requests waiting for a batch
row (tinylm_queue_depth) and being decoded (tinylm_running_requests), and generated tokens per second over
the last WINDOW seconds. Counters: prompt and generated tokens, finished engine requests by reason (stop,
length, cancelled, error), HTTP requests by endpoint and status. Histograms: request latency (arrival to
last byte, successful generation requests) and time to the first generated token.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WINDOW = 10.0  # seconds of generated tokens that the tokens/s gauge averages over
# seconds; from a few ms (a short prompt's first token on a small model) to minutes (a long reply under load)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metrics of one server; the engine thread and the HTTP handlers update them (prometheus_client's
    metrics are thread-safe)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("tinylm_queue_depth", "Engine requests waiting for a batch row", registry=r)
        self.running = Gauge("tinylm_running_requests", "Engine requests (one per sample) being decoded", registry=r)
        self.prompt_tokens = Counter("tinylm_prompt_tokens", "Prompt tokens of submitted engine requests", registry=r)
        self.generated_tokens = Counter("tinylm_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("tinylm_finished_requests", "Engine requests ended, by reason", ["reason"], registry=r)
        self.requests = Counter("tinylm_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("tinylm_request_latency_seconds", "Seconds from a request's arrival to its "
                                 "last byte", buckets=BUCKETS, registry=r)
        self.ttft = Histogram("tinylm_time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first generated token", buckets=BUCKETS, registry=r)
        self.rate = Gauge("tinylm_generated_tokens_per_second", f"Tokens generated per second over the last "
                          f"{WINDOW:g} s", registry=r)
        self.rate.set_function(self._tokens_per_second)
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens) as generated
        self._lock = threading.Lock()

    def generated(self, n: int) -> None:
        """Count `n` generated tokens."""
        if n:
            self.generated_tokens.inc(n)
            with self._lock:
                self._recent.append((time.monotonic(), n))

    def _tokens_per_second(self) -> float:
        with self._lock:
            cutoff = time.monotonic() - WINDOW
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
