"""``jv5fast COMMAND ...``: the top-level parser, one subcommand per module of this package, and ``main``,
the one place a command's outcome becomes an exit status.

Errors a user can cause (bad flags, unreadable or malformed input, a model that does not fit the
command) print one line on stderr, in CLI words, and exit 2; failures while running exit 1. No
traceback unless JV5FAST_DEBUG=1. When the reader of stdout goes away (``jv5fast search ... | head -1``)
the command stops quietly with exit status 141 (128 + SIGPIPE), what a shell reports for ``cat`` or
``grep`` in the same place, so ``set -o pipefail`` scripts see the same status as with those tools.
``embed-corpus`` reports its own errors (jv5fast/cli/embed_corpus.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import embed, embed_corpus, export_onnx, index, info, make_checkpoint, search, serve, train
from .args import HelpWithDefaults
from .messages import CLIError, cli_words, fail, jv5fast_version

# name -> module with register(subparsers) and run(args); `jv5fast --help` lists them in this order
COMMANDS = {"embed": embed, "export-onnx": export_onnx, "train": train, "make-checkpoint": make_checkpoint,
            "info": info, "serve": serve, "index": index, "search": search, "embed-corpus": embed_corpus}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jv5fast", description="Fast, exact jina-embeddings-v5-text engine: embed "
                                "texts, export to ONNX, train adapters.", formatter_class=HelpWithDefaults)
    p.add_argument("--version", action="version", version=f"jv5fast {jv5fast_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="{embed,index,search,embed-corpus,export-onnx,train,serve,"
                           "make-checkpoint,info}")
    for command in COMMANDS.values():
        command.register(sub)
    return p


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
    if a.cmd == "embed-corpus":  # reports its own errors and exit status
        return embed_corpus.run(a)
    try:
        return COMMANDS[a.cmd].run(a)
    except BrokenPipeError:  # stdout's reader is gone (| head): stop quietly, as cat and grep do
        return _stdout_gone()
    except CLIError as err:
        return fail(a.cmd, str(err), err.code)
    except KeyboardInterrupt:
        print(f"jv5fast {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        return fail(a.cmd, *_missing_extra(err))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        return fail(a.cmd, cli_words(str(err)), 2)
    except (OSError, RuntimeError, ArithmeticError, MemoryError) as err:
        if os.environ.get("JV5FAST_DEBUG"):
            raise
        return fail(a.cmd, f"{cli_words(str(err)) or type(err).__name__}", 1)


def _missing_extra(err: ModuleNotFoundError):
    """(message, exit status) for a missing optional package: the extra that brings it, exit 2; else 1."""
    if err.name in ("fastapi", "uvicorn", "prometheus_client", "starlette"):
        return f'{err.name} is not installed; serve needs the serve extra: pip install "jv5fast[serve]"', 2
    if err.name in ("onnx", "onnxruntime"):
        return (f"{err.name} is not installed; export-onnx and --backend onnx need the onnx extra: "
                'pip install "jv5fast[onnx]"', 2)
    if err.name == "pyarrow":
        return 'pyarrow is not installed; Parquet input needs the parquet extra: pip install "jv5fast[parquet]"', 2
    return f"{err.name} is not installed ({err})", 1


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

