"""Reading what a user feeds the commands: ``--input`` texts (embed, search), JSON Lines records (index,
train), Parquet columns, each failure named in CLI words (file, line or row, column) as a ``CLIError``.

The extension picks the format (``--format`` overrides it); a path without one and stdin are .txt. Text is
split on "\\n" only and a blank line is an empty text, so output row i is always input line (element, row) i.
pyarrow is imported only when a Parquet file is read.
"""
from __future__ import annotations

import json
import os
import re
import sys

from .messages import CLIError, json_type, names


def split_lines(text: str) -> list:
    """One text per input line: split on "\\n" only (str.splitlines also breaks on form feed, U+0085,
    U+2028, \\x1c-\\x1e, which may sit inside a text), drop one trailing "\\r" per line (CRLF files), and
    let a final newline end the last line rather than start an empty one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_bytes(path: str, flag: str):
    """(name, bytes) of ``path`` (``-``: stdin), with every way to fail named in CLI words."""
    if path == "-":
        return "<stdin>", sys.stdin.buffer.read()
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file")
    try:
        with open(path, "rb") as f:  # bytes: text mode's universal newlines would split on a lone "\r"
            return path, f.read()
    except FileNotFoundError:
        raise CLIError(f"{flag} file not found: {path}") from None
    except OSError as e:
        raise CLIError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not part of the first text
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CLIError(f"{name} line {line} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                       f"save the file as UTF-8") from None


def read_lines(path: str, flag: str):
    """(name, lines) of ``path`` (``-``: stdin) as UTF-8, with every way to fail named in CLI words."""
    name, raw = read_bytes(path, flag)
    return name, split_lines(decode(name, raw))


def json_line(name: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise CLIError(f"{name} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise CLIError(f"{name} line {n}: JSON nested too deeply") from None


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins escaped pairs, so any left is a lone one


def lone_surrogate(s: str):
    """The position of the first lone surrogate in ``s`` (not valid Unicode, cannot be written as UTF-8), or None."""
    m = _SURROGATE.search(s)
    return None if m is None else m.start()


# --input formats: the extension picks one, --format overrides it. A path without an extension (a pipe such
# as /dev/fd/63, a file named "texts") and stdin are read as .txt; any other extension is refused rather
# than guessed, so a .csv or .tsv is never embedded line by line with its header.
INPUT_FORMATS = ("txt", "jsonl", "json", "parquet")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


def input_format(path: str, fmt=None, flag: str = "--input") -> str:
    if fmt is not None:
        return fmt
    ext = "" if path == "-" else os.path.splitext(os.path.basename(path))[1]
    if not ext:
        return "txt"
    if ext.lower() not in _EXTENSIONS:
        raise CLIError(f"{flag} {path}: unknown file type {ext!r}; accepted: .txt (one text per line), "
                       f".jsonl/.ndjson (a JSON string or {{\"text\": ...}} per line), .json (an array of them), "
                       f".parquet (a text column); pass --format {'|'.join(INPUT_FORMATS)} to read it as one of "
                       f"them")
    return _EXTENSIONS[ext.lower()]


def _text_of(obj, where: str, col: str):
    """One JSON value as a text: a string, or an object's ``col`` string."""
    if isinstance(obj, dict):
        if col not in obj:
            raise CLIError(f"{where}: object without a {col!r} field (keys: {names(sorted(obj))})")
        obj = obj[col]
    if not isinstance(obj, str):
        raise CLIError(f"{where}: expected a JSON string or an object with a {col!r} string, got {json_type(obj)}")
    return obj


def read_texts(path: str, fmt=None, text_col: str = "text") -> list:
    """The texts of ``--input`` in order, one per line (txt, jsonl; a blank line is an empty text), array
    element (json) or row (parquet), so output row i is always input line, element or row i."""
    fmt = input_format(path, fmt)
    if fmt == "parquet":
        return _read_texts_parquet(path, text_col)
    if fmt == "json":
        name, raw = read_bytes(path, "--input")
        try:
            arr = json.loads(decode(name, raw))
        except json.JSONDecodeError as e:
            raise CLIError(f"{name}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise CLIError(f"{name}: JSON nested too deeply") from None
        if not isinstance(arr, list):
            raise CLIError(f"{name}: expected a JSON array of strings or of {{{json.dumps(text_col)}: ...}} "
                           f"objects, got {json_type(arr)}")
        return [_text_of(obj, f"{name} index {i}", text_col) for i, obj in enumerate(arr)]
    name, lines = read_lines(path, "--input")
    if fmt == "txt":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            texts.append("")  # as in a .txt file: the row stays aligned with the line
            continue
        texts.append(_text_of(json_line(name, n, line), f"{name} line {n}", text_col))
    return texts


def _read_texts_parquet(path: str, col: str) -> list:
    """The ``col`` column of one Parquet file (``-``: stdin), every row in order; a null is refused by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    name, raw = ("<stdin>", sys.stdin.buffer.read()) if path == "-" else (path, None)
    if raw is None:
        if os.path.isdir(path):
            raise CLIError(f"--input {path} is a folder; give a file (`jv5fast index` and `embed-corpus` read "
                           f"folders of Parquet files)")
        if not os.path.exists(path):
            raise CLIError(f"--input file not found: {path}")
    try:
        pf = pq.ParquetFile(path if raw is None else pa.BufferReader(raw))
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise CLIError(f"--input {name}: not a readable Parquet file ({e})") from None
    if col not in schema.names:
        raise CLIError(f"--input {name}: no column {col!r} (columns: {names(schema.names, 20)}); pass "
                       f"--text-column")
    kind = schema.field(col).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CLIError(f"--input {name}: column {col!r} is {kind}; texts must be strings")
    texts = []
    for batch in pf.iter_batches(batch_size=65536, columns=[col]):
        values = column_values(batch.column(0), name, len(texts), col)
        for j, text in enumerate(values):
            if text is None:
                raise CLIError(f"{name} row {len(texts) + j}: {col!r} is null; every row must hold a text")
        texts.extend(values)
    return texts


def column_values(col, path: str, row: int, name: str) -> list:
    """An Arrow column -> Python values; a string that is not valid UTF-8 is named by file, row and column."""
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        for j in range(len(col)):
            try:
                col[j].as_py()
            except UnicodeDecodeError as e:
                raise CLIError(f"{path} row {row + j}: column {name!r} is not valid UTF-8 ({e.reason})") from None
        raise
