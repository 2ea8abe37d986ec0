"""Corpus throughput (issue 15): the same corpus through plain ``Engine.embed`` and through ``embed-corpus``
(local Ray, 1 and 2 embedding actors), same run, same machine; rows/s, tokens/s and the Ray path's ratio.

Full-size nano (bench_latency.merged_checkpoint: random weights, retrieval merged in fp32, real tokenizer),
N short documents (3-30 words, "Document: " prompt) in 4 Parquet files. Threads are set deliberately, so
every entry uses the same 2 cores: ``Engine.embed`` runs with 2 torch threads; 1 worker = one actor with
2 CPUs and 2 torch threads; 2 workers = two actors with 1 CPU and 1 torch thread each. embed-corpus is timed
end to end as a user waits for it (planning, actor start-up and Engine load, embedding, Parquet commits;
not the local Ray start, which happens once); its output is checked against ``Engine.embed`` (max |diff|).
The overhead target is <= 15% at 1 worker on a quiet machine.

    python bench/bench_corpus.py [--docs 20000] [--workers 1,2] [--out bench/results/corpus_cpu.md]
    pytest bench/bench_corpus.py     # pytest-benchmark; JV5FAST_BENCH_CORPUS_DOCS sets N (default 1500)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import WORDS, machine
from bench_latency import merged_checkpoint

import jv5fast

DOCS = 20000  # the script's default (the corpus size)
# `pytest bench/` stays under 10 minutes with a smaller corpus; the env variable sets another size
PYTEST_DOCS = int(os.environ.get("JV5FAST_BENCH_CORPUS_DOCS", "1500"))
GROUP = "corpus nano cpu"


def write_corpus(folder, n, files=4, seed=0, words=(3, 30)):
    """n short documents (3-30 words: titles, snippets, passages' first lines) as ``files`` Parquet files
    (id int64, text); returns the texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(words[0], words[1] + 1)))) for _ in range(n)]
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        pq.write_table(pa.table({"id": pa.array(range(lo, hi), pa.int64()), "text": texts[lo:hi]}),
                       os.path.join(folder, f"docs-{f}.parquet"))
    return texts


def start_ray():
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 object_store_memory=512 * 2**20)


def engine_run(path, texts):
    """Plain Engine.embed, 2 torch threads: (vectors, seconds, tokens). Engine load not timed."""
    torch.set_num_threads(2)
    eng = jv5fast.Engine(path, device="cpu")
    eng.embed(texts[:8])  # warm-up
    tokens = sum(map(len, eng.tokenize(texts, prompt_name="document")))
    t0 = time.perf_counter()
    vecs = eng.embed(texts, prompt_name="document", show_progress_bar=False)
    return vecs, time.perf_counter() - t0, tokens


def corpus_run(path, corpus, out, workers):
    """embed-corpus into ``out`` with ``workers`` actors sharing 2 CPUs: seconds."""
    from jv5fast.distributed.corpus import run_corpus
    t0 = time.perf_counter()
    run_corpus(model=path, input=corpus, output=out, task=None, concurrency=workers, cpus_per_worker=2 / workers,
               rows_per_part=5000, batch_size=256, progress=False, log=lambda msg: None)
    return time.perf_counter() - t0


def check(out, ref):
    """max |diff| between the output parts (matched by id) and Engine.embed's rows; asserts every id once."""
    import pyarrow.parquet as pq
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    got = np.full(ref.shape, np.nan, np.float32)
    seen = 0
    for p in m["parts"]:
        t = pq.read_table(os.path.join(out, p["file"]))
        ids = t.column("id").to_numpy()
        got[ids] = np.asarray(t.column("embedding").to_pylist(), np.float32)
        seen += len(ids)
    assert seen == len(ref) and not np.isnan(got).any(), "rows missing or duplicated"
    return float(np.abs(got - ref).max())


def table(rows):
    head = ("| path | workers × threads | docs | tokens | seconds | rows/s | tokens/s | time vs Engine.embed | "
            "max abs diff |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['name']} | {r['layout']} | {r['docs']} | {r['tokens']} | {r['seconds']:.1f} | "
                          f"{r['docs'] / r['seconds']:.0f} | {r['tokens'] / r['seconds']:.0f} | "
                          f"**{r['ratio']:.2f}×** | {r['diff']:.1e} |\n" for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=DOCS)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = merged_checkpoint(tmp, "nano")
        texts = write_corpus(os.path.join(tmp, "corpus"), a.docs)
        ref, t_eng, tokens = engine_run(path, texts)
        rows.append(dict(name="Engine.embed", layout="1 × 2", docs=a.docs, tokens=tokens, seconds=t_eng, ratio=1.0,
                         diff=0.0))
        print(f"Engine.embed: {a.docs / t_eng:.0f} rows/s, {tokens / t_eng:.0f} tokens/s", flush=True)
        start_ray()
        for w in (int(x) for x in a.workers.split(",")):
            out = os.path.join(tmp, f"out-{w}")
            t = corpus_run(path, os.path.join(tmp, "corpus"), out, w)
            diff = check(out, ref)
            rows.append(dict(name="embed-corpus", layout=f"{w} × {2 // w}", docs=a.docs, tokens=tokens, seconds=t,
                             ratio=t / t_eng, diff=diff))
            print(f"embed-corpus, {w} worker(s): {a.docs / t:.0f} rows/s, {tokens / t:.0f} tokens/s, "
                  f"{t / t_eng:.2f}x Engine.embed's time, max |diff| {diff:.1e}", flush=True)
    import ray
    text = (f"# Corpus throughput, CPU fp32 (embed-corpus on local Ray vs Engine.embed)\n\n{datetime.date.today()} · "
            f"{machine()} · ray {ray.__version__}\n\nCommand: `python bench/bench_corpus.py --docs {a.docs} "
            f"--workers {a.workers}`\n\n{table(rows)}")
    ray.shutdown()
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


# ---- pytest-benchmark ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_case(checkpoint, tmp_path_factory):
    """The session's full-size nano, the corpus on disk, Engine.embed's vectors and the token count."""
    pytest.importorskip("ray")
    path = checkpoint("nano")
    folder = str(tmp_path_factory.mktemp("corpus"))
    texts = write_corpus(folder, PYTEST_DOCS)
    ref, _, tokens = engine_run(path, texts)
    start_ray()
    yield path, folder, texts, ref, tokens
    import ray
    ray.shutdown()


def _report(benchmark, groups, name, tokens, docs):
    p50 = benchmark.stats.stats.median
    benchmark.extra_info.update(docs=docs, tokens=tokens, rows_per_s=docs / p50, tokens_per_s=tokens / p50,
                                slower_than_jv5fast_x=groups.record(benchmark, name))


def test_engine(benchmark, groups, corpus_case):
    """pytest-benchmark entry: Engine.embed on the whole corpus, 2 torch threads."""
    path, _, texts, _, tokens = corpus_case
    eng = jv5fast.Engine(path, device="cpu")
    torch.set_num_threads(2)
    benchmark.group = GROUP
    benchmark.pedantic(eng.embed, args=(texts,), kwargs={"prompt_name": "document"}, rounds=1, iterations=1)
    _report(benchmark, groups, "jv5fast", tokens, len(texts))


@pytest.mark.parametrize("workers", [1, 2])
def test_embed_corpus(benchmark, groups, corpus_case, tmp_path, workers):
    """pytest-benchmark entry: embed-corpus end to end with 1 actor × 2 threads or 2 actors × 1 thread."""
    path, folder, texts, ref, tokens = corpus_case
    from jv5fast.distributed.corpus import run_corpus
    out = str(tmp_path / "out")
    benchmark.group = GROUP
    benchmark.pedantic(run_corpus, kwargs=dict(model=path, input=folder, output=out, task=None, concurrency=workers,
                                               cpus_per_worker=2 / workers, rows_per_part=5000, progress=False,
                                               log=lambda msg: None), rounds=1, iterations=1)
    assert check(out, ref) <= 1e-5
    _report(benchmark, groups, f"embed-corpus {workers} worker(s)", tokens, len(texts))


if __name__ == "__main__":
    sys.exit(main())
