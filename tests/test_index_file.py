"""Index files that pass the checksum but not the header rules: every case is a file crafted with a valid
CRC-32 (so only the header checks can catch it), must raise IndexFileError naming the file and the field,
and must be refused before any array is allocated (zero-itemsize dtypes once made tens of GiB)."""
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from jv5fast.index import EmbeddingIndex, HammingIndex, IndexFileError

MAGIC = b"JV5FIDX\x00"


def craft(path, header, payload=b"", version=2, hlen=None):
    """A file in the index format: magic, version, header length, the header (a dict -> JSON, or raw
    bytes), the payload, and a valid CRC-32 of everything before it."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = MAGIC + struct.pack("<II", version, len(hb) if hlen is None else hlen) + hb
    path.write_bytes(head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))))
    return path


def hamming_header(n=3, nbits=16, version=2, **over):
    h = {"nbits": nbits, **({"metadata": {}, "ids": None} if version >= 2 else {}), "kind": "HammingIndex",
         "arrays": [{"name": "codes", "dtype": "|u1", "shape": [n, nbits // 8]}]}
    h.update(over)
    return h


def embedding_header(n=3, dim=12, store="int8", version=2, **over):
    arrays = [{"name": "codes", "dtype": "|u1", "shape": [n, (dim + 7) // 8]},
              {"name": "vectors", "dtype": {"float32": "<f4", "float16": "<f2", "int8": "|i1"}[store],
               "shape": [n, dim]}]
    if store == "int8":
        arrays.append({"name": "scales", "dtype": "<f4", "shape": [n, 1]})
    h = {"dim": dim, "store": store, **({"metadata": {}, "ids": None, "texts": False} if version >= 2 else {}),
         "kind": "EmbeddingIndex", "arrays": arrays}
    h.update(over)
    return h


def embedding_payload(n=3, dim=12, store="int8", codes=None, vectors=None, scales=None):
    rng = np.random.default_rng()
    x = rng.standard_normal((n, dim)).astype(np.float32)
    codes = np.packbits(x > 0, axis=-1) if codes is None else codes
    if vectors is None:
        vectors = x.astype(store) if store != "int8" else np.clip(np.rint(x * 40), -127, 127).astype(np.int8)
    parts = [codes, vectors] + ([np.full((n, 1), 1 / 40, np.float32) if scales is None else scales]
                                if store == "int8" else [])
    return b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def expect_refused(path, cls, match):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(IndexFileError, match=match) as info:
            cls.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)  # every message names the file
    assert time.perf_counter() - t0 < 2 and peak < 1 << 20, peak  # refused before allocating anything
    return info.value


def test_craft_reproduces_save(tmp_path):
    """The helper writes exactly what save() writes, so the crafted cases below differ only where meant."""
    rng = np.random.default_rng()
    codes = rng.integers(0, 256, (3, 2), dtype=np.uint8)
    index = HammingIndex(16)
    index.add(codes)
    index.save(tmp_path / "a.jv5")
    crafted = craft(tmp_path / "b.jv5", hamming_header(), codes.tobytes())
    assert crafted.read_bytes() == (tmp_path / "a.jv5").read_bytes()
    for store in ("float32", "float16", "int8"):
        craft(tmp_path / f"{store}.jv5", embedding_header(store=store), embedding_payload(store=store))
        loaded = EmbeddingIndex.load(tmp_path / f"{store}.jv5")
        assert loaded.store == store and len(loaded) == 3
        assert loaded.search(np.ones(12, np.float32), 2)[1].shape == (1, 2)


@pytest.mark.parametrize("dtype", ["|S0", "<U0", "|V0"])
def test_zero_itemsize_dtype_refused_without_allocating(tmp_path, dtype):
    """A 130-byte file whose zero-itemsize array 'fits' in 0 bytes: once a multi-GiB np.empty."""
    header = hamming_header(n=20_000, nbits=8)
    header["arrays"][0].update(dtype=dtype, shape=[20_000, 20_000])
    expect_refused(craft(tmp_path / "s0.jv5", header), HammingIndex, r"'arrays\[0\]\.dtype' of 'codes'")
    header = embedding_header(store="float32")
    header["arrays"][1]["dtype"] = dtype
    expect_refused(craft(tmp_path / "u0.jv5", header), EmbeddingIndex, r"'arrays\[1\]\.dtype' of 'vectors'")


@pytest.mark.parametrize("case,dtype,match", [
    ("int32 scales", "<i4", r"'arrays\[2\]\.dtype' of 'scales' is '<i4'; .* as '<f4'"),
    ("float64 scales", "<f8", "of 'scales' is '<f8'"),
    ("big-endian scales", ">f4", "of 'scales' is '>f4'"),
    ("not a dtype", "banana", "of 'scales' is 'banana'"),
    ("not a string", 7, "of 'scales' is 7"),
])
def test_scales_dtype_must_be_float32(tmp_path, case, dtype, match):
    header = embedding_header()
    header["arrays"][2]["dtype"] = dtype
    expect_refused(craft(tmp_path / "x.jv5", header, embedding_payload()), EmbeddingIndex, match)


@pytest.mark.parametrize("store,index,dtype", [
    ("float32", 1, "<f2"), ("float32", 1, ">f4"), ("float16", 1, "<f4"), ("int8", 1, "|u1"),
    ("int8", 0, "|i1"), ("float32", 0, "<u1"), ("float16", 0, "|b1"),
])
def test_array_dtype_must_match_store(tmp_path, store, index, dtype):
    header = embedding_header(store=store)
    header["arrays"][index]["dtype"] = dtype
    name = ["codes", "vectors"][index]
    expect_refused(craft(tmp_path / "x.jv5", header, embedding_payload(store=store)), EmbeddingIndex,
                   rf"'arrays\[{index}\]\.dtype' of '{name}'")


@pytest.mark.parametrize("mutate,match", [
    (lambda h: h["arrays"].pop(), r"'arrays' names \['codes', 'vectors'\]; .* store 'int8' holds exactly"),
    # a duplicate name:
    (lambda h: h["arrays"].append(dict(h["arrays"][2])), "'arrays' names .*'scales', 'scales'"),
    (lambda h: h["arrays"].reverse(), "in that order"),
    (lambda h: h["arrays"][1].update(name="vecs"), "'arrays' names"),
    (lambda h: h["arrays"][1].update(name=None), "'arrays' names"),
    (lambda h: h.update(store="float32"), r"holds exactly \['codes', 'vectors'\]"),  # scales iff int8
    (lambda h: h["arrays"][0].pop("dtype"), r"'arrays\[0\]' must have exactly the keys"),
    (lambda h: h["arrays"][0].update(offset=0), r"'arrays\[0\]' must have exactly the keys"),
    (lambda h: h.update(arrays={"codes": 1}), "'arrays' must be a list of objects"),
    (lambda h: h.update(arrays=["codes"]), "'arrays' must be a list of objects"),
    (lambda h: h.update(arrays=None), "'arrays' must be a list"),
])
def test_array_names_exactly_those_of_the_kind(tmp_path, mutate, match):
    header = embedding_header()
    mutate(header)
    expect_refused(craft(tmp_path / "x.jv5", header, embedding_payload()), EmbeddingIndex, match)


@pytest.mark.parametrize("index,shape,match", [
    (0, [3], "two integers"),
    (0, [3, 2, 1], "two integers"),
    (0, [], "two integers"),
    (0, [-3, 2], "two integers"),
    (0, [3, -2], "two integers"),
    (0, [3.0, 2], "two integers"),
    (0, [True, 2], "two integers"),
    (0, ["3", 2], "two integers"),
    (0, None, "two integers"),
    (0, {"rows": 3}, "two integers"),
    (0, [3, 3], "width must be 2"),
    (1, [3, 11], "width must be 12"),
    (2, [3, 2], "width must be 1"),
    (1, [4, 12], "has 4 rows, but 'codes' has 3"),
    (2, [2, 1], "has 2 rows, but 'codes' has 3"),
])
def test_array_shapes_consistent_with_header(tmp_path, index, shape, match):
    header = embedding_header()
    header["arrays"][index]["shape"] = shape
    err = expect_refused(craft(tmp_path / "x.jv5", header, embedding_payload()), EmbeddingIndex, match)
    assert f"arrays[{index}].shape" in str(err)


@pytest.mark.parametrize("field,value,match", [
    ("nbits", 0, r"'nbits' must be an integer in 8\.\.16777216, got 0"),
    ("nbits", -8, "'nbits' must be an integer"),
    ("nbits", 12, "'nbits' must be a multiple of 8, got 12"),
    ("nbits", 16.0, "'nbits' must be an integer .* got 16.0"),
    ("nbits", True, "'nbits' must be an integer .* got True"),
    ("nbits", "16", "'nbits' must be an integer .* got '16'"),
    ("nbits", 2**40, "'nbits' must be an integer .* got 1099511627776"),
    ("nbits", None, "'nbits' must be an integer"),
    ("kind", "EmbeddingIndex", "holds a EmbeddingIndex, not a HammingIndex"),
    ("kind", 5, "holds a 5, not a HammingIndex"),
    ("kind", None, "holds a None"),
    ("extra", 1, r"header fields .* unexpected \['extra'\]"),
])
def test_hamming_header_fields(tmp_path, field, value, match):
    header = hamming_header()
    header[field] = value
    expect_refused(craft(tmp_path / "x.jv5", header, bytes(6)), HammingIndex, match)


def test_hamming_header_missing_fields(tmp_path):
    for field in ("nbits", "kind", "arrays"):
        header = hamming_header()
        del header[field]
        match = "holds a None" if field == "kind" else rf"missing \['{field}'\]"
        expect_refused(craft(tmp_path / "x.jv5", header, bytes(6)), HammingIndex, match)


@pytest.mark.parametrize("field,value,match", [
    ("dim", 0, "'dim' must be an integer in 1..16777216, got 0"),
    ("dim", 12.5, "'dim' must be an integer"),
    ("dim", False, "'dim' must be an integer .* got False"),
    ("dim", 2**30, "'dim' must be an integer"),
    ("store", "bfloat16", r"'store' must be one of \('float32', 'float16', 'int8'\), got 'bfloat16'"),
    ("store", 8, "'store' must be one of .* got 8"),
    ("store", ["int8"], "'store' must be one of"),
])
def test_embedding_header_fields(tmp_path, field, value, match):
    header = embedding_header()
    header[field] = value
    expect_refused(craft(tmp_path / "x.jv5", header, embedding_payload()), EmbeddingIndex, match)


@pytest.mark.parametrize("raw,match", [
    (b"[1, 2, 3]", "a JSON list, not an object"),
    (b'"HammingIndex"', "a JSON str, not an object"),
    (b"42", "a JSON int, not an object"),
    (b"{\"nbits\": 16, ", "not a valid JSON object"),
    (b"\xff\xfe{}", "not a valid JSON object"),  # not UTF-8
    (b'{"nbits": NaN}', "NaN is not JSON"),
    (b'{"nbits": Infinity}', "Infinity is not JSON"),
    (b'{"nbits": 16, "nbits": 8, "kind": "HammingIndex", "arrays": []}', r"duplicate key\(s\) \['nbits'\]"),
    (b"[" * 100_000 + b"]" * 100_000, "not a valid JSON object|not an object"),  # deep enough to recurse
    (b"", "not a valid JSON object"),
])
def test_header_not_a_json_object(tmp_path, raw, match):
    expect_refused(craft(tmp_path / "x.jv5", raw), HammingIndex, match)


def test_header_length_bounded_before_reading(tmp_path):
    path = craft(tmp_path / "x.jv5", hamming_header(), bytes(6), hlen=2**32 - 1)
    expect_refused(path, HammingIndex, "header length 4294967295 bytes is over the 1048576-byte limit")
    path = craft(tmp_path / "y.jv5", hamming_header(), bytes(6), hlen=5000)  # within the limit, past the end
    expect_refused(path, HammingIndex, "truncated inside the header")


def test_file_size_checked_against_header_before_allocating(tmp_path):
    header = hamming_header(n=10**9)  # 2 GB of codes promised, 6 bytes present
    expect_refused(craft(tmp_path / "x.jv5", header, bytes(6)), HammingIndex,
                   "truncated: the header describes 2000000.* bytes, found")
    expect_refused(craft(tmp_path / "y.jv5", hamming_header(n=2), bytes(6)), HammingIndex,
                   "has trailing bytes")
    header = embedding_header(n=10**6, dim=1000, store="float32")
    expect_refused(craft(tmp_path / "z.jv5", header, embedding_payload(store="float32")), EmbeddingIndex,
                   "truncated")


@pytest.mark.parametrize("store,bad,match", [
    ("float32", np.nan, "'vectors' row 1 is not finite"),
    ("float32", -np.inf, "'vectors' row 1 is not finite"),
    ("float16", np.inf, "'vectors' row 1 is not finite"),
    ("int8", 0.0, "'scales' row 1 is not finite and > 0"),
    ("int8", -0.5, "'scales' row 1 is not finite and > 0"),
    ("int8", np.nan, "'scales' row 1 is not finite and > 0"),
    ("int8", np.inf, "'scales' row 1 is not finite and > 0"),
])
def test_values_save_never_writes_are_refused(tmp_path, store, bad, match):
    """An int32-scale-like silent failure by value: NaN/inf vectors or non-positive scales would make every
    score of those rows NaN, inf or 0 without an error."""
    rng = np.random.default_rng()
    if store == "int8":
        vectors, scales = rng.integers(-127, 128, (3, 12), dtype=np.int8), np.full((3, 1), 0.02, np.float32)
        scales[1, 0] = bad
    else:
        vectors, scales = rng.standard_normal((3, 12)).astype(store), None
        vectors[1, 5] = bad
    payload = embedding_payload(store=store, vectors=vectors, scales=scales)
    with pytest.raises(IndexFileError, match=match) as info:
        EmbeddingIndex.load(craft(tmp_path / "x.jv5", embedding_header(store=store), payload))
    assert str(tmp_path / "x.jv5") in str(info.value)


def test_code_tail_bits_past_dim_are_refused(tmp_path):
    """dim=12: the last code byte holds 4 bits; bits past dim are zero in every saved index."""
    codes = np.zeros((3, 2), np.uint8)
    codes[2, 1] = 0x01
    payload = embedding_payload(codes=codes)
    with pytest.raises(IndexFileError, match="'codes' has bits set past dim=12"):
        EmbeddingIndex.load(craft(tmp_path / "x.jv5", embedding_header(), payload))
    vectors = np.clip(np.rint(np.random.default_rng().standard_normal((3, 12)) * 40), -127, 127).astype(np.int8)
    vectors[2, 8:] = [1, -1, 0, 0]
    codes = np.packbits(vectors > 0, axis=-1)
    codes[2, 1] |= 0x10  # a real bit over a stored 0 may be either (see test_code_bits_must_fit_the_vectors)
    path = craft(tmp_path / "y.jv5", embedding_header(), embedding_payload(codes=codes, vectors=vectors))
    assert len(EmbeddingIndex.load(path)) == 3


def test_every_saved_index_loads(tmp_path):
    """The strict loader accepts whatever save() writes: all stores, odd dims, empty indexes."""
    rng = np.random.default_rng()
    for store in ("float32", "float16", "int8"):
        for dim, n in ((1, 5), (13, 0), (64, 33)):
            index = EmbeddingIndex(dim, store=store)
            if n:
                index.add(rng.standard_normal((n, dim)).astype(np.float32))
            index.save(tmp_path / "e.jv5")
            loaded = EmbeddingIndex.load(tmp_path / "e.jv5")
            assert (loaded.dim, loaded.store, len(loaded)) == (dim, store, n)
            np.testing.assert_array_equal(loaded._vecs.data, index._vecs.data)
            np.testing.assert_array_equal(loaded.binary.codes, index.binary.codes)
    for nbits in (8, 40, 1024):
        index = HammingIndex(nbits)
        index.add(rng.integers(0, 256, (7, nbits // 8), dtype=np.uint8))
        index.save(tmp_path / "h.jv5")
        np.testing.assert_array_equal(HammingIndex.load(tmp_path / "h.jv5").codes, index.codes)


# ----------------------------------------------------------------------------------------------
# format 2: metadata, external ids, texts (and format 1 files still load)


def strings_payload(strings):
    data = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in data])]).astype("<i8")
    return offsets.tobytes(), b"".join(data), len(data) + 1, sum(map(len, data))


def v2_with_ids(tmp_path, ids, texts=None, offsets=None, mutate=None, base=None):
    """An EmbeddingIndex file (float32, n=3, dim=12) with str ids (and texts), crafted with a valid CRC."""
    h = embedding_header(store="float32", ids="str", texts=texts is not None)
    off, blob, n_off, n_blob = strings_payload(ids)
    if offsets is not None:
        off = np.asarray(offsets, "<i8").tobytes()
    h["arrays"] += [{"name": "id_offsets", "dtype": "<i8", "shape": [n_off, 1]},
                    {"name": "id_bytes", "dtype": "|u1", "shape": [n_blob, 1]}]
    payload = (base or embedding_payload(store="float32")) + off + blob
    if texts is not None:
        toff, tblob, t_off, t_blob = strings_payload(texts)
        h["arrays"] += [{"name": "text_offsets", "dtype": "<i8", "shape": [t_off, 1]},
                        {"name": "text_bytes", "dtype": "|u1", "shape": [t_blob, 1]}]
        payload += toff + tblob
    if mutate:
        mutate(h)
    return craft(tmp_path / "v2.jv5", h, payload)


def test_v2_crafted_reproduces_save_and_v1_still_loads(tmp_path):
    rng = np.random.default_rng()
    index = EmbeddingIndex(12, store="float32")
    payload = embedding_payload(store="float32")
    codes = np.frombuffer(payload[:6], np.uint8).reshape(3, 2)
    vecs = np.frombuffer(payload[6:], "<f4").reshape(3, 12)
    index.add(vecs, ids=["a", "bé", "c"], texts=["x", "", "zz"])
    assert (index.binary.codes == codes).all()
    index.save(tmp_path / "saved.jv5")
    crafted = v2_with_ids(tmp_path, ["a", "bé", "c"], texts=["x", "", "zz"], base=payload)
    assert crafted.read_bytes() == (tmp_path / "saved.jv5").read_bytes()
    # format 1 (no metadata / ids / texts fields): loads with none of them
    codes = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    old = craft(tmp_path / "v1.jv5", hamming_header(n=5, nbits=24, version=1), codes.tobytes(), version=1)
    loaded = HammingIndex.load(old)
    assert loaded.ids is None and loaded.metadata == {} and (loaded.codes == codes).all()
    old = craft(tmp_path / "v1e.jv5", embedding_header(version=1), embedding_payload(), version=1)
    assert len(EmbeddingIndex.load(old)) == 3 and EmbeddingIndex.load(old).texts is None
    # a format 1 header with format 2 fields, or the reverse, is refused
    expect_refused(craft(tmp_path / "mix.jv5", hamming_header(n=5, nbits=24), codes.tobytes(), version=1),
                   HammingIndex, r"unexpected \['ids', 'metadata'\]")
    expect_refused(craft(tmp_path / "mix2.jv5", hamming_header(n=5, nbits=24, version=1), codes.tobytes()),
                   HammingIndex, r"missing \['ids', 'metadata'\]")


@pytest.mark.parametrize("kw,match", [
    ({"offsets": [0, 1, 0, 3]}, r"'id_offsets' decreases at row 2 \(1 -> 0\)"),
    ({"offsets": [1, 1, 2, 3]}, r"'id_offsets' must run from 0 to 3 \(the length of 'id_bytes'\), got 1..3"),
    ({"offsets": [0, 1, 2, 2]}, "must run from 0 to 3"),
    ({"offsets": [0, 1, 2, 2**62]}, "must run from 0 to 3"),
    ({"offsets": [0, -5, 2, 3]}, "decreases at row 1"),
    ({"ids": [b"a", b"\xff", b"c"]}, "'id_bytes' row 1 is not valid UTF-8"),
    ({"ids": ["a", "é", "c"], "offsets": [0, 1, 2, 4]}, "'id_bytes' row 1 is not valid UTF-8"),  # splits a char
    ({"ids": ["a", "b", "a"]}, r"id 'a' appears twice \(rows 0 and 2\)"),
    ({"texts": ["x", b"\xc3", "z"]}, "'text_bytes' row 1 is not valid UTF-8"),
    ({"mutate": lambda h: h.update(ids="int32")}, "'ids' must be null, 'int64' or 'str', got 'int32'"),
    ({"mutate": lambda h: h.update(ids=True)}, "'ids' must be null"),
    ({"mutate": lambda h: h.update(metadata=[1])}, "'metadata' must be a JSON object"),
    ({"mutate": lambda h: h.update(texts=1)}, "'texts' must be true or false"),
    ({"mutate": lambda h: h.update(texts=True)}, r"holds exactly .*'text_offsets', 'text_bytes'\]"),
    ({"mutate": lambda h: h.update(ids=None)}, r"holds exactly \['codes', 'vectors'\], in that order"),
    ({"mutate": lambda h: h["arrays"][2].update(shape=[3, 1])}, "offsets need one more than the 3 rows"),
    ({"mutate": lambda h: h["arrays"][3].update(shape=[10**12, 1])}, "truncated: the header describes"),
    ({"mutate": lambda h: h["arrays"][2].update(dtype="<i4")}, "stores id_offsets as '<i8'"),
])
def test_v2_ids_and_texts_are_checked(tmp_path, kw, match):
    kw = {"ids": ["a", "b", "c"], **kw}
    err = expect_refused(v2_with_ids(tmp_path, **kw), EmbeddingIndex, match)
    assert isinstance(err, ValueError)


def test_int_ids_rows_and_duplicates(tmp_path):
    h = hamming_header(ids="int64")
    h["arrays"].append({"name": "ids", "dtype": "<i8", "shape": [3, 1]})
    codes = bytes(6)
    ok = craft(tmp_path / "ok.jv5", h, codes + np.array([5, -9, 2**62], "<i8").tobytes())
    assert HammingIndex.load(ok).ids.tolist() == [5, -9, 2**62]
    dup = craft(tmp_path / "dup.jv5", h, codes + np.array([5, -9, 5], "<i8").tobytes())
    expect_refused(dup, HammingIndex, r"id 5 appears twice \(rows 0 and 2\)")
    h["arrays"][1]["shape"] = [2, 1]
    expect_refused(craft(tmp_path / "rows.jv5", h, codes + bytes(16)), HammingIndex,
                   "'ids' has 2 rows, but 'codes' has 3")


def test_oversized_metadata_is_a_file_error_naming_file_and_field(tmp_path):
    """A header within its 1 MiB bound may carry metadata over the 256 KiB that save() allows: refused as
    IndexFileError naming the file and the field, not as the constructor's plain ValueError."""
    big = {"x": "a" * (300 << 10)}
    for cls, header, payload in ((HammingIndex, hamming_header(metadata=big), bytes(6)),
                                 (EmbeddingIndex, embedding_header(metadata=big), embedding_payload())):
        path = craft(tmp_path / f"{cls.__name__}.jv5", header, payload)
        with pytest.raises(IndexFileError, match=r"header field 'metadata': metadata is \d+ bytes as JSON, over") as e:
            cls.load(path)
        assert str(path) in str(e.value)


def test_int_id_minus_one_in_a_file_is_refused(tmp_path):
    h = hamming_header(ids="int64")
    h["arrays"].append({"name": "ids", "dtype": "<i8", "shape": [3, 1]})
    bad = craft(tmp_path / "m1.jv5", h, bytes(6) + np.array([5, -1, 2], "<i8").tobytes())
    expect_refused(bad, HammingIndex, r"array 'ids' row 1 holds the id -1, which is reserved")


# ----------------------------------------------------------------------------------------------
# sign codes must fit the stored vectors (a valid CRC over permuted code rows once gave wrong rows)


def recrc(path, mutate_codes):
    """Rewrite a saved EmbeddingIndex file with its 'codes' array (the first one) changed by
    ``mutate_codes(codes) -> codes`` and the CRC-32 recomputed, as a crafted file would be."""
    raw = bytearray(path.read_bytes())
    hlen = struct.unpack("<I", raw[12:16])[0]
    shape = json.loads(raw[16 : 16 + hlen])["arrays"][0]["shape"]
    start, size = 16 + hlen, shape[0] * shape[1]
    codes = np.frombuffer(bytes(raw[start : start + size]), np.uint8).reshape(shape)
    raw[start : start + size] = np.ascontiguousarray(mutate_codes(codes.copy()), np.uint8).tobytes()
    raw[-4:] = struct.pack("<I", zlib.crc32(bytes(raw[:-4])))
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("store", ["float32", "float16", "int8"])
def test_permuted_code_rows_are_refused(tmp_path, store):
    """Code rows rolled by one under a recomputed CRC: before this check the file loaded and every stored vector
    found another row at k=1. Now the first row whose codes do not fit its vector is named."""
    rng = np.random.default_rng()
    x = rng.standard_normal((57, 77)).astype(np.float32)
    index = EmbeddingIndex(77, store=store)
    index.add(x, ids=[f"r{i}" for i in range(57)])
    index.save(tmp_path / "ok.jv5")
    np.testing.assert_array_equal(EmbeddingIndex.load(tmp_path / "ok.jv5").search(x, 1)[1][:, 0], np.arange(57))
    path = recrc(tmp_path / "ok.jv5", lambda c: np.roll(c, 1, axis=0))
    with pytest.raises(IndexFileError, match=r"array 'codes' row 0 does not match the signs of array 'vectors' "
                                             r"row 0 \(\d+ of 77 bits disagree; first: dimension \d+") as info:
        EmbeddingIndex.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("store,value,bit,ok", [
    ("float32", 0.0, 1, False),   # float32 stores x itself: the bit is exactly x > 0
    ("float32", -0.0, 1, False),
    ("float32", 0.5, 0, False),
    ("float32", -0.5, 1, False),
    ("float16", 0.0, 1, True),    # +0.0 may be a tiny x > 0 rounded to zero
    ("float16", 0.0, 0, True),
    ("float16", -0.0, 1, False),  # -0.0 comes only from x <= 0
    ("float16", 0.5, 0, False),
    ("float16", -0.5, 1, False),
    ("int8", 0, 1, True),         # 0 is any |x| < scale / 2, of either sign
    ("int8", 0, 0, True),
    ("int8", 3, 0, False),
    ("int8", -3, 1, False),
])
def test_code_bits_must_fit_the_vectors(tmp_path, store, value, bit, ok):
    """The exact rule per store: a bit must be 1 where the stored value is > 0, 0 where it is < 0, and may be
    either only where save() itself could have written either (a stored zero of float16 +0.0 or int8 0)."""
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 12)).astype(np.float32)
    x[x == 0] = 1.0
    vectors = x.astype(store) if store != "int8" else np.clip(np.rint(x * 40), -127, 127).astype(np.int8)
    vectors[vectors == 0] = 1
    vectors[1, 5] = value
    codes = np.packbits(vectors > 0, axis=-1)
    codes[1, 0] = (codes[1, 0] & ~np.uint8(0x04)) | np.uint8(bit << 2)  # dimension 5 = bit 7 - 5 of byte 0
    path = craft(tmp_path / "x.jv5", embedding_header(store=store), embedding_payload(store=store, codes=codes,
                                                                                        vectors=vectors))
    if ok:
        loaded = EmbeddingIndex.load(path)
        np.testing.assert_array_equal(loaded.binary.codes, codes)  # kept as stored, not recomputed
    else:
        with pytest.raises(IndexFileError, match=rf"'codes' row 1 does not match .*\(1 of 12 bits disagree; first: "
                                                 rf"dimension 5, code bit {bit}"):
            EmbeddingIndex.load(path)


@pytest.mark.parametrize("store", ["float32", "float16", "int8"])
def test_valid_file_with_zeroed_values_loads_and_searches_identically(tmp_path, store):
    """Values that the store rounds to zero keep their sign bit in the codes (float16 underflow, int8 |x| below
    half a step): the check accepts them, and the loaded index searches exactly as the one that saved it."""
    rng = np.random.default_rng()
    x = rng.standard_normal((300, 40)).astype(np.float32)
    x[:, :8] *= 1e-9   # float16 flushes these to +-0.0 and int8 rounds them to 0; their code bits stay x > 0
    index = EmbeddingIndex(40, store=store)
    index.add(x)
    assert store == "float32" or ((index._vecs.data == 0) & (x > 0)).any()  # the case the rule must allow
    index.save(tmp_path / "z.jv5")
    loaded = EmbeddingIndex.load(tmp_path / "z.jv5")
    np.testing.assert_array_equal(loaded.binary.codes, index.binary.codes)
    q = rng.standard_normal((9, 40)).astype(np.float32)
    for got, want in zip(loaded.search(q, 7, rescore_multiplier=2), index.search(q, 7, rescore_multiplier=2)):
        np.testing.assert_array_equal(got, want)
