"""``jv5fast serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8080] [...]``: the HTTP server.

The flags, and the checks a user's mistake must fail before a port is bound (a missing folder, a port out
of range, an empty API key). The server itself is ``jv5fast.server.serve`` (FastAPI/uvicorn, the serve
extra), imported only when the command runs.
"""
from __future__ import annotations

import os

from .args import MODEL_HELP, HelpWithDefaults, add_engine_flags, nonneg_float, positive_int
from .checks import check_cpu_precision, check_device, check_model, check_quantize, quantize_kw
from .messages import CLIError


def register(sub):
    s = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI and Jina API), with dynamic batching",
                       formatter_class=HelpWithDefaults, description="An OpenAI- and Jina-API-compatible "
                       "embeddings server (POST /v1/embeddings, GET /v1/models, /health, /metrics) batching "
                       "concurrent requests onto one engine. Needs jv5fast[serve]. SIGTERM/SIGINT: stop accepting, "
                       "answer what was accepted, exit 0.")
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


def run(a):
    check_quantize(a)
    check_cpu_precision(a)
    check_model(a.model, "--model", a.backend)
    path = os.path.expanduser(a.model)
    if (os.path.isabs(path) or a.model.startswith((".", "~"))) and not os.path.isdir(path):
        raise CLIError(f"--model {a.model}: no such folder")  # fail before binding, not after
    check_device(a.device)
    if not 0 <= a.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {a.port}")
    from ..server import _api_key, serve
    try:  # an empty key (--api-key "$KEY", KEY unset) must never mean "no authentication": refused before binding
        _api_key(a.api_key, "--api-key")
    except ValueError as e:
        raise CLIError(str(e)) from None
    resident = {"auto": "auto", "true": True, "false": False}[a.resident_tasks]
    return serve(a.model, host=a.host, port=a.port, device=a.device, dtype=a.dtype, backend=a.backend,
                 max_length=a.max_length, **quantize_kw(a), log_level=a.log_level,
                 drain_timeout=a.drain_timeout, served_model_name=a.served_model_name, api_key=a.api_key,
                 max_batch_tokens=a.max_batch_tokens, max_wait_ms=a.max_wait_ms,
                 max_queue_tokens=a.max_queue_tokens or "auto", max_inputs=a.max_inputs,
                 max_request_bytes=a.max_request_bytes, resident_tasks=resident)
