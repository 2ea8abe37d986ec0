"""``Engine(path, device="cpu", quantize="int8")``: the int8 CPU path, built on first use and cached.

The first engine over a checkpoint and task exports it (``export_onnx(..., quantize="int8")``: the task's
adapter merged in fp32, then onnxruntime's dynamic int8 quantization, whose quality against the float
graph is measured on a fixed multilingual corpus) into a cache folder; later engines load that folder in
seconds. The engine then runs onnxruntime's int8 graph behind its own tokenization, batching and
post-processing, and reports the measured quality when it loads (``Engine.int8_quality``).

Cache: ``$JV5FAST_CACHE`` or ``$XDG_CACHE_HOME/jv5fast`` or ``~/.cache/jv5fast``, then
``int8/<key>``. The key hashes the checkpoint's files (relative path, size, mtime), the task and the
versions of jv5fast, torch, onnx and onnxruntime, so a changed checkpoint or library builds a new entry.
An entry is validated before use (metadata, both graphs present); a broken one is rebuilt through the
export's own ``overwrite``, which replaces only a previous jv5fast export and never a folder holding
other files. Two processes building the same entry at once both succeed; the second uses the first's.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings

from .loading import MAX_CHECKPOINT_FILES, checkpoint_fingerprint

log = logging.getLogger("jv5fast")


def cache_root() -> str:
    root = os.environ.get("JV5FAST_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "jv5fast")
    return os.path.abspath(root)


def cache_key(folder: str, name: str, task) -> str:
    import onnx
    import onnxruntime
    import torch

    from . import __version__
    h = hashlib.sha256()
    for part in (__version__, torch.__version__, onnx.__version__, onnxruntime.__version__, name, str(task),
                 *map(repr, checkpoint_fingerprint(folder, MAX_CHECKPOINT_FILES))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _valid(dest: str) -> bool:
    from .onnx_runtime import read_metadata
    try:
        meta = read_metadata(dest)
    except (OSError, ValueError):
        return False
    return isinstance(meta.get("int8"), dict) and all(
        os.path.isfile(os.path.join(dest, f)) for f in ("model.onnx", "model_int8.onnx"))


def int8_export(model_name_or_path: str, folder: str, task) -> str:
    """The cached int8 export folder for checkpoint ``folder`` (resolved from ``model_name_or_path``, whose
    name may record a merged repo's task) and ``task``; built here when missing or broken."""
    from .onnx_export import export_onnx, require_onnx
    require_onnx("onnx")
    require_onnx("onnxruntime")
    name = os.path.basename(os.path.normpath(str(model_name_or_path)))
    dest = os.path.join(cache_root(), "int8", cache_key(folder, name, task))
    if _valid(dest):
        return dest
    broken = os.path.lexists(dest)
    log.warning("jv5fast: building the int8 ONNX export of %s (task %s) into %s%s; this runs once per "
                "checkpoint and task", model_name_or_path, task or "default", dest,
                " (the cached one is incomplete or unreadable)" if broken else "")
    try:
        with warnings.catch_warnings():  # its quality report: the engine gives it on every load
            warnings.filterwarnings("ignore", message="int8 ONNX model quality")
            export_onnx(model_name_or_path, dest, task=task, quantize="int8", overwrite=broken)
    except FileExistsError:
        if not _valid(dest):  # not another process's finished build: a real refusal
            raise
    return dest


def quality_line(meta: dict) -> str:
    """The int8 graph's measured quality, from an export's (untrusted) metadata."""
    q = meta.get("int8")
    fields = ("cosine_mean", "cosine_min", "top10_overlap", "texts")
    if not isinstance(q, dict) or not all(isinstance(q.get(f), (int, float)) and not isinstance(q.get(f), bool)
                                          for f in fields):
        return "quality unknown (the export's metadata does not record it)"
    return (f"cosine to fp32 mean {q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}, top-10 overlap "
            f"{q['top10_overlap']:.3f} on {int(q['texts'])} texts")
