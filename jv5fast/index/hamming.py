"""HammingIndex: exact Hamming k-NN over packed binary codes, with faiss ``IndexBinaryFlat`` semantics.

Rows are uint8 codes in np.packbits order; ``search`` returns (D int32, I int64), ascending distance, ties by
smaller row, k > N padded with (INT32_MAX, -1). The CPU search is ``jv5fast._hamming`` (C++ extension,
numpy fallback); a CUDA index mirrors its codes as int32 words in a geometrically grown device buffer and runs
the Triton kernel of ``jv5fast.kernels.hamming``. The numpy rows stay the source of truth (save, faiss), so a
device move never loses data; the price is one host copy of the codes.
"""
from __future__ import annotations

import numpy as np

from .. import _hamming
from . import faiss_interop, parquet_interop
from .format import _MAX_BITS, _check_metadata, _load, _save
from .rows import _Ids, _Rows, _TorchRows, _WithMetadata, _as_ids, _ids_arrays, _map_rows


def _torch_device(device):
    from ..devices import check_device
    return check_device(device)


class HammingIndex(_WithMetadata):
    """Exact Hamming k-NN over packed binary codes (faiss ``IndexBinaryFlat`` semantics).

    >>> index = HammingIndex(1024)
    >>> index.add(codes)                      # uint8 (N, 128) ubinary or int8 (N, 128) binary
    >>> D, I = index.search(queries, k=10)    # int32 (Q, 10) distances, int64 (Q, 10) row positions

    With external ids (``add(codes, ids=[...])`` on every add, all int or all str, no duplicates),
    ``search`` still returns row positions, as faiss ``IndexBinaryFlat`` does; ``map_ids(I)`` turns them
    into ids (-1 / None where I is -1). ``metadata`` is a JSON-able dict saved with the index.
    """

    def __init__(self, nbits: int, device="cpu", metadata=None):
        if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or not 0 < nbits <= _MAX_BITS \
                or nbits % 8:
            raise ValueError(f"nbits must be a positive multiple of 8 (codes are whole bytes) up to 2**24, "
                             f"got {nbits!r}")
        self.nbits = int(nbits)
        self.code_size = self.nbits // 8
        self._rows = _Rows(self.code_size, np.uint8)
        self.device = None  # None: CPU search (C++ / numpy); else the torch device of the search
        self._dev_words = None  # _TorchRows: int32 (N, W) mirror of the codes on that device
        self._ids = None  # _Ids when the index has external ids
        self.metadata = metadata
        self.to(device)

    @property
    def ids(self):
        """None (positional ids, as in faiss), or the external ids row by row: a read-only int64 array, or
        an object array of str."""
        return None if self._ids is None else self._ids.array

    def map_ids(self, I):
        """Row positions from ``search`` (any shape) -> external ids of the same shape: int64 with -1 for
        padding, or an object array of str with None; the positions themselves when there are no ids."""
        return _map_rows(I, self.ntotal, self._ids)

    def _check_ids(self, ids, n: int):
        """Validate ``ids`` for n new rows against this index (all or nothing, one type, no duplicates)
        -> (kind, values) to store, or None. Only rows fix whether an index has ids: an empty add (or an
        index emptied by reset) leaves the next add free to give ids or not."""
        if ids is None:
            if self._ids is not None and n and self.ntotal:
                raise ValueError(f"this index has external ids ({self._ids.kind}); pass ids= with every add() "
                                 f"(got none for these {n} rows)")
            return None
        checked = _as_ids(ids, n)
        if self._ids is None and self.ntotal:
            raise ValueError(f"this index holds {self.ntotal} rows added without ids (positional ids "
                             f"0..{self.ntotal - 1}); ids must be given with every add() or with none")
        if checked is None or not n:  # zero rows: nothing to store, and nothing to lock the index into
            return None
        kind, values = checked
        if self._ids is not None and self.ntotal:
            self._ids.check_new(kind, values)
        else:
            _Ids(kind).check_new(kind, values)  # duplicates within this call
        return checked

    # faiss-style attributes
    @property
    def d(self) -> int:
        return self.nbits

    @property
    def ntotal(self) -> int:
        return self._rows.n

    def __len__(self) -> int:
        return self._rows.n

    def __repr__(self) -> str:
        return f"HammingIndex(nbits={self.nbits}, ntotal={self.ntotal}, device={str(self.device or 'cpu')!r})"

    @property
    def codes(self) -> np.ndarray:
        """The stored uint8 (N, nbits/8) codes (a read-only view)."""
        v = self._rows.data.view()
        v.flags.writeable = False
        return v

    def add(self, codes, ids=None) -> None:
        """Append uint8 (ubinary) or int8 (binary) codes of shape (n, nbits/8); row positions continue from
        len(self). ``ids``: one external id per row (int or str), on every add or on none. All or nothing."""
        codes = _hamming.as_codes(codes, self.code_size)
        self._add(codes, self._check_ids(ids, codes.shape[0]))

    def _add(self, codes: np.ndarray, checked_ids) -> None:
        n0 = self.ntotal
        if not n0 and codes.shape[0]:
            self._ids = None  # the first rows decide (an empty loaded index may carry an id kind)
        if checked_ids is not None:
            if self._ids is None:
                self._ids = _Ids(checked_ids[0])
            self._ids.extend(checked_ids[1])
        try:
            self._add_codes(codes)
        except BaseException:
            if self._ids is not None:
                self._ids.truncate(n0)
            raise

    def _add_codes(self, codes: np.ndarray) -> None:
        if self.device is not None:
            self._check_device_size(self.ntotal + codes.shape[0])
            n_dev = self._dev_words.n
            self._append_device(self._dev_words, codes)
            try:
                self._rows.append(codes)
            except BaseException:
                self._dev_words.truncate(n_dev)  # keep the mirror equal to the CPU rows
                raise
        else:
            self._rows.append(codes)

    def reset(self) -> None:
        """Remove every code (and id); metadata stays."""
        self._rows = _Rows(self.code_size, np.uint8)
        self._ids = None
        self._dev_words = None if self.device is None else self._new_device_rows(self.device)

    def to(self, device) -> "HammingIndex":
        """Move the search to ``device`` ('cpu' or 'cuda[:i]'); returns self."""
        dev = _torch_device(device)
        return self._set_device(None if dev.type == "cpu" else dev)

    def _set_device(self, dev) -> HammingIndex:
        """None: CPU search; a torch device: the kernels' path with an exact-size mirror there (tests pass
        a CPU device to run that path under TRITON_INTERPRET=1). The old mirror stays until the new one is
        whole."""
        words = None
        if dev is not None:
            self._check_device_size(self.ntotal)
            words = self._new_device_rows(dev)
            self._append_device(words, self._rows.data)
        self.device, self._dev_words = dev, words
        return self

    @staticmethod
    def _check_device_size(n: int) -> None:
        if n >= 2**31:
            raise ValueError(f"a CUDA HammingIndex holds at most 2**31 - 1 codes (ids are packed into 32 "
                             f"bits), this would make {n}")

    def _new_device_rows(self, device) -> _TorchRows:
        import torch

        return _TorchRows((self.code_size + 3) // 4, torch.int32, device)

    @staticmethod
    def _append_device(words: _TorchRows, codes: np.ndarray) -> None:
        import torch

        from ..kernels.hamming import pack_words

        if codes.shape[0]:
            words.append(pack_words(torch.from_numpy(np.ascontiguousarray(codes)).to(words.buf.device)))

    def search(self, queries, k: int, threads: int | None = None):
        """k nearest codes of each query -> (D int32 (Q, k), I int64 (Q, k)), ascending, ties by smaller id.

        On a CPU index these are numpy arrays (``threads`` defaults to all cores); on a CUDA index, torch
        tensors on that device. Queries are uint8/int8 codes (n, nbits/8), numpy or torch.
        """
        k = _hamming.check_k(k)
        if self.ntotal == 0:
            raise ValueError("the index is empty: add() codes before search()")
        if self.device is None:
            return _hamming.hamming_topk(_hamming.as_codes(queries, self.code_size, "queries"), self._rows.data, k,
                                         threads=threads)
        import torch

        from ..kernels.hamming import hamming_topk_words, pack_words

        if isinstance(queries, torch.Tensor) and queries.device.type == "cuda" and queries.dtype == torch.uint8:
            if queries.ndim == 1:
                queries = queries[None]
            if queries.ndim != 2 or queries.shape[1] != self.code_size:
                raise ValueError(f"queries must have shape (n, {self.code_size}), got {tuple(queries.shape)}")
            q = queries.to(self.device)
        else:
            q = torch.from_numpy(_hamming.as_codes(queries, self.code_size, "queries")).to(self.device, copy=True)
        return hamming_topk_words(pack_words(q), self._dev_words.data, k)

    def save(self, path) -> None:
        """Write the index, its ids and metadata to ``path`` (versioned header + CRC-32; written atomically:
        a failed save leaves the previous file)."""
        _check_metadata(self.metadata)  # the dict may have been changed in place
        _save(path, "HammingIndex", {"nbits": self.nbits, "metadata": self.metadata,
                                     "ids": None if self._ids is None else self._ids.kind},
              {"codes": self._rows.data, **_ids_arrays(self._ids)})

    @classmethod
    def load(cls, path, device="cpu") -> "HammingIndex":
        """Read an index written by ``save`` (format 1 or 2); a truncated, corrupted or crafted file raises
        IndexFileError."""
        meta, arrays = _load(path, "HammingIndex")
        index = cls(meta["nbits"], metadata=meta["metadata"])
        index._rows.buf, index._rows.n = arrays["codes"], arrays["codes"].shape[0]
        if meta["ids"] is not None:
            index._ids = _Ids(meta["ids"], meta["ids_values"])
        return index.to(device) if str(device) != "cpu" else index

    # ---- faiss and embed-corpus interop: faiss_interop.py, parquet_interop.py ----------------------------
    def to_faiss(self):
        """A ``faiss.IndexBinaryFlat(nbits)`` holding the same codes in the same order, so its search gives
        the same (D, I). With int ids: an ``IndexBinaryIDMap`` over it, whose I are the ids (what
        ``map_ids(I)`` gives here). str ids cannot live in faiss: the flat index, whose positions
        ``map_ids`` maps."""
        return faiss_interop.hamming_to_faiss(self)

    @classmethod
    def from_faiss(cls, index, device="cpu") -> HammingIndex:
        """A HammingIndex over the codes of a ``faiss.IndexBinaryFlat`` (positional ids) or of an
        ``IndexBinaryIDMap`` / ``IndexBinaryIDMap2`` over one (its int64 ids become external ids; duplicates
        are refused). Other faiss indexes (HNSW, IVF, hash, float indexes) are refused: their codes are not
        all recoverable in order, or they are not binary."""
        return faiss_interop.hamming_from_faiss(cls, index, device)

    @classmethod
    def from_parquet(cls, folder, device="cpu") -> HammingIndex:
        """The output folder of ``jv5fast embed-corpus`` -> a HammingIndex with its ids and its settings as
        ``metadata``. ubinary/binary output is taken as is; float output is packed by sign
        (np.packbits(x > 0)), nbits = dim rounded up to a multiple of 8."""
        return parquet_interop.hamming_from_parquet(cls, folder, device)
