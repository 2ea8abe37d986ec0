"""onnxruntime (fp32 and dynamic int8) vs the torch engine on CPU, full-size nano, same run.

Same checkpoint (random weights, real tokenizer, retrieval adapter merged), same texts, same packed
token-budget scheduling in front of each backend (the engine's), so the ratio is backend against
backend. Reports tokens/s, the ratio to torch fp32, and int8's quality against fp32: cosine per
vector and top-10 retrieval overlap on the benchmark corpus (plus the fixed corpus the exporter uses).

    python bench/bench_onnx.py [--texts 48] [--out bench/results/onnx_cpu.md]
    pytest bench/bench_onnx.py              # pytest-benchmark: torch engine, onnxruntime fp32, int8
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jv5fast  # noqa: E402
from bench_engine import corpus, machine  # noqa: E402
from jv5fast.onnx_export import top10_overlap  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402


def timed(eng, texts):
    eng.embed(texts[:4])
    t0 = time.perf_counter()
    out = eng.embed(texts)
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ck = write_checkpoint(os.path.join(tmp, "nano"), "nano", "full", seed=0, tasks=("retrieval",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = jv5fast.export_onnx(ck, os.path.join(tmp, "onnx"), quantize="int8")
        torch_eng = jv5fast.Engine(ck, device="cpu")
        texts = corpus(torch_eng, a.texts)
        n_tok = sum(map(len, torch_eng.tokenize(texts)))
        ref, t_ref = timed(torch_eng, texts)
        rows = [("torch engine fp32", t_ref, 1.0, "")]
        for name, q in (("onnxruntime fp32", None), ("onnxruntime int8 (dynamic)", "int8")):
            eng = jv5fast.Engine.from_onnx(os.path.join(tmp, "onnx"), quantize=q)
            out, t = timed(eng, texts)
            cos = (out * ref).sum(1)
            rows.append((name, t, (cos.min(), cos.mean()), top10_overlap(ref, out)))
    lines = [f"# ONNX backend, CPU\n\n{datetime.date.today()} · {machine()}\n",
             f"Command: `python bench/bench_onnx.py --texts {a.texts}`; full-size nano (random weights, real "
             f"tokenizer), {a.texts} texts, {n_tok} tokens (10–500 tokens each).\n",
             "| backend | tok/s | vs torch | cosine to torch fp32 (min / mean) | top-10 overlap |",
             "|---|---|---|---|---|"]
    for name, t, cos, ov in rows:
        c = "1 / 1" if cos == 1.0 else f"{cos[0]:.6f} / {cos[1]:.6f}"
        lines.append(f"| {name} | {n_tok / t:.0f} | {t_ref / t:.2f}× | {c} | {ov if ov == '' else f'{ov:.3f}'} |")
    q = meta["int8"]
    lines.append(f"\nint8 quality on the exporter's fixed 32-text multilingual corpus: mean cosine "
                 f"{q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}, top-10 overlap {q['top10_overlap']:.3f}. "
                 f"Random weights: quality on the released weights must be measured again (a third party saw "
                 f"nano's int8 fall to cosine 0.445 out of domain; conventions.md §7).")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())


@pytest.fixture(scope="module")
def onnx_case(checkpoint, onnx_export_for):
    """The torch engine on the session's full-size nano checkpoint, its ONNX export (bench/conftest.py), 16
    corpus texts, their token count and the torch engine's vectors for them."""
    torch_eng = jv5fast.Engine(checkpoint("nano"), device="cpu")
    texts = corpus(torch_eng, 16)
    n_tok = sum(map(len, torch_eng.tokenize(texts)))
    return torch_eng, onnx_export_for("nano"), texts, n_tok, torch_eng.embed(texts)


def _embed(benchmark, groups, name, eng, case):
    """Time ``eng.embed`` on the texts; returns its vectors' cosines to the torch engine's."""
    _, _, texts, n_tok, ref = case
    benchmark.group = "onnx vs torch nano cpu"
    out = benchmark.pedantic(eng.embed, args=(texts,), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(tokens=n_tok, tokens_per_s=n_tok / benchmark.stats.stats.median,
                                slower_than_jv5fast_x=groups.record(benchmark, name))
    return (out * ref).sum(1)


def test_torch_engine(benchmark, groups, onnx_case):
    """pytest-benchmark entry: the torch engine (jv5fast's default backend)."""
    _embed(benchmark, groups, "jv5fast", onnx_case[0], onnx_case)


def test_onnxruntime_fp32(benchmark, groups, onnx_case):
    """pytest-benchmark entry: onnxruntime fp32 behind the same engine; same vectors."""
    cos = _embed(benchmark, groups, "onnxruntime fp32", jv5fast.Engine.from_onnx(onnx_case[1]), onnx_case)
    assert cos.min() >= 0.99999


def test_onnxruntime_int8(benchmark, groups, onnx_case):
    """pytest-benchmark entry: onnxruntime dynamic int8; its cosine to fp32 is recorded, not asserted."""
    eng = jv5fast.Engine.from_onnx(onnx_case[1], quantize="int8")
    cos = _embed(benchmark, groups, "onnxruntime int8", eng, onnx_case)
    benchmark.extra_info.update(min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
