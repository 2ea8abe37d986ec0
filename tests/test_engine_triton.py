"""The engine forced onto the Triton kernels (interpreter on CPU) gives the torch path's embeddings."""
import numpy as np
import pytest

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
