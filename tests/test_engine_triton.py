"""The engine forced onto the Triton kernels (interpreter on CPU) gives the torch path's embeddings."""
import numpy as np
import pytest
import torch

import jv5fast

pytest.importorskip("triton")


@pytest.mark.parametrize("family", ["small", "nano"])
def test_triton_path_matches_torch_path(family, engines, monkeypatch):
    eng = engines[family]
    texts = ["a short one", "x", "a somewhat longer text with a few more tokens in it " * 2]
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    want = eng.embed(texts, truncate_dim=48)
    monkeypatch.setenv("JV5FAST_BACKEND", "triton")
    got = eng.embed(texts, truncate_dim=48)
    assert got.shape == want.shape
    assert (got * want).sum(1).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("family", ["small", "nano"])
def test_triton_graph_buckets_match_torch_path(family, small_ckpt, nano_ckpt, monkeypatch):
    """The padded bucket layout of the CUDA-graph path (emulated: no capture on CPU) on the Triton
    kernels — varlen attention with max_seqlen = bucket size and the last-row attention kernel."""
    from jv5fast.graphs import CudaGraphRunner
    path = small_ckpt if family == "small" else nano_ckpt
    texts = ["a short one", "x", "a somewhat longer text with a few more tokens in it " * 2, "y z"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need CUDA tensors
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    want = jv5fast.Engine(path, device=dev, cuda_graphs=False).embed(texts, prompt_name="query")
    monkeypatch.setenv("JV5FAST_BACKEND", "triton")
    eng = jv5fast.Engine(path, device=dev, cuda_graphs=False)
    eng._graphs = CudaGraphRunner(eng.model, 128, emulate=True)
    got = eng.embed(texts, prompt_name="query")
    assert eng._graphs.replays == 1 and eng.cuda_graphs
    assert (got * want).sum(1).min() >= 0.9999


def test_forced_triton_on_a_cpu_engine_without_interpreter_is_a_clear_error(nano_ckpt, monkeypatch):
    """A CUDA host has no TRITON_INTERPRET: a CPU engine forced onto Triton names the problem."""
    eng = jv5fast.Engine(nano_ckpt, device="cpu")
    monkeypatch.setenv("JV5FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors, got one on cpu"):
        eng.embed(["a text"])
