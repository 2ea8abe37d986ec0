"""jv5fast.ops references against plain math, and the pruned last-layer path against the full one."""
import pytest
import torch

import jv5fast
from jv5fast import ops
from jv5fast.batching import PackedBatch


def _naive_attention(q, k, v, cu, causal):
    """Per sequence, per head, explicit softmax in float64."""
    out = torch.empty_like(q, dtype=torch.float64)
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for h in range(H):
            g = h // (H // Hkv)
            sc = q[s:e, h].double() @ k[s:e, g].double().T / D ** 0.5
            if causal:
                sc = sc.masked_fill(torch.ones_like(sc, dtype=torch.bool).triu(1), float("-inf"))
            out[s:e, h] = sc.softmax(-1) @ v[s:e, g].double()
    return out


@pytest.mark.parametrize("lens", [[1], [7, 33, 1], [65, 3, 130], [40, 41, 39]])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 1)])
def test_attention_refs_vs_naive(lens, causal, H, Hkv):
    torch.manual_seed(sum(lens) + H)
    T, D = sum(lens), 24
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    want = _naive_attention(q, k, v, cu, causal)
    got = ops.attention_varlen(q, k, v, cu, max(lens), causal=causal)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    last = (cu[1:] - 1).long()
    got_last = ops.attention_last(q[last], k, v, cu, max(lens))
    torch.testing.assert_close(got_last.double(), want[last], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["small", "nano"])
def test_last_only_forward_equals_full_forward(family, engines):
    model = engines[family].model
    batch = PackedBatch.from_ids([[5, 6, 7, 8, 9] * 9, [11], [12, 13, 14], list(range(100, 170))])
    full = model.forward(batch)
    last = model.forward(batch, last_only=True)
    torch.testing.assert_close(last, full[(batch.cu_seqlens[1:] - 1).long()], atol=2e-6, rtol=1e-5)


def test_packed_batch_positions_restart():
    b = PackedBatch.from_ids([[1, 2, 3], [4], [5, 6]])
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3 and b.num_seqs == 3 and b.num_tokens == 6
    with pytest.raises(ValueError, match="at least one token"):
        PackedBatch.from_ids([[1], []])


def test_plan_batches_respects_budget_and_covers_everything():
    from jv5fast.batching import plan_batches
    lengths = [5, 300, 1, 17, 17, 64, 2000, 3]
    batches = plan_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 100
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_balanced_plan_has_as_few_batches_of_even_size():
    import numpy as np

    from jv5fast.batching import plan_batches
    rng = np.random.default_rng(7)
    for _ in range(300):
        lengths = rng.integers(1, 300, rng.integers(1, 80)).tolist()
        budget = int(rng.integers(1, 900))
        greedy, even = plan_batches(lengths, budget), plan_batches(lengths, budget, balance=True)
        assert len(even) == len(greedy)
        assert sorted(i for b in even for i in b) == list(range(len(lengths)))
        sizes = [sum(lengths[i] for i in b) for b in even]
        assert all(len(b) == 1 or s <= budget for b, s in zip(even, sizes))
        assert max(sizes) <= max(sum(lengths[i] for i in b) for b in greedy)
        flat = [lengths[i] for b in even for i in b]
        assert flat == sorted(flat, reverse=True)
    # 32 queries of 17 tokens and one of 40 under 512: two even batches, not 512 + 40
    lengths = [17] * 32 + [40]
    assert sorted(sum(lengths[i] for i in b) for b in plan_batches(lengths, 512, balance=True)) == [289, 295]


def test_swiglu_ref_inplace_only_without_grad():
    x = torch.randn(5, 8, requires_grad=True)
    y = ops.swiglu(x)
    y.sum().backward()  # the autograd path must still work
    with torch.no_grad():
        torch.testing.assert_close(ops.swiglu(x), y.detach())
    assert jv5fast.ops.backend() in ("auto", "torch", "triton")
