"""End-to-end embedding throughput on CPU (fp32): jv5fast vs the reference path, same weights, same run.

Full-size nano and small with random weights and the real tokenizers (rebuilt from quicktok's BPE
ranks), a mixed-length corpus (10–500 tokens, log-uniform). The reference is what sentence-transformers
does: transformers' own Qwen3Model / EuroBertModel (SDPA), length-sorted right-padded batches of 32
(its default), last real token, L2 normalize. Both paths get the same token ids, so tokenization is
not timed on either side. Prints tokens/s and the ratio; checks the vectors agree (cosine ≥ 0.99999).

    python bench/bench_engine.py [--families nano,small] [--texts 48] [--out bench/results/engine_cpu.md]
    pytest bench/bench_engine.py            # pytest-benchmark, nano only (small takes minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import sys
import tempfile
import time

import pytest
import torch

import jv5fast
from jv5fast.testing import reference_embed, reference_model, write_checkpoint

WORDS = ("the model embedding vector search query document token fast kernel attention layer retrieval text "
         "data index graph memory speed sequence Berlin 2024 über naïve résumé GPU 12.5% x of and").split()


def corpus(eng, n, lo=10, hi=500, seed=0):
    """n texts whose token counts (prompt included) are log-uniform in [lo, hi]."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        words = [rng.choice(WORDS) for _ in range(target)]
        ids = eng.tokenize(" ".join(words))
        while len(ids) > target and len(words) > 1:  # trim to about the target length
            words = words[: max(1, int(len(words) * target / len(ids)))]
            ids = eng.tokenize(" ".join(words))
        texts.append(" ".join(words))
    return texts


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_family(family, n_texts, tmp, ref_batches=(32,)):
    path = write_checkpoint(os.path.join(tmp, family), family, "full", seed=0, tasks=("retrieval",))
    eng = jv5fast.Engine(path, device="cpu", dtype="float32")
    texts = corpus(eng, n_texts)
    ids = eng.tokenize(texts)
    n_tok = sum(map(len, ids))
    eng.embed(texts[:2])  # warm-up
    t0 = time.perf_counter()
    ours = eng.embed(texts)
    t_ours = time.perf_counter() - t0
    del eng
    model = reference_model(path, "retrieval")
    reference_embed(model, ids[:2])
    rows = []
    for bs in ref_batches:
        t0 = time.perf_counter()
        ref = reference_embed(model, ids, batch_size=bs).numpy()
        t_ref = time.perf_counter() - t0
        cos = float((ours * ref).sum(1).min())
        rows.append(dict(family=family, texts=n_texts, tokens=n_tok, ours=n_tok / t_ours, ref=n_tok / t_ref,
                         ref_batch=bs, ratio=t_ref / t_ours, cos=cos))
    return rows


def table(rows):
    head = ("| model | texts | tokens | jv5fast tok/s | reference batch | reference tok/s | ratio | min cosine |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['family']} | {r['texts']} | {r['tokens']} | {r['ours']:.0f} | {r['ref_batch']} | "
                          f"{r['ref']:.0f} | **{r['ratio']:.2f}×** | {r['cos']:.6f} |\n" for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="nano,small")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--ref-batch", default="32,4", help="reference batch sizes (32 = sentence-transformers' default)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in a.families.split(","):
            for r in run_family(fam, a.texts, tmp, [int(b) for b in a.ref_batch.split(",")]):
                print(f"{fam}: jv5fast {r['ours']:.0f} tok/s, reference (batch {r['ref_batch']}) {r['ref']:.0f} "
                      f"tok/s, ratio {r['ratio']:.2f}x, min cosine {r['cos']:.6f}", flush=True)
                rows.append(r)
    text = (f"# Engine throughput, CPU fp32\n\n{datetime.date.today()} · {machine()}\n\n"
            f"Command: `python bench/bench_engine.py --families {a.families} --texts {a.texts} "
            f"--ref-batch {a.ref_batch}`\n\n{table(rows)}")
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def throughput_case(checkpoint):
    """The session's full-size nano checkpoint (bench/conftest.py), its engine, 24 corpus texts, their token
    ids and jv5fast's vectors for them (that first embed is also the engine's warm-up)."""
    path = checkpoint("nano")
    eng = jv5fast.Engine(path, device="cpu")
    texts = corpus(eng, 24)
    return path, eng, texts, eng.tokenize(texts), eng.embed(texts)


def _report(benchmark, groups, name, ids):
    tokens = sum(map(len, ids))
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.median,
                                slower_than_jv5fast_x=groups.record(benchmark, name))


def test_jv5fast(benchmark, groups, throughput_case):
    """pytest-benchmark entry: jv5fast's embed on the 24 texts."""
    _, eng, texts, ids, _ = throughput_case
    benchmark.group = "throughput nano cpu"
    benchmark.pedantic(eng.embed, args=(texts,), rounds=2, iterations=1)
    _report(benchmark, groups, "jv5fast", ids)


def test_reference(benchmark, groups, throughput_case):
    """pytest-benchmark entry: transformers' own model on the same token ids, batches of 32; same vectors."""
    path, _, _, ids, ours = throughput_case
    model = reference_model(path)  # a merged checkpoint: no adapter to merge
    reference_embed(model, ids[:2])  # warm-up
    benchmark.group = "throughput nano cpu"
    ref = benchmark.pedantic(reference_embed, args=(model, ids), rounds=2, iterations=1)
    assert (ours * ref.numpy()).sum(1).min() >= 0.99999
    _report(benchmark, groups, "transformers reference", ids)


if __name__ == "__main__":
    sys.exit(main())
