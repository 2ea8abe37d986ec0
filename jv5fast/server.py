"""``jv5fast serve``: an OpenAI- and Jina-API-compatible embeddings server over ``jv5fast.scheduler.Batcher``.

A thin FastAPI layer, served by uvicorn: read the body (size-limited before parsing), validate it with
pydantic, map its fields onto the batcher's options, await the batcher, shape the response. All batching,
task switching and fairness live in the batcher, which knows nothing of HTTP. Every error is OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``, never a stack trace or a server path.

Endpoints: ``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models``, ``GET /health`` (200 once
the model is loaded and warm; 503 while loading or draining), ``GET /metrics`` (Prometheus).
Needs the ``serve`` extra: ``pip install "jv5fast[serve]"``.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import os
import sys
import threading
import time
from typing import Any, List, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .postprocess import quantize
from .scheduler import BatchFailed, Batcher, Closed, Overloaded

log = logging.getLogger("jv5fast")

# Jina API task -> (adapter, prompt name). The query side of retrieval gets "Query: ", all else "Document: ".
JINA_TASKS = {
    "retrieval.query": ("retrieval", "query"),
    "retrieval.passage": ("retrieval", "document"),
    "text-matching": ("text-matching", "document"),
    "clustering": ("clustering", "document"),
    "separation": ("clustering", "document"),  # the name jina-embeddings-v3 used
    "classification": ("classification", "document"),
}
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
ENCODING_FORMATS = ("float", "base64")
MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request plus the Jina API's fields; anything else is refused (a misspelt
    option would otherwise be ignored silently)."""
    model_config = ConfigDict(extra="forbid")
    input: Any                                                   # str or list of str (checked by hand)
    model: Optional[StrictStr] = None
    encoding_format: Optional[StrictStr] = None                  # float | base64 (OpenAI)
    dimensions: Optional[StrictInt] = None                       # Matryoshka: truncate, then normalize
    user: Optional[StrictStr] = None                             # accepted and ignored, as OpenAI logs it
    task: Optional[StrictStr] = None                             # Jina: retrieval.query, ...
    embedding_type: Optional[Union[StrictStr, List[StrictStr]]] = None  # Jina: float|base64|binary|ubinary
    normalized: StrictBool = True                                # Jina (default false there; true here)
    truncate: StrictBool = True                                  # Jina (default false there; true here)
    late_chunking: StrictBool = False                            # Jina; only false is served


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _json(obj, status=200):
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


class _Metrics:
    """Prometheus metrics in the app's own registry (several apps may share a process)."""

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
        self.tokens = Counter("jv5fast_tokens", "tokens embedded (prompts included)", registry=r)
        self.batch_size = Histogram("jv5fast_batch_size", "texts per forward batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_tokens = Histogram("jv5fast_batch_tokens", "tokens per forward batch", registry=r,
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768))
        self.forward = Histogram("jv5fast_forward_seconds", "time of one forward batch", buckets=lat, registry=r)
        self.queue_wait = Histogram("jv5fast_queue_wait_seconds", "time from queuing to a request's first "
                                    "batch", buckets=lat, registry=r)
        Gauge("jv5fast_queue_depth", "texts waiting for a batch", registry=r).set_function(
            lambda: state.batcher.queued_texts if state.batcher else 0)
        Gauge("jv5fast_queue_tokens", "tokens waiting for a batch", registry=r).set_function(
            lambda: state.batcher.queued_tokens if state.batcher else 0)

    def on_batch(self, texts, tokens, forward_s, waits):
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
        self.forward.observe(forward_s)
        for w in waits:
            self.queue_wait.observe(w)


class _State:
    def __init__(self):
        self.batcher = None
        self.engine = None
        self.status = "loading"   # loading | ready | draining | failed
        self.error = None
        self.cut_off = 0          # requests cancelled when the drain timed out
        self.drain_deadline = None  # time.monotonic() by which a signalled shutdown must be done
        self.loading = None       # the thread loading and warming the model
        self.stopping = False     # shutdown began: a load that finishes now is not served (set under lock)
        self.lock = threading.Lock()

    def threads_alive(self):
        """Names of this app's threads that may still be inside native (torch) code: the interpreter must
        not finalize under them (a daemon thread re-taking the GIL from C++ then aborts the process)."""
        threads = [self.loading, getattr(self.batcher, "_thread", None)]
        return [t.name for t in threads if t is not None and t.is_alive()]

    def current(self) -> str:
        """The status, after noticing a scheduler thread that died since the last look."""
        if self.status == "ready" and self.batcher is not None and self.batcher.failed:
            self.status, self.error = "failed", self.batcher.failed
        return self.status


_ENDPOINTS = ("/v1/embeddings", "/embeddings", "/v1/models", "/health", "/metrics")


class _Count:
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
            endpoint = path if path in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)


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
    progress is waited for (up to ``drain_timeout``) and never served, then the batcher drains."""
    if (engine is None) == (loader is None):
        raise ValueError("give exactly one of engine or loader")
    for name, v in (("max_inputs", max_inputs), ("max_request_bytes", max_request_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    api_key = _api_key(api_key)
    key_bytes = api_key.encode() if api_key else None
    state = _State()
    metrics = _Metrics(state)

    def load():
        try:
            eng = engine if engine is not None else loader()
            if warmup and not state.stopping:
                eng.warmup()
            with state.lock:
                if state.stopping:  # shut down while loading: never start serving (nor a scheduler thread)
                    log.info("jv5fast serve: the model finished loading after shutdown began; not serving it")
                    return
                state.batcher = Batcher(eng, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                                        max_queue_tokens=max_queue_tokens, resident_tasks=resident_tasks,
                                        observer=metrics.on_batch)
                state.engine = eng
                state.status = "ready"
            log.info("jv5fast serve: ready (%s)", eng)
        except BaseException as e:  # noqa: BLE001 — reported, and the server exits
            state.status, state.error = "failed", f"{type(e).__name__}: {e}"
            log.error("jv5fast serve: loading the model failed: %s", state.error)
            if on_load_error is not None:
                on_load_error(state.error)

    def stop_loading(timeout) -> bool:
        """Stop a load in progress at its next safe point (before warm-up, before serving) and wait for it."""
        with state.lock:
            state.stopping = True
        state.loading.join(timeout)
        return not state.loading.is_alive()

    def drain_left():  # what is left of the drain time after uvicorn answered in-flight requests
        deadline = state.drain_deadline
        return drain_timeout if deadline is None else max(0.0, deadline - time.monotonic())

    async def lifespan(app):
        loop = asyncio.get_running_loop()
        # Not a daemon: a daemon thread still inside torch's C++ when the interpreter finalizes is killed
        # as it re-takes the GIL, and that unwinds a noexcept C++ frame ("terminate called without an
        # active exception", SIGABRT). Shutdown waits for it below; the interpreter would wait at exit too.
        state.loading = threading.Thread(target=load, name="jv5fast-load")
        state.loading.start()
        if engine is not None:  # an engine already loaded: warm it before serving (one short batch; CUDA
            await loop.run_in_executor(None, state.loading.join)  # graphs: bounded), so the port opens ready
        try:
            yield
        finally:
            if state.status != "failed":
                state.status = "draining"
            if not await loop.run_in_executor(None, stop_loading, drain_left()):
                log.error("jv5fast serve: the model was still loading when the drain time ran out")
            if state.batcher is not None:
                await loop.run_in_executor(None, state.batcher.close, drain_left())

    app = FastAPI(title="jv5fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jv5fast = state

    def name():
        if served_model_name:
            return served_model_name
        return display_name(getattr(state.engine, "path", None) or "jv5fast")

    def check_key(request: Request):
        if key_bytes is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        scheme, _, given = auth.partition(" ")
        # headers arrive decoded as latin-1: encoding back gives the bytes the client sent (a UTF-8 key too)
        if not hmac.compare_digest(given.strip().encode("latin-1"), key_bytes) or scheme.lower() != "bearer":
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def check_ready():
        if state.current() != "ready":
            failed = ("the embedding scheduler failed; see the server log" if state.batcher is not None
                      else "the model failed to load")
            why = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": failed}[state.status]
            raise APIError(503, f"unavailable: {why}", type_="service_unavailable", code=state.status)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"bad Content-Length header {length!r}")
            if int(length) > max_request_bytes:
                raise APIError(413, f"request body of {int(length)} bytes is over this server's limit of "
                               f"{max_request_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise APIError(413, f"request body is over this server's limit of {max_request_bytes} bytes",
                               code="request_too_large")
        return bytes(body)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(Exception)
    async def _internal(request, err):  # never a stack trace or a path on the wire
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal server error ({type(err).__name__}); see the server log",
                              type_="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):  # unknown paths (404), wrong methods (405): OpenAI's body too
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                              code=str(err.status_code), headers=getattr(err, "headers", None))

    @app.get("/health")
    async def health():
        status = state.current()
        return _json({"status": status}, 200 if status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        check_ready()
        eng = state.engine
        return _json({"object": "list", "data": [{
            "id": name(), "object": "model", "created": 0, "owned_by": "jv5fast",
            "tasks": [t for t, (adapter, _) in JINA_TASKS.items() if adapter in eng.tasks],
            "dimensions": eng.dim, "max_input_tokens": eng.max_length}]})

    async def embeddings(request: Request):
        check_key(request)
        check_ready()
        body = await read_body(request)
        # parsing costs in proportion to the body (up to max_request_bytes): a big one is parsed off the loop
        req = await _off_loop(_parse_request, body) if len(body) > _OFF_LOOP_BYTES else _parse_request(body)
        state_engine = state.engine
        if req.late_chunking:
            raise APIError(400, "late_chunking=true is not supported by this server; send false or leave it out",
                           param="late_chunking")
        if req.model is not None and req.model not in (name(), name().rsplit("/", 1)[-1], state_engine.path):
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {name()!r}",
                           param="model", code="model_not_found")
        texts = _texts(req.input, max_inputs)
        adapter, prompt_name = _task(req.task, state_engine)
        k = _dimensions(req.dimensions, state_engine)
        types = _embedding_types(req.embedding_type)
        if req.encoding_format is not None and req.encoding_format not in ENCODING_FORMATS:
            raise APIError(400, f"encoding_format {req.encoding_format!r} is not valid; choose one of "
                           f"{list(ENCODING_FORMATS)}", param="encoding_format")
        metrics.in_progress.inc()
        try:
            res = await _until_disconnect(request, state.batcher.embed(
                texts, task=adapter, prompt_name=prompt_name, truncate_dim=k, normalize=req.normalized,
                truncate=req.truncate))
        except asyncio.CancelledError:
            if state.status == "draining":  # uvicorn's graceful-shutdown timeout ran out
                state.cut_off += 1
            raise
        finally:
            metrics.in_progress.dec()
        if res is None:  # the client went away; its queued texts were dropped
            return Response(status_code=499)
        metrics.inputs.inc(len(texts))
        metrics.tokens.inc(res.tokens)
        single = req.embedding_type is None or isinstance(req.embedding_type, str)
        # encoding and serializing are proportional to the response: off the event loop, which serves everyone
        body = await _off_loop(_response_body, res, types, single, req.encoding_format == "base64", name())
        return Response(body, media_type="application/json")

    async def embeddings_route(request: Request):
        try:
            return await embeddings(request)
        except (Overloaded,) as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(int(e.retry_after))}) from None
        except Closed as e:
            failed = state.batcher is not None and state.batcher.failed
            raise APIError(503, str(e), type_="service_unavailable", code="failed" if failed else "draining") from None
        except FloatingPointError as e:
            raise APIError(500, str(e), type_="server_error", code="non_finite_embedding") from None
        except BatchFailed as e:
            raise APIError(500, str(e), type_="server_error", code="batch_failed") from None
        except (ValueError, TypeError) as e:  # the batcher's checks (e.g. truncate=false, over-long input)
            raise APIError(400, str(e)) from None

    app.add_api_route("/v1/embeddings", embeddings_route, methods=["POST"])
    app.add_api_route("/embeddings", embeddings_route, methods=["POST"])
    return _wrap(app, metrics)


def _wrap(app, metrics):
    """The counting wrapper, keeping ``.state`` reachable for callers that hold the app."""
    counted = _Count(app, metrics)
    counted.state = app.state
    return counted


def _api_key(api_key, name="api_key"):
    """The configured API key, stripped as the client's key is (None: ``$JV5FAST_API_KEY``; unset: no key).
    An empty or blank key is an error, never "no authentication" (``--api-key "$KEY"`` with KEY unset);
    ``name`` is what the message calls the argument (the CLI's ``--api-key``)."""
    where = name
    if api_key is None:
        api_key, where = os.environ.get("JV5FAST_API_KEY"), "$JV5FAST_API_KEY"
        if api_key is None:
            return None
    if not isinstance(api_key, str):
        raise TypeError(f"{name} must be a str or None, got {type(api_key).__name__}")
    if not api_key.strip():
        raise ValueError(f"{where} is empty or blank ({api_key!r}); give the key clients must send, or leave "
                         f"{name} and JV5FAST_API_KEY unset to serve without authentication")
    return api_key.strip()


def display_name(path: str) -> str:
    """A model's name from its folder: the folder name, or for a hub cache snapshot
    (.../models--org--name/snapshots/<sha>) the repo's name, not the hash."""
    path = os.path.normpath(path)
    parent, repo = os.path.dirname(path), os.path.basename(os.path.dirname(os.path.dirname(path)))
    if os.path.basename(parent) == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")
    return os.path.basename(path)


_OFF_LOOP_BYTES = 65536  # bodies up to this size are parsed on the event loop (a thread hop costs more)


async def _off_loop(fn, *args):
    """``fn(*args)`` in a worker thread: work proportional to a request's size never stalls the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _parse_request(body: bytes) -> EmbeddingRequest:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON here: nested too deeply") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(raw).__name__}")
    try:
        return EmbeddingRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "body"
        if err["type"] == "missing":
            msg = f"missing field '{field}'"
        elif err["type"] == "extra_forbidden":
            msg = (f"unknown field '{field}'; valid fields: {list(EmbeddingRequest.model_fields)}")
        else:
            msg = f"field '{field}': {err['msg']} (got {err.get('input')!r:.60})"
        raise APIError(400, msg, param=field.split(".")[0]) from None


def _response_body(res, types, single, base64_floats, model) -> bytes:
    encoded = {t: _encode(res.embeddings, t, base64_floats) for t in types}
    data = [{"object": "embedding", "index": i,
             "embedding": encoded[types[0]][i] if single else {t: encoded[t][i] for t in types}}
            for i in range(res.embeddings.shape[0])]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": res.tokens, "total_tokens": res.tokens}},
                      separators=(",", ":")).encode()


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


def _texts(value, max_inputs):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise APIError(400, f"'input' must be a string or a list of strings, got {type(value).__name__}",
                       param="input")
    if not value:
        raise APIError(400, "'input' is an empty list; send at least one string", param="input")
    if len(value) > max_inputs:
        raise APIError(413, f"'input' has {len(value)} items; this server takes at most {max_inputs} per "
                       f"request", param="input", code="too_many_inputs")
    for i, t in enumerate(value):
        if not isinstance(t, str):
            what = "token ids are not accepted, send text" if isinstance(t, (int, list)) else "expected a string"
            raise APIError(400, f"input[{i}] is {type(t).__name__} ({t!r:.40}); {what}", param="input")
    return value


def _task(task, engine):
    """(adapter, prompt name) for a Jina task (None: the engine's task, document prompt)."""
    doc = "document" if "document" in engine.prompts else None
    if task is None:
        return None, doc
    valid = [t for t, (adapter, _) in JINA_TASKS.items() if adapter in engine.tasks]
    if task not in JINA_TASKS or task not in valid:
        if not valid:
            raise APIError(400, f"task {task!r}: this model serves one task that its files do not name; omit "
                           f"'task'", param="task")
        raise APIError(400, f"task {task!r} is not valid; choose one of {valid}", param="task")
    adapter, side = JINA_TASKS[task]
    return adapter, side if side in engine.prompts else None


def _dimensions(dimensions, engine):
    if dimensions is None:
        return None
    if not 1 <= dimensions <= engine.dim:
        dims = [d for d in MATRYOSHKA if d <= engine.dim]
        raise APIError(400, f"dimensions={dimensions} is out of range 1..{engine.dim}; the Matryoshka "
                       f"dimensions are {dims}", param="dimensions")
    return dimensions


def _embedding_types(value):
    """The distinct embedding types asked for, in the order first named (so at most len(EMBEDDING_TYPES)):
    a name listed twice is collapsed, as the response has one key per type and each is encoded once."""
    if value is None:
        value = "float"
    types = [value] if isinstance(value, str) else value
    if not types:
        raise APIError(400, "embedding_type is an empty list", param="embedding_type")
    types = list(dict.fromkeys(types))
    for t in types:
        if t not in EMBEDDING_TYPES:
            raise APIError(400, f"embedding_type {t!r} is not valid; choose one of {list(EMBEDDING_TYPES)}",
                           param="embedding_type")
    return types


def _encode(emb: np.ndarray, kind: str, base64_floats: bool):
    """Rows of float32 ``emb`` in the wire form of ``kind``: float lists (or base64 of little-endian float32
    when the client asked encoding_format=base64, or kind 'base64'), binary/ubinary as int lists."""
    if kind in ("binary", "ubinary"):
        return quantize(emb, kind).tolist()
    if kind == "base64" or base64_floats:
        le = emb.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in le]
    return emb.tolist()


def listen_socket(host: str, port: int):
    """A listening TCP socket on ``host:port`` (0: any free port), bound before the model loads."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose proto says
    # TCP, and a socket made with proto 0 passes 0 on; with Nagle on, every keep-alive response waits ~40 ms
    # for the client's delayed ACK (measured: GET /health 44 ms instead of 1.3 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def serve(model, *, host="127.0.0.1", port=8080, device=None, dtype=None, backend="torch", max_length=None,
          onnx_quantize=None, quantize=None, log_level="info", drain_timeout=30.0, cpu_precision="fp32",
          **app_options) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code (0 after a clean drain). The socket is
    bound first (``port=0``: an ephemeral one) and its address printed as ``listening on http://HOST:PORT``,
    then the model loads while ``/health`` answers 503."""
    import signal
    import socket

    import uvicorn

    from .engine import Engine

    sock = listen_socket(host, port)
    family = sock.family
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"jv5fast serve: listening on http://{shown}:{bound} (loading {model})", flush=True)

    failed = []
    server = None

    def load_error(msg):
        failed.append(msg)
        if server is not None:
            server.should_exit = True

    if not app_options.get("served_model_name"):  # a folder's name, or the hub id as given (not its snapshot hash)
        app_options["served_model_name"] = display_name(model) if os.path.isdir(model) else model
    app = create_app(loader=lambda: Engine(model, device=device, dtype=dtype, backend=backend, max_length=max_length,
                                          onnx_quantize=onnx_quantize, quantize=quantize,
                                          cpu_precision=cpu_precision),
                     drain_timeout=drain_timeout, on_load_error=load_error, **app_options)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            st = app.state.jv5fast
            if st.status == "ready":
                st.status = "draining"  # /health says 503 from the first signal on
            if st.drain_deadline is None:
                st.drain_deadline = time.monotonic() + drain_timeout
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout, lifespan="on",
                            access_log=False)
    server = _Server(config)
    if failed:
        return 1
    # uvicorn re-raises the signal it stopped on once it is done; a no-op handler makes that a clean exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():  # a Python caller gets its Ctrl-C back
            signal.signal(sig, handler)
    st = app.state.jv5fast
    if failed:
        print(f"jv5fast serve: error: loading the model failed: {failed[0]}", flush=True)
        return 1
    code = 0
    if st.cut_off:
        print(f"jv5fast serve: error: {st.cut_off} requests were still running after --drain-timeout "
              f"{drain_timeout:g} s and were cut off", flush=True)
        code = 1
    stuck = st.threads_alive()
    if "jv5fast-load" in stuck:
        print(f"jv5fast serve: error: the model was still loading after --drain-timeout {drain_timeout:g} s; "
              f"exiting without waiting for it", flush=True)
    if stuck:
        # a thread inside torch's C++ cannot be stopped, and finalizing the interpreter under it aborts
        # (SIGABRT): end the process now, as the kernel would, past nothing that still needs to run
        log.error("jv5fast serve: exiting with threads still running: %s", ", ".join(stuck))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if code == 0:
        print("jv5fast serve: stopped", flush=True)
    return code
