"""The endpoints: ``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models``, ``GET /health``,
``GET /metrics``; each a few lines over the other rooms (auth, validation, the batcher, encoding).

An embeddings request: key → ready? → body (size-limited) → validated call → ``await Batcher.embed``
(cancelled if the client leaves) → encoded off the event loop. ``replace_route`` lets a host that runs this
app (one per replica, say) swap or wrap ``/health`` or ``/metrics`` without copying the others.
"""
from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response
from starlette.routing import Route

from .auth import check_key
from .encoding import json_response, off_loop, response_body
from .errors import BATCHER_ERRORS, from_batcher
from .validation import OFF_LOOP_BYTES, embed_call, parse_request, read_body, served_tasks


def add_routes(app, state, metrics, *, model_name, key_bytes, max_inputs, max_request_bytes) -> None:
    """Serve ``state`` (a ``lifecycle.State``) on ``app``; ``model_name()`` is the name the API shows."""

    @app.get("/health")
    async def health():
        status = state.current()
        return json_response({"status": status}, 200 if status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        return metrics.response()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, key_bytes)
        state.check_ready()
        eng = state.engine
        return json_response({"object": "list", "data": [{
            "id": model_name(), "object": "model", "created": 0, "owned_by": "jv5fast",
            "tasks": served_tasks(eng), "dimensions": eng.dim, "max_input_tokens": eng.max_length}]})

    async def embeddings(request: Request):
        check_key(request, key_bytes)
        state.check_ready()
        body = await read_body(request, max_request_bytes)
        # parsing costs in proportion to the body (up to max_request_bytes): a big one is parsed off the loop
        req = await off_loop(parse_request, body) if len(body) > OFF_LOOP_BYTES else parse_request(body)
        call = embed_call(req, state.engine, model_name(), max_inputs)
        metrics.in_progress.inc()
        try:
            res = await _until_disconnect(request, state.batcher.embed(call.texts, **call.batcher_kwargs()))
        except asyncio.CancelledError:
            if state.status == "draining":  # uvicorn's graceful-shutdown timeout ran out
                state.cut_off += 1
            raise
        finally:
            metrics.in_progress.dec()
        if res is None:  # the client went away; its queued texts were dropped
            return Response(status_code=499)
        metrics.inputs.inc(len(call.texts))
        metrics.tokens.inc(res.tokens)
        metrics.truncated.inc(res.truncated)
        metrics.chunked.inc(res.chunked)
        metrics.windows.inc(res.windows)
        # encoding and serializing are proportional to the response: off the event loop, which serves everyone
        body = await off_loop(response_body, res, call.types, call.single, call.base64_floats, model_name())
        return Response(body, media_type="application/json")

    async def embeddings_route(request: Request):
        try:
            return await embeddings(request)
        except BATCHER_ERRORS as e:
            raise from_batcher(e, state.batcher) from None

    app.add_api_route("/v1/embeddings", embeddings_route, methods=["POST"])
    app.add_api_route("/embeddings", embeddings_route, methods=["POST"])


def replace_route(app, path: str, endpoint, methods=("GET",)):
    """Serve ``path`` with ``endpoint`` instead (e.g. ``/health`` or ``/metrics`` aggregated over replicas);
    returns the endpoint it replaces, for a host that wraps rather than replaces it. ``app`` is the FastAPI
    app (``create_app(...).app``)."""
    old = [r for r in app.router.routes if isinstance(r, Route) and r.path == path]
    if not old:
        raise KeyError(f"no route {path!r} to replace")
    for r in old:
        app.router.routes.remove(r)
    app.add_api_route(path, endpoint, methods=list(methods))
    return old[0].endpoint


async def _until_disconnect(request: Request, coro):
    """Await ``coro``; if the client disconnects first, cancel it (the batcher drops texts not yet started)
    and return None."""
    work = asyncio.ensure_future(coro)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        watch.cancel()
    if not work.done() or work.cancelled():
        return None
    return work.result()
