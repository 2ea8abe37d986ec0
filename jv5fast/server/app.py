"""``create_app``: the ASGI app serving one engine, assembled from the rooms of ``jv5fast.server``.

A thin FastAPI layer: the lifespan loads the model and drains (``lifecycle``), the routes validate a request
(``validation``), await the batcher (``jv5fast.scheduler.Batcher``, which knows nothing of HTTP) and encode
its answer (``encoding``); every error is OpenAI's body (``errors``); every response is counted (``metrics``).
"""
from __future__ import annotations

import os

from fastapi import FastAPI

from .auth import _api_key
from .errors import add_error_handlers
from .lifecycle import State, lifespan
from .metrics import Metrics, count_requests
from .routes import add_routes


def create_app(engine=None, *, loader=None, served_model_name=None, api_key=None, max_batch_tokens=None,
               max_wait_ms=2.0, max_queue_tokens="auto", max_inputs=2048, max_request_bytes=8 * 2**20,
               resident_tasks="auto", drain_timeout=30.0, warmup=True, on_load_error=None):
    """The ASGI app serving ``engine`` (an ``Engine``), or the engine ``loader()`` returns. ``loader`` runs in
    a thread at startup, so the port answers (``/health``: 503) while the model loads; an ``engine`` is warmed
    up during startup, so the app serves (``/health``: 200) from its first request. Batching options go to
    ``jv5fast.scheduler.Batcher``; ``max_inputs`` and ``max_request_bytes`` bound a request (413 beyond);
    ``api_key`` (default: ``$JV5FAST_API_KEY``) guards ``/v1/*`` (empty or blank: ValueError).
    ``on_load_error(message)`` is called if loading or warm-up fails. ``app.state.jv5fast`` holds the batcher
    once ready; shutdown happens in the app's lifespan (uvicorn answers in-flight requests first): a load in
    progress is waited for (up to ``drain_timeout``) and never served, then the batcher drains.

    For a host that runs this app itself: ``app.app`` is the FastAPI app inside the request-counting wrapper,
    ``app.state.jv5fast`` its health state (``lifecycle.State``: ``current()``, ``begin_drain``), and
    ``app.state.jv5fast_metrics.registry`` its Prometheus registry; ``routes.replace_route`` swaps or wraps
    ``/health`` or ``/metrics``."""
    if (engine is None) == (loader is None):
        raise ValueError("give exactly one of engine or loader")
    for name, v in (("max_inputs", max_inputs), ("max_request_bytes", max_request_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    api_key = _api_key(api_key)
    state = State()
    metrics = Metrics(state)
    batcher_options = dict(max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                           max_queue_tokens=max_queue_tokens, resident_tasks=resident_tasks,
                           observer=metrics.on_batch)
    run = lifespan(state, engine=engine, loader=loader, warmup=warmup, drain_timeout=drain_timeout,
                   on_load_error=on_load_error, batcher_options=batcher_options)
    app = FastAPI(title="jv5fast", lifespan=run, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jv5fast = state
    app.state.jv5fast_metrics = metrics

    def model_name():
        if served_model_name:
            return served_model_name
        return display_name(getattr(state.engine, "path", None) or "jv5fast")

    add_error_handlers(app)
    add_routes(app, state, metrics, model_name=model_name, key_bytes=api_key.encode() if api_key else None,
               max_inputs=max_inputs, max_request_bytes=max_request_bytes)
    return count_requests(app, metrics)


def display_name(path: str) -> str:
    """A model's name from its folder: the folder name, or for a hub cache snapshot
    (.../models--org--name/snapshots/<sha>) the repo's name, not the hash."""
    path = os.path.normpath(path)
    parent, repo = os.path.dirname(path), os.path.basename(os.path.dirname(os.path.dirname(path)))
    if os.path.basename(parent) == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")
    return os.path.basename(path)
