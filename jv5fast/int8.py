"""int8 on the CPU: onnxruntime's dynamic quantization of an exported graph, its measured quality, and the
cache of int8 exports behind ``Engine(path, device="cpu", quantize="int8")``.

``quantize_int8`` (``export_onnx(..., quantize="int8")``) writes ``model_int8.onnx``: weights int8,
activations quantized at run time. Its quality against the float graph is measured on a fixed multilingual
corpus (cosine per text, top-10 retrieval overlap) and stored in the export's metadata; every engine that
loads the graph reports it (``quality_line``, ``Engine.int8_quality``).

Cache: ``$JV5FAST_CACHE`` or ``$XDG_CACHE_HOME/jv5fast`` or ``~/.cache/jv5fast``, then ``int8/<key>``. The
key hashes the checkpoint's files (relative path, size, mtime), the task and the versions of jv5fast,
torch, onnx and onnxruntime, so a changed checkpoint or library builds a new entry. The first engine over
a checkpoint and task builds the entry (the ``int8`` backend, jv5fast/backends.py: ``export_onnx`` with the
task's adapter merged in fp32); later engines load it in seconds. An entry is checked before use
(``usable``: metadata, both graphs present); a broken one is rebuilt through the export's own
``overwrite``, which replaces only a previous jv5fast export and never a folder holding other files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings

import numpy as np

from .loading import MAX_CHECKPOINT_FILES, checkpoint_fingerprint
from .onnx_runtime import OnnxSession, read_metadata, require_onnx

log = logging.getLogger("jv5fast")

QUALITY_TEXTS = [
    "How fast does light travel in a vacuum?", "The speed of light is 299,792,458 metres per second.",
    "Photosynthesis converts light energy into chemical energy.", "Plants need sunlight, water and CO2.",
    "The Eiffel Tower is in Paris.", "Paris is the capital of France.", "Berlin ist die Hauptstadt Deutschlands.",
    "Le chat dort sur le canapé.", "A cat is sleeping on the sofa.", "Stock markets fell sharply on Monday.",
    "Interest rates were raised by the central bank.", "The match ended in a draw after extra time.",
    "Python is a popular programming language.", "Rust guarantees memory safety without a garbage collector.",
    "Mount Everest is the highest mountain above sea level.", "The Pacific is the largest ocean on Earth.",
    "東京は日本の首都です。", "Water boils at 100 degrees Celsius at sea level.", "Ice melts at zero degrees.",
    "The mitochondria is the powerhouse of the cell.", "DNA carries genetic information.",
    "Shakespeare wrote Hamlet.", "Beethoven composed nine symphonies.", "The moon orbits the Earth.",
    "Mars is called the red planet.", "Jupiter has dozens of moons.", "Electric cars use batteries.",
    "Bicycles are an efficient way to travel.", "Coffee contains caffeine.", "Tea is popular in Britain.",
    "The library opens at nine in the morning.", "Museums preserve cultural heritage.",
]


# ---- the int8 graph and its quality ---------------------------------------------------------------------
def top10_overlap(a, b):
    """Mean fraction of each row's 10 nearest other rows (dot product) that ``a`` and ``b`` agree on."""
    ta = np.argsort(-(a @ a.T), axis=1)[:, 1:11]
    tb = np.argsort(-(b @ b.T), axis=1)[:, 1:11]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)]))


def quantize_int8(src: str, dst: str, ids) -> dict:
    """Dynamic int8 quantization of graph ``src`` into ``dst`` (weights int8, activations quantized at run
    time), plus its quality on ``ids`` (the token ids of ``QUALITY_TEXTS``, prompt included): cosine to the
    float graph per text and top-10 retrieval overlap. Warns with the numbers; returns them."""
    require_onnx("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs advice ("consider pre-processing") on the root logger; the quality report
    # below is what a user needs to see
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
    ref = OnnxSession(src).pooled(ids)
    q8 = OnnxSession(dst).pooled(ids)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q8 = q8 / np.linalg.norm(q8, axis=1, keepdims=True)
    cos = (ref * q8).sum(1)
    overlap = top10_overlap(ref, q8)
    quality = {"file": "model_int8.onnx", "texts": len(ids), "cosine_mean": float(cos.mean()),
               "cosine_min": float(cos.min()), "top10_overlap": overlap}
    warnings.warn(f"int8 ONNX model quality vs float: mean cosine {quality['cosine_mean']:.4f}, "
                  f"min {quality['cosine_min']:.4f}, top-10 overlap {overlap:.3f} on {len(ids)} texts",
                  stacklevel=3)
    return quality


def quality_line(meta: dict) -> str:
    """The int8 graph's measured quality, from an export's (untrusted) metadata."""
    q = meta.get("int8")
    fields = ("cosine_mean", "cosine_min", "top10_overlap", "texts")
    if not isinstance(q, dict) or not all(isinstance(q.get(f), (int, float)) and not isinstance(q.get(f), bool)
                                          for f in fields):
        return "quality unknown (the export's metadata does not record it)"
    return (f"cosine to fp32 mean {q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}, top-10 overlap "
            f"{q['top10_overlap']:.3f} on {int(q['texts'])} texts")


# ---- the cache ----------------------------------------------------------------------------------------
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


def cache_entry(model_name_or_path: str, folder: str, task) -> str:
    """The cache folder of checkpoint ``folder`` (resolved from ``model_name_or_path``, whose name may record
    a merged repo's task) and ``task``; whether it is built yet is ``usable``'s question."""
    name = os.path.basename(os.path.normpath(str(model_name_or_path)))
    return os.path.join(cache_root(), "int8", cache_key(folder, name, task))


def usable(dest: str) -> bool:
    """Whether ``dest`` holds a finished int8 export: valid metadata with the quality record, both graphs."""
    try:
        meta = read_metadata(dest)
    except (OSError, ValueError):
        return False
    return isinstance(meta.get("int8"), dict) and all(
        os.path.isfile(os.path.join(dest, f)) for f in ("model.onnx", "model_int8.onnx"))
