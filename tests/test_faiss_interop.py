"""HammingIndex / EmbeddingIndex <-> faiss: an exported index searched by faiss itself gives the same (D, I)
as jv5fast's search (ties, k > N padding, external ids), round trips keep codes and ids, and faiss indexes
jv5fast cannot take are refused by name. Fresh random data, odd widths and sizes."""
import numpy as np
import pytest

from jv5fast.index import EmbeddingIndex, HammingIndex

faiss = pytest.importorskip("faiss")


def _codes(rng, n, nbytes, levels):
    # few levels per byte: many equal distances, so the tie order (smaller row first) is exercised
    return (rng.integers(0, levels, (n, nbytes)) * (255 // max(levels - 1, 1))).astype(np.uint8)


@pytest.mark.parametrize("nbits", [8, 136, 1024])
@pytest.mark.parametrize("n", [1, 97, 1000])
@pytest.mark.parametrize("ids", [None, "int64"])
def test_hamming_to_faiss_searches_identically(nbits, n, ids):
    rng = np.random.default_rng()
    codes = _codes(rng, n, nbits // 8, levels=2 if nbits > 8 else 256)
    index = HammingIndex(nbits)
    ext = rng.choice(10**12, n, replace=False) - 5 * 10**11 if ids else None  # negative ids too
    index.add(codes, ids=ext)
    exported = index.to_faiss()
    assert type(exported) is (faiss.IndexBinaryIDMap if ids else faiss.IndexBinaryFlat)
    assert exported.ntotal == n and exported.d == nbits
    queries = np.concatenate([codes[rng.integers(0, n, 4)], _codes(rng, 3, nbits // 8, 256)])  # 7 queries
    for k in (1, 5, n + 3):
        D, I = index.search(queries, k)
        fD, fI = exported.search(queries, k)
        np.testing.assert_array_equal(D, fD)
        np.testing.assert_array_equal(index.map_ids(I), fI)  # the ids faiss returns, -1 padding included
        if ids is None:
            np.testing.assert_array_equal(I, fI)
    # the round trip: same codes, same ids, same results
    back = HammingIndex.from_faiss(exported)
    np.testing.assert_array_equal(back.codes, index.codes)
    if ids:
        np.testing.assert_array_equal(back.ids, ext)
    else:
        assert back.ids is None
    for a, b in zip(back.search(queries, 9), index.search(queries, 9)):
        np.testing.assert_array_equal(a, b)


def test_from_faiss_built_by_faiss():
    """An index faiss itself filled (IDMap2 with add_with_ids in two calls) searches the same here."""
    rng = np.random.default_rng()
    codes = _codes(rng, 301, 17, 256)
    ids = rng.choice(10**9, 301, replace=False)
    f = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(136))
    f.add_with_ids(codes[:200], ids[:200])
    f.add_with_ids(codes[200:], ids[200:])
    index = HammingIndex.from_faiss(f)
    np.testing.assert_array_equal(index.ids, ids)
    q = _codes(rng, 11, 17, 256)
    D, I = index.search(q, 13)
    fD, fI = f.search(q, 13)
    np.testing.assert_array_equal(D, fD)
    np.testing.assert_array_equal(index.map_ids(I), fI)
    empty = HammingIndex.from_faiss(faiss.IndexBinaryFlat(24))
    assert (empty.nbits, len(empty)) == (24, 0)


def test_from_faiss_refuses_what_it_cannot_take():
    with pytest.raises(TypeError, match="IndexBinaryFlat or an IndexBinaryIDMap .* got .*IndexBinaryHNSW"):
        HammingIndex.from_faiss(faiss.IndexBinaryHNSW(64, 8))
    with pytest.raises(TypeError, match=r"got .*IndexFlatIP \(a float index"):
        HammingIndex.from_faiss(faiss.IndexFlatIP(16))
    with pytest.raises(TypeError, match="got builtins.dict"):
        HammingIndex.from_faiss({})
    with pytest.raises(TypeError, match="wraps a IndexBinaryHNSW"):
        HammingIndex.from_faiss(faiss.IndexBinaryIDMap(faiss.IndexBinaryHNSW(64, 8)))
    dup = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(16))
    dup.add_with_ids(np.zeros((3, 2), np.uint8), np.array([7, 8, 7], np.int64))
    with pytest.raises(ValueError, match=r"duplicate id 7: ids\[0\] and ids\[2\]"):
        HammingIndex.from_faiss(dup)


def test_str_ids_export_the_flat_index():
    rng = np.random.default_rng()
    codes = _codes(rng, 41, 5, 256)
    index = HammingIndex(40)
    index.add(codes, ids=[f"doc-{i}" for i in range(41)])
    f = index.to_faiss()
    assert type(f) is faiss.IndexBinaryFlat
    _D, I = index.search(codes[:3], 50)
    _fD, fI = f.search(codes[:3], 50)
    np.testing.assert_array_equal(I, fI)
    got = index.map_ids(fI)
    assert got[0, 0] == "doc-0" and got[0, -1] is None and got.shape == (3, 50)


@pytest.mark.parametrize("store", ["float32", "float16", "int8"])
@pytest.mark.parametrize("dim,n", [(13, 1), (64, 97), (200, 257)])
def test_embedding_to_faiss_is_exact_inner_product(store, dim, n):
    rng = np.random.default_rng()
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(10**6, n, replace=False)
    for with_ids in (False, True):
        index = EmbeddingIndex(dim, store=store)
        index.add(x, ids=ids if with_ids else None)
        f = index.to_faiss()
        assert type(f) is (faiss.IndexIDMap if with_ids else faiss.IndexFlatIP)
        flat = faiss.downcast_index(f.index) if with_ids else f
        stored = flat.reconstruct_n(0, n)
        np.testing.assert_array_equal(stored, index.vectors())  # dequantized, bit for bit
        if store == "float32":
            np.testing.assert_array_equal(stored, x)
        q = rng.standard_normal((5, dim)).astype(np.float32)
        k = n + 2  # padding past the end: -1 in both
        S, I = index.search(q, k, rescore_multiplier=1)  # shortlist k >= n: exact
        fS, fI = f.search(q, k)
        valid = I >= 0
        np.testing.assert_array_equal(valid, fI >= 0)
        np.testing.assert_allclose(S[valid], fS[valid], rtol=1e-5, atol=1e-5)
        mapped = index.map_ids(I)
        ref = stored @ q.T  # (n, Q) float32 brute force; a rank may swap only between near-equal scores
        for qi in range(5):
            for r in np.flatnonzero(mapped[qi] != fI[qi]):
                a, b = (np.flatnonzero((ids if with_ids else np.arange(n)) == v)[0] for v in (mapped[qi, r], fI[qi, r]))
                assert abs(ref[a, qi] - ref[b, qi]) < 1e-5
