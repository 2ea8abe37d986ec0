"""The ``jv5fast`` command line (console script ``jv5fast = "jv5fast.cli:main"``; also ``python -m jv5fast``
and ``python -m jv5fast.cli``). One module per command, each with ``register(subparsers)`` and ``run(args)``:

    main.py             the top-level parser, the command table, main() and its exit statuses
    embed.py            jv5fast embed: texts or --input -> .npy / .jsonl / JSON Lines on stdout
    index.py            jv5fast index: documents (JSON Lines, Parquet, embed-corpus output) -> an index file
    search.py           jv5fast search: queries against an index file -> ranked ids and texts
    embed_corpus.py     jv5fast embed-corpus: a corpus on Ray -> Parquet parts + manifest (resumable)
    export_onnx.py      jv5fast export-onnx: a checkpoint + one task -> a self-contained ONNX folder
    train.py            jv5fast train: stage 1 distillation or a stage 2 adapter, one flag per TrainConfig field
    serve.py            jv5fast serve: flags and pre-bind checks for the HTTP server (jv5fast/server), or
                        with --replicas the same app on Ray Serve (jv5fast/distributed/serve.py)
    make_checkpoint.py  jv5fast make-checkpoint: a RANDOM-weight checkpoint in the released layout, offline
    info.py             jv5fast info: what runs where (Engine.describe())
and what they share:
    args.py             the help formatter, argparse types, and the flags several commands take (--device, ...)
    inputs.py           reading --input texts and JSON Lines / Parquet records, failures named by line or row
    checks.py           checks made before any work (--model, --device, --output, flag combinations)
    messages.py         CLIError, the one-line failure, library messages in CLI words

Optional extras (fastapi, ray, onnx, pyarrow, quicktok) are imported inside the run functions only, so
``jv5fast --help`` loads none of them.
"""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
