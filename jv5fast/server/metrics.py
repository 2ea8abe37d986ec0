"""Prometheus metrics for ``GET /metrics``: requests by endpoint and status, latency, texts and tokens (and the
texts truncated or embedded in windows, and those windows), the batcher's batches and queue.

Each app has its own ``CollectorRegistry`` (several apps may share a process, as in tests or one per
replica), reachable as ``app.state.jv5fast_metrics.registry`` for a host that serves or merges it itself.
Requests are counted by an ASGI wrapper outside FastAPI, so 404s, 405s and 500s are counted too.
"""
from __future__ import annotations

import time

from fastapi.responses import Response

ENDPOINTS = ("/v1/embeddings", "/embeddings", "/v1/models", "/health", "/metrics")  # any other path: "other"


class Metrics:
    """Prometheus metrics in the app's own registry; the queue gauges read ``state.batcher`` when scraped."""

    def __init__(self, state):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        lat = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("jv5fast_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.duration = Histogram("jv5fast_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                  buckets=lat, registry=r)
        self.in_progress = Gauge("jv5fast_requests_in_progress", "embedding requests being served", registry=r)
        self.inputs = Counter("jv5fast_inputs", "texts embedded", registry=r)
        self.tokens = Counter("jv5fast_tokens", "tokens embedded (prompts included; every window's)", registry=r)
        self.truncated = Counter("jv5fast_inputs_truncated", "texts cut at max_length (overflow truncate)",
                                 registry=r)
        self.chunked = Counter("jv5fast_inputs_chunked", "texts over max_length embedded in windows (overflow "
                               "chunk)", registry=r)
        self.windows = Counter("jv5fast_chunk_windows", "windows embedded for chunked texts", registry=r)
        self.batch_size = Histogram("jv5fast_batch_size", "texts per forward batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_tokens = Histogram("jv5fast_batch_tokens", "tokens per forward batch", registry=r,
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768))
        self.forward = Histogram("jv5fast_forward_seconds", "time of one forward batch", buckets=lat, registry=r)
        self.queue_wait = Histogram("jv5fast_queue_wait_seconds", "time from queuing to a request's first "
                                    "batch", buckets=lat, registry=r)
        Gauge("jv5fast_queue_depth", "texts (a chunked text: its windows) waiting for a batch", registry=r).set_function(
            lambda: state.batcher.queued_texts if state.batcher else 0)
        Gauge("jv5fast_queue_tokens", "tokens waiting for a batch", registry=r).set_function(
            lambda: state.batcher.queued_tokens if state.batcher else 0)

    def on_batch(self, texts, tokens, forward_s, waits):
        """The batcher's ``observer``: called after each forward batch."""
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
        self.forward.observe(forward_s)
        for w in waits:
            self.queue_wait.observe(w)

    def response(self) -> Response:
        """The registry in Prometheus' text format (the body of ``GET /metrics``)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI wrapper counting every HTTP response by endpoint and status, and timing it."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, t0 = 500, time.perf_counter()

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)


def count_requests(app, metrics):
    """``app`` inside the counting wrapper, keeping ``.state`` reachable for callers that hold the app (and
    the FastAPI app itself as ``.app``, for a host that mounts or extends it)."""
    counted = CountRequests(app, metrics)
    counted.state = app.state
    return counted
