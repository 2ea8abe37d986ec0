"""``jv5fast index --input DOCS --output INDEX [--model M]``: documents -> an EmbeddingIndex file.

DOCS is JSON Lines ({"id", "text"} per line), a Parquet file or folder of them, or a ``jv5fast embed-corpus``
output folder, whose vectors are used as they are. Every id and stored text is checked before anything is
embedded (type, duplicates, -1, lone surrogates), each named by line or row. The index records the model
(an absolute path for a folder), task, dimension and prompts that ``jv5fast search`` needs. ``--output``
never replaces the input, a file inside an input folder, or an existing file that is not a jv5fast index;
the save is atomic.
"""
from __future__ import annotations

import os
import sys

from .args import HelpWithDefaults, add_device, add_no_progress, add_task, nonneg_int, positive_int
from .checks import check_device, check_model, same_file, same_model
from .inputs import column_values, json_line, lone_surrogate, read_lines
from .messages import CLIError, count, names


def register(sub):
    i = sub.add_parser("index", help="embed documents into an index file for `jv5fast search`",
                       formatter_class=HelpWithDefaults, description="Embed documents (with the document prompt) "
                       "into an EmbeddingIndex file holding their ids, the start of their texts and the settings "
                       "used. --input: JSON Lines ({\"id\": ..., \"text\": ...} per line), a Parquet file or "
                       "folder of *.parquet with id and text columns, or a `jv5fast embed-corpus` output folder "
                       "(its vectors are used as they are).")
    i.add_argument("--input", required=True, help="FILE.jsonl, FILE.parquet, a folder of *.parquet, or an "
                   "embed-corpus output folder (with manifest.json)")
    i.add_argument("--output", required=True, help="the index file to write (its folder must exist); an existing "
                   "file there is replaced only if it is a jv5fast index, and never the input or a file inside "
                   "an input folder")
    i.add_argument("--model", default=None, help="checkpoint folder (released layout) or hub id; optional for "
                   "embed-corpus output, where it must agree with the manifest")
    add_task(i)
    i.add_argument("--truncate-dim", type=positive_int, default=None, help="Matryoshka dimension (default: the "
                   "model's dimension)")
    i.add_argument("--store", default="float32", choices=("float32", "float16", "int8"),
                   help="precision of the stored vectors used for rescoring")
    # The next five shape the embedding of documents; embed-corpus output is already embedded, so giving
    # one with it is refused (their defaults live in _INDEX_DEFAULTS, so an explicit value can be told).
    i.add_argument("--id-column", default=None, help="field / column holding each document's id (int or str, "
                   "not -1; default: id)")
    i.add_argument("--text-column", default=None, help="field / column holding each document's text (default: "
                   "text)")
    i.add_argument("--text-chars", type=nonneg_int, default=None, help="store the first N characters of each "
                   "text for display by search (0: none; default: 1000)")
    i.add_argument("--max-length", type=positive_int, default=None, help="tokens per text, prompt included "
                   "(default: the model's max_position_embeddings)")
    i.add_argument("--max-batch-tokens", type=positive_int, default=None, help="token budget of one packed "
                   "forward pass (default: 16384)")
    add_device(i)
    add_no_progress(i)


_INDEX_DEFAULTS = {"id_column": "id", "text_column": "text", "text_chars": 1000, "max_length": None,
                   "max_batch_tokens": 16384}


def _model_ref(model: str) -> str:
    """What the index records: an absolute path for a folder (search may run elsewhere), else the hub id."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def _folder_model_dim(model: str):
    """The hidden size in a checkpoint folder's config.json (what search compares), or None when ``model``
    is not a local folder or its config cannot be read (search then compares what it can)."""
    if not os.path.isdir(model):
        return None
    from ..config import load_model_args
    try:
        return load_model_args(model).hidden_size
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_index_output(out: str, inp: str):
    """Refuse an --output that would destroy what jv5fast did not write: the --input itself, a file inside
    an input folder, or an existing file that is not a jv5fast index (an earlier index, or an empty file,
    may be replaced; the save is atomic). Called before the work and again just before the save."""
    from ..index import _MAGIC
    if os.path.isdir(out):
        raise CLIError(f"--output {out} is a folder; give the index file's name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CLIError(f"--output {out}: folder {parent} does not exist")
    if same_file(out, inp):
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
    if isinstance(v, str) and (j := lone_surrogate(v)) is not None:
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
        if self.text_chars and (j := lone_surrogate(text[: self.text_chars])) is not None:
            raise CLIError(f"{where} (id {doc_id!r:.50}): {text_col!r} holds a lone surrogate at character {j} "
                           f"(not valid Unicode), which cannot be stored for display; fix the text, or pass "
                           f"--text-chars {j} or 0")
        self.where[doc_id] = where
        self.ids.append(doc_id)
        self.texts.append(text)


def _read_docs_jsonl(path: str, id_col: str, text_col: str, text_chars: int) -> _Docs:
    name, lines = read_lines(path, "--input")
    docs = _Docs(text_chars)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # a document needs an id: blank lines are skipped, not empty documents
        obj = json_line(name, n, line)
        where = f"{name} line {n}"
        if not isinstance(obj, dict):
            raise CLIError(f"{where}: expected an object with {id_col!r} and {text_col!r}, got {type(obj).__name__}")
        if id_col not in obj:
            raise CLIError(f"{where}: no {id_col!r} field (keys: {names(sorted(obj))}); pass --id-column")
        if text_col not in obj:
            raise CLIError(f"{where} (id {obj[id_col]!r:.50}): no {text_col!r} field (keys: {names(sorted(obj))}); "
                           f"pass --text-column")
        docs.add(_doc_id(obj[id_col], where, id_col), obj[text_col], where, id_col, text_col)
    return docs


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
                raise CLIError(f"--input {path}: no column {col!r} (columns: {names(schema.names, 20)}); pass {flag}")
        t_id, t_text = schema.field(id_col).type, schema.field(text_col).type
        if not (pa.types.is_integer(t_id) or pa.types.is_string(t_id) or pa.types.is_large_string(t_id)):
            raise CLIError(f"--input {path}: column {id_col!r} is {t_id}; ids must be integers or strings")
        if not (pa.types.is_string(t_text) or pa.types.is_large_string(t_text)):
            raise CLIError(f"--input {path}: column {text_col!r} is {t_text}; texts must be strings")
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[id_col, text_col]):
            ids = column_values(batch.column(0), path, row, id_col)
            texts = column_values(batch.column(1), path, row, text_col)
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
    from ..index import EmbeddingIndex, _read_corpus_manifest
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
        same = same_model(given, recorded) if flag == "--model" and given is not None else given == recorded
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


def run(a):
    from ..index import EmbeddingIndex
    inp = a.input
    if not os.path.exists(inp):
        raise CLIError(f"--input not found: {inp}")
    _check_index_output(a.output, inp)
    check_device(a.device)
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
        check_model(a.model, "--model")
        cols = (o["id_column"], o["text_column"], o["text_chars"])
        docs = _read_docs_jsonl(inp, *cols) if kind == "jsonl" else _read_docs_parquet(files, *cols)
        if not docs.ids:
            raise CLIError(f"--input {inp} holds no documents")
        from ..engine import Engine
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
    print(f"indexed {count(len(index), 'document')} from {source} -> {a.output} (dim {index.dim}, store {index.store})",
          file=sys.stderr)
    return 0
