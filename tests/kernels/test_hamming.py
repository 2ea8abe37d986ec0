"""Triton Hamming top-k against hamming_topk_ref and an independent numpy reference: exact equality of
distances and ids (ties by smaller id). Without CUDA it runs under TRITON_INTERPRET=1 (set by
conftest) on small shapes; with CUDA the same checks run on the GPU, plus a larger one."""
import numpy as np
import pytest
import torch

from jv5fast.kernels import hamming as hk

INT32_MAX = 2**31 - 1
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def np_ref(q, c, k):
    q, c = q.cpu().numpy(), c.cpu().numpy()
    d = np.stack([POP8[qi[None, :] ^ c].sum(-1) for qi in q])
    order = np.lexsort((np.broadcast_to(np.arange(len(c)), d.shape), d), axis=-1)[:, :k]
    D = np.full((len(q), k), INT32_MAX, np.int32)
    I = np.full((len(q), k), -1, np.int64)
    D[:, : order.shape[1]] = np.take_along_axis(d, order, 1)
    I[:, : order.shape[1]] = order
    return D, I


def _data(seed, nq, n, nbytes, levels=256):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, levels, (n, nbytes), dtype=torch.uint8, generator=g)
    q = torch.randint(0, levels, (nq, nbytes), dtype=torch.uint8, generator=g)
    if n > 4:
        c[n // 2 : n // 2 + 3] = c[1]  # duplicates: a tie group
        q[0] = c[1]  # a query equal to a corpus row
    return q, c


@pytest.mark.parametrize("nbits", [8, 32, 96, 256, 1024])
def test_ref_matches_numpy(nbits):
    q, c = _data(nbits, 7, 301, nbits // 8, levels=3)
    for k in (1, 10, 400):
        D, I = hk.hamming_topk_ref(q, c, k)
        Dn, In = np_ref(q, c, k)
        np.testing.assert_array_equal(D.numpy(), Dn)
        np.testing.assert_array_equal(I.numpy(), In)


needs_triton = pytest.mark.skipif(not hk.HAS_TRITON, reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize(
    "nbits,nq,n,k,levels",
    [(8, 3, 50, 5, 256), (32, 5, 200, 16, 3), (96, 17, 130, 7, 256), (256, 4, 97, 1, 2), (1024, 2, 70, 9, 256),
     (96, 3, 5, 12, 256)],  # the last: k > N pads
)
def test_triton_matches_ref(nbits, nq, n, k, levels):
    q, c = _data(nbits + n, nq, n, nbits // 8, levels)
    q, c = q.to(DEV), c.to(DEV)
    Dr, Ir = hk.hamming_topk_ref(q, c, k)
    for kw in ({}, {"block_q": 4, "block_n": 32, "splits": 3}):  # default grid, and many programs to merge
        D, I = hk.hamming_topk(q, c, k, **kw)
        assert D.dtype == torch.int32 and I.dtype == torch.int64 and D.shape == (nq, k)
        torch.testing.assert_close(D, Dr, rtol=0, atol=0)
        torch.testing.assert_close(I, Ir, rtol=0, atol=0)
    Dn, In = np_ref(q, c, k)
    np.testing.assert_array_equal(D.cpu().numpy(), Dn)
    np.testing.assert_array_equal(I.cpu().numpy(), In)


@needs_triton
def test_triton_swar_popcount_words():
    """Every bit position and the all-ones word: the SWAR path must count each of them."""
    words = torch.tensor([0, 1, 2**31 - 1, -1, -(2**31), 0x55555555, 0x0F0F0F0F], dtype=torch.int32)
    c = words.view(torch.uint8).view(-1, 4).repeat(1, 2)  # 8-byte codes
    q = torch.zeros((1, 8), dtype=torch.uint8)
    D, I = hk.hamming_topk(q.to(DEV), c.to(DEV), len(words))
    expect = sorted((2 * bin(w & 0xFFFFFFFF).count("1"), i) for i, w in enumerate(words.tolist()))
    assert D.cpu().tolist() == [[d for d, _ in expect]] and I.cpu().tolist() == [[i for _, i in expect]]


@needs_triton
def test_triton_bad_k():
    q, c = _data(0, 1, 10, 4)
    with pytest.raises(AssertionError, match="k must be"):
        hk.hamming_topk(q.to(DEV), c.to(DEV), 0)


@needs_triton
@pytest.mark.skipif(not CUDA, reason="needs a GPU (too slow for the interpreter)")
@pytest.mark.parametrize("nbits", [256, 768, 1024])
def test_triton_cuda_large(nbits):
    q, c = _data(nbits, 100, 200_003, nbits // 8, levels=2)
    for k in (1, 10, 100):
        D, I = hk.hamming_topk(q.cuda(), c.cuda(), k)
        Dr, Ir = hk.hamming_topk_ref(q.cuda(), c.cuda(), k)
        torch.testing.assert_close(D, Dr, rtol=0, atol=0)
        torch.testing.assert_close(I, Ir, rtol=0, atol=0)


@needs_triton
def test_hamming_index_device_path():
    """HammingIndex's device branch (word mirror grown across add(), reset) — on CUDA when present,
    else pointed at the CPU so the interpreter runs the same code."""
    from jv5fast.index import HammingIndex

    q, c = _data(11, 4, 90, 12, levels=3)
    if CUDA:
        index = HammingIndex(96, device="cuda")
    else:
        index = HammingIndex(96)
        index.device = torch.device("cpu")  # test-only: route search through the Triton branch
    index.add(c[:40].numpy())
    index.add(c[40:])
    D, I = index.search(q.numpy(), 6)
    Dn, In = np_ref(q, c, 6)
    np.testing.assert_array_equal(D.cpu().numpy(), Dn)
    np.testing.assert_array_equal(I.cpu().numpy(), In)
    index.reset()
    index.add(c[:2])
    D, I = index.search(q[:1], 3)
    assert I.cpu().tolist()[0][2] == -1 and D.cpu().tolist()[0][2] == INT32_MAX
