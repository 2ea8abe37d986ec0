"""jv5fast.distributed.serve: `jv5fast serve` on Ray Serve, on a local Ray (2 CPUs, one instance per module) with two
replicas of the tiny nano checkpoint, reached over HTTP through Ray's proxy. Vectors must equal `Engine.embed`
(float within 1e-6 x D/k, binary byte-identical), as for `jv5fast serve`; /health and /metrics cover every
replica; a replica killed mid-request or mid-load loses no request; SIGTERM drains and exits 0.

Ray process starts are the slow part (seconds each on a busy 2-core machine), so one application serves most
tests and the kill test runs last. The pure parts (the in-process ASGI call, /health's rule, the metrics merge,
option checks) are tested without Ray first.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "jv5fast[serve-ray]"')

import jv5fast  # noqa: E402
from jv5fast.distributed import serve_front, serve_replica  # noqa: E402
from jv5fast.distributed.serve import app as serve_app  # noqa: E402
from jv5fast.distributed.serve import run  # noqa: E402
from procs import Pumped, free_port, wait_for  # noqa: E402

WORDS = "the model embedding vector search query document token fast kernel attention über naïve 12.5% GPU".split()
DIM = 64  # the tiny nano checkpoint


def texts(n, seed, lo=1, hi=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def close(got, ref, dim=DIM):
    """Equal to Engine.embed up to GEMM rounding (batch composition differs): 1e-6, x D/k for a k-dim prefix."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6 * dim / ref.shape[-1]


@pytest.fixture(scope="module")
def engine(nano_ckpt):
    return jv5fast.Engine(nano_ckpt, device="cpu")


# ---- without Ray: the pieces --------------------------------------------------------------------------------------
def lifespan_app(**options):
    """create_app over a fresh engine, started as a replica starts it (uvicorn's LifespanOn)."""
    from uvicorn.config import Config
    from uvicorn.lifespan.on import LifespanOn

    from jv5fast.server import create_app
    app = create_app(options.pop("engine"), **options)
    life = LifespanOn(Config(app, lifespan="on", log_config=None))
    return app, life


def scope(method, path, headers=(), root_path=""):
    return {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": list(headers),
            "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}


def test_a_replica_answers_with_the_jv5fast_serve_app_in_process(engine):
    app, life = lifespan_app(engine=engine, api_key="k3y", max_request_bytes=4096, served_model_name="nano-test")
    batch = texts(5, seed=1)

    async def main():
        await life.startup()
        key = [(b"authorization", b"Bearer k3y"), (b"content-type", b"application/json")]

        async def call(method, path, body=b"", headers=key, chunks=None):
            chunks = chunks or [body]
            msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]

            async def receive():
                return msgs.pop(0) if msgs else await asyncio.sleep(3600)
            sc = scope(method, path, headers)
            got = await serve_front.read_body(sc, receive, 4096)  # what the front forwards
            return await serve_replica.call_asgi(app, serve_front.forwarded(sc, got))

        ok = await call("POST", "/v1/embeddings", json.dumps({"input": batch, "task": "retrieval.query",
                                                               "dimensions": 32}).encode())
        no_key = await call("POST", "/v1/embeddings", b'{"input": "x"}', headers=[])
        bad = await call("POST", "/v1/embeddings", b'{"input": "x", "bogus": 1}')
        big = await call("POST", "/v1/embeddings", chunks=[b"x" * 3000] * 3)  # no Content-Length: read to limit+1
        big_cl = await call("POST", "/v1/embeddings", headers=[*key, (b"content-length", b"99999")])
        models = await call("GET", "/v1/models")
        await life.shutdown()
        return ok, no_key, bad, big, big_cl, models

    ok, no_key, bad, big, big_cl, models = asyncio.run(main())
    assert ok["status"] == 200, ok["body"]
    rows = [d["embedding"] for d in json.loads(ok["body"])["data"]]
    assert close(rows, engine.embed(batch, task="retrieval", prompt_name="query", truncate_dim=32))
    assert no_key["status"] == 401 and json.loads(no_key["body"])["error"]["code"] == "invalid_api_key"
    assert bad["status"] == 400 and "unknown field 'bogus'" in json.loads(bad["body"])["error"]["message"]
    for r in (big, big_cl):
        assert r["status"] == 413 and json.loads(r["body"])["error"]["code"] == "request_too_large"
    assert models["status"] == 200 and json.loads(models["body"])["data"][0]["id"] == "nano-test"


def test_health_is_200_only_with_a_ready_replica():
    def snap(*states, draining=False):
        return {"draining": draining, "replicas": [
            {"replica": f"SERVE_REPLICA::a#Engine#{i}", "kind": "engine", "status": s,
             "error": "ValueError: bad file" if s == "failed" else None} for i, s in enumerate(states)]
            + [{"replica": "SERVE_REPLICA::a#Front#f", "kind": "front", "status": "ready"}]}
    assert serve_front.health(snap())[0] == 503 and serve_front.health(snap())[1]["status"] == "unavailable"
    code, body = serve_front.health(snap("loading", "unreachable"))
    assert code == 503 and body["status"] == "loading"
    code, body = serve_front.health(snap("failed", "unreachable"))
    assert code == 503 and body["status"] == "unavailable"
    code, body = serve_front.health(snap("failed"))
    assert code == 503 and body["status"] == "failed"
    assert body["replicas"] == [{"replica": "SERVE_REPLICA::a#Engine#0", "status": "failed",
                                 "error": "ValueError: bad file"}]
    code, body = serve_front.health(snap("failed", "ready", "unreachable"))
    assert code == 200 and body["status"] == "ready" and len(body["replicas"]) == 3  # the front is not listed
    assert serve_front.health(snap("ready", draining=True))[0] == 503


def test_registry_keeps_failures_and_marks_silent_replicas_unreachable():
    reg = serve_replica.Registry(stale_s=0.05)
    reg.report({"replica": "r1", "kind": "engine", "status": "failed", "error": "E"})
    reg.report({"replica": "r1", "kind": "engine", "status": "loading", "error": None})  # late: the failure stands
    reg.report({"replica": "r2", "kind": "engine", "status": "ready", "error": None})
    assert {r["replica"]: r["status"] for r in reg.snapshot()["replicas"]} == {"r1": "failed", "r2": "ready"}
    time.sleep(0.1)
    assert {r["replica"]: r["status"] for r in reg.snapshot()["replicas"]} == {"r1": "failed", "r2": "unreachable"}
    reg.forget("r2")
    reg.set_draining()
    assert [r["replica"] for r in reg.snapshot()["replicas"]] == ["r1"] and reg.snapshot()["draining"]


def test_metrics_of_replicas_merge_with_a_replica_label():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    texts_ = []
    for n in (1, 2):
        r = CollectorRegistry()
        Counter("jv5fast_requests", "doc", ["endpoint", "status"], registry=r).labels("/v1/embeddings", "200").inc(n)
        Histogram("jv5fast_forward_seconds", "doc", registry=r).observe(0.01 * n)
        texts_.append((f"rep{n}", generate_latest(r).decode()))
    out = serve_front.merge_metrics(texts_, ["ready", "ready", "loading"]).decode()
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    reqs = {s.labels["replica"]: s.value for s in fams["jv5fast_requests"].samples if s.name.endswith("_total")}
    assert reqs == {"rep1": 1.0, "rep2": 2.0}
    counts = {s.labels["replica"]: s.value for s in fams["jv5fast_forward_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"rep1": 1.0, "rep2": 1.0}
    states = {s.labels["status"]: s.value for s in fams["jv5fast_serve_replicas"].samples}
    assert states["ready"] == 2 and states["loading"] == 1 and states["failed"] == 0
    assert out.count("# TYPE jv5fast_requests_total counter") == 1  # one family, contiguous


def test_app_checks_its_options_before_ray(nano_ckpt, monkeypatch):
    with pytest.raises(TypeError, match="unknown option 'max_batch_token'"):
        serve_app(nano_ckpt, max_batch_token=8)
    with pytest.raises(ValueError, match="min_replicas=3 is over max_replicas=2"):
        serve_app(nano_ckpt, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="replicas must be an int >= 1"):
        serve_app(nano_ckpt, replicas=0)
    with pytest.raises(ValueError, match="num_gpus_per_replica"):
        serve_app(nano_ckpt, num_gpus_per_replica=-1)
    monkeypatch.setenv("JV5FAST_API_KEY", "  ")
    with pytest.raises(ValueError, match="JV5FAST_API_KEY is empty or blank"):
        serve_app(nano_ckpt)


def test_replicas_autoscaling_and_resources_reach_the_deployment(nano_ckpt):
    front = serve_app(nano_ckpt, replicas=2, min_replicas=1, max_replicas=4, num_cpus_per_replica=1.5,
                      num_gpus_per_replica=0.5, target_ongoing_requests=8)._bound_deployment
    engines = front.init_args[0]._bound_deployment
    assert (front.name, engines.name) == ("Front", "Engine")
    auto = engines._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 2, 4, 8)
    assert engines.ray_actor_options == {"num_cpus": 1.5, "num_gpus": 0.5}
    assert engines.init_args[2]["device"] == "cuda"  # a replica with a GPU uses it
    fixed = serve_app(nano_ckpt, replicas=3)._bound_deployment.init_args[0]._bound_deployment
    assert fixed._deployment_config.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    assert fixed.init_args[2]["device"] == "cpu" and fixed.ray_actor_options["num_gpus"] == 0
    with pytest.raises(ValueError, match="needs num_gpus_per_replica > 0"):
        serve_app(nano_ckpt, device="cuda")


def test_importing_jv5fast_and_the_server_does_not_import_ray():
    code = ("import sys, jv5fast, jv5fast.server, jv5fast.distributed.serve, jv5fast.distributed.serve_front, "
            "jv5fast.distributed.serve_replica; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


# ---- on a local Ray ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    # a failing replica constructor marks a new deployment failed after 1 try per replica, not 3 (the load
    # failure test would take minutes); read by Serve's controller, which inherits this environment
    os.environ["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    os.environ.pop("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", None)


def health(url, timeout=10):
    r = httpx.get(url + "/health", timeout=timeout)
    return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text)


def ready_replicas(url):
    try:
        code, body = health(url)
    except httpx.HTTPError:
        return []
    return [r["replica"] for r in body["replicas"] if r["status"] == "ready"] if code == 200 else []


@pytest.fixture(scope="module")
def served(cluster, nano_ckpt):
    from ray import serve
    serve.run(serve_app(nano_ckpt, replicas=2, num_cpus_per_replica=0.5, request_timeout_s=60,
                        served_model_name="nano-test", max_batch_tokens=64),
              name="jv5fast", route_prefix="/")
    wait_for("2 ready replicas", lambda: len(ready_replicas(cluster)) == 2, 120)
    return cluster


def post(url, body, timeout=120):
    return httpx.post(url + "/v1/embeddings", json=body, timeout=timeout)


def metrics(url):
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_vectors_over_http_equal_engine_embed(served, engine):
    batch = texts(6, seed=3) + [""]
    r = post(served, {"input": batch})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "nano-test" and [d["index"] for d in body["data"]] == list(range(len(batch)))
    assert close([d["embedding"] for d in body["data"]], engine.embed(batch))
    assert body["usage"]["prompt_tokens"] == sum(len(t) for t in engine.tokenize(batch))
    r = post(served, {"input": batch, "task": "retrieval.query", "dimensions": 32, "encoding_format": "base64"})
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    assert close(got, engine.embed(batch, task="retrieval", prompt_name="query", truncate_dim=32))
    for kind in ("binary", "ubinary"):
        r = post(served, {"input": batch, "task": "text-matching", "embedding_type": kind})
        ref = engine.embed(batch, task="text-matching", prompt_name="document", precision=kind)
        assert np.array_equal(np.array([d["embedding"] for d in r.json()["data"]]), ref.astype(np.int64)), kind
    # errors are the app's own: status, OpenAI body, message
    r = post(served, {"input": [], "model": "nano-test"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = post(served, {"input": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(served + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    m = httpx.get(served + "/v1/models").json()["data"][0]
    assert m["id"] == "nano-test" and m["dimensions"] == DIM


def test_concurrent_clients_get_their_own_vectors_from_both_replicas(served, engine):
    jobs = [texts(random.Random(i).randint(1, 9), seed=100 + i) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: post(served, {"input": b}), jobs))
    for batch, r in zip(jobs, results):
        assert r.status_code == 200, r.text
        assert close([d["embedding"] for d in r.json()["data"]], engine.embed(batch))
    time.sleep(1.2)  # the replicas' next reports
    served_by = {s.labels["replica"] for s in metrics(served)["jv5fast_requests"].samples
                 if s.labels.get("endpoint") == "/v1/embeddings" and s.name.endswith("_total") and s.value > 0}
    assert len([r for r in served_by if "#Engine#" in r]) == 2, served_by


def test_health_and_metrics_cover_every_replica(served):
    code, body = health(served)
    assert code == 200 and body["status"] == "ready"
    names = [r["replica"] for r in body["replicas"]]
    assert len(names) == 2 and all(n.startswith("SERVE_REPLICA::jv5fast#Engine#") for n in names)
    assert httpx.head(served + "/health").status_code == 200
    fams = metrics(served)
    states = {s.labels["status"]: s.value for s in fams["jv5fast_serve_replicas"].samples}
    assert states["ready"] == 2 and states["failed"] == 0
    for fam in ("jv5fast_requests", "jv5fast_batch_size", "jv5fast_queue_depth", "jv5fast_requests_in_progress"):
        assert fam in fams, sorted(fams)
        assert {s.labels["replica"] for s in fams[fam].samples} >= set(names), fam
    assert any("#Front#" in s.labels["replica"] for s in fams["jv5fast_serve_retries"].samples)


def test_a_replica_that_fails_to_load_is_named_and_run_returns_1(cluster, nano_ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(nano_ckpt, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    seen, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                seen.append(health(cluster + "/broken", timeout=3))
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        code = run(str(broken), name="broken", route_prefix="/broken", replicas=1, num_cpus_per_replica=0.5)
    finally:
        stop.set()
        t.join()
    out = capsys.readouterr().out
    assert code == 1, out
    assert "jv5fast serve: error: replica SERVE_REPLICA::broken#Engine#" in out and "failed to load" in out, out
    assert "safetensors" in out, out
    assert not [s for s in seen if s[0] == 200], seen  # never healthy
    from ray import serve
    assert "broken" not in serve.status().applications  # deleted


LAUNCH = """
import sys
from jv5fast.distributed.serve import run
sys.exit(run(sys.argv[1], ray_address=sys.argv[2], name=sys.argv[3], route_prefix="/" + sys.argv[3], replicas=1,
             num_cpus_per_replica=0.5, drain_timeout=60, max_batch_tokens=16, max_wait_ms=0, log_level="warning"))
"""


def launch(model, name):
    """run() in a subprocess that joins this module's Ray (a cluster, as --ray-address does), its output pumped
    (procs.Pumped)."""
    import ray
    return Pumped(subprocess.Popen([sys.executable, "-c", LAUNCH, model, ray.get_runtime_context().gcs_address, name],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def test_sigterm_while_the_replicas_load_stops_and_exits_zero(served, nano_ckpt):
    from ray import serve
    run = launch(nano_ckpt, "early")
    proc, lines = run.proc, run.lines
    try:
        wait_for("the listening line", lambda: any("listening on" in ln for ln in lines) or proc.poll(), 120,
                 every=0.02)
        proc.send_signal(signal.SIGTERM)  # a replica takes seconds to start: it is loading now
        assert proc.wait(120) == 0, run.said()
    finally:
        run.stop()  # kills it if a check failed; reads the last lines
    assert "jv5fast serve: stopped while loading; not serving\n" in lines, lines
    assert "early" not in serve.status().applications


def test_sigterm_drains_requests_in_flight_and_exits_zero(served, nano_ckpt, engine):
    from ray import serve
    run = launch(nano_ckpt, "sigterm")
    proc, lines = run.proc, run.lines
    try:
        wait_for("the ready line", lambda: any("jv5fast serve: ready" in ln for ln in lines) or proc.poll(), 240)
        assert proc.poll() is None, run.said()
        url = [ln for ln in lines if "listening on" in ln][0].split("listening on ")[1].split()[0]
        assert url == served + "/sigterm"
        jobs = [texts(300, seed=500 + i, lo=8, hi=30) for i in range(4)]  # 16-token batches: seconds each
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(post, url, {"input": b}) for b in jobs]
            wait_for("requests in flight", lambda: sum(
                s.value for s in metrics(url)["jv5fast_requests_in_progress"].samples) >= 4, 60)
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futs]
        assert proc.wait(120) == 0, run.said()
    finally:
        run.stop()  # kills it if a check failed; reads the last lines
    for batch, r in zip(jobs, results):
        assert r.status_code == 200, r.text
        assert close([d["embedding"] for d in r.json()["data"]], engine.embed(batch))
    assert any("jv5fast serve: draining" in ln for ln in lines) and lines[-1].startswith("jv5fast serve: stopped")
    assert "sigterm" not in serve.status().applications
    assert len(ready_replicas(served)) == 2  # the other application is untouched


def test_replicas_killed_mid_request_and_mid_load_lose_no_request(served, engine):
    import ray
    # long enough (~15k tokens, ~240 batches of 64) that each replica is always inside a request: the kill
    # below must land on one in flight (a short request could finish between the busy check and the kill)
    batch = texts(300, seed=9, lo=20, hi=60)
    ref = engine.embed(batch)
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            results.append(post(served, {"input": batch}, timeout=90))

    before = {s.labels["replica"]: s.value for s in metrics(served)["jv5fast_serve_retries"].samples
              if s.name.endswith("_total")}
    first = ready_replicas(served)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(client)
        try:
            wait_for("both replicas busy", lambda: len([1 for s in metrics(served)["jv5fast_requests_in_progress"]
                                                         .samples if s.value > 0]) == 2, 60, every=0.1)
            ray.kill(ray.get_actor(first[0], namespace="serve"), no_restart=True)  # mid-request
            # its replacement: killed while Serve starts it (it is not ready yet, so it is loading or about to)

            def starting():
                alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"].startswith("SERVE_REPLICA::jv5fast#Engine#")]
                return [a for a in alive if a not in first] or None
            second = wait_for("a replacement replica", starting, 120, every=0.05)[0]
            status = {r["replica"]: r["status"] for r in health(served)[1]["replicas"]}.get(second, "not reported")
            assert status != "ready", status
            ray.kill(ray.get_actor(second, namespace="serve"), no_restart=True)
            wait_for("2 ready replicas again", lambda: len(ready_replicas(served)) == 2, 180, every=0.5)
            time.sleep(1.0)
        finally:
            stop.set()
    assert len(results) >= 6
    for r in results:
        assert r.status_code == 200, r.text  # retried on the other replica, never lost
        assert close([d["embedding"] for d in r.json()["data"]], ref)
    after = {s.labels["replica"]: s.value for s in metrics(served)["jv5fast_serve_retries"].samples
             if s.name.endswith("_total")}
    assert sum(after.values()) > sum(before.values()), (before, after)  # a request did die with its replica
    code, body = health(served)
    assert code == 200 and first[0] not in [r["replica"] for r in body["replicas"] if r["status"] == "ready"]
    # the registry itself killed: /health asks a replica meanwhile, and stays 200
    registry = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::jv5fast#Registry#")]
    ray.kill(ray.get_actor(registry[0], namespace="serve"), no_restart=True)
    assert health(served)[0] == 200
