"""Triton RMSNorm (+ fused residual) vs rms_norm_ref under the interpreter: forward and gradients."""
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels.rmsnorm import rms_norm, rms_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from jv5fast.testing import TOL_FLOOR as FLOOR, assert_close_dtype  # noqa: E402,F401




@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (65, 3, 40), (130, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape, dtype, with_residual):
    torch.manual_seed(shape[0] + shape[-1])
    N = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(N, device=DEVICE)).to(dtype).requires_grad_()
    r = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_() if with_residual else None
    leaves = [t for t in (x, w, r) if t is not None]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    r32 = leaves32[2] if with_residual else None

    out = rms_norm(x, w, 1e-6, residual=r)
    ref32 = rms_norm_ref(leaves32[0], leaves32[1], 1e-6, residual=r32)
    ref_lp = rms_norm_ref(x, w, 1e-6, residual=r)
    if not with_residual:
        out, ref32, ref_lp = (out,), (ref32,), (ref_lp,)
    for name, a, b, c in zip(("y", "h"), out, ref32, ref_lp):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert_close_dtype(a, b, c, dtype, 2, name)

    grads_out = [torch.randn(shape, device=DEVICE) for _ in out]
    g = torch.autograd.grad(out, leaves, [t.to(dtype) for t in grads_out])
    g32 = torch.autograd.grad(ref32, leaves32, grads_out)
    g_lp = torch.autograd.grad(ref_lp, leaves, [t.to(dtype) for t in grads_out])
    for name, a, b, c in zip(("dx", "dw", "dres"), g, g32, g_lp):
        assert_close_dtype(a, b, c, dtype, 3, name)
