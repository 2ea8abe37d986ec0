"""The two back-end deployments of ``jv5fast.distributed.serve``: ``Replica`` (one Engine each) and ``Registry``.

``Replica`` loads one ``Engine`` in its constructor (Ray Serve routes nothing to a replica before its constructor
returns), builds ``jv5fast.server.create_app(engine)`` and runs its lifespan (the warm-up), then answers the HTTP
requests the front forwards by calling that ASGI app in process: routes, fields, auth, errors and limits are those
of ``jv5fast serve``, one Batcher per replica. Shutdown runs the app's lifespan end (the batcher drains). Every
``report_s`` the replica sends the ``Registry`` its status and Prometheus text, which is how the front answers
``/health`` and ``/metrics`` for all replicas (a DeploymentHandle cannot address one replica). A push, not a pull:
it costs one small call per replica and period, and the front's answer is at most one period old.
Ray is not imported here: these classes become deployments in ``serve.app()``.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("jv5fast")


def replica_name() -> str:
    """This replica's Ray actor name (``SERVE_REPLICA::app#deployment#id``, namespace ``serve``): what /health,
    the ``replica`` label of /metrics, the logs and ``ray.get_actor`` all call it."""
    from ray import serve
    return serve.get_replica_context().replica_id.to_full_id_str()


async def call_asgi(app, req: dict) -> dict:
    """Answer the forwarded request ``req`` (see ``serve_front.forwarded``) with the ASGI ``app`` in process;
    returns ``{"status", "headers", "body"}``. The body is all there is: after it, ``receive`` waits until this
    call is cancelled (the client went away; Serve cancels the request), as a live connection would."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, **{k: req[k] for k in (
        "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string", "headers",
        "client", "server")}}
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await asyncio.Event().wait()  # until cancelled
        return {"type": "http.disconnect"}

    out = {"status": 500, "headers": [], "body": b""}
    chunks = []

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    out["body"] = b"".join(chunks)
    return out


async def within(awaitable, timeout_s):
    """``await awaitable`` (e.g. a DeploymentResponse) for at most ``timeout_s`` (TimeoutError beyond);
    a response still running then is cancelled."""
    async def wait():
        return await awaitable
    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        cancel = getattr(awaitable, "cancel", None)
        if cancel is not None:
            cancel()
        raise


class Replica:
    """One Engine, its Batcher and the ``jv5fast serve`` app over them (a Ray Serve deployment)."""

    async def __init__(self, registry, model, engine_options: dict, app_options: dict, report_s: float = 0.5):
        from ..engine import Engine
        from ..server import create_app
        self.name, self.model, self.registry, self.report_s = replica_name(), model, registry, report_s
        self.app = self.lifespan = None
        self.error = None
        self.reporter = asyncio.ensure_future(self._report_loop())  # says "loading" at once
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, lambda: Engine(model, **engine_options))
            app = create_app(engine, **app_options)
            from uvicorn.config import Config
            from uvicorn.lifespan.on import LifespanOn
            lifespan = LifespanOn(Config(app, lifespan="on", log_config=None, access_log=False))
            await lifespan.startup()  # the warm-up: one batch through the engine
            if lifespan.should_exit:
                raise RuntimeError("the app's startup (warm-up) failed; see the log above")
            self.app, self.lifespan = app, lifespan
            status = await self.status()
            if status != "ready":
                why = app.state.jv5fast.error
                raise RuntimeError(why or f"the app is {status!r} after its warm-up, not ready")
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            msg = f"jv5fast replica {self.name} failed to load {model}: {self.error}"
            log.error("%s", msg)
            self.reporter.cancel()
            await self._report()  # the registry hears of it before this actor goes away
            raise RuntimeError(msg) from e
        log.info("jv5fast replica %s: ready (%s)", self.name, engine)
        await self._report()

    async def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "loading" if self.app is None else self.app.state.jv5fast.current()

    async def metrics_text(self) -> str:
        if self.app is None:
            return ""
        from prometheus_client import generate_latest
        return generate_latest(self.app.state.jv5fast_metrics.registry).decode()

    async def _report(self, status=None, timeout_s=5.0):
        try:
            entry = {"replica": self.name, "kind": "engine", "model": self.model,
                     "status": status or await self.status(), "error": self.error,
                     "metrics": await self.metrics_text()}
            await within(self.registry.report.remote(entry), timeout_s)
        except Exception as e:  # noqa: BLE001 — the registry restarting; the next period reports again
            log.debug("jv5fast replica %s: report failed: %r", self.name, e)

    async def _report_loop(self):
        while True:
            await self._report()
            await asyncio.sleep(self.report_s)

    async def forward(self, req: dict) -> dict:
        """One HTTP request from the front, answered by this replica's ``jv5fast serve`` app."""
        return await call_asgi(self.app, req)

    async def check_health(self):
        """Ray Serve's health check: a replica whose scheduler thread died is replaced."""
        status = await self.status()
        if status == "failed":
            raise RuntimeError(f"jv5fast replica {self.name}: the embedding scheduler failed; see its log")

    async def __del__(self):
        """Serve's graceful shutdown (after its ongoing requests finished or ran out of time): drain the batcher."""
        if getattr(self, "reporter", None) is not None:
            self.reporter.cancel()
        if getattr(self, "error", None) is not None:
            return  # Serve calls this after a failed constructor too: the failure stays listed in /health
        if getattr(self, "lifespan", None) is not None:
            await self._report("draining", timeout_s=1.0)  # the registry may be going too
            await self.lifespan.shutdown()
        try:
            await within(self.registry.forget.remote(self.name), 1.0)
        except Exception:  # noqa: BLE001 — the entry goes stale instead
            pass


class Registry:
    """What each replica (and front) last reported, for the front's ``/health`` and ``/metrics`` (a Ray Serve
    deployment with one replica and no CPU; if it restarts, the next reports refill it within ``report_s``)."""

    def __init__(self, stale_s: float = 2.0, keep_s: float = 600.0):
        self.stale_s, self.keep_s = stale_s, keep_s
        self.entries = {}      # replica name -> its last report, plus "seen" (this actor's monotonic clock)
        self.draining = False  # set by jv5fast.distributed.serve.run() on SIGTERM: /health says 503 from then on

    def report(self, entry: dict):
        entry = dict(entry, seen=time.monotonic())
        if entry["status"] != "failed" and self.entries.get(entry["replica"], {}).get("status") == "failed":
            return  # a failed replica's last word stands
        self.entries[entry["replica"]] = entry

    def forget(self, replica: str):
        self.entries.pop(replica, None)

    def set_draining(self, draining: bool = True):
        self.draining = bool(draining)

    def snapshot(self, metrics: bool = True) -> dict:
        """``{"draining", "replicas": [...]}``: each report with its ``age`` in seconds; a replica silent for
        ``stale_s`` is ``unreachable`` (killed, or its node lost), and reports older than ``keep_s`` are dropped.
        ``metrics=False`` leaves out the replicas' Prometheus text (what /health, polled often, does not need)."""
        now, out = time.monotonic(), []
        for name, e in list(self.entries.items()):
            age = now - e["seen"]
            if age > self.keep_s:
                del self.entries[name]
                continue
            status = e["status"] if e["status"] == "failed" or age <= self.stale_s else "unreachable"
            out.append({**{k: v for k, v in e.items() if k != "seen" and (metrics or k != "metrics")},
                        "status": status, "age": round(age, 3)})
        return {"draining": self.draining, "replicas": sorted(out, key=lambda e: e["replica"])}
