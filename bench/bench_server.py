"""HTTP serving throughput and latency on CPU (fp32): `jv5fast serve` vs a naive per-request server vs Infinity.

One checkpoint (full-size nano, random weights, retrieval merged), three servers on 127.0.0.1, each a
subprocess waited on until /health is 200 and stopped with SIGTERM: (a) `jv5fast serve` (dynamic
batching); (b) the same Engine behind a FastAPI endpoint that embeds each request alone (no batching);
(c) Infinity 0.0.78 (torch engine) from its own venv on a sentence-transformers layout of the same
weights, "Document: " prefixed client-side so every server sees the same tokens (vectors are checked).
Load: C clients x M requests of 1-8 short texts, after an untimed warm-up; tok/s counts the tokens with
the checkpoint's tokenizer (Infinity's `usage` counts characters). Extra jv5fast-only rows on a base
checkpoint with adapters: mixed tasks (round-robin "retrieval.passage"/"text-matching" vs all one task)
and fairness (p99 of 1-text requests while a 2,000-text request is in flight vs unloaded). The client
shares the 2 cores with the server, for every server alike.

    python bench/bench_server.py [--clients 16] [--requests 8] [--servers jv5fast,naive,infinity]
        [--max-batch-tokens N] [--max-wait-ms MS] [--infinity-python /work/venvs/infinity/bin/python]
        [--no-extras] [--out bench/results/server_cpu.md]
    pytest bench/bench_server.py -s        # tiny model, few requests: (a) vs (b), prints the ratios

Infinity's venv (its [server] extra pins click<8.2, which huggingface-hub 1.31+ refuses, hence --no-deps):
    python -m venv /work/venvs/infinity && V=/work/venvs/infinity/bin/pip
    $V install torch==2.13.0 transformers==5.24.0 sentence-transformers==6.2.0 huggingface-hub==2.4.0 "numpy<2"
    $V install --no-deps infinity-emb==0.0.78
    $V install "click<8.2" "typer>=0.12.5,<0.13" fastapi "orjson>=3.9.8,!=3.10.0" posthog \
        prometheus-fastapi-instrumentator "pydantic>=2.4,<3" "rich>=13,<14" "uvicorn[standard]>=0.32,<0.33"
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jv5fast  # noqa: E402
from bench_engine import WORDS, machine  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402
from jv5fast.tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PREFIX = "Document: "  # jv5fast's default (document) prompt; Infinity gets it from the client
MODEL = "jv5"          # the served model name on every server
MIX = ("retrieval.passage", "text-matching")
LISTEN = re.compile(r"listening on http://\[?([^\s\]]+?)\]?:(\d+)")
INFINITY_PYTHON = "/work/venvs/infinity/bin/python"


def plan(clients, requests, seed=0, lo=1, hi=8):
    """clients x requests lists of lo..hi texts of 4-24 words each (seeded)."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
    return [[[text() for _ in range(rng.randint(lo, hi))] for _ in range(requests)] for _ in range(clients)]


# ---- the load generator ------------------------------------------------------------------------------------------
async def _post(client, url, body, n):
    t0 = time.perf_counter()
    r = await client.post(url, json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"POST {url}: HTTP {r.status_code}: {r.text[:300]}")
    data = r.json()["data"]
    if len(data) != n:
        raise RuntimeError(f"POST {url}: {len(data)} vectors for {n} texts")
    return dt, data


async def load(url, reqs, *, prefix="", extra=None, tasks=None):
    """Each client sends its requests one after another, all clients at once; returns the measurements.
    ``tasks``: a "task" field per request, round robin over all requests in the order they are sent."""
    turn, lat = itertools.count(), []

    async def one_client(client, mine):
        for texts in mine:
            body = {"model": MODEL, "input": [prefix + t for t in texts], **(extra or {})}
            if tasks:
                body["task"] = tasks[next(turn) % len(tasks)]
            lat.append((await _post(client, url, body, len(texts)))[0])

    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(client, mine) for mine in reqs))
        wall = time.perf_counter() - t0
    n_req = sum(map(len, reqs))
    n_texts = sum(len(t) for mine in reqs for t in mine)
    ms = np.array(lat) * 1e3
    return {"wall": wall, "requests": n_req, "texts": n_texts, "req_s": n_req / wall, "texts_s": n_texts / wall,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def count_tokens(path, reqs):
    tok = Tokenizer(path, read_json(path, "config.json")["max_position_embeddings"])
    return sum(len(ids) for mine in reqs for texts in mine for ids in tok.encode([PREFIX + t for t in texts])[0])


async def probe(url, prefix):
    """Vectors of 8 fixed texts, to check that every server embeds alike."""
    texts = plan(1, 1, seed=123, lo=8, hi=8)[0][0]
    async with httpx.AsyncClient(timeout=300) as client:
        _, data = await _post(client, url, {"model": MODEL, "input": [prefix + t for t in texts]}, len(texts))
    v = np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---- the servers -------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1: its port read from its 'listening on' line (or given), ready when
    GET /health answers 200, stopped with SIGTERM (then killed) on exit; its output goes to ``log``."""

    def __init__(self, name, cmd, log, *, port=None, env=None, path="/v1/embeddings", ready_timeout=900):
        self.name, self.cmd, self.log, self.port, self.env = name, cmd, log, port, env
        self.path, self.ready_timeout, self.proc = path, ready_timeout, None

    def _tail(self):
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-15:])

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self._tail()}")

    def __enter__(self):
        t0 = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **(self.env or {})}, stdin=subprocess.DEVNULL)
        try:
            deadline = t0 + self.ready_timeout
            while self.port is None:
                self._alive()
                with open(self.log, errors="replace") as f:
                    m = LISTEN.search(f.read())
                if m:
                    self.port = int(m.group(2))
                elif time.perf_counter() > deadline:
                    raise TimeoutError(f"{self.name}: no 'listening on' line:\n{self._tail()}")
                time.sleep(0.1)
            self.base = f"http://127.0.0.1:{self.port}"
            while True:
                self._alive()
                try:
                    if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{self.name}: /health not 200 after {self.ready_timeout} s:\n{self._tail()}")
                time.sleep(0.2)
            self.ready_s = time.perf_counter() - t0
            self.url = self.base + self.path
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def jv5fast_server(path, log, a):
    cmd = [sys.executable, "-m", "jv5fast", "serve", "--model", path, "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL, "--log-level", "warning"]
    if a.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(a.max_batch_tokens)]
    if a.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(a.max_wait_ms)]
    return Server("jv5fast serve", cmd, log)


def naive_server_proc(path, log):
    return Server("naive", [sys.executable, os.path.abspath(__file__), "--naive-server", path, "--port", "0"], log)


def infinity_server(st_path, log, a):
    cmd = [a.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", st_path, "--served-model-name", MODEL,
           "--engine", "torch", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
           "--port", str(free_port()), "--batch-size", str(a.infinity_batch_size), "--url-prefix", "",
           # no torch.compile / BetterTransformer on CPU; its own warm-up calls a tokenizer method that
           # transformers 5 removed (batch_encode_plus), so the bench's warm-up phase stands in for it
           "--no-compile", "--no-bettertransformer", "--no-model-warmup", "--log-level", "warning"]
    env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return Server("Infinity", cmd, log, port=int(cmd[cmd.index("--port") + 1]), env=env, path="/embeddings")


def st_layout(path, dest):
    """A sentence-transformers folder over ``path``'s files: Transformer -> last-token Pooling -> Normalize."""
    os.makedirs(os.path.join(dest, "1_Pooling"), exist_ok=True)
    for name in ("config.json", "tokenizer.json") + tuple(f for f in os.listdir(path) if f.startswith("model")):
        os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(dest, name))
    cfg, tok_cfg = read_json(path, "config.json"), read_json(path, "tokenizer_config.json")
    added = read_json(path, "tokenizer.json")["added_tokens"]
    tok_cfg["pad_token"] = next(t["content"] for t in added if t["id"] == cfg["pad_token_id"])  # batches pad
    files = {"tokenizer_config.json": tok_cfg,
             "modules.json": [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
                              for i, (p, t) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"),
                                                          ("2_Normalize", "Normalize")])],
             "1_Pooling/config.json": {"word_embedding_dimension": cfg["hidden_size"], "pooling_mode": "lasttoken"},
             "sentence_bert_config.json": {"max_seq_length": cfg["max_position_embeddings"], "do_lower_case": False}}
    for name, obj in files.items():
        with open(os.path.join(dest, name), "w") as f:
            json.dump(obj, f, indent=2)
    return dest


def naive_server(path, host="127.0.0.1", port=0):
    """(b): one Engine, each request embedded alone in FastAPI's threadpool (the engine has its own lock)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    eng = jv5fast.Engine(path, device="cpu", dtype="float32")
    eng.warmup()
    app = FastAPI()

    @app.get("/health")
    def health():
        return Response('{"status":"ready"}', media_type="application/json")

    @app.post("/v1/embeddings")
    def embeddings(body: dict):  # a plain def: FastAPI runs it in its threadpool
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        emb = eng.embed(texts)
        n = sum(map(len, eng.tokenize(texts)))
        out = {"object": "list", "model": MODEL, "usage": {"prompt_tokens": n, "total_tokens": n},
               "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(emb.tolist())]}
        return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    print(f"naive server: listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    return 0


# ---- the measurements --------------------------------------------------------------------------------------------
def measure(srv, reqs, tokens, warm, prefix="", **kw):
    asyncio.run(load(srv.url, warm, prefix=prefix, **kw))  # untimed warm-up
    r = asyncio.run(load(srv.url, reqs, prefix=prefix, **kw))
    r.update(server=srv.name, tokens=tokens, tok_s=tokens / r["wall"], ready_s=srv.ready_s)
    return r


def compare(path, st_path, tmp, a, servers):
    """The main table: the same load against each server in ``servers``."""
    reqs, warm = plan(a.clients, a.requests, a.seed), plan(min(a.clients, 4), a.warmup, a.seed + 1)
    tokens = count_tokens(path, reqs)
    rows, ref = [], None
    for name in servers:
        if name == "infinity" and not os.path.exists(a.infinity_python):
            print(f"Infinity skipped: {a.infinity_python} does not exist (see the docstring)", flush=True)
            continue
        make = {"jv5fast": lambda: jv5fast_server(path, os.path.join(tmp, "jv5fast.log"), a),
                "naive": lambda: naive_server_proc(path, os.path.join(tmp, "naive.log")),
                "infinity": lambda: infinity_server(st_path, os.path.join(tmp, "infinity.log"), a)}[name]
        prefix = PREFIX if name == "infinity" else ""
        with make() as srv:
            vec = asyncio.run(probe(srv.url, prefix))
            ref = vec if ref is None else ref
            r = measure(srv, reqs, tokens, warm, prefix)
        r["cos"] = float((vec * ref).sum(1).min())
        print(f"{r['server']}: {r['req_s']:.1f} req/s, {r['tok_s']:.0f} tok/s, p50 {r['p50']:.0f} ms, "
              f"p99 {r['p99']:.0f} ms (ready after {r['ready_s']:.1f} s, min cosine {r['cos']:.6f})", flush=True)
        if r["cos"] < 0.999:
            raise AssertionError(f"{r['server']} embeds differently from {rows[0]['server']}: min cosine {r['cos']}")
        rows.append(r)
    rows.append(offline(path, reqs, tokens))
    return rows


def offline(path, reqs, tokens):
    """The ceiling: the same texts through Engine.embed in one call, in-process (no HTTP, no client)."""
    eng = jv5fast.Engine(path, device="cpu", dtype="float32")
    flat = [t for mine in reqs for texts in mine for t in texts]
    eng.embed(flat[:32])
    t0 = time.perf_counter()
    eng.embed(flat, show_progress_bar=False)
    wall = time.perf_counter() - t0
    print(f"offline Engine.embed: {tokens / wall:.0f} tok/s", flush=True)
    return {"server": "Engine.embed, one call in-process (ceiling)", "offline": True, "texts": len(flat),
            "tokens": tokens, "texts_s": len(flat) / wall, "tok_s": tokens / wall}


async def fairness(url, a):
    """p99 of 1-text requests from a few clients, unloaded and while one 2,000-text request is in flight."""
    small = plan(a.fair_clients, a.fair_requests, a.seed + 2, lo=1, hi=1)
    unloaded = await load(url, small)
    big_texts = plan(1, 1, a.seed + 3, lo=a.big_texts, hi=a.big_texts)[0][0]
    async with httpx.AsyncClient(timeout=3600) as client:
        big = asyncio.create_task(_post(client, url, {"model": MODEL, "input": big_texts}, len(big_texts)))
        await asyncio.sleep(0.5)  # the big request is queued first
        loaded = await load(url, small)
        overlapped = not big.done()
        big_s = (await big)[0]
    return unloaded, loaded, overlapped, big_s


def extras(base, tmp, a):
    """jv5fast-only rows on a checkpoint with adapters: mixed tasks and fairness."""
    reqs, warm = plan(a.clients, a.requests, a.seed), plan(min(a.clients, 4), a.warmup, a.seed + 1)
    tokens = count_tokens(base, reqs)
    with jv5fast_server(base, os.path.join(tmp, "jv5fast-base.log"), a) as srv:
        asyncio.run(load(srv.url, warm, tasks=MIX))  # both adapters loaded before timing
        one = measure(srv, reqs, tokens, warm, extra={"task": MIX[0]})
        mixed = measure(srv, reqs, tokens, warm, tasks=MIX)
        unloaded, loaded, overlapped, big_s = asyncio.run(fairness(srv.url, a))
    print(f"mixed tasks: {mixed['tok_s']:.0f} tok/s vs one task {one['tok_s']:.0f} tok/s, "
          f"ratio {mixed['tok_s'] / one['tok_s']:.2f} (target >= 0.75)", flush=True)
    print(f"fairness: 1-text p99 {loaded['p99']:.0f} ms beside a {a.big_texts}-text request vs {unloaded['p99']:.0f} "
          f"ms unloaded, ratio {loaded['p99'] / unloaded['p99']:.2f} (target <= 3); big request {big_s:.1f} s, "
          f"{'in flight throughout' if overlapped else 'FINISHED BEFORE the small load did'}", flush=True)
    return one, mixed, unloaded, loaded, overlapped, big_s


def versions(a):
    import fastapi
    import uvicorn
    v = f"jv5fast {jv5fast.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}"
    if os.path.exists(a.infinity_python):
        code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
                "('infinity-emb', 'torch', 'transformers', 'sentence-transformers')))")
        v += "; Infinity venv: " + subprocess.run([a.infinity_python, "-c", code], capture_output=True,
                                                  text=True, check=False).stdout.strip()
    return v


def report(a, argv, rows, ext):
    lines = ["# Serving throughput and latency, CPU fp32", "",
             f"{datetime.date.today()} · {machine()} · {versions(a)}", "",
             (f"Command: `python bench/bench_server.py {shlex.join(argv)}`. {a.family}/{a.size} random "
             f"weights, {a.clients} clients x {a.requests} requests of 1-8 texts (4-24 words), after an untimed "
             "warm-up; the client runs on the same cores. tok/s counts prompt tokens with the model's tokenizer; "
             "ratio = jv5fast serve tok/s / this server's."), "",
             ("| server | requests | texts | tokens | req/s | texts/s | tok/s | p50 ms | p99 ms | ready s | "
              "min cosine | ratio |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ours = next((r for r in rows if r["server"] == "jv5fast serve"), None)
    for r in rows:
        ratio = f"**{ours['tok_s'] / r['tok_s']:.2f}×**" if ours else "-"
        if r.get("offline"):
            lines.append(f"| {r['server']} | - | {r['texts']} | {r['tokens']} | - | {r['texts_s']:.1f} | "
                         f"{r['tok_s']:.0f} | - | - | - | - | {ratio} |")
            continue
        lines.append(f"| {r['server']} | {r['requests']} | {r['texts']} | {r['tokens']} | {r['req_s']:.1f} | "
                     f"{r['texts_s']:.1f} | {r['tok_s']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['ready_s']:.1f} | "
                     f"{r['cos']:.6f} | {ratio} |")
    if ext:
        one, mixed, unloaded, loaded, overlapped, big_s = ext
        lines += ["", "jv5fast serve only, a checkpoint with adapters (same load):", "",
                  "| measurement | value | baseline | ratio | target |", "|---|---|---|---|---|",
                  (f"| mixed tasks ({' / '.join(MIX)} round robin) tok/s | {mixed['tok_s']:.0f} | "
                   f"{one['tok_s']:.0f} (all {MIX[0]}) | **{mixed['tok_s'] / one['tok_s']:.2f}** | ≥ 0.75 |"),
                  (f"| fairness: p99 ms of 1-text requests ({a.fair_clients} clients x {a.fair_requests}) beside one "
                   f"{a.big_texts}-text request ({big_s:.1f} s{'' if overlapped else ', finished early'}) | "
                   f"{loaded['p99']:.0f} | {unloaded['p99']:.0f} (unloaded) | **{loaded['p99'] / unloaded['p99']:.2f}** "
                   "| ≤ 3 |")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="nano", choices=("nano", "small"))
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per client (4 clients at most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--servers", default="jv5fast,naive,infinity")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="jv5fast serve's (default: its own)")
    ap.add_argument("--max-wait-ms", type=float, default=None, help="jv5fast serve's (default: its own)")
    ap.add_argument("--infinity-python", default=INFINITY_PYTHON)
    ap.add_argument("--infinity-batch-size", type=int, default=32)
    ap.add_argument("--no-extras", dest="extras", action="store_false", help="skip mixed tasks and fairness")
    ap.add_argument("--fair-clients", type=int, default=4)
    ap.add_argument("--fair-requests", type=int, default=8)
    ap.add_argument("--big-texts", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "server_cpu.md"))
    ap.add_argument("--naive-server", metavar="PATH", help=argparse.SUPPRESS)  # (b), run as a subprocess
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.naive_server:
        return naive_server(a.naive_server, port=a.port)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(os.path.join(tmp, "merged"), a.family, a.size, seed=0, merged_task="retrieval",
                                dtype=torch.float32)
        rows = compare(path, st_layout(path, os.path.join(tmp, "merged-st")), tmp, a, a.servers.split(","))
        ext = None
        if a.extras:
            base = write_checkpoint(os.path.join(tmp, "base"), a.family, a.size, seed=0, tasks=("retrieval",) + MIX[1:],
                                    dtype=torch.float32)
            ext = extras(base, tmp, a)
    text = report(a, sys.argv[1:] if argv is None else argv, rows, ext)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def test_server_bench(tmp_path):
    """Tiny model, few requests: jv5fast serve vs the naive server; all 200s and the right vector counts."""
    import pytest
    pytest.importorskip("jv5fast.server")
    args = argparse.Namespace(clients=4, requests=3, warmup=1, seed=0, max_batch_tokens=None, max_wait_ms=None,
                              infinity_python=INFINITY_PYTHON, infinity_batch_size=32)
    path = write_checkpoint(str(tmp_path / "merged"), "nano", "tiny", seed=0, merged_task="retrieval",
                            dtype=torch.float32)
    rows = compare(path, None, str(tmp_path), args, ["jv5fast", "naive"])
    assert [r["requests"] for r in rows[:2]] == [12, 12] and rows[2]["offline"]
    ours, naive, _ = rows
    print(f"\ntiny nano: jv5fast serve {ours['tok_s']:.0f} tok/s p99 {ours['p99']:.0f} ms, naive {naive['tok_s']:.0f} "
          f"tok/s p99 {naive['p99']:.0f} ms: ratio {ours['tok_s'] / naive['tok_s']:.2f}x tok/s, "
          f"{naive['p99'] / ours['p99']:.2f}x p99")


if __name__ == "__main__":
    sys.exit(main())
