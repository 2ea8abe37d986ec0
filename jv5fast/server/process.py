"""``jv5fast serve``'s process: bind the socket first, run uvicorn over ``create_app``, drain on
SIGTERM/SIGINT, and exit 0 only after a clean drain.

The address is printed before the model loads (``/health`` answers 503 meanwhile); the first signal starts the
drain clock (``State.begin_drain``). A thread still inside torch's C++ at the end cannot be stopped, so the
process then ends with ``os._exit`` rather than finalizing the interpreter under it (SIGABRT).
"""
from __future__ import annotations

import logging
import os
import sys

from .app import create_app, display_name

log = logging.getLogger("jv5fast")


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

    from ..engine import Engine

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
            app.state.jv5fast.begin_drain(drain_timeout)  # /health says 503 from the first signal on
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
