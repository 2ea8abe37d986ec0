"""The fused CPU RMSNorm and RoPE (csrc/cpu_ops.cpp, reached through jv5fast.ops on fp32 CPU tensors outside
autograd) against the plain-PyTorch references they replace, on ragged shapes and strided inputs."""
import numpy as np
import pytest
import torch

from jv5fast import ops
from jv5fast.kernels.rmsnorm import rms_norm_ref
from jv5fast.kernels.rope import rope_ref, rope_tables

pytestmark = pytest.mark.skipif(ops._cpu_ext() is None, reason="jv5fast._C's CPU ops do not run here (extension "
                                "not built, or no AVX2/FMA)")


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def _calls(monkeypatch, name):
    """Count calls into the C++ op, so a test knows the fused path (not the reference) ran."""
    calls = []
    real = getattr(ops._cpu_ext(), name)
    monkeypatch.setattr(ops, "_cpu_ext", lambda: type("C", (), {name: staticmethod(
        lambda *a: calls.append(1) or real(*a))})())
    return calls


@pytest.mark.parametrize("T, N", [(1, 768), (3, 5), (17, 1024), (9, 13), (700, 768)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(T, N, with_residual, monkeypatch):
    g = torch.Generator().manual_seed(T * 31 + N)
    x, r, w = (torch.randn(T, N, generator=g) * 3, torch.randn(T, N, generator=g), torch.randn(N, generator=g))
    calls = _calls(monkeypatch, "rms_norm")
    if with_residual:
        y, h = ops.rms_norm(x, w, 1e-6, r)
        yr, hr = rms_norm_ref(x, w, 1e-6, r)
        torch.testing.assert_close(h, hr, atol=0, rtol=0)  # one fp32 add, same as torch
    else:
        y, yr = ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    torch.testing.assert_close(y, yr, atol=2e-6, rtol=2e-6)
    assert calls == [1]


@pytest.mark.parametrize("H, D", [(12, 64), (16, 128), (3, 10), (2, 2)])
@pytest.mark.parametrize("norm", [False, True])
def test_rope_matches_reference_on_strided_views(H, D, norm, monkeypatch):
    g = torch.Generator().manual_seed(H * 7 + D)
    T = 23
    qkv = torch.randn(T, 3 * H * D + 5, generator=g)         # q as a view with row stride 3HD+5
    q = qkv[:, 5:5 + H * D].view(T, H, D)
    cos, sin = rope_tables(1e6, D, 64)
    pos = torch.randint(0, 64, (T,), generator=g)
    w = torch.randn(D, generator=g) if norm else None
    calls = _calls(monkeypatch, "rope")
    got = ops.rope(q, cos, sin, pos, w, 1e-6)
    torch.testing.assert_close(got, rope_ref(q, cos, sin, pos, w, 1e-6), atol=3e-6, rtol=3e-6)
    assert calls == [1] and got.is_contiguous()


def test_out_of_range_position_is_an_error_not_a_read():
    cos, sin = rope_tables(1e4, 8, 16)
    x = torch.randn(3, 2, 8)
    for bad in (16, -1):
        with pytest.raises(IndexError, match=f"position {bad} at row 1 is outside the tables' 16 rows"):
            ops.rope(x, cos, sin, torch.tensor([0, bad, 2]), None, 1e-6)


def test_bad_shapes_are_refused():
    C = ops._cpu_ext()
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="shapes of x, w and y differ"):
        C.rms_norm(x, None, np.zeros(7, np.float32), 1e-6, np.zeros((4, 8), np.float32), None, 1)
    with pytest.raises(ValueError, match="residual and h go together"):
        C.rms_norm(x, x, np.zeros(8, np.float32), 1e-6, np.zeros((4, 8), np.float32), None, 1)
    with pytest.raises(TypeError):  # an output is never silently a temporary copy
        C.rms_norm(x, None, np.zeros(8, np.float32), 1e-6, np.zeros((8, 4), np.float32).T, None, 1)
    with pytest.raises(ValueError, match="h must be a C-contiguous float32 array"):
        C.rms_norm(x, x, np.zeros(8, np.float32), 1e-6, np.zeros((4, 8), np.float32),
                   np.zeros((8, 4), np.float32).T, 1)
    cos = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match="shapes of x, cos, sin, pos and y differ"):
        C.rope(np.zeros((3, 2, 8), np.float32), cos, cos, np.zeros(3, np.int64), None, 1e-6,
               np.zeros((3, 2, 6), np.float32), 1)
    with pytest.raises(ValueError, match="must be even and contiguous"):
        C.rope(np.zeros((3, 2, 16), np.float32)[:, :, ::2], cos, cos, np.zeros(3, np.int64), None, 1e-6,
               np.zeros((3, 2, 8), np.float32), 1)


def test_head_dim_above_the_buffer_takes_the_reference(monkeypatch):
    cos, sin = rope_tables(1e4, 1040, 8)
    x, pos, w = torch.randn(3, 2, 1040), torch.tensor([0, 5, 7]), torch.randn(1040)
    with pytest.raises(ValueError, match="head dim 1040 is above 1024"):
        ops._cpu_ext().rope(x.numpy(), cos.numpy(), sin.numpy(), pos.numpy(), w.numpy(), 1e-6,
                            np.zeros((3, 2, 1040), np.float32), 1)
    calls = _calls(monkeypatch, "rope")
    torch.testing.assert_close(ops.rope(x, cos, sin, pos, w, 1e-6), rope_ref(x, cos, sin, pos, w, 1e-6))
    assert calls == []


def test_references_where_the_fused_path_does_not_apply(monkeypatch):
    """Autograd, another dtype, or JV5FAST_BACKEND=torch run the references."""
    calls = _calls(monkeypatch, "rms_norm")
    with torch.inference_mode(False):
        w, x = torch.randn(8), torch.randn(4, 8, requires_grad=True)
        ops.rms_norm(x, w, 1e-6).sum().backward()
        assert x.grad is not None
    w = torch.randn(8)
    ops.rms_norm(torch.randn(4, 8, dtype=torch.float64), w.double(), 1e-6)
    with torch.inference_mode(False), torch.no_grad():  # a parameter outside autograd never reaches .numpy()
        ops.rms_norm(torch.randn(4, 8), torch.nn.Parameter(torch.randn(8)), 1e-6)
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    ops.rms_norm(torch.randn(4, 8), w, 1e-6)
    assert calls == []
