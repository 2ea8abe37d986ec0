"""Exact binary search over embedding codes, and binary-search-then-rescore over float embeddings.

``HammingIndex(nbits)`` mirrors faiss ``IndexBinaryFlat``: packed uint8 codes (np.packbits order, the
sentence-transformers ``ubinary`` precision; int8 ``binary`` codes are accepted), ``search`` returns
``(D int32, I int64)`` with ascending distance, ties by smaller id, and k > N padded with
(INT32_MAX, -1). CPU search runs in the C++ extension (numpy fallback); a CUDA index keeps its codes in a
geometrically grown device buffer and runs the Triton kernel in ``jv5fast.kernels.hamming`` (k > 1024:
that module's exact chunked torch path, on the same device).

``EmbeddingIndex(dim)`` keeps the sign codes plus the vectors (float32, float16 or int8) and searches as
sentence-transformers' ``semantic_search_faiss`` does: shortlist ``k * rescore_multiplier`` by Hamming
distance, then re-rank the shortlist by dot product with the float query.

Both may carry external ids (all int64 or all str, row-aligned with the codes; ``search`` still returns
faiss-style row positions, ``map_ids`` turns them into ids; the int id -1 is refused, as it is faiss's "no
result" and ``map_ids``' padding), a JSON ``metadata`` dict (the settings the vectors were made with) and,
for ``EmbeddingIndex``, the texts for display. ``HammingIndex.to_faiss`` / ``HammingIndex.from_faiss``
convert to and from faiss binary indexes, ``EmbeddingIndex.to_faiss`` to a faiss float index
(EmbeddingIndex has no from_faiss: to go back, ``add`` the vectors of the faiss index); ``from_parquet``
(both kinds) reads a ``jv5fast embed-corpus`` output folder.

Both save to one file: magic, format version, a JSON header naming each array, the raw little-endian
arrays and a CRC-32 of everything before it (version 2 adds metadata, ids and texts; version 1 files
still load). ``load`` checks every header field against what the index kind writes, and the file size
against the header, before it allocates anything, then the checksum, the values ``add`` never stores and
(``EmbeddingIndex``) that each row's sign codes fit its vectors: a truncated, corrupted or crafted file is an
error, never wrong results.

The rooms, one module each (none imports the package itself, so there is no import cycle):

    format.py           the file format, versions 1 and 2: write (``_save``), read and validate (``_load``)
    rows.py             in-memory rows, external ids, texts, metadata; the checks on add()'s arguments
    hamming.py          HammingIndex: exact Hamming top-k on CPU (``jv5fast._hamming``) or CUDA (Triton)
    embedding.py        EmbeddingIndex: Hamming shortlist, then float rescoring by dot product
    faiss_interop.py    to and from faiss indexes (the faiss extra, imported on first use)
    parquet_interop.py  reads a ``jv5fast embed-corpus`` output folder (the parquet extra, on first use)
"""
from __future__ import annotations

from .embedding import EmbeddingIndex
from .format import _MAGIC, IndexFileError
from .hamming import HammingIndex
from .parquet_interop import _read_corpus_manifest
from .rows import _TorchRows

__all__ = ["HammingIndex", "EmbeddingIndex", "IndexFileError"]

# Private names other modules import from here: _MAGIC and _read_corpus_manifest (the CLI), _TorchRows (tests).
