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
    with pytest.raises(ValueError, match="k must be"):
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
        index = HammingIndex(96)._set_device(torch.device("cpu"))  # test-only: the Triton branch on the CPU
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


# ----------------------------------------------------------------------------------------------
# k above the Triton kernel's MAX_K: the chunked torch path, on any device


def _cpu_search(q, c, k, backend):
    from jv5fast import _hamming

    return _hamming.hamming_topk(q.cpu().numpy(), c.cpu().numpy(), k, threads=2, backend=backend)


def _backends():
    from jv5fast import _hamming

    return ["numpy"] + (["cpp"] if _hamming.has_extension() else [])


@pytest.mark.parametrize("nbits", [8, 40, 96, 1024])  # 1 byte, 5 bytes (word padding), 12 bytes, 128 bytes
def test_chunked_large_k_matches_ref_and_cpu_search(nbits, monkeypatch):
    n = 2600
    q, c = _data(nbits + 7, 5, n, nbits // 8, levels=3 if nbits > 8 else 256)  # tie groups everywhere
    qw, cw = hk.pack_words(q.to(DEV)), hk.pack_words(c.to(DEV))
    for k in (1, hk.MAX_K, hk.MAX_K + 1, 3000, n + 9):  # 3000 and n + 9: k > N pads with (INT32_MAX, -1)
        Dr, Ir = hk.hamming_topk_ref(q.to(DEV), c.to(DEV), k)
        Dn, In = np_ref(q, c, k)
        np.testing.assert_array_equal(Dr.cpu().numpy(), Dn)
        np.testing.assert_array_equal(Ir.cpu().numpy(), In)
        for backend in _backends():
            Dc, Ic = _cpu_search(q, c, k, backend)
            np.testing.assert_array_equal(Dc, Dn)
            np.testing.assert_array_equal(Ic, In)
        # the default budget (one chunk here), then 97 corpus rows per matmul: many chunks, merges and
        # (for large k) one query per block
        for budget in (None, 4 * 32 * cw.shape[1] * 97):
            D, I = hk.hamming_topk_words_chunked(qw, cw, k, budget_bytes=budget)
            assert D.dtype == torch.int32 and I.dtype == torch.int64 and D.shape == I.shape == (5, k)
            assert D.device == qw.device
            torch.testing.assert_close(D, Dr, rtol=0, atol=0)
            torch.testing.assert_close(I, Ir, rtol=0, atol=0)
        if k > hk.MAX_K:  # the public entry points take the chunked path instead of refusing
            D, I = hk.hamming_topk(q.to(DEV), c.to(DEV), k)
            torch.testing.assert_close(D, Dr, rtol=0, atol=0)
            torch.testing.assert_close(I, Ir, rtol=0, atol=0)


def test_chunked_edge_shapes():
    """No queries, one row, k far above N, and a query block smaller than the corpus chunk."""
    q, c = _data(3, 3, 1, 5)
    for k in (1, 2000):
        D, I = hk.hamming_topk_words_chunked(hk.pack_words(q), hk.pack_words(c), k)
        Dr, Ir = hk.hamming_topk_ref(q, c, k)
        assert torch.equal(D, Dr) and torch.equal(I, Ir)
    D, I = hk.hamming_topk_words_chunked(hk.pack_words(q[:0]), hk.pack_words(c), 1500)
    assert D.shape == I.shape == (0, 1500)


@needs_triton
def test_triton_k_at_max_k_boundary():
    """k == MAX_K is the largest k the Triton kernel runs (interpreted here: one wide tile keeps it quick);
    MAX_K + 1 gives the same answers through the chunked path."""
    q, c = _data(5, 2, 1100, 12, levels=3)
    q, c = q.to(DEV), c.to(DEV)
    for k, kw in ((hk.MAX_K, {"block_n": 1024, "splits": 1}), (hk.MAX_K + 1, {})):
        D, I = hk.hamming_topk(q, c, k, **kw)
        Dr, Ir = hk.hamming_topk_ref(q, c, k)
        torch.testing.assert_close(D, Dr, rtol=0, atol=0)
        torch.testing.assert_close(I, Ir, rtol=0, atol=0)


@needs_triton
def test_index_device_path_large_k():
    """The review case: a device EmbeddingIndex searched with k=300 and the default rescore_multiplier=4
    (a 1200-row shortlist) died on the kernel's k <= 1024 assert; it must equal the CPU index."""
    from jv5fast.index import EmbeddingIndex, HammingIndex

    rng = np.random.default_rng()
    docs = rng.standard_normal((1500, 40)).astype(np.float32)
    queries = rng.standard_normal((3, 40)).astype(np.float32)
    cpu, dev = EmbeddingIndex(40), EmbeddingIndex(40)
    dev.binary._set_device(torch.device(DEV))
    for index in (cpu, dev):
        index.add(docs[:700])
        index.add(docs[700:])
    for a, b in zip(cpu.search(queries, 300), dev.search(queries, 300)):
        np.testing.assert_array_equal(a, b)
    codes = np.packbits(docs > 0, axis=-1)
    hidx = HammingIndex(40)._set_device(torch.device(DEV))
    hidx.add(codes)
    D, I = hidx.search(codes[:4], 1600)  # k > N
    Dn, In = np_ref(torch.from_numpy(codes[:4]), torch.from_numpy(codes), 1600)
    np.testing.assert_array_equal(D.cpu().numpy(), Dn)
    np.testing.assert_array_equal(I.cpu().numpy(), In)


# ----------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the value, never an assert


def _bad_calls():
    """(entry point, call, exception, message) for bad input to every public function of the module."""
    q, c = _data(1, 2, 10, 4)
    qw, cw = hk.pack_words(q), hk.pack_words(c)
    meta = {"dtype": torch.int32, "device": "meta"}  # shapes without storage: only the checks run
    big_c, big_q = torch.empty((2**31, 1), **meta), torch.empty((1, 1), **meta)
    wide_q, wide_c = torch.empty((1, 2**19 + 1), **meta), torch.empty((3, 2**19 + 1), **meta)
    V, T = ValueError, TypeError
    calls = []
    for fn, a, b in ((hk.hamming_topk_ref, q, c), (hk.hamming_topk, q, c), (hk.hamming_topk_words, qw, cw),
                     (hk.hamming_topk_words_chunked, qw, cw)):
        name = fn.__name__
        calls += [
            (name, lambda fn=fn, b=b: fn(b.numpy(), b, 1), T, "queries must be a torch.Tensor"),
            (name, lambda fn=fn, a=a, b=b: fn(a, b.float(), 1), T, "corpus must have dtype"),
            (name, lambda fn=fn, a=a, b=b: fn(a[0], b, 1), V, r"queries must be 2-D .* got shape \((4|1),\)"),
            (name, lambda fn=fn, a=a, b=b: fn(a[:, :-1], b, 1), V, "differ in width"),
            (name, lambda fn=fn, a=a, b=b: fn(a.to("meta"), b, 1), V, "same device, got meta and cpu"),
        ]
        for k, exc in ((0, V), (-3, V), (2.0, T), ("5", T), (None, T), (True, T)):
            calls.append((name, lambda fn=fn, a=a, b=b, k=k: fn(a, b, k), exc,
                          f"k must be a positive integer, got {k!r}"))
    words, chunked = hk.hamming_topk_words, hk.hamming_topk_words_chunked
    calls += [
        ("pack_words", lambda: hk.pack_words(q.to(torch.int8)), T, "codes must have dtype torch.uint8"),
        ("pack_words", lambda: hk.pack_words(q[None]), V, r"codes must be 2-D .* \(1, 2, 4\)"),
        ("pack_words", lambda: hk.pack_words([[1, 2]]), T, "codes must be a torch.Tensor, got list"),
        ("hamming_topk_words", lambda: words(qw, cw, 1, block_q=3), V,
         "block_q must be a power of two in 2..1024 or None, got 3"),
        ("hamming_topk_words", lambda: words(qw, cw, 1, block_n=0), V, "block_n .* got 0"),
        ("hamming_topk_words", lambda: words(qw, cw, 1, splits=0), V, "splits .* got 0"),
        ("hamming_topk_words", lambda: words(qw, cw, 1, splits=1.5), V, "splits .* 1.5"),
        ("hamming_topk_words", lambda: words(big_q, big_c, 5), V, "2147483648 rows"),
        ("hamming_topk_words_chunked", lambda: chunked(big_q, big_c, 5000), V, "2147483648 rows"),
        ("hamming_topk_words_chunked", lambda: chunked(wide_q, wide_c, 5000), V, "524289 words"),
    ]
    return calls


@pytest.mark.parametrize("call", range(len(_bad_calls())),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_calls())])
def test_bad_input_raises_value_or_type_error_not_assert(call):
    _, fn, exc, match = _bad_calls()[call]
    with pytest.raises(exc, match=match):
        fn()


def test_no_assert_statements_in_hamming_kernel_module():
    """Input checks in kernels/hamming.py must survive ``python -O``: no assert statement anywhere in it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hk))
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert asserts == [], f"assert statements at lines {asserts} of kernels/hamming.py"
