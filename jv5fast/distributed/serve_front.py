"""The HTTP ingress of ``jv5fast.distributed.serve``: forward each request to a replica, and answer ``/health`` and
``/metrics`` for all of them.

The front owns no engine. It reads the body (at most ``max_request_bytes`` + 1 bytes: the replica's app then
refuses it with its own 413, as ``jv5fast serve`` does) and hands method, path, headers and body to a ``Replica``
through a DeploymentHandle; the replica's ``jv5fast serve`` app answers. A replica that dies mid-request
(``ray.kill``, a lost node: RayActorError) or says it is draining has the request sent again, to another replica
(embedding is idempotent), up to ``max_retries`` times; all within ``request_timeout_s``, after which the answer is
a 503 in OpenAI's error body, so no request hangs. ``GET /health`` and ``GET /metrics`` come from the Registry:
200 when at least one replica is ready, else 503, with every replica by name and status (a failed load with its
error); metrics are each replica's own, with a ``replica`` label (not summed: a counter of a replica that goes
away then ends instead of making the sum go down).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from .serve_replica import replica_name, within

log = logging.getLogger("jv5fast")

REPLICA_STATES = ("ready", "loading", "draining", "failed", "unreachable")


def error_response(status, message, type_="service_unavailable", code=None, headers=()) -> dict:
    """A response (as ``Replica.forward`` returns them) with OpenAI's error body, as jv5fast.server's."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    return {"status": status, "body": body, "headers": [(b"content-type", b"application/json"), *headers]}


def forwarded(scope, body: bytes) -> dict:
    """What a replica needs of an HTTP request: the ASGI scope's plain fields, and the body."""
    path = scope.get("path", "/")
    return {"http_version": scope.get("http_version", "1.1"), "method": scope.get("method", "GET"),
            "scheme": scope.get("scheme", "http"), "path": path, "raw_path": scope.get("raw_path") or path.encode(),
            "root_path": scope.get("root_path", ""), "query_string": scope.get("query_string", b""),
            "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
            "client": tuple(scope["client"]) if scope.get("client") else None,
            "server": tuple(scope["server"]) if scope.get("server") else None, "body": body}


async def read_body(scope, receive, limit: int) -> bytes | None:
    """The request body, but never more than ``limit`` + 1 bytes (enough for the replica to refuse it), and
    nothing when Content-Length already says it is over; None if the client went away."""
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length" and v.isdigit() and int(v) > limit:
            return b""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit or not message.get("more_body", False):
            return bytes(body)


def merge_metrics(reports, states) -> bytes:
    """One Prometheus exposition of every report's text (``[(replica, text), ...]``), each sample labelled
    ``replica``, families kept contiguous; plus ``jv5fast_serve_replicas{status}`` from ``states``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    families = {}  # (name, type) -> Metric, in order of first appearance
    for replica, text in reports:
        for fam in text_string_to_metric_families(text):
            merged = families.get((fam.name, fam.type))
            if merged is None:
                merged = families[(fam.name, fam.type)] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.add_sample(s.name, {"replica": replica, **s.labels}, s.value, s.timestamp)
    replicas = GaugeMetricFamily("jv5fast_serve_replicas", "engine replicas by status (Ray Serve)",
                                 labels=["status"])
    for state in REPLICA_STATES:
        replicas.add_metric([state], sum(1 for s in states if s == state))

    class _Collector:
        def collect(self):
            yield replicas
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def health(snapshot) -> tuple[int, dict]:
    """(status code, body) of ``/health`` from a Registry snapshot: 200 iff at least one replica is ready."""
    engines = [e for e in snapshot["replicas"] if e.get("kind") == "engine"]
    states = {e["status"] for e in engines}
    if snapshot.get("draining"):
        status = "draining"
    elif "ready" in states:
        status = "ready"
    elif "loading" in states:
        status = "loading"
    elif states and states <= {"failed"}:
        status = "failed"
    else:
        status = "unavailable"
    listed = [{k: e[k] for k in ("replica", "status", "error", "age") if e.get(k) is not None} for e in engines]
    return (200 if status == "ready" else 503), {"status": status, "replicas": listed}


class FrontApp:
    """The front's ASGI app (see the module docstring); ``replicas`` and ``registry`` are DeploymentHandles."""

    def __init__(self, replicas, registry, *, name, request_timeout_s, max_retries, max_request_bytes, report_s):
        from prometheus_client import CollectorRegistry, Counter
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
        self.replicas, self.registry, self.name = replicas, registry, name
        self.request_timeout_s, self.max_retries = request_timeout_s, max_retries
        self.max_request_bytes, self.report_s = max_request_bytes, report_s
        self.died = (RayActorError, ReplicaUnavailableError)
        self.overloaded, self.unavailable = BackPressureError, DeploymentUnavailableError
        self.prometheus = CollectorRegistry()
        self.retries = Counter("jv5fast_serve_retries", "requests sent again after their replica died or drained",
                               registry=self.prometheus)
        self.refused = Counter("jv5fast_serve_front_errors", "responses of the front itself (no replica answered)",
                               ["reason"], registry=self.prometheus)
        self.reporter = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        if scope.get("method") in ("GET", "HEAD") and route in ("/health", "/metrics"):
            res = await (self._health() if route == "/health" else self._metrics())
        else:
            res = await self._forward(scope, receive)
            if res is None:  # the client went away before its body arrived
                return
        await send({"type": "http.response.start", "status": res["status"], "headers": res["headers"]})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else res["body"]})

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.reporter = asyncio.ensure_future(self._report_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.reporter is not None:
                    self.reporter.cancel()
                try:
                    await within(self.registry.forget.remote(self.name), 2.0)
                except Exception:  # noqa: BLE001 — the entry goes stale instead
                    pass
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _report_loop(self):
        from prometheus_client import generate_latest
        while True:
            entry = {"replica": self.name, "kind": "front", "status": "ready", "error": None,
                     "metrics": generate_latest(self.prometheus).decode()}
            try:
                await within(self.registry.report.remote(entry), 5.0)
            except Exception as e:  # noqa: BLE001 — the registry restarting; the next period reports again
                log.debug("jv5fast front %s: report failed: %s", self.name, e)
            await asyncio.sleep(self.report_s)

    async def _snapshot(self, metrics=True):
        try:
            return await within(self.registry.snapshot.remote(metrics), 2.0)
        except Exception as e:  # noqa: BLE001
            log.warning("jv5fast serve: the replica registry did not answer: %s", e)
            return None

    async def _health(self):
        snap = await self._snapshot(metrics=False)
        if snap is None:  # the registry restarting: ask any replica itself
            code, body = 503, {"status": "unavailable", "error": "the replica registry did not answer"}
            try:
                res = await within(self.replicas.forward.remote(forwarded({"method": "GET", "path": "/health"},
                                                                          b"")), 3.0)
                if res["status"] == 200:
                    code, body = 200, {"status": "ready", "replicas": [], "error": body["error"]}
            except Exception:  # noqa: BLE001 — no replica answered either
                pass
        else:
            code, body = health(snap)
        return {"status": code, "headers": [(b"content-type", b"application/json")], "body": json.dumps(body).encode()}

    async def _metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST
        snap = await self._snapshot() or {"replicas": []}
        live = [e for e in snap["replicas"] if e["status"] != "unreachable" and e.get("metrics")]
        body = merge_metrics([(e["replica"], e["metrics"]) for e in live],
                             [e["status"] for e in snap["replicas"] if e.get("kind") == "engine"])
        return {"status": 200, "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())], "body": body}

    def _refuse(self, reason, status, message, code, headers=()):
        self.refused.labels(reason).inc()
        log.warning("jv5fast serve: %s", message)
        return error_response(status, message, "rate_limit_error" if status == 429 else "service_unavailable",
                              code, headers)

    async def _forward(self, scope, receive):
        body = await read_body(scope, receive, self.max_request_bytes)
        if body is None:
            return None
        req = forwarded(scope, body)
        deadline, attempt, what = time.monotonic() + self.request_timeout_s, 0, f"{req['method']} {req['path']}"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                res = await within(self.replicas.forward.remote(req), left)
            except asyncio.TimeoutError:
                break
            except self.overloaded:
                return self._refuse("overloaded", 429, "overloaded: every replica is at its limit of ongoing "
                                    "requests and the queue in front of them is full; retry later", "overloaded",
                                    [(b"retry-after", b"1")])
            except self.unavailable:
                return self._refuse("unavailable", 503, "unavailable: the server is shutting down", "draining")
            except self.died as e:
                why = f"the replica serving {what} died ({type(e).__name__})"
            else:
                if res["status"] != 503 or _error_code(res) not in ("draining", "failed"):
                    return res
                why = f"the replica serving {what} answered 503 ({_error_code(res)})"
            if attempt >= self.max_retries:
                return self._refuse("replica_died", 503, f"unavailable: {why}, and so did {attempt} more tries; "
                                    f"retry later", "replica_died")
            attempt += 1
            self.retries.inc()
            log.warning("jv5fast serve: %s; sending it again (try %d of %d)", why, attempt, self.max_retries)
            await asyncio.sleep(min(0.05 * 2 ** attempt, max(0.0, deadline - time.monotonic())))
        return self._refuse("timeout", 503, f"unavailable: no replica answered {what} within request_timeout_s="
                            f"{self.request_timeout_s:g} s", "timeout")


def _error_code(res):
    try:
        return json.loads(res["body"])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class Front:
    """The ingress deployment (``serve.ingress`` with this class's ``__serve_build_asgi_app__``; no engine)."""

    def __init__(self, replicas, registry, options: dict):
        self.replicas, self.registry, self.options = replicas, registry, options

    def __serve_build_asgi_app__(self):
        return FrontApp(self.replicas, self.registry, name=replica_name(), **self.options)
