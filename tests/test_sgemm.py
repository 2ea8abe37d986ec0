"""jv5fast's CPU fp32 GEMM on prepacked panels (csrc/sgemm.cpp via jv5fast.ops.linear) against float64
matmul, on ragged shapes: rows that do not fill a 6-row (AVX2) or 12-row (AVX-512) tile, columns that do not
fill a 16-wide panel or an odd number of panels, K that spans several 768-wide chunks or is not a multiple of
anything; each at every ISA level the CPU has (the ``cpu_isa`` fixture), and bit-equal between them."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jv5fast import ops

pytestmark = pytest.mark.skipif(ops._cpu_ext() is None, reason="jv5fast._C.sgemm does not run here (extension "
                                "not built, or no AVX2/FMA)")


# Every test here runs at each ISA level this CPU has for the kernels (the cpu_isa fixture, tests/conftest.py).
pytestmark = [pytestmark, pytest.mark.usefixtures("cpu_isa")]


def _ref(x, w):
    return (x.double() @ w.double().t()).float()


def _tol(k):  # fp32 accumulation over k terms of unit-scale products
    return 2e-6 * k ** 0.5 * 8


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 20, 64, 131, 200])
@pytest.mark.parametrize("n, k", [(1, 1), (15, 3), (40, 3), (150, 5), (16, 768), (17, 769), (33, 1536), (100, 2000),
                                  (768, 3072)])
def test_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    p = ops.pack_linear(w)
    assert p.kind == "jv5fast" and p.data.shape == (-(-n // 16), k, 16)
    got = ops.linear(x, w, p)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, _ref(x, w), atol=_tol(k), rtol=1e-5)


def test_threads_and_noncontiguous_input():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2304, 768, generator=g)
    x = torch.randn(40, 1600, generator=g)[:, 100:868]  # a strided view
    p = ops.pack_linear(w)
    want = _ref(x, w)
    outs = []
    for t in (1, 2, 3, 8):  # more threads than cores or work items is fine
        out = torch.empty(40, 2304)
        ops._cpu_ext().sgemm(x.contiguous().numpy(), p.data, out.numpy(), t)
        torch.testing.assert_close(out, want, atol=_tol(768), rtol=1e-5)
        outs.append(out)
    # threads split whole (rows x panels) items: each output's sum runs the same way whatever the split
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    torch.testing.assert_close(ops.linear(x, w, p), want, atol=_tol(768), rtol=1e-5)


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 33, 5), (13, 49, 1537), (25, 48, 2), (17, 2304, 768),
                                     (131, 97, 800), (12, 16, 769), (600, 40, 100)])
def test_bit_equal_across_isas_and_threads(m, n, k, cpu_isa):
    """Summation order is fixed by K alone (csrc/sgemm.cpp): AVX2 and AVX-512, any thread count, same bits."""
    g = torch.Generator().manual_seed(m + n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    p = ops.pack_linear(w, kind="jv5fast")
    outs = {}
    levels = ops.CPU_ISAS[ops.CPU_ISAS.index(ops.cpu_isa_supported()):]  # this CPU's, best first
    for isa in [i for i in levels if i != "scalar"]:
        ops._cpu_ext().set_isa_limit(isa)
        for t in (1, 2, 3):
            out = torch.full((m, n), float("nan"))
            ops._cpu_ext().sgemm(x.numpy(), p.data, out.numpy(), t)
            outs[(isa, t)] = out
    ops._cpu_ext().set_isa_limit(cpu_isa)
    first = next(iter(outs.values()))
    differ = [key for key, o in outs.items() if not torch.equal(o, first)]
    assert not differ, differ
    torch.testing.assert_close(first, _ref(x, w), atol=_tol(k), rtol=1e-5)


def test_panels_layout():
    w = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    p = ops.pack_panels(w)
    assert p.shape == (3, 3, 16)
    for n in range(48):
        for k in range(3):
            assert p[n // 16, k, n % 16] == (w[n, k] if n < 40 else 0)


def test_shape_mismatch_is_refused_not_read_out_of_bounds():
    sgemm = ops._cpu_ext().sgemm
    panels = ops.pack_panels(torch.randn(32, 8)).numpy()
    good_a, good_out = np.zeros((4, 8), np.float32), np.zeros((4, 32), np.float32)
    for a, out in [(np.zeros((4, 9), np.float32), good_out),      # K differs from the panels'
                   (good_a, np.zeros((4, 33), np.float32)),       # N needs 3 panels, there are 2
                   (good_a, np.zeros((5, 32), np.float32)),       # M differs
                   (np.zeros(8, np.float32), good_out)]:          # not 2-D
        with pytest.raises(ValueError, match="sgemm"):
            sgemm(a, panels, out, 1)
    with pytest.raises(TypeError):  # an output is never silently converted into a temporary copy
        sgemm(good_a, panels, np.zeros((4, 32), np.float64), 1)
    with pytest.raises(TypeError):
        sgemm(good_a, panels, np.zeros((32, 4), np.float32).T, 1)


def test_empty_and_zero_k():
    w = torch.randn(20, 5)
    p = ops.pack_linear(w)
    assert ops.linear(torch.randn(0, 5), w, p).shape == (0, 20)
    out = np.full((3, 20), 7, np.float32)
    ops._cpu_ext().sgemm(np.zeros((3, 0), np.float32), ops.pack_panels(torch.randn(20, 0)).numpy(), out, 2)
    assert (out == 0).all()


def test_float32_output_whatever_the_default_dtype():
    w, x = torch.randn(24, 8), torch.randn(3, 8)
    p = ops.pack_linear(w)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ops.linear(x, w, p)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _ref(x, w), atol=_tol(8), rtol=1e-5)


def test_cpu_gemm_choice(monkeypatch):
    monkeypatch.setenv("JV5FAST_CPU_GEMM", "onednn")
    assert ops.cpu_gemm() == "onednn"
    if torch.backends.mkldnn.is_available():
        assert ops.pack_linear(torch.randn(8, 8)).kind == "onednn"
    monkeypatch.setenv("JV5FAST_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="JV5FAST_CPU_GEMM='blas' is not valid; choose one of"):
        ops.pack_linear(torch.randn(8, 8))
    monkeypatch.delenv("JV5FAST_CPU_GEMM")
    assert ops.cpu_gemm() == "jv5fast"
    monkeypatch.setenv("JV5FAST_CPU_PACK", "0")
    assert ops.pack_linear(torch.randn(8, 8)) is None
    monkeypatch.delenv("JV5FAST_CPU_PACK")
    assert ops.pack_linear(torch.randn(8, 8, requires_grad=True)) is None
    assert ops.pack_linear(torch.randn(8, 8, dtype=torch.bfloat16)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_with_torch():
    """The extension and torch share one libgomp, so their thread pools never spin against each other on
    the same cores (whichever of the two is imported first)."""
    code = ("import {first}, {second}, torch; from jv5fast import ops; ops.pack_linear(torch.randn(8, 8)); "
            "print(len({{l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}}))")
    for first, second in (("torch", "jv5fast._C"), ("jv5fast._C", "torch")):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert out.stdout.strip() == "1", (first, out.stdout, out.stderr)
