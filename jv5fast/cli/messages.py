"""What the CLI says about itself: ``CLIError`` (a user's mistake, one line on stderr, exit 2 unless told
otherwise), the one-line failure every command prints, library messages rewritten in CLI words
(``truncate_dim=`` -> ``--truncate-dim``), and the small formatters those messages share (counts, name lists,
JSON type names, the version). Imports nothing heavy, so every command module can use it.
"""
from __future__ import annotations

import re
import sys


class CLIError(Exception):
    """A usage error found by the CLI itself: printed as one line, exit code ``code``."""

    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code


def fail(cmd: str, msg: str, code: int) -> int:
    """Print ``jv5fast CMD: error: MSG`` on stderr and return ``code`` (the exit status)."""
    print(f"jv5fast {cmd}: error: {msg}", file=sys.stderr)
    return code


def count(n: int, noun: str) -> str:
    """'1 text', '2 texts', '0 texts'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def names(items, limit: int = 10) -> str:
    """Field or column names for a message: "a, b, c" (not a Python list), "none" when empty."""
    items = [str(n) for n in items]
    if not items:
        return "none"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def json_type(v) -> str:
    """The JSON name of a parsed value's type, for messages (not Python's NoneType, dict, list)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", dict: "an object", list: "an array"}.get(type(v), "a number")


def jv5fast_version() -> str:
    """The installed distribution's version (``--version``, make-checkpoint's README.txt)."""
    try:
        from importlib.metadata import version
        return version("jv5fast")
    except Exception:  # not installed as a distribution (a source checkout)
        from .. import __version__
        return __version__


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
                         r"learn_temperature|matryoshka_dims|batch_size|grad_accum|lora_r|lora_alpha|chunk_overlap|"
                         r"lora_targets|average_from_step|save_every|external_data|cosent_tau|n_negatives|"
                         r"min_replicas|max_replicas|num_cpus_per_replica|num_gpus_per_replica|"
                         r"target_ongoing_requests)\b(?![/'\"])=?")
_TOO_LONG_FIX = "pass truncate=True to cut it"  # what Engine.embed says of a text over max_length


def too_long_fix(msg: str, flag: str) -> str:
    """Engine.embed's "too long" message with its fix in the words of ``flag``, the one that refused the text
    (--no-truncate or --overflow error); any other message is returned as it is."""
    if flag == "--no-truncate":
        fix = "leave out --no-truncate to cut it, or use --overflow chunk instead to embed it whole in windows"
    else:
        fix = "pass --overflow truncate to cut it, or --overflow chunk to embed it whole in windows"
    return msg.replace(_TOO_LONG_FIX, fix)


def cli_words(msg: str) -> str:
    """A library error message as a CLI user should read it: flags instead of keyword arguments, one line."""
    for pat, rep in _PHRASES:
        msg = re.sub(pat, rep, msg)
    msg = _FLAG_WORDS.sub(lambda m: "--" + m.group(1).replace("_", "-") + (" " if m.group(0).endswith("=") else ""),
                          msg)
    return " ".join(msg.split())
