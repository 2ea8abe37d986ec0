"""Exact binary search on CPU: jv5fast (C++ AVX-512 / AVX2 / scalar) vs faiss IndexBinaryFlat vs numpy.

Workload (issue 3): N random 1024-bit codes, 100 queries, top-10, 2 threads, all in one run; every
implementation must return identical distances (and, under the shared tie rule, identical ids).
Reports p50 [p20, p80] seconds, M comparisons/s, scan GB/s against the machine's copy bandwidth, and
the ratio to faiss measured in the same run.

    python bench/bench_hamming.py                      # N = 1M and 10M, writes bench/results/hamming_cpu.md
    python bench/bench_hamming.py --n 1000000 --out -  # print only
    python bench/bench_hamming.py --gpu --out bench/results/hamming_gpu.md   # Triton kernel on CUDA
    pytest bench/bench_hamming.py                      # pytest-benchmark, N = 1M
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import numpy as np

from jv5fast import _hamming

NBITS, NQ, K, THREADS = 1024, 100, 10, 2


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (NQ, NBITS // 8), dtype=np.uint8), rng.integers(0, 256, (n, NBITS // 8),
                                                                               dtype=np.uint8)


def implementations(corpus: np.ndarray, with_numpy: bool):
    """name -> search(queries) -> (D, I); faiss is built here so its add() is not timed."""
    impls = {}
    if _hamming.has_extension():
        # every popcount kernel this CPU can run, 'auto''s choice first (the reference for 'D / I equal')
        auto = _hamming._C.simd_kernel(NBITS // 8, "auto")
        for simd in sorted(_hamming.simd_kernels(), key=lambda s: s != auto):
            label = {"avx512": "avx512", "avx2": "avx2", "scalar": "scalar popcnt"}.get(simd, simd)
            impls[f"jv5fast C++ ({label})"] = (
                lambda q, simd=simd: _hamming._C.hamming_topk(q, corpus, K, THREADS, simd))
    try:
        import faiss

        faiss.omp_set_num_threads(THREADS)
        index = faiss.IndexBinaryFlat(NBITS)
        index.add(corpus)
        impls["faiss IndexBinaryFlat"] = lambda q: index.search(q, K)
    except ImportError:
        pass
    if with_numpy:  # single-threaded: numpy has no threaded bitwise_count
        impls["numpy bitwise_count (fallback)"] = lambda q: _hamming.hamming_topk_numpy(q, corpus, K)
    return impls


def timeit(fn, reps: int):
    fn()  # warm-up (page faults, faiss/omp thread start)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return np.percentile(ts, [50, 20, 80])


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Single-thread memcpy of nbytes: (read + write) bytes per second, best of 3."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = min(timeit(lambda: np.copyto(dst, src), 3))
    return 2 * nbytes / best / 1e9


def machine() -> str:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        field = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        model = field.get("Model name", model)
        flags = set(field.get("Flags", "").split())
        simd = [f for f in ("avx512_vpopcntdq", "avx512bw", "avx2", "popcnt") if f in flags]
        model += f" (lscpu: family {field.get('CPU family', '?')} model {field.get('Model', '?')}; {' '.join(simd)})"
    except Exception:  # noqa: BLE001
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def versions() -> str:
    parts = [f"numpy {np.__version__}"]
    try:
        import faiss

        opts = faiss.get_compile_options().strip() if hasattr(faiss, "get_compile_options") else "?"
        parts.append(f"faiss-cpu {faiss.__version__} (compile options: {opts}; a DD build dispatches at run "
                     "time, so here it may run AVX-512 code, on an AVX2-only CPU its AVX2 code)")
    except ImportError:
        pass
    return ", ".join(parts)


def run(n: int, reps: int, with_numpy: bool, nq: int = NQ):
    queries, corpus = make_data(n)
    queries = queries[:nq]
    impls = implementations(corpus, with_numpy)
    results, rows = {}, []
    for name, fn in impls.items():
        results[name] = fn(queries)
        r = reps if "numpy" not in name else 1
        rows.append((name, timeit(lambda: fn(queries), r)))
    ref_name = next(iter(results))
    D0, I0 = results[ref_name]
    same = {name: (np.array_equal(D, D0), np.array_equal(I, I0)) for name, (D, I) in results.items()}
    return rows, same


def table(n: int, rows, same, copy_gbs: float, nq: int = NQ) -> str:
    faiss_t = next((t[0] for name, t in rows if name.startswith("faiss")), None)
    gb = n * NBITS / 8 / 1e9
    out = [f"\n**N = {n:,} codes × {NBITS} bit, {nq} quer{'y' if nq == 1 else 'ies'}, top-{K}, {THREADS} threads**"
           f"{' (one pass over the codes: memory-bound)' if nq == 1 else ''}\n",
           "| implementation | p50 s [p20, p80] | M comparisons/s | scan GB/s (% of copy BW) | vs faiss | D / I equal |",
           "|---|---|---|---|---|---|"]
    for name, (p50, p20, p80) in rows:
        ratio = f"{faiss_t / p50:.2f}×" if faiss_t else "—"
        d_eq, i_eq = same[name]
        out.append(f"| {name} | {p50:.4f} [{p20:.4f}, {p80:.4f}] | {nq * n / p50 / 1e6:,.0f} | "
                   f"{gb / p50:.2f} ({100 * gb / p50 / copy_gbs:.0f}%) | {ratio} | {'yes' if d_eq else 'NO'} / "
                   f"{'yes' if i_eq else 'NO'} |")
    return "\n".join(out)


def gpu_main(out: str):
    """Triton kernel on CUDA: exactness vs hamming_topk_ref / the CPU index, then ms, G comparisons/s, GB/s."""
    import torch
    import triton

    from jv5fast.index import HammingIndex
    from jv5fast.kernels.hamming import hamming_topk, hamming_topk_ref, hamming_topk_words, pack_words

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    lines = [f"# Hamming top-k on GPU ({datetime.date.today().isoformat()})\n",
             f"- Device: {name}; torch {torch.__version__}, triton {triton.__version__}",
             "\n| check | result |", "|---|---|"]
    g = torch.Generator(device=dev).manual_seed(0)
    ok_all = True
    for nq, n, nbits, k, levels in [(100, 1_000_000, 1024, 10, 256), (100, 1_000_000, 1024, 100, 256),
                                    (64, 100_003, 256, 1, 256), (300, 200_000, 768, 10, 2), (7, 5, 96, 12, 256),
                                    (1, 333_333, 96, 50, 3)]:
        corpus = torch.randint(0, levels, (n, nbits // 8), dtype=torch.uint8, device=dev, generator=g)
        queries = torch.randint(0, levels, (nq, nbits // 8), dtype=torch.uint8, device=dev, generator=g)
        if n > 10:
            corpus[n // 3 : n // 3 + 50] = corpus[1]
            queries[0] = corpus[1]
        D, I = hamming_topk(queries, corpus, k)
        Dr, Ir = hamming_topk_ref(queries, corpus, k)
        ok = torch.equal(D, Dr) and torch.equal(I, Ir)
        ok_all &= ok
        lines.append(f"| {nq} q × {n:,} × {nbits} bit, k={k}, levels={levels} vs hamming_topk_ref | "
                     f"{'PASS' if ok else 'FAIL'} |")
    corpus_np, queries_np = make_data(300_000, seed=1)[1], make_data(300_000, seed=2)[0]
    cpu = HammingIndex(NBITS)
    cpu.add(corpus_np)
    gpu = HammingIndex(NBITS, device="cuda")
    gpu.add(corpus_np[:100_000])
    gpu.add(corpus_np[100_000:])
    Dc, Ic = cpu.search(queries_np, 10)
    Dg, Ig = gpu.search(queries_np, 10)
    ok = np.array_equal(Dc, Dg.cpu().numpy()) and np.array_equal(Ic, Ig.cpu().numpy())
    ok_all &= ok
    lines.append(f"| HammingIndex cuda vs cpu ({_hamming.resolve_backend()}), 100 q × 300k × 1024 bit | "
                 f"{'PASS' if ok else 'FAIL'} |")
    lines += ["\n| workload | Triton ms | G comparisons/s | scan GB/s | hamming_topk_ref ms |", "|---|---|---|---|---|"]
    for nq, n, k in [(1, 1_000_000, 10), (100, 1_000_000, 10), (1000, 1_000_000, 10), (100, 10_000_000, 10),
                     (100, 1_000_000, 100)]:
        corpus = torch.randint(0, 256, (n, NBITS // 8), dtype=torch.uint8, device=dev, generator=g)
        queries = torch.randint(0, 256, (nq, NBITS // 8), dtype=torch.uint8, device=dev, generator=g)
        qw, cw = pack_words(queries), pack_words(corpus)
        ms = triton.testing.do_bench(lambda: hamming_topk_words(qw, cw, k), warmup=5, rep=50)
        ref_ms = (triton.testing.do_bench(lambda: hamming_topk_ref(queries, corpus, k), warmup=1, rep=5)
                  if nq * n <= 100_000_000 else float("nan"))
        lines.append(f"| {nq} q × {n:,} × {NBITS} bit, k={k} | {ms:.3f} | {nq * n / ms / 1e6:,.1f} | "
                     f"{n * NBITS / 8 / ms / 1e6:,.0f} | {ref_ms:.1f} |")
        del corpus, queries, qw, cw
        torch.cuda.empty_cache()
    md = "\n".join(lines) + "\n"
    print(md)
    if out != "-":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
    if not ok_all:
        sys.exit("GPU results differ from the reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hamming_cpu.md"))
    ap.add_argument("--gpu", action="store_true", help="check and time the Triton kernel on CUDA instead")
    args = ap.parse_args(argv)
    if args.gpu:
        return gpu_main(args.out)
    copy_gbs = copy_bandwidth_gbs()
    text = [f"# Hamming top-k on CPU ({datetime.date.today().isoformat()})\n",
            f"- Machine: {machine()}; {versions()}; python {platform.python_version()}",
            f"- Copy bandwidth (1 GiB np.copyto, 1 thread, read + write): {copy_gbs:.1f} GB/s",
            f"- Load average when the run started: {os.getloadavg()[0]:.2f} (1 min) — other work shares the machine",
            "- Times are seconds per search of all queries (warm, corpus in RAM); the first row is the "
            "kernel `simd='auto'` picks here and the reference for 'D / I equal'.",
            "- Each C++ row is one popcount kernel forced with `simd=`: `avx512` (VPOPCNTQ), `avx2` (vpshufb "
            "nibble table + vpsadbw: what `auto` runs on an AVX2-only CPU such as the issue's Zen 3 reference, "
            "whose faiss time was ~1.1 s at N = 1M), `scalar popcnt` (64-bit POPCNT: CPUs without AVX2). All "
            "three ran on this CPU, so the avx2 row shows the kernel's speed here, not a Zen 3 measurement."]
    all_ok = True
    for n in args.n:
        rows, same = run(n, args.reps if n <= 2_000_000 else max(1, args.reps // 2), with_numpy=n <= 2_000_000)
        all_ok &= all(d and i for d, i in same.values())
        text.append(table(n, rows, same, copy_gbs))
        print(text[-1], flush=True)
        if n >= 10_000_000:  # one query: the scan itself, bounded by memory bandwidth
            rows, same = run(n, args.reps, with_numpy=False, nq=1)
            all_ok &= all(d and i for d, i in same.values())
            text.append(table(n, rows, same, copy_gbs, nq=1))
            print(text[-1], flush=True)
    text.append(f"\n- Load average when the run ended: {os.getloadavg()[0]:.2f} (1 min)")
    md = "\n".join(text) + "\n"
    if args.out != "-":
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out}")
    if not all_ok:
        sys.exit("implementations disagree")


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points (N = 1M): pytest bench/bench_hamming.py


def _pytest_case(benchmark, name_prefix):
    """(queries, corpus, search, n) for the implementation whose name starts with ``name_prefix``, in the
    group 'hamming top-10 cpu N=...'; skips when this machine lacks it."""
    import pytest

    n = int(os.environ.get("JV5FAST_BENCH_N", 1_000_000))
    queries, corpus = make_data(n)
    impls = implementations(corpus, with_numpy=True)
    name = next((k for k in impls if k.startswith(name_prefix)), None)
    if name is None:
        pytest.skip(f"{name_prefix} not available")
    benchmark.group = f"hamming top-{K} cpu N={n:,}"
    return queries, corpus, impls[name], n


def _report(benchmark, groups, name, n):
    benchmark.extra_info.update(m_comparisons_per_s=NQ * n / benchmark.stats.stats.median / 1e6,
                                slower_than_jv5fast_x=groups.record(benchmark, name))


def _timed_and_checked(benchmark, groups, impl, name, rounds):
    """Time ``impl``'s search, check its first 5 queries' distances against numpy's, report."""
    queries, corpus, fn, n = _pytest_case(benchmark, impl)
    D, _ = benchmark.pedantic(fn, args=(queries,), rounds=rounds, warmup_rounds=1)
    Dn, _ = _hamming.hamming_topk_numpy(queries[:5], corpus, K)
    np.testing.assert_array_equal(D[:5], Dn)
    _report(benchmark, groups, name, n)


def test_jv5fast(benchmark, groups):
    _timed_and_checked(benchmark, groups, "jv5fast C++", "jv5fast", rounds=5)


def test_faiss(benchmark, groups):
    _timed_and_checked(benchmark, groups, "faiss", "faiss IndexBinaryFlat", rounds=3)


def test_numpy(benchmark, groups):
    queries, corpus, fn, n = _pytest_case(benchmark, "numpy")
    benchmark.pedantic(fn, args=(queries,), rounds=1, warmup_rounds=0)
    _report(benchmark, groups, "numpy bitwise_count", n)


if __name__ == "__main__":
    main()
