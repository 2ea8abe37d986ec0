"""The opt-in bf16 GEMMs on CPU (``Engine(cpu_precision="bf16")``, ops.PackedLinear kind 'onednn_bf16'): never
the default, refused where it does not apply, within bf16 tolerance of the fp32 engine, and the one-loop CPU
forward stays bit-identical to the op-by-op path on these packs too."""
import numpy as np
import pytest
import torch

import jv5fast
from jv5fast import ops
from jv5fast.batching import PackedBatch
from jv5fast.models import cpu_forward

pytestmark = pytest.mark.skipif(not ops.bf16_linear_ok(), reason="oneDNN's bf16 linear does not run here")


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 33, 5), (17, 2304, 768), (131, 97, 800), (600, 40, 100)])
def test_bf16_linear_against_its_reference(m, n, k):
    """Inputs and weights rounded to bf16, products summed in fp32, the result rounded to bf16 (oneDNN's bf16
    linear returns bf16): against float64 on the rounded inputs, within two bf16 ulps of the output."""
    g = torch.Generator().manual_seed(m * n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    p = ops.pack_linear(w, kind="onednn_bf16")
    assert p.kind == "onednn_bf16"
    got = ops.linear(x, w, p)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    ref = (x.bfloat16().double() @ w.bfloat16().double().t()).float()
    torch.testing.assert_close(got, ref, atol=1e-4 * k ** 0.5 + 1e-4, rtol=2 ** -7)
    # and against fp32 within bf16's own rounding of the inputs
    torch.testing.assert_close(got, x @ w.t(), atol=5e-2 * k ** 0.5, rtol=5e-2)


def test_not_the_default_and_refused_where_it_does_not_apply(ckpt_factory):
    path = ckpt_factory("nano")
    eng = jv5fast.Engine(path, device="cpu")
    assert eng.cpu_precision == "fp32" and "onednn_bf16" not in {p.kind for p in eng.model.packed.values()}
    with pytest.raises(ValueError, match="cpu_precision must be 'fp32' or 'bf16'"):
        jv5fast.Engine(path, device="cpu", cpu_precision="fp16")
    with pytest.raises(ValueError, match=r"cpu_precision='bf16' applies to the torch backend on CPU in float32"):
        jv5fast.Engine(path, device="cpu", dtype="bfloat16", cpu_precision="bf16")


@pytest.mark.parametrize("family", ["nano", "small"])
def test_close_to_fp32_and_the_one_loop_is_bit_identical(family, ckpt_factory):
    path = ckpt_factory(family, seed=21)
    texts = ["a", "two words", "a longer text with several words, and punctuation too " * 3]
    want = jv5fast.Engine(path, device="cpu").embed(texts)
    eng = jv5fast.Engine(path, device="cpu", cpu_precision="bf16")
    bb = eng.model
    assert {p.kind for p in bb.packed.values()} == {"onednn_bf16"}
    d = eng.describe()
    assert d["cpu_precision"] == "bf16" and {s["kernel"] for s in d["gemm"]["shapes"]} == {"onednn_bf16"}
    got = eng.embed(texts)
    assert float((got * want).sum(1).min()) > 0.999
    batch = PackedBatch.from_ids(eng.tokenize(texts), "cpu")
    if ops._cpu_ext() is not None:
        assert cpu_forward.usable(bb, batch)
        with torch.inference_mode():
            for last_only in (True, False):
                assert torch.equal(cpu_forward.forward(bb, batch, last_only), bb.hidden_states(batch, last_only))
    # a task switch re-packs in bf16
    other = [t for t in eng.tasks if t != eng.task]
    if other:
        eng.embed(texts, task=other[0])
        assert {p.kind for p in bb.packed.values()} == {"onednn_bf16"}
    assert np.isfinite(got).all()
