"""Lifecycle: loading → ready → draining (or failed), the state ``GET /health`` reports.

The model loads (or, given an engine, warms up) in a non-daemon thread started by the app's lifespan, so the
port answers while it loads; the batcher starts only once the model is warm. Shutdown (the lifespan's end,
after uvicorn answered in-flight requests) stops a load in progress at its next safe point and never serves
it, then drains the batcher, all within one drain deadline set by the first signal (``State.begin_drain``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..scheduler import Batcher
from .errors import APIError

log = logging.getLogger("jv5fast")


class State:
    """One app's health and what it serves: ``app.state.jv5fast``. ``current()`` is what ``/health`` says."""

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

    def check_ready(self) -> None:
        """Raise 503 (its ``code`` the status) unless the app serves now."""
        if self.current() != "ready":
            failed = ("the embedding scheduler failed; see the server log" if self.batcher is not None
                      else "the model failed to load")
            why = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": failed}[self.status]
            raise APIError(503, f"unavailable: {why}", type_="service_unavailable", code=self.status)

    def begin_drain(self, drain_timeout: float) -> None:
        """A shutdown signal: ``/health`` says 503 from now on, and the drain must end ``drain_timeout`` s
        after the first one."""
        if self.status == "ready":
            self.status = "draining"
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + drain_timeout

    def drain_left(self, drain_timeout: float) -> float:
        """What is left of the drain time after uvicorn answered in-flight requests."""
        deadline = self.drain_deadline
        return drain_timeout if deadline is None else max(0.0, deadline - time.monotonic())

    def stop_loading(self, timeout) -> bool:
        """Stop a load in progress at its next safe point (before warm-up, before serving) and wait for it."""
        with self.lock:
            self.stopping = True
        self.loading.join(timeout)
        return not self.loading.is_alive()


def lifespan(state: State, *, engine=None, loader=None, warmup=True, drain_timeout=30.0, on_load_error=None,
             batcher_options=None):
    """The app's lifespan: load ``engine`` (or ``loader()``'s) into ``state`` on startup, drain on shutdown.
    ``batcher_options`` go to ``Batcher``; ``on_load_error(message)`` is called if loading or warm-up
    fails."""
    batcher_options = batcher_options or {}

    def load():
        try:
            eng = engine if engine is not None else loader()
            if warmup and not state.stopping:
                eng.warmup()
            with state.lock:
                if state.stopping:  # shut down while loading: never start serving (nor a scheduler thread)
                    log.info("jv5fast serve: the model finished loading after shutdown began; not serving it")
                    return
                state.batcher = Batcher(eng, **batcher_options)
                state.engine = eng
                state.status = "ready"
            log.info("jv5fast serve: ready (%s)", eng)
        except BaseException as e:  # noqa: BLE001 — reported, and the server exits
            state.status, state.error = "failed", f"{type(e).__name__}: {e}"
            log.error("jv5fast serve: loading the model failed: %s", state.error)
            if on_load_error is not None:
                on_load_error(state.error)

    async def run(app):
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
            if not await loop.run_in_executor(None, state.stop_loading, state.drain_left(drain_timeout)):
                log.error("jv5fast serve: the model was still loading when the drain time ran out")
            if state.batcher is not None:
                await loop.run_in_executor(None, state.batcher.close, state.drain_left(drain_timeout))

    return run
