"""faiss interop: ``HammingIndex.to_faiss`` / ``from_faiss`` and ``EmbeddingIndex.to_faiss``.

A HammingIndex is an ``IndexBinaryFlat`` holding the same codes in the same order (an ``IndexBinaryIDMap``
over it when the ids are int64), so both search to the same (D, I); an EmbeddingIndex becomes an exact
``IndexFlatIP`` over its dequantized vectors. There is no EmbeddingIndex.from_faiss: a faiss float index keeps
no sign codes or store precision to rebuild from. faiss is the optional ``faiss`` extra, imported on first use
(this module's name keeps clear of the real ``faiss`` package).
"""
from __future__ import annotations

import numpy as np

from .rows import _need


def hamming_to_faiss(index):
    """``HammingIndex.to_faiss``: a faiss binary flat index (an ID map over it for int ids)."""
    faiss = _need("faiss", "faiss")
    codes = np.ascontiguousarray(index._rows.data)
    if index._ids is None or index._ids.kind != "int64":
        flat = faiss.IndexBinaryFlat(index.nbits)
        if index.ntotal:
            flat.add(codes)
        return flat
    out = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(index.nbits))  # the wrapper keeps the flat alive
    if index.ntotal:
        out.add_with_ids(codes, np.ascontiguousarray(index._ids.array))
    return out


def hamming_from_faiss(cls, index, device):
    """``HammingIndex.from_faiss``: ``cls`` over the codes (and int64 ids) of a faiss binary flat index."""
    faiss = _need("faiss", "faiss")
    what = f"{type(index).__module__}.{type(index).__name__}"
    if isinstance(index, faiss.IndexBinary) and not isinstance(index, (faiss.IndexBinaryFlat,
                                                                        faiss.IndexBinaryIDMap)):
        index = faiss.downcast_IndexBinary(index)
    ids = None
    if isinstance(index, faiss.IndexBinaryIDMap):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        sub = faiss.downcast_IndexBinary(index.index)
        if not isinstance(sub, faiss.IndexBinaryFlat):
            raise TypeError(f"HammingIndex.from_faiss takes an IndexBinaryIDMap over an IndexBinaryFlat; this "
                             f"one wraps a {type(sub).__name__}")
        flat = sub
    elif isinstance(index, faiss.IndexBinaryFlat):
        flat = index
    else:
        raise TypeError(f"HammingIndex.from_faiss takes a faiss.IndexBinaryFlat or an IndexBinaryIDMap over "
                         f"one, got {what}" + (" (a float index: see EmbeddingIndex)"
                                               if isinstance(index, faiss.Index) else ""))
    n = flat.ntotal
    codes = flat.reconstruct_n(0, n) if n else np.zeros((0, flat.code_size), np.uint8)
    out = cls(flat.d)
    out.add(codes, ids=ids)
    return out.to(device) if str(device) != "cpu" else out


def embedding_to_faiss(index):
    """``EmbeddingIndex.to_faiss``: a faiss flat inner-product index (an ID map over it for int ids)."""
    faiss = _need("faiss", "faiss")
    vecs = np.ascontiguousarray(index.vectors())
    ids = index.binary._ids
    if ids is None or ids.kind != "int64":
        flat = faiss.IndexFlatIP(index.dim)
        if len(vecs):
            flat.add(vecs)
        return flat
    out = faiss.IndexIDMap(faiss.IndexFlatIP(index.dim))
    if len(vecs):
        out.add_with_ids(vecs, np.ascontiguousarray(ids.array))
    return out
