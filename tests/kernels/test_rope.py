"""Triton RoPE (+ fused per-head RMSNorm) vs rope_ref under the interpreter: forward and gradients."""
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels.rope import rope, rope_ref, rope_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from jv5fast.testing import TOL_FLOOR as FLOOR, assert_close_dtype  # noqa: E402,F401




def _positions(lens):
    return torch.cat([torch.arange(n) for n in lens]).to(DEVICE)


@pytest.mark.parametrize("lens,H,D", [([1], 2, 64), ([7, 33, 1], 3, 40), ([65, 130, 3], 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope(lens, H, D, dtype, with_norm):
    torch.manual_seed(sum(lens) + D)
    T = sum(lens)
    cos, sin = rope_tables(1e6, D, max(lens) + 5, device=DEVICE)
    pos = _positions(lens)
    x = torch.randn(T, H, D, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_() if with_norm else None
    leaves = [t for t in (x, w) if t is not None]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    w32 = leaves32[1] if with_norm else None

    out = rope(x, cos, sin, pos, norm_weight=w, eps=1e-6)
    ref32 = rope_ref(leaves32[0], cos, sin, pos, norm_weight=w32, eps=1e-6)
    ref_lp = rope_ref(x, cos, sin, pos, norm_weight=w, eps=1e-6)
    assert out.dtype == ref_lp.dtype and out.shape == ref_lp.shape
    assert_close_dtype(out, ref32, ref_lp, dtype, 2, "y")

    dy = torch.randn(T, H, D, device=DEVICE)
    g = torch.autograd.grad(out, leaves, dy.to(dtype))
    g32 = torch.autograd.grad(ref32, leaves32, dy)
    g_lp = torch.autograd.grad(ref_lp, leaves, dy.to(dtype))
    for name, a, b, c in zip(("dx", "dw"), g, g32, g_lp):
        assert_close_dtype(a, b, c, dtype, 3, name)


def test_rope_strided_view():
    """q as a view of a fused (T, H + 2 Hkv, D) projection."""
    torch.manual_seed(0)
    lens, D = [5, 20], 64
    qkv = torch.randn(sum(lens), 6, D, device=DEVICE)
    q = qkv[:, :4]
    cos, sin = rope_tables(1e4, D, 32, device=DEVICE)
    w = torch.rand(D, device=DEVICE) + 0.5
    pos = _positions(lens)
    torch.testing.assert_close(rope(q, cos, sin, pos, w), rope_ref(q, cos, sin, pos, w), atol=1e-4, rtol=1e-4)
