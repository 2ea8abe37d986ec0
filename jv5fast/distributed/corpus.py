"""``embed-corpus``: Parquet / JSON Lines in, Parquet parts plus ``manifest.json`` out, resumable, exactly once.

The driver plans, Ray embeds, the driver commits. Planning reads every input once on the driver: its
sha256, its rows, the bad ones (null or non-string text, missing id, an id already seen in this or an
earlier input) and its units (blocks of ``rows_per_part`` rows, or lines of a JSON Lines file). Units not
yet in the manifest stream through Ray Data: a reader task per unit, then the ``EmbedWorker`` actor pool.
The driver gathers each unit's rows by id and commits it: temp file, fsync, rename, then the manifest
(temp + os.replace). A killed driver loses at most the units in flight; a rerun treats the folder as
untrusted (every manifest field, every listed part's footer), refuses any recorded input whose sha256
changed once a part exists, checks each committed unit's row count and id digest against the new plan,
and does only what the manifest lacks. Trade-off: the driver holds every id once (duplicate detection
across files): about 110 bytes per row with int64 ids, 130 with 12-character string ids (tracemalloc).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time

FORMAT, VERSION = "jv5fast-embed-corpus", 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
LOCK = ".jv5fast-embed-corpus.lock"
INPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_TEMP = re.compile(r"^\.(part-\d{5,}\.parquet|manifest\.json|errors\.jsonl)\.tmp-\d+$")  # ours, from a dead run
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
MAX_LINE_BYTES = 64 << 20  # a longer JSON Lines line is refused (never read whole into memory)
MAX_MANIFEST_BYTES = 64 << 20  # a few hundred bytes per part
_ROW_BITS = 40  # Planner.seen packs (input index, line/row) into one int: 2**40 rows per input
# The flag that sets each setting (refusal messages name it).
SETTING_FLAGS = {"model": "--model", "task": "--task", "prompt_name": "--prompt-name", "prompt": "--prompt-name",
                 "truncate_dim": "--truncate-dim", "dim": "--truncate-dim", "precision": "--precision",
                 "normalize": "normalize", "id_column": "--id-column", "text_column": "--text-column",
                 "device": "--num-gpus-per-worker", "dtype": "--dtype", "max_length": "--max-length"}


def _show(v):
    return "(unset)" if v is None else repr(v)


def ids_digest(ids) -> str:
    """sha256 of a unit's ids in order (its JSON): recorded per part, compared with the plan on resume."""
    h = hashlib.sha256()
    for lo in range(0, len(ids), 4096):
        h.update(json.dumps(ids[lo:lo + 4096], separators=(",", ":")).encode("ascii"))
    return h.hexdigest()


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


# ---- one unit in one actor: read it (the input path must be readable on every node), embed it ------------
class UnitWorker:
    """A Ray actor (built on ``EmbedWorker``) taking unit descriptors: reads each unit's good rows itself, so
    no extra reader processes compete with the actors for cores, and yields them embedded, ``batch_size``
    rows at a time, as (id, _unit, embedding, _num_tokens)."""

    def __init__(self, settings, engine_kwargs=None, threads=None, batch_size=256):
        from .dataset import EmbedWorker
        self.worker = EmbedWorker(settings, engine_kwargs, threads, count_tokens=True)
        self.batch_size = batch_size

    def __call__(self, batch):
        for u in batch.to_pylist():
            rows = _read_one(u)
            for lo in range(0, rows.num_rows, self.batch_size):
                chunk = rows.slice(lo, self.batch_size)
                yield self.worker.embed_table(chunk, "text", "id").drop_columns(["text"])


def _read_one(u):
    import pyarrow as pa
    st = os.stat(u["path"])
    if (st.st_size, st.st_mtime_ns) != (u["size"], u["mtime_ns"]):
        raise RuntimeError(f"{u['path']} changed while embed-corpus was running (size/mtime differ from the plan)")
    skip = set(u["skip"])
    ids, texts = [], []
    if u["format"] == "jsonl":
        with open(u["path"], "rb") as f:
            f.seek(u["offset"])
            for n in range(u["start"], u["stop"]):
                raw = f.readline()
                if n in skip:
                    continue
                obj = json.loads(raw.decode("utf-8"))
                ids.append(obj[u["id_column"]])
                texts.append(obj[u["text_column"]])
    else:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(u["path"])
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > u["start"] and row < u["stop"]:
                groups.append(g)
                first = row if first is None else first
            row += n
        t = pf.read_row_groups(groups, columns=[u["id_column"], u["text_column"]])
        t = t.slice(u["start"] - first, u["stop"] - u["start"])
        keep = [i for i in range(t.num_rows) if u["start"] + i not in skip]
        if len(keep) != t.num_rows:
            t = t.take(pa.array(keep, pa.int64()))
        ids, texts = t.column(0).to_pylist(), t.column(1).to_pylist()
    id_type = pa.int64() if u["id_type"] == "int64" else pa.string()
    return pa.table({"id": pa.array(ids, id_type), "text": pa.array(texts, pa.string()),
                     "_unit": pa.array([u["unit"]] * len(ids), pa.int64())})


# ---- the output folder -----------------------------------------------------------------------------------
def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(folder, name, write):
    """``write(fileobj)`` into ``.NAME.tmp-PID``, fsync, rename to NAME, fsync the folder."""
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _is_int(v, lo=None):
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def validate_manifest(m, path):
    """Check every field of a manifest read from disk (untrusted: edited, truncated, or not ours); a
    CorpusError names the field, what it must be and what it holds."""
    def bad(field, want, got):
        raise CorpusError(f"{path}: {field} must be {want}, got {got!r:.120}; the manifest was edited or not "
                          f"written by jv5fast: restore it, or give another --output folder")

    if not isinstance(m, dict):
        bad("the manifest", "a JSON object", m)
    if m.get("format") != FORMAT:
        raise CorpusError(f"{path} is not an embed-corpus manifest (format {m.get('format')!r:.60}, expected "
                          f"{FORMAT!r}); give another --output folder")
    if m.get("version") != VERSION or isinstance(m.get("version"), bool):
        raise CorpusError(f"{path} is version {m.get('version')!r:.40}; this jv5fast writes version {VERSION}")
    missing = [k for k in ("settings", "engine", "rows_per_part", "id_type", "inputs", "parts", "errors",
                           "error_rows", "complete") if k not in m]
    if missing:
        bad(f"field {missing[0]!r}", "present", "nothing")
    for key in ("settings", "engine"):
        if not isinstance(m[key], dict):
            bad(f"field {key!r}", "a JSON object", m[key])
    if "device" not in m["engine"]:  # 99d0ca0 recorded neither the device nor the parts' id digests
        raise CorpusError(f"{path} was written by an earlier jv5fast, which did not record the compute device, "
                          f"dtype and each part's ids; its parts cannot be checked. Give another --output folder")
    ck = m["engine"].get("checkpoint")
    if ck is not None and not (isinstance(ck, list) and all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and _is_int(e[1], 0) and _is_int(e[2])
            for e in ck)):
        bad("field 'engine.checkpoint'", "a list of [file name, size, mtime_ns]", ck)
    if not _is_int(m["rows_per_part"], 1):
        bad("field 'rows_per_part'", "a positive integer", m["rows_per_part"])
    if m["id_type"] not in (None, "int64", "string"):
        bad("field 'id_type'", "null, 'int64' or 'string'", m["id_type"])
    if m["errors"] not in (None, ERRORS):
        bad("field 'errors'", f"null or {ERRORS!r}", m["errors"])
    if not _is_int(m["error_rows"], 0):
        bad("field 'error_rows'", "an integer >= 0", m["error_rows"])
    if not isinstance(m["complete"], bool):
        bad("field 'complete'", "true or false", m["complete"])
    if not isinstance(m["inputs"], list):
        bad("field 'inputs'", "a list", m["inputs"])
    rows_of = {}
    for i, r in enumerate(m["inputs"]):
        f = f"field 'inputs[{i}]"
        if not isinstance(r, dict):
            bad(f + "'", "a JSON object", r)
        if not isinstance(r.get("path"), str) or not os.path.isabs(r["path"]) or "\0" in r["path"]:
            bad(f + ".path'", "an absolute file path", r.get("path"))
        if r["path"] in rows_of:
            bad(f + ".path'", "listed once", r["path"])
        if r.get("format") not in ("parquet", "jsonl"):
            bad(f + ".format'", "'parquet' or 'jsonl'", r.get("format"))
        for k in ("size", "rows"):
            if not _is_int(r.get(k), 0):
                bad(f + f".{k}'", "an integer >= 0", r.get(k))
        if not _is_int(r.get("mtime_ns")):
            bad(f + ".mtime_ns'", "an integer", r.get("mtime_ns"))
        if not isinstance(r.get("sha256"), str) or not _SHA256.match(r["sha256"]):
            bad(f + ".sha256'", "64 lowercase hex digits", r.get("sha256"))
        rows_of[r["path"]] = r["rows"]
    if not isinstance(m["parts"], list):
        bad("field 'parts'", "a list", m["parts"])
    names, keys = set(), set()
    for i, p in enumerate(m["parts"]):
        f = f"field 'parts[{i}]"
        if not isinstance(p, dict):
            bad(f + "'", "a JSON object", p)
        name = p.get("file")
        if not isinstance(name, str) or not _PART.match(name):
            bad(f + ".file'", "a part name like part-00000.parquet (no folders)", name)
        if name in names:
            bad(f + ".file'", "listed once", name)
        names.add(name)
        if p.get("input") not in rows_of:
            bad(f + ".input'", "one of the paths in 'inputs'", p.get("input"))
        start, stop = p.get("start"), p.get("stop")
        if not _is_int(start, 0):
            bad(f + ".start'", "an integer >= 0", start)
        if not _is_int(stop, start + 1) or stop > rows_of[p["input"]]:
            bad(f + ".stop'", f"an integer in {start + 1}..{rows_of[p['input']]} (the input's rows)", stop)
        if not _is_int(p.get("rows"), 0) or p["rows"] > stop - start:
            bad(f + ".rows'", f"an integer in 0..{stop - start}", p.get("rows"))
        if not isinstance(p.get("ids_sha256"), str) or not _SHA256.match(p["ids_sha256"]):
            bad(f + ".ids_sha256'", "64 lowercase hex digits", p.get("ids_sha256"))
        if (p["input"], start, stop) in keys:
            bad(f + "'", "the only part of its unit", f"{p['input']} rows {start}..{stop} again")
        keys.add((p["input"], start, stop))
    return m


class Output:
    """The output folder: lock, manifest, committed parts. Everything read from it is checked: the
    manifest field by field, each listed part's footer (it must be a regular file whose metadata carries
    this run's settings, engine and unit). A listed part that is missing, or that jv5fast wrote but that no
    longer matches its entry, is dropped from the manifest and its unit redone; one that jv5fast cannot
    prove it wrote (not Parquet, no or other settings, a link) is refused and never deleted."""

    def __init__(self, folder, settings, engine, rows_per_part, log=None):
        self.folder, self.settings, self.engine = folder, settings, engine
        self.log = log or (lambda msg: None)
        self.settings_json = json.dumps(settings)
        self.engine_json = json.dumps(engine)
        parent = os.path.dirname(os.path.abspath(folder))
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise CorpusError(f"--output {folder} is a file; give a folder")
        if not os.path.isdir(parent):
            raise CorpusError(f"--output {folder}: folder {parent} does not exist")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, MANIFEST)
        self._check_fresh(path)  # before the lock file exists: an unrelated folder is left as it was
        lock = os.path.join(folder, LOCK)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        created = False
        try:
            try:
                fd = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(lock, flags)
        except OSError as e:
            if e.errno == errno.ELOOP or os.path.islink(lock):
                raise CorpusError(f"--output {folder}: {LOCK} is a symbolic link; embed-corpus makes its own "
                                  f"lock file there: remove the link") from None
            raise CorpusError(f"--output {folder}: cannot open {lock} ({e.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorpusError(f"--output {folder}: {LOCK} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CorpusError(f"--output {folder}: another embed-corpus run is writing there; wait for it or "
                                  f"stop it") from None
            self._lock = fd
            if os.path.exists(path):
                self.manifest = validate_manifest(self._read_manifest(path), path)
                self._check_settings(rows_per_part)
                self._check_parts()
            else:
                self._check_fresh(path)  # again, under the lock
                self.manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "parts": [],
                                 "engine": engine, "rows_per_part": rows_per_part, "id_type": None, "inputs": [],
                                 "errors": None, "error_rows": 0, "complete": False}
            self.cleanup()
        except BaseException:
            if created:  # ours from this run only
                with contextlib.suppress(OSError):
                    os.remove(lock)
            os.close(fd)
            self._lock = None
            raise

    def _check_fresh(self, manifest_path):
        if os.path.lexists(manifest_path):
            return
        others = [n for n in os.listdir(self.folder) if n != LOCK and not _TEMP.match(n)]
        if others:
            raise CorpusError(f"--output {self.folder} is not empty ({min(others)}, ...) and holds no "
                              f"{MANIFEST}; give an empty or new folder")

    def close(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _read_manifest(self, path):
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                raise CorpusError(f"{path} is not a regular file (a link?); embed-corpus writes its own manifest: "
                                  f"give another --output folder")
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise CorpusError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not an embed-corpus manifest")
            return json.loads(raw.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            if isinstance(e, CorpusError):
                raise
            raise CorpusError(f"{path} cannot be read ({e}); it was not written by this version of jv5fast") \
                from None

    def _check_settings(self, rows_per_part):
        old_engine = dict(self.manifest["engine"])
        new_engine = dict(self.engine)
        old_ck, new_ck = old_engine.pop("checkpoint", None), new_engine.pop("checkpoint", None)
        old = dict(self.manifest["settings"], **old_engine)
        new = dict(self.settings, **new_engine)
        for key in list(new) + [k for k in old if k not in new]:
            if key in ("device", "dtype"):
                continue
            val = new.get(key)
            if old.get(key) != val:
                flag = SETTING_FLAGS.get(key, "--" + key.replace("_", "-"))
                what = flag if key.replace("_", "-") == flag.lstrip("-") else f"{key} (from {flag})"
                raise CorpusError(f"--output {self.folder} was written with {what} {_show(old.get(key))}, this run "
                                  f"asks for {_show(val)}; rerun with the same settings to resume, or give another "
                                  f"--output folder")
        was, now = (old.get("device"), old.get("dtype")), (new.get("device"), new.get("dtype"))
        if was != now:
            raise CorpusError(f"--output {self.folder} was embedded on {_show(was[0])} in {_show(was[1])}, this run "
                              f"would compute on {_show(now[0])} in {_show(now[1])} (from --num-gpus-per-worker and "
                              f"--dtype); its parts would mix two compute dtypes. Rerun with the same "
                              f"--num-gpus-per-worker and --dtype to resume, or give another --output folder")
        if old_ck != new_ck:
            old_files = {e[0]: e[1:] for e in old_ck or []}
            new_files = {e[0]: e[1:] for e in new_ck or []}
            name = min(n for n in set(old_files) | set(new_files) if old_files.get(n) != new_files.get(n))
            how = ("is new" if name not in old_files else "is gone" if name not in new_files else
                   f"changed (size {old_files[name][0]} -> {new_files[name][0]}, mtime_ns {old_files[name][1]} -> "
                   f"{new_files[name][1]})")
            raise CorpusError(f"--output {self.folder} was written with the checkpoint of --model "
                              f"{self.settings['model']}, whose file {name} {how} since; its parts would mix two "
                              f"sets of weights. Restore the checkpoint, or give another --output folder")
        if rows_per_part is not None and rows_per_part != self.manifest["rows_per_part"]:
            raise CorpusError(f"--output {self.folder} was written with --rows-per-part "
                              f"{self.manifest['rows_per_part']}, this run asks for {rows_per_part}; leave it out "
                              f"to resume")

    def _part_meta(self, path):
        """(schema metadata, rows) of a part's footer, or a reason it is not a readable Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            with pq.ParquetFile(path) as pf:
                return pf.schema_arrow.metadata or {}, pf.metadata.num_rows
        except (pa.ArrowException, OSError) as e:  # not Parquet, truncated
            return None, f"it is not a readable Parquet file ({' '.join(str(e).split())[:200]})"

    def _check_parts(self):
        """Each listed part: a regular file here, written by jv5fast with these settings, engine and unit."""
        keep = []
        for p in self.manifest["parts"]:
            path = os.path.join(self.folder, p["file"])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                self.log(f"{path} is listed in {MANIFEST} but missing; embedding its rows again "
                         f"({p['input']} rows {p['start']}..{p['stop']})")
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise CorpusError(f"{path} is listed in {MANIFEST} but is {kind}; embed-corpus writes its parts "
                                  f"as plain files. Move it out of {self.folder} and rerun to embed its rows again")
            meta, rows = self._part_meta(path)
            if meta is None or meta.get(b"jv5fast") != self.settings_json.encode() or b"jv5fast.unit" not in meta:
                why = rows if meta is None else "its metadata does not carry this folder's settings"
                raise CorpusError(f"{path} is listed in {MANIFEST}, but {why}: not a part jv5fast wrote here, so it "
                                  f"is left alone. Move it out of {self.folder} and rerun to embed its rows again")
            want = json.dumps({"input": p["input"], "start": p["start"], "stop": p["stop"],
                               "ids_sha256": p["ids_sha256"]})
            if meta[b"jv5fast.unit"] != want.encode() or meta.get(b"jv5fast.engine") != self.engine_json.encode() \
                    or rows != p["rows"]:
                # our own file (these settings), but not the part the manifest lists: cleanup() removes it
                self.log(f"{path} does not match its entry in {MANIFEST} (unit, engine or rows); embedding "
                         f"{p['input']} rows {p['start']}..{p['stop']} again")
                continue
            keep.append(p)
        if len(keep) != len(self.manifest["parts"]):
            self.manifest["parts"] = keep
            self.manifest["complete"] = False

    def cleanup(self):
        """Remove our own leftovers of an interrupted run (we hold the lock, so no writer is alive): temp files
        by name, and unlisted part files that carry these settings in their metadata (renamed, but the
        manifest update did not happen)."""
        listed = {p["file"] for p in self.manifest["parts"]}
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if _TEMP.match(name):
                if os.path.isfile(path) and not os.path.islink(path):
                    with contextlib.suppress(OSError):
                        os.remove(path)
            elif _PART.match(name) and name not in listed and os.path.isfile(path) and not os.path.islink(path):
                meta, _ = self._part_meta(path)
                if meta is not None and meta.get(b"jv5fast") == self.settings_json.encode() \
                        and b"jv5fast.unit" in meta:
                    os.remove(path)

    def committed(self) -> dict:
        return {(p["input"], p["start"], p["stop"]): p for p in self.manifest["parts"]}

    def next_part_name(self):
        used = [int(_PART.match(n).group(1)) for n in os.listdir(self.folder) if _PART.match(n)]
        used += [int(_PART.match(p["file"]).group(1)) for p in self.manifest["parts"]]
        return f"part-{max(used, default=-1) + 1:05d}.parquet"

    def write_manifest(self):
        data = (json.dumps(self.manifest, indent=1) + "\n").encode("utf-8")
        _atomic_write(self.folder, MANIFEST, lambda f: f.write(data))

    def write_errors(self, errors):
        def write(f):  # line by line: never the whole file in memory
            for e in errors:
                f.write((json.dumps(e) + "\n").encode("utf-8"))
        _atomic_write(self.folder, ERRORS, write)

    def commit(self, unit: Unit, table):
        """Write ``table`` (id, embedding; the unit's rows in input order) as the next part, then record it."""
        import pyarrow.parquet as pq
        if table.num_rows != len(unit.ids):
            raise RuntimeError(f"{unit.input} rows {unit.start}..{unit.stop}: {table.num_rows} rows to commit, "
                               f"the plan has {len(unit.ids)}")
        name = self.next_part_name()
        digest = ids_digest(unit.ids)
        unit_json = json.dumps({"input": unit.input, "start": unit.start, "stop": unit.stop, "ids_sha256": digest})
        table = table.replace_schema_metadata({b"jv5fast": self.settings_json.encode(), b"jv5fast.unit": unit_json,
                                               b"jv5fast.engine": self.engine_json.encode()})
        _atomic_write(self.folder, name, lambda f: pq.write_table(table, f))
        self.manifest["parts"].append({"file": name, "rows": table.num_rows, "input": unit.input,
                                       "start": unit.start, "stop": unit.stop, "ids_sha256": digest})
        self.write_manifest()


# ---- the run ---------------------------------------------------------------------------------------------
def part_table(unit: Unit, slices, settings):
    """The unit's rows from the gathered result slices, matched by id and put in input order; None while
    some id is still missing. Rows Ray delivered twice (a retried task) are taken once."""
    import pyarrow as pa

    from .dataset import embedding_type
    t = pa.concat_tables(slices)
    pos = {}
    for i, ident in enumerate(t.column("id").to_pylist()):
        pos.setdefault(ident, i)
    if len(pos) < len(unit.ids):
        return None
    extra = set(pos) - set(unit.ids)
    if extra:
        raise RuntimeError(f"rows with ids {sorted(extra, key=str)[:5]} came back for {unit.input} rows "
                           f"{unit.start}..{unit.stop}, which does not hold them")
    order = pa.array([pos[i] for i in unit.ids], pa.int64())
    emb = t.column("embedding").take(order).combine_chunks()
    if emb.type != embedding_type(settings):
        raise RuntimeError(f"embedding column came back as {emb.type}, expected {embedding_type(settings)}")
    return pa.table({"id": t.column("id").take(order).combine_chunks(), "embedding": emb})


def resolve_engine(engine_kwargs, num_gpus_per_worker, checkpoint_folder):
    """(engine_kwargs for the actors, the manifest's ``engine`` record): the device and compute dtype made
    explicit (Engine would pick bfloat16 on CUDA, float32 on CPU, so a resumed run with other GPUs would mix
    them), plus a fingerprint of the checkpoint's files."""
    import torch

    from ..engine import _resolve_dtype
    from .dataset import checkpoint_fingerprint
    kw = dict(engine_kwargs or {})
    if "device" not in kw or kw["device"] is None:
        kw["device"] = "cuda" if num_gpus_per_worker else "cpu"
    device = torch.device(kw["device"]) if isinstance(kw["device"], str) else kw["device"]
    if not isinstance(device, torch.device):
        raise TypeError(f"engine_kwargs device must be a str or torch.device, got {kw['device']!r}")
    dtype = str(_resolve_dtype(kw.get("dtype"), device)).removeprefix("torch.")
    kw["dtype"] = dtype
    record = {"device": device.type, "dtype": dtype, "max_length": kw.get("max_length")}
    for k in ("backend", "quantize", "onnx_quantize"):  # other choices that change the vectors
        if kw.get(k) is not None:
            record[k] = kw[k]
    try:
        json.dumps(record)
    except TypeError:
        raise ValueError(f"engine_kwargs {record} must be plain values (str, int)") from None
    record["checkpoint"] = checkpoint_fingerprint(checkpoint_folder)
    return kw, record


def run_corpus(*, model, input, output, text_column="text", id_column="id", task="retrieval",
               prompt_name="document", truncate_dim=None, precision="float32", concurrency=1, num_gpus_per_worker=0.0,
               cpus_per_worker=None, batch_size=256, rows_per_part=None, on_error="fail", engine_kwargs=None,
               progress=True, log=None, connect=None):
    """Embed ``input`` into ``output``. ``connect()`` is called once there is work for Ray (after planning, so
    mistakes surface before a cluster is joined); without it, this process must already be connected
    (``ray.init``). Returns a summary dict. Raises CorpusError (bad arguments, input or folder), RuntimeError (a failure
    while running; what was committed stays and a rerun resumes), KeyboardInterrupt."""
    from .dataset import _check_positive, resolve_settings_and_folder
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if on_error not in ("fail", "skip"):
        raise CorpusError(f"--on-error must be 'fail' or 'skip', got {on_error!r}")
    if rows_per_part is not None and (isinstance(rows_per_part, bool) or not isinstance(rows_per_part, int)
                                      or rows_per_part <= 0):
        raise CorpusError(f"--rows-per-part must be a positive integer, got {rows_per_part!r}")
    _check_positive("num_gpus_per_worker", num_gpus_per_worker, float, allow_zero=True)
    settings, folder = resolve_settings_and_folder(model, task=task, prompt_name=prompt_name,
                                                   truncate_dim=truncate_dim, precision=precision,
                                                   text_column=text_column, id_column=id_column)
    engine_kwargs, engine = resolve_engine(engine_kwargs, num_gpus_per_worker, folder)
    files = find_inputs(input, output, log)
    out = Output(output, settings, engine, rows_per_part, log)
    try:
        return _run(out, files, settings, engine_kwargs, on_error=on_error, concurrency=concurrency,
                    num_gpus=num_gpus_per_worker, cpus=cpus_per_worker, batch_size=batch_size,
                    rows_per_part=rows_per_part or out.manifest["rows_per_part"] or 50_000, progress=progress, log=log,
                    connect=connect)
    finally:
        out.close()


def _plan(out, files, rows_per_part):
    """Scan the inputs (recorded ones first, in their recorded order, so duplicate resolution never changes
    between runs). Once any part is committed, every recorded input must be present and unchanged: which
    copy of a duplicate id wins, and so what every later unit holds, depends on all the inputs before it."""
    m = out.manifest
    recorded = {r["path"]: r for r in m["inputs"]}
    missing = [p for p in recorded if p not in set(files)]
    if missing and m["parts"]:
        raise CorpusError(f"{missing[0]} was embedded into {out.folder} but is not in this run's --input; give the "
                          f"same inputs (new files may be added), or another --output folder")
    order = [p for p in recorded if p not in missing] + [f for f in files if f not in recorded]
    planner = Planner(out.settings["id_column"], out.settings["text_column"], rows_per_part,
                      m["id_type"] if m["parts"] else None)
    plans = []
    for path in order:
        plan = planner.scan(path)
        old = recorded.get(path)
        if old is not None and old["sha256"] != plan.sha256 and m["parts"]:
            raise CorpusError(f"{path} changed since it was embedded into {out.folder} (sha256 {old['sha256'][:12]}… "
                              f"→ {plan.sha256[:12]}…, size {old['size']} → {plan.size}); the committed parts were "
                              f"planned from the old contents (which copy of a duplicate id wins depends on every "
                              f"input). Restore the file, or embed into another --output folder")
        plans.append(plan)
    return plans, planner


def _run(out, files, settings, engine_kwargs, *, on_error, concurrency, num_gpus, cpus, batch_size, rows_per_part,
         progress, log, connect):
    m = out.manifest
    m["rows_per_part"] = rows_per_part
    plans, planner = _plan(out, files, rows_per_part)
    if planner.errors and on_error == "fail":
        e = planner.errors[0]
        where = f"line {e['line']}" if "line" in e else f"row {e['row']}"
        ident = "" if e["id"] is None else f" (id {e['id']!r})"
        more = f"; {len(planner.errors) - 1} more bad rows" if len(planner.errors) > 1 else ""
        raise CorpusError(f"{e['file']} {where}{ident}: {e['reason']}{more}. --on-error skip writes bad rows to "
                          f"{os.path.join(out.folder, ERRORS)} and embeds the rest")
    units = [u for p in plans for u in p.units]
    done = out.committed()
    planned = {u.key: u for u in units}
    for key, part in done.items():
        u = planned.get(key)
        if u is None:  # cannot happen while inputs, rows_per_part and the ordering rule are fixed
            raise CorpusError(f"{out.folder}/{MANIFEST} lists {part['file']} for {key[0]} rows {key[1]}..{key[2]}, "
                              f"a unit this run does not plan; give another --output folder")
        if part["rows"] != len(u.ids) or part["ids_sha256"] != ids_digest(u.ids):
            raise CorpusError(f"{out.folder}/{part['file']} holds {part['rows']} rows of {key[0]} rows "
                              f"{key[1]}..{key[2]}, but this run plans {len(u.ids)} rows there"
                              f"{'' if part['rows'] != len(u.ids) else ' with other ids'}; the inputs or the rules "
                              f"for bad rows changed since. Give another --output folder")
    todo = [u for u in units if u.key not in done]
    # the manifest first, then errors.jsonl: a folder with our errors file but no manifest would be refused
    had_errors = m["errors"] is not None
    m.update(inputs=[p.record() for p in plans], id_type=planner.id_type, error_rows=len(planner.errors),
             errors=ERRORS if planner.errors or had_errors else None, complete=False)
    out.write_manifest()
    if planner.errors:
        out.write_errors(planner.errors)
    elif had_errors:
        out.write_errors([])  # the inputs have no bad rows now (an earlier run's file was ours): empty it
    total = sum(len(u.ids) for u in units)
    for u in [u for u in todo if not u.ids]:  # nothing to embed (all bad or blank): commit an empty part
        out.commit(u, _empty_table(settings, planner.id_type))
    todo = [u for u in todo if u.ids]
    rows_todo = sum(len(u.ids) for u in todo)
    stats = {"rows": total, "rows_embedded_now": 0, "tokens_now": 0, "seconds": 0.0, "parts": 0,
             "error_rows": len(planner.errors), "resumed": bool(done)}
    if todo:
        if done:
            log(f"resuming: {len(done)} of {len(units)} units already in {out.folder}; embedding {rows_todo} rows")
        if connect is not None:
            connect()
        stats.update(_embed_units(out, todo, settings, engine_kwargs, planner.id_type, concurrency=concurrency,
                                  num_gpus=num_gpus, cpus=cpus, batch_size=batch_size, progress=progress))
    written = sum(p["rows"] for p in m["parts"])
    if written != total or len(m["parts"]) != len(units):
        raise RuntimeError(f"{out.folder}: {written} rows in {len(m['parts'])} parts, expected {total} rows in "
                           f"{len(units)} parts; rerun to finish")
    m["complete"] = True
    out.write_manifest()
    stats["parts"] = len(m["parts"])
    return stats


def _empty_table(settings, id_type):
    import pyarrow as pa

    from .dataset import embedding_type
    return pa.table({"id": pa.array([], pa.int64() if id_type == "int64" else pa.string()),
                     "embedding": pa.array([], embedding_type(settings))})


def _embed_units(out, todo, settings, engine_kwargs, id_type, *, concurrency, num_gpus, cpus, batch_size, progress):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from .dataset import map_embed
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one bar
    ctx.print_on_execution_start = False
    if cpus is None:  # CPU workers share the node's cores; a GPU worker needs one core to feed it
        total = int(ray.cluster_resources().get("CPU", 1))
        cpus = 1 if num_gpus else max(1, total // concurrency)
    desc = [{"path": u.input, "format": INPUT_FORMATS[os.path.splitext(u.input)[1].lower()], "start": u.start,
             "stop": u.stop, "offset": u.offset, "skip": u.skip, "unit": i, "id_type": id_type,
             "size": os.stat(u.input).st_size, "mtime_ns": os.stat(u.input).st_mtime_ns,
             "id_column": settings["id_column"], "text_column": settings["text_column"]} for i, u in enumerate(todo)]
    ds = ray.data.from_items(desc, override_num_blocks=len(desc))  # one block per unit
    ds = map_embed(ds, settings, concurrency=concurrency, num_gpus=num_gpus, num_cpus=cpus, batch_size=1,
                   engine_kwargs=engine_kwargs, threads=max(1, int(cpus)), worker=UnitWorker,
                   worker_kwargs={"batch_size": batch_size})
    pending = {}  # unit index -> [result slices]
    counts = {}
    rows = tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(u.ids) for u in todo), unit="row", desc="embed-corpus", file=sys.stderr,
               disable=not progress, smoothing=0.1)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its "execution finished" lines would break the bar
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            unit_col = batch.column("_unit").to_numpy()
            n_tok = int(pc.sum(batch.column("_num_tokens")).as_py() or 0)
            rows, tokens = rows + batch.num_rows, tokens + n_tok
            for ui in np.unique(unit_col):
                mask = unit_col == ui
                part = batch if mask.all() else batch.filter(pa.array(mask))
                pending.setdefault(int(ui), []).append(part.select(["id", "embedding"]))
                counts[int(ui)] = counts.get(int(ui), 0) + part.num_rows
                unit = todo[int(ui)]
                if counts[int(ui)] >= len(unit.ids):
                    table = part_table(unit, pending[int(ui)], settings)
                    if table is not None:
                        out.commit(unit, table)
                        del pending[int(ui)]
            dt = time.perf_counter() - t0
            bar.update(batch.num_rows)
            bar.set_postfix_str(f"{tokens / dt:,.0f} tokens/s", refresh=False)
    finally:
        bar.close()
    missing = [todo[i] for i in range(len(todo)) if todo[i].key not in out.committed()]
    if missing:
        u = missing[0]
        raise RuntimeError(f"Ray returned {counts.get(todo.index(u), 0)} of {len(u.ids)} rows for {u.input} rows "
                           f"{u.start}..{u.stop} ({len(missing)} units incomplete); rerun to finish")
    return {"rows_embedded_now": rows, "tokens_now": tokens, "seconds": time.perf_counter() - t0}
