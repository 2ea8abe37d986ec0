"""Command line: ``jv5fast embed --model PATH_OR_ID [options] (TEXT... | --input FILE|-) [--output OUT.npy|OUT.jsonl]``
``jv5fast export-onnx --model PATH_OR_ID --output DIR [--task ..] [--dtype ..] [--quantize int8] ...`` and
``jv5fast train --stage STAGE --student DIR --output DIR --data FILE.jsonl [--teacher DIR | --teacher-embeddings DIR]``
and ``jv5fast serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8080] [...]`` (see jv5fast/server.py),
``jv5fast index --input DOCS --output INDEX [--model M]`` (JSON Lines, Parquet, or embed-corpus output ->
an EmbeddingIndex file with ids, texts and settings), ``jv5fast search INDEX "query" [-k 10] [--json]`` and
``jv5fast make-checkpoint DIR [--family nano|small] [--size tiny|full] [--seed N]`` (RANDOM weights in the
released layout, offline, for trying the commands and tests; the folder's README.txt says so).

Same semantics as ``Engine.embed``. ``--input`` is read by its extension (``--format`` overrides it): a
.txt file (or one without an extension, or stdin) holds one text per line, split on newlines only (one
trailing carriage return is dropped; form feeds, U+2028 and the like stay inside the text); a .jsonl file
one JSON string, or an object with a "text" field (``--text-column``), per line; a .json file an array of
them; a .parquet file a text column (pyarrow). A blank line is an empty text, so output row i is always
input line (element, row) i. Any other extension is refused, never guessed. ``.npy`` output holds the
(N, D') array; ``.jsonl`` one {"index", "embedding"} object per text, in input order; without ``--output``
the same JSON Lines go to stdout (progress and messages stay on stderr).

Errors a user can cause (bad flags, unreadable or malformed input, a model that does not fit the
command) print one line on stderr, in CLI words, and exit 2; failures while running exit 1. No
traceback unless JV5FAST_DEBUG=1. When the reader of stdout goes away (``jv5fast search ... | head -1``)
the command stops quietly with exit status 141 (128 + SIGPIPE), what a shell reports for ``cat`` or
``grep`` in the same place, so ``set -o pipefail`` scripts see the same status as with those tools.

No command overwrites its input: ``embed --output`` refuses the ``--input`` file, and ``index --output``
refuses the input file, anything inside an input folder, and any existing file that is not a jv5fast
index (an earlier index, or an empty file, is replaced atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .config import TASKS
from .postprocess import PRECISIONS



class CLIError(Exception):
    """A usage error found by the CLI itself: printed as one line, exit code ``code``."""

    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code


# ---- input ---------------------------------------------------------------------------------------------
def split_lines(text: str) -> list:
    """One text per input line: split on "\\n" only (str.splitlines also breaks on form feed, U+0085,
    U+2028, \\x1c-\\x1e, which may sit inside a text), drop one trailing "\\r" per line (CRLF files), and
    let a final newline end the last line rather than start an empty one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_bytes(path: str, flag: str):
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


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not part of the first text
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CLIError(f"{name} line {line} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                       f"save the file as UTF-8") from None


def _read_lines(path: str, flag: str):
    """(name, lines) of ``path`` (``-``: stdin) as UTF-8, with every way to fail named in CLI words."""
    name, raw = _read_bytes(path, flag)
    return name, split_lines(_decode(name, raw))


def _json_line(name: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise CLIError(f"{name} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise CLIError(f"{name} line {n}: JSON nested too deeply") from None


def _json_type(v) -> str:
    """The JSON name of a parsed value's type, for messages (not Python's NoneType, dict, list)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", dict: "an object", list: "an array"}.get(type(v), "a number")


def _names(names, limit: int = 10) -> str:
    """Field or column names for a message: "a, b, c" (not a Python list), "none" when empty."""
    names = [str(n) for n in names]
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --input formats: the extension picks one, --format overrides it. A path without an extension (a pipe such
# as /dev/fd/63, a file named "texts") and stdin are read as .txt; any other extension is refused rather
# than guessed, so a .csv or .tsv is never embedded line by line with its header.
INPUT_FORMATS = ("txt", "jsonl", "json", "parquet")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


def _input_format(path: str, fmt=None, flag: str = "--input") -> str:
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
            raise CLIError(f"{where}: object without a {col!r} field (keys: {_names(sorted(obj))})")
        obj = obj[col]
    if not isinstance(obj, str):
        raise CLIError(f"{where}: expected a JSON string or an object with a {col!r} string, got {_json_type(obj)}")
    return obj


def _read_texts(path: str, fmt=None, text_col: str = "text") -> list:
    """The texts of ``--input`` in order, one per line (txt, jsonl; a blank line is an empty text), array
    element (json) or row (parquet), so output row i is always input line, element or row i."""
    fmt = _input_format(path, fmt)
    if fmt == "parquet":
        return _read_texts_parquet(path, text_col)
    if fmt == "json":
        name, raw = _read_bytes(path, "--input")
        try:
            arr = json.loads(_decode(name, raw))
        except json.JSONDecodeError as e:
            raise CLIError(f"{name}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise CLIError(f"{name}: JSON nested too deeply") from None
        if not isinstance(arr, list):
            raise CLIError(f"{name}: expected a JSON array of strings or of {{{json.dumps(text_col)}: ...}} "
                           f"objects, got {_json_type(arr)}")
        return [_text_of(obj, f"{name} index {i}", text_col) for i, obj in enumerate(arr)]
    name, lines = _read_lines(path, "--input")
    if fmt == "txt":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            texts.append("")  # as in a .txt file: the row stays aligned with the line
            continue
        texts.append(_text_of(_json_line(name, n, line), f"{name} line {n}", text_col))
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
        raise CLIError(f"--input {name}: no column {col!r} (columns: {_names(schema.names, 20)}); pass "
                       f"--text-column")
    kind = schema.field(col).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CLIError(f"--input {name}: column {col!r} is {kind}; texts must be strings")
    texts = []
    for batch in pf.iter_batches(batch_size=65536, columns=[col]):
        values = _column_values(batch.column(0), name, len(texts), col)
        for j, text in enumerate(values):
            if text is None:
                raise CLIError(f"{name} row {len(texts) + j}: {col!r} is null; every row must hold a text")
        texts.extend(values)
    return texts


def _read_examples(path: str, stage: str) -> list:
    from .train.trainer import example_error
    name, lines = _read_lines(path, "--data")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ex = _json_line(name, n, line)
        err = example_error(ex, stage)
        if err:
            raise CLIError(f"{name} line {n}: {err}")
        out.append(ex)
    if not out:
        raise CLIError(f"{name} holds no training examples")
    return out


# ---- checks made before any work -------------------------------------------------------------------------
def _check_model(path: str, flag: str, backend: str = "torch"):
    if os.path.isfile(path):
        raise CLIError(f"{flag} must be a checkpoint folder or a hub id, got a file: {path}")
    is_export = os.path.isfile(os.path.join(path, "jv5fast_onnx.json"))
    if backend == "torch" and is_export:
        hint = "add --backend onnx to run it" if flag == "--model" else "pass the checkpoint it was exported from"
        raise CLIError(f"{flag} {path} is an ONNX export; {hint}")
    if backend == "onnx" and os.path.isdir(path) and not is_export:
        raise CLIError(f"{flag} {path} is not an ONNX export (no jv5fast_onnx.json); write one with "
                       f"`jv5fast export-onnx`, or drop --backend onnx")


def _check_output_file(path: str, flag: str, endings):
    if not path.endswith(tuple(endings)):
        raise CLIError(f"{flag} must end in {' or '.join(endings)}, got {path!r}")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name ending in {' or '.join(endings)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path}: folder {parent} does not exist")


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file: the same path after resolving links, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _check_device(device):
    if device is not None:
        from .devices import check_device
        try:
            check_device(device, "--device", quote=False)
        except ValueError as e:
            raise CLIError(str(e)) from None


def _write(out: str, emb):
    """Write to a temporary file beside the target, then rename over it: a failure part-way never destroys
    an existing file. A symlink's target is what gets replaced; an existing file keeps its mode."""
    import tempfile

    import numpy as np
    target = os.path.realpath(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".jv5fast-output-")
    except OSError as e:
        raise CLIError(f"cannot write --output {out}: {e.strerror or e}", code=1) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if out.endswith(".npy"):
                np.save(f, emb)
            else:
                for i, row in enumerate(emb):
                    f.write((json.dumps({"index": i, "embedding": row.tolist()}) + "\n").encode("utf-8"))
        if os.path.exists(target):
            mode = os.stat(target).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CLIError(f"cannot write --output {out}: {e.strerror or e}", code=1) from None
        raise


# ---- library messages in CLI words ---------------------------------------------------------------------
_PHRASES = [
    (r"pass overwrite=True", "pass --overwrite"), (r"unless overwrite=True", "unless --overwrite"),
    (r"pass truncate=True to cut it", "leave out --no-truncate to cut it"),
    (r"[Pp]ass task=None", "leave out --task"), (r"task=None", "no --task"),
    (r"[Pp]ass resume=False", "pass --no-resume"), (r"resume=False", "--no-resume"),
    (r"pass teacher= \(callable\) or teacher_embeddings=", "pass --teacher or --teacher-embeddings"),
    (r"quantize='int8'", "--quantize int8"), (r"onnx_quantize", "--quantize"), (r"backend='onnx'", "--backend onnx"),
    (r"dtype='(\w+)'", r"--dtype \1"), (r"device='(\w+)'", r"--device \1"),
]
_FLAG_WORDS = re.compile(r"(?<![\w/'\".-])(max_length|max_batch_tokens|truncate_dim|prompt_name|teacher_embeddings|"
                         r"learn_temperature|matryoshka_dims|batch_size|grad_accum|lora_r|lora_alpha|"
                         r"lora_targets|average_from_step|save_every|external_data|cosent_tau|n_negatives)\b(?![/'\"])=?")


def cli_words(msg: str) -> str:
    """A library error message as a CLI user should read it: flags instead of keyword arguments, one line."""
    for pat, rep in _PHRASES:
        msg = re.sub(pat, rep, msg)
    msg = _FLAG_WORDS.sub(lambda m: "--" + m.group(1).replace("_", "-") + (" " if m.group(0).endswith("=") else ""),
                          msg)
    return " ".join(msg.split())


# ---- parser --------------------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default, but not the uninformative ``(default: None)`` / ``False``."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == () \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{v!r} is not a boolean; use true/false, yes/no or 1/0")


def str_list(v: str) -> tuple:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def int_list(v: str) -> tuple:
    try:
        return tuple(int(x) for x in str_list(v))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a comma-separated list of integers (e.g. 32,64,128)") \
            from None


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("jv5fast")
    except Exception:  # not installed as a distribution (a source checkout)
        from . import __version__
        return __version__


CPU_PRECISIONS = ("fp32", "bf16")
CPU_PRECISION_HELP = ("bf16: opt-in bf16 GEMMs on the CPU (oneDNN; AMX / AVX512-BF16 where present), fp32 "
                      "elsewhere; not exact (cosine ~0.9999 to fp32), never the default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jv5fast", description="Fast, exact jina-embeddings-v5-text engine: embed "
                                "texts, export to ONNX, train adapters.", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"jv5fast {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="{embed,index,search,embed-corpus,export-onnx,train,serve,"
                           "make-checkpoint,info}")
    task_help = (f"task adapter, one of {', '.join(TASKS)} (default: retrieval, or the one task a merged "
                 f"checkpoint or ONNX export holds)")

    e = sub.add_parser("embed", help="embed texts with a checkpoint folder, hub id or ONNX export",
                       formatter_class=_Help, description="Embed texts (arguments or --input) into a .npy or "
                       ".jsonl file. Blank input lines are empty texts, so row i is line i.")
    e.add_argument("--model", required=True, help="checkpoint folder (released layout), hub id, or with "
                   "--backend onnx a folder written by export-onnx")
    e.add_argument("--task", default=None, help=task_help)
    e.add_argument("--prompt-name", default=None, help="named prompt from the model: query or document "
                   "(default: the model's default, document)")
    e.add_argument("--prompt", default=None, help="a literal prefix instead of a named prompt ('' for none)")
    e.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension (default: the model's "
                   "dimension, or an ONNX export's truncate dim)")
    e.add_argument("--precision", default="float32", choices=PRECISIONS, help="output precision")
    e.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    e.add_argument("--no-truncate", action="store_true", help="error on texts longer than --max-length "
                   "instead of cutting them")
    e.add_argument("--max-length", type=int, default=None, help="tokens per text, prompt included (default: "
                   "the model's max_position_embeddings)")
    e.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one packed forward pass")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    e.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="onnx: --model is a folder written by export-onnx (needs jv5fast[onnx])")
    e.add_argument("--cpu-precision", default="fp32", choices=CPU_PRECISIONS, help=CPU_PRECISION_HELP)
    e.add_argument("--quantize", default=None, choices=("int8",),
                   help="int8 on the CPU: the checkpoint's int8 ONNX export, built on first use and cached "
                   "($JV5FAST_CACHE); with --backend onnx the export's model_int8.onnx")
    e.add_argument("--input", default=None, help="texts to embed, read by extension: .txt one per line, .jsonl "
                   "a JSON string or {\"text\": ...} per line, .json an array of them, .parquet a text column "
                   "(needs jv5fast[parquet]); - for stdin (.txt unless --format)")
    e.add_argument("--format", default=None, choices=INPUT_FORMATS, help="read --input as this format, whatever "
                   "its extension (default: from the extension; txt without one)")
    e.add_argument("--text-column", default=None, help="the field (.jsonl, .json objects) or Parquet column "
                   "holding each text (default: text)")
    e.add_argument("--output", default=None, help="OUT.npy or OUT.jsonl (its folder must exist; default: JSON "
                   "Lines on stdout)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("texts", nargs="*", help="texts to embed (or use --input)")

    x = sub.add_parser("export-onnx", help="export a checkpoint + one task adapter to ONNX", formatter_class=_Help,
                       description="Write a self-contained ONNX folder (needs jv5fast[onnx]).")
    x.add_argument("--model", required=True, help="checkpoint folder (released layout) or hub id")
    x.add_argument("--output", "--out", dest="output", required=True, help="output folder; must not exist, unless "
                   "--overwrite and it is a previous jv5fast export (--out is the older name)")
    x.add_argument("--task", default=None, help=task_help)
    x.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="graph dtype")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14)")
    x.add_argument("--truncate-dim", type=int, default=None, help="dimension of the sentence_embedding output, "
                   "served by default by --backend onnx (default: the model's dimension)")
    x.add_argument("--quantize", default=None, choices=("int8",), help="also write model_int8.onnx")
    x.add_argument("--external-data", action="store_true", help="force model.onnx_data (automatic above 2 GB)")
    x.add_argument("--overwrite", action="store_true", help="replace --output if it is a previous jv5fast export")
    _add_train_parser(sub)
    _add_make_checkpoint_parser(sub)
    _add_info_parser(sub)
    _add_serve_parser(sub)
    _add_index_parsers(sub, task_help)
    from .distributed import cli as corpus_cli  # the parser only: Ray is imported when the command runs
    corpus_cli.add_parser(sub)
    return p


def _checked(convert, ok, what):
    """An argparse type: ``convert(v)`` that must satisfy ``ok``, else a message saying ``what`` was expected."""
    def parse(v: str):
        try:
            x = convert(v)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return x
    return parse


_positive_int = _checked(int, lambda n: n > 0, "a positive integer")
_nonneg_int = _checked(int, lambda n: n >= 0, "an integer >= 0")
_nonneg_float = _checked(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0")


def _add_serve_parser(sub):
    s = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI and Jina API), with dynamic batching",
                       formatter_class=_Help, description="An OpenAI- and Jina-API-compatible embeddings server "
                       "(POST /v1/embeddings, GET /v1/models, /health, /metrics) batching concurrent requests "
                       "onto one engine. Needs jv5fast[serve]. SIGTERM/SIGINT: stop accepting, answer what was "
                       "accepted, exit 0.")
    s.add_argument("--model", required=True, help="checkpoint folder (released layout), hub id, or with "
                   "--backend onnx a folder written by export-onnx")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8080, help="port to bind (0: any free port; the address is "
                   "printed as 'listening on http://HOST:PORT')")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    s.add_argument("--backend", default="torch", choices=("torch", "onnx"), help="engine backend")
    s.add_argument("--cpu-precision", default="fp32", choices=CPU_PRECISIONS, help=CPU_PRECISION_HELP)
    s.add_argument("--quantize", default=None, choices=("int8",), help="int8 on the CPU (built on first use and "
                   "cached in $JV5FAST_CACHE); with --backend onnx the export's int8 graph")
    s.add_argument("--max-length", type=_positive_int, default=None, help="tokens per text, prompt included")
    s.add_argument("--served-model-name", default=None, help="the model name in responses and /v1/models "
                   "(default: the folder name of --model, or the hub id)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                   "$JV5FAST_API_KEY; none when unset; an empty key is an error)")
    s.add_argument("--max-batch-tokens", type=_positive_int, default=None, help="token budget of one forward "
                   "batch (default: 16384 on CUDA, 512 on CPU)")
    s.add_argument("--max-wait-ms", type=_nonneg_float, default=2.0, help="how long a request that finds the "
                   "engine idle waits for others to batch with")
    s.add_argument("--max-queue-tokens", type=_positive_int, default=None, help="tokens allowed to wait; a "
                   "request beyond gets 429 with Retry-After (default: 262144, or 64 batches if more)")
    s.add_argument("--max-inputs", type=_positive_int, default=2048, help="texts per request (413 beyond)")
    s.add_argument("--max-request-bytes", type=_positive_int, default=8 * 2**20, help="request body size "
                   "(413 beyond, checked before parsing)")
    s.add_argument("--drain-timeout", type=_nonneg_float, default=30.0, help="seconds to finish accepted "
                   "requests after SIGTERM/SIGINT")
    s.add_argument("--resident-tasks", default="auto", choices=("auto", "true", "false"), help="keep every "
                   "task's merged weights in memory, so mixed-task traffic never re-merges (auto: when they "
                   "fit in half the free memory)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")


def _add_train_parser(sub):
    """``jv5fast train``: one flag per TrainConfig field (--stage, --student, --output, --steps, ...)."""
    import dataclasses

    from .train.trainer import STAGES, TrainConfig
    t = sub.add_parser("train", help="stage 1 distillation or a stage 2 task adapter", formatter_class=_Help,
                       description="Train a student (stage distill) or one task adapter (stage = task). A rerun "
                       "with the same --output resumes from its trainer_state_<stage>.pt.")
    t.add_argument("--data", required=True, help="JSONL: {query, document[, negatives, score]} per line, or "
                   "{text, label} for classification")
    teach = t.add_mutually_exclusive_group()
    teach.add_argument("--teacher", default=None, help="a jv5fast checkpoint used as the teacher")
    teach.add_argument("--teacher-embeddings", default=None,
                       help="folder with query.npy and document.npy aligned with --data (memory-mapped)")
    helps = {
        "stage": "distill (stage 1) or the task adapter to train (stage 2)",
        "student": "student checkpoint folder (released layout)",
        "output": "where the result and trainer_state_<stage>.pt go",
        "steps": "optimizer steps (a resumed run may raise it)", "batch_size": "pairs (or anchors) per micro-batch",
        "grad_accum": "micro-batches per step", "lr": "peak learning rate", "weight_decay": "AdamW weight decay",
        "warmup_steps": "linear warmup steps", "schedule": "decay after warmup", "max_grad_norm": "gradient clip",
        "max_length": "tokens per text", "rope_theta": "training RoPE theta (default: the config's)",
        "lora_r": "LoRA rank (stage 2)", "lora_alpha": "LoRA alpha", "lora_targets": "projections with LoRA",
        "temperature": "InfoNCE temperature", "learn_temperature": "learn the temperature (default: retrieval only)",
        "cosent_tau": "CoSENT temperature", "lambda_nce": "InfoNCE weight", "lambda_distill": "distillation weight",
        "lambda_gor": "GOR weight (0 disables)", "lambda_rkd": "relational KD weight (classification)",
        "n_negatives": "different-label negatives per anchor (classification)",
        "matryoshka_dims": "also apply the contrastive losses at these truncated dims (each < the model dim)",
        "teacher_query_prompt": "prefix for teacher queries", "teacher_document_prompt": "prefix for teacher documents",
        "average_from_step": "average the adapter of this step with the final one",
        "gather_negatives": "under torchrun, other ranks' documents join the negatives",
        "save_every": "save the trainer state every N steps (0: at the end only)",
        "resume": "resume from OUTPUT/trainer_state_<stage>.pt when it exists", "seed": "random seed",
        "device": "cpu, cuda or cuda:N (default: cuda when available)", "log_every": "steps between log lines",
    }
    choices = {"stage": STAGES, "schedule": ("cosine", "linear")}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw = dict(default=default, help=helps.get(f.name, f.name.replace("_", " ")))
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if isinstance(default, bool) or f.name == "learn_temperature":
            t.add_argument(flag, type=parse_bool, metavar="BOOL", **kw)
        elif isinstance(default, tuple):
            t.add_argument(flag, type=int_list if f.name == "matryoshka_dims" else str_list, metavar="A,B,...", **kw)
        elif isinstance(default, (int, float)):
            t.add_argument(flag, type=type(default), **kw)
        elif f.name == "rope_theta":
            t.add_argument(flag, type=float, **kw)
        elif f.name == "average_from_step":
            t.add_argument(flag, type=int, **kw)
        else:
            t.add_argument(flag, required=required, **kw)
    t.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="start over even if OUTPUT holds a trainer state (same as --resume false)")


# ---- commands ------------------------------------------------------------------------------------------
def main(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        p.print_help()
        return 0
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0): argparse printed them
        return e.code if isinstance(e.code, int) else 2
    if a.cmd is None:
        p.print_help()
        return 0
    if a.cmd == "embed-corpus":  # reports its own errors and exit status (jv5fast/distributed/cli.py)
        from .distributed import cli as corpus_cli
        return corpus_cli.run(a)
    run = {"embed": _embed, "export-onnx": _export, "train": _train, "serve": _serve, "index": _index,
           "search": _search, "make-checkpoint": _make_checkpoint, "info": _info}[a.cmd]
    try:
        return run(a)
    except BrokenPipeError:  # stdout's reader is gone (| head): stop quietly, as cat and grep do
        return _stdout_gone()
    except CLIError as err:
        return _fail(a.cmd, str(err), err.code)
    except KeyboardInterrupt:
        print(f"jv5fast {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        if err.name in ("fastapi", "uvicorn", "prometheus_client", "starlette"):
            return _fail(a.cmd, f"{err.name} is not installed; serve needs the serve extra: "
                                'pip install "jv5fast[serve]"', 2)
        if err.name in ("onnx", "onnxruntime"):
            return _fail(a.cmd, f"{err.name} is not installed; export-onnx and --backend onnx need the onnx "
                                'extra: pip install "jv5fast[onnx]"', 2)
        if err.name == "pyarrow":
            return _fail(a.cmd, 'pyarrow is not installed; Parquet input needs the parquet extra: pip install '
                                '"jv5fast[parquet]"', 2)
        return _fail(a.cmd, f"{err.name} is not installed ({err})", 1)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        return _fail(a.cmd, cli_words(str(err)), 2)
    except (OSError, RuntimeError, ArithmeticError, MemoryError) as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        return _fail(a.cmd, f"{cli_words(str(err)) or type(err).__name__}", 1)


def _stdout_gone() -> int:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered does not fail
    again and print 'Exception ignored ... BrokenPipeError'; -> 141, the shell's status for SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout is not a file descriptor (tests capture it)
        pass
    return 141


def _count(n: int, noun: str) -> str:
    """'1 text', '2 texts', '0 texts'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fail(cmd, msg, code):
    print(f"jv5fast {cmd}: error: {msg}", file=sys.stderr)
    return code


def _check_quantize(a):
    """--quantize int8: the export's int8 graph with --backend onnx, else the engine's cached int8 export
    of the checkpoint, which runs on the CPU in float32 only."""
    if not a.quantize or a.backend == "onnx":
        return
    if a.device is not None and not a.device.startswith("cpu"):
        raise CLIError(f"--quantize int8 runs on the CPU (onnxruntime's int8); drop --device {a.device}")
    if a.dtype not in (None, "float32"):
        raise CLIError(f"--quantize int8 quantizes the float32 model; drop --dtype {a.dtype}")


def _quantize_kw(a):
    kw = {}
    if getattr(a, "cpu_precision", "fp32") != "fp32":
        kw["cpu_precision"] = a.cpu_precision
    if not a.quantize:
        return kw
    return {**kw, "onnx_quantize": a.quantize} if a.backend == "onnx" else {**kw, "quantize": a.quantize}


def _add_info_parser(sub):
    i = sub.add_parser("info", help="load a model and say what runs where (device, ISA, each GEMM and why)",
                       formatter_class=_Help, description="Load --model as `embed` would and print "
                       "Engine.describe(): device, dtype, the ISA of jv5fast's C++ kernels, the forward path and, "
                       "on the CPU, which GEMM runs each projection shape and the timings that chose it.")
    i.add_argument("--model", required=True, help="checkpoint folder (released layout), hub id, or ONNX export")
    i.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    i.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    i.add_argument("--backend", default="torch", choices=("torch", "onnx"), help="engine backend")
    i.add_argument("--cpu-precision", default="fp32", choices=CPU_PRECISIONS, help=CPU_PRECISION_HELP)
    i.add_argument("--quantize", default=None, choices=("int8",), help="as in embed")
    i.add_argument("--json", action="store_true", help="print the description as one JSON object")


def _info(a):
    _check_quantize(a)
    _check_cpu_precision(a)
    _check_model(a.model, "--model", a.backend)
    _check_device(a.device)
    from .cpu_tuning import format_description
    from .engine import Engine
    eng = Engine(a.model, device=a.device, dtype=a.dtype, backend=a.backend, **_quantize_kw(a))
    desc = eng.describe()
    if a.json:
        print(json.dumps({"model": eng.path, "family": eng.args.family, "dim": eng.dim, "task": eng.task, **desc}))
    else:
        print(f"{eng.path}: {eng.args.family}, {eng.dim}-d, task {eng.task}\n{format_description(desc)}")
    return 0


def _check_cpu_precision(a):
    """--cpu-precision bf16: the torch engine on the CPU in float32, without --quantize (checked before loading)."""
    if getattr(a, "cpu_precision", "fp32") == "fp32":
        return
    for bad, why in ((a.backend != "torch", f"--backend {a.backend}"), (bool(a.quantize), f"--quantize {a.quantize}"),
                     (a.dtype not in (None, "float32"), f"--dtype {a.dtype}"),
                     (a.device is not None and not a.device.startswith("cpu"), f"--device {a.device}")):
        if bad:
            raise CLIError(f"--cpu-precision {a.cpu_precision} runs the torch engine's GEMMs on the CPU from float32; "
                           f"drop {why}")


def _embed(a):
    if bool(a.texts) == bool(a.input):
        raise CLIError("give either TEXT arguments or --input FILE (not both, not neither)")
    given = [flag for flag, v in (("--format", a.format), ("--text-column", a.text_column)) if v is not None]
    if given and not a.input:
        raise CLIError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --input; TEXT "
                       f"arguments are embedded as they are")
    fmt = _input_format(a.input, a.format) if a.input else None
    if a.text_column is not None and fmt == "txt":
        raise CLIError(f"--text-column applies to jsonl, json and parquet input; --input {a.input} is read as txt "
                       f"(one text per line): pass --format, or leave out --text-column")
    _check_quantize(a)
    _check_cpu_precision(a)
    if a.output is not None:
        _check_output_file(a.output, "--output", (".npy", ".jsonl"))
        if a.input not in (None, "-") and _same_file(a.output, a.input):
            raise CLIError(f"--output {a.output} is the --input file {a.input}; writing the embeddings there "
                           f"would replace the texts: give another --output")
    _check_model(a.model, "--model", a.backend)
    _check_device(a.device)
    texts = a.texts if a.texts else _read_texts(a.input, fmt, a.text_column or "text")

    from .engine import Engine
    kw = {} if a.task is None else {"task": a.task}
    eng = Engine(a.model, device=a.device, dtype=a.dtype, max_length=a.max_length, backend=a.backend,
                 max_batch_tokens=a.max_batch_tokens, **_quantize_kw(a), **kw)
    emb = eng.embed(texts, prompt_name=a.prompt_name, prompt=a.prompt, truncate_dim=a.truncate_dim,
                    precision=a.precision, normalize=not a.no_normalize, truncate=not a.no_truncate,
                    show_progress_bar=False if a.no_progress else None)
    if a.output is None:  # JSON Lines on stdout; everything else (progress, warnings) is on stderr
        out = sys.stdout
        for i, row in enumerate(emb):
            out.write(json.dumps({"index": i, "embedding": row.tolist()}) + "\n")
        out.flush()
    else:
        _write(a.output, emb)
    print(f"embedded {_count(len(texts), 'text')} -> {a.output or 'stdout'} {tuple(emb.shape)} {emb.dtype}",
          file=sys.stderr)
    return 0


def _serve(a):
    _check_quantize(a)
    _check_cpu_precision(a)
    _check_model(a.model, "--model", a.backend)
    path = os.path.expanduser(a.model)
    if (os.path.isabs(path) or a.model.startswith((".", "~"))) and not os.path.isdir(path):
        raise CLIError(f"--model {a.model}: no such folder")  # fail before binding, not after
    _check_device(a.device)
    if not 0 <= a.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {a.port}")
    from .server import _api_key, serve
    try:  # an empty key (--api-key "$KEY", KEY unset) must never mean "no authentication": refused before binding
        _api_key(a.api_key, "--api-key")
    except ValueError as e:
        raise CLIError(str(e)) from None
    resident = {"auto": "auto", "true": True, "false": False}[a.resident_tasks]
    return serve(a.model, host=a.host, port=a.port, device=a.device, dtype=a.dtype, backend=a.backend,
                 max_length=a.max_length, **_quantize_kw(a), log_level=a.log_level,
                 drain_timeout=a.drain_timeout, served_model_name=a.served_model_name, api_key=a.api_key,
                 max_batch_tokens=a.max_batch_tokens, max_wait_ms=a.max_wait_ms,
                 max_queue_tokens=a.max_queue_tokens or "auto", max_inputs=a.max_inputs,
                 max_request_bytes=a.max_request_bytes, resident_tasks=resident)


def _train(a):
    import dataclasses

    from .train.trainer import TrainConfig, Trainer
    _check_model(a.student, "--student")
    if a.teacher:
        _check_model(a.teacher, "--teacher")
    _check_device(a.device)
    out_parent = os.path.dirname(os.path.abspath(a.output))
    if os.path.isfile(a.output):
        raise CLIError(f"--output {a.output} is a file; give a folder")
    if not os.path.isdir(out_parent):
        raise CLIError(f"--output {a.output}: folder {out_parent} does not exist")
    examples = _read_examples(a.data, a.stage)
    embeddings = teacher = None
    if a.teacher_embeddings:
        import numpy as np
        files = {s: os.path.join(a.teacher_embeddings, f"{s}.npy") for s in ("query", "document")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise CLIError(f"--teacher-embeddings {a.teacher_embeddings} must hold query.npy and document.npy; "
                           f"missing: {', '.join(os.path.basename(m) for m in missing)}")
        embeddings = {s: np.load(f, mmap_mode="r") for s, f in files.items()}
    elif a.teacher:
        from .engine import Engine
        eng = Engine(a.teacher, device=a.device)

        def teacher(texts):
            return eng.embed(texts, prompt="")
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    cfg = TrainConfig(**{k: getattr(a, k) for k in fields if getattr(a, k) is not None or k == "rope_theta"})
    trainer = Trainer(cfg, examples, teacher=teacher, teacher_embeddings=embeddings)
    if trainer.resumed_from is not None:
        if trainer.resumed_from >= cfg.steps:  # train() still writes the result, in case it never was
            print(f"nothing to train: {trainer.state_path} already reached step {trainer.resumed_from} of "
                  f"{cfg.steps}; writing its result again (raise --steps to continue, or --no-resume to train "
                  f"again)", file=sys.stderr)
        else:
            print(f"resuming from step {trainer.resumed_from} of {cfg.steps} ({trainer.state_path})",
                  file=sys.stderr)
    trainer.train()
    print(f"trained {cfg.stage} ({_count(cfg.steps, 'step')}) -> {cfg.output}", file=sys.stderr)
    return 0


def _export(a):
    import warnings

    from .onnx_export import export_onnx
    _check_model(a.model, "--model")
    with warnings.catch_warnings():  # the int8 quality report is printed once, below
        warnings.filterwarnings("ignore", message="int8 ONNX model quality")
        meta = export_onnx(a.model, a.output, task=a.task, dtype=a.dtype, opset=a.opset, truncate_dim=a.truncate_dim,
                           quantize=a.quantize, external_data=True if a.external_data else None,
                           overwrite=a.overwrite)
    print(f"exported {meta['model_type']} task={meta['task']} dtype={meta['dtype']} -> {a.output}", file=sys.stderr)
    if "int8" in meta:
        q = meta["int8"]
        print(f"int8: mean cosine to float {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f}), "
              f"top-10 overlap {q['top10_overlap']:.3f} on {_count(q['texts'], 'text')}", file=sys.stderr)
    return 0


# ---- make-checkpoint ----------------------------------------------------------------------------------
_HUB_IDS = {"nano": "jinaai/jina-embeddings-v5-text-nano", "small": "jinaai/jina-embeddings-v5-text-small"}
_seed = _checked(int, lambda n: 0 <= n < 2**32, "an integer in 0..4294967295")


def _add_make_checkpoint_parser(sub):
    m = sub.add_parser("make-checkpoint", help="write a checkpoint with RANDOM weights, offline (to try the "
                       "commands and to test; its vectors are meaningless)", formatter_class=_Help,
                       description="Write a checkpoint folder in the released layout (config.json, bf16 "
                       "safetensors, the four task adapters, the real tokenizer) whose weights are RANDOM, drawn "
                       "from --seed, with no download. Every command takes it as --model, but its embeddings are "
                       "MEANINGLESS: use it to try jv5fast and to test pipelines offline, never to compare texts. "
                       "The folder's README.txt and the config field jv5fast_random_weights say so. Needs the "
                       "quicktok-v1 package for the tokenizers.")
    m.add_argument("dir", metavar="DIR", help="folder to write; it must not exist, or be empty (nothing is "
                   "overwritten)")
    m.add_argument("--family", default="nano", choices=("nano", "small"), help="architecture: nano (EuroBERT, "
                   "Llama-3 tokenizer) or small (Qwen3 tokenizer and backbone)")
    m.add_argument("--size", default="tiny", choices=("tiny", "full"), help="tiny: 2 layers, 64-d, a few MB, "
                   "seconds; full: the released shapes (hundreds of MB to ~1.2 GB)")
    m.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed writes the same weights")


_RANDOM_README = """RANDOM WEIGHTS - THIS IS NOT A TRAINED MODEL
============================================

This folder was written by `jv5fast make-checkpoint` (jv5fast {version}):
family {family}, size {size}, seed {seed}.

Its layout, shapes and tokenizer are those of {hub_id}, but every weight is a
random number drawn from the seed. The embeddings it produces are MEANINGLESS:
similar texts do not get similar vectors. Use it to try the jv5fast commands
and to test pipelines offline; never to search, rank, cluster or compare real
texts. config.json carries "jv5fast_random_weights": true to say the same.

For real embeddings, use the released model: --model {hub_id}
"""


def _make_checkpoint(a):
    """Write the checkpoint in a hidden folder inside DIR, then rename its files into DIR (renames within one
    folder: a mount point works, and a failure leaves DIR as it was, removed again if this command made it)."""
    import shutil
    import tempfile
    out = a.dir
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise CLIError(f"DIR {out} exists and is not a folder; give a new folder's name")
        try:
            held = os.listdir(out)
        except OSError as e:
            raise CLIError(f"cannot read DIR {out}: {e.strerror or e}") from None
        if held:
            raise CLIError(f"DIR {out} exists and is not empty (it holds {_names(sorted(held), 5)}); "
                           f"make-checkpoint never overwrites or deletes anything: give a new or empty folder")
    else:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise CLIError(f"DIR {out}: folder {parent} does not exist")
    try:
        import quicktok  # noqa: F401  (the tokenizers are rebuilt from its vocabularies)
    except ImportError:
        raise CLIError("quicktok-v1 is not installed; make-checkpoint rebuilds the real tokenizers from its "
                       "vocabularies: pip install quicktok-v1") from None
    from .testing import SIZES, write_checkpoint
    made = not os.path.lexists(out)
    try:
        if made:
            os.mkdir(out)  # 0777 & ~umask, like any folder the user makes
        tmp = tempfile.mkdtemp(prefix=".jv5fast-checkpoint-", dir=out)
    except OSError as e:
        raise CLIError(f"cannot write DIR {out}: {e.strerror or e}", code=1) from None
    final, moved = os.path.abspath(out), []
    try:
        write_checkpoint(tmp, a.family, a.size, a.seed, real_tokenizer=True,
                         config_overrides={"jv5fast_random_weights": True})
        for task in sorted(os.listdir(os.path.join(tmp, "adapters"))):  # it recorded the hidden folder
            path = os.path.join(tmp, "adapters", task, "adapter_config.json")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg["base_model_name_or_path"] = final
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write(_RANDOM_README.format(version=_version(), family=a.family, size=a.size, seed=a.seed,
                                          hub_id=_HUB_IDS[a.family]))
        from .onnx_export import _umask
        mode = 0o666 & ~_umask()
        for root, _, files in os.walk(tmp):  # safetensors writes 0600; a model folder is readable as usual
            for name in files:
                os.chmod(os.path.join(root, name), mode)
        names = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", n != "README.txt", n))
        for name in names:  # README.txt first, config.json (what makes it a checkpoint) last
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
            moved.append(name)
        os.rmdir(tmp)
    except BaseException:  # Ctrl-C and a full disk too: DIR goes back to what it was (empty, or absent)
        shutil.rmtree(tmp, ignore_errors=True)
        for name in moved:  # only what this command wrote: DIR was empty or absent
            path = os.path.join(out, name)
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            except OSError:
                pass
        if made:
            try:
                os.rmdir(out)
            except OSError:  # not empty (something else wrote there): left as it is
                pass
        raise
    dim = SIZES[(a.family, a.size)]["hidden_size"]
    print(f"wrote a {a.family} {a.size} checkpoint ({dim}-d, seed {a.seed}) -> {out}", file=sys.stderr)
    print(f"WARNING: RANDOM WEIGHTS. {out} is not a trained model and its embeddings are MEANINGLESS: use it "
          f"to try commands and test offline, never to compare texts (see {os.path.join(out, 'README.txt')}). "
          f"Real model: --model {_HUB_IDS[a.family]}", file=sys.stderr)
    return 0


# ---- index and search ---------------------------------------------------------------------------------
def _add_index_parsers(sub, task_help):
    i = sub.add_parser("index", help="embed documents into an index file for `jv5fast search`", formatter_class=_Help,
                       description="Embed documents (with the document prompt) into an EmbeddingIndex file holding "
                       "their ids, the start of their texts and the settings used. --input: JSON Lines ({\"id\": "
                       "..., \"text\": ...} per line), a Parquet file or folder of *.parquet with id and text "
                       "columns, or a `jv5fast embed-corpus` output folder (its vectors are used as they are).")
    i.add_argument("--input", required=True, help="FILE.jsonl, FILE.parquet, a folder of *.parquet, or an "
                   "embed-corpus output folder (with manifest.json)")
    i.add_argument("--output", required=True, help="the index file to write (its folder must exist); an existing "
                   "file there is replaced only if it is a jv5fast index, and never the input or a file inside "
                   "an input folder")
    i.add_argument("--model", default=None, help="checkpoint folder (released layout) or hub id; optional for "
                   "embed-corpus output, where it must agree with the manifest")
    i.add_argument("--task", default=None, help=task_help)
    i.add_argument("--truncate-dim", type=_positive_int, default=None, help="Matryoshka dimension (default: the "
                   "model's dimension)")
    i.add_argument("--store", default="float32", choices=("float32", "float16", "int8"),
                   help="precision of the stored vectors used for rescoring")
    # The next five shape the embedding of documents; embed-corpus output is already embedded, so giving
    # one with it is refused (their defaults live in _INDEX_DEFAULTS, so an explicit value can be told).
    i.add_argument("--id-column", default=None, help="field / column holding each document's id (int or str, "
                   "not -1; default: id)")
    i.add_argument("--text-column", default=None, help="field / column holding each document's text (default: "
                   "text)")
    i.add_argument("--text-chars", type=_nonneg_int, default=None, help="store the first N characters of each "
                   "text for display by search (0: none; default: 1000)")
    i.add_argument("--max-length", type=_positive_int, default=None, help="tokens per text, prompt included "
                   "(default: the model's max_position_embeddings)")
    i.add_argument("--max-batch-tokens", type=_positive_int, default=None, help="token budget of one packed "
                   "forward pass (default: 16384)")
    i.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = sub.add_parser("search", help="search an index file written by `jv5fast index`", formatter_class=_Help,
                       description="Embed queries with the index's model, task and the query prompt, and print "
                       "the k best documents (rank, score, id, start of the text) per query.")
    q.add_argument("index", metavar="INDEX", help="index file written by `jv5fast index`")
    q.add_argument("queries", nargs="*", help="query texts (or use --input)")
    q.add_argument("--input", default=None, help="queries, read by extension: .txt one per line, .jsonl a JSON "
                   "string or {\"text\": ...} per line, .json an array of them, .parquet a text column; - for "
                   "stdin (.txt unless --format)")
    q.add_argument("--format", default=None, choices=INPUT_FORMATS, help="read --input as this format, whatever "
                   "its extension (default: from the extension; txt without one)")
    q.add_argument("-k", type=_positive_int, default=10, help="results per query (at most the index's size)")
    q.add_argument("--rescore", type=_positive_int, default=4, help="shortlist k x N rows by Hamming distance, "
                   "then rescore them with the float vectors")
    q.add_argument("--json", action="store_true", help="JSON Lines: one {\"query\", \"results\": [{\"rank\", "
                   "\"id\", \"score\", \"text\"}]} object per query")
    q.add_argument("--model", default=None, help="the model to embed queries with (default: the index's); its "
                   "dimension must match the index")
    q.add_argument("--task", default=None, help="must agree with the index's task (default: the index's)")
    q.add_argument("--truncate-dim", type=_positive_int, default=None, help="must agree with the index's "
                   "dimension (default: the index's)")
    q.add_argument("--max-length", type=_positive_int, default=None, help="tokens per query, prompt included")
    q.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


_INDEX_DEFAULTS = {"id_column": "id", "text_column": "text", "text_chars": 1000, "max_length": None,
                   "max_batch_tokens": 16384}
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins escaped pairs, so any left is a lone one


def _lone_surrogate(s: str):
    """The position of the first lone surrogate in ``s`` (not valid Unicode, cannot be written as UTF-8), or None."""
    m = _SURROGATE.search(s)
    return None if m is None else m.start()


def _same_model(a: str, b: str) -> bool:
    """Two --model values name the same checkpoint: the same folder (after resolving) or the same hub id."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _model_ref(model: str) -> str:
    """What the index records: an absolute path for a folder (search may run elsewhere), else the hub id."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def _folder_model_dim(model: str):
    """The hidden size in a checkpoint folder's config.json (what search compares), or None when ``model``
    is not a local folder or its config cannot be read (search then compares what it can)."""
    if not os.path.isdir(model):
        return None
    from .config import load_model_args
    try:
        return load_model_args(model).hidden_size
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_index_output(out: str, inp: str):
    """Refuse an --output that would destroy what jv5fast did not write: the --input itself, a file inside
    an input folder, or an existing file that is not a jv5fast index (an earlier index, or an empty file,
    may be replaced; the save is atomic). Called before the work and again just before the save."""
    from .index import _MAGIC
    if os.path.isdir(out):
        raise CLIError(f"--output {out} is a folder; give the index file's name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CLIError(f"--output {out}: folder {parent} does not exist")
    if _same_file(out, inp):
        raise CLIError(f"--output {out} is the --input {inp}; writing the index there would replace the documents: "
                       f"give another --output")
    real_in = os.path.realpath(inp)
    if os.path.isdir(real_in) and os.path.commonpath([os.path.realpath(out), real_in]) == real_in:
        raise CLIError(f"--output {out} is inside the --input folder {inp}; the index must not replace or join "
                       f"what it is built from: give a path outside that folder")
    if not os.path.lexists(out):
        return
    if not os.path.isfile(out):
        raise CLIError(f"--output {out} exists and is not a regular file (a device, pipe or broken link); give "
                       f"another --output")
    try:
        with open(out, "rb") as f:
            head = f.read(len(_MAGIC))
    except OSError as e:
        raise CLIError(f"cannot read --output {out} to check that it is a jv5fast index: {e.strerror or e}") \
            from None
    if head and head != _MAGIC:
        raise CLIError(f"--output {out} exists and is not a jv5fast index file (it does not start with "
                       f"{_MAGIC!r}); index replaces only an earlier index: give another --output, or remove "
                       f"the file yourself")


def _doc_id(v, where: str, id_col: str):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise CLIError(f"{where}: {id_col!r} must be an int or a str, got {type(v).__name__} {v!r:.50}")
    if isinstance(v, int) and not -2**63 <= v < 2**63:
        raise CLIError(f"{where}: id {v} does not fit in int64")
    if isinstance(v, int) and v == -1:
        raise CLIError(f"{where}: id -1 is reserved (search reports -1 for 'no result', as faiss does); use any "
                       f"other integer id")
    if isinstance(v, str) and (j := _lone_surrogate(v)) is not None:
        raise CLIError(f"{where}: id {v!r:.50} holds a lone surrogate at character {j} (not valid Unicode; it "
                       f"cannot be stored as UTF-8)")
    return v


class _Docs:
    """Ids and texts gathered from the input, each new id checked against the first one's type and for
    duplicates, with the line / row that first held it; the stored start of each text (``text_chars``
    characters) is checked for what cannot be stored, before anything is embedded."""

    def __init__(self, text_chars: int):
        self.ids, self.texts, self.where = [], [], {}
        self.text_chars = text_chars

    def add(self, doc_id, text, where: str, id_col: str, text_col: str):
        if self.ids and type(doc_id) is not type(self.ids[0]):
            raise CLIError(f"{where}: id {doc_id!r:.50} is a {type(doc_id).__name__}, but {self.where[self.ids[0]]} "
                           f"has a {type(self.ids[0]).__name__} id; use one type")
        if doc_id in self.where:
            raise CLIError(f"{where}: duplicate id {doc_id!r:.80} (first at {self.where[doc_id]})")
        if not isinstance(text, str):
            raise CLIError(f"{where} (id {doc_id!r:.50}): {text_col!r} must be a string, got "
                           f"{'null' if text is None else type(text).__name__}")
        if self.text_chars and (j := _lone_surrogate(text[: self.text_chars])) is not None:
            raise CLIError(f"{where} (id {doc_id!r:.50}): {text_col!r} holds a lone surrogate at character {j} "
                           f"(not valid Unicode), which cannot be stored for display; fix the text, or pass "
                           f"--text-chars {j} or 0")
        self.where[doc_id] = where
        self.ids.append(doc_id)
        self.texts.append(text)


def _read_docs_jsonl(path: str, id_col: str, text_col: str, text_chars: int) -> _Docs:
    name, lines = _read_lines(path, "--input")
    docs = _Docs(text_chars)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # a document needs an id: blank lines are skipped, not empty documents
        obj = _json_line(name, n, line)
        where = f"{name} line {n}"
        if not isinstance(obj, dict):
            raise CLIError(f"{where}: expected an object with {id_col!r} and {text_col!r}, got {type(obj).__name__}")
        if id_col not in obj:
            raise CLIError(f"{where}: no {id_col!r} field (keys: {_names(sorted(obj))}); pass --id-column")
        if text_col not in obj:
            raise CLIError(f"{where} (id {obj[id_col]!r:.50}): no {text_col!r} field (keys: {_names(sorted(obj))}); "
                           f"pass --text-column")
        docs.add(_doc_id(obj[id_col], where, id_col), obj[text_col], where, id_col, text_col)
    return docs


def _column_values(col, path: str, row: int, name: str) -> list:
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


def _read_docs_parquet(files: list, id_col: str, text_col: str, text_chars: int) -> _Docs:
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = _Docs(text_chars)
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise CLIError(f"--input {path}: not a readable Parquet file ({e})") from None
        for col, flag in ((id_col, "--id-column"), (text_col, "--text-column")):
            if col not in schema.names:
                raise CLIError(f"--input {path}: no column {col!r} (columns: {_names(schema.names, 20)}); pass {flag}")
        t_id, t_text = schema.field(id_col).type, schema.field(text_col).type
        if not (pa.types.is_integer(t_id) or pa.types.is_string(t_id) or pa.types.is_large_string(t_id)):
            raise CLIError(f"--input {path}: column {id_col!r} is {t_id}; ids must be integers or strings")
        if not (pa.types.is_string(t_text) or pa.types.is_large_string(t_text)):
            raise CLIError(f"--input {path}: column {text_col!r} is {t_text}; texts must be strings")
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[id_col, text_col]):
            ids = _column_values(batch.column(0), path, row, id_col)
            texts = _column_values(batch.column(1), path, row, text_col)
            for doc_id, text in zip(ids, texts):
                where = f"{path} row {row}"
                if doc_id is None:
                    raise CLIError(f"{where}: {id_col!r} is null")
                docs.add(_doc_id(doc_id, where, id_col), text, where, id_col, text_col)
                row += 1
    return docs


def _index_from_corpus(a, inp: str):
    """An EmbeddingIndex over embed-corpus output (no embedding done), its settings checked against the
    flags given, and its model recorded as search will need it."""
    from .index import EmbeddingIndex, _read_corpus_manifest
    given = [f"--{k.replace('_', '-')}" for k in _INDEX_DEFAULTS if getattr(a, k) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to embed-corpus output "
                       f"({inp}): its vectors are already embedded and it holds ids but no texts; leave "
                       f"{'it' if len(given) == 1 else 'them'} out")
    try:
        settings, _ = _read_corpus_manifest(inp)
    except (ValueError, OSError) as e:
        raise CLIError(f"--input: {e}") from None
    for flag, given, recorded in (("--model", a.model, settings["model"]), ("--task", a.task, settings["task"]),
                                  ("--truncate-dim", a.truncate_dim, settings["dim"])):
        same = _same_model(given, recorded) if flag == "--model" and given is not None else given == recorded
        if given is not None and not same:
            raise CLIError(f"{flag} {given} differs from the embed-corpus output's {flag[2:]} {recorded} "
                           f"({inp}/manifest.json); leave out {flag}, or embed again")
    # The manifest records the model as it was passed; a folder that resolves from here is made absolute,
    # so search finds the same checkpoint from any directory, and its width is recorded for search to compare.
    model = _model_ref(a.model if a.model is not None else settings["model"])
    model_dim = _folder_model_dim(model)
    if model_dim is not None and (settings["dim"] > model_dim or
                                  (settings["truncate_dim"] is None and settings["dim"] != model_dim)):
        raise CLIError(f"{inp}/manifest.json: its model {model} is a {model_dim}-d model, but the vectors are "
                       f"{settings['dim']}-d (truncate_dim {settings['truncate_dim']}); pass the --model they were "
                       f"embedded with")
    index = EmbeddingIndex.from_parquet(inp, store=a.store)
    index.metadata = {**index.metadata, "model": model, **({} if model_dim is None else {"model_dim": model_dim})}
    return index


def _index(a):
    from .index import EmbeddingIndex
    inp = a.input
    if not os.path.exists(inp):
        raise CLIError(f"--input not found: {inp}")
    _check_index_output(a.output, inp)
    _check_device(a.device)
    if os.path.isdir(inp) and os.path.isfile(os.path.join(inp, "manifest.json")):
        index = _index_from_corpus(a, inp)
        source = f"embed-corpus output {inp}"
    else:
        o = {k: _INDEX_DEFAULTS[k] if getattr(a, k) is None else getattr(a, k) for k in _INDEX_DEFAULTS}
        if a.model is None:
            raise CLIError("--model is required unless --input is an embed-corpus output folder (with manifest.json)")
        if o["id_column"] == o["text_column"]:
            raise CLIError(f"--id-column and --text-column are both {o['id_column']!r}; a document's id and its "
                           f"text must come from different fields")
        if os.path.isdir(inp):
            files = sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".parquet"))
            if not files:
                raise CLIError(f"--input {inp} is a folder without manifest.json or *.parquet files")
            kind = "parquet"
        elif inp.endswith(".jsonl"):
            kind = "jsonl"
        elif inp.endswith(".parquet"):
            kind, files = "parquet", [inp]
        else:
            raise CLIError(f"--input must be a .jsonl file, a .parquet file, a folder of .parquet files or an "
                           f"embed-corpus output folder, got {inp!r}")
        _check_model(a.model, "--model")
        cols = (o["id_column"], o["text_column"], o["text_chars"])
        docs = _read_docs_jsonl(inp, *cols) if kind == "jsonl" else _read_docs_parquet(files, *cols)
        if not docs.ids:
            raise CLIError(f"--input {inp} holds no documents")
        from .engine import Engine
        eng = Engine(a.model, device=a.device, max_length=o["max_length"], max_batch_tokens=o["max_batch_tokens"],
                     **({} if a.task is None else {"task": a.task}))
        emb = eng.encode_document(docs.texts, truncate_dim=a.truncate_dim,
                                  show_progress_bar=False if a.no_progress else None)
        settings = {"model": _model_ref(a.model), "task": eng.task, "prompt_name": "document", "prompt": None,
                    "query_prompt_name": "query", "truncate_dim": a.truncate_dim, "dim": int(emb.shape[1]),
                    "model_dim": eng.dim, "precision": "float32", "normalize": True,
                    "id_column": o["id_column"], "text_column": o["text_column"]}
        index = EmbeddingIndex(emb.shape[1], store=a.store, metadata=settings)
        chars = o["text_chars"]
        index.add(emb, ids=docs.ids, texts=[t[:chars] for t in docs.texts] if chars else None)
        source = inp
    _check_index_output(a.output, inp)  # again: a file may have appeared there while the documents were embedded
    try:
        index.save(a.output)  # atomic: a failure leaves any previous file as it was
    except OSError as e:
        raise CLIError(f"cannot write --output {a.output}: {e.strerror or e}", code=1) from None
    print(f"indexed {_count(len(index), 'document')} from {source} -> {a.output} (dim {index.dim}, store {index.store})",
          file=sys.stderr)
    return 0


def _search_engine(a, model: str, meta: dict):
    """The Engine that embeds the queries. A recorded task that is not one of TASKS (embed-corpus writes
    "merged" for a merged checkpoint whose task is not recorded by name) is that checkpoint's only task:
    the engine is built without task=. A recorded task the model cannot serve is reported as the index's,
    not as a flag the user gave."""
    from .engine import Engine
    recorded = meta.get("task")
    only = isinstance(recorded, str) and recorded not in TASKS
    if a.task is not None and recorded is not None and a.task != recorded:
        why = (f"the only task of the merged checkpoint it was built with (recorded as {recorded!r})" if only
               else f"the index's task {recorded}")
        raise CLIError(f"--task {a.task} differs from {why} ({a.index} was built with it); leave out --task")
    task = a.task if a.task is not None else None if only else recorded
    try:
        return Engine(model, device=a.device, max_length=a.max_length, **({} if task is None else {"task": task}))
    except ValueError as e:
        msg = str(e)
        if a.task is None and task is not None and msg.startswith((f"task {task!r} requested", f"unknown task {task!r}")):
            raise CLIError(f"the index's task {task} ({a.index} was built with it) cannot be used with {model}: "
                           f"{msg.split('; pass task=None')[0]}; search with the model the index was built "
                           f"with") from None
        raise


def _search(a):
    from .index import EmbeddingIndex
    if bool(a.queries) == bool(a.input):
        raise CLIError("give either query TEXT arguments or --input FILE (not both, not neither)")
    if os.path.isdir(a.index):
        raise CLIError(f"INDEX {a.index} is a folder; give the file written by `jv5fast index`")
    if not os.path.isfile(a.index):
        raise CLIError(f"INDEX file not found: {a.index}")
    _check_device(a.device)
    if a.queries and a.format is not None:
        raise CLIError("--format applies to --input; query arguments are used as they are")
    fmt = None if a.queries else _input_format(a.input, a.format)
    queries = a.queries if a.queries else _read_texts(a.input, fmt)
    for i, query in enumerate(queries):  # each query is printed back: check them all before any output
        if (j := _lone_surrogate(query)) is not None:
            where = (f"query argument {i + 1}" if a.queries else f"{'<stdin>' if a.input == '-' else a.input} "
                     + {"json": f"index {i}", "parquet": f"row {i}"}.get(fmt, f"line {i + 1}"))
            raise CLIError(f"{where} holds a lone surrogate at character {j} (not valid Unicode: a non-UTF-8 "
                           f"argument, or a JSON escape such as \\ud800 without its pair); fix the query")
    index = EmbeddingIndex.load(a.index)
    meta = index.metadata
    if len(index) == 0:
        raise CLIError(f"INDEX {a.index} is empty")
    if a.truncate_dim is not None and a.truncate_dim != index.dim:
        raise CLIError(f"--truncate-dim {a.truncate_dim} differs from the index's dimension {index.dim} "
                       f"({a.index}); leave out --truncate-dim")
    model = a.model or meta.get("model")
    if not isinstance(model, str):
        raise CLIError(f"INDEX {a.index} records no model (not written by `jv5fast index`); pass --model")
    _check_model(model, "--model" if a.model else "the index's model (pass --model to override it)")
    eng = _search_engine(a, model, meta)
    model_dim = meta.get("model_dim")
    if eng.dim < index.dim or (isinstance(model_dim, int) and eng.dim != model_dim) \
            or (model_dim is None and meta.get("truncate_dim") is None and eng.dim != index.dim):
        was = f"{model_dim}-d model" if isinstance(model_dim, int) else f"{index.dim}-d vectors"
        raise CLIError(f"--model {model} gives {eng.dim}-d embeddings, but {a.index} was built with a {was} "
                       f"({meta.get('model', 'model not recorded')}); use the index's model")
    if a.model and isinstance(meta.get("model"), str) and not _same_model(a.model, meta["model"]):
        print(f"note: --model {a.model} is not the index's model {meta['model']}", file=sys.stderr)
    prompt_name = meta.get("query_prompt_name", "query")
    q = eng.embed(queries, prompt_name=prompt_name, truncate_dim=index.dim if index.dim != eng.dim else None,
                  normalize=meta.get("normalize", True) is not False, show_progress_bar=False)
    # Results past len(index) are padding: k is capped there, so -k 2000000000 allocates nothing large.
    S, I = index.search(q, min(a.k, len(index)), rescore_multiplier=a.rescore)
    ids, texts = index.map_ids(I), index.texts
    out = sys.stdout
    for qi, query in enumerate(queries):
        hits = [(r + 1, ids[qi, r], float(S[qi, r]), None if texts is None else texts[I[qi, r]])
                for r in range(I.shape[1]) if I[qi, r] >= 0]
        if a.json:
            res = [{"rank": rank, "id": doc_id.item() if hasattr(doc_id, "item") else doc_id, "score": score,
                    **({} if text is None else {"text": text})} for rank, doc_id, score, text in hits]
            out.write(json.dumps({"query": query, "results": res}, ensure_ascii=False) + "\n")
            continue
        if len(queries) > 1:
            out.write(("\n" if qi else "") + f"query {qi + 1}: {query}\n")
        for rank, doc_id, score, text in hits:
            line = f"{rank:>3}  {score:.4f}  {doc_id}"
            if text is not None:
                flat = " ".join(text.split())
                line += "  " + (flat if len(flat) <= 100 else flat[:99] + "…")
            out.write(line + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
