"""Exact binary search over embedding codes, and binary-search-then-rescore over float embeddings.

``HammingIndex(nbits)`` mirrors faiss ``IndexBinaryFlat``: packed uint8 codes (np.packbits order, the
sentence-transformers ``ubinary`` precision; int8 ``binary`` codes are accepted), ``search`` returns
``(D int32, I int64)`` with ascending distance, ties by smaller id, and k > N padded with
(INT32_MAX, -1). CPU search runs in the C++ extension (numpy fallback); a CUDA index runs the Triton
kernel in ``jv5fast.kernels.hamming``.

``EmbeddingIndex(dim)`` keeps the sign codes plus the vectors (float32, float16 or int8) and searches as
sentence-transformers' ``semantic_search_faiss`` does: shortlist ``k * rescore_multiplier`` by Hamming
distance, then re-rank the shortlist by dot product with the float query.

Both save to one file: magic, format version, a JSON header naming each array, the raw arrays and a
CRC-32 of everything before it, so a truncated or corrupted file is an error, never wrong results.
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


class IndexFileError(ValueError):
    """A saved index that cannot be trusted: wrong magic, unknown version, truncated, or checksum mismatch."""


# ----------------------------------------------------------------------------------------------
# Helpers


def _torch_device(device):
    import torch

    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


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


def _save(path, kind: str, meta: dict, arrays: dict):
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


def _load(path, kind: str):
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
        hb = f.read(hlen)
        if len(hb) < hlen:
            raise IndexFileError(f"{path}: truncated inside the header")
        crc = zlib.crc32(hb, zlib.crc32(fixed))
        try:
            header = json.loads(hb)
            specs = [(a["name"], np.dtype(a["dtype"]), tuple(int(s) for s in a["shape"])) for a in header["arrays"]]
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"{path}: corrupted header ({e})") from e
        expected = 16 + hlen + sum(dt.itemsize * int(np.prod(sh)) for _, dt, sh in specs) + 4
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise IndexFileError(f"{path}: {what}: expected {expected} bytes, found {size}")
        arrays = {}
        for name, dt, shape in specs:
            a = np.empty(shape, dtype=dt)
            flat = a.reshape(-1).view(np.uint8)
            for i in range(0, flat.size, 1 << 26):
                f.readinto(flat[i : i + (1 << 26)].data)
                crc = zlib.crc32(flat[i : i + (1 << 26)], crc)
            arrays[name] = a
        (stored,) = struct.unpack("<I", f.read(4))
    if stored != crc:
        raise IndexFileError(f"{path}: checksum mismatch (stored {stored:#010x}, computed {crc:#010x}): file is corrupted")
    if header.get("kind") != kind:
        raise IndexFileError(f"{path}: holds a {header.get('kind')}, not a {kind}")
    return header, arrays


# ----------------------------------------------------------------------------------------------
# HammingIndex


class HammingIndex:
    """Exact Hamming k-NN over packed binary codes (faiss ``IndexBinaryFlat`` semantics).

    >>> index = HammingIndex(1024)
    >>> index.add(codes)                      # uint8 (N, 128) ubinary or int8 (N, 128) binary
    >>> D, I = index.search(queries, k=10)    # int32 (Q, 10) distances, int64 (Q, 10) ids
    """

    def __init__(self, nbits: int, device="cpu"):
        if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or nbits <= 0 or nbits % 8:
            raise ValueError(f"nbits must be a positive multiple of 8 (codes are whole bytes), got {nbits!r}")
        self.nbits = int(nbits)
        self.code_size = self.nbits // 8
        self._rows = _Rows(self.code_size, np.uint8)
        self._dev_words = None  # int32 (N, W) mirror of the codes on a CUDA device
        dev = _torch_device(device)
        self.device = None if dev.type == "cpu" else dev  # None: CPU search (C++ / numpy)

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
        if self.ntotal + codes.shape[0] >= 2**31 and self.device is not None:
            raise ValueError("a CUDA HammingIndex holds at most 2**31 - 1 codes")
        self._rows.append(codes)
        if self.device is not None:
            self._append_device(codes)

    def reset(self) -> None:
        """Remove every code."""
        self._rows = _Rows(self.code_size, np.uint8)
        self._dev_words = None

    def to(self, device) -> "HammingIndex":
        """Move the search to ``device`` ('cpu' or 'cuda[:i]'); returns self."""
        dev = _torch_device(device)
        self.device = None if dev.type == "cpu" else dev
        self._dev_words = None
        if self.device is not None:
            self._append_device(self._rows.data)
        return self

    def _append_device(self, codes: np.ndarray):
        import torch

        from .kernels.hamming import pack_words

        words = pack_words(torch.from_numpy(np.ascontiguousarray(codes)).to(self.device, copy=True))
        self._dev_words = words if self._dev_words is None else torch.cat([self._dev_words, words])

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
        return hamming_topk_words(pack_words(q), self._dev_words, k)

    def save(self, path) -> None:
        """Write the index to ``path`` (versioned header + CRC-32; written atomically)."""
        _save(path, "HammingIndex", {"nbits": self.nbits}, {"codes": self._rows.data})

    @classmethod
    def load(cls, path, device="cpu") -> "HammingIndex":
        """Read an index written by ``save``; a truncated or corrupted file raises IndexFileError."""
        header, arrays = _load(path, "HammingIndex")
        index = cls(int(header["nbits"]))
        codes = arrays.get("codes")
        if codes is None or codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != index.code_size:
            raise IndexFileError(f"{os.fspath(path)}: codes array missing or of the wrong shape")
        index._rows.buf, index._rows.n = codes, codes.shape[0]
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
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
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
            self._scales.append(scale.astype(np.float32))
        else:
            vecs = x
        self.binary.add(codes)
        self._vecs.append(vecs)

    def reset(self) -> None:
        self.binary.reset()
        self._vecs = _Rows(self.dim, self._vecs.buf.dtype)
        self._scales = _Rows(1, np.float32)

    def search(self, queries, k: int, rescore_multiplier: int = 4, threads: int | None = None):
        """k best rows per query -> (scores float32 (Q, k) descending, ids int64 (Q, k))."""
        k = _hamming.check_k(k)
        if isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, (int, np.integer)) \
                or rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be an integer >= 1, got {rescore_multiplier!r}")
        q = _as_float(queries, self.dim, "queries")
        n = self.ntotal
        if n == 0:
            raise ValueError("the index is empty: add() embeddings before search()")
        shortlist = min(k * int(rescore_multiplier), n)
        _, cand = self.binary.search(_hamming.pack_signs(q), shortlist, threads=threads)
        if not isinstance(cand, np.ndarray):  # CUDA index: torch tensors
            cand = cand.cpu().numpy()
        vecs = self._vecs.data[cand]  # (Q, S, dim)
        scores = np.matmul(vecs.astype(np.float32, copy=False), q[:, :, None])[..., 0]  # (Q, S)
        if self.store == "int8":
            scores *= self._scales.data[cand, 0]
        # Descending score, ties by smaller id; lexsort's last key is the primary one.
        order = np.lexsort((cand, -scores), axis=-1)[:, :k]
        m = order.shape[1]
        S = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        I = np.full((q.shape[0], k), -1, dtype=np.int64)
        S[:, :m] = np.take_along_axis(scores, order, 1)
        I[:, :m] = np.take_along_axis(cand, order, 1)
        return S, I

    def save(self, path) -> None:
        arrays = {"codes": self.binary.codes, "vectors": self._vecs.data}
        if self.store == "int8":
            arrays["scales"] = self._scales.data
        _save(path, "EmbeddingIndex", {"dim": self.dim, "store": self.store}, arrays)

    @classmethod
    def load(cls, path, device="cpu") -> "EmbeddingIndex":
        header, arrays = _load(path, "EmbeddingIndex")
        index = cls(int(header["dim"]), store=header["store"])
        codes, vecs = arrays.get("codes"), arrays.get("vectors")
        n = -1 if codes is None else codes.shape[0]
        if vecs is None or vecs.shape != (n, index.dim) or vecs.dtype != index._vecs.buf.dtype \
                or codes.shape[1] != index.binary.code_size:
            raise IndexFileError(f"{os.fspath(path)}: codes/vectors arrays missing or inconsistent")
        index.binary._rows.buf, index.binary._rows.n = codes, n
        index._vecs.buf, index._vecs.n = vecs, n
        if index.store == "int8":
            scales = arrays.get("scales")
            if scales is None or scales.shape != (n, 1):
                raise IndexFileError(f"{os.fspath(path)}: scales array missing or inconsistent")
            index._scales.buf, index._scales.n = scales, n
        if str(device) != "cpu":
            index.binary.to(device)
        return index
