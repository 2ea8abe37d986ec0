"""embed-corpus's output folder: the manifest format, part files, the lock, atomic writes.

A unit is committed as a part: temp file, fsync, rename, then the manifest (temp + os.replace), so a killed
driver loses at most the units in flight. A rerun treats the folder as untrusted: every manifest field
(``validate_manifest``), every listed part's footer (``Output``); it refuses other settings, repairs what
jv5fast provably wrote and never deletes what it cannot prove it wrote.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat

from .plan import CorpusError, Unit

FORMAT, VERSION = "jv5fast-embed-corpus", 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
LOCK = ".jv5fast-embed-corpus.lock"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_TEMP = re.compile(r"^\.(part-\d{5,}\.parquet|manifest\.json|errors\.jsonl)\.tmp-\d+$")  # ours, from a dead run
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 64 << 20  # a few hundred bytes per part
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

