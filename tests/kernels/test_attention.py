"""Triton varlen attention vs attention_varlen_ref (interpreter on CPU), forward and gradients.

Tolerance (style.md): |kernel - ref_fp32| <= k * |torch_lowp - ref_fp32| + floor, k = 2 forward, 3 grads.
"""
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels.attention import attention_varlen, attention_varlen_ref, _attn_fwd  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from jv5fast.testing import TOL_FLOOR as FLOOR, assert_close_dtype  # noqa: E402,F401



def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _qkv(T, H, Hkv, D, dtype, fused=False):
    if fused:  # views into one (T, H + 2 Hkv, D) projection, as the engine produces them
        qkv = torch.randn(T, H + 2 * Hkv, D, device=DEVICE).to(dtype)
        return qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
    return (torch.randn(T, H, D, device=DEVICE).to(dtype), torch.randn(T, Hkv, D, device=DEVICE).to(dtype),
            torch.randn(T, Hkv, D, device=DEVICE).to(dtype))


CASES = [  # lens, H, Hkv, D, causal, dtype
    ([1], 2, 2, 64, True, torch.float32),
    ([7, 33, 1], 4, 1, 40, False, torch.float16),
    ([7, 33, 1], 2, 2, 96, True, torch.float16),
    ([65, 130, 3], 4, 2, 64, True, torch.float32),
    ([65, 130, 3], 8, 1, 128, True, torch.float16),
    ([65, 130, 3], 2, 2, 128, False, torch.float32),
    ([97, 20], 4, 2, 64, False, torch.float16),
]


@pytest.mark.parametrize("lens,H,Hkv,D,causal,dtype", CASES)
def test_attention_fwd_bwd(lens, H, Hkv, D, causal, dtype):
    torch.manual_seed(sum(lens) + H + D)
    T, S = sum(lens), max(lens)
    cu = _cu(lens)
    q, k, v = (x.requires_grad_() for x in _qkv(T, H, Hkv, D, dtype))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = attention_varlen(q, k, v, cu, S, causal=causal)
    assert out.dtype == dtype and out.shape == (T, H, D)
    ref32 = attention_varlen_ref(q32, k32, v32, cu, S, causal=causal)
    ref_lp = attention_varlen_ref(q, k, v, cu, S, causal=causal)
    assert_close_dtype(out, ref32, ref_lp, dtype, 2, "out")

    do = torch.randn_like(ref32)
    g = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    g32 = torch.autograd.grad(ref32, (q32, k32, v32), do)
    g_lp = torch.autograd.grad(ref_lp, (q, k, v), do.to(dtype))
    for name, a, r, rl in zip(("dq", "dk", "dv"), g, g32, g_lp):
        assert a.shape == r.shape and a.dtype == dtype
        assert_close_dtype(a, r, rl, dtype, 3, name)


def test_attention_views_scale_and_uneven_blocks():
    """Strided q/k/v views of a fused projection, a custom scale, and BLOCK_M != BLOCK_N (causal split)."""
    torch.manual_seed(1)
    lens = [70, 5, 129]
    cu, T, S = _cu(lens), sum(lens), max(lens)
    q, k, v = _qkv(T, 4, 2, 64, torch.float32, fused=True)
    ref = attention_varlen_ref(q, k, v, cu, S, causal=True, softmax_scale=0.3)
    out = attention_varlen(q, k, v, cu, S, causal=True, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for causal in (True, False):
        ref = attention_varlen_ref(q, k, v, cu, S, causal=causal)
        o, lse = _attn_fwd(q, k, v, cu, S, causal, 64 ** -0.5, blocks=(64, 32, 4, 1))
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)
        assert lse.shape == (4, T) and torch.isfinite(lse).all()


LAST_CASES = [  # lens, H, Hkv, D, dtype
    ([1], 2, 2, 64, torch.float32),
    ([7, 33, 1], 4, 1, 40, torch.float16),
    ([65, 130, 3], 8, 2, 128, torch.float16),
    ([65, 130, 3], 12, 12, 64, torch.float32),
    ([200, 1, 17], 16, 8, 128, torch.float32),
]


@pytest.mark.parametrize("lens,H,Hkv,D,dtype", LAST_CASES)
def test_attention_last_kernel(lens, H, Hkv, D, dtype):
    """The last-row kernel (engine's pruned final layer) against attention_last_ref and against the
    last rows of the full varlen reference, on strided views of a fused projection."""
    from jv5fast.kernels.attention import attention_last, attention_last_ref
    torch.manual_seed(sum(lens) * 7 + H + D)
    cu, T, S = _cu(lens), sum(lens), max(lens)
    q, k, v = _qkv(T, H, Hkv, D, dtype, fused=True)
    last = (cu[1:] - 1).long()
    out = attention_last(q[last], k, v, cu, S)
    assert out.shape == (len(lens), H, D) and out.dtype == dtype
    ref32 = attention_last_ref(q[last].float(), k.float(), v.float(), cu, S)
    ref_lp = attention_last_ref(q[last], k, v, cu, S)
    assert_close_dtype(out, ref32, ref_lp, dtype, 2, "out")
    full = attention_varlen_ref(q.float(), k.float(), v.float(), cu, S, causal=False)[last]
    assert_close_dtype(out, full, ref_lp, dtype, 2, "out vs full")
    custom = attention_last(q[last], k, v, cu, S, softmax_scale=0.2)
    assert_close_dtype(custom, attention_last_ref(q[last].float(), k.float(), v.float(), cu, S, softmax_scale=0.2),
                       attention_last_ref(q[last], k, v, cu, S, softmax_scale=0.2), dtype, 2, "scaled")


def test_attention_last_bad_input():
    from jv5fast.kernels.attention import attention_last
    q, k, v = _qkv(10, 4, 2, 64, torch.float32)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        attention_last(q[:3], k, v, cu, 6)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_last(q[:2, :3], k, v, cu, 6)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention_last(q[:2].half(), k, v, cu, 6)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_fwd_both_grids(causal, monkeypatch):
    """The flat (tokens + sequences) grid and the (max_seqlen blocks x sequences) grid the forward falls
    back to above FLAT_MAX_SEQS sequences give the same result; max_seqlen may be a loose upper bound."""
    import jv5fast.kernels.attention as A
    torch.manual_seed(11 + causal)
    lens = [1, 64, 65, 3, 128, 129, 2]
    cu, T = _cu(lens), sum(lens)
    q, k, v = _qkv(T, 4, 2, 64, torch.float32)
    ref = attention_varlen_ref(q, k, v, cu, max(lens), causal=causal)
    flat, _ = A._attn_fwd(q, k, v, cu, T, causal, 64 ** -0.5)           # loose bound: T
    torch.testing.assert_close(flat, ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(A, "FLAT_MAX_SEQS", len(lens) - 1)
    grid, _ = A._attn_fwd(q, k, v, cu, max(lens), causal, 64 ** -0.5)
    torch.testing.assert_close(grid, ref, atol=1e-4, rtol=1e-4)
