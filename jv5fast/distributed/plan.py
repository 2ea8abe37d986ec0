"""embed-corpus planning: the input files, and the units each is cut into (a unit: ``rows_per_part`` rows of a
Parquet file, or lines of a JSON Lines file; one unit becomes one part).

Planning reads every input once on the driver: its sha256, its rows, the bad ones (null or non-string text,
missing id, an id already seen in this or an earlier input) and its units. Trade-off: the driver holds every
id once (duplicate detection across files): about 110 bytes per row with int64 ids, 130 with 12-character
string ids (tracemalloc).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

INPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
MAX_LINE_BYTES = 64 << 20  # a longer JSON Lines line is refused (never read whole into memory)
_ROW_BITS = 40  # Planner.seen packs (input index, line/row) into one int: 2**40 rows per input


class CorpusError(ValueError):
    """A problem with the input, the output folder or the arguments: one line for the user (exit 2)."""


# ---- inputs --------------------------------------------------------------------------------------------
def _inside(path, folder_real) -> bool:
    """Whether ``path`` (or the file a link there points to) lies in the real folder ``folder_real``."""
    here = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    return any(p == folder_real or p.startswith(folder_real + os.sep) for p in (here, os.path.realpath(path)))


def find_inputs(spec: str, output: str, log=None) -> list:
    """Absolute paths of the input files: ``spec`` is a file, a folder (its .parquet / .jsonl files, not
    recursive) or a glob (``**`` recursive). Sorted. Files a folder or glob matches inside ``output`` (links
    resolved) are left out, so the command that wrote the folder can be rerun to resume; a single input file
    inside it is refused."""
    known = " or ".join(INPUT_FORMATS)
    out_real = os.path.realpath(output)
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec)
                 if not n.startswith(".") and os.path.splitext(n)[1].lower() in INPUT_FORMATS
                 and os.path.isfile(os.path.join(spec, n))]
        if _inside(os.path.join(spec, "x"), out_real):
            raise CorpusError(f"--input {spec} lies inside --output {output}; keep inputs out of the output folder")
    elif glob.has_magic(spec):
        files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    elif os.path.isfile(spec):
        if os.path.splitext(spec)[1].lower() not in INPUT_FORMATS:
            raise CorpusError(f"--input {spec}: expected a {known} file, a folder or a glob")
        if _inside(spec, out_real):
            raise CorpusError(f"--input {spec} lies inside --output {output}; keep inputs out of the output folder")
        files = [spec]
    else:
        raise CorpusError(f"--input {spec}: no such file or folder")
    inside = [f for f in files if _inside(f, out_real)]
    if inside:
        files = [f for f in files if f not in set(inside)]
        if log is not None:
            log(f"--input {spec}: leaving out {len(inside)} file(s) inside --output {output}")
    if not files:
        where = " outside --output" if inside else ""
        raise CorpusError(f"--input {spec}: the folder holds no {known} files{where}" if os.path.isdir(spec)
                          else f"--input {spec}: the pattern matches no files{where}")
    other = [f for f in files if os.path.splitext(f)[1].lower() not in INPUT_FORMATS]
    if other:
        raise CorpusError(f"--input {spec} matches {other[0]}, which is not {known}; narrow the pattern")
    return sorted({os.path.abspath(f) for f in files})


@dataclasses.dataclass
class Unit:
    """Rows [start, stop) of one input (lines, for JSON Lines) and the ids to embed from them, in order."""
    input: str
    start: int
    stop: int
    offset: int  # byte offset of line ``start`` (JSON Lines); 0 for Parquet
    ids: list  # good rows' ids, input order
    skip: list  # row (line) indices within [start, stop) that are not embedded: bad rows, blank lines

    @property
    def key(self):
        return (self.input, self.start, self.stop)


@dataclasses.dataclass
class InputPlan:
    path: str
    format: str
    size: int
    mtime_ns: int
    sha256: str
    rows: int  # rows (Parquet) or lines (JSON Lines)
    units: list

    def record(self) -> dict:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256, "rows": self.rows}


def _encodes(s: str) -> bool:
    """Whether ``s`` is valid Unicode (JSON's \\ud800 escapes give lone surrogates, which Arrow refuses)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Planner:
    """Scans inputs in order, validating rows and removing duplicate ids (the first occurrence wins)."""

    def __init__(self, id_column, text_column, rows_per_part, id_type=None):
        self.id_column, self.text_column, self.rows_per_part = id_column, text_column, rows_per_part
        self.id_type = id_type  # "int64" | "string", fixed by the first good id (or the manifest)
        self.paths = []  # inputs scanned so far, in order
        # id -> input index << _ROW_BITS | its line (JSON Lines, 1-based) or row (Parquet): one int per row,
        # decoded only to name the first occurrence of a duplicate
        self.seen = {}
        self.errors = []  # {"file", "line"|"row", "id", "reason"}

    def _first(self, packed):
        path = self.paths[packed >> _ROW_BITS]
        kind = "line" if INPUT_FORMATS[os.path.splitext(path)[1].lower()] == "jsonl" else "row"
        return f"{path} {kind} {packed & ((1 << _ROW_BITS) - 1)}"

    def _id_reason(self, v, missing):
        if missing:
            return f"missing id (no {self.id_column!r} field)"
        if v is None:
            return "id is null"
        kind = "int64" if isinstance(v, int) and not isinstance(v, bool) else "string" if isinstance(v, str) else None
        if kind is None:
            return f"id is {type(v).__name__} ({v!r:.40}); ids must be integers or strings"
        if kind == "int64" and not _INT64[0] <= v <= _INT64[1]:
            return f"id {v} does not fit in int64"
        if kind == "string" and not _encodes(v):
            return "id is not valid Unicode (a lone surrogate such as \\ud800)"
        if self.id_type is None:
            self.id_type = kind
        if kind != self.id_type:
            return (f"id is {'an integer' if kind == 'int64' else 'a string'}, but the corpus's ids are "
                    f"{'integers' if self.id_type == 'int64' else 'strings'} (set by the first row)")
        return None

    def _row(self, path, where, idx, ident, text, missing_id=False, missing_text=False):
        """Check one row; return True if it is embedded, else record why not."""
        reason = self._id_reason(ident, missing_id)
        if reason is None:
            if missing_text:
                reason = f"no {self.text_column!r} field"
            elif text is None:
                reason = "text is null"
            elif not isinstance(text, str):
                reason = f"text is {type(text).__name__} ({text!r:.40}), expected a string"
            elif not _encodes(text):
                reason = "text is not valid Unicode (a lone surrogate such as \\ud800)"
        if reason is None:
            first = self.seen.get(ident)
            if first is not None:
                reason = f"duplicate id (first seen in {self._first(first)})"
            else:
                self.seen[ident] = (len(self.paths) - 1) << _ROW_BITS | where[1]
                return True
        self.errors.append({"file": path, where[0]: where[1], "id": None if missing_id else ident, "reason": reason})
        return False

    def scan(self, path) -> InputPlan:
        fmt = INPUT_FORMATS[os.path.splitext(path)[1].lower()]
        st = os.stat(path)
        self.paths.append(path)
        scan = self._scan_jsonl if fmt == "jsonl" else self._scan_parquet
        sha, rows, units = scan(path)
        st2 = os.stat(path)
        if (st.st_size, st.st_mtime_ns) != (st2.st_size, st2.st_mtime_ns):
            raise CorpusError(f"{path} changed while it was being read; run again once it is complete")
        return InputPlan(path, fmt, st.st_size, st.st_mtime_ns, sha, rows, units)

    def _new_unit(self, path, start, offset):
        return Unit(path, start, start + self.rows_per_part, offset, [], [])

    def _scan_jsonl(self, path):
        h = hashlib.sha256()
        units, unit, offset, n = [], None, 0, 0
        limit = MAX_LINE_BYTES
        with open(path, "rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(limit + 1), b"")):
                if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                    raise CorpusError(f"{path} line {n + 1} is longer than {limit >> 20} MiB ({limit} bytes); "
                                      f"embed-corpus refuses such lines (a text that long would be cut at the "
                                      f"model's max length anyway); split or shorten it")
                h.update(raw)
                if n % self.rows_per_part == 0:
                    unit = self._new_unit(path, n, offset)
                    units.append(unit)
                offset += len(raw)
                ident, ok = self._jsonl_row(path, n, raw)
                if ok:
                    unit.ids.append(ident)
                else:
                    unit.skip.append(n)
            rows = n + 1 if offset else 0
        if units:
            units[-1].stop = rows
        return h.hexdigest(), rows, units

    def _jsonl_row(self, path, n, raw):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            return None, False  # a blank line is no row (a trailing newline, a separator)
        where = ("line", n + 1)
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            self.errors.append({"file": path, "line": n + 1, "id": None, "reason": f"not valid UTF-8 ({e.reason})"})
            return None, False
        except (ValueError, RecursionError) as e:  # also an integer over Python's 4300-digit limit
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" \
                if isinstance(e, RecursionError) else str(e).split(";")[0][:200]
            self.errors.append({"file": path, "line": n + 1, "id": None, "reason": f"not valid JSON ({msg})"})
            return None, False
        if not isinstance(obj, dict):
            self.errors.append({"file": path, "line": n + 1, "id": None,
                                "reason": f"expected a JSON object, got {type(obj).__name__}"})
            return None, False
        ident = obj.get(self.id_column)
        ok = self._row(path, where, n, ident, obj.get(self.text_column), missing_id=self.id_column not in obj,
                       missing_text=self.text_column not in obj)
        return ident, ok

    def _parquet_columns(self, path, pf):
        import pyarrow as pa
        names = pf.schema_arrow.names
        for flag, col in (("--id-column", self.id_column), ("--text-column", self.text_column)):
            if col not in names:
                raise CorpusError(f"{path} has no column {col!r} ({flag}); its columns: {names}")
        id_t = pf.schema_arrow.field(self.id_column).type
        text_t = pf.schema_arrow.field(self.text_column).type
        if pa.types.is_integer(id_t):
            kind = "int64"
        elif pa.types.is_string(id_t) or pa.types.is_large_string(id_t):
            kind = "string"
        else:
            raise CorpusError(f"{path}: column {self.id_column!r} is {id_t}; ids must be integers or strings")
        if self.id_type is not None and kind != self.id_type:
            raise CorpusError(f"{path}: column {self.id_column!r} holds {kind} ids, but earlier inputs' ids are "
                              f"{self.id_type}; give every input the same id type")
        if not (pa.types.is_string(text_t) or pa.types.is_large_string(text_t) or pa.types.is_null(text_t)):
            raise CorpusError(f"{path}: column {self.text_column!r} is {text_t}; texts must be strings")
        self.id_type = kind

    def _scan_parquet(self, path):
        import pyarrow.parquet as pq
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise CorpusError(f"{path} is not a readable Parquet file ({e})") from None
        self._parquet_columns(path, pf)
        units, row = [], 0
        for batch in pf.iter_batches(batch_size=self.rows_per_part, columns=[self.id_column, self.text_column]):
            # iter_batches may return batches smaller than asked (row group ends): slice units by row number
            ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            for ident, text in zip(ids, texts):
                if row % self.rows_per_part == 0:
                    units.append(self._new_unit(path, row, 0))
                if self._row(path, ("row", row), row, ident, text):
                    units[-1].ids.append(ident)
                else:
                    units[-1].skip.append(row)
                row += 1
        if units:
            units[-1].stop = row
        return h.hexdigest(), row, units
