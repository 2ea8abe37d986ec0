"""The fused Triton InfoNCE (jv5fast/kernels/contrastive.py) vs info_nce_ref, fp32, under TRITON_INTERPRET=1 on CPU:
loss, gradients w.r.t. q, d, hard negatives and a learnable temperature, single- and multi-tile shapes."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from jv5fast.kernels.contrastive import ContrastiveLSEFunction, info_nce, info_nce_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILES = (16, 16, 16, 16, 4)   # BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EO, warps: many tiles at small shapes


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from jv5fast.kernels import _common
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _unit(*shape):
    return F.normalize(torch.randn(*shape, device=DEVICE), dim=-1)


def _grads(loss_fn, tensors):
    loss = loss_fn()
    return loss, torch.autograd.grad(loss, tensors)


def _close(a, b, name):
    assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten output?)"
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,E,neg,blocks", [
    (1, 5, None, None),
    (3, 5, "shared", None),
    (17, 64, None, None),
    (17, 64, "per_query", None),
    (17, 40, "shared", SMALL_TILES),      # online logsumexp across 3 candidate tiles, E in 3 chunks
    (33, 24, "per_query", SMALL_TILES),   # 3 query blocks, ragged last one
])
def test_info_nce_kernel_vs_ref(B, E, neg, blocks):
    torch.manual_seed(B * 100 + E)
    q = _unit(B, E).requires_grad_()
    d = _unit(B, E).requires_grad_()
    hn = None
    if neg == "shared":
        hn = _unit(7, E).requires_grad_()
    elif neg == "per_query":
        hn = _unit(B, 3, E).requires_grad_()
    tau = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    ins = [q, d, tau] + ([hn] if hn is not None else [])
    out, g = _grads(lambda: info_nce(q, d, temperature=tau, hard_negatives=hn, blocks=blocks), ins)
    ref, g_ref = _grads(lambda: info_nce_ref(q, d, temperature=tau, hard_negatives=hn), ins)
    assert out.shape == () and out.dtype == torch.float32
    _close(out, ref, "loss")
    for name, a, b in zip(["dq", "dd", "dtau", "dneg"], g, g_ref):
        _close(a, b, name)


def test_lse_function_with_upstream_grad():
    """The LSE primitive alone, with a random upstream gradient (not the 1/B of a mean)."""
    torch.manual_seed(1)
    q = _unit(19, 48).requires_grad_()
    c = _unit(37, 48).requires_grad_()
    inv_tau = torch.tensor([12.5], device=DEVICE, requires_grad=True)
    g_up = torch.randn(19, device=DEVICE)
    lse = ContrastiveLSEFunction.apply(q, c, inv_tau, SMALL_TILES)
    lse_ref = torch.logsumexp((q @ c.T) * inv_tau, 1)
    _close(lse, lse_ref, "lse")
    g = torch.autograd.grad(lse, [q, c, inv_tau], g_up)
    g_ref = torch.autograd.grad(lse_ref, [q, c, inv_tau], g_up)
    for name, a, b in zip(["dq", "dc", "dinv_tau"], g, g_ref):
        _close(a, b, name)


def test_info_nce_kernel_float_temperature_and_strided_rows():
    torch.manual_seed(2)
    q = _unit(20, 32)[::2].requires_grad_()   # (10, 32), row stride 64
    d = _unit(10, 32).requires_grad_()
    out, g = _grads(lambda: info_nce(q, d, temperature=0.02), [q, d])
    ref, g_ref = _grads(lambda: info_nce_ref(q, d, temperature=0.02), [q, d])
    _close(out, ref, "loss")
    _close(g[0], g_ref[0], "dq")
    _close(g[1], g_ref[1], "dd")


def test_info_nce_kernel_bad_input():
    q = _unit(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(q, _unit(5, 8), temperature=0.05)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, _unit(4, 8), temperature=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        info_nce(q.double(), _unit(4, 8).double(), temperature=0.05)
