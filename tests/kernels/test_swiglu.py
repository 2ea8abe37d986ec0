"""Triton SwiGLU vs swiglu_ref under the interpreter: forward and gradients."""
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from jv5fast.testing import TOL_FLOOR as FLOOR, assert_close_dtype  # noqa: E402,F401




@pytest.mark.parametrize("shape", [(1, 2 * 64), (7, 2 * 300), (130, 2 * 96), (3, 5, 2 * 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu(shape, dtype):
    torch.manual_seed(shape[0] + shape[-1])
    x = (2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    out, ref32, ref_lp = swiglu(x), swiglu_ref(x32), swiglu_ref(x)
    assert out.shape == ref_lp.shape and out.dtype == dtype
    assert_close_dtype(out, ref32, ref_lp, dtype, 2, "out")
    do = torch.randn(ref32.shape, device=DEVICE)
    (g,) = torch.autograd.grad(out, x, do.to(dtype))
    (g32,) = torch.autograd.grad(ref32, x32, do)
    (g_lp,) = torch.autograd.grad(ref_lp, x, do.to(dtype))
    assert_close_dtype(g, g32, g_lp, dtype, 3, "d_gate_up")


def test_swiglu_strided_rows():
    x = torch.randn(9, 2 * 48, device=DEVICE)[::2]
    torch.testing.assert_close(swiglu(x), swiglu_ref(x), atol=1e-5, rtol=1e-5)
