"""``python -m jv5fast.distributed.cli ARGS``: the same as ``jv5fast embed-corpus ARGS``.

The command (its parser, ``run`` and exit statuses) lives with the other commands in
jv5fast/cli/embed_corpus.py and shares their argument shapes (jv5fast/cli/args.py). This module keeps the
names code already imports from here, ``add_parser(subparsers)``, ``run(args)``, ``TASKS`` and
``PRECISIONS``; importing it imports neither Ray nor pyarrow.
"""
from __future__ import annotations

import argparse
import sys

from ..cli.embed_corpus import PRECISIONS, TASKS, run
from ..cli.embed_corpus import register as add_parser

__all__ = ["add_parser", "run", "main", "TASKS", "PRECISIONS"]


def main(argv=None) -> int:
    """``python -m jv5fast.distributed.cli ARGS``: the same as ``jv5fast embed-corpus ARGS``."""
    parser = argparse.ArgumentParser(prog="jv5fast")
    sub = parser.add_subparsers(dest="cmd")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["embed-corpus"]:
        argv = ["embed-corpus"] + argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
