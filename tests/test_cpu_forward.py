"""The CPU fp32 forward as one loop of jv5fast._C calls (jv5fast.models.cpu_forward) against the op-by-op
backbone it replaces (bit for bit) and the plain-PyTorch references (fp32 tolerance), on ragged batches
of fresh random token ids, both families (causal GQA with q/k norm; bidirectional), and where it must
not apply. Parity with transformers itself runs through the engine in tests/models/test_parity.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jv5fast
from jv5fast import ops
from jv5fast.batching import PackedBatch
from jv5fast.models import cpu_forward

pytestmark = pytest.mark.skipif(ops._cpu_ext() is None,
                                reason="jv5fast._C's CPU kernels do not run here")


def _batch(rng, vocab, lens):
    return PackedBatch.from_ids([rng.integers(0, vocab, n).tolist() for n in lens], "cpu")


def _reference(bb, batch, monkeypatch):
    """The same backbone through torch ops only: F.linear on the unpacked weights, the kernels' references."""
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    with torch.inference_mode():
        out = bb.hidden_states(batch, False, linear=lambda i, n, h: F.linear(h, bb.layers[i][n]))
    monkeypatch.delenv("JV5FAST_BACKEND")
    return out


@pytest.mark.parametrize("family", ["nano", "small"])
# [500, 500, 100]: enough rows (T x width >= 65536) for the kernels' multi-threaded paths
@pytest.mark.parametrize("lens", [[1], [7], [1, 13, 2, 30], [5] * 9 + [1, 40], [500, 500, 100]])
def test_same_bits_as_the_op_by_op_forward_and_close_to_the_references(family, lens, ckpt_factory, monkeypatch):
    eng = jv5fast.Engine(ckpt_factory(family, seed=len(lens)), device="cpu")
    bb = eng.model
    rng = np.random.default_rng(sum(lens))
    batch = _batch(rng, bb.embed.shape[0], lens)
    assert cpu_forward.usable(bb, batch)
    with torch.inference_mode():
        for last_only in (True, False):
            fast = cpu_forward.forward(bb, batch, last_only)
            slow = bb.hidden_states(batch, last_only)
            assert fast.dtype == torch.float32 and fast.shape == slow.shape == (
                len(lens) if last_only else sum(lens), bb.args.hidden_size)
            assert torch.equal(fast, slow)
            assert torch.equal(bb.forward(batch, last_only), fast)
    ref = _reference(bb, batch, monkeypatch)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=2e-4)
    last = (batch.cu_seqlens[1:] - 1).long()
    with torch.inference_mode():
        torch.testing.assert_close(cpu_forward.forward(bb, batch, True), ref[last], atol=2e-4, rtol=2e-4)


def test_the_engine_takes_it_and_between_runs_after_every_layer_but_the_last(ckpt_factory, monkeypatch):
    eng = jv5fast.Engine(ckpt_factory("small"), device="cpu")
    calls = []
    real = cpu_forward.forward
    monkeypatch.setattr(cpu_forward, "forward", lambda *a: calls.append(1) or real(*a))
    texts = ["a short one", "x", "somewhat longer text with more words in it than the others"]
    got = eng.embed(texts)
    assert calls
    monkeypatch.setattr(cpu_forward, "usable", lambda *a: False)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(eng.embed(texts)), atol=0, rtol=0)
    seen = []
    batch = PackedBatch.from_ids(eng.tokenize(texts), "cpu")
    monkeypatch.setattr(cpu_forward, "usable", lambda *a: True)
    eng.model.forward(batch, last_only=True, between=lambda: seen.append(1))
    assert len(seen) == len(eng.model.layers) - 1


def test_where_it_does_not_apply(ckpt_factory, monkeypatch):
    eng = jv5fast.Engine(ckpt_factory("nano"), device="cpu")
    bb = eng.model
    rng = np.random.default_rng(0)
    short = _batch(rng, 100, [3, 9])
    assert cpu_forward.usable(bb, short)
    # sequences above the attention kernel's length take the op-by-op path (SDPA)
    assert not cpu_forward.usable(bb, _batch(rng, 100, [3, ops.CPU_ATTENTION_MAX_SEQLEN + 1]))
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")  # the references asked for
    assert not cpu_forward.usable(bb, short)
    monkeypatch.delenv("JV5FAST_BACKEND")
    monkeypatch.setenv("JV5FAST_CPU_PACK", "0")  # no packed weights
    unpacked = jv5fast.Engine(ckpt_factory("nano"), device="cpu").model
    assert unpacked.packed is None and not cpu_forward.usable(unpacked, short)
    monkeypatch.delenv("JV5FAST_CPU_PACK")
    # a packed set missing one projection (never made by the engine) falls back instead of failing
    del bb.packed[(0, "w13")]
    assert not cpu_forward.usable(bb, short)
    bf16 = jv5fast.Engine(ckpt_factory("nano"), device="cpu", dtype="bfloat16").model
    assert not cpu_forward.usable(bf16, short)


@pytest.mark.parametrize("gemm", ["jv5fast", "onednn"])
def test_either_gemm_and_a_mix_keep_the_one_loop_bit_identical(gemm, ckpt_factory, monkeypatch):
    """The measured choice may put some shapes on oneDNN: the one loop then calls it on the same rows as the
    op-by-op path, so the two stay bit-identical, and both stay within fp32 tolerance of the references."""
    monkeypatch.setenv("JV5FAST_CPU_GEMM", gemm)
    bb = jv5fast.Engine(ckpt_factory("small", seed=3), device="cpu").model
    monkeypatch.delenv("JV5FAST_CPU_GEMM")
    assert {p.kind for p in bb.packed.values()} == {gemm}
    rng = np.random.default_rng(1)
    batch = _batch(rng, bb.embed.shape[0], [1, 13, 2, 30])
    ref = _reference(bb, batch, monkeypatch)
    for mixed in (False, True):
        if mixed:  # every other projection on the other GEMM
            other = "onednn" if gemm == "jv5fast" else "jv5fast"
            for j, key in enumerate(sorted(bb.packed)):
                if j % 2:
                    w = bb.layers[key[0]]["wqkv"] if key[1] in ("wq", "wkv") else bb.layers[key[0]][key[1]]
                    if key[1] in ("wq", "wkv"):
                        dq = bb.args.num_heads * bb.args.head_dim
                        w = w[:dq] if key[1] == "wq" else w[dq:]
                    bb.packed[key] = ops.pack_linear(w, kind=other)
            assert {p.kind for p in bb.packed.values()} == {"jv5fast", "onednn"}
        assert cpu_forward.usable(bb, batch)
        with torch.inference_mode():
            fast = cpu_forward.forward(bb, batch, False)
            assert torch.equal(fast, bb.hidden_states(batch, False))
        torch.testing.assert_close(fast, ref, atol=2e-4, rtol=2e-4)
