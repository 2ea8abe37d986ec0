"""CPU smoke test of bench/gpu_check.py: it imports, and its FLOP counting / tolerance / table helpers work."""
import importlib.util
import math
import os

import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_and_tflops():
    gc = _load()
    f = gc.attention_flops([512] * 64, 16, 128, causal=False)
    assert f == 4 * 512 * 512 * 16 * 128 * 64
    assert gc.attention_flops([512] * 64, 16, 128, causal=True) == f / 2
    assert gc.attention_flops([100], 1, 64, False, "fwd_bwd") == 3.5 * gc.attention_flops([100], 1, 64, False)
    assert math.isclose(gc.tflops(2e12, 1000.0), 2.0)
    assert math.isnan(gc.tflops(1.0, 0.0))
    for S in gc.ATTN_SEQLENS:
        B, S2 = gc.batch_for(S)
        assert S2 == S and B * S == gc.TOTAL_TOKENS


def test_compare_and_bound():
    gc = _load()
    ref32 = torch.randn(100)
    lowp = ref32.half().float()
    ok, err, bound = gc.compare(ref32.half(), ref32, lowp, torch.float16, 2)
    assert ok and err <= bound
    ok, _, _ = gc.compare(ref32 + 1.0, ref32, lowp, torch.float16, 2)
    assert not ok
    ok, _, _ = gc.compare(torch.full((100,), float("nan")), ref32, lowp, torch.float16, 2)
    assert not ok
    assert gc.error_bound(0.0, torch.float32, 3) == 1e-4


def test_table_and_report(tmp_path):
    gc = _load()
    t = gc.markdown_table(["a", "b"], [(1.23456, "x"), (float("nan"), None), (123456.0,)])
    lines = t.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| a") and set(lines[1]) <= {"|", "-"}
    assert "1.23" in t and "nan" in t and "n/a" in t
    rep = gc.Report()
    rep.add("correctness", "x", "PASS", "err 1e-3")
    out = rep.render("CPU test")
    assert "CPU test" in out and "| correctness" in out
    assert len(gc.mixed_lengths(50)) == 50 and all(8 <= n <= 2048 for n in gc.mixed_lengths(50))
    assert len(gc.random_text(17, seed=1).split()) == 17


def test_main_without_cuda(tmp_path, monkeypatch):
    gc = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["gpu_check.py", str(tmp_path / "t.md")]) == 1


def _on_cpu_interpreter(monkeypatch):
    """gpu_check on CPU tensors with its Triton kernels under the interpreter (skipped where a GPU runs the
    real thing)."""
    import pytest
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered by the real run on GPU")
    gc = _load()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    return gc


def test_correctness_sections_on_cpu(monkeypatch):
    """The correctness code paths, shrunk, on CPU under the Triton interpreter (conftest sets it)."""
    gc = _on_cpu_interpreter(monkeypatch)
    monkeypatch.setattr(gc, "ATTN_CHECK_CASES", [([5, 40], 4, 2, 64, True)])
    monkeypatch.setattr(gc, "SMALL_LENS", [3, 30])
    monkeypatch.setattr(gc, "POOL_LENS", [1, 9])
    rep = gc.Report()
    gc.check_attention(rep, torch.float16)
    gc.check_small_kernels(rep, torch.float16)
    results = {r[1]: r[2] for r in rep.rows}
    assert len(results) == 7 and "attention_last fp16 D64 4/2" in results, rep.rows
    assert all(v == "PASS" for v in results.values()), rep.rows


def test_latency_section_on_cpu(monkeypatch):
    """The latency section end to end on tiny checkpoints on CPU (no graphs there: it must say so)."""
    gc = _load()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    monkeypatch.setattr(gc, "LATENCY_BATCHES", (1, 3))
    monkeypatch.setattr(gc, "_wall_ms", lambda fn, iters=20: (fn(), 1.0)[1])
    batches = gc.query_batches((1, 3))
    assert [len(v) for v in batches.values()] == [1, 3]
    assert all(4 <= len(t.split()) <= 24 for v in batches.values() for t in v)
    rep = gc.Report()
    monkeypatch.setattr(gc, "query_batches", lambda: batches)
    gc.bench_latency(rep, size="tiny")
    rows = {r[1]: (r[2], r[3]) for r in rep.rows}
    assert not any(v[0] == "ERROR" for v in rows.values()), rep.rows
    assert sorted(k.split(" (")[0] for k in rows) == sorted(
        [f"{f} warmup" for f in ("small", "nano")] + [f"{f} {n} queries" for f in ("small", "nano") for n in (1, 3)])
    assert all("graphs on: False" in v[1] and "cosine graphs vs eager min 1" in v[1]
               for k, v in rows.items() if "queries" in k), rep.rows


def test_hamming_large_k_section_on_cpu(monkeypatch):
    """The large-k Hamming rows, shrunk, on CPU tensors (Triton under the interpreter)."""
    gc = _on_cpu_interpreter(monkeypatch)
    monkeypatch.setattr(gc, "HAMMING_LARGE_K", dict(n=1500, q=3, nbytes=12, ks=(1025, 1400, 2000)))
    import jv5fast.kernels.hamming as hk
    monkeypatch.setattr(hk, "MAX_K", 4)  # the Triton row at a size the interpreter manages
    monkeypatch.setattr(gc, "_wall_ms", lambda fn, iters=20: (fn(), 1.0)[1])
    rep = gc.Report()
    gc.check_hamming_large_k(rep)
    rows = {r[1]: (r[2], r[3]) for r in rep.rows}
    assert [v[0] for k, v in rows.items() if k.startswith("hamming_topk")] == ["PASS"] * 3, rep.rows
    assert any("chunked/Triton" in v[1] for v in rows.values()), rep.rows


def test_server_section_on_cpu(monkeypatch):
    """The serving section end to end on a tiny checkpoint on CPU: a real `jv5fast serve`, the bench's load
    generator, and the offline comparison; every row measured, none an error."""
    gc = _load()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    rep = gc.Report()
    gc.bench_server(rep, size="tiny", clients=4, requests=4)
    rows = {r[1]: (r[2], r[3]) for r in rep.rows}
    assert not any(v[0] in ("ERROR", "skipped") for v in rows.values()), rep.rows
    assert sorted(rows) == ["nano 1-text requests, 4 clients", "nano ready", "nano saturating load, 4 clients x 16 texts"]
    assert "target p50 <= 5 ms" in rows["nano 1-text requests, 4 clients"][1]


def test_profile_section_on_cpu(monkeypatch, tmp_path):
    """The short-batch profile (issue 14) on a tiny nano on CPU: every stage timed, the weight bandwidth
    derived from the real weight bytes, host ops listed, a Chrome trace kept on request."""
    gc = _load()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    monkeypatch.setenv("JV5FAST_PROFILE_DIR", str(tmp_path))
    rep = gc.Report()
    gc.profile_short_batch(rep, size="tiny", n=3, iters=2, top=3, families=("nano",))
    rows = {r[1]: (r[2], r[3]) for r in rep.rows}
    assert not any(v[0] == "ERROR" for v in rows.values()), rep.rows
    embed = next(v for k, v in rows.items() if k.endswith(" embed"))
    assert embed[0].endswith(" ms") and all(s in embed[1] for s in ("tokenize", "forward", "read-back", "rest"))
    assert sum(1 for k in rows if " host " in k) == 3
    assert os.path.exists(tmp_path / "nano_3q.json")
    import jv5fast
    from jv5fast.testing import write_checkpoint
    eng = jv5fast.Engine(write_checkpoint(str(tmp_path / "ck"), "nano", "tiny", seed=0), device="cpu")
    a = eng.model.args
    per_layer = (a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim
                 * a.hidden_size + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size)
    assert gc.weight_bytes(eng) >= 4 * (a.num_layers * per_layer + a.hidden_size)


def test_ncu_section_without_ncu(monkeypatch):
    gc = _load()
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    rep = gc.Report()
    gc.ncu_attention(rep)
    assert rep.rows and rep.rows[0][2] == "n/a" and "not installed" in rep.rows[0][3]


def test_train_section_on_cpu(monkeypatch):
    """The training-throughput row on a tiny nano on CPU: both sides measured, loss curves agree."""
    import pytest
    pytest.importorskip("peft")
    gc = _load()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    rep = gc.Report()
    gc.bench_train(rep, size="tiny", steps=3, batch_size=4, n_examples=16, tol=1e-5)
    rows = {r[1]: (r[2], r[3]) for r in rep.rows}
    assert rows["nano loss curves, 3 steps"][0] == "PASS", rep.rows
    assert rows["nano retrieval step, 4 pairs"][0].endswith("tok/s") and "PEFT" in rows["nano retrieval step, 4 pairs"][1]
