"""jv5fast.train.losses: each public loss vs its naive reference (value and gradients, float64 where it
helps), the formulas of model-spec §9 written out once more here as loops, odd shapes, ties, the
learnable temperature, the InfoNCE dispatch to the Triton kernel, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from jv5fast.train import losses

SHAPES = [(1, 5), (3, 5), (3, 64), (17, 5), (17, 64)]


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _value_and_grads(fn, tensors):
    out = fn()
    return out, torch.autograd.grad(out, tensors, allow_unused=True)


def _assert_same(fn_a, fn_b, tensors, atol=1e-10, rtol=1e-8):
    a, ga = _value_and_grads(fn_a, tensors)
    b, gb = _value_and_grads(fn_b, tensors)
    assert a.shape == () and torch.isfinite(a)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    for i, (x, y) in enumerate(zip(ga, gb)):
        x = torch.zeros_like(tensors[i]) if x is None else x
        y = torch.zeros_like(tensors[i]) if y is None else y
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"grad {i}: {m}")


# ---- distillation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,E", SHAPES)
def test_distill_vs_ref(B, E):
    torch.manual_seed(B * 7 + E)
    s = (3 * torch.randn(B, E, dtype=torch.float64)).requires_grad_()   # not normalized on purpose
    t = torch.randn(B, E, dtype=torch.float64).requires_grad_()
    _assert_same(lambda: losses.distill_loss(s, t), lambda: losses.distill_loss_ref(s, t), [s, t])
    _assert_same(lambda: losses.distill_loss(s, t, reduction="sum"),
                 lambda: losses.distill_loss_ref(s, t, reduction="sum"), [s, t])
    # scale invariance and the mean/sum relation (open point #11)
    torch.testing.assert_close(losses.distill_loss(5 * s, t), losses.distill_loss(s, t))
    torch.testing.assert_close(losses.distill_loss(s, t, reduction="sum"), B * losses.distill_loss(s, t))


def test_distill_identical_is_zero_and_fp32_out():
    x = torch.randn(6, 10)
    out = losses.distill_loss(x, 2 * x)
    assert out.dtype == torch.float32 and abs(out.item()) < 1e-6


# ---- InfoNCE -----------------------------------------------------------------------------------------------
def _info_nce_loops(q, d, tau, hn):
    """-(1/B) sum_i log( S(q_i, d_i) / (S(q_i, d_i) + sum_{n in N_i} S(q_i, n)) ), S = exp(. / tau)."""
    B = q.shape[0]
    total = 0
    for i in range(B):
        pos = torch.exp(q[i] @ d[i] / tau)
        neg = sum(torch.exp(q[i] @ d[j] / tau) for j in range(B) if j != i)
        if hn is not None and hn.dim() == 2:
            neg = neg + sum(torch.exp(q[i] @ n / tau) for n in hn)
        if hn is not None and hn.dim() == 3:
            neg = neg + sum(torch.exp(q[i] @ n / tau) for n in hn[i])
        total = total - torch.log(pos / (pos + neg))
    return total / B


@pytest.mark.parametrize("B,E", SHAPES)
@pytest.mark.parametrize("neg", [None, "shared", "per_query"])
def test_info_nce_vs_loops(B, E, neg):
    torch.manual_seed(B * 31 + E)
    q, d = _unit(B, E).requires_grad_(), _unit(B, E).requires_grad_()
    hn = {None: None, "shared": _unit(5, E), "per_query": _unit(B, 2, E)}[neg]
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ins = [q, d, tau] + ([hn.requires_grad_()] if hn is not None else [])
    _assert_same(lambda: losses.info_nce_loss(q, d, temperature=tau, hard_negatives=hn),
                 lambda: _info_nce_loops(q, d, tau, hn), ins)
    assert losses.info_nce_loss(q, d, temperature=tau, hard_negatives=hn).dtype == torch.float64


def test_info_nce_learnable_temperature_gradcheck():
    """log tau as the parameter (open point #13): autograd's gradient matches finite differences."""
    torch.manual_seed(3)
    q, d, hn = _unit(5, 8), _unit(5, 8), _unit(5, 2, 8)
    log_tau = torch.tensor(math.log(0.02), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lt: losses.info_nce_loss(q, d, temperature=lt.exp(), hard_negatives=hn), (log_tau,))
    loss = losses.info_nce_loss(q.float(), d.float(), temperature=log_tau.float().exp())
    (g,) = torch.autograd.grad(loss, log_tau)
    assert torch.isfinite(g) and g.abs() > 0


def test_info_nce_float_temperature_and_fp32():
    torch.manual_seed(4)
    q, d = _unit(9, 16, dtype=torch.float32), _unit(9, 16, dtype=torch.float32)
    out = losses.info_nce_loss(q, d, temperature=0.02)
    ref = _info_nce_loops(q.double(), d.double(), 0.02, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


def test_bidirectional_info_nce_vs_loops():
    torch.manual_seed(5)
    q, d, hn = _unit(6, 12).requires_grad_(), _unit(6, 12).requires_grad_(), _unit(14, 12).requires_grad_()
    tau = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    _assert_same(lambda: losses.bidirectional_info_nce_loss(q, d, temperature=tau, hard_negatives=hn),
                 lambda: _info_nce_loops(q, d, tau, hn) + _info_nce_loops(d, q, tau, None), [q, d, hn, tau])
    _assert_same(lambda: losses.bidirectional_info_nce_loss(q, d, temperature=tau, hard_negatives=hn),
                 lambda: losses.bidirectional_info_nce_ref(q, d, temperature=tau, hard_negatives=hn),
                 [q, d, hn, tau])


@pytest.mark.parametrize("neg", [None, "shared", "per_query"])
def test_info_nce_dispatches_to_triton(monkeypatch, neg):
    """JV5FAST_BACKEND=triton sends info_nce_loss through the fused kernel (the interpreter on a CPU-only host,
    CUDA tensors on a GPU host: compiled kernels cannot read CPU tensors)."""
    pytest.importorskip("triton")
    from jv5fast.kernels import contrastive
    torch.manual_seed(6)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU host, else the interpreter
    q = _unit(7, 24, dtype=torch.float32).to(dev).requires_grad_()
    d = _unit(7, 24, dtype=torch.float32).to(dev).requires_grad_()
    hn = {None: None, "shared": _unit(4, 24, dtype=torch.float32).to(dev),
          "per_query": _unit(7, 3, 24, dtype=torch.float32).to(dev)}[neg]
    tau = torch.tensor(0.03, device=dev, requires_grad=True)
    calls = []
    real = contrastive.ContrastiveLSEFunction.apply
    monkeypatch.setattr(contrastive.ContrastiveLSEFunction, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("JV5FAST_BACKEND", "triton")
    out, g = _value_and_grads(lambda: losses.info_nce_loss(q, d, temperature=tau, hard_negatives=hn),
                              [q, d, tau])
    assert calls, "the Triton kernel was not used"
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    ref, g_ref = _value_and_grads(lambda: losses.info_nce_loss(q, d, temperature=tau, hard_negatives=hn),
                                  [q, d, tau])
    assert len(calls) == 1, "JV5FAST_BACKEND=torch still used the kernel"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_forced_triton_on_cpu_tensors_without_interpreter_is_a_clear_error(monkeypatch):
    """On a CUDA host TRITON_INTERPRET is unset: a forced Triton loss on CPU tensors says why, instead of the
    compiled kernel's pointer error."""
    pytest.importorskip("triton")
    from jv5fast.kernels import contrastive
    if not contrastive.HAS_TRITON:
        pytest.skip("the contrastive kernel is unavailable")
    monkeypatch.setenv("JV5FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, d = _unit(3, 8, dtype=torch.float32), _unit(3, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="need CUDA tensors, got one on cpu.*TRITON_INTERPRET=1"):
        losses.info_nce_loss(q, d, temperature=0.05)


# ---- GOR ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,E", SHAPES + [(40, 5)])
def test_gor_vs_naive(B, E):
    torch.manual_seed(B * 13 + E)
    q, p = _unit(B, E).requires_grad_(), _unit(B, E).requires_grad_()
    _assert_same(lambda: losses.gor_loss(q, p), lambda: losses.gor_ref(q, p), [q, p])


def test_gor_exact_identity_and_random_unit_expectation():
    torch.manual_seed(7)
    x = torch.randn(9, 6, dtype=torch.float64)   # unnormalized: the identity holds for any X
    loops = sum((x[i] @ x[j]) ** 2 for i in range(9) for j in range(9) if i != j) / (9 * 8)
    torch.testing.assert_close(losses.gor_loss(x, x), 2 * loops, atol=1e-10, rtol=1e-12)
    # E[(u . u')^2] = 1/E for uniform unit vectors: each term of GOR is ~1/E on random data
    u, v = _unit(512, 32), _unit(512, 32)
    assert abs(losses.gor_loss(u, v).item() / 2 - 1 / 32) < 0.2 / 32


def test_gor_fp32_and_b1():
    torch.manual_seed(8)
    q, p = _unit(300, 64, dtype=torch.float32), _unit(300, 64, dtype=torch.float32)
    torch.testing.assert_close(losses.gor_loss(q, p).double(), losses.gor_ref(q.double(), p.double()),
                               atol=1e-6, rtol=1e-4)
    q1 = _unit(1, 8).requires_grad_()
    out = losses.gor_loss(q1, _unit(1, 8))
    assert out.item() == 0
    (g,) = torch.autograd.grad(out, q1)
    assert (g == 0).all()


# ---- CoSENT ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,E", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_cosent_vs_ref(B, E, ties):
    torch.manual_seed(B * 17 + E + ties)
    a = torch.randn(B, E, dtype=torch.float64).requires_grad_()
    b = torch.randn(B, E, dtype=torch.float64).requires_grad_()
    scores = torch.randint(0, 3, (B,)).double() if ties else torch.rand(B, dtype=torch.float64) * 5
    _assert_same(lambda: losses.cosent_loss(a, b, scores, tau=0.05),
                 lambda: losses.cosent_ref(a, b, scores, tau=0.05), [a, b])


def test_cosent_ties_and_stability():
    torch.manual_seed(9)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert losses.cosent_loss(a, b, torch.full((5,), 3.0)).item() == 0   # all tied: no ordered pair
    # a tie between two pairs adds no term: only the 2 x 1 ordered pairs across the two levels count
    scores = torch.tensor([1.0, 1.0, 0.0, 9.0, 9.0])[:3]
    cos = F.cosine_similarity(a[:3], b[:3], dim=1).double()
    manual = math.log(1 + sum(math.exp((cos[2] - cos[i]).item() / 0.05) for i in (0, 1)))
    assert abs(losses.cosent_loss(a[:3], b[:3], scores).item() - manual) < 1e-4
    # tiny tau: the exp terms overflow fp32 (e^(2/1e-3)), logsumexp does not
    a2 = torch.randn(6, 8, requires_grad=True)
    out = losses.cosent_loss(a2, torch.randn(6, 8), torch.arange(6.0), tau=1e-3)
    (g,) = torch.autograd.grad(out, a2)
    assert torch.isfinite(out) and torch.isfinite(g).all()


# ---- relational KD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("M,Es,Et", [(1, 5, 7), (3, 5, 64), (17, 64, 5)])
@pytest.mark.parametrize("diag", [False, True])
def test_relational_kd_vs_ref(M, Es, Et, diag):
    torch.manual_seed(M * 19 + Es + diag)
    s = torch.randn(M, Es, dtype=torch.float64).requires_grad_()
    t = torch.randn(M, Et, dtype=torch.float64)
    _assert_same(lambda: losses.relational_kd_loss(s, t, mu_include_diagonal=diag),
                 lambda: losses.relational_kd_ref(s, t, mu_include_diagonal=diag), [s], atol=1e-9, rtol=1e-7)


def test_relational_kd_same_geometry_is_zero():
    torch.manual_seed(10)
    x = torch.randn(9, 16, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    assert losses.relational_kd_loss(x, 3 * x @ rot).item() < 1e-20   # invariant to rotation and scale
    assert losses.relational_kd_loss(x, torch.randn(9, 16, dtype=torch.float64)).item() > 1e-3


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    cases = [
        (lambda: losses.distill_loss(x, torch.randn(4, 9)), "same shape"),
        (lambda: losses.distill_loss(x[0], y[0]), r"\(B, E\)"),
        (lambda: losses.distill_loss(x, y, reduction="max"), "reduction"),
        (lambda: losses.info_nce_loss(x, torch.randn(5, 8), temperature=0.05), "same shape"),
        (lambda: losses.info_nce_loss(x, y, temperature=0.0), "temperature"),
        (lambda: losses.info_nce_loss(x, y, temperature=-0.02), "temperature"),
        (lambda: losses.info_nce_loss(x, y, temperature=torch.tensor(0.0)), "temperature"),
        (lambda: losses.info_nce_loss(x, y, temperature=torch.tensor([0.1, 0.2])), "scalar"),
        (lambda: losses.info_nce_loss(x, y, temperature=0.05, hard_negatives=torch.randn(3, 7)),
         "hard_negatives"),
        (lambda: losses.info_nce_loss(x, y, temperature=0.05, hard_negatives=torch.randn(3, 2, 8)),
         "hard_negatives"),
        (lambda: losses.bidirectional_info_nce_loss(x, y, temperature=-1.0), "temperature"),
        (lambda: losses.gor_loss(x, torch.randn(4, 7)), "same shape"),
        (lambda: losses.cosent_loss(x, y, torch.rand(5)), "scores"),
        (lambda: losses.cosent_loss(x, y, torch.rand(4), tau=0.0), "tau"),
        (lambda: losses.relational_kd_loss(x, torch.randn(5, 8)), "same M"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
