"""Reading a ``jv5fast embed-corpus`` output folder: ``HammingIndex.from_parquet``, ``EmbeddingIndex.from_parquet``.

The folder is ``manifest.json`` (format, version, the embedding settings, the part files and their row counts)
and the Parquet parts it lists, each with ``id`` (int64 or string) and ``embedding`` (fixed-size list of
float32/float16, or fixed-size binary sign codes) columns. Like the index file, nothing is trusted: the
manifest is read bounded, every field and part name is checked, links out of the folder are refused, and each
part's schema, settings and row count are checked before its rows are added. pyarrow is the optional
``parquet`` extra, imported on first use.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import _hamming
from .format import _MAX_BITS, _header_object, _reject_constant
from .rows import _as_float, _need

_MAX_MANIFEST_BYTES = 64 << 20  # embed-corpus manifest.json: a few hundred bytes per part
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


def hamming_from_parquet(cls, folder, device):
    """``HammingIndex.from_parquet``: float output packed by sign, binary output as is."""
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


def embedding_from_parquet(cls, folder, store, device):
    """``EmbeddingIndex.from_parquet``: float output only, stored in ``store`` precision."""
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
