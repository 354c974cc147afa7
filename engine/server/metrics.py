"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST  # re-exported for app.py
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: a tiny model's steps take ~0.1-1 ms, a 3.8B model's tens of ms
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Requests by endpoint and status, tokens in and out, queue depth, running rows, TTFT and
    inter-token latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "engine_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("engine_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("engine_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("engine_running_rows", "Requests holding a batch row (or running)", registry=r)
        self.ttft = Histogram(
            "engine_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "engine_inter_token_latency_seconds",
            "Between consecutive tokens of a request (streamed: each gap; not streamed: the mean gap)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def bind(self, queued: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the queue depth and running rows from the runner at scrape time."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
