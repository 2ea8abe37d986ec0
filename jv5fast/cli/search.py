"""``jv5fast search INDEX "query" [-k 10] [--json]``: the k best documents of an index file per query.

Queries are embedded with the model, task and query prompt the index records (``--model`` may name another
checkpoint of the same width), shortlisted by Hamming distance and rescored with the stored vectors.
Every query is checked before anything is printed; the text form shows rank, score, id and the start of
the stored text, ``--json`` one object per query.
"""
from __future__ import annotations

import json
import os
import sys

from ..config import TASKS
from .args import HelpWithDefaults, add_device, add_format, positive_int
from .checks import check_device, check_model, same_model
from .inputs import input_format, lone_surrogate, read_texts
from .messages import CLIError


def register(sub):
    q = sub.add_parser("search", help="search an index file written by `jv5fast index`",
                       formatter_class=HelpWithDefaults, description="Embed queries with the index's model, task "
                       "and the query prompt, and print the k best documents (rank, score, id, start of the text) "
                       "per query.")
    q.add_argument("index", metavar="INDEX", help="index file written by `jv5fast index`")
    q.add_argument("queries", nargs="*", help="query texts (or use --input)")
    q.add_argument("--input", default=None, help="queries, read by extension: .txt one per line, .jsonl a JSON "
                   "string or {\"text\": ...} per line, .json an array of them, .parquet a text column; - for "
                   "stdin (.txt unless --format)")
    add_format(q)
    q.add_argument("-k", type=positive_int, default=10, help="results per query (at most the index's size)")
    q.add_argument("--rescore", type=positive_int, default=4, help="shortlist k x N rows by Hamming distance, "
                   "then rescore them with the float vectors")
    q.add_argument("--json", action="store_true", help="JSON Lines: one {\"query\", \"results\": [{\"rank\", "
                   "\"id\", \"score\", \"text\"}]} object per query")
    q.add_argument("--model", default=None, help="the model to embed queries with (default: the index's); its "
                   "dimension must match the index")
    q.add_argument("--task", default=None, help="must agree with the index's task (default: the index's)")
    q.add_argument("--truncate-dim", type=positive_int, default=None, help="must agree with the index's "
                   "dimension (default: the index's)")
    q.add_argument("--max-length", type=positive_int, default=None, help="tokens per query, prompt included")
    add_device(q)


def _search_engine(a, model: str, meta: dict):
    """The Engine that embeds the queries. A recorded task that is not one of TASKS (embed-corpus writes
    "merged" for a merged checkpoint whose task is not recorded by name) is that checkpoint's only task:
    the engine is built without task=. A recorded task the model cannot serve is reported as the index's,
    not as a flag the user gave."""
    from ..engine import Engine
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


def run(a):
    from ..index import EmbeddingIndex
    if bool(a.queries) == bool(a.input):
        raise CLIError("give either query TEXT arguments or --input FILE (not both, not neither)")
    if os.path.isdir(a.index):
        raise CLIError(f"INDEX {a.index} is a folder; give the file written by `jv5fast index`")
    if not os.path.isfile(a.index):
        raise CLIError(f"INDEX file not found: {a.index}")
    check_device(a.device)
    if a.queries and a.format is not None:
        raise CLIError("--format applies to --input; query arguments are used as they are")
    fmt = None if a.queries else input_format(a.input, a.format)
    queries = a.queries if a.queries else read_texts(a.input, fmt)
    for i, query in enumerate(queries):  # each query is printed back: check them all before any output
        if (j := lone_surrogate(query)) is not None:
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
    check_model(model, "--model" if a.model else "the index's model (pass --model to override it)")
    eng = _search_engine(a, model, meta)
    model_dim = meta.get("model_dim")
    if eng.dim < index.dim or (isinstance(model_dim, int) and eng.dim != model_dim) \
            or (model_dim is None and meta.get("truncate_dim") is None and eng.dim != index.dim):
        was = f"{model_dim}-d model" if isinstance(model_dim, int) else f"{index.dim}-d vectors"
        raise CLIError(f"--model {model} gives {eng.dim}-d embeddings, but {a.index} was built with a {was} "
                       f"({meta.get('model', 'model not recorded')}); use the index's model")
    if a.model and isinstance(meta.get("model"), str) and not same_model(a.model, meta["model"]):
        print(f"note: --model {a.model} is not the index's model {meta['model']}", file=sys.stderr)
    prompt_name = meta.get("query_prompt_name", "query")
    q = eng.embed(queries, prompt_name=prompt_name, truncate_dim=index.dim if index.dim != eng.dim else None,
                  normalize=meta.get("normalize", True) is not False, show_progress_bar=False)
    # Results past len(index) are padding: k is capped there, so -k 2000000000 allocates nothing large.
    S, I = index.search(q, min(a.k, len(index)), rescore_multiplier=a.rescore)
    _print_results(a, queries, S, I, index.map_ids(I), index.texts)
    return 0


def _print_results(a, queries, S, I, ids, texts):
    """Per query: JSON Lines with --json, else "rank  score  id  text" lines under a "query i:" header when
    there are several queries. I's -1 entries (fewer hits than k) are skipped."""
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
