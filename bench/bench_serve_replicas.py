"""HTTP serving throughput with Ray Serve replicas (jv5fast.distributed.serve): 1 replica vs 2, beside `jv5fast serve`.

One checkpoint (full-size nano, random weights, retrieval merged, fp32 on CPU) and one load (bench_server's: C clients
x M requests of 1-8 short texts, after an untimed warm-up), against: (a) `jv5fast serve` (one process, one engine);
(b) Ray Serve, 1 replica holding every CPU; (c) Ray Serve, N replicas sharing the same CPUs (num_cpus_per_replica =
CPUs / N, so torch gets CPUs / N threads each). All on one local Ray started here, client on the same cores.
On a 2-core machine (c) cannot beat (b): two engines split the same two cores, and every request takes two extra
Ray hops (proxy -> front -> replica); what (c) buys is a replica that can die without losing requests, and
on a cluster (one GPU per replica) throughput that scales with replicas, which this script does not measure.

    python bench/bench_serve_replicas.py [--clients 16] [--requests 8] [--replicas 2] [--cpus 2]
        [--size full|tiny] [--out bench/results/serve_replicas_cpu.md]
    pytest bench/bench_serve_replicas.py -s        # tiny model, few requests: prints the ratios
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import machine  # noqa: E402
from bench_server import MODEL, count_tokens, free_port, jv5fast_server, load, plan, probe  # noqa: E402

import jv5fast  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class _Deployed:
    """A Ray Serve application of jv5fast.distributed.serve on the local Ray, as bench_server's Server."""

    def __init__(self, name, base, path, replicas, cpus, **options):
        self.name, self.base, self.path, self.options = name, base, path, options
        self.replicas, self.cpus = replicas, cpus

    def __enter__(self):
        from ray import serve

        from jv5fast.distributed.serve import app
        t0 = time.perf_counter()
        serve.run(app(self.path, replicas=self.replicas, num_cpus_per_replica=self.cpus / self.replicas,
                      device="cpu", dtype="float32", served_model_name=MODEL, **self.options),
                  name="bench", route_prefix="/", logging_config={"log_level": "WARNING", "enable_access_log": False})
        while True:  # every replica warm and reporting
            r = httpx.get(self.base + "/health", timeout=10)
            if r.status_code == 200 and sum(x["status"] == "ready" for x in r.json()["replicas"]) == self.replicas:
                break
            time.sleep(0.2)
        self.ready_s, self.url = time.perf_counter() - t0, self.base + "/v1/embeddings"
        return self

    def __exit__(self, *exc):
        from ray import serve
        serve.delete("bench")


def measure(srv, reqs, warm, tokens):
    asyncio.run(load(srv.url, warm))  # untimed warm-up
    r = asyncio.run(load(srv.url, reqs))
    r.update(server=srv.name, tokens=tokens, tok_s=tokens / r["wall"], ready_s=srv.ready_s)
    print(f"{r['server']}: {r['req_s']:.1f} req/s, {r['tok_s']:.0f} tok/s, p50 {r['p50']:.0f} ms, "
          f"p99 {r['p99']:.0f} ms (ready after {r['ready_s']:.1f} s)", flush=True)
    return r


def compare(path, tmp, a):
    """Rows for (a) jv5fast serve, (b) 1 replica, (c) ``a.replicas`` replicas; vectors checked alike."""
    import ray
    from ray import serve
    reqs, warm = plan(a.clients, a.requests, a.seed), plan(min(a.clients, 4), a.warmup, a.seed + 1)
    tokens = count_tokens(path, reqs)
    rows, ref = [], None
    if not a.no_single:
        defaults = argparse.Namespace(max_batch_tokens=None, max_wait_ms=None)  # jv5fast serve's own
        with jv5fast_server(path, os.path.join(tmp, "jv5fast.log"), defaults) as srv:
            srv.name = "jv5fast serve (one process)"
            ref = asyncio.run(probe(srv.url, ""))
            rows.append(measure(srv, reqs, warm, tokens))
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in (1, a.replicas):
            with _Deployed(f"Ray Serve, {n} replica{'s' * (n > 1)} x {a.cpus / n:g} CPU", f"http://127.0.0.1:{port}",
                           path, n, a.cpus) as srv:
                vec = asyncio.run(probe(srv.url, ""))
                ref = vec if ref is None else ref
                r = measure(srv, reqs, warm, tokens)
                r["cos"] = float((vec * ref).sum(1).min())
                if r["cos"] < 0.999:
                    raise AssertionError(f"{srv.name} embeds differently: min cosine {r['cos']}")
                rows.append(r)
        serve.shutdown()
    finally:
        ray.shutdown()
    return rows


def report(a, argv, rows):
    import ray
    lines = ["# Ray Serve replicas: serving throughput on CPU, fp32", "",
             f"{datetime.date.today()} · {machine()} · jv5fast {jv5fast.__version__}, ray {ray.__version__}", "",
             (f"Command: `python bench/bench_serve_replicas.py {shlex.join(argv)}`. nano/{a.size} random weights, "
              f"{a.clients} clients x {a.requests} requests of 1-8 texts (4-24 words) after an untimed warm-up, "
              f"client on the same {os.cpu_count()} cores; the replicas share {a.cpus:g} Ray CPUs. "
              "Not measured on GPU."), "",
             "| server | req/s | tok/s | p50 ms | p99 ms | ready s | vs 1 replica |", "|---|---|---|---|---|---|---|"]
    one = next((r for r in rows if r["server"].startswith("Ray Serve, 1 ")), None)
    for r in rows:
        ratio = f"{r['tok_s'] / one['tok_s']:.2f}×" if one else "-"
        lines.append(f"| {r['server']} | {r['req_s']:.1f} | {r['tok_s']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                     f"{r['ready_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per client (4 clients at most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=2, help="the multi-replica row (the other row has 1)")
    ap.add_argument("--cpus", type=float, default=float(os.cpu_count()), help="Ray CPUs the replicas share")
    ap.add_argument("--no-single", action="store_true", help="skip the one-process jv5fast serve row")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_replicas_cpu.md"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(os.path.join(tmp, "merged"), "nano", a.size, seed=0, merged_task="retrieval",
                                dtype=torch.float32)
        rows = compare(path, tmp, a)
    text = report(a, sys.argv[1:] if argv is None else argv, rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def test_serve_replicas_bench(tmp_path):
    """Tiny model, few requests: 1 vs 2 Ray Serve replicas (and jv5fast serve); all 200s, vectors alike."""
    import pytest
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "ray[serve]"')
    a = argparse.Namespace(clients=4, requests=3, warmup=1, seed=0, replicas=2, cpus=2.0, no_single=False,
                           size="tiny")
    path = write_checkpoint(str(tmp_path / "merged"), "nano", "tiny", seed=0, merged_task="retrieval",
                            dtype=torch.float32)
    rows = compare(path, str(tmp_path), a)
    assert [r["requests"] for r in rows] == [12, 12, 12]
    print("\n" + report(a, ["(pytest)"], rows))


if __name__ == "__main__":
    sys.exit(main())
