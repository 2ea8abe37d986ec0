"""``jv5fast serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8080] [--replicas N] [...]``: the HTTP server.

The flags, and the checks a user's mistake must fail before a port is bound (a missing folder, a port out
of range, an empty API key). The server itself is ``jv5fast.server.serve`` (FastAPI/uvicorn, the serve
extra), imported only when the command runs. Any of --replicas, --min-replicas, --max-replicas or
--ray-address serves the same app on Ray Serve instead (``jv5fast.distributed.serve.run``, the serve-ray
extra): N replicas, each owning one engine and its batcher. Without them Ray is never imported.
"""
from __future__ import annotations

import math
import os

from .args import (MODEL_HELP, HelpWithDefaults, add_engine_flags, nonneg_float, nonneg_int, positive_float,
                   positive_int)
from .checks import check_cpu_precision, check_device, check_model, check_quantize, quantize_kw
from .messages import CLIError, count

RAY_INSTALL = 'pip install "jv5fast[serve-ray]"'
RAY_FLAGS = ("--replicas", "--min-replicas", "--max-replicas", "--ray-address")  # any of them: Ray Serve
# flags that only shape Ray Serve replicas -> the keyword of jv5fast.distributed.serve.app they set, whose
# default the help states (tests/test_cli_serve_replicas.py checks these against app's signature)
REPLICA_ONLY = {"--num-cpus-per-replica": ("num_cpus_per_replica", 1.0),
                "--num-gpus-per-replica": ("num_gpus_per_replica", 0),
                "--target-ongoing-requests": ("target_ongoing_requests", 32),
                "--request-timeout": ("request_timeout_s", 300.0)}


def register(sub):
    s = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI and Jina API), with dynamic batching",
                       formatter_class=HelpWithDefaults, description="An OpenAI- and Jina-API-compatible "
                       "embeddings server (POST /v1/embeddings, GET /v1/models, /health, /metrics) batching "
                       "concurrent requests onto one engine, or with --replicas onto several, on Ray Serve. Needs "
                       "jv5fast[serve]. SIGTERM/SIGINT: stop accepting, answer what was accepted, exit 0.")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8080, help="port to bind (0: any free port; the address is "
                   "printed as 'listening on http://HOST:PORT')")
    add_engine_flags(s, backend_help="engine backend", quantize_help="int8 on the CPU (built on first use and "
                     "cached in $JV5FAST_CACHE); with --backend onnx the export's int8 graph")
    s.add_argument("--max-length", type=positive_int, default=None, help="tokens per text, prompt included")
    s.add_argument("--served-model-name", default=None, help="the model name in responses and /v1/models "
                   "(default: the folder name of --model, or the hub id)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                   "$JV5FAST_API_KEY; none when unset; an empty key is an error)")
    s.add_argument("--max-batch-tokens", type=positive_int, default=None, help="token budget of one forward "
                   "batch (default: 16384 on CUDA, 512 on CPU)")
    s.add_argument("--max-wait-ms", type=nonneg_float, default=2.0, help="how long a request that finds the "
                   "engine idle waits for others to batch with")
    s.add_argument("--max-queue-tokens", type=positive_int, default=None, help="tokens allowed to wait; a "
                   "request beyond gets 429 with Retry-After (default: 262144, or 64 batches if more)")
    s.add_argument("--max-inputs", type=positive_int, default=2048, help="texts per request (413 beyond)")
    s.add_argument("--max-request-bytes", type=positive_int, default=8 * 2**20, help="request body size "
                   "(413 beyond, checked before parsing)")
    s.add_argument("--drain-timeout", type=nonneg_float, default=30.0, help="seconds to finish accepted "
                   "requests after SIGTERM/SIGINT")
    s.add_argument("--resident-tasks", default="auto", choices=("auto", "true", "false"), help="keep every "
                   "task's merged weights in memory, so mixed-task traffic never re-merges (auto: when they "
                   "fit in half the free memory)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")
    r = s.add_argument_group("replicas on Ray Serve", "Any of --replicas, --min-replicas, --max-replicas or "
                             "--ray-address serves the same app (routes, fields, auth, errors, limits) as a Ray Serve "
                             "deployment: replicas each owning one engine and its batcher, behind one address; a "
                             "request whose replica dies is sent to another. Needs jv5fast[serve-ray]. Without "
                             "them: one process, no Ray.")
    r.add_argument("--replicas", type=positive_int, default=None, help="engine replicas (with autoscaling: how many "
                   "start; default 1, or --min-replicas)")
    r.add_argument("--min-replicas", type=nonneg_int, default=None, help="autoscale on requests ongoing per "
                   "replica, down to this many (default with --max-replicas: 1)")
    r.add_argument("--max-replicas", type=positive_int, default=None, help="autoscale up to this many (default with "
                   "--min-replicas: the larger of it and --replicas)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (auto: the one `ray start` runs on "
                   "this machine; HOST:6379; ray://HOST:10001) instead of starting a local Ray of its own; --model "
                   "must then exist on the cluster's nodes (default: $RAY_ADDRESS if set, else a local Ray)")
    r.add_argument("--num-cpus-per-replica", type=nonneg_float, default=None, help="CPUs Ray reserves for each "
                   "replica, fractions allowed (default: 1)")
    r.add_argument("--num-gpus-per-replica", type=nonneg_float, default=None, help="GPUs Ray reserves for each "
                   "replica, fractions allowed (0.5: two replicas share a GPU); above 0, --device defaults to cuda "
                   "(default: 0, replicas run on the CPU)")
    r.add_argument("--target-ongoing-requests", type=positive_float, default=None, help="with autoscaling: the "
                   "requests ongoing per replica (queued in its batcher or running) that Ray Serve scales to keep "
                   "(default: 32)")
    r.add_argument("--request-timeout", type=positive_float, default=None, help="seconds a request may take, "
                   "resends to another replica included, before it is answered 503 (default: 300)")


def run(a):
    ray_path = any(getattr(a, _dest(flag)) is not None for flag in RAY_FLAGS)
    for flag in REPLICA_ONLY:
        if not ray_path and getattr(a, _dest(flag)) is not None:
            raise CLIError(f"{flag} shapes Ray Serve replicas: it needs --replicas (or --min-replicas, --max-replicas, "
                           f"--ray-address); without them serve runs one process")
    if ray_path:
        _check_replica_counts(a)
    check_quantize(a)
    check_cpu_precision(a)
    check_model(a.model, "--model", a.backend)
    # on a cluster the folder has to exist on the nodes that run replicas, not necessarily here
    on_cluster = ray_path and (a.ray_address or os.environ.get("RAY_ADDRESS") or "local") != "local"
    path = os.path.expanduser(a.model)
    if not on_cluster and (os.path.isabs(path) or a.model.startswith((".", "~"))) and not os.path.isdir(path):
        raise CLIError(f"--model {a.model}: no such folder")  # fail before binding, not after
    if ray_path:
        _check_replica_devices(a, on_cluster)
    else:
        check_device(a.device)
    if not 0 <= a.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {a.port}")
    from ..server import _api_key
    try:  # an empty key (--api-key "$KEY", KEY unset) must never mean "no authentication": refused before binding
        _api_key(a.api_key, "--api-key")
    except ValueError as e:
        raise CLIError(str(e)) from None
    resident = {"auto": "auto", "true": True, "false": False}[a.resident_tasks]
    options = dict(host=a.host, port=a.port, device=a.device, dtype=a.dtype, backend=a.backend,
                   max_length=a.max_length, **quantize_kw(a), log_level=a.log_level, drain_timeout=a.drain_timeout,
                   served_model_name=a.served_model_name, api_key=a.api_key, max_batch_tokens=a.max_batch_tokens,
                   max_wait_ms=a.max_wait_ms, max_queue_tokens=a.max_queue_tokens or "auto", max_inputs=a.max_inputs,
                   max_request_bytes=a.max_request_bytes, resident_tasks=resident)
    if not ray_path:
        from ..server import serve
        return serve(a.model, **options)
    return _serve_on_ray(a, options)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _replicas(a) -> int:
    """The replicas that start: --replicas, else --min-replicas (at least 1)."""
    return a.replicas if a.replicas is not None else max(1, a.min_replicas or 0)


def _check_replica_counts(a):
    lo, hi = a.min_replicas, a.max_replicas
    if lo is not None and hi is not None and lo > hi:
        raise CLIError(f"--min-replicas {lo} is over --max-replicas {hi}")
    if a.replicas is not None and hi is not None and a.replicas > hi:
        raise CLIError(f"--replicas {a.replicas} (how many start) is over --max-replicas {hi}")
    if a.replicas is not None and lo is not None and a.replicas < lo:
        raise CLIError(f"--replicas {a.replicas} (how many start) is under --min-replicas {lo}")
    if a.target_ongoing_requests is not None and lo is None and hi is None:
        raise CLIError("--target-ongoing-requests applies to autoscaling: add --min-replicas and/or --max-replicas")


def _check_replica_devices(a, on_cluster: bool):
    """What the replicas would run on, checked here when they run on this machine (a local Ray): a replica that
    asks for more than the machine has would wait for it forever instead of failing."""
    gpus = a.num_gpus_per_replica or 0
    if a.device is not None and a.device.startswith("cuda") and not gpus > 0:
        raise CLIError(f"--device {a.device} needs --num-gpus-per-replica > 0: Ray shows a replica only the GPUs "
                       f"it reserves")
    index = a.device.partition(":")[2] if a.device is not None and a.device.startswith("cuda:") else ""
    if index.isdigit() and int(index) >= math.ceil(gpus):
        raise CLIError(f"--device {a.device}: a replica sees only the {count(math.ceil(gpus), 'GPU')} Ray reserves "
                       f"for it, numbered from cuda:0; use --device cuda")
    if on_cluster:
        return
    check_device(a.device)
    n, cpus = _replicas(a), a.num_cpus_per_replica if a.num_cpus_per_replica is not None else 1.0
    have = os.cpu_count() or 1
    if n * cpus > have:
        raise CLIError(f"{count(n, 'replica')} x --num-cpus-per-replica {cpus:g} is {n * cpus:g} CPUs, more than "
                       f"this machine's {have}: lower --num-cpus-per-replica (fractions are allowed), or join a cluster "
                       f"with --ray-address")
    if gpus > 0:
        import torch
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n * gpus > have:
            raise CLIError(f"{count(n, 'replica')} x --num-gpus-per-replica {gpus:g} is {n * gpus:g} GPUs, more "
                           f"than this machine's {have} (a local Ray): lower them, or join a cluster with --ray-address")


def _serve_on_ray(a, options) -> int:
    from ..distributed import serve as on_ray
    extra = {name: getattr(a, _dest(flag)) for flag, (name, _) in REPLICA_ONLY.items()
             if getattr(a, _dest(flag)) is not None}
    try:
        return on_ray.run(a.model, ray_address=a.ray_address, replicas=_replicas(a), min_replicas=a.min_replicas,
                          max_replicas=a.max_replicas, **extra, **options)
    except ImportError as e:  # Ray (Serve) missing or too old: the extra that brings it
        if "needs Ray Serve" in str(e) or (getattr(e, "name", None) or "").split(".")[0] == "ray":
            raise CLIError(f"--replicas runs on Ray Serve, which is not installed (or older than 2.60): "
                           f"{RAY_INSTALL}") from None
        raise
