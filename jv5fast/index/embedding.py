"""EmbeddingIndex: a binary shortlist, then float rescoring, as sentence-transformers' ``semantic_search_faiss``.

``add`` keeps the sign codes (a ``HammingIndex``, which also holds the ids) and the vectors in float32,
float16 or int8 (per-row absmax scale). ``search`` takes the ``k * rescore_multiplier`` nearest codes by
Hamming distance and re-ranks them by dot product with the float query; the multiplier trades speed for
recall. Rescoring runs a block of queries at a time, so its working memory stays near
``_RESCORE_BUDGET_BYTES`` whatever the number of queries; the price is a Python loop over the blocks.
"""
from __future__ import annotations

import numpy as np

from .. import _hamming
from . import faiss_interop, parquet_interop
from .format import _MAX_BITS, _STORES, _check_metadata, _load, _save, _strings_arrays
from .hamming import HammingIndex
from .rows import _Ids, _Rows, _WithMetadata, _as_float, _check_texts, _ids_arrays

_RESCORE_BUDGET_BYTES = 64 << 20  # EmbeddingIndex.search: its float32 (queries, shortlist, dim) block


class EmbeddingIndex(_WithMetadata):
    """Binary shortlist + float rescoring over float embeddings (e.g. ``Engine.embed`` output).

    ``add`` stores sign codes (np.packbits(x > 0)) and the vectors in ``store`` precision: float32,
    float16, or int8 (per-row absmax scale). ``search(q, k, rescore_multiplier=4)`` takes the
    ``k * rescore_multiplier`` nearest codes by Hamming distance and returns the k best of them by dot
    product with the float query: (scores float32 (Q, k) descending, ids int64 (Q, k)), ties by smaller
    id; k > N pads with (-inf, -1). With unit-norm embeddings the score is the cosine similarity.

    ``add(x, ids=None, texts=None)``: external ids as in ``HammingIndex`` (``ids``, ``map_ids(I)``), and
    optionally each row's text (or its start) for display (``texts``); ``metadata`` is saved with it.
    """

    def __init__(self, dim: int, store: str = "float32", device="cpu", metadata=None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < dim <= _MAX_BITS:
            raise ValueError(f"dim must be a positive integer up to 2**24, got {dim!r}")
        if store not in _STORES:
            raise ValueError(f"store must be one of {_STORES}, got {store!r}")
        self.dim = int(dim)
        self.store = store
        self.binary = HammingIndex(8 * ((self.dim + 7) // 8), device=device)  # tail bits are zero on both sides
        self._vecs = _Rows(self.dim, {"float32": np.float32, "float16": np.float16, "int8": np.int8}[store])
        self._scales = _Rows(1, np.float32)  # int8 store only
        self._texts = None  # list of str when texts are stored
        self._texts_array = None
        self.metadata = metadata

    @property
    def ids(self):
        """None (positional ids), or the external ids row by row (read-only int64 or object array of str)."""
        return self.binary.ids

    def map_ids(self, I):
        """Row positions from ``search`` -> external ids (see ``HammingIndex.map_ids``)."""
        return self.binary.map_ids(I)

    @property
    def texts(self):
        """None, or the stored texts row by row (a read-only object array of str)."""
        if self._texts is None:
            return None
        if self._texts_array is None:
            a = np.empty(len(self._texts), dtype=object)
            a[:] = self._texts
            a.flags.writeable = False
            self._texts_array = a
        return self._texts_array

    def __len__(self) -> int:
        return len(self.binary)

    @property
    def ntotal(self) -> int:
        return len(self.binary)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(dim={self.dim}, store={self.store!r}, ntotal={self.ntotal})"

    def add(self, embeddings, ids=None, texts=None) -> None:
        """Append float embeddings (n, dim), numpy or torch (any float dtype); NaN/inf is an error. ``ids``
        and ``texts`` (one per row) must be given with every add or with none. All or nothing."""
        x = _as_float(embeddings, self.dim, "embeddings")
        n = x.shape[0]
        checked_ids = self.binary._check_ids(ids, n)
        if texts is None:
            if self._texts is not None and n and self.ntotal:
                raise ValueError(f"this index stores texts; pass texts= with every add() (got none for these "
                                 f"{n} rows)")
        else:
            texts = _check_texts(texts, n)
            if self._texts is None and self.ntotal:
                raise ValueError(f"this index holds {self.ntotal} rows added without texts; texts must be "
                                 "given with every add() or with none")
        codes = _hamming.pack_signs(x)
        if self.store == "int8":
            scale = np.abs(x).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            vecs = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        elif self.store == "float16":
            with np.errstate(over="ignore"):
                vecs = x.astype(np.float16)
            finite = np.isfinite(vecs).all(axis=1)
            if not finite.all():  # |x| >= 65520 would be stored as inf and score as inf or NaN
                bad = np.flatnonzero(~finite)
                rows = f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}"
                raise ValueError(f"embeddings in row(s) {rows} exceed the float16 range (|x| < 65520) of "
                                 "store='float16'; use store='float32'")
        else:
            vecs = x
        # All or nothing: the float rows go first (rolled back if anything after fails), so codes, vectors
        # and scales always stay row-aligned.
        n0 = self._vecs.n
        try:
            self._vecs.append(vecs)
            if self.store == "int8":
                self._scales.append(scale.astype(np.float32))
            self.binary._add(codes, checked_ids)
        except BaseException:
            self._vecs.n = n0
            if self.store == "int8":
                self._scales.n = n0
            raise
        if not n0 and n:  # the first rows decide whether the index stores texts
            self._texts = [] if texts is not None else None
            self._texts_array = None
        if texts is not None and n:
            self._texts.extend(texts)
            self._texts_array = None

    def reset(self) -> None:
        """Remove every row (vectors, ids, texts); metadata stays."""
        self.binary.reset()
        self._vecs = _Rows(self.dim, self._vecs.buf.dtype)
        self._scales = _Rows(1, np.float32)
        self._texts = self._texts_array = None

    def vectors(self) -> np.ndarray:
        """The stored vectors as float32 (N, dim): float16 widened exactly, int8 times its row scale."""
        v = self._vecs.data.astype(np.float32)
        if self.store == "int8":
            v *= self._scales.data
        return v

    def search(self, queries, k: int, rescore_multiplier: int = 4, threads: int | None = None):
        """k best rows per query -> (scores float32 (Q, k) descending, ids int64 (Q, k)).

        Rescoring gathers the shortlisted rows a block of queries at a time, so its working memory stays
        near 64 MiB (``_RESCORE_BUDGET_BYTES``) whatever the number of queries.
        """
        k = _hamming.check_k(k)
        if isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, (int, np.integer)) \
                or rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be an integer >= 1, got {rescore_multiplier!r}")
        q = _as_float(queries, self.dim, "queries")
        n = self.ntotal
        if n == 0:
            raise ValueError("the index is empty: add() embeddings before search()")
        shortlist = min(k * int(rescore_multiplier), n)
        nq = q.shape[0]
        S = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        # Rescore a block of queries at a time: the gathered (rows, S, dim) float32 block stays near
        # _RESCORE_BUDGET_BYTES whatever the number of queries. Each query's scores come from the same
        # per-query matmul as an unchunked call, so the results do not depend on the block size. The
        # shortlists themselves are found for at most max(rows, 1024) queries at a time.
        rows = max(1, _RESCORE_BUDGET_BYTES // (shortlist * self.dim * 4))
        outer = max(rows, min(1024, max(1, _RESCORE_BUDGET_BYTES // (shortlist * 12))))  # ids + distances
        for b0 in range(0, nq, outer):
            self._rescore(q[b0 : b0 + outer], k, shortlist, rows, threads, S[b0 : b0 + outer], I[b0 : b0 + outer])
        return S, I

    def _rescore(self, q, k, shortlist, rows, threads, S, I):
        """Shortlist ``q``'s rows by Hamming distance, then write the k best by dot product into S, I."""
        _, cand = self.binary.search(_hamming.pack_signs(q), shortlist, threads=threads)
        if not isinstance(cand, np.ndarray):  # CUDA index: torch tensors
            cand = cand.cpu().numpy()
        for q0 in range(0, q.shape[0], rows):
            c = cand[q0 : q0 + rows]
            vecs = self._vecs.data[c].astype(np.float32, copy=False)  # (rows, S, dim)
            scores = np.matmul(vecs, q[q0 : q0 + rows, :, None])[..., 0]  # (rows, S)
            del vecs
            if self.store == "int8":
                scores *= self._scales.data[c, 0]
            # Descending score, ties by smaller id; lexsort's last key is the primary one.
            order = np.lexsort((c, -scores), axis=-1)[:, :k]
            m = order.shape[1]
            S[q0 : q0 + rows, :m] = np.take_along_axis(scores, order, 1)
            I[q0 : q0 + rows, :m] = np.take_along_axis(c, order, 1)

    def save(self, path) -> None:
        """Write the index (codes, vectors, ids, texts, metadata) to ``path``, atomically."""
        _check_metadata(self.metadata)
        arrays = {"codes": self.binary.codes, "vectors": self._vecs.data}
        if self.store == "int8":
            arrays["scales"] = self._scales.data
        arrays.update(_ids_arrays(self.binary._ids))
        if self._texts is not None:
            arrays.update(_strings_arrays("text", self._texts))
        _save(path, "EmbeddingIndex", {"dim": self.dim, "store": self.store, "metadata": self.metadata,
                                       "ids": None if self.binary._ids is None else self.binary._ids.kind,
                                       "texts": self._texts is not None}, arrays)

    @classmethod
    def load(cls, path, device="cpu") -> "EmbeddingIndex":
        """Read an index written by ``save`` (format 1 or 2); IndexFileError when it cannot be trusted."""
        meta, arrays = _load(path, "EmbeddingIndex")
        index = cls(meta["dim"], store=meta["store"], metadata=meta["metadata"])
        n = arrays["codes"].shape[0]
        index.binary._rows.buf, index.binary._rows.n = arrays["codes"], n
        index._vecs.buf, index._vecs.n = arrays["vectors"], n
        if index.store == "int8":
            index._scales.buf, index._scales.n = arrays["scales"], n
        if meta["ids"] is not None:
            index.binary._ids = _Ids(meta["ids"], meta["ids_values"])
        if meta["texts"]:
            index._texts = meta["texts_values"]
        if str(device) != "cpu":
            index.binary.to(device)
        return index

    def to_faiss(self):
        """A ``faiss.IndexFlatIP(dim)`` over the stored vectors as float32 (``vectors()``: a float16 or int8
        store is dequantized, so scores are those of the stored values, not of the original embeddings).
        Its search is exact inner product, i.e. ``search`` with a shortlist covering the index. With int
        ids: an ``IndexIDMap`` over it returning the ids; str ids: the flat index (``map_ids`` maps it)."""
        return faiss_interop.embedding_to_faiss(self)

    @classmethod
    def from_parquet(cls, folder, store: str = "float32", device="cpu") -> EmbeddingIndex:
        """The output folder of ``jv5fast embed-corpus`` run with a float precision -> an EmbeddingIndex with
        its ids and its settings as ``metadata`` (no texts: the output holds none). Binary output is refused:
        it has no float vectors to rescore with (use ``HammingIndex.from_parquet``)."""
        return parquet_interop.embedding_from_parquet(cls, folder, store, device)
