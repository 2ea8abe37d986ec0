"""CPU query latency: the engine's oneDNN-prepacked projections vs plain ``F.linear`` (``JV5FAST_CPU_PACK=0``),
same checkpoint, same queries, same run.

Full-size nano (random weights, real tokenizer), queries of 4–24 words embedded with the query prompt in
batches of 1, 8 and 32; p50 over 3 passes. Checks the vectors agree (cosine >= 0.99999). A first step of
issue 13's CPU latency work; the peers (onnxruntime, sentence-transformers) belong in its latency suite.

    python bench/bench_cpu_pack.py [--families nano,small] [--out bench/results/cpu_pack.md]
    pytest bench/bench_cpu_pack.py          # pytest-benchmark, nano, 1 query
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jv5fast  # noqa: E402
from bench_engine import machine  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402

WORDS = "light speed vacuum cat dog tree river mountain city music code paper science ocean bread".split()
BATCHES = (1, 8, 32)


def queries(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 25))) for _ in range(n)]


def engine(path, packed: bool):
    old = os.environ.get("JV5FAST_CPU_PACK")
    os.environ["JV5FAST_CPU_PACK"] = "1" if packed else "0"
    try:
        eng = jv5fast.Engine(path, device="cpu", dtype="float32")
    finally:
        if old is None:
            os.environ.pop("JV5FAST_CPU_PACK")
        else:
            os.environ["JV5FAST_CPU_PACK"] = old
    if (eng.model.packed is not None) != packed:
        raise RuntimeError("JV5FAST_CPU_PACK did not take effect (no oneDNN in this torch?)")
    return eng


def p50_ms(eng, qs, n, passes=3):
    batches = [qs[i:i + n] for i in range(0, len(qs) - n + 1, n)][:max(3, 24 // n)]
    eng.encode_query(batches[0])
    times = []
    for _ in range(passes):
        for b in batches:
            t0 = time.perf_counter()
            eng.encode_query(b)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run_family(family, tmp):
    path = write_checkpoint(os.path.join(tmp, family), family, "full", seed=0, tasks=("retrieval",),
                            real_tokenizer=True)
    qs = queries()
    rows = []
    plain, packed = engine(path, False), engine(path, True)
    cos = float((plain.encode_query(qs[:32]) * packed.encode_query(qs[:32])).sum(1).min())
    if cos < 0.99999:
        raise AssertionError(f"{family}: packed vectors differ from plain ones (min cosine {cos})")
    for n in BATCHES:  # interleaved, so drift on a shared machine hits both alike
        a, b = p50_ms(plain, qs, n), p50_ms(packed, qs, n)
        rows.append((family, n, a, b))
    return rows, cos


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="nano")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    lines = ["# CPU query latency: prepacked vs plain projections", "",
             f"{datetime.date.today()} · {machine()}", "",
             f"Command: `python bench/bench_cpu_pack.py --families {a.families}`; full-size random weights, real "
             "tokenizer, queries of 4–24 words with the query prompt, p50 of 3 passes.", "",
             "| model | queries per call | plain F.linear p50 ms | prepacked p50 ms | speedup | min cosine |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            rows, cos = run_family(family, tmp)
            for fam, n, plain, packed in rows:
                lines.append(f"| {fam} | {n} | {plain:.1f} | {packed:.1f} | {plain / packed:.2f}× | {cos:.7f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def test_prepacked_vs_plain_one_query(benchmark, tmp_path):
    """pytest-benchmark entry: nano, one query per call; reports the plain/packed ratio."""
    path = write_checkpoint(str(tmp_path / "nano"), "nano", "full", seed=0, tasks=("retrieval",), real_tokenizer=True)
    qs = queries(16)
    plain, packed = engine(path, False), engine(path, True)
    assert (plain.encode_query(qs) * packed.encode_query(qs)).sum(1).min() >= 0.99999
    t_plain = p50_ms(plain, qs, 1, passes=1)
    benchmark.pedantic(packed.encode_query, args=(qs[:1],), rounds=10, iterations=1, warmup_rounds=2)
    ratio = t_plain / (benchmark.stats.stats.median * 1e3)
    benchmark.extra_info.update(plain_p50_ms=t_plain, ratio_plain_over_packed=ratio)
    print(f"\nnano 1 query: plain {t_plain:.1f} ms, prepacked {benchmark.stats.stats.median * 1e3:.1f} ms, "
          f"{ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
