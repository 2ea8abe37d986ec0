"""`jv5fast serve` as users run it: a real server subprocess on 127.0.0.1 (ephemeral port, tiny checkpoints),
the official `openai` client and plain HTTP (httpx). Results must equal `Engine.embed` (float within 1e-6,
x D/k for a k-dim Matryoshka prefix; binary byte-identical); every error is a status code plus an OpenAI
error body naming the problem."""
import base64
import concurrent.futures
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import jv5fast

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

WORDS = "the model embedding vector search query document token fast kernel attention über naïve 12.5% GPU".split()

# `jv5fast serve` with slow steps injected, so a test never depends on how fast this CPU is:
# JV5FAST_TEST_FORWARD_S sleeps that long before every forward batch; while the file JV5FAST_TEST_HOLD names
# exists, every forward batch waits; JV5FAST_TEST_LOAD_S makes loading the model run native torch work (no GIL,
# as loading a checkpoint does) for that long, between the lines "test: loading" and "test: loaded".
LAUNCHER = """
import os, sys, time
import jv5fast.engine as engine
forward_s = float(os.environ.get("JV5FAST_TEST_FORWARD_S") or 0)
hold = os.environ.get("JV5FAST_TEST_HOLD")
load_s = float(os.environ.get("JV5FAST_TEST_LOAD_S") or 0)
if forward_s or hold:
    forward = engine.Engine._forward
    def slow_forward(self, seqs, *args, **kw):
        while hold and os.path.exists(hold):
            time.sleep(0.01)
        time.sleep(forward_s)
        return forward(self, seqs, *args, **kw)
    engine.Engine._forward = slow_forward
if load_s:
    import torch
    class SlowLoadingEngine(engine.Engine):
        def __init__(self, *args, **kw):
            print("test: loading", flush=True)
            x, end = torch.ones(256, 256), time.monotonic() + load_s
            while time.monotonic() < end:
                torch.mm(x, x)
            super().__init__(*args, **kw)
            print("test: loaded", flush=True)
    engine.Engine = SlowLoadingEngine
from jv5fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """``jv5fast serve`` in a subprocess; the port is read from its 'listening on' line. ``forward_s`` /
    ``load_s`` / ``hold`` (a path): slow steps injected through ``LAUNCHER``."""

    def __init__(self, model, *args, env=None, ready=True, forward_s=None, load_s=None, hold=None):
        slow = forward_s or load_s or hold
        if slow:
            env = {**(env or {}), "JV5FAST_TEST_FORWARD_S": str(forward_s or 0),
                   "JV5FAST_TEST_LOAD_S": str(load_s or 0), "JV5FAST_TEST_HOLD": str(hold or "")}
        run = [sys.executable, "-c", LAUNCHER] if slow else [sys.executable, "-m", "jv5fast"]
        cmd = [*run, "serve", "--model", model, "--port", "0", "--device", "cpu", "--log-level", "warning",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True).start()
        line = self.lines.get(timeout=120)
        assert "listening on http://" in line, line
        self.url = line.split("listening on ")[1].split()[0]
        if ready:
            self.wait_ready()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.put(line) if isinstance(sink, queue.Queue) else sink.append(line)

    def wait_ready(self, timeout=180):
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, f"server exited: {''.join(self.stderr)[-2000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def post(self, body, key=None, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + "/v1/embeddings", content=data, headers=headers, **{"timeout": 60, **kw})

    def metric(self, name):
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def close(got, ref, dim):
    """Equal to Engine.embed up to GEMM rounding (only the batch composition differs): 1e-6, times D/k for a
    k-dim Matryoshka prefix renormalized (that scales the rounding error up by about D/k)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6 * dim / ref.shape[-1]


def texts(n, seed, lo=1, hi=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def servers(nano_ckpt, small_ckpt):
    started = {}
    try:
        started["nano"] = Server(nano_ckpt, "--max-batch-tokens", "64", "--served-model-name", "nano-test")
        started["small"] = Server(small_ckpt, "--max-batch-tokens", "64", "--served-model-name", "small-test")
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def strict(nano_ckpt):
    """Tight limits and an API key (from $JV5FAST_API_KEY; --api-key is the same setting): errors, 401, 413,
    429."""
    s = Server(nano_ckpt, "--max-inputs", "8", "--max-request-bytes", "2048", "--max-length", "24",
               "--max-queue-tokens", "40", "--max-batch-tokens", "16", env={"JV5FAST_API_KEY": "s3cret"},
               forward_s=0.05)  # a request stays queued long enough for concurrent ones to be refused (429)
    yield s
    s.stop()


def client(server, name):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0), name


# Jina task -> (Engine task, prompt name)
JINA = {None: (None, None), "retrieval.query": ("retrieval", "query"), "retrieval.passage": ("retrieval", "document"),
        "text-matching": ("text-matching", "document"), "clustering": ("clustering", "document"),
        "separation": ("clustering", "document"), "classification": ("classification", "document")}


@pytest.mark.parametrize("family", ["nano", "small"])
def test_openai_client_gets_engine_embed_vectors(servers, engines, family):
    srv, eng = servers[family], engines[family]
    c, name = client(srv, f"{family}-test")
    batch = texts(7, seed=len(family)) + [""]
    for fmt in (openai.NOT_GIVEN, "float", "base64"):  # the client's default asks for base64 and decodes it
        for dims in (None, 7, 32):
            kw = {} if dims is None else {"dimensions": dims}
            r = c.embeddings.create(model=name, input=batch, encoding_format=fmt, **kw)
            rows = [d.embedding for d in r.data]
            if fmt == "base64":  # asked for explicitly, the client leaves the decoding to the caller
                rows = [np.frombuffer(base64.b64decode(s), dtype="<f4") for s in rows]
            got = np.array(rows, dtype=np.float64)
            ref = eng.embed(batch, truncate_dim=dims)
            assert [d.index for d in r.data] == list(range(len(batch)))
            assert close(got, ref, eng.dim)
            assert r.usage.prompt_tokens == sum(len(t) for t in eng.tokenize(batch)) == r.usage.total_tokens
            assert r.model == name
    one = c.embeddings.create(model=name, input="a single string")
    assert close(one.data[0].embedding, eng.embed("a single string"), eng.dim)


@pytest.mark.parametrize("family", ["nano", "small"])
def test_jina_fields_match_engine_embed(servers, engines, family):
    srv, eng = servers[family], engines[family]
    batch = texts(5, seed=11)
    for task, (adapter, prompt) in JINA.items():
        for kind in ("float", "base64", "binary", "ubinary"):
            body = {"model": f"{family}-test", "input": batch, "embedding_type": kind, "dimensions": 24,
                    "normalized": kind != "float"}
            if task is not None:
                body["task"] = task
            r = srv.post(body)
            assert r.status_code == 200, r.text
            rows = [d["embedding"] for d in r.json()["data"]]
            prec = {"float": "float32", "base64": "float32"}.get(kind, kind)
            ref = eng.embed(batch, task=adapter, prompt_name=prompt or "document", truncate_dim=24,
                            precision=prec, normalize=kind != "float")
            if kind == "base64":
                got = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in rows])
            else:
                got = np.array(rows)
            if kind in ("binary", "ubinary"):
                assert got.dtype.kind == "i" and np.array_equal(got, ref.astype(np.int64)), (task, kind)
            else:
                assert close(got, ref, eng.dim), (task, kind)
    # a list of embedding types answers each row with all of them
    r = srv.post({"input": batch[:2], "embedding_type": ["ubinary", "float"], "task": "retrieval.query"})
    row = r.json()["data"][1]["embedding"]
    assert set(row) == {"ubinary", "float"}
    assert row["ubinary"] == eng.embed(batch[1], task="retrieval", prompt_name="query", precision="ubinary").tolist()


def test_models_and_health(servers):
    srv = servers["nano"]
    assert httpx.get(srv.url + "/health").json() == {"status": "ready"}
    m = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert m["id"] == "nano-test" and m["dimensions"] == 64 and "retrieval.query" in m["tasks"]
    c, name = client(srv, "nano-test")
    assert [x.id for x in c.models.list()] == ["nano-test"]


def test_deeply_nested_json_is_a_400_not_a_crash(servers):
    srv = servers["nano"]
    _err(srv.post(b'{"input": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400, "nested too deeply")
    assert httpx.get(srv.url + "/health").status_code == 200


def test_display_name_of_folders_and_hub_snapshots():
    from jv5fast.server import display_name
    assert display_name("/m/jina-embeddings-v5-text-nano/") == "jina-embeddings-v5-text-nano"
    hub = "/root/.cache/huggingface/hub/models--jinaai--jina-embeddings-v5-text-small/snapshots/0123abcd"
    assert display_name(hub) == "jinaai/jina-embeddings-v5-text-small"


def test_concurrent_clients_each_get_their_own_vectors_in_order(servers, engines):
    srv, eng = servers["nano"], engines["nano"]
    jobs = [texts(random.Random(i).randint(1, 9), seed=100 + i, hi=40) for i in range(32)]
    tasks = [None, "retrieval.query", "text-matching", "clustering"]

    def one(i):
        body = {"input": jobs[i], "dimensions": 16 + i}
        if tasks[i % 4]:
            body["task"] = tasks[i % 4]
        return srv.post(body)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        adapter, prompt = JINA[tasks[i % 4]]
        ref = eng.embed(jobs[i], task=adapter, prompt_name=prompt or "document", truncate_dim=16 + i)
        got = np.array([d["embedding"] for d in r.json()["data"]])
        assert close(got, ref, eng.dim), i
    # the batcher really batched: fewer forward batches than requests' texts
    assert srv.metric("jv5fast_batch_size_count") < srv.metric("jv5fast_batch_size_sum")


def test_mixed_task_traffic_equals_single_task_calls(servers, engines):
    srv, eng = servers["small"], engines["small"]
    batch = texts(6, seed=5)
    order = ["retrieval.passage", "text-matching", "classification", "retrieval.query", "clustering"] * 4

    def one(t):
        return t, srv.post({"input": batch, "task": t})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, order))
    for t, r in results:
        adapter, prompt = JINA[t]
        ref = eng.embed(batch, task=adapter, prompt_name=prompt)
        assert close([d["embedding"] for d in r.json()["data"]], ref, eng.dim), t


def _err(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    msg = body["error"]["message"]
    for n in needles:
        assert n in msg, (n, msg)
    assert "Traceback" not in msg and "/tmp" not in msg and "site-packages" not in msg, msg
    return body["error"]


def test_every_bad_request_gets_a_clear_400(strict):
    k = "s3cret"
    _err(strict.post({"input": []}, key=k), 400, "empty list")
    e = _err(strict.post({"input": ["ok", 7, "x"]}, key=k), 400, "input[1]", "int")
    assert e["param"] == "input"
    _err(strict.post({"input": ["ok", None]}, key=k), 400, "input[1]")
    _err(strict.post({"input": [[1, 2, 3]]}, key=k), 400, "input[0]", "token ids")
    _err(strict.post({"input": {"a": 1}}, key=k), 400, "'input' must be a string or a list")
    _err(strict.post({"input": "x", "dimensions": 0}, key=k), 400, "dimensions=0", "1..64")
    _err(strict.post({"input": "x", "dimensions": 65}, key=k), 400, "dimensions=65", "[32, 64]")
    _err(strict.post({"input": "x", "dimensions": "8"}, key=k), 400, "dimensions")
    _err(strict.post({"input": "x", "task": "retrieval"}, key=k), 400, "'retrieval'", "retrieval.query")
    _err(strict.post({"input": "x", "embedding_type": "int8"}, key=k), 400, "'int8'", "ubinary")
    _err(strict.post({"input": "x", "embedding_type": ["float", "bits"]}, key=k), 400, "'bits'")
    _err(strict.post({"input": "x", "encoding_format": "hex"}, key=k), 400, "'hex'", "base64")
    _err(strict.post({"input": "x", "normalized": "yes"}, key=k), 400, "normalized")
    _err(strict.post({"input": "x", "dimension": 8}, key=k), 400, "unknown field 'dimension'", "dimensions")
    _err(strict.post({"model": "x"}, key=k), 400, "missing field 'input'")
    _err(strict.post(b'{"input": ["a", }', key=k), 400, "not valid JSON")
    _err(strict.post(b'["a"]', key=k), 400, "JSON object")
    _err(strict.post({"input": "x", "model": "gpt-4"}, key=k), 404, "'gpt-4'")
    _err(strict.post({"input": "x", "late_chunking": True}, key=k), 400, "late_chunking")
    assert strict.post({"input": "x", "late_chunking": False}, key=k).status_code == 200
    _err(httpx.get(strict.url + "/v1/embeddings"), 405, "GET /v1/embeddings")
    _err(httpx.post(strict.url + "/v1/embedding", json={"input": "x"}), 404, "/v1/embedding")
    long = " ".join(["word"] * 60)
    e = _err(strict.post({"input": ["short", long], "truncate": False}, key=k), 400, "input[1]", "max_length=24")
    r = strict.post({"input": ["short", long]}, key=k)  # truncate defaults to true: cut, as Engine.embed does
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 2 * 24
    assert httpx.get(strict.url + "/health").status_code == 200


def test_api_key_and_size_limits(strict):
    _err(strict.post({"input": "x"}), 401, "missing API key")
    _err(strict.post({"input": "x"}, key="s3creT"), 401, "invalid API key")
    _err(strict.post({"input": "x"}, key="s3cret-and-more"), 401, "invalid API key")
    assert httpx.get(strict.url + "/v1/models").status_code == 401
    assert httpx.get(strict.url + "/health").status_code == 200  # probes need no key
    assert strict.post({"input": "x"}, key="s3cret").status_code == 200
    _err(strict.post({"input": ["a"] * 9}, key="s3cret"), 413, "9 items", "at most 8")
    _err(strict.post({"input": "x" * 3000}, key="s3cret"), 413, "2048 bytes")
    # no Content-Length (chunked): the limit still holds while reading
    r = httpx.post(strict.url + "/v1/embeddings", headers={"Authorization": "Bearer s3cret"},
                   content=iter([b'{"input": "', b"y" * 3000, b'"}']), timeout=30)
    _err(r, 413, "2048 bytes")


def test_overload_is_429_with_retry_after_and_the_server_recovers(strict, engines):
    k, eng = "s3cret", engines["nano"]
    jobs = [texts(8, seed=200 + i, lo=3, hi=6) for i in range(24)]

    def one(i):
        return i, strict.post({"input": jobs[i]}, key=k)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [r.status_code for _, r in results]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    for i, r in results:
        if r.status_code == 429:
            e = _err(r, 429, "overloaded", "limit 40")
            assert int(r.headers["Retry-After"]) >= 1 and e["type"] == "rate_limit_error"
        else:
            got = np.array([d["embedding"] for d in r.json()["data"]])
            assert close(got, eng.embed(jobs[i]), eng.dim)
    assert httpx.get(strict.url + "/health").status_code == 200
    assert strict.post({"input": jobs[0]}, key=k).status_code == 200
    assert strict.metric('jv5fast_requests_total{endpoint="/v1/embeddings",status="429"}') >= 1


def test_sigterm_drains_twenty_requests_in_flight_and_exits_zero(nano_ckpt, engines, tmp_path):
    # the forward is held (no batch runs) until all 20 requests are in flight and SIGTERM has been sent, so none
    # can finish first however slowly a busy machine sends them; then the 800 texts drain
    hold = tmp_path / "hold"
    srv = Server(nano_ckpt, "--max-batch-tokens", "8", "--max-wait-ms", "0", "--drain-timeout", "120", hold=hold)
    jobs = [texts(40, seed=300 + i, lo=2, hi=5) for i in range(20)]
    try:
        hold.touch()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futs = [pool.submit(srv.post, {"input": jobs[i]}) for i in range(20)]
            t0 = time.time()
            while srv.metric("jv5fast_requests_in_progress") < 20:
                assert time.time() - t0 < 60 and not any(f.done() for f in futs), "requests finished too soon"
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # time for the server to take the signal while all 20 are held
            assert not any(f.done() for f in futs)
            hold.unlink()
            results = [f.result(timeout=120) for f in futs]
        assert srv.proc.wait(60) == 0, "".join(srv.stderr)[-3000:]
    finally:
        hold.unlink(missing_ok=True)  # a failed check must not leave the server held
        srv.stop()
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        assert close([d["embedding"] for d in r.json()["data"]], engines["nano"].embed(jobs[i]), 64)
    with pytest.raises(httpx.HTTPError):  # and it is gone
        httpx.get(srv.url + "/health", timeout=2)


def test_a_client_that_disconnects_has_its_queued_inputs_dropped(nano_ckpt):
    # 0.05 s a batch: its 2000 texts take minutes, so the client's 0.5 s read timeout always comes first
    srv = Server(nano_ckpt, "--max-batch-tokens", "8", "--max-wait-ms", "0", forward_s=0.05)
    try:
        big = texts(2000, seed=9, lo=2, hi=4)
        with pytest.raises(httpx.TimeoutException):
            srv.post({"input": big}, timeout=httpx.Timeout(60, read=0.5))
        t0 = time.time()
        while srv.metric("jv5fast_queue_depth") > 0:
            assert time.time() - t0 < 30, "queued texts of the gone client were not dropped"
            time.sleep(0.05)
        ran = srv.metric("jv5fast_batch_size_sum")
        assert ran < 1500, f"{ran} of 2000 texts ran for a client that had gone"
        time.sleep(0.3)
        assert srv.metric("jv5fast_batch_size_sum") - ran <= 8  # nothing more runs for it
        r = srv.post({"input": ["still serving"]})
        assert r.status_code == 200
        assert srv.metric('jv5fast_requests_total{endpoint="/v1/embeddings",status="499"}') == 1
    finally:
        srv.stop()


def test_health_is_503_while_loading_and_a_failed_load_exits_nonzero(tmp_path, nano_ckpt):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(nano_ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:  # corrupt the weights: loading fails after the bind
        f.seek(0)
        f.write(b"\xff" * 16)
    srv = Server(str(bad), ready=False)
    try:
        code = srv.proc.wait(120)
        assert code == 1
        assert any("loading the model failed" in line for line in srv.stderr + list(srv.lines.queue))
    finally:
        srv.stop()


def test_in_process_app_health_states_and_nan_is_500(engines, nano_ckpt):
    """The ASGI app on an existing engine (`create_app`), driven in-process: /health follows the state, and a
    model that produces NaN gives a 500 with a message, never numbers."""
    from fastapi.testclient import TestClient

    from jv5fast.server import create_app
    eng = jv5fast.Engine(nano_ckpt, device="cpu")
    go = threading.Event()
    app = create_app(loader=lambda: go.wait(60) and eng, served_model_name="t")
    with TestClient(app) as tc:
        assert tc.get("/health").json() == {"status": "loading"} and tc.get("/health").status_code == 503
        _err(tc.post("/v1/embeddings", json={"input": "x"}), 503, "still loading")
        go.set()
        t0 = time.time()
        while tc.get("/health").status_code != 200:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert tc.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200
        forward = eng.model.forward
        eng.model.forward = lambda batch, last_only=False: forward(batch, last_only) * float("nan")
        try:
            r = tc.post("/v1/embeddings", json={"input": ["a", "b"]})
        finally:
            eng.model.forward = forward
        e = _err(r, 500, "non-finite", "input[0, 1]")
        assert e["type"] == "server_error"
        assert tc.post("/v1/embeddings", json={"input": "fine again"}).status_code == 200

        def broken(batch, last_only=False, **kw):
            raise ValueError("bad weights in /secret/models/x")
        eng.model.forward = broken
        try:
            r = tc.post("/v1/embeddings", json={"input": ["a", "b"]})
        finally:
            eng.model.forward = forward
        e = _err(r, 500, "embedding failed on the server (ValueError)")  # a server fault, never a 400
        assert "/secret" not in e["message"]
        assert tc.post("/v1/embeddings", json={"input": "fine again"}).status_code == 200
        app.state.jv5fast.status = "draining"
        assert tc.get("/health").status_code == 503
        _err(tc.post("/v1/embeddings", json={"input": "x"}), 503, "shutting down")
        app.state.jv5fast.status = "ready"


def test_accepted_connections_have_nagle_off():
    """The listening socket says it is TCP, so asyncio sets TCP_NODELAY on each accepted connection; without it
    every keep-alive response waited ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from jv5fast.server import listen_socket
    sock = listen_socket("127.0.0.1", 0)

    async def main():
        got = asyncio.get_running_loop().create_future()

        def accepted(reader, writer):
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
        server = await asyncio.start_server(accepted, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            w.close()
            server.close()
    assert asyncio.run(main()) != 0


def test_a_drain_that_times_out_exits_nonzero_and_says_so(nano_ckpt):
    # 0.05 s a batch: the 2000 texts cannot finish within the 0.5 s drain on any CPU
    srv = Server(nano_ckpt, "--max-batch-tokens", "8", "--max-wait-ms", "0", "--drain-timeout", "0.5",
                 forward_s=0.05)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(srv.post, {"input": texts(2000, seed=4, lo=2, hi=4)})
            t0 = time.time()
            while srv.metric("jv5fast_requests_in_progress") < 1:
                assert time.time() - t0 < 60
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(60) == 1
            try:  # cut off: a 5xx, or the connection closed on it; never a 200
                status = fut.result(timeout=60).status_code
            except httpx.HTTPError:
                status = None
            assert status is None or status >= 500, status
        out = "".join(srv.lines.queue)
        assert "1 requests were still running after --drain-timeout 0.5 s" in out, out
    finally:
        srv.stop()


@pytest.mark.parametrize("args,env,flag", [
    (["--api-key", ""], {"JV5FAST_API_KEY": "s3cret"}, "--api-key"),  # `--api-key "$KEY"` with KEY unset
    (["--api-key", "  "], {}, "--api-key"),
    ([], {"JV5FAST_API_KEY": " "}, "$JV5FAST_API_KEY"),
])
def test_an_empty_api_key_is_a_start_up_error_never_no_auth(nano_ckpt, args, env, flag):
    proc = subprocess.Popen([sys.executable, "-m", "jv5fast", "serve", "--model", nano_ckpt, "--port", "0",
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "JV5FAST_API_KEY"}, **env})
    try:
        first = proc.stdout.readline()  # '' at exit; a server that started serving says 'listening on'
        assert "listening on" not in first, "the server started (without authentication)"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, (proc.returncode, first + out, err)
    assert f"jv5fast serve: error: {flag} is empty or blank" in err and "Traceback" not in err, err


def test_sigterm_while_the_model_loads_waits_for_it_and_exits_zero(nano_ckpt):
    """SIGTERM during loading: the process exits only once the loader has returned (never while it runs
    native torch code: the interpreter finalizing under it aborted with 'terminate called without an active
    exception', exit 134), does not warm up or serve the late model, and exits 0."""
    srv = Server(nano_ckpt, ready=False, load_s=2.0)
    try:
        assert srv.lines.get(timeout=120).startswith("test: loading")
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(120)
        out, err = "".join(srv.lines.queue), "".join(srv.stderr)
        assert code == 0 and "terminate called" not in err, (code, err[-3000:])
        assert out.startswith("test: loaded") and "jv5fast serve: stopped" in out, out
    finally:
        srv.stop()


def test_sigterm_while_loading_past_the_drain_timeout_exits_one_and_says_so(nano_ckpt):
    srv = Server(nano_ckpt, "--drain-timeout", "0.5", ready=False, load_s=60.0)
    try:
        assert srv.lines.get(timeout=120).startswith("test: loading")
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(30)  # long before the 60 s load ends
        out, err = "".join(srv.lines.queue), "".join(srv.stderr)
        assert code == 1 and "terminate called" not in err, (code, err[-3000:])
        assert "the model was still loading after --drain-timeout 0.5 s" in out, out
    finally:
        srv.stop()


def test_chunked_document_over_http_with_short_requests_served_meanwhile(nano_ckpt):
    """`jv5fast serve` with overflow 'chunk': a long document's vector and usage equal Engine.embed(overflow=
    'chunk') on an engine of the same max_length; short requests sent while its windows run (a slow forward is
    injected, and the document's tokens are over the queue limit) are answered before it; the counters count it."""
    ref = jv5fast.Engine(nano_ckpt, device="cpu", max_length=24)
    srv = Server(nano_ckpt, "--max-length", "24", "--max-batch-tokens", "48", "--max-queue-tokens", "300",
                 forward_s=0.02)  # ~130 windows: the document runs for seconds, the short requests take ms
    try:
        document = " ".join(WORDS * 150)  # ~2,500 tokens: some 130 windows of 24
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(srv.post, {"input": [document, "short"], "overflow": "chunk", "chunk_overlap": 2,
                                          "dimensions": 32})
            t0 = time.time()
            while srv.metric("jv5fast_batch_size_count") < 3:
                assert time.time() - t0 < 60 and not long.done(), long.done() and long.result().text
                time.sleep(0.02)
            for i, batch in enumerate([texts(2, seed=70 + i, hi=5) for i in range(3)]):  # each fits one batch
                r = srv.post({"input": batch})
                assert r.status_code == 200, r.text
                assert close([d["embedding"] for d in r.json()["data"]], ref.embed(batch), 64)
                assert not long.done(), "a short request waited for the whole document"
            r = long.result(120)
        assert r.status_code == 200, r.text
        want = ref.embed([document, "short"], overflow="chunk", chunk_overlap=2, truncate_dim=32)
        assert close([d["embedding"] for d in r.json()["data"]], want, 64)
        prefix = ref._prefix(None, None)
        ids, flags = ref._tokenize([prefix + document, prefix + "short"])
        windows = ref._windows(prefix, [document, "short"], ids, flags, 2)
        assert list(windows) == [0]
        tokens = windows[0].tokens + len(ids[1])
        assert r.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert srv.metric("jv5fast_inputs_chunked_total") == 1
        assert srv.metric("jv5fast_chunk_windows_total") == windows[0].num_windows > 100
        assert srv.metric("jv5fast_inputs_truncated_total") == 0
        r = srv.post({"input": [document], "truncate": True})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 24
        assert srv.metric("jv5fast_inputs_truncated_total") == 1
        _err(srv.post({"input": [document], "overflow": "chunk", "truncate": False}), 400, "conflicts")
    finally:
        srv.stop()
