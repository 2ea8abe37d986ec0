"""The argument shapes every command shares, defined once: the help formatter, argparse types that name what
they expected (``positive_int``, ``parse_bool``, ...), and the flags several commands take with the same
meaning and help (--device, --dtype, --backend/--cpu-precision/--quantize, --task, --precision, --format,
--no-progress).

A flag whose help or type differs between commands (--model, --max-length, --truncate-dim) is written
in its command's module, with the shared help text from here where there is one: one command's wording
never changes another's. Imports no optional extra.
"""
from __future__ import annotations

import argparse

from ..config import TASKS
from ..postprocess import PRECISIONS
from .inputs import INPUT_FORMATS

DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes of the engine
CPU_PRECISIONS = ("fp32", "bf16")
CPU_PRECISION_HELP = ("bf16: opt-in bf16 GEMMs on the CPU (oneDNN; AMX / AVX512-BF16 where present), fp32 "
                      "elsewhere; not exact (cosine ~0.9999 to fp32), never the default")
MODEL_HELP = ("checkpoint folder (released layout), hub id, or with --backend onnx a folder written by "
              "export-onnx")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)"
TASK_HELP = (f"task adapter, one of {', '.join(TASKS)} (default: retrieval, or the one task a merged "
             f"checkpoint or ONNX export holds)")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default, but not the uninformative ``(default: None)`` / ``False``."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == () \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# ---- argparse types ------------------------------------------------------------------------------------
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


def checked(convert, ok, what):
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


positive_int = checked(int, lambda n: n > 0, "a positive integer")
nonneg_int = checked(int, lambda n: n >= 0, "an integer >= 0")
nonneg_float = checked(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0")
positive_float = checked(float, lambda x: 0 < x < float("inf"), "a finite number > 0")


# ---- flags shared by several commands --------------------------------------------------------------------
def add_device(p):
    p.add_argument("--device", default=None, help=DEVICE_HELP)


def add_dtype(p):
    p.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype (default: bfloat16 on CUDA, "
                   "float32 on CPU)")


def add_engine_flags(p, backend_help: str, quantize_help: str):
    """--device, --dtype, --backend, --cpu-precision, --quantize: how an Engine runs (embed, serve, info)."""
    add_device(p)
    add_dtype(p)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"), help=backend_help)
    p.add_argument("--cpu-precision", default="fp32", choices=CPU_PRECISIONS, help=CPU_PRECISION_HELP)
    p.add_argument("--quantize", default=None, choices=("int8",), help=quantize_help)


def add_task(p):
    p.add_argument("--task", default=None, help=TASK_HELP)


def add_precision(p):
    p.add_argument("--precision", default="float32", choices=PRECISIONS, help="output precision")


def add_format(p):
    p.add_argument("--format", default=None, choices=INPUT_FORMATS, help="read --input as this format, whatever "
                   "its extension (default: from the extension; txt without one)")


def add_no_progress(p):
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
