"""The engine's backends: what runs the packed batch, chosen by name from one registry.

Every backend loads a ``Model`` whose ``forward(batch, last_only=True)`` turns the engine's packed batch
into each sequence's last hidden state after the final norm, (B, E); the engine keeps tokenization,
prompts, batching, task switches, pooling and post-processing, so the backends differ only in arithmetic.
``BACKENDS`` maps a name to two plain functions, called in this order with the engine's checks between:

    locate(model_name_or_path, options) -> Source   the folder to read and what its files fix; nothing heavy
                                                     loads (except int8's first build of its cache entry)
    load(source, args, device, dtype) -> Loaded      the weights or the graph

torch  a checkpoint folder or hub id: ``Backbone`` on jv5fast's ops (Triton, C++ or the torch references,
       ops.py), task adapters switched in place (checkpoint.py)
onnx   a folder written by ``export_onnx``: its graph in onnxruntime, one task merged in (onnx_runtime.py)
int8   a checkpoint, exported once into a cached int8 graph (int8.py) and run as ``onnx`` on the CPU
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Callable, NamedTuple, Protocol

import torch

from . import int8
from .batching import PackedBatch
from .checkpoint import merged_task_from_name, open_checkpoint
from .config import TASKS, ModelArgs
from .loading import resolve_checkpoint
from .onnx_runtime import OnnxBackbone, onnx_file_for, read_metadata, require_onnx

log = logging.getLogger("jv5fast")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The engine's ``dtype`` option as a torch dtype (None: bfloat16 on CUDA, float32 elsewhere)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of 'float32', 'bfloat16', 'float16'")


class Model(Protocol):
    """What every backend loads (``Backbone``, ``OnnxBackbone``)."""

    def forward(self, batch: PackedBatch, last_only: bool = True) -> torch.Tensor:
        """(B, E): each sequence's last hidden state after the final norm."""


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``locate`` found, before anything heavy loads."""
    folder: str                       # config.json, tokenizer.json, prompts: the engine reads them here
    backend: str                      # what runs it, as Engine.backend reports: "torch" or "onnx"
    task: str | None = None           # the task merged into the weights, when recorded (export metadata,
                                      # a merged repo's released name); a checkpoint with adapters ignores it
    meta: dict | None = None          # an ONNX export's checked jv5fast_onnx.json: its dtype, length, width
    onnx_quantize: str | None = None  # which graph of an export runs: None (model.onnx) or "int8"
    device: str | None = None         # the device the source fixes (int8: onnxruntime's int8 on the CPU)


class Loaded(NamedTuple):
    """What ``load`` made; the engine keeps each part."""
    model: Model
    adapters: dict                    # task -> LoraAdapter ({} but for a checkpoint with adapters/)
    base: dict                        # key -> base projection that task merges start from
    task: str | None                  # the one task merged into the weights, when recorded
    int8_quality: dict | None = None  # an int8 graph's measured quality (jv5fast/int8.py)


class Backend(NamedTuple):
    """One registry entry: two plain functions (see the module docstring). ``options``: Engine's task,
    device, dtype, backend, quantize, onnx_quantize and cuda_graphs arguments as given."""
    locate: Callable[[str, dict], Source]
    load: Callable[[Source, ModelArgs, torch.device, torch.dtype], Loaded]


def choose(backend, quantize) -> str:
    """The registry name for ``Engine(backend=..., quantize=...)``."""
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend {backend!r} is not valid; choose 'torch' or 'onnx'")
    return backend if quantize is None else "int8"


# ---- torch: a checkpoint ------------------------------------------------------------------------------
def _locate_checkpoint(model_name_or_path, options) -> Source:
    return Source(resolve_checkpoint(str(model_name_or_path)), "torch",
                  task=merged_task_from_name(str(model_name_or_path)), onnx_quantize=options["onnx_quantize"])


def _load_checkpoint(src: Source, args, device, dtype) -> Loaded:
    # checked here, after the engine's own checks, where the engine has always refused it
    if src.onnx_quantize is not None:
        raise ValueError("onnx_quantize applies to backend='onnx' only")
    model, adapters, base = open_checkpoint(src.folder, args, device, dtype)
    return Loaded(model, adapters, base, None if adapters else src.task)


# ---- onnx: an export folder ---------------------------------------------------------------------------
def _locate_export(model_name_or_path, options) -> Source:
    folder = str(model_name_or_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ONNX export folder not found: {folder!r} (write one with "
                                f"jv5fast.export_onnx or `jv5fast export-onnx`)")
    meta = read_metadata(folder)
    return Source(folder, "onnx", task=meta.get("task"), meta=meta, onnx_quantize=options["onnx_quantize"])


def _load_export(src: Source, args, device, dtype) -> Loaded:
    meta = src.meta
    if meta.get("dim") not in (None, args.hidden_size) or (meta.get("truncate_dim") or 0) > args.hidden_size:
        raise ValueError(f"{src.folder}/jv5fast_onnx.json: fields 'dim' ({meta.get('dim')}) and 'truncate_dim' "
                         f"({meta.get('truncate_dim')}) do not fit hidden_size {args.hidden_size} of its "
                         f"config.json")
    model = OnnxBackbone(src.folder, onnx_file_for(src.folder, src.onnx_quantize), str(device))
    quality = None
    if src.onnx_quantize == "int8":
        quality = meta.get("int8") if isinstance(meta.get("int8"), dict) else None
        warnings.warn(f"jv5fast int8 model ({src.folder}): {int8.quality_line(meta)}; its embeddings "
                      f"approximate the fp32 ones", stacklevel=3)  # the caller of Engine(...)
    return Loaded(model, {}, {}, src.task, quality)


# ---- int8: a checkpoint's cached int8 export ----------------------------------------------------------
def _locate_int8(model_name_or_path, options) -> Source:
    """The checkpoint's int8 export from the cache, built there first when missing or broken; two processes
    building one entry at once both succeed, the second using the first's."""
    task, device, dtype = options["task"], options["device"], options["dtype"]
    if options["quantize"] != "int8":
        raise ValueError(f"quantize {options['quantize']!r} is not valid; choose None (exact fp32) or 'int8'")
    if options["backend"] != "torch" or options["onnx_quantize"] is not None or options["cuda_graphs"]:
        raise ValueError("quantize='int8' builds and caches its own ONNX export from a checkpoint; leave backend, "
                         "onnx_quantize and cuda_graphs unset (for an export folder of your own use "
                         "Engine.from_onnx(folder, quantize='int8'))")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"quantize='int8' runs on the CPU (onnxruntime's dynamic int8); device={device!r} is not "
                         f"valid with it: pass device='cpu' or leave it unset")
    if dtype is not None and resolve_dtype(dtype, torch.device("cpu")) != torch.float32:
        raise ValueError(f"quantize='int8' quantizes the float32 graph; dtype={dtype!r} is not valid with it "
                         f"(leave it unset)")
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not valid; choose one of {list(TASKS)}")
    folder = resolve_checkpoint(str(model_name_or_path))
    require_onnx("onnx")
    require_onnx("onnxruntime")
    dest = int8.cache_entry(model_name_or_path, folder, task)
    if not int8.usable(dest):
        from . import onnx_export  # the exporter (torch.onnx, the kernels) loads only when a build runs
        broken = os.path.lexists(dest)
        log.warning("jv5fast: building the int8 ONNX export of %s (task %s) into %s%s; this runs once per "
                    "checkpoint and task", model_name_or_path, task or "default", dest,
                    " (the cached one is incomplete or unreadable)" if broken else "")
        try:
            with warnings.catch_warnings():  # its quality report: the engine gives it on every load
                warnings.filterwarnings("ignore", message="int8 ONNX model quality")
                onnx_export.export_onnx(model_name_or_path, dest, task=task, quantize="int8",
                                        overwrite=broken)
        except FileExistsError:
            if not int8.usable(dest):  # not another process's finished build: a real refusal
                raise
    return dataclasses.replace(_locate_export(dest, {"onnx_quantize": "int8"}), device="cpu")


BACKENDS = {
    "torch": Backend(_locate_checkpoint, _load_checkpoint),
    "onnx": Backend(_locate_export, _load_export),
    "int8": Backend(_locate_int8, _load_export),
}
