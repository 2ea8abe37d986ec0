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
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import numpy as np

from . import _hamming

__all__ = ["HammingIndex", "EmbeddingIndex", "IndexFileError"]

_MAGIC = b"JV5FIDX\x00"
_VERSION = 2  # 1: codes (+ vectors, scales); 2: + metadata, external ids, texts
_READS = (1, 2)
_STORES = ("float32", "float16", "int8")
_DTYPE_STR = {"uint8": "|u1", "int8": "|i1", "float16": "<f2", "float32": "<f4", "int64": "<i8"}  # as save() writes them
_MAX_BITS = 1 << 24  # nbits / dim: far above any embedding width, and it keeps every size computation small
_MAX_HEADER_BYTES = 1 << 20
_MAX_METADATA_BYTES = 256 << 10  # metadata lives in the header, which is bounded above
_RESCORE_BUDGET_BYTES = 64 << 20  # EmbeddingIndex.search: its float32 (queries, shortlist, dim) block
_MAX_MANIFEST_BYTES = 64 << 20  # embed-corpus manifest.json: a few hundred bytes per part
_RESERVED_ID = ("is reserved: map_ids() returns -1 for 'no result' (faiss's padding), so a row with id -1 "
                "could not be told from one; use any other int64 id")


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


def _as_ids(ids, n: int):
    """User ids for n rows -> ("int64", int64 (n,) array) or ("str", list of str); None when n == 0 and the
    kind cannot be told. Anything else is a ValueError naming the offending entry."""
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__len__"):
        raise ValueError(f"ids must be a sequence with one id (int or str) per row, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D (one id per row), got shape {ids.shape}")
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            j = int(np.argmax(ids > np.iinfo(np.int64).max))
            raise ValueError(f"ids[{j}] = {int(ids[j])} does not fit in int64")
        if ids.dtype.kind in "iu":
            ids = ids.astype(np.int64)
        elif ids.dtype.kind in "UO":
            ids = ids.tolist()
        else:
            raise ValueError(f"ids must be integers (int64) or str, got an array of dtype {ids.dtype}")
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} rows; give exactly one id per row")
    if isinstance(ids, np.ndarray):
        if (ids == -1).any():
            j = int(np.argmax(ids == -1))
            raise ValueError(f"ids[{j}] = -1 {_RESERVED_ID}")
        return "int64", ids
    if n == 0:
        return None
    ids = list(ids)
    first_int = isinstance(ids[0], (int, np.integer)) and not isinstance(ids[0], (bool, np.bool_))
    for j, x in enumerate(ids):
        if isinstance(x, str) and not first_int:
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"ids[{j}] = {x!r} is not valid Unicode (a lone surrogate)") from None
        elif not (first_int and isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))):
            want = "int (like ids[0])" if first_int else "str (like ids[0])" if isinstance(ids[0], str) else "int or str"
            raise ValueError(f"ids[{j}] = {x!r:.80} is a {type(x).__name__}; ids must all be {want}")
        elif not -2**63 <= x < 2**63:
            raise ValueError(f"ids[{j}] = {x} does not fit in int64")
        elif x == -1:
            raise ValueError(f"ids[{j}] = -1 {_RESERVED_ID}")
    return ("int64", np.array(ids, dtype=np.int64)) if first_int else ("str", ids)


class _Ids:
    """External ids row-aligned with an index's codes: an int64 ``_Rows`` or a list of str, plus an
    id -> row dict built on the first add() that needs it (a loaded index that is only searched never builds
    it)."""

    def __init__(self, kind: str, values=None):
        self.kind = kind
        self._ints = _Rows(1, np.int64) if kind == "int64" else None
        self._strs = [] if kind == "str" else None
        self._row = None  # id -> row, lazily
        self._array = None  # cached read-only numpy view / object array
        if values is not None:
            self.extend(values)

    def __len__(self):
        return self._ints.n if self._ints is not None else len(self._strs)

    def check_new(self, kind: str, values) -> None:
        """Refuse ``values`` of another kind, or any id already present (or repeated within ``values``)."""
        if kind != self.kind:
            raise ValueError(f"this index's ids are {self.kind}; got {kind} ids (all ids of an index have one type)")
        if self._row is None:
            existing = self._ints.data[:, 0].tolist() if self._ints is not None else self._strs
            self._row = {x: r for r, x in enumerate(existing)}
        seen = {}
        for j, x in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
            if x in self._row:
                raise ValueError(f"duplicate id {x!r}: ids[{j}] is already the id of row {self._row[x]}")
            if x in seen:
                raise ValueError(f"duplicate id {x!r}: ids[{seen[x]}] and ids[{j}]")
            seen[x] = j

    def extend(self, values) -> None:
        n0 = len(self)
        if self._ints is not None:
            self._ints.append(np.asarray(values, np.int64)[:, None])
        else:
            self._strs.extend(values)
        if self._row is not None:
            for r, x in enumerate(values.tolist() if isinstance(values, np.ndarray) else values, n0):
                self._row[x] = r
        self._array = None

    def truncate(self, n: int) -> None:
        if self._ints is not None:
            self._ints.n = n
        else:
            del self._strs[n:]
        self._row = self._array = None

    def values_list(self) -> list:
        return self._ints.data[:, 0].tolist() if self._ints is not None else list(self._strs)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if self._ints is not None:
                a = self._ints.data[:, 0]
            else:
                a = np.empty(len(self._strs), dtype=object)
                a[:] = self._strs
            a = a.view()
            a.flags.writeable = False
            self._array = a
        return self._array


def _check_texts(texts, n: int) -> list:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__"):
        raise ValueError(f"texts must be a sequence with one str per row, got {type(texts).__name__}")
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"texts has {len(texts)} entries for {n} rows; give exactly one text per row")
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{j}] is a {type(t).__name__}, not a str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"texts[{j}] is not valid Unicode (a lone surrogate)") from None
    return texts


def _map_rows(I, n: int, ids: _Ids | None):
    """faiss-style positions I (any shape, -1 = no result) -> external ids of the same shape: int64 with -1,
    or an object array of str with None; positions themselves (int64) when the index has no ids."""
    if hasattr(I, "detach") and hasattr(I, "cpu"):
        I = I.detach().cpu().numpy()
    I = np.asarray(I)
    if I.dtype.kind not in "iu":
        raise ValueError(f"I must be integer row positions (as search() returns), got dtype {I.dtype}")
    I = I.astype(np.int64)
    if I.size and (I.min() < -1 or I.max() >= n):
        bad = I[(I < -1) | (I >= n)].flat[0]
        raise ValueError(f"row position {int(bad)} is out of range for an index of {n} rows (valid: -1..{n - 1})")
    if ids is None:
        return I
    if ids.kind == "int64":
        return np.where(I >= 0, ids.array[np.maximum(I, 0)] if n else -1, -1).astype(np.int64)
    out = np.empty(I.shape, dtype=object)
    ok = I >= 0
    out[ok] = ids.array[I[ok]]
    out[~ok] = None
    return out


def _ids_arrays(ids: _Ids | None) -> dict:
    if ids is None:
        return {}
    if ids.kind == "int64":
        return {"ids": ids._ints.data}
    return _strings_arrays("id", ids._strs)


def _need(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(f"{module} is not installed; this needs the {extra} extra: "
                                  f'pip install "jv5fast[{extra}]"', name=e.name) from None


def _save(path, kind: str, meta: dict, arrays: dict):
    # The format is little-endian whatever the host (a no-op on x86 / ARM); _load accepts only that.
    arrays = {k: v.astype(v.dtype.newbyteorder("<"), copy=False) for k, v in arrays.items()}
    header = dict(meta, kind=kind, arrays=[{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)}
                                           for k, v in arrays.items()])
    hb = json.dumps(header, allow_nan=False).encode()
    if len(hb) > _MAX_HEADER_BYTES:
        raise ValueError(f"the index header would be {len(hb)} bytes, over the {_MAX_HEADER_BYTES}-byte limit "
                         "(is metadata very large?)")
    head = _MAGIC + struct.pack("<II", _VERSION, len(hb)) + hb
    path = os.fspath(path)
    # A new file beside the target, created exclusively (O_EXCL): no existing file is ever truncated, and the
    # error path below removes only this file, which save() created.
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            crc = zlib.crc32(head)
            f.write(head)
            for a in arrays.values():
                flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                for i in range(0, flat.size, 1 << 26):
                    crc = zlib.crc32(flat[i : i + (1 << 26)], crc)
                f.write(flat.data)
            f.write(struct.pack("<I", crc))
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes it 0600; give it the mode open() would have
        os.replace(tmp, path)  # never leave a half-written file under the real name
    except BaseException:
        try:  # a failed save leaves the previous file and no temporary one
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def _new_file_mode(path: str) -> int:
    """The mode an index file gets: an existing file's (its permissions survive a re-save), else what
    open() would create under the process umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _strings_arrays(prefix: str, strings) -> dict:
    """A list of str -> {prefix_offsets: int64 (n+1, 1), prefix_bytes: uint8 (m, 1)} (UTF-8, concatenated)."""
    data = [x.encode("utf-8") for x in strings]
    offsets = np.zeros((len(data) + 1, 1), np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:, 0])
    return {f"{prefix}_offsets": offsets, f"{prefix}_bytes": np.frombuffer(b"".join(data), np.uint8)[:, None]}


def _strings_from(path: str, prefix: str, offsets: np.ndarray, blob: np.ndarray) -> list:
    """The inverse of ``_strings_arrays`` for an untrusted file: offsets start at 0, never decrease, end at
    the blob's length, and every slice is valid UTF-8, else IndexFileError naming the row."""
    o = offsets[:, 0]
    if o[0] != 0 or o[-1] != blob.shape[0]:
        raise IndexFileError(f"{path}: array '{prefix}_offsets' must run from 0 to {blob.shape[0]} (the length of "
                             f"'{prefix}_bytes'), got {int(o[0])}..{int(o[-1])}")
    bad = np.flatnonzero(np.diff(o) < 0)
    if bad.size:
        raise IndexFileError(f"{path}: array '{prefix}_offsets' decreases at row {int(bad[0]) + 1} "
                             f"({int(o[bad[0]])} -> {int(o[bad[0] + 1])})")
    raw, out = blob.tobytes(), []
    for i in range(o.shape[0] - 1):
        try:
            out.append(raw[o[i] : o[i + 1]].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise IndexFileError(f"{path}: array '{prefix}_bytes' row {i} is not valid UTF-8 ({e.reason})") from None
    return out


def _check_metadata(metadata) -> dict:
    """A JSON-able dict (str keys, no NaN/inf) of at most _MAX_METADATA_BYTES, or ValueError saying why."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (JSON object), got {type(metadata).__name__}")
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode())
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serializable (str keys; str, int, float, bool, None, list, dict "
                         f"values; no NaN/inf): {e}") from None
    if bad := [k for k in metadata if not isinstance(k, str)]:
        raise ValueError(f"metadata keys must be str, got {bad[0]!r}")
    if size > _MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON, over the {_MAX_METADATA_BYTES}-byte limit")
    return metadata


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


def _parse_header(path: str, hb: bytes, kind: str, version: int = _VERSION):
    """Header bytes -> (meta, [(name, dtype, rows, width)]), each field checked against what ``kind`` writes
    in format ``version``."""
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
    if version >= 2:
        fields |= {"metadata", "ids", *(("texts",) if kind == "EmbeddingIndex" else ())}
    if set(header) != fields:
        missing, unexpected = sorted(fields - set(header)), sorted(set(header) - fields)
        raise IndexFileError(f"{path}: header fields {sorted(header)} are not those of a {kind} "
                             f"{sorted(fields)} (missing {missing}, unexpected {unexpected})")
    if kind == "HammingIndex":
        nbits = _header_int(path, header, "nbits", 8, _MAX_BITS)
        if nbits % 8:
            raise IndexFileError(f"{path}: header field 'nbits' must be a multiple of 8, got {nbits}")
        meta = {"nbits": nbits}
        expect = [("codes", _DTYPE_STR["uint8"], nbits // 8, "n")]
    else:
        dim = _header_int(path, header, "dim", 1, _MAX_BITS)
        store = header["store"]
        if not isinstance(store, str) or store not in _STORES:
            raise IndexFileError(f"{path}: header field 'store' must be one of {_STORES}, got {store!r}")
        meta = {"dim": dim, "store": store}
        expect = [("codes", _DTYPE_STR["uint8"], (dim + 7) // 8, "n"), ("vectors", _DTYPE_STR[store], dim, "n")]
        if store == "int8":
            expect.append(("scales", _DTYPE_STR["float32"], 1, "n"))
    meta.update(metadata={}, ids=None, texts=False)
    if version >= 2:
        if not isinstance(header["metadata"], dict):
            raise IndexFileError(f"{path}: header field 'metadata' must be a JSON object, got "
                                 f"{header['metadata']!r:.100}")
        if header["ids"] not in (None, "int64", "str") or isinstance(header["ids"], bool):
            raise IndexFileError(f"{path}: header field 'ids' must be null, 'int64' or 'str', got {header['ids']!r:.100}")
        try:
            _check_metadata(header["metadata"])  # what the constructor would refuse, named as a file error
        except (TypeError, ValueError) as e:
            raise IndexFileError(f"{path}: header field 'metadata': {e}") from None
        meta.update(metadata=header["metadata"], ids=header["ids"])
        if header["ids"] == "int64":
            expect.append(("ids", _DTYPE_STR["int64"], 1, "n"))
        elif header["ids"] == "str":
            expect += [("id_offsets", _DTYPE_STR["int64"], 1, "n+1"), ("id_bytes", _DTYPE_STR["uint8"], 1, "any")]
        if kind == "EmbeddingIndex":
            if not isinstance(header["texts"], bool):
                raise IndexFileError(f"{path}: header field 'texts' must be true or false, got {header['texts']!r:.100}")
            meta["texts"] = header["texts"]
            if header["texts"]:
                expect += [("text_offsets", _DTYPE_STR["int64"], 1, "n+1"),
                           ("text_bytes", _DTYPE_STR["uint8"], 1, "any")]
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
        given = ""
        if version >= 2:
            given = f" (header 'ids' {meta['ids']!r}" + (f", 'texts' {meta['texts']}" if kind == "EmbeddingIndex"
                                                       else "") + ")"
        raise IndexFileError(f"{path}: header field 'arrays' names {names!r:.200}; {of} holds exactly "
                             f"{[e[0] for e in expect]}, in that order{given}")
    specs, n = [], None
    for i, (a, (name, dt, width, rows)) in enumerate(zip(arrays, expect)):
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
        if n is None:
            n = shape[0]  # 'codes' comes first and sets the row count
        elif rows == "n" and shape[0] != n:
            raise IndexFileError(f"{path}: header field 'arrays[{i}].shape' of {name!r} has {shape[0]} rows, "
                                 f"but 'codes' has {n}")
        elif rows == "n+1" and shape[0] != n + 1:
            raise IndexFileError(f"{path}: header field 'arrays[{i}].shape' of {name!r} has {shape[0]} rows; "
                                 f"offsets need one more than the {n} rows of 'codes'")
        specs.append((name, np.dtype(dt), shape[0], width))
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


def _check_codes(path: str, codes: np.ndarray, vectors: np.ndarray, store: str) -> None:
    """Refuse sign codes that ``add`` could not have written next to these vectors (rows permuted or edited
    under a recomputed checksum would otherwise shortlist wrong rows), a block of rows at a time.

    ``add`` packs ``x > 0`` of the float32 input x and stores x, float16(x) or rint(x / scale) (scale > 0).
    None of these flips a sign, but float16 rounds a tiny x > 0 to +0.0 and int8 rounds |x| < scale / 2 to 0:
    so a bit must be 1 where the stored value is > 0, 0 where it is < 0 (float16: also -0.0), and may be either
    where it is 0 (float16: +0.0); float32 stores x itself, so there the bit is exactly ``x > 0``. Checking
    (not recomputing) keeps those bits, so a valid file searches exactly as the index that saved it."""
    for i, block in _rows_in_chunks(vectors, 1 << 24):
        # float16 as its int16 bits (NaN was refused above): > 0 is x > 0, >= 0 adds +0.0 (numpy compares
        # float16 ~10x slower than int16); np.packbits measured ~7x faster here than _hamming.pack_signs
        signed = block.view(np.int16) if store == "float16" else block
        must = np.packbits(signed > 0, axis=1)
        may = must if store == "float32" else np.packbits(signed >= 0, axis=1)
        c = codes[i : i + block.shape[0]]
        bad = ((must & ~c) | (c & ~may)).any(axis=1)
        if bad.any():
            row = i + int(np.flatnonzero(bad)[0])
            v = vectors[row]
            bits = np.unpackbits(codes[row])[: v.size].astype(bool)
            must_r = v > 0
            may_r = must_r if store == "float32" else (v.view(np.int16) if store == "float16" else v) >= 0
            wrong = np.flatnonzero((must_r & ~bits) | (bits & ~may_r))
            j = int(wrong[0])
            raise IndexFileError(f"{path}: array 'codes' row {row} does not match the signs of array 'vectors' "
                                 f"row {row} ({wrong.size} of {v.size} bits disagree; first: dimension {j}, code bit "
                                 f"{int(bits[j])}, vector value {v[j].item()!r}); save() writes codes = "
                                 "packbits(vectors > 0) of the same rows, so these rows would be shortlisted for "
                                 "the wrong vectors")


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
        if version not in _READS:
            raise IndexFileError(f"{path}: format version {version} is not supported (this jv5fast reads "
                                 f"{', '.join(map(str, _READS))})")
        if hlen > _MAX_HEADER_BYTES:
            raise IndexFileError(f"{path}: header length {hlen} bytes is over the {_MAX_HEADER_BYTES}-byte "
                                 "limit (a saved header is a few hundred bytes): file is corrupted")
        if 16 + hlen + 4 > size:
            raise IndexFileError(f"{path}: truncated inside the header ({size} bytes, header length {hlen})")
        hb = f.read(hlen)
        if len(hb) < hlen:
            raise IndexFileError(f"{path}: truncated inside the header")
        crc = zlib.crc32(hb, zlib.crc32(fixed))
        meta, specs = _parse_header(path, hb, kind, version)
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
        _check_codes(path, arrays["codes"], arrays["vectors"], meta["store"])
    if meta["ids"] == "int64":
        ids = arrays.pop("ids")[:, 0]
        if (ids == -1).any():
            raise IndexFileError(f"{path}: array 'ids' row {int(np.argmax(ids == -1))} holds the id -1, which "
                                 f"{_RESERVED_ID}; add() never stores it")
        _check_unique(path, ids)
        meta["ids_values"] = ids
    elif meta["ids"] == "str":
        ids = _strings_from(path, "id", arrays.pop("id_offsets"), arrays.pop("id_bytes"))
        _check_unique(path, ids)
        meta["ids_values"] = ids
    if meta["texts"]:
        meta["texts_values"] = _strings_from(path, "text", arrays.pop("text_offsets"), arrays.pop("text_bytes"))
    return meta, arrays


def _check_unique(path: str, ids) -> None:
    """Refuse a file whose ids repeat (add() never stores two equal ids), naming the id and both rows."""
    if isinstance(ids, np.ndarray):
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts == 1).all():
            return
        dup = uniq[np.argmax(counts > 1)]
        rows = np.flatnonzero(ids == dup)[:2].tolist()
        dup = int(dup)
    else:
        if len(set(ids)) == len(ids):
            return
        seen = {}
        for row, x in enumerate(ids):
            if x in seen:
                dup, rows = x, [seen[x], row]
                break
            seen[x] = row
    raise IndexFileError(f"{path}: id {dup!r} appears twice (rows {rows[0]} and {rows[1]}); add() never stores "
                         "duplicate ids")


# ----------------------------------------------------------------------------------------------
# HammingIndex


class _WithMetadata:
    """The ``metadata`` property both indexes share: checked on every assignment."""

    @property
    def metadata(self) -> dict:
        """Free-form JSON-able settings saved with the index (e.g. the model, task and prompt the rows came from)."""
        return self._metadata

    @metadata.setter
    def metadata(self, value) -> None:
        self._metadata = _check_metadata(value)


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

    # ---- faiss and embed-corpus interop --------------------------------------------------------------
    def to_faiss(self):
        """A ``faiss.IndexBinaryFlat(nbits)`` holding the same codes in the same order, so its search gives
        the same (D, I). With int ids: an ``IndexBinaryIDMap`` over it, whose I are the ids (what
        ``map_ids(I)`` gives here). str ids cannot live in faiss: the flat index, whose positions
        ``map_ids`` maps."""
        faiss = _need("faiss", "faiss")
        codes = np.ascontiguousarray(self._rows.data)
        if self._ids is None or self._ids.kind != "int64":
            flat = faiss.IndexBinaryFlat(self.nbits)
            if self.ntotal:
                flat.add(codes)
            return flat
        out = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(self.nbits))  # the wrapper keeps the flat alive
        if self.ntotal:
            out.add_with_ids(codes, np.ascontiguousarray(self._ids.array))
        return out

    @classmethod
    def from_faiss(cls, index, device="cpu") -> HammingIndex:
        """A HammingIndex over the codes of a ``faiss.IndexBinaryFlat`` (positional ids) or of an
        ``IndexBinaryIDMap`` / ``IndexBinaryIDMap2`` over one (its int64 ids become external ids; duplicates
        are refused). Other faiss indexes (HNSW, IVF, hash, float indexes) are refused: their codes are not
        all recoverable in order, or they are not binary."""
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

    @classmethod
    def from_parquet(cls, folder, device="cpu") -> HammingIndex:
        """The output folder of ``jv5fast embed-corpus`` -> a HammingIndex with its ids and its settings as
        ``metadata``. ubinary/binary output is taken as is; float output is packed by sign
        (np.packbits(x > 0)), nbits = dim rounded up to a multiple of 8."""
        settings, parts = _read_corpus_manifest(folder)
        dim = settings["dim"]
        index = cls(8 * ((dim + 7) // 8), metadata=settings)
        for name, ids, emb in _iter_corpus(folder, settings, parts):
            if emb.dtype.kind == "f":
                emb = _hamming.pack_signs(_as_float(emb, dim, f"{name} embeddings"))
            try:
                index.add(emb, ids=ids)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return index.to(device) if str(device) != "cpu" else index


# ----------------------------------------------------------------------------------------------
# EmbeddingIndex


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
        faiss = _need("faiss", "faiss")
        vecs = np.ascontiguousarray(self.vectors())
        ids = self.binary._ids
        if ids is None or ids.kind != "int64":
            flat = faiss.IndexFlatIP(self.dim)
            if len(vecs):
                flat.add(vecs)
            return flat
        out = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
        if len(vecs):
            out.add_with_ids(vecs, np.ascontiguousarray(ids.array))
        return out

    @classmethod
    def from_parquet(cls, folder, store: str = "float32", device="cpu") -> EmbeddingIndex:
        """The output folder of ``jv5fast embed-corpus`` run with a float precision -> an EmbeddingIndex with
        its ids and its settings as ``metadata`` (no texts: the output holds none). Binary output is refused:
        it has no float vectors to rescore with (use ``HammingIndex.from_parquet``)."""
        settings, parts = _read_corpus_manifest(folder)
        if settings["precision"] not in ("float32", "float16"):
            raise ValueError(f"{folder}: EmbeddingIndex needs float embeddings, but this embed-corpus output has "
                             f"precision {settings['precision']!r} (sign codes only); load it with "
                             "HammingIndex.from_parquet, or run embed-corpus with --precision float32")
        index = cls(settings["dim"], store=store, metadata=settings)
        for name, ids, emb in _iter_corpus(folder, settings, parts):
            try:
                index.add(_as_float(emb, index.dim, "embeddings"), ids=ids)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if str(device) != "cpu":
            index.binary.to(device)
        return index


# ----------------------------------------------------------------------------------------------
# jv5fast embed-corpus output: DIR/manifest.json + the Parquet parts it lists

_CORPUS_SETTINGS = {"model": (str,), "task": (str,), "prompt_name": (str, type(None)), "prompt": (str, type(None)),
                    "truncate_dim": (int, type(None)), "dim": (int,), "precision": (str,), "normalize": (bool,),
                    "id_column": (str,), "text_column": (str,)}
_CORPUS_PRECISIONS = ("float32", "float16", "ubinary", "binary")


def _read_corpus_manifest(folder):
    """-> (settings, [(file name, path, rows)]) with every field checked; parts are plain files in folder."""
    folder = os.fspath(folder)
    mpath = os.path.join(folder, "manifest.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"embed-corpus output folder not found: {folder}")
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{folder} is not an embed-corpus output folder: it has no manifest.json")
    root = os.path.realpath(folder)
    real = os.path.realpath(mpath)
    if os.path.commonpath([real, root]) != root:  # as for the parts: nothing outside the folder is read
        raise ValueError(f"{mpath} is a link to {real}, outside {folder}; an embed-corpus output folder holds "
                         "its own manifest")
    try:
        with open(real, "rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)  # bounded whatever the file claims to be
    except OSError as e:
        raise OSError(f"cannot read {mpath}: {e.strerror or e}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ValueError(f"{mpath} is over the {_MAX_MANIFEST_BYTES >> 20} MiB limit of a manifest (embed-corpus "
                         "writes a few hundred bytes per part): not an embed-corpus manifest")
    try:
        m = json.loads(raw.decode("utf-8"), object_pairs_hook=_header_object, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "jv5fast-embed-corpus":
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{mpath}: 'format' must be 'jv5fast-embed-corpus', got {got!r:.100}")
    if m.get("version") != 1 or isinstance(m.get("version"), bool):
        raise ValueError(f"{mpath}: 'version' {m.get('version')!r:.50} is not supported (this jv5fast reads 1)")
    settings, parts = m.get("settings"), m.get("parts")
    if not isinstance(settings, dict):
        raise ValueError(f"{mpath}: 'settings' must be an object, got {settings!r:.100}")  # noqa: TRY004
    for key, types in _CORPUS_SETTINGS.items():
        v = settings.get(key, ...)
        if v is ... or not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{mpath}: settings.{key} must be {want}, got "
                             f"{'nothing' if v is ... else repr(v)[:100]}")
    if not 1 <= settings["dim"] <= _MAX_BITS:
        raise ValueError(f"{mpath}: settings.dim must be in 1..{_MAX_BITS}, got {settings['dim']}")
    if settings["precision"] not in _CORPUS_PRECISIONS:
        raise ValueError(f"{mpath}: settings.precision must be one of {_CORPUS_PRECISIONS}, got "
                         f"{settings['precision']!r:.50}")
    if not isinstance(parts, list):
        raise ValueError(f"{mpath}: 'parts' must be a list, got {parts!r:.100}")  # noqa: TRY004
    out, seen = [], set()
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ValueError(f"{mpath}: parts[{i}] must be an object, got {part!r:.100}")  # noqa: TRY004
        name, rows = part.get("file"), part.get("rows")
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
                or os.path.isabs(name) or os.path.basename(name) != name:
            raise ValueError(f"{mpath}: parts[{i}].file must be a plain file name inside {folder}, got {name!r:.200}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"{mpath}: parts[{i}].rows must be an integer >= 0, got {rows!r:.50}")
        if not isinstance(part.get("input"), str):
            raise ValueError(f"{mpath}: parts[{i}].input must be a str, got {part.get('input')!r:.100}")  # noqa: TRY004
        if name in seen:
            raise ValueError(f"{mpath}: parts[{i}].file {name!r} is listed twice")
        seen.add(name)
        path = os.path.join(folder, name)
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            raise ValueError(f"{mpath}: parts[{i}].file {name!r} is a link to {real}, outside {folder}")
        if not os.path.isfile(real):
            raise FileNotFoundError(f"{mpath}: parts[{i}].file {name!r} does not exist in {folder}")
        out.append((name, path, rows))
    return settings, out


def _iter_corpus(folder, settings: dict, parts):
    """Yield (file name, ids, embeddings block) per record batch, each part's schema, settings and row count
    checked first: int64 or str ids (one kind in every part), float32/float16 (n, dim) or uint8 (n, dim/8)
    codes (binary's int8 bytes XOR 0x80)."""
    pa = _need("pyarrow", "parquet")
    pq = _need("pyarrow.parquet", "parquet")
    dim, precision = settings["dim"], settings["precision"]
    width = (dim + 7) // 8
    id_kind = None
    for name, path, rows in parts:
        where = os.path.join(os.fspath(folder), name)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{where}: not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        raw = (schema.metadata or {}).get(b"jv5fast")
        try:
            own = json.loads(raw) if raw is not None else None
        except ValueError:
            own = None
        if own != settings:
            diff = ("no valid 'jv5fast' schema metadata" if not isinstance(own, dict) else
                    "; ".join(f"{k}: {own.get(k, '(missing)')!r} vs {settings.get(k, '(missing)')!r}"
                              for k in sorted(set(own) | set(settings)) if own.get(k, ...) != settings.get(k, ...)))
            raise ValueError(f"{where}: its settings differ from manifest.json's ({diff[:300]})")
        for col in ("id", "embedding"):
            if col not in schema.names:
                raise ValueError(f"{where}: no column {col!r} (columns: {schema.names})")
        t_id, t_emb = schema.field("id").type, schema.field("embedding").type
        kind = "int64" if pa.types.is_int64(t_id) else "str" if (pa.types.is_string(t_id) or
                                                                 pa.types.is_large_string(t_id)) else None
        if kind is None:
            raise ValueError(f"{where}: column 'id' is {t_id}; embed-corpus writes int64 or string ids")
        if id_kind is not None and kind != id_kind:
            raise ValueError(f"{where}: column 'id' is {t_id}, but earlier parts hold {id_kind} ids")
        id_kind = kind
        if precision in ("float32", "float16"):
            ok = pa.types.is_fixed_size_list(t_emb) and t_emb.list_size == dim \
                and t_emb.value_type == (pa.float32() if precision == "float32" else pa.float16())
            want = f"fixed_size_list<{precision}>[{dim}]"
        else:
            ok = pa.types.is_fixed_size_binary(t_emb) and t_emb.byte_width == width
            want = f"fixed_size_binary[{width}]"
        if not ok:
            raise ValueError(f"{where}: column 'embedding' is {t_emb}; settings (precision {precision!r}, dim {dim}) "
                             f"say {want}")
        if pf.metadata.num_rows != rows:
            raise ValueError(f"{where}: holds {pf.metadata.num_rows} rows, but manifest.json says {rows}")
        row = 0
        for batch in pf.iter_batches(batch_size=65536, columns=["id", "embedding"]):
            ids_col, emb = batch.column(0), batch.column(1)
            for col, label in ((ids_col, "id"), (emb, "embedding")):
                if col.null_count:
                    j = row + int(np.flatnonzero(np.asarray(col.is_null()))[0])
                    raise ValueError(f"{where}: row {j}: column {label!r} is null")
            if kind == "int64":
                ids = ids_col.to_numpy()
            else:
                ids = ids_col.to_pylist()
            if precision in ("float32", "float16"):
                values = emb.flatten()
                if values.null_count:
                    j = row + int(np.flatnonzero(np.asarray(values.is_null()))[0]) // dim
                    raise ValueError(f"{where}: row {j}: column 'embedding' holds a null value")
                block = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            else:
                n = len(emb)
                block = np.frombuffer(emb.buffers()[1], np.uint8, count=n * width,
                                      offset=emb.offset * width).reshape(n, width)
                if precision == "binary":
                    block = block ^ np.uint8(0x80)
            yield f"{where} rows {row}..{row + len(batch) - 1}", ids, block
            row += len(batch)
        if row != rows:  # the footer said otherwise: a file that changed while being read
            raise ValueError(f"{where}: read {row} rows, but manifest.json says {rows}")
