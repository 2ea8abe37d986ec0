"""Checks made before any work: each raises a one-line ``CLIError`` naming the flag, so a wrong --model,
--device, --output or flag combination fails in milliseconds, before a model is loaded or a port bound.

Shared by the commands; what only one command checks stays in its own module.
"""
from __future__ import annotations

import os

from .messages import CLIError


def check_model(path: str, flag: str, backend: str = "torch"):
    """A checkpoint folder or hub id for the torch backend, an export-onnx folder for --backend onnx."""
    if os.path.isfile(path):
        raise CLIError(f"{flag} must be a checkpoint folder or a hub id, got a file: {path}")
    is_export = os.path.isfile(os.path.join(path, "jv5fast_onnx.json"))
    if backend == "torch" and is_export:
        hint = "add --backend onnx to run it" if flag == "--model" else "pass the checkpoint it was exported from"
        raise CLIError(f"{flag} {path} is an ONNX export; {hint}")
    if backend == "onnx" and os.path.isdir(path) and not is_export:
        raise CLIError(f"{flag} {path} is not an ONNX export (no jv5fast_onnx.json); write one with "
                       f"`jv5fast export-onnx`, or drop --backend onnx")


def check_output_file(path: str, flag: str, endings):
    if not path.endswith(tuple(endings)):
        raise CLIError(f"{flag} must end in {' or '.join(endings)}, got {path!r}")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name ending in {' or '.join(endings)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path}: folder {parent} does not exist")


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file: the same path after resolving links, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def same_model(a: str, b: str) -> bool:
    """Two --model values name the same checkpoint: the same folder (after resolving) or the same hub id."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_device(device):
    if device is not None:
        from ..devices import check_device as check
        try:
            check(device, "--device", quote=False)
        except ValueError as e:
            raise CLIError(str(e)) from None


def check_quantize(a):
    """--quantize int8: the export's int8 graph with --backend onnx, else the engine's cached int8 export
    of the checkpoint, which runs on the CPU in float32 only."""
    if not a.quantize or a.backend == "onnx":
        return
    if a.device is not None and not a.device.startswith("cpu"):
        raise CLIError(f"--quantize int8 runs on the CPU (onnxruntime's int8); drop --device {a.device}")
    if a.dtype not in (None, "float32"):
        raise CLIError(f"--quantize int8 quantizes the float32 model; drop --dtype {a.dtype}")


def check_cpu_precision(a):
    """--cpu-precision bf16: the torch engine on the CPU in float32, without --quantize (checked before loading)."""
    if getattr(a, "cpu_precision", "fp32") == "fp32":
        return
    for bad, why in ((a.backend != "torch", f"--backend {a.backend}"), (bool(a.quantize), f"--quantize {a.quantize}"),
                     (a.dtype not in (None, "float32"), f"--dtype {a.dtype}"),
                     (a.device is not None and not a.device.startswith("cpu"), f"--device {a.device}")):
        if bad:
            raise CLIError(f"--cpu-precision {a.cpu_precision} runs the torch engine's GEMMs on the CPU from float32; "
                           f"drop {why}")


def quantize_kw(a) -> dict:
    """The Engine keywords that --cpu-precision and --quantize map to (onnx_quantize with --backend onnx)."""
    kw = {}
    if getattr(a, "cpu_precision", "fp32") != "fp32":
        kw["cpu_precision"] = a.cpu_precision
    if not a.quantize:
        return kw
    return {**kw, "onnx_quantize": a.quantize} if a.backend == "onnx" else {**kw, "quantize": a.quantize}
