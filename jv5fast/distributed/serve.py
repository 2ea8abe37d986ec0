"""``jv5fast serve`` on Ray Serve: N replicas, each owning one Engine and its Batcher, behind one HTTP address.

``app(model, replicas=N, ...)`` returns a bound Ray Serve application (for ``serve.run``) of three deployments:
``Engine`` replicas (jv5fast/distributed/serve_replica.py; each loads an Engine, warms it up and answers requests
with ``jv5fast.server.create_app(engine)`` in process, so routes, fields, auth, errors and limits are those of
``jv5fast serve``), the ``Front`` HTTP ingress (jv5fast/distributed/serve_front.py; forwards each request to a
replica, sends it again when its replica dies, bounds it in time, answers ``/health`` and ``/metrics`` for every
replica) and a ``Registry`` that replicas report to. ``run(...)`` is the command: start or join Ray, deploy, serve
until SIGTERM/SIGINT, drain every replica, exit 0. The trade-off: one more hop (proxy -> front -> replica, two
Ray calls, ~ms) against a replica that can die mid-request without the request being lost. Autoscaling
(``min_replicas``/``max_replicas``) is Ray Serve's, on requests ongoing per replica (queued in its batcher or
running). Needs ``pip install "jv5fast[serve]" "ray[serve]>=2.60"``; Ray is imported only when ``app`` or ``run``
runs.
"""
from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import threading
import time

log = logging.getLogger("jv5fast")

# Engine(...) options, as jv5fast.server.serve passes them; every other option goes to create_app(...)
ENGINE_OPTIONS = ("device", "dtype", "backend", "max_length", "onnx_quantize", "quantize", "cpu_precision")
_NOT_APP_OPTIONS = ("engine", "loader", "warmup", "on_load_error")
INSTALL = 'pip install "jv5fast[serve-ray]"'


def _count(name, v, lo, optional=False, integer=True):
    if optional and v is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not v >= lo or v != v or v == float("inf"):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} >= {lo}, got {v!r}")


def _options(model, options, num_gpus_per_replica, drain_timeout):
    """``(engine_options, app_options)`` split and checked as ``create_app`` checks them, before Ray is involved
    (an unknown option is a TypeError naming it; an empty API key a ValueError)."""
    from ..server import create_app
    app_names = [p for p in inspect.signature(create_app).parameters if p not in _NOT_APP_OPTIONS]
    engine_options = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
    unknown = [k for k in options if k not in app_names]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; valid: {sorted([*ENGINE_OPTIONS, *app_names])}")
    if engine_options.get("device") is None:  # explicit: a replica without a GPU never tries CUDA
        engine_options["device"] = "cuda" if num_gpus_per_replica > 0 else "cpu"
    elif str(engine_options["device"]).startswith("cuda") and not num_gpus_per_replica > 0:
        raise ValueError(f"device={engine_options['device']!r} needs num_gpus_per_replica > 0 (Ray shows a replica "
                         f"only the GPUs it reserves)")
    app_options = dict(options, drain_timeout=drain_timeout)
    if not app_options.get("served_model_name"):  # as jv5fast serve names it: the folder, or the hub id as given
        from ..server import display_name
        model = os.fspath(model)
        app_options["served_model_name"] = display_name(model) if os.path.isdir(model) else model
    create_app(loader=lambda: None, **app_options)  # checks every option (nothing starts)
    limit = inspect.signature(create_app).parameters["max_request_bytes"].default
    app_options.setdefault("max_request_bytes", limit)  # the front reads a body up to this
    from ..server import _api_key  # resolved here: a replica on another node may not have $JV5FAST_API_KEY
    app_options["api_key"] = _api_key(app_options.get("api_key"))
    return engine_options, app_options


def app(model, *, replicas=1, min_replicas=None, max_replicas=None, num_cpus_per_replica=1.0,
        num_gpus_per_replica=0, target_ongoing_requests=32, max_ongoing_requests=256, max_queued_requests=1024,
        request_timeout_s=300.0, max_retries=3, front_replicas=1, drain_timeout=30.0, report_s=0.5, **options):
    """The Ray Serve application of ``jv5fast serve --model model`` with ``replicas`` Engine replicas, for
    ``serve.run(app(...), route_prefix="/")``.

    Autoscaling when ``min_replicas`` or ``max_replicas`` is given (``replicas`` is then the initial count,
    clamped into the range): Ray Serve keeps about ``target_ongoing_requests`` requests ongoing per replica.
    ``num_cpus_per_replica`` / ``num_gpus_per_replica`` (fractions allowed) are each replica's Ray resources; the
    device defaults to ``cuda`` with a GPU, else ``cpu``. A replica takes up to ``max_ongoing_requests`` at once
    (its batcher sheds load beyond ``max_queue_tokens`` with 429, as ``jv5fast serve``); up to
    ``max_queued_requests`` more wait in front of busy or loading replicas, then 429. ``request_timeout_s``
    bounds each request, ``max_retries`` how often it is sent again when its replica dies. ``drain_timeout`` is
    each replica's graceful shutdown time; ``report_s`` how often replicas report to the Registry (what /health
    and /metrics lag by at most); ``front_replicas`` how many ingress replicas forward. Other keywords:
    ``Engine`` options (``ENGINE_OPTIONS``) and ``jv5fast.server.create_app`` options (``api_key``,
    ``max_batch_tokens``, ``max_inputs``, ...)."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a checkpoint folder or hub id (str), got {type(model).__name__}")
    _count("replicas", replicas, 1)
    _count("min_replicas", min_replicas, 0, optional=True)
    _count("max_replicas", max_replicas, 1, optional=True)
    _count("front_replicas", front_replicas, 1)
    _count("max_retries", max_retries, 0)
    _count("max_ongoing_requests", max_ongoing_requests, 1)
    _count("max_queued_requests", max_queued_requests, 1)
    for name, v, lo in (("num_cpus_per_replica", num_cpus_per_replica, 0), ("num_gpus_per_replica",
                        num_gpus_per_replica, 0), ("target_ongoing_requests", target_ongoing_requests, 1e-9),
                        ("request_timeout_s", request_timeout_s, 1e-3), ("drain_timeout", drain_timeout, 0),
                        ("report_s", report_s, 1e-3)):
        _count(name, v, lo, integer=False)
    autoscaling = None
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, replicas) if max_replicas is None else max_replicas
        if lo > hi:
            raise ValueError(f"min_replicas={lo} is over max_replicas={hi}")
        autoscaling = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(replicas, lo), hi),
                       "target_ongoing_requests": target_ongoing_requests}
    engine_options, app_options = _options(model, dict(options), num_gpus_per_replica, drain_timeout)

    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f"jv5fast.distributed.serve needs Ray Serve: {INSTALL}") from e
    from .serve_front import Front
    from .serve_replica import Registry, Replica

    stale_s = max(2.0, 4 * report_s)
    registry = serve.deployment(Registry, name="Registry", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=1000,  # its calls every report_s are not worth a log line
                                logging_config={"enable_access_log": False}).bind(stale_s=stale_s)
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    engines = serve.deployment(
        Replica, name="Engine", ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
        max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        graceful_shutdown_timeout_s=drain_timeout, graceful_shutdown_wait_loop_s=0.5, max_constructor_retry_count=3,
        **scale).bind(registry, os.fspath(model), engine_options, app_options, report_s)
    front_options = {"request_timeout_s": float(request_timeout_s), "max_retries": max_retries,
                     "max_request_bytes": app_options["max_request_bytes"], "report_s": report_s}
    try:
        ingress = serve.ingress()(Front)  # its ASGI app is built in each replica, once the handles exist
    except (TypeError, ValueError) as e:
        raise ImportError(f"jv5fast.distributed.serve needs Ray Serve 2.60 or newer: {INSTALL}") from e
    front = serve.deployment(ingress, name="Front", num_replicas=front_replicas,
                             ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
                             graceful_shutdown_timeout_s=drain_timeout + 5,
                             graceful_shutdown_wait_loop_s=0.5)
    return front.bind(engines, registry, front_options)


class _Stop(BaseException):
    """SIGTERM/SIGINT while the replicas load (a BaseException: no ``except Exception`` in Ray swallows it)."""


def _free_port(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _registry_snapshot(name, timeout_s=5.0):
    from ray import serve
    try:
        return serve.get_deployment_handle("Registry", app_name=name).snapshot.remote(False).result(timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 — not deployed (yet, or any more)
        return None


def _load_failures(name, model) -> list:
    """One line per replica of application ``name`` that failed to load: from the Registry, else from the error
    Ray Serve kept for the deployment (its message holds the constructor's traceback, which names the replica)."""
    snap = _registry_snapshot(name) or {"replicas": []}
    lines = [f"replica {r['replica']} failed to load {model}: {r['error']}" for r in snap["replicas"]
             if r.get("status") == "failed"]
    if not lines:
        from ray import serve
        try:
            deployments = serve.status().applications[name].deployments.values()
        except Exception:  # noqa: BLE001
            deployments = []
        for d in deployments:
            lines += [line.split("jv5fast ", 1)[1] for line in (d.message or "").splitlines()
                      if "jv5fast replica " in line and " failed to load " in line]
    return list(dict.fromkeys(lines))


def run(model, *, host="127.0.0.1", port=8080, ray_address=None, name="jv5fast", route_prefix="/",
        log_level="info", **app_kwargs) -> int:
    """``jv5fast serve --replicas N``: start a local Ray (or join ``ray_address``, e.g. ``"auto"``, or
    ``$RAY_ADDRESS``), deploy ``app(model, **app_kwargs)`` as application ``name`` behind Ray Serve's proxy at
    ``host:port`` (``port=0``: a free one; a cluster whose Serve already runs keeps its own address), print
    ``listening on http://HOST:PORT``, then ``ready`` once every replica is warm, and serve until SIGTERM/SIGINT:
    then ``/health`` turns 503, every replica finishes its accepted requests (up to ``drain_timeout``) and drains,
    and this returns 0. A replica that fails to load is named with its error and this returns 1; a signal while
    loading stops the load and returns 0. On a cluster only this application is deleted (``serve.shutdown``
    would delete everyone's); a Ray started here is shut down."""
    application = app(model, **app_kwargs)  # every option checked before Ray starts
    import ray
    from ray import serve

    own_ray = not ray.is_initialized()
    local = own_ray and ray_address is None and not os.environ.get("RAY_ADDRESS")
    if own_ray:
        level = getattr(logging, str(log_level).upper(), logging.INFO)
        init = {"logging_level": max(level, logging.WARNING), "log_to_driver": level <= logging.INFO}
        if local:  # a Ray of our own, even if `ray start` left one on this machine
            init.update(address="local", include_dashboard=False)
        else:
            init["address"] = ray_address
        ray.init(**init)
    had_serve = bool(serve.status().proxies)
    if port == 0:
        port = _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    if had_serve:
        try:  # Serve was already running here: its proxy's address is the one that answers
            from ray.serve.context import _get_global_client
            cfg = _get_global_client().http_config
            host, port = cfg.host, cfg.port
        except Exception:  # noqa: BLE001
            pass
    n = app_kwargs.get("replicas", 1)
    shown = f"[{host}]" if ":" in host else host
    prefix = "" if route_prefix in ("/", None) else route_prefix
    print(f"jv5fast serve: listening on http://{shown}:{port}{prefix} (Ray Serve; loading {model} on {n} "
          f"replica{'s' * (n != 1)})", flush=True)

    stop, phase = threading.Event(), ["loading"]

    def on_signal(sig, frame):
        stop.set()
        if phase[0] == "loading":  # serve.run is polling in this thread: leave it
            phase[0] = "stopping"
            raise _Stop()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        try:
            serve.run(application, name=name, route_prefix=route_prefix,
                      logging_config={"log_level": str(log_level).upper(), "enable_access_log": False})
            phase[0] = "serving"
        except _Stop:
            print("jv5fast serve: stopped while loading; not serving", flush=True)
        except RuntimeError as e:  # the deployment failed: name the replicas that did not load
            phase[0], code = "failed", 1
            for line in _load_failures(name, model) or [f"deploying on Ray Serve failed: {str(e)[-2000:]}"]:
                print(f"jv5fast serve: error: {line}", flush=True)
        if phase[0] == "serving":
            snap = _registry_snapshot(name) or {"replicas": []}
            ready = [r["replica"] for r in snap["replicas"] if r.get("kind") == "engine" and r["status"] == "ready"]
            print(f"jv5fast serve: ready ({len(ready)} replica{'' if len(ready) == 1 else 's'}: {', '.join(ready)})",
                  flush=True)
            while not stop.wait(0.5):
                pass
            print("jv5fast serve: draining", flush=True)
            try:
                serve.get_deployment_handle("Registry", app_name=name).set_draining.remote(True).result(timeout_s=5)
            except Exception:  # noqa: BLE001 — /health then says 503 when the front goes
                pass
        phase[0] = "stopping"
        if not _delete(name, app_kwargs.get("drain_timeout", 30.0) + 30.0):
            print(f"jv5fast serve: error: application {name!r} was still being deleted after drain_timeout + 30 s",
                  flush=True)
            code = 1
        if own_ray:
            if not local and not had_serve and not serve.status().applications:
                serve.shutdown()  # the Serve we started on a cluster, now serving nothing
            ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        print("jv5fast serve: stopped", flush=True)
    return code


def _delete(name, timeout_s) -> bool:
    """Delete application ``name`` (Serve stops routing to its replicas, waits for their requests up to their
    graceful_shutdown_timeout_s, then calls their destructors: the batchers drain) and wait for it to go."""
    from ray import serve
    t0 = time.monotonic()
    serve.delete(name, _blocking=False)  # Serve's own wait gives up after 60 s, whatever drain_timeout says
    while name in serve.status().applications:
        if time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(0.2)
    log.info("jv5fast serve: application %s deleted in %.1f s", name, time.monotonic() - t0)
    return True
