"""CPU query latency by GEMM: the engine's prepacked projections on jv5fast's own GEMM (csrc/sgemm.cpp, the
default), on oneDNN's prepacked GEMM (``JV5FAST_CPU_GEMM=onednn``) and plain ``F.linear``
(``JV5FAST_CPU_PACK=0``); same checkpoint, same queries, same run. jv5fast's panels also let the engine take
its one-loop CPU forward (jv5fast/models/cpu_forward.py); the other two run the op-by-op backbone.

Full-size nano (random weights, real tokenizer), queries of 4–24 words embedded with the query prompt in
batches of 1, 8 and 32; p50 over 3 passes. Checks the vectors agree (cosine >= 0.99999). A first step of
issue 13's CPU latency work; the peers (onnxruntime, sentence-transformers) belong in its latency suite.

    python bench/bench_cpu_pack.py [--families nano,small] [--out bench/results/cpu_pack.md]
    python bench/bench_cpu_pack.py --kernels [--families nano] [--out ...]   # the GEMMs alone, per shape/ISA
    pytest bench/bench_cpu_pack.py          # pytest-benchmark, nano, 1 query: prepacked and plain entries
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jv5fast  # noqa: E402
from bench_engine import machine  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402

WORDS = "light speed vacuum cat dog tree river mountain city music code paper science ocean bread".split()
BATCHES = (1, 8, 32)


def queries(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 25))) for _ in range(n)]


MODES = {"jv5fast": {"JV5FAST_CPU_GEMM": "jv5fast"}, "onednn": {"JV5FAST_CPU_GEMM": "onednn"},
         "plain": {"JV5FAST_CPU_PACK": "0"}}


def engine(path, mode: str):
    """An fp32 CPU engine whose projections run on ``mode``'s GEMM (a key of MODES)."""
    old = {k: os.environ.get(k) for k in ("JV5FAST_CPU_GEMM", "JV5FAST_CPU_PACK")}
    os.environ.update(MODES[mode])
    try:
        eng = jv5fast.Engine(path, device="cpu", dtype="float32")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    kinds = {p.kind for p in eng.model.packed.values()} if eng.model.packed is not None else {"plain"}
    if kinds != {mode}:
        raise RuntimeError(f"asked for the {mode} GEMM, the engine runs {kinds}")
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
    engines = {m: engine(path, m) for m in MODES}
    ref = engines["plain"].encode_query(qs[:32])
    cos = min(float((e.encode_query(qs[:32]) * ref).sum(1).min()) for e in engines.values())
    if cos < 0.99999:
        raise AssertionError(f"{family}: packed vectors differ from plain ones (min cosine {cos})")
    rows = []
    for n in BATCHES:  # interleaved, so drift on a shared machine hits every mode alike
        rows.append((family, n, *(p50_ms(engines[m], qs, n) for m in MODES)))
    return rows, cos


SHAPES = {"nano": {"wqkv": (2304, 768), "wo": (768, 768), "w13": (6144, 768), "w2": (768, 3072)},
          "small": {"wqkv": (4096, 1024), "wo": (1024, 2048), "w13": (6144, 1024), "w2": (1024, 3072)}}


def kernel_rows(family, threads, rounds=15):
    """GFLOP/s per (shape, M) of each packed GEMM this CPU runs: jv5fast's at every ISA level it has, oneDNN fp32
    and (for reference, not exact) oneDNN bf16. Calls interleaved in one process, four weights cycled; the
    fastest and the median call of ``rounds``."""
    import torch

    from jv5fast import ops
    C = ops._cpu_ext()
    isas = [i for i in ("avx512", "avx2") if C is not None and
            ops.CPU_ISAS.index(i) >= ops.CPU_ISAS.index(ops.cpu_isa_supported())]
    torch.set_num_threads(threads)
    rows = []
    for name, (n, k) in SHAPES[family].items():
        ws = [torch.randn(n, k) for _ in range(4)]
        kinds = {f"jv5fast {i}": ("jv5fast", i) for i in isas}
        kinds.update({"oneDNN fp32": ("onednn", None), "oneDNN bf16": ("onednn_bf16", None)})
        packs = {key: [ops.pack_linear(w, kind=kind) for w in ws] for key, (kind, _) in kinds.items()}
        for m in (16, 128, 512):
            x = torch.randn(m, k)
            times = {key: [] for key in kinds}
            for r in range(rounds):
                for key, (kind, isa) in kinds.items():
                    if isa is not None:
                        C.set_isa_limit(isa)
                    t0 = time.perf_counter()
                    ops.linear(x, None, packs[key][r % 4])
                    times[key].append(time.perf_counter() - t0)
            if C is not None:
                C.set_isa_limit("avx512")
            flop = 2 * m * n * k
            rows.append((name, n, k, m, threads, {key: (flop / min(t) / 1e9, flop / float(np.median(t)) / 1e9)
                                                  for key, t in times.items()}))
    return rows


def kernels_main(a):
    import torch
    lines = ["# CPU fp32 GEMMs alone: jv5fast's (per ISA) vs oneDNN", "", f"{datetime.date.today()} · {machine()}",
             "", (f"Command: `python bench/bench_cpu_pack.py --kernels --families {a.families}`; GFLOP/s as fastest "
                  "/ median of 15 interleaved calls (four weights of the shape cycled); oneDNN bf16 (rounds inputs "
                  "and outputs to bf16) for reference only."), ""]
    for family in a.families.split(","):
        for threads in (1, torch.get_num_threads()) if torch.get_num_threads() > 1 else (1,):
            rows = kernel_rows(family, threads)
            keys = list(rows[0][5])
            lines += [f"| {family} | N x K | M | threads | " + " | ".join(keys) + " |",
                      "|---|---|---|---|" + "---|" * len(keys)]
            for name, n, k, m, t, g in rows:
                lines.append(f"| {name} | {n}x{k} | {m} | {t} | " +
                             " | ".join(f"{g[key][0]:.0f} / {g[key][1]:.0f}" for key in keys) + " |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="nano")
    ap.add_argument("--kernels", action="store_true", help="time the GEMMs alone, per shape, ISA and M")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.kernels:
        return kernels_main(a)
    lines = ["# CPU query latency by GEMM: jv5fast's own, oneDNN prepacked, plain F.linear", "",
             f"{datetime.date.today()} · {machine()}", "",
             f"Command: `python bench/bench_cpu_pack.py --families {a.families}`; full-size random weights, real "
             "tokenizer, queries of 4–24 words with the query prompt, p50 of 3 passes; every mode's vectors "
             "checked against plain F.linear.", "",
             "| model | queries per call | jv5fast GEMM p50 ms | oneDNN prepacked p50 ms | plain F.linear p50 ms "
             "| vs oneDNN | vs plain | min cosine |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            rows, cos = run_family(family, tmp)
            for fam, n, ours, onednn, plain in rows:
                lines.append(f"| {fam} | {n} | {ours:.1f} | {onednn:.1f} | {plain:.1f} | {onednn / ours:.2f}× "
                             f"| {plain / ours:.2f}× | {cos:.7f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


@pytest.fixture(scope="module")
def pack_engines(checkpoint):
    """(prepacked on jv5fast's GEMM, plain) engines on the session's full-size nano checkpoint (bench/conftest.py)."""
    path = checkpoint("nano")
    return engine(path, "jv5fast"), engine(path, "plain")


def _one_query(benchmark, groups, eng, name):
    benchmark.group = "prepacked vs plain nano cpu batch=1"
    benchmark.pedantic(eng.encode_query, args=(queries(1),), rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["slower_than_jv5fast_x"] = groups.record(benchmark, name)


def test_prepacked(benchmark, groups, pack_engines):
    """pytest-benchmark entry: jv5fast's default CPU fp32 path (prepacked projections, its own GEMM), one query."""
    _one_query(benchmark, groups, pack_engines[0], "jv5fast")


def test_plain(benchmark, groups, pack_engines):
    """pytest-benchmark entry: the same engine with plain F.linear (JV5FAST_CPU_PACK=0); same vectors."""
    packed, plain = pack_engines
    qs = queries(16)
    assert (plain.encode_query(qs) * packed.encode_query(qs)).sum(1).min() >= 0.99999
    _one_query(benchmark, groups, plain, "F.linear (JV5FAST_CPU_PACK=0)")


if __name__ == "__main__":
    sys.exit(main())
