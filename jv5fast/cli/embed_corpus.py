"""``jv5fast embed-corpus``: embed a Parquet / JSON Lines corpus into Parquet parts on Ray
(the work is jv5fast/distributed/corpus.py; ``python -m jv5fast.distributed.cli`` runs this command too).

``register(subparsers)`` adds the subcommand (imports nothing heavy, never Ray); ``run(args)`` does the work
and returns the exit status: 0 done, 2 a mistake in the flags, the input or the output folder (one line on
stderr, before any embedding), 1 a failure while running (what was committed stays; rerun to resume),
130 interrupted. ``JV5FAST_DEBUG=1`` shows tracebacks. It reports its own errors, so ``jv5fast``'s main
does not wrap it: a Ray worker's failure is a failure (1) even when its type says ValueError.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .args import PRECISIONS, TASKS, add_dtype, add_no_progress, add_precision, checked, positive_int
from .messages import count, fail

__all__ = ["register", "run", "TASKS", "PRECISIONS"]

_positive_float = checked(float, lambda x: 0 < x < float("inf"), "a positive number")  # also refuses nan
_nonneg_float = checked(float, lambda x: 0 <= x < float("inf"), "a number >= 0")


def register(subparsers):
    """Add ``embed-corpus`` to an argparse subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "embed-corpus", help="embed a Parquet / JSON Lines corpus on Ray into Parquet parts (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # it shows (default: None); the others do not
        description="Embed every row of a Parquet or JSON Lines corpus with a pool of Ray actors (one Engine "
        "each) into OUTPUT/part-NNNNN.parquet (columns id, embedding) plus OUTPUT/manifest.json. Runs on a local "
        "Ray started on the fly, or on a cluster with --address. Rerunning the same command after an "
        "interruption does only what is missing; different settings into the same folder are refused.")
    p.add_argument("--model", required=True, help="checkpoint folder (released layout) or hub id; on a cluster, "
                   "a path every node can read")
    p.add_argument("--input", required=True, help="a .parquet / .jsonl file, a folder of them, or a glob (quote "
                   "it; ** recursive)")
    p.add_argument("--output", required=True, help="output folder (created; its parent must exist)")
    p.add_argument("--text-column", default="text", help="column (JSON field) holding the text")
    p.add_argument("--id-column", default="id", help="column (JSON field) holding the unique row id (int or str)")
    p.add_argument("--task", default=None, choices=TASKS, help="task adapter (default: retrieval, or the one task "
                   "a per-task merged checkpoint holds)")
    p.add_argument("--prompt-name", default="document", help="named prompt from the model (query or document)")
    p.add_argument("--truncate-dim", type=positive_int, default=None,
                   help="Matryoshka dimension (default: the model's)")
    add_precision(p)
    p.add_argument("--concurrency", type=positive_int, default=1,
                   help="embedding actors (each loads one Engine); one per GPU on a GPU cluster")
    p.add_argument("--num-gpus-per-worker", type=_nonneg_float, default=0.0,
                   help="GPUs each actor reserves (1: one actor per GPU; 0: CPU actors)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=None,
                   help="CPUs each actor reserves, and its torch threads (default: the cluster's CPUs / "
                   "--concurrency for CPU actors, 1 for GPU actors)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows per actor call")
    p.add_argument("--rows-per-part", type=positive_int, default=None,
                   help="rows (JSON Lines: lines) of one input per output part, the unit of resumption "
                   "(default 50000; a resumed run keeps the recorded value)")
    add_dtype(p)
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per text, prompt included (default: the model's)")
    p.add_argument("--on-error", default="fail", choices=("fail", "skip"), help="bad rows (null or non-string "
                   "text, missing id, duplicate id): fail names the first; skip lists them in OUTPUT/errors.jsonl")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto or ray://head:10001) "
                   "instead of starting a local one")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs of the local Ray started on the fly (default: all)")
    p.add_argument("--object-store-mb", type=positive_int, default=None,
                   help="object store of the local Ray, MiB (default: Ray's)")
    add_no_progress(p)
    return p


def _fail(msg, code):
    return fail("embed-corpus", msg, code)


def run(args) -> int:
    """Run ``embed-corpus`` for parsed ``args``; returns the exit status (errors are printed, not raised)."""
    debug = bool(os.environ.get("JV5FAST_DEBUG"))
    try:
        from ..distributed.corpus import CorpusError, run_corpus
    except ModuleNotFoundError as e:  # pyarrow
        return _fail(f"{e.name} is not installed; embed-corpus needs the distributed extra: "
                     f'pip install "jv5fast[distributed]"', 2)
    if args.address and (args.num_cpus or args.object_store_mb):
        return _fail("--num-cpus and --object-store-mb size a local Ray; a cluster (--address) has its own", 2)
    started = False
    embedding = False  # set once run_corpus asks for Ray: from then on an error is a failure (1), not a flag (2)
    try:
        try:
            import ray
        except ModuleNotFoundError:
            return _fail('ray is not installed; embed-corpus needs the distributed extra: '
                         'pip install "jv5fast[distributed]"', 2)
        kw = dict(num_gpus=args.num_gpus_per_worker, engine_kwargs={"dtype": args.dtype, "max_length": args.max_length})
        common = dict(model=args.model, input=args.input, output=args.output, text_column=args.text_column,
                      id_column=args.id_column, task=args.task, prompt_name=args.prompt_name,
                      truncate_dim=args.truncate_dim, precision=args.precision, concurrency=args.concurrency,
                      num_gpus_per_worker=kw["num_gpus"], cpus_per_worker=args.cpus_per_worker,
                      batch_size=args.batch_size, rows_per_part=args.rows_per_part, on_error=args.on_error,
                      engine_kwargs={k: v for k, v in kw["engine_kwargs"].items() if v is not None},
                      progress=not args.no_progress)

        def connect():
            nonlocal started, embedding
            embedding = True
            if ray.is_initialized():
                return
            quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
            if args.address:  # a cluster's own settings (CPUs, object store, dashboard) are not ours to pass
                ray.init(address=args.address, **quiet)
            else:
                mem = args.object_store_mb * 2**20 if args.object_store_mb else None
                ray.init(num_cpus=args.num_cpus, object_store_memory=mem, include_dashboard=False, **quiet)
            started = True
            logging.getLogger("ray.data").setLevel(logging.WARNING)

        stats = run_corpus(**common, connect=connect)
    except CorpusError as e:  # already in CLI words
        if debug:
            raise
        return _fail(_cap(" ".join(str(e).split())), 2)
    except KeyboardInterrupt:
        print(f"jv5fast embed-corpus: interrupted; committed parts are listed in {args.output}/manifest.json: "
              f"rerun the same command to finish", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if debug:
            raise
        if embedding:  # a worker's error (Ray's may subclass ValueError): a failure while running
            return _fail(_cap(" ".join(str(e).split()) or type(e).__name__), 1)
        return _fail(_cap(_corpus_words(str(e))), 2)
    except Exception as e:  # Ray wraps worker failures in its own exception types
        if debug:
            raise
        return _fail(_cap(" ".join(str(e).split()) or type(e).__name__), 1)
    finally:
        if started:
            import ray
            ray.shutdown()
    rate = stats["rows_embedded_now"] / stats["seconds"] if stats["seconds"] else 0.0
    tok = stats["tokens_now"] / stats["seconds"] if stats["seconds"] else 0.0
    skipped = f", {count(stats['error_rows'], 'bad row')} in {os.path.join(args.output, 'errors.jsonl')}" \
        if stats["error_rows"] else ""
    held = f"{count(stats['rows'], 'row')} in {count(stats['parts'], 'part')}"
    if stats["rows_embedded_now"]:
        print(f"embedded {count(stats['rows_embedded_now'], 'row')} ({rate:,.0f} rows/s, {tok:,.0f} tokens/s); "
              f"{args.output} holds {held}{skipped}", file=sys.stderr)
    else:
        print(f"nothing to embed: {args.output} is complete ({held}{skipped})", file=sys.stderr)
    return 0


MAX_MESSAGE = 2000  # characters of an error shown (a Ray worker's carries its whole traceback)


def _cap(msg):
    if len(msg) <= MAX_MESSAGE:
        return msg
    return msg[:MAX_MESSAGE] + f" ... ({len(msg) - MAX_MESSAGE} more characters; JV5FAST_DEBUG=1 shows all)"


def _corpus_words(msg):
    """Library keyword names in a message as the flags that set them: corpus.py's own names (prompt_name,
    precision, text_column, id_column), which messages.cli_words leaves alone for the other commands."""
    for word, flag in (("truncate_dim=", "--truncate-dim "), ("prompt_name ", "--prompt-name "),
                       ("task=None", "no --task"), ("precision ", "--precision "), ("text_column ", "--text-column "),
                       ("id_column ", "--id-column ")):
        msg = msg.replace(word, flag)
    return " ".join(msg.split())
