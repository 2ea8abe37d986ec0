"""CUDA-graph path of the engine (jv5fast/graphs.py), checked on CPU.

Without a GPU nothing can be captured, so the runner is built with ``emulate=True``: the bucketing,
padding into static buffers, the first-replay check, invalidation and the fallback are the real code;
only ``torch.cuda.graph`` is replaced by re-running the eager forward on the static buffers. The
embeddings must equal the plain engine's for both families, every batch shape and every task.
"""
import random
import warnings

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast.graphs import CudaGraphRunner, bucket, pad_layout, token_buckets


def test_bucket_invariants():
    steps = token_buckets(2048)
    assert steps == [64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048] and token_buckets(100) == [64]
    rng = random.Random(0)
    for _ in range(2000):
        B = rng.randint(1, 300)
        T = B + rng.randint(0, 3000)
        key = bucket(T, B, 2048, 256)
        b_min = 1 << B.bit_length()                       # next power of two > B
        if key is None:
            assert T + b_min - B > 2048 or b_min > 256
            continue
        t_b, b_b = key
        assert b_b == b_min and t_b in steps and t_b >= T + (b_b - B)
        assert t_b == min(t for t in steps if t >= T + b_b - B)   # the smallest bucket that fits
        lens = [1] * (B - 1) + [T - B + 1]
        layout = pad_layout(lens, t_b, b_b)
        assert len(layout) == b_b and sum(layout) == t_b and min(layout) >= 1 and layout[:B] == lens
        assert max(layout[B:]) - min(layout[B:]) <= 1     # padding spread evenly over the dummies
    assert bucket(1, 1) == (64, 2) and bucket(63, 1) == (64, 2) and bucket(64, 1) == (128, 2)
    assert bucket(600, 3) == (768, 4) and bucket(2048, 1) is None and bucket(2000, 300) is None
    with pytest.raises(ValueError, match="sequence"):
        bucket(3, 5)
    with pytest.raises(ValueError, match="cannot hold"):
        pad_layout([60, 3], 64, 4)          # 1 token left for 2 dummies
    with pytest.raises(ValueError, match="cannot hold"):
        pad_layout([1, 1], 64, 2)           # no room for a dummy sequence


def _texts(n, seed):
    rng = random.Random(seed)
    words = "alpha beta gamma delta retrieval vector engine token Zürich 東京 naïve long short".split()
    return ["".join(rng.choice(words) + " " for _ in range(rng.randint(0, 40))) + str(i) for i in range(n)]


def _graph_engine(path, **kw):
    eng = jv5fast.Engine(path, device="cpu", **kw)
    eng._graphs = CudaGraphRunner(eng.model, 512, max_seqs=64, emulate=True)
    return eng


@pytest.mark.parametrize("family", ["small", "nano"])
def test_graph_path_equals_eager(family, small_ckpt, nano_ckpt):
    path = small_ckpt if family == "small" else nano_ckpt
    eager = jv5fast.Engine(path, device="cpu", max_batch_tokens=300)
    eng = _graph_engine(path, max_batch_tokens=300)
    texts = _texts(57, seed=1) + ["x", ""]
    for prompt_name in ("query", "document"):
        want = eager.embed(texts, prompt_name=prompt_name, truncate_dim=32)
        got = eng.embed(texts, prompt_name=prompt_name, truncate_dim=32)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    one = eng.embed("a single query", prompt_name="query")
    np.testing.assert_allclose(one, eager.embed("a single query", prompt_name="query"), atol=2e-6, rtol=1e-5)
    r = eng._graphs
    assert r.disabled is None and eng.cuda_graphs and r.replays >= 5 and len(r.graphs) >= 3
    # A batch over the runner's token limit runs eagerly, and still agrees.
    long = ["token " * 700, "engine " * 300]
    r.max_tokens, before = 128, r.replays
    held = {key: g.keep[0] for key, g in r.graphs.items()}
    assert all(t is eng.model._rope[0] for t in held.values())
    np.testing.assert_allclose(eng.embed(long), eager.embed(long), atol=2e-6, rtol=1e-5)
    assert r.replays == before
    # The long text grew (replaced) the RoPE tables; each graph still holds the ones it read at capture.
    assert eng.model._rope[0].shape[0] > 512 and all(t is not eng.model._rope[0] for t in held.values())
    assert all(g.keep[0] is held[key] for key, g in r.graphs.items())


def test_task_switch_keeps_addresses_and_base(small_ckpt):
    eng = _graph_engine(small_ckpt)
    eager = jv5fast.Engine(small_ckpt, device="cpu")
    texts = _texts(9, seed=2)
    ptrs = {(i, n): w.data_ptr() for i, layer in enumerate(eng.model.layers) for n, w in layer.items()}
    base = {k: v.clone() for k, v in eng._base.items()}
    version = eng.model.version
    first = eng.embed(texts, task="retrieval")
    for task in eng.tasks:
        np.testing.assert_allclose(eng.embed(texts, task=task), eager.embed(texts, task=task), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(eng.embed(texts, task="retrieval"), first, atol=0, rtol=0)
    assert ptrs == {(i, n): w.data_ptr() for i, layer in enumerate(eng.model.layers) for n, w in layer.items()}
    assert eng.model.version == version and eng._graphs.disabled is None
    for k, v in base.items():
        assert torch.equal(eng._base[k], v), k


def test_replaced_weight_drops_graphs(nano_ckpt):
    eng = _graph_engine(nano_ckpt)
    texts = _texts(3, seed=3)
    want = eng.embed(texts)
    assert len(eng._graphs.graphs) == 1
    eng._graphs.pool = "pool of the graphs about to be dropped"
    w, version = eng.model.layers[0]["w2"], eng.model.version
    eng.model.set_linear(0, "w2", torch.zeros(w.shape[0], w.shape[1] + 1))   # new shape: a new tensor
    assert eng.model.version == version + 1
    eng.model.set_linear(0, "w2", w.clone())
    eng.embed(texts[:1] + ["different " * 30])  # another bucket: only it is captured anew
    assert len(eng._graphs.graphs) == 1 and eng._graphs.version == version + 2 and eng._graphs.pool is None
    np.testing.assert_allclose(eng.embed(texts), want, atol=2e-6, rtol=1e-5)


def test_failed_check_or_capture_falls_back_to_eager(nano_ckpt, monkeypatch):
    eager = jv5fast.Engine(nano_ckpt, device="cpu")
    texts = _texts(5, seed=4)
    want = eager.embed(texts)

    eng = _graph_engine(nano_ckpt)
    monkeypatch.setattr(CudaGraphRunner, "check", staticmethod(lambda out, ref: "forced mismatch"))
    with pytest.warns(RuntimeWarning, match="switched off.*forced mismatch"):
        got = eng.embed(texts)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    assert not eng.cuda_graphs and eng._graphs.graphs == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(eng.embed(texts), want, atol=2e-6, rtol=1e-5)  # no second warning
    monkeypatch.undo()

    eng = _graph_engine(nano_ckpt)
    eng._graphs.emulate = False   # the real capture path: on a CPU-only torch it raises
    with pytest.warns(RuntimeWarning, match="capturing a .* graph failed"):
        got = eng.embed(texts)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    assert not eng.cuda_graphs


def test_out_of_memory_while_capturing_is_transient(nano_ckpt, monkeypatch):
    eng = _graph_engine(nano_ckpt)
    texts = _texts(4, seed=6)
    want = jv5fast.Engine(nano_ckpt, device="cpu").embed(texts)
    forward, calls = eng.model.forward, []

    def flaky(batch, last_only=False):
        calls.append(batch.num_tokens)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(batch, last_only)
    monkeypatch.setattr(eng.model, "forward", flaky)
    np.testing.assert_allclose(eng.embed(texts), want, atol=2e-6, rtol=1e-5)   # eager this time
    assert eng.cuda_graphs and eng._graphs.graphs == {} and eng._graphs.replays == 0
    np.testing.assert_allclose(eng.embed(texts), want, atol=2e-6, rtol=1e-5)   # captured now
    assert len(eng._graphs.graphs) == 1 and eng._graphs.replays == 1


def test_check_detects_wrong_rows():
    e = torch.randn(6, 32)
    assert CudaGraphRunner.check(e.clone(), e) == ""
    bad = e.clone()
    bad[3] = torch.randn(32)
    assert "row 3" in CudaGraphRunner.check(bad, e)
    bad = e.clone()
    bad[2, 5] = float("nan")
    assert "non-finite rows [2]" in CudaGraphRunner.check(bad, e)


def test_warmup_captures_buckets(nano_ckpt):
    eng = _graph_engine(nano_ckpt)
    n = eng.warmup(max_tokens=128)
    # 64 tokens: 2..64 sequences (6 buckets), 128 tokens: 2..64 (max_seqs 64: 6 buckets)
    assert n == 12 and set(eng._graphs.graphs) == {(t, b) for t in (64, 128) for b in (2, 4, 8, 16, 32, 64)}
    before = eng._graphs.replays
    eng.embed(["a b", "c", "a query about engines", "x y z"])
    assert len(eng._graphs.graphs) == 12 and eng._graphs.replays == before + 1    # served by a warmed bucket
    plain = jv5fast.Engine(nano_ckpt, device="cpu")
    assert plain.warmup() == 0 and not plain.cuda_graphs


def test_bad_cuda_graphs_arguments(nano_ckpt):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; this engine is on cpu"):
        jv5fast.Engine(nano_ckpt, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs backend='torch' on a CUDA device"):
        jv5fast.Engine(nano_ckpt, device="cpu", cuda_graphs=True, backend="onnx")
    with pytest.raises(ValueError, match="cuda_graphs must be None"):
        jv5fast.Engine(nano_ckpt, device="cpu", cuda_graphs="yes")
    eng = jv5fast.Engine(nano_ckpt, device="cpu", cuda_graphs=False)
    with pytest.raises(ValueError, match="need a CUDA device"):
        CudaGraphRunner(eng.model)
