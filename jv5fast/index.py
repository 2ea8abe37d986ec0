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

Both save to one file: magic, format version, a JSON header naming each array, the raw little-endian
arrays and a CRC-32 of everything before it. ``load`` checks every header field against what the index
kind writes, and the file size against the header, before it allocates anything, then the checksum and
the values ``add`` never stores: a truncated, corrupted or crafted file is an error, never wrong results.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

from . import _hamming
from ._hamming import INT32_MAX

__all__ = ["HammingIndex", "EmbeddingIndex", "IndexFileError"]

_MAGIC = b"JV5FIDX\x00"
_VERSION = 1
_STORES = ("float32", "float16", "int8")
_DTYPE_STR = {"uint8": "|u1", "int8": "|i1", "float16": "<f2", "float32": "<f4"}  # as save() writes them
_MAX_BITS = 1 << 24  # nbits / dim: far above any embedding width, and it keeps every size computation small
_MAX_HEADER_BYTES = 1 << 20
_RESCORE_BUDGET_BYTES = 64 << 20  # EmbeddingIndex.search: its float32 (queries, shortlist, dim) block


class IndexFileError(ValueError):
    """A saved index that cannot be trusted: wrong magic, unknown version, truncated, or checksum mismatch."""


# ----------------------------------------------------------------------------------------------
# Helpers


def _torch_device(device):
    from .devices import check_device
    return check_device(device)


def _as_float(x, dim: int, what: str) -> np.ndarray:
    """float (n, dim) numpy/torch -> float32 numpy, refusing NaN/inf and wrong shapes by name."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{what} must be float embeddings, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{what} contain NaN or inf in row(s) {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")
    return x


class _Rows:
    """A growable (n, width) array with amortized O(1) appends."""

    def __init__(self, width: int, dtype):
        self.buf = np.empty((0, width), dtype=dtype)
        self.n = 0

    def append(self, rows: np.ndarray):
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            new = np.empty((max(need, 2 * self.buf.shape[0], 1024), self.buf.shape[1]), dtype=self.buf.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n : need] = rows
        self.n = need

    @property
    def data(self) -> np.ndarray:
        return self.buf[: self.n]


class _TorchRows:
    """``_Rows`` for a torch tensor on any device: capacity grows geometrically, so n appended rows cost
    O(n) copying and O(log n) reallocations (``reallocs`` counts them); ``data`` is a view, never a copy."""

    def __init__(self, width: int, dtype, device):
        import torch

        self.buf = torch.empty((0, width), dtype=dtype, device=device)
        self.n = 0
        self.reallocs = 0

    def append(self, rows) -> None:
        import torch

        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            cap = max(need, 2 * self.buf.shape[0], 1024)
            new = torch.empty((cap, self.buf.shape[1]), dtype=self.buf.dtype, device=self.buf.device)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
            self.reallocs += 1
        self.buf[self.n : need] = rows
        self.n = need

    def truncate(self, n: int) -> None:
        self.n = n

    @property
    def data(self):
        return self.buf[: self.n]


def _save(path, kind: str, meta: dict, arrays: dict):
    # The format is little-endian whatever the host (a no-op on x86 / ARM); _load accepts only that.
    arrays = {k: v.astype(v.dtype.newbyteorder("<"), copy=False) for k, v in arrays.items()}
    header = dict(meta, kind=kind, arrays=[{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)}
                                           for k, v in arrays.items()])
    hb = json.dumps(header).encode()
    head = _MAGIC + struct.pack("<II", _VERSION, len(hb)) + hb
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        crc = zlib.crc32(head)
        f.write(head)
        for a in arrays.values():
            flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            for i in range(0, flat.size, 1 << 26):
                crc = zlib.crc32(flat[i : i + (1 << 26)], crc)
            f.write(flat.data)
        f.write(struct.pack("<I", crc))
    os.replace(tmp, path)  # never leave a half-written file under the real name


def _header_object(pairs):
    names = [k for k, _ in pairs]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {dup}")
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _header_int(path, header: dict, field: str, lo: int, hi: int) -> int:
    v = header[field]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise IndexFileError(f"{path}: header field {field!r} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _parse_header(path: str, hb: bytes, kind: str):
    """Header bytes -> (meta, [(name, dtype, n, width)]), each field checked against what ``kind`` writes."""
    try:
        header = json.loads(hb.decode("utf-8"), object_pairs_hook=_header_object,
                            parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IndexFileError(f"{path}: corrupted header: not a valid JSON object ({e})") from None
    if not isinstance(header, dict):
        raise IndexFileError(f"{path}: corrupted header: a JSON {type(header).__name__}, not an object")
    if header.get("kind") != kind:
        got = header.get("kind")
        got = got[:100] if isinstance(got, str) else repr(got)[:100]
        raise IndexFileError(f"{path}: holds a {got}, not a {kind} (header field 'kind')")
    fields = {"kind", "arrays", *(("nbits",) if kind == "HammingIndex" else ("dim", "store"))}
    if set(header) != fields:
        missing, unexpected = sorted(fields - set(header)), sorted(set(header) - fields)
        raise IndexFileError(f"{path}: header fields {sorted(header)} are not those of a {kind} "
                             f"{sorted(fields)} (missing {missing}, unexpected {unexpected})")
    if kind == "HammingIndex":
        nbits = _header_int(path, header, "nbits", 8, _MAX_BITS)
        if nbits % 8:
            raise IndexFileError(f"{path}: header field 'nbits' must be a multiple of 8, got {nbits}")
        meta = {"nbits": nbits}
        expect = [("codes", _DTYPE_STR["uint8"], nbits // 8)]
    else:
        dim = _header_int(path, header, "dim", 1, _MAX_BITS)
        store = header["store"]
        if not isinstance(store, str) or store not in _STORES:
            raise IndexFileError(f"{path}: header field 'store' must be one of {_STORES}, got {store!r}")
        meta = {"dim": dim, "store": store}
        expect = [("codes", _DTYPE_STR["uint8"], (dim + 7) // 8), ("vectors", _DTYPE_STR[store], dim)]
        if store == "int8":
            expect.append(("scales", _DTYPE_STR["float32"], 1))
    arrays = header["arrays"]
    if not isinstance(arrays, list) or not all(isinstance(a, dict) for a in arrays):
        raise IndexFileError(f"{path}: header field 'arrays' must be a list of objects, got {arrays!r:.200}")
    for i, a in enumerate(arrays):
        if set(a) != {"name", "dtype", "shape"}:
            raise IndexFileError(f"{path}: header field 'arrays[{i}]' must have exactly the keys "
                                 f"['dtype', 'name', 'shape'], got {sorted(a)}")
    names = [a["name"] for a in arrays]
    if names != [e[0] for e in expect]:
        of = f"a {kind}" + (f" with store {meta['store']!r}" if "store" in meta else "")
        raise IndexFileError(f"{path}: header field 'arrays' names {names!r:.200}; {of} holds exactly "
                             f"{[e[0] for e in expect]}, in that order")
    specs, n = [], None
    for i, (a, (name, dt, width)) in enumerate(zip(arrays, expect)):
        if a["dtype"] != dt:
            raise IndexFileError(f"{path}: header field 'arrays[{i}].dtype' of {name!r} is "
                                 f"{a['dtype']!r:.100}; a {kind} stores {name} as {dt!r}")
        shape = a["shape"]
        if not isinstance(shape, list) or len(shape) != 2 \
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in shape):
            raise IndexFileError(f"{path}: header field 'arrays[{i}].shape' of {name!r} must be two integers "
                                 f">= 0 (rows, {width}), got {shape!r:.200}")
        if shape[1] != width:
            raise IndexFileError(f"{path}: header field 'arrays[{i}].shape' of {name!r} is {shape}; "
                                 f"its width must be {width}")
        if n is not None and shape[0] != n:
            raise IndexFileError(f"{path}: header field 'arrays[{i}].shape' of {name!r} has {shape[0]} rows, "
                                 f"but 'codes' has {n}")
        n = shape[0]
        specs.append((name, np.dtype(dt), n, width))
    return meta, specs


def _rows_in_chunks(a: np.ndarray, nbytes: int = 1 << 26):
    step = max(1, nbytes // max(1, a.itemsize * a.shape[1]))
    for i in range(0, a.shape[0], step):
        yield i, a[i : i + step]


def _check_values(path: str, name: str, a: np.ndarray, positive: bool = False) -> None:
    """Refuse NaN/inf (and, for scales, values <= 0) in a loaded float array, a block at a time."""
    for i, block in _rows_in_chunks(a):
        ok = np.isfinite(block) & (block > 0) if positive else np.isfinite(block)
        if not ok.all():
            row = i + int(np.flatnonzero(~ok.all(axis=1))[0])
            what = "finite and > 0" if positive else "finite"
            raise IndexFileError(f"{path}: array {name!r} row {row} is not {what} ({a[row][:8].tolist()}); "
                                 "add() never stores such values, so the file was not written by save()")


def _load(path, kind: str):
    """Read a file written by ``_save`` for ``kind`` -> (meta, arrays). The header is checked field by field
    against what ``kind`` writes, and the file size against the header, before anything is allocated."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fixed = f.read(16)
        if len(fixed) < 16:
            raise IndexFileError(f"{path}: truncated ({size} bytes; not even a header)")
        if fixed[:8] != _MAGIC:
            raise IndexFileError(f"{path}: not a jv5fast index file (bad magic {fixed[:8]!r})")
        version, hlen = struct.unpack("<II", fixed[8:])
        if version != _VERSION:
            raise IndexFileError(f"{path}: format version {version} is not supported (this jv5fast reads {_VERSION})")
        if hlen > _MAX_HEADER_BYTES:
            raise IndexFileError(f"{path}: header length {hlen} bytes is over the {_MAX_HEADER_BYTES}-byte "
                                 "limit (a saved header is a few hundred bytes): file is corrupted")
        if 16 + hlen + 4 > size:
            raise IndexFileError(f"{path}: truncated inside the header ({size} bytes, header length {hlen})")
        hb = f.read(hlen)
        if len(hb) < hlen:
            raise IndexFileError(f"{path}: truncated inside the header")
        crc = zlib.crc32(hb, zlib.crc32(fixed))
        meta, specs = _parse_header(path, hb, kind)
        expected = 16 + hlen + sum(dt.itemsize * n * width for _, dt, n, width in specs) + 4
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise IndexFileError(f"{path}: {what}: the header describes {expected} bytes, found {size}")
        arrays = {}
        for name, dt, n, width in specs:
            a = np.empty((n, width), dtype=dt)
            flat = a.reshape(-1).view(np.uint8)
            for i in range(0, flat.size, 1 << 26):
                chunk = flat[i : i + (1 << 26)]
                if f.readinto(chunk.data) != chunk.size:
                    raise IndexFileError(f"{path}: truncated inside array {name!r} (did the file change "
                                         "while being read?)")
                crc = zlib.crc32(chunk, crc)
            arrays[name] = a
        (stored,) = struct.unpack("<I", f.read(4))
    if stored != crc:
        raise IndexFileError(f"{path}: checksum mismatch (stored {stored:#010x}, computed {crc:#010x}): file is corrupted")
    # Values save() never writes: a valid checksum over them means another writer, not a safe index.
    if kind == "EmbeddingIndex":
        if meta["store"] != "int8":
            _check_values(path, "vectors", arrays["vectors"])
        else:
            _check_values(path, "scales", arrays["scales"], positive=True)
        tail = (-meta["dim"]) % 8
        if tail and arrays["codes"].size and (arrays["codes"][:, -1] & ((1 << tail) - 1)).any():
            raise IndexFileError(f"{path}: array 'codes' has bits set past dim={meta['dim']} (always zero "
                                 "in a saved index); they would skew every Hamming distance")
    return meta, arrays


# ----------------------------------------------------------------------------------------------
# HammingIndex


class HammingIndex:
    """Exact Hamming k-NN over packed binary codes (faiss ``IndexBinaryFlat`` semantics).

    >>> index = HammingIndex(1024)
    >>> index.add(codes)                      # uint8 (N, 128) ubinary or int8 (N, 128) binary
    >>> D, I = index.search(queries, k=10)    # int32 (Q, 10) distances, int64 (Q, 10) ids
    """

    def __init__(self, nbits: int, device="cpu"):
        if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or not 0 < nbits <= _MAX_BITS \
                or nbits % 8:
            raise ValueError(f"nbits must be a positive multiple of 8 (codes are whole bytes) up to 2**24, "
                             f"got {nbits!r}")
        self.nbits = int(nbits)
        self.code_size = self.nbits // 8
        self._rows = _Rows(self.code_size, np.uint8)
        self.device = None  # None: CPU search (C++ / numpy); else the torch device of the search
        self._dev_words = None  # _TorchRows: int32 (N, W) mirror of the codes on that device
        self.to(device)

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

    def add(self, codes) -> None:
        """Append uint8 (ubinary) or int8 (binary) codes of shape (n, nbits/8); ids continue from len(self)."""
        codes = _hamming.as_codes(codes, self.code_size)
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
        """Remove every code."""
        self._rows = _Rows(self.code_size, np.uint8)
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

        from .kernels.hamming import pack_words

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

        from .kernels.hamming import hamming_topk_words, pack_words

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
        """Write the index to ``path`` (versioned header + CRC-32; written atomically)."""
        _save(path, "HammingIndex", {"nbits": self.nbits}, {"codes": self._rows.data})

    @classmethod
    def load(cls, path, device="cpu") -> "HammingIndex":
        """Read an index written by ``save``; a truncated or corrupted file raises IndexFileError."""
        meta, arrays = _load(path, "HammingIndex")
        index = cls(meta["nbits"])
        index._rows.buf, index._rows.n = arrays["codes"], arrays["codes"].shape[0]
        return index.to(device) if str(device) != "cpu" else index


# ----------------------------------------------------------------------------------------------
# EmbeddingIndex


class EmbeddingIndex:
    """Binary shortlist + float rescoring over float embeddings (e.g. ``Engine.embed`` output).

    ``add`` stores sign codes (np.packbits(x > 0)) and the vectors in ``store`` precision: float32,
    float16, or int8 (per-row absmax scale). ``search(q, k, rescore_multiplier=4)`` takes the
    ``k * rescore_multiplier`` nearest codes by Hamming distance and returns the k best of them by dot
    product with the float query: (scores float32 (Q, k) descending, ids int64 (Q, k)), ties by smaller
    id; k > N pads with (-inf, -1). With unit-norm embeddings the score is the cosine similarity.
    """

    def __init__(self, dim: int, store: str = "float32", device="cpu"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < dim <= _MAX_BITS:
            raise ValueError(f"dim must be a positive integer up to 2**24, got {dim!r}")
        if store not in _STORES:
            raise ValueError(f"store must be one of {_STORES}, got {store!r}")
        self.dim = int(dim)
        self.store = store
        self.binary = HammingIndex(8 * ((self.dim + 7) // 8), device=device)  # tail bits are zero on both sides
        self._vecs = _Rows(self.dim, {"float32": np.float32, "float16": np.float16, "int8": np.int8}[store])
        self._scales = _Rows(1, np.float32)  # int8 store only

    def __len__(self) -> int:
        return len(self.binary)

    @property
    def ntotal(self) -> int:
        return len(self.binary)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(dim={self.dim}, store={self.store!r}, ntotal={self.ntotal})"

    def add(self, embeddings) -> None:
        """Append float embeddings (n, dim), numpy or torch (any float dtype); NaN/inf is an error."""
        x = _as_float(embeddings, self.dim, "embeddings")
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
            self.binary.add(codes)
        except BaseException:
            self._vecs.n = n0
            if self.store == "int8":
                self._scales.n = n0
            raise

    def reset(self) -> None:
        self.binary.reset()
        self._vecs = _Rows(self.dim, self._vecs.buf.dtype)
        self._scales = _Rows(1, np.float32)

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
        arrays = {"codes": self.binary.codes, "vectors": self._vecs.data}
        if self.store == "int8":
            arrays["scales"] = self._scales.data
        _save(path, "EmbeddingIndex", {"dim": self.dim, "store": self.store}, arrays)

    @classmethod
    def load(cls, path, device="cpu") -> "EmbeddingIndex":
        meta, arrays = _load(path, "EmbeddingIndex")
        index = cls(meta["dim"], store=meta["store"])
        n = arrays["codes"].shape[0]
        index.binary._rows.buf, index.binary._rows.n = arrays["codes"], n
        index._vecs.buf, index._vecs.n = arrays["vectors"], n
        if index.store == "int8":
            index._scales.buf, index._scales.n = arrays["scales"], n
        if str(device) != "cpu":
            index.binary.to(device)
        return index
