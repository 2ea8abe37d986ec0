"""Triton SwiGLU vs swiglu_ref under the interpreter: forward and gradients."""
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels import swiglu as mod  # noqa: E402
from jv5fast.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


def assert_close_dtype(out, ref32, ref_lowp, dtype, mult, name=""):
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out.float() - ref32).abs().max().item()
    torch_err = (ref_lowp.float() - ref32).abs().max().item()
    bound = mult * torch_err + FLOOR[dtype]
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own {torch_err:.3g})"


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
