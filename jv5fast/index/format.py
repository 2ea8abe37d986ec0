"""The index file format: one place that writes, reads and validates both index kinds, versions 1 and 2.

A file is the magic ``JV5FIDX\\0``, ``<II`` (format version, header length), a JSON header naming each array
(name, dtype, shape) and the index settings, the raw little-endian arrays in that order, and a CRC-32 of
everything before it. Version 1 holds codes (+ vectors, scales); version 2 adds metadata, external ids and
texts; ``_save`` writes 2, ``_load`` reads both. Trust no file: ``_load`` checks every header field against
what the index kind writes, and the file size against the header, before it allocates anything, then the
checksum and the values ``add`` never stores. Depends on numpy only; the index classes build on it.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import numpy as np

_MAGIC = b"JV5FIDX\x00"
_VERSION = 2  # 1: codes (+ vectors, scales); 2: + metadata, external ids, texts
_READS = (1, 2)
_STORES = ("float32", "float16", "int8")
_DTYPE_STR = {"uint8": "|u1", "int8": "|i1", "float16": "<f2", "float32": "<f4", "int64": "<i8"}  # as save() writes them
_MAX_BITS = 1 << 24  # nbits / dim: far above any embedding width, and it keeps every size computation small
_MAX_HEADER_BYTES = 1 << 20
_MAX_METADATA_BYTES = 256 << 10  # metadata lives in the header, which is bounded above
_RESERVED_ID = ("is reserved: map_ids() returns -1 for 'no result' (faiss's padding), so a row with id -1 "
                "could not be told from one; use any other int64 id")


class IndexFileError(ValueError):
    """A saved index that cannot be trusted: wrong magic, unknown version, truncated, or checksum mismatch."""


# ----------------------------------------------------------------------------------------------
# Writing (and the rules a writer and a reader share)


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


# ----------------------------------------------------------------------------------------------
# Reading: the header field by field, the size, then the arrays, the checksum and the values


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
