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


# Every test here runs at each ISA level this CPU has for the kernels (the cpu_isa fixture, tests/conftest.py).
pytestmark = [pytestmark, pytest.mark.usefixtures("cpu_isa")]


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


@pytest.mark.parametrize("T, F", [(1, 3072), (17, 3072), (3, 13), (700, 3072), (5, 1), (2, 8)])
def test_swiglu_matches_reference(T, F, monkeypatch):
    """One fused pass (a vectorised e^x) against jv5fast/kernels/swiglu.py's silu(gate) * up, and float64."""
    from jv5fast.kernels.swiglu import swiglu_ref
    g = torch.Generator().manual_seed(T * 13 + F)
    gate_up = torch.randn(T, 2 * F, generator=g) * 4
    gate_up[0, : min(F, 6)] = torch.tensor([-100.0, -87.5, 88.5, 100.0, 0.0, 1e-30])[: min(F, 6)]
    calls = _calls(monkeypatch, "swiglu")
    got = ops.swiglu(gate_up)
    assert calls == [1] and got.shape == (T, F) and got.dtype == torch.float32
    torch.testing.assert_close(got, swiglu_ref(gate_up), atol=1e-6, rtol=4e-6)
    gd, ud = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), gd * torch.sigmoid(gd) * ud, atol=1e-6, rtol=4e-6)


def test_swiglu_threads_agree_and_autograd_takes_the_reference():
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(300, 2 * 3072, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.swiglu(gate_up)
        torch.set_num_threads(2)
        two = ops.swiglu(gate_up)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # rows are independent: the split cannot change a bit
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(4, 16, generator=g, requires_grad=True)
        y = ops.swiglu(x)
        assert y.requires_grad
        y.sum().backward()
        assert x.grad is not None


def _qkv(lens, H, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    return (torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g),
            torch.randn(T, Hkv, D, generator=g), cu, max(lens))


@pytest.mark.parametrize("lens", [[1], [7, 300, 1], [17], [97, 512, 3], [33] * 32])
@pytest.mark.parametrize("H, Hkv, D", [(12, 12, 64), (16, 8, 128), (8, 2, 10), (4, 1, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(lens, H, Hkv, D, causal, monkeypatch):
    """Short-sequence varlen attention (csrc/cpu_ops.cpp) against jv5fast/kernels/attention.py's SDPA references:
    ragged batches, GQA ratios 1/2/4/8, an odd head dim; and the last-row variant of the final layer."""
    from jv5fast.kernels.attention import attention_last_ref, attention_varlen_ref
    q, k, v, cu, S = _qkv(lens, H, Hkv, D, seed=len(lens) * 7 + H + D)
    calls = _calls(monkeypatch, "attention")
    got = ops.attention_varlen(q, k, v, cu, S, causal=causal)
    want = attention_varlen_ref(q, k, v, cu, S, causal=causal)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    last = (cu[1:] - 1).long()
    q_last = q.index_select(0, last)
    got = ops.attention_last(q_last, k, v, cu, S, softmax_scale=0.3)
    torch.testing.assert_close(got, attention_last_ref(q_last, k, v, cu, S, softmax_scale=0.3), atol=2e-6,
                               rtol=2e-5)
    assert calls == [1, 1]


def test_attention_takes_the_reference_for_long_sequences_and_refuses_bad_offsets(monkeypatch):
    C = ops._cpu_ext()
    q, k, v, cu, S = _qkv([600, 3], 4, 2, 16, seed=1)
    calls = _calls(monkeypatch, "attention")
    ops.attention_varlen(q, k, v, cu, S, causal=True)  # above CPU_ATTENTION_MAX_SEQLEN: SDPA
    assert calls == []
    q, k, v, cu, S = _qkv([5, 4], 4, 2, 16, seed=2)
    out = torch.empty(q.shape)
    bad = torch.tensor([0, 6, 9], dtype=torch.int32)  # a sequence of 6 + 3 = 9 tokens: fine
    C.attention(q.numpy(), k.numpy(), v.numpy(), bad.numpy(), True, False, 0.25, out.numpy(), 1)
    for cu_bad, msg in (([0, 5, 8], "run from 0 to the token count"), ([0, 9, 9], "sequence 1 has 0 tokens"),
                        ([1, 5, 9], "run from 0")):
        with pytest.raises((ValueError, IndexError), match=msg):
            C.attention(q.numpy(), k.numpy(), v.numpy(), np.array(cu_bad, np.int32), True, False, 0.25,
                        out.numpy(), 1)


@pytest.mark.parametrize("pos", [0, 5, 8])
def test_attention_keeps_nan_exactly_where_the_math_puts_it(pos):
    """A NaN key poisons exactly the query rows that attend to it (its KV head's query heads; with causal
    masking only rows at or after it), whether it falls in the 8-wide part of the softmax or its tail: a broken
    model must give non-finite embeddings (the engine refuses them). The expected rows are derived from the
    math, not from SDPA: torch's AVX-512 softmax turns a row whose only score is NaN into 0.0 (pos 0, causal),
    which is a wrong answer and differs by CPU; the finite rows are compared with SDPA."""
    from jv5fast.kernels.attention import attention_varlen_ref
    H, Hkv, T = 4, 2, 9
    q, k, v, cu, S = _qkv([T], H, Hkv, 16, seed=pos)
    k[pos, 0, 0] = float("nan")
    for causal in (False, True):
        got = ops.attention_varlen(q, k, v, cu, S, causal=causal)
        expect = torch.zeros(T, H, dtype=torch.bool)  # (T, H): rows that see the NaN key
        rows = torch.arange(T) >= pos if causal else torch.ones(T, dtype=torch.bool)
        expect[:, : H // Hkv] = rows[:, None]  # query heads 0 .. H/Hkv-1 read KV head 0
        assert torch.equal(torch.isnan(got), expect[:, :, None].expand_as(got)), (pos, causal)
        want = attention_varlen_ref(q, k, v, cu, S, causal=causal)
        torch.testing.assert_close(got[~expect], want[~expect], atol=2e-6, rtol=2e-5)
