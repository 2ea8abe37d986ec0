"""HammingIndex / EmbeddingIndex / sign packing: exact equality against an independent numpy reference
(byte popcount table + lexsort) and faiss IndexBinaryFlat, on every CPU backend (each C++ popcount
kernel the CPU can run: AVX-512, AVX2, scalar; and the numpy fallback), over widths that are not
multiples of 64 bits, ties, N < k and bad input."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast import _hamming
from jv5fast.index import EmbeddingIndex, HammingIndex, IndexFileError

INT32_MAX = 2**31 - 1
POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
WIDTHS = [8, 32, 96, 256, 768, 1024]


def ref_topk(q, c, k):
    """Full distance matrix by a byte popcount table; lexsort by (distance, id); faiss padding."""
    q, c = np.asarray(q, np.uint8), np.asarray(c, np.uint8)
    d = np.stack([POP8[qi[None, :] ^ c].sum(-1) for qi in q]) if len(q) else np.zeros((0, len(c)), np.int64)
    ids = np.broadcast_to(np.arange(len(c)), d.shape)
    order = np.lexsort((ids, d), axis=-1)[:, :k]
    m = order.shape[1]
    D = np.full((len(q), k), INT32_MAX, np.int32)
    I = np.full((len(q), k), -1, np.int64)
    D[:, :m] = np.take_along_axis(d, order, 1)
    I[:, :m] = order
    return D, I


SIMD = _hamming.simd_kernels()  # C++ kernels this CPU can run, e.g. ['avx512', 'avx2', 'scalar']


def _backends():
    out = [pytest.param(("numpy", "auto"), id="numpy")]
    for simd in SIMD:  # each kernel explicitly, also on widths where 'auto' would pick another
        out.append(pytest.param(("cpp", simd), id=f"cpp-{simd}"))
    return out


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    name, simd = request.param
    monkeypatch.setenv("JV5FAST_HAMMING_SIMD", simd)
    monkeypatch.setenv("JV5FAST_NO_EXT", "1" if name == "numpy" else "0")
    assert _hamming.resolve_backend() == name
    return name


def _codes(rng, n, nbytes, levels=256):
    return rng.integers(0, levels, (n, nbytes), dtype=np.uint8)


@pytest.mark.parametrize("nbits", WIDTHS)
def test_search_matches_reference(backend, nbits):
    rng = np.random.default_rng(nbits)
    nb = nbits // 8
    corpus = _codes(rng, 1500, nb)
    corpus[700:705] = corpus[3]  # duplicates: ties at distance 0
    queries = np.concatenate([_codes(rng, 9, nb), corpus[[3, 0, 1499]]])  # queries equal to corpus rows
    index = HammingIndex(nbits)
    index.add(corpus[:600])
    index.add(corpus[600:])  # ids continue across add() calls
    for k in (1, 10, 37):
        D, I = index.search(queries, k, threads=2)
        assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == I.shape == (len(queries), k)
        Dr, Ir = ref_topk(queries, corpus, k)
        np.testing.assert_array_equal(D, Dr)
        np.testing.assert_array_equal(I, Ir)
    D, I = index.search(corpus[3], 6)  # a 1-D query is one code
    np.testing.assert_array_equal(I, ref_topk(corpus[3:4], corpus, 6)[1])
    if nbits >= 32:  # wide random codes: only the planted duplicates are at distance 0
        assert D[0].tolist() == [0] * 6 and I[0].tolist() == [3, 700, 701, 702, 703, 704]


@pytest.mark.parametrize("nbits", WIDTHS)
def test_heavy_ties_and_threads(backend, nbits):
    """Codes from a tiny alphabet give huge tie groups; every thread count must agree exactly."""
    rng = np.random.default_rng(1)
    corpus = _codes(rng, 3000, nbits // 8, levels=2)
    queries = _codes(rng, 5, nbits // 8, levels=2)
    Dr, Ir = ref_topk(queries, corpus, 50)
    index = HammingIndex(nbits)
    index.add(corpus)
    for threads in (1, 2, 3):
        D, I = index.search(queries, 50, threads=threads)
        np.testing.assert_array_equal(D, Dr)
        np.testing.assert_array_equal(I, Ir)


def test_large_corpus_split_path(backend):
    """N >= threads * 16384 takes the corpus-split path of the C++ kernel (per-thread heaps merged)."""
    rng = np.random.default_rng(2)
    corpus = _codes(rng, 40_000, 32, levels=4)
    queries = np.concatenate([_codes(rng, 3, 32, levels=4), corpus[[39_999, 17]]])
    index = HammingIndex(256)
    index.add(corpus)
    D, I = index.search(queries, 20, threads=2)
    Dr, Ir = ref_topk(queries, corpus, 20)
    np.testing.assert_array_equal(D, Dr)
    np.testing.assert_array_equal(I, Ir)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_k_larger_than_n_pads(backend, n):
    rng = np.random.default_rng(n)
    corpus = _codes(rng, n, 12)
    index = HammingIndex(96)
    index.add(corpus)
    D, I = index.search(corpus[:2], 10)
    Dr, Ir = ref_topk(corpus[:2], corpus, 10)
    np.testing.assert_array_equal(D, Dr)
    np.testing.assert_array_equal(I, Ir)
    assert (I[:, n:] == -1).all() and (D[:, n:] == INT32_MAX).all()


@pytest.mark.parametrize("nbits", WIDTHS)
def test_matches_faiss(backend, nbits):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    corpus = _codes(rng, 2000, nbits // 8, levels=3)  # many ties
    queries = np.concatenate([_codes(rng, 6, nbits // 8, levels=3), corpus[:2]])
    fi = faiss.IndexBinaryFlat(nbits)
    fi.add(corpus)
    Df, If = fi.search(queries, 25)
    index = HammingIndex(nbits)
    index.add(corpus)
    D, I = index.search(queries, 25)
    np.testing.assert_array_equal(D, Df)
    # faiss's default heap path (use_heap=True) compares (distance, id): ids must agree exactly too.
    np.testing.assert_array_equal(I, If)
    np.testing.assert_array_equal(D, ref_topk(queries, corpus, 25)[0])


@pytest.mark.parametrize("simd", SIMD)
def test_kernel_every_byte_width(simd):
    """The C++ kernels on raw widths of any byte count (the index only makes multiples of 8 bits, _C
    takes any): each vector path's full chunks, masked or overlapping tails, short codes, and codes
    long enough to flush the AVX2 byte counters (> 16 chunks of 32 bytes)."""
    rng = np.random.default_rng(12)
    for nb in [*range(1, 70), 95, 127, 128, 129, 160, 511, 512, 513, 544, 1025, 2048]:
        corpus = _codes(rng, 137, nb, levels=256 if nb % 2 else 2)
        corpus[60:64] = corpus[5]
        queries = np.concatenate([_codes(rng, 3, nb), corpus[[5]]])
        D, I = _hamming._C.hamming_topk(queries, corpus, 11, 2, simd)
        Dr, Ir = ref_topk(queries, corpus, 11)
        np.testing.assert_array_equal(D, Dr, err_msg=f"{simd}, {nb} bytes")
        np.testing.assert_array_equal(I, Ir, err_msg=f"{simd}, {nb} bytes")
        # all bits differ: the largest distance a row can have (no counter overflows)
        far = np.full((19, nb), 0xFF, np.uint8)
        D, I = _hamming._C.hamming_topk(np.zeros((1, nb), np.uint8), far, 3, 1, simd)
        assert D.tolist() == [[8 * nb] * 3] and I.tolist() == [[0, 1, 2]]


def test_kernel_dispatch(monkeypatch):
    if not _hamming.has_extension():
        pytest.skip("extension not built")
    C = _hamming._C
    assert SIMD[-1] == "scalar" and set(SIMD) <= {"avx512", "avx2", "scalar"}
    best = SIMD[0]
    assert C.simd_kernel(128, "auto") == best  # 1024-bit codes: the best kernel the CPU has
    assert C.simd_kernel(12, "auto") == "scalar"  # short codes: scalar under 'auto'
    for simd in SIMD:
        assert C.simd_kernel(12, simd) == simd and C.simd_kernel(128, simd) == simd
    for simd in {"avx512", "avx2"} - set(SIMD):
        with pytest.raises(ValueError, match=f"simd='{simd}' requested but this CPU lacks"):
            C.simd_kernel(128, simd)
    with pytest.raises(ValueError, match="simd must be 'auto', 'avx512', 'avx2' or 'scalar'"):
        C.simd_kernel(128, "sse")
    monkeypatch.setenv("JV5FAST_NO_EXT", "0")
    monkeypatch.setenv("JV5FAST_HAMMING_SIMD", "neon")  # the environment switch names itself
    with pytest.raises(ValueError, match=r"JV5FAST_HAMMING_SIMD='neon' is not valid; choose one of \['auto'"):
        _hamming.hamming_topk(np.zeros((1, 4), np.uint8), np.zeros((2, 4), np.uint8), 1)
    for simd in {"avx512", "avx2"} - set(SIMD):
        monkeypatch.setenv("JV5FAST_HAMMING_SIMD", simd)
        with pytest.raises(ValueError, match=f"JV5FAST_HAMMING_SIMD='{simd}', but this CPU runs only"):
            _hamming.hamming_topk(np.zeros((1, 4), np.uint8), np.zeros((2, 4), np.uint8), 1)


def test_binary_int8_codes_equal_ubinary(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    ub, b = jv5fast.quantize(x, "ubinary"), jv5fast.quantize(x, "binary")
    i1, i2 = HammingIndex(96), HammingIndex(96)
    i1.add(ub)
    i2.add(b)
    np.testing.assert_array_equal(i2.codes, ub)
    for q in (ub[:7], b[:7], torch.from_numpy(b[:7])):  # mixing binary and ubinary is allowed
        D1, I1 = i1.search(q, 5)
        D2, I2 = i2.search(q, 5)
        np.testing.assert_array_equal(D1, D2)
        np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(i1.search(ub[:7], 5)[0], ref_topk(ub[:7], ub, 5)[0])


def test_reset_and_len():
    index = HammingIndex(16)
    assert len(index) == 0 and index.ntotal == 0 and index.d == 16
    index.add(np.zeros((5, 2), np.uint8))
    assert len(index) == 5
    index.reset()
    assert len(index) == 0
    index.add(np.full((2, 2), 255, np.uint8))
    D, I = index.search(np.zeros((1, 2), np.uint8), 3)
    assert D.tolist() == [[16, 16, INT32_MAX]] and I.tolist() == [[0, 1, -1]]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        HammingIndex(12)
    for bad in (0, -8, 7.5, "256"):
        with pytest.raises(ValueError, match="nbits"):
            HammingIndex(bad)
    index = HammingIndex(64)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.zeros((1, 8), np.uint8), 1)
    with pytest.raises(ValueError, match=r"7 bytes per row .* 8-byte"):
        index.add(np.zeros((3, 7), np.uint8))
    with pytest.raises(ValueError, match="dtype uint8 .* got float32"):
        index.add(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        index.add(np.zeros((2, 3, 8), np.uint8))
    index.add(np.zeros((3, 8), np.uint8))
    for k in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="k must be"):
            index.search(np.zeros((1, 8), np.uint8), k)
    with pytest.raises(ValueError, match="queries have 4 bytes per row"):
        index.search(np.zeros((1, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="threads"):
        index.search(np.zeros((1, 8), np.uint8), 1, threads=0)
    with pytest.raises(ValueError, match="backend"):
        _hamming.resolve_backend("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' needs CUDA, which is not available"):
            HammingIndex(64, device="cuda")


def test_fallback_when_extension_missing(monkeypatch):
    """Simulate an install without a compiler: _C is None, everything still works through numpy."""
    monkeypatch.setattr(_hamming, "_C", None)
    assert _hamming.resolve_backend() == "numpy" and not _hamming.has_extension()
    with pytest.raises(RuntimeError, match="not built"):
        _hamming.resolve_backend("cpp")
    rng = np.random.default_rng(5)
    corpus = _codes(rng, 500, 12, levels=3)
    index = HammingIndex(96)
    index.add(corpus)
    D, I = index.search(corpus[:4], 7)
    Dr, Ir = ref_topk(corpus[:4], corpus, 7)
    np.testing.assert_array_equal(D, Dr)
    np.testing.assert_array_equal(I, Ir)
    x = rng.standard_normal((4, 20)).astype(np.float32)
    np.testing.assert_array_equal(_hamming.pack_signs(x), np.packbits(x > 0, axis=-1))


# ----------------------------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(6)
    corpus = _codes(rng, 777, 12)
    index = HammingIndex(96)
    index.add(corpus)
    path = tmp_path / "codes.jv5"
    index.save(path)
    loaded = HammingIndex.load(path)
    assert loaded.nbits == 96 and len(loaded) == 777
    np.testing.assert_array_equal(loaded.codes, corpus)
    for a, b in zip(loaded.search(corpus[:5], 9), index.search(corpus[:5], 9)):
        np.testing.assert_array_equal(a, b)
    loaded.add(corpus[:3])  # still growable
    assert len(loaded) == 780
    empty = HammingIndex(8)
    empty.save(tmp_path / "empty.jv5")
    assert len(HammingIndex.load(tmp_path / "empty.jv5")) == 0


def test_corrupted_and_truncated_files(tmp_path):
    rng = np.random.default_rng(7)
    index = HammingIndex(256)
    index.add(_codes(rng, 100, 32))
    path = tmp_path / "codes.jv5"
    index.save(path)
    raw = path.read_bytes()

    def write(data):
        bad = tmp_path / "bad.jv5"
        bad.write_bytes(data)
        return bad

    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10  # one bit in the payload
    with pytest.raises(IndexFileError, match="checksum mismatch"):
        HammingIndex.load(write(bytes(flipped)))
    with pytest.raises(IndexFileError, match="truncated"):
        HammingIndex.load(write(raw[:-100]))
    with pytest.raises(IndexFileError, match="truncated"):
        HammingIndex.load(write(raw[:10]))
    with pytest.raises(IndexFileError, match="trailing bytes"):
        HammingIndex.load(write(raw + b"\0"))
    with pytest.raises(IndexFileError, match="not a jv5fast index"):
        HammingIndex.load(write(b"PK\x03\x04" + raw[4:]))
    newer = bytearray(raw)
    newer[8] = 99
    with pytest.raises(IndexFileError, match="version 99"):
        HammingIndex.load(write(bytes(newer)))
    with pytest.raises(IndexFileError, match="holds a HammingIndex"):
        EmbeddingIndex.load(path)
    assert isinstance(IndexFileError("x"), ValueError)


# ----------------------------------------------------------------------------------------------
# sign packing


@pytest.mark.parametrize("dim", [1, 8, 13, 96, 1024])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_pack_signs_matches_packbits(backend, dim, dtype):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((17, dim)).astype(dtype)
    x[0, :] = 0.0
    x.flat[1::7] = -0.0
    x.flat[2::11] = np.nan
    x.flat[3::13] = np.inf
    x.flat[4::17] = -np.inf
    x.flat[5::19] = np.finfo(dtype).tiny  # smallest normal: positive
    got = _hamming.pack_signs(x)
    np.testing.assert_array_equal(got, np.packbits(x > 0, axis=-1))
    np.testing.assert_array_equal(got, jv5fast.quantize(x, "ubinary"))
    np.testing.assert_array_equal(_hamming.pack_signs(x[3]), np.packbits(x[3] > 0))


def test_pack_signs_torch_bf16():
    x = torch.randn(5, 40).to(torch.bfloat16)
    np.testing.assert_array_equal(_hamming.pack_signs(x), np.packbits(x.float().numpy() > 0, axis=-1))
    with pytest.raises(ValueError, match="floating point"):
        _hamming.pack_signs(np.zeros((2, 8), np.int32))


# ----------------------------------------------------------------------------------------------
# EmbeddingIndex


def _unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [32, 100, 256])
def test_rescore_exact_when_multiplier_covers_corpus(backend, dim):
    rng = np.random.default_rng(dim)
    docs, queries = _unit(rng, 400, dim), _unit(rng, 6, dim)
    index = EmbeddingIndex(dim)
    index.add(torch.from_numpy(docs[:150]))  # torch input, like Engine.embed(convert_to_tensor=True)
    index.add(docs[150:])
    S, I = index.search(queries, 10, rescore_multiplier=40)  # 10 * 40 >= 400: the whole corpus
    full = queries.astype(np.float64) @ docs.astype(np.float64).T
    Ir = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(S, np.take_along_axis(full, Ir, 1), rtol=1e-5, atol=1e-6)
    assert S.dtype == np.float32 and I.dtype == np.int64
    assert (np.diff(S, axis=1) <= 0).all()


def test_rescore_is_a_shortlist_of_hamming_neighbours(backend):
    rng = np.random.default_rng(8)
    docs, queries = _unit(rng, 500, 64), _unit(rng, 4, 64)
    index = EmbeddingIndex(64)
    index.add(docs)
    S, I = index.search(queries, 5, rescore_multiplier=2)
    _, short = ref_topk(np.packbits(queries > 0, -1), np.packbits(docs > 0, -1), 10)
    for row in range(4):
        assert set(I[row]) <= set(short[row])
        np.testing.assert_allclose(S[row], docs[I[row]] @ queries[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("store", ["float16", "int8"])
def test_low_precision_stores(store):
    rng = np.random.default_rng(9)
    docs = _unit(rng, 300, 128)
    queries = docs[:8] + 0.01 * rng.standard_normal((8, 128)).astype(np.float32)
    index = EmbeddingIndex(128, store=store)
    index.add(docs)
    S, I = index.search(queries, 3, rescore_multiplier=100)
    np.testing.assert_array_equal(I[:, 0], np.arange(8))
    np.testing.assert_allclose(S[:, 0], np.sum(docs[:8] * queries, 1), atol=2e-2)


def test_embedding_index_padding_save_load(tmp_path):
    rng = np.random.default_rng(10)
    docs = _unit(rng, 3, 24)
    index = EmbeddingIndex(24, store="int8")
    index.add(docs)
    S, I = index.search(docs[:1], 5)
    assert I[0, 0] == 0 and (I[0, 3:] == -1).all() and np.isneginf(S[0, 3:]).all()
    index.save(tmp_path / "e.jv5")
    loaded = EmbeddingIndex.load(tmp_path / "e.jv5")
    assert loaded.store == "int8" and len(loaded) == 3
    for a, b in zip(loaded.search(docs, 2), index.search(docs, 2)):
        np.testing.assert_array_equal(a, b)
    loaded.reset()
    assert len(loaded) == 0


def test_embedding_index_bad_input():
    for bad in (0, -1, 3.5):
        with pytest.raises(ValueError, match="dim"):
            EmbeddingIndex(bad)
    with pytest.raises(ValueError, match="store"):
        EmbeddingIndex(8, store="bfloat16")
    index = EmbeddingIndex(16)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.ones((1, 16), np.float32), 1)
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        index.add(np.ones((2, 15), np.float32))
    with pytest.raises(ValueError, match="float embeddings"):
        index.add(np.ones((2, 16), np.uint8))
    x = np.ones((3, 16), np.float32)
    x[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in row\(s\) \[1\]"):
        index.add(x)
    index.add(np.ones((3, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.search(x, 1)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.ones((1, 16), np.float32), 0)
    with pytest.raises(ValueError, match="rescore_multiplier"):
        index.search(np.ones((1, 16), np.float32), 1, rescore_multiplier=0)


def test_exports():
    assert jv5fast.HammingIndex is HammingIndex and jv5fast.EmbeddingIndex is EmbeddingIndex


def test_huge_k_and_empty_corpus(backend):
    """k far above N costs O(N) memory, not O(k) per heap; a raw search over no rows is all padding."""
    rng = np.random.default_rng(11)
    corpus = _codes(rng, 3, 8)
    D, I = _hamming.hamming_topk(corpus, corpus, 10**6, threads=2)
    assert D.shape == (3, 10**6) and (I[:, 3:] == -1).all() and (D[:, 3:] == INT32_MAX).all()
    np.testing.assert_array_equal(I[:, :3], ref_topk(corpus, corpus, 3)[1])
    D, I = _hamming.hamming_topk(corpus, corpus[:0], 4)
    assert (I == -1).all() and (D == INT32_MAX).all()


# ----------------------------------------------------------------------------------------------
# EmbeddingIndex.search rescoring in query blocks (bounded memory, identical results)


def _rescore_unchunked(index, queries, k, mult):
    """The rescoring as one (Q, S, dim) block (the pre-chunking code path): the bit-exact reference."""
    n = len(index)
    shortlist = min(k * mult, n)
    _, cand = ref_topk(np.packbits(queries > 0, -1), index.binary.codes, shortlist)
    vecs = index._vecs.data[cand].astype(np.float32)  # (Q, S, dim)
    scores = np.matmul(vecs, queries[:, :, None])[..., 0]
    if index.store == "int8":
        scores *= index._scales.data[cand, 0]
    order = np.lexsort((cand, -scores), axis=-1)[:, :k]
    S = np.full((len(queries), k), -np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    S[:, : order.shape[1]] = np.take_along_axis(scores, order, 1)
    I[:, : order.shape[1]] = np.take_along_axis(cand, order, 1)
    return S, I


@pytest.mark.parametrize("store", ["float32", "float16", "int8"])
def test_rescore_in_query_blocks_equals_one_block(store, monkeypatch):
    from jv5fast import index as index_mod

    rng = np.random.default_rng()
    dim = 53  # odd: sign codes with tail bits
    docs = rng.standard_normal((611, dim)).astype(np.float32)
    docs[300:310] = docs[7]  # equal rows: equal scores, ties by smaller id
    queries = np.concatenate([rng.standard_normal((36, dim)).astype(np.float32), docs[[7, 0]]])
    index = EmbeddingIndex(dim, store=store)
    index.add(docs)
    for k, mult in ((10, 4), (7, 3), (200, 4)):  # the last: shortlist = the whole corpus
        Sr, Ir = _rescore_unchunked(index, queries, k, mult)
        block = min(k * mult, len(docs)) * dim * 4  # bytes of one query's gathered float32 rows
        for budget in (1, block, 3 * block + 5, 7 * block, 10**9):  # blocks of 1, 1, 3, 7, all queries
            monkeypatch.setattr(index_mod.embedding, "_RESCORE_BUDGET_BYTES", budget)
            S, I = index.search(queries, k, rescore_multiplier=mult)
            np.testing.assert_array_equal(I, Ir, err_msg=f"{store} k={k} budget={budget}")
            np.testing.assert_array_equal(S, Sr, err_msg=f"{store} k={k} budget={budget}")
        if k >= 11:  # the query equal to row 7 ranks its 11 equal rows first, in id order
            assert I[-2, :11].tolist() == [7, *range(300, 310)]
        full = queries.astype(np.float64) @ docs.astype(np.float64).T  # sanity: close to exact float64 scores
        atol = {"float32": 1e-4, "float16": 0.05, "int8": 0.5}[store]  # int8: +-scale/2 per element, |x| ~ 3
        np.testing.assert_allclose(S, np.take_along_axis(full, I, 1), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("store", ["float32", "float16", "int8"])
def test_rescore_memory_does_not_grow_with_queries(store, monkeypatch):
    """tracemalloc sees numpy's buffers: the peak of a 2,000-query search is that of a 50-query one (both
    already several blocks), far below the (Q, S, dim) float32 block the unchunked code made."""
    import tracemalloc

    from jv5fast import index as index_mod

    rng = np.random.default_rng()
    dim, k, mult = 1024, 10, 4
    index = EmbeddingIndex(dim, store=store)
    index.add(rng.standard_normal((3000, dim)).astype(np.float32))
    budget = 4 << 20
    monkeypatch.setattr(index_mod.embedding, "_RESCORE_BUDGET_BYTES", budget)
    peaks = {}
    for nq in (50, 2000):
        queries = rng.standard_normal((nq, dim)).astype(np.float32)
        tracemalloc.start()
        index.search(queries, k, rescore_multiplier=mult)
        peaks[nq] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    full_block = 2000 * k * mult * dim * 4  # 328 MB
    # per-query arrays of the 2,000-query call (shortlist ids and distances, outputs) add ~1.2 MB
    assert peaks[2000] < peaks[50] + (2 << 20), peaks
    assert peaks[2000] < 3 * budget < full_block / 20, peaks


# ----------------------------------------------------------------------------------------------
# the device mirror of HammingIndex: a capacity buffer, not a concat per add()


def test_torch_rows_grow_geometrically():
    from jv5fast.index import _TorchRows

    rng = np.random.default_rng()
    rows = _TorchRows(3, torch.int32, "cpu")
    parts = [torch.from_numpy(rng.integers(-2**31, 2**31, (int(s), 3), dtype=np.int32))
             for s in rng.integers(0, 700, 400)]
    parts[5] = parts[5][:0]  # an empty append
    for p in parts:
        rows.append(p)
    expect = torch.cat(parts)
    n = expect.shape[0]
    assert torch.equal(rows.data, expect) and rows.n == n
    assert rows.reallocs <= int(np.ceil(np.log2(n / 1024))) + 1, (rows.reallocs, n)
    assert n <= rows.buf.shape[0] <= 2 * n  # at most 2x capacity
    assert rows.data.data_ptr() == rows.buf.data_ptr() and rows.data.is_contiguous()  # a view, no copy
    big = torch.ones((5 * rows.buf.shape[0], 3), dtype=torch.int32)  # one append larger than 2x capacity
    rows.append(big)
    assert torch.equal(rows.data, torch.cat([expect, big])) and rows.buf.shape[0] == n + big.shape[0]


@pytest.mark.skipif(not __import__("jv5fast.kernels.hamming", fromlist=["HAS_TRITON"]).HAS_TRITON,
                    reason="triton is not installed")
def test_hamming_index_device_mirror_many_adds(tmp_path):
    """The device branch of HammingIndex on a CPU torch device (Triton interpreted): many ragged add() calls
    cost O(log n) reallocations of the mirror, it equals the packed codes, and search, reset, to() and
    load() keep it consistent."""
    from jv5fast.kernels.hamming import pack_words

    rng = np.random.default_rng()
    nb = 5  # 40-bit codes: rows padded to 2 words
    corpus = _codes(rng, 0, nb)
    index = HammingIndex(8 * nb)._set_device(torch.device("cpu"))
    sizes = rng.integers(0, 40, 200)
    for s in sizes:
        part = _codes(rng, int(s), nb, levels=3)
        index.add(part)
        corpus = np.concatenate([corpus, part])
    n = len(corpus)
    assert index._dev_words.reallocs <= int(np.ceil(np.log2(n / 1024))) + 1
    assert torch.equal(index._dev_words.data, pack_words(torch.from_numpy(corpus)))
    queries = np.concatenate([_codes(rng, 3, nb, levels=3), corpus[[5]]])
    D, I = index.search(queries, 7)
    Dr, Ir = ref_topk(queries, corpus, 7)
    np.testing.assert_array_equal(D.numpy(), Dr)
    np.testing.assert_array_equal(I.numpy(), Ir)
    index.save(tmp_path / "m.jv5")
    loaded = HammingIndex.load(tmp_path / "m.jv5")._set_device(torch.device("cpu"))
    assert loaded._dev_words.buf.shape[0] == n  # an exact-size mirror, grown on the next add()
    np.testing.assert_array_equal(loaded.search(queries, 7)[1].numpy(), Ir)
    index.to("cpu")  # back to the C++ / numpy search: no mirror
    assert index.device is None and index._dev_words is None
    np.testing.assert_array_equal(index.search(queries, 7)[1], Ir)
    index._set_device(torch.device("cpu"))
    index.reset()
    assert index._dev_words.n == 0 and len(index) == 0
    index.add(corpus[:2])
    D, I = index.search(queries[:1], 3)
    assert I.tolist()[0][2] == -1 and D.tolist()[0][2] == INT32_MAX
    assert torch.equal(index._dev_words.data, pack_words(torch.from_numpy(corpus[:2])))


def test_device_index_keeps_the_2_31_limit():
    index = HammingIndex(8)
    index._rows.n = 2**31  # pretend: the check must run before anything touches the rows
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 codes .* 2147483648"):
        index._set_device(torch.device("cpu"))
    assert index.device is None
    index = HammingIndex(8)._set_device(torch.device("cpu"))
    index._rows.n = 2**31 - 1
    with pytest.raises(ValueError, match="at most 2"):
        index.add(np.zeros((1, 1), np.uint8))


def test_float16_store_refuses_values_it_cannot_hold():
    index = EmbeddingIndex(4, store="float16")
    x = np.ones((3, 4), np.float32)
    x[2, 1] = 70000.0  # float16 holds |x| < 65520; this would be stored as inf
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] exceed the float16 range"):
        index.add(x)
    assert len(index) == 0
    x[2, 1] = 65504.0
    index.add(x)
    assert np.isfinite(index._vecs.data).all()


@pytest.mark.parametrize("store", ["float32", "int8"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_failed_add_keeps_codes_vectors_and_scales_aligned(store, with_ids, monkeypatch):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((50, 40)).astype(np.float32)
    ids = rng.permutation(10**6)[:50] if with_ids else [None] * 50
    kw = (lambda a, b: {"ids": ids[a:b], "texts": [f"t{i}" for i in range(a, b)]}) if with_ids else \
        (lambda a, b: {})
    index = EmbeddingIndex(40, store=store)
    index.add(x[:30], **kw(0, 30))
    want = index.search(x[:5], 3)

    def full(*a, **k):
        raise MemoryError("simulated")
    monkeypatch.setattr(index.binary, "_add_codes", full)  # the codes' append, after vectors and ids
    with pytest.raises(MemoryError):
        index.add(x[30:], **kw(30, 50))
    monkeypatch.undo()
    assert len(index) == index._vecs.n == 30 and (store != "int8" or index._scales.n == 30)
    if with_ids:
        assert len(index.ids) == len(index.texts) == 30
    for got, exp in zip(index.search(x[:5], 3), want):
        np.testing.assert_array_equal(got, exp)
    other = 3.0 * rng.standard_normal((20, 40)).astype(np.float32)
    index.add(other, **kw(30, 50))  # and the index goes on as if the failed call never happened (same ids)
    ref = EmbeddingIndex(40, store=store)
    ref.add(np.concatenate([x[:30], other]), **kw(0, 50))
    for got, exp in zip(index.search(x[:7], 4), ref.search(x[:7], 4)):
        np.testing.assert_array_equal(got, exp)
    if with_ids:
        np.testing.assert_array_equal(index.ids, ids)
        assert list(index.texts) == list(ref.texts)


def test_shortlists_are_found_in_query_blocks(monkeypatch):
    """The (Q, shortlist) candidate ids are bounded too: binary search runs on blocks of queries."""
    from jv5fast import index as index_mod
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    q = rng.standard_normal((2500, 24)).astype(np.float32)
    index = EmbeddingIndex(24)
    index.add(x)
    want = index.search(q, 5)
    sizes = []
    search = index.binary.search
    monkeypatch.setattr(index.binary, "search", lambda qq, k, threads=None: sizes.append(len(qq)) or search(qq, k, threads))
    # shortlist 20 x dim 24: rescoring blocks of 240000 // 1920 = 125 queries, shortlists for 1000 at a time
    monkeypatch.setattr(index_mod.embedding, "_RESCORE_BUDGET_BYTES", 240000)
    got = index.search(q, 5)
    assert sizes == [1000, 1000, 500]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ----------------------------------------------------------------------------------------------
# external ids, metadata, texts


@pytest.mark.parametrize("kind", ["int64", "str"])
def test_external_ids_texts_metadata_roundtrip(kind, tmp_path):
    rng = np.random.default_rng()
    n, dim = 97, 37
    x = rng.standard_normal((n, dim)).astype(np.float32)
    raw = rng.choice(10**15, n, replace=False) - 10**14
    ids = raw if kind == "int64" else [f"id-{v}-é\u2028" for v in raw]  # non-ASCII, odd separators
    texts = ["" if i % 7 == 0 else f"text {i} ✓ " * (i % 5) for i in range(n)]
    meta = {"model": "/m", "task": "retrieval", "truncate_dim": None, "nested": {"a": [1, 2.5, None]}}
    index = EmbeddingIndex(dim, store="int8", metadata=meta)
    index.add(x[:40], ids=ids[:40], texts=texts[:40])
    index.add(x[40:], ids=ids[40:], texts=texts[40:])
    q = rng.standard_normal((5, dim)).astype(np.float32)
    _S, I = index.search(q, n + 4, rescore_multiplier=2)
    got = index.map_ids(I)
    want = [[ids[i] if i >= 0 else (-1 if kind == "int64" else None) for i in row] for row in I]
    assert got.tolist() == [[v.item() if hasattr(v, "item") else v for v in r] for r in want]
    assert list(index.ids) == list(ids) and list(index.texts) == texts
    with pytest.raises(ValueError):
        index.ids[0] = ids[1]  # read-only
    index.save(tmp_path / "e.jv5")
    loaded = EmbeddingIndex.load(tmp_path / "e.jv5")
    assert loaded.metadata == meta and list(loaded.ids) == list(ids) and list(loaded.texts) == texts
    for a, b in zip(loaded.search(q, 9), index.search(q, 9)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"duplicate id .*: ids\[0\] is already the id of row 5"):
        loaded.add(x[:1], ids=[ids[5]], texts=["x"])  # the loaded ids still guard against duplicates
    h = HammingIndex(40, metadata={"k": 1})
    h.add(jv5fast.quantize(x[:, :37], "ubinary")[:, :5], ids=ids)
    h.save(tmp_path / "h.jv5")
    hl = HammingIndex.load(tmp_path / "h.jv5")
    assert hl.metadata == {"k": 1} and list(hl.ids) == list(ids)
    np.testing.assert_array_equal(hl.map_ids(hl.search(hl.codes[:3], 4)[1]), h.map_ids(h.search(h.codes[:3], 4)[1]))


def test_ids_all_or_nothing_and_refusals():
    rng = np.random.default_rng()
    c = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    h = HammingIndex(24)
    h.add(c)
    with pytest.raises(ValueError, match="holds 5 rows added without ids"):
        h.add(c, ids=[1, 2, 3, 4, 5])
    assert h.map_ids(np.array([[4, -1]])).tolist() == [[4, -1]] and h.ids is None
    h = HammingIndex(24)
    h.add(c, ids=[10, 11, 12, 13, 14])
    cases = [
        ({"ids": None}, "pass ids= with every add"),
        ({"ids": ["a", "b", "c", "d", "e"]}, "this index's ids are int64; got str"),
        ({"ids": [20, 21, 12, 23, 24]}, r"duplicate id 12: ids\[2\] is already the id of row 2"),
        ({"ids": [20, 21, 22, 21, 24]}, r"duplicate id 21: ids\[1\] and ids\[3\]"),
        ({"ids": [20, 21, 22]}, "ids has 3 entries for 5 rows"),
        ({"ids": [20, 21, True, 23, 24]}, r"ids\[2\] = True is a bool"),
        ({"ids": [20, 21, 2.5, 23, 24]}, r"ids\[2\] = 2.5 is a float"),
        ({"ids": [20, 21, 22, 23, 2**63]}, r"ids\[4\] = 9223372036854775808 does not fit in int64"),
        ({"ids": "abcde"}, "one id .* per row, got str"),
        ({"ids": np.zeros((5, 1), np.int64)}, "must be 1-D"),
        ({"ids": np.arange(5.0) + 30}, "dtype float64"),
    ]
    for kw, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            h.add(c, **kw)
        assert len(h) == 5 and h.ids.tolist() == [10, 11, 12, 13, 14]  # nothing was added
    with pytest.raises(ValueError, match=r"ids\[1\] = 7 is a int; ids must all be str"):
        HammingIndex(24).add(c[:2], ids=["a", 7])
    with pytest.raises(ValueError, match=r"row position 5 is out of range .* \(valid: -1..4\)"):
        h.map_ids([[0, 5]])
    e = EmbeddingIndex(8)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    e.add(x, texts=["a", "b", "c"])
    with pytest.raises(ValueError, match="stores texts; pass texts= with every add"):
        e.add(x)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        e.add(x, texts=["a", 1, "c"])
    assert len(e) == 3 and e._vecs.n == 3
    with pytest.raises(TypeError, match="metadata must be a dict"):
        EmbeddingIndex(8, metadata=[1])
    with pytest.raises(ValueError, match="JSON-serializable"):
        EmbeddingIndex(8, metadata={"x": float("nan")})
    e.metadata["bad"] = object()  # changed in place after construction: caught by save
    with pytest.raises(ValueError, match="JSON-serializable"):
        e.save("/nonexistent/never-written.jv5")
    e.reset()
    e.add(x[:1], ids=["z"])  # an emptied index may start over with ids
    assert e.ids.tolist() == ["z"] and e.texts is None


def test_failed_save_leaves_previous_file(tmp_path, monkeypatch):
    index = HammingIndex(16)
    index.add(np.arange(6, dtype=np.uint8).reshape(3, 2), ids=["a", "b", "c"])
    path = tmp_path / "h.jv5"
    index.save(path)
    before = path.read_bytes()
    index.add(np.ones((1, 2), np.uint8), ids=["d"])
    real = np.ascontiguousarray

    def boom(a, *args, **kw):
        if a.dtype == np.uint8 and a.shape[1:] == (1,):  # the id bytes: after the header and codes were written
            raise OSError(28, "No space left on device")
        return real(a, *args, **kw)
    monkeypatch.setattr(np, "ascontiguousarray", boom)
    with pytest.raises(OSError, match="No space left"):
        index.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["h.jv5"]
    assert HammingIndex.load(path).ids.tolist() == ["a", "b", "c"]


def test_import_jv5fast_loads_neither_faiss_nor_pyarrow():
    code = ("import sys, jv5fast; jv5fast.HammingIndex; from jv5fast import cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'pyarrow', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# embed-corpus output (manifest.json + Parquet parts), written here with pyarrow as the spec says


def write_corpus(folder, parts, precision="float32", dim=None, id_type="int64", settings=None, manifest=None):
    """An embed-corpus output folder: ``parts`` is a list of (ids, embeddings) with embeddings float (n, dim)
    (stored as precision says) -> DIR/part-0000i.parquet + DIR/manifest.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    dim = dim or parts[0][1].shape[1]
    s = {"model": "/models/nano", "task": "retrieval", "prompt_name": "document", "prompt": None,
         "truncate_dim": None, "dim": dim, "precision": precision, "normalize": True, "id_column": "id",
         "text_column": "text"}
    s.update(settings or {})
    entries = []
    for i, (ids, x) in enumerate(parts):
        if precision in ("float32", "float16"):
            flat = pa.array(x.astype(precision).reshape(-1), type=pa.float32() if precision == "float32"
                            else pa.float16())
            emb = pa.FixedSizeListArray.from_arrays(flat, dim)
        else:
            codes = jv5fast.quantize(x, precision)
            w = codes.shape[1]
            emb = pa.array([bytes(r) for r in codes.view(np.uint8)], type=pa.binary(w))
        idarr = pa.array(list(ids), type=pa.int64() if id_type == "int64" else pa.string())
        table = pa.table({"id": idarr, "embedding": emb}).replace_schema_metadata({b"jv5fast": json.dumps(s)})
        name = f"part-{i:05d}.parquet"
        pq.write_table(table, folder / name, row_group_size=17)
        entries.append({"file": name, "rows": len(ids), "input": f"in-{i}.jsonl"})
    m = {"format": "jv5fast-embed-corpus", "version": 1, "settings": s, "parts": entries}
    if manifest:
        manifest(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder



def _corpus(rng, sizes=(1, 50, 46), dim=37, str_ids=False):
    x = rng.standard_normal((sum(sizes), dim)).astype(np.float32)
    ids = rng.choice(10**12, len(x), replace=False)
    ids = [f"doc/{v}" for v in ids] if str_ids else ids
    cuts = np.cumsum((0,) + sizes)
    return x, ids, [(ids[a:b], x[a:b]) for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("precision,str_ids", [("float32", False), ("float16", True), ("ubinary", True),
                                               ("binary", False)])
def test_from_parquet_matches_the_vectors(tmp_path, precision, str_ids):
    rng = np.random.default_rng()
    x, ids, parts = _corpus(rng, str_ids=str_ids)
    d = write_corpus(tmp_path / "out", parts, precision, id_type="str" if str_ids else "int64")
    (d / "part-00099.parquet.tmp").write_bytes(b"a leftover, not listed: ignored")
    h = HammingIndex.from_parquet(d)
    assert h.nbits == 40 and h.metadata["precision"] == precision and h.metadata["dim"] == 37
    np.testing.assert_array_equal(h.codes, np.packbits(x.astype(precision if precision.startswith("f")
                                                                else np.float32) > 0, axis=1))
    assert list(h.ids) == list(ids)
    if precision.startswith("f"):
        e = EmbeddingIndex.from_parquet(d, store="float32")
        want = x.astype(precision).astype(np.float32)
        np.testing.assert_array_equal(e.vectors(), want)
        q = rng.standard_normal((3, 37)).astype(np.float32)
        S, _I = e.search(q, 7, rescore_multiplier=20)  # shortlist 140 >= 97 rows: exact
        ref = want @ q.T
        for qi in range(3):
            np.testing.assert_allclose(S[qi], np.sort(ref[:, qi])[::-1][:7], rtol=1e-5)
        assert e.metadata == h.metadata and list(e.ids) == list(ids)
    else:
        with pytest.raises(ValueError, match=f"needs float embeddings, .* precision '{precision}'.*HammingIndex"):
            EmbeddingIndex.from_parquet(d)


@pytest.mark.parametrize("case,match", [
    ("dotdot", r"parts\[1\].file must be a plain file name inside"),
    ("absolute", r"parts\[1\].file must be a plain file name"),
    ("subfolder", r"parts\[1\].file must be a plain file name"),
    ("link-outside", r"parts\[1\].file 'part-00001.parquet' is a link to .*, outside"),
    ("missing", r"parts\[1\].file 'gone.parquet' does not exist"),
    ("rows", "part-00001.parquet: holds 50 rows, but manifest.json says 51"),
    ("dup-id", r"part-00002.parquet rows 0..45: duplicate id 42: ids\[0\] is already the id of row 1"),
    ("settings", r"part-00000.parquet: its settings differ from manifest.json's \(dim: 37 vs 36"),
    ("format", "'format' must be 'jv5fast-embed-corpus'"),
    ("task-type", "settings.task must be str, got 7"),
    ("precision", "settings.precision must be one of"),
    ("listed-twice", "is listed twice"),
])
def test_from_parquet_refuses_bad_folders(tmp_path, case, match):
    rng = np.random.default_rng()
    _x, _ids, parts = _corpus(rng)
    if case == "dup-id":
        parts[1][0][0] = parts[2][0][0] = 42

    def edit(m):
        p = m["parts"][1]
        if case == "dotdot":
            p["file"] = "../part-00001.parquet"
        elif case == "absolute":
            p["file"] = str(tmp_path / "out" / "part-00001.parquet")
        elif case == "subfolder":
            p["file"] = "sub/part-00001.parquet"
        elif case == "missing":
            p["file"] = "gone.parquet"
        elif case == "rows":
            p["rows"] = 51
        elif case == "settings":
            m["settings"]["dim"] = 36
        elif case == "format":
            m["format"] = "something-else"
        elif case == "task-type":
            m["settings"]["task"] = 7
        elif case == "precision":
            m["settings"]["precision"] = "int4"
        elif case == "listed-twice":
            m["parts"][2]["file"] = p["file"]
    d = write_corpus(tmp_path / "out", parts, manifest=edit)
    if case == "link-outside":
        outside = tmp_path / "elsewhere.parquet"
        (d / "part-00001.parquet").rename(outside)
        (d / "part-00001.parquet").symlink_to(outside)
    for cls in (HammingIndex, EmbeddingIndex):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            cls.from_parquet(d)


# ----------------------------------------------------------------------------------------------
# review fixes: reserved id -1, empty adds, exclusive temp file, manifest bounds, docstring


def test_id_minus_one_is_refused_other_negative_ids_are_kept(tmp_path):
    """-1 is faiss's (and map_ids') 'no result': a row with id -1 could not be told from padding."""
    c = np.arange(6, dtype=np.uint8).reshape(3, 2)
    for ids in ([4, -1, 7], np.array([4, -1, 7]), np.array([4, -1, 7], np.int32)):
        h = HammingIndex(16)
        with pytest.raises(ValueError, match=r"ids\[1\] = -1 is reserved: map_ids\(\) returns -1 for 'no result'"):
            h.add(c, ids=ids)
        assert len(h) == 0 and h.ids is None
    e = EmbeddingIndex(8)
    with pytest.raises(ValueError, match=r"ids\[0\] = -1 is reserved"):
        e.add(np.ones((1, 8), np.float32), ids=[-1])
    h = HammingIndex(16)
    h.add(c, ids=[-2, -(2**63), 0])
    I = np.array([[0, 1, 2, -1]])
    assert h.map_ids(I).tolist() == [[-2, -(2**63), 0, -1]]


@pytest.mark.parametrize("empty", [{"ids": np.array([], np.int64)}, {"ids": []}, {"texts": []},
                                   {"ids": np.array([], np.int64), "texts": []}])
def test_empty_add_does_not_lock_ids_or_texts(empty, tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 8)).astype(np.float32)
    e = EmbeddingIndex(8)
    e.add(x[:0], **empty)
    e.add(x[:2])  # no rows yet: free to add without ids or texts
    assert len(e) == 2 and e.ids is None and e.texts is None
    e.add(x[2:])
    h = HammingIndex(16)
    h.add(np.zeros((0, 2), np.uint8), ids=np.array([], np.int64))
    h.add(np.ones((3, 2), np.uint8))
    assert h.ids is None and len(h) == 3
    # an empty index saved with ids does not lock the loaded one either
    z = EmbeddingIndex(8)
    z.add(x[:1], ids=["a"], texts=["t"])
    z.reset()
    z.add(x[:0], ids=[], texts=[])
    z.save(tmp_path / "z.jv5")
    loaded = EmbeddingIndex.load(tmp_path / "z.jv5")
    loaded.add(x[:2])
    assert loaded.ids is None and len(loaded) == 2
    # and an index that has rows keeps its rule
    w = EmbeddingIndex(8)
    w.add(x[:1], ids=[1], texts=["t"])
    w.add(x[:0])  # nothing to add: fine either way
    with pytest.raises(ValueError, match="pass ids= with every add"):
        w.add(x[1:2])


def test_save_creates_its_temp_file_exclusively(tmp_path):
    """save() never truncates or deletes a file it did not create (the old temp name was path.tmp<pid>)."""
    import os
    index = HammingIndex(16)
    index.add(np.ones((2, 2), np.uint8))
    path = tmp_path / "h.jv5"
    squatter = tmp_path / f"h.jv5.tmp{os.getpid()}"
    squatter.write_bytes(b"someone else's file")
    index.save(path)
    assert squatter.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jv5", squatter.name]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it, not mkstemp's 0600
    os.chmod(path, 0o640)
    index.save(path)  # a re-save keeps the file's permissions
    assert os.stat(path).st_mode & 0o777 == 0o640 and len(HammingIndex.load(path)) == 2
    with pytest.raises(FileNotFoundError):
        index.save(tmp_path / "no-such-folder" / "h.jv5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jv5", squatter.name]


@pytest.mark.parametrize("case", ["link-outside", "too-big"])
def test_from_parquet_manifest_is_bounded_and_inside_the_folder(tmp_path, case, monkeypatch):
    import jv5fast.index as index_mod
    rng = np.random.default_rng()
    _x, _ids, parts = _corpus(rng)
    d = write_corpus(tmp_path / "out", parts)
    if case == "link-outside":
        outside = tmp_path / "elsewhere.json"
        (d / "manifest.json").rename(outside)
        (d / "manifest.json").symlink_to(outside)
        match = r"manifest.json is a link to .*elsewhere.json, outside"
    else:
        size = (d / "manifest.json").stat().st_size
        monkeypatch.setattr(index_mod.parquet_interop, "_MAX_MANIFEST_BYTES", size - 1)
        match = "manifest.json is over the .* limit of a manifest"
    for cls in (HammingIndex, EmbeddingIndex):
        with pytest.raises(ValueError, match=match):
            cls.from_parquet(d)
    if case == "too-big":
        monkeypatch.setattr(index_mod.parquet_interop, "_MAX_MANIFEST_BYTES", size)
        assert len(HammingIndex.from_parquet(d)) == 97


def test_module_docstring_names_only_methods_that_exist():
    import re

    import jv5fast.index as index_mod
    doc = index_mod.__doc__
    for cls, name in re.findall(r"``(HammingIndex|EmbeddingIndex)\.(\w+)``", doc):
        assert hasattr(getattr(index_mod, cls), name), f"{cls}.{name}"
    assert not hasattr(EmbeddingIndex, "from_faiss") and "EmbeddingIndex has no from_faiss" in doc
    assert "``from_faiss``" not in doc and "``to_faiss``" not in doc  # each named with its class, not 'both'
