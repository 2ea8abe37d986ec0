"""A checkpoint as jv5fast serves it: the backbone, which task it serves, one task merged in, the widths.

A base checkpoint ships one LoRA adapter per task (``adapters/<task>/``); a per-task merged repo has one
folded into its weights and records which only in its released name (``merged_task_from_name``).
``open_checkpoint`` loads the backbone's static weights and keeps the base projections beside the adapters;
``merge`` writes W + s·B·A (fp32, cast once) into the backbone's fused projections. The engine merges on
every task switch (``Engine._activate``), ``export_onnx`` once; neither needs the other for it.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from .config import TASKS
from .loading import load_adapters, load_weights
from .models.backbone import FUSED, Backbone

MATRYOSHKA_DIMS = (32, 64, 128, 256, 512, 768, 1024)  # the widths the models were trained to truncate to
_MERGED_NAME = re.compile(r"^jina-embeddings-v5-text-(?:small|nano)-(" + "|".join(TASKS) + r")$", re.IGNORECASE)


def merged_task_from_name(name_or_path: str):
    """The task of a per-task merged repo by its released name (``jinaai/jina-embeddings-v5-text-small-
    retrieval`` or a folder of that name), else None: those repos' files do not record it."""
    path = os.path.normpath(name_or_path)
    name = os.path.basename(path)
    parent = os.path.dirname(path)
    repo = os.path.basename(os.path.dirname(parent))
    if os.path.basename(parent) == "snapshots" and repo.startswith("models--"):  # hub cache: .../snapshots/<sha>
        name = repo.rsplit("--", 1)[-1]
    m = _MERGED_NAME.match(name)
    return m.group(1).lower() if m else None


def open_checkpoint(folder: str, args, device, dtype):
    """(backbone with the static weights set, {task: adapter} on ``device``, {key: base projection}) of the
    checkpoint in ``folder``; the projections are set by ``merge``."""
    weights = load_weights(folder, args)
    adapters = {t: a.to(device) for t, a in load_adapters(folder, args).items()}
    model = Backbone(args, device, dtype)
    model.set_static(weights)
    # Linear weights in their storage dtype: what every task merge starts from.
    base = {k: v.to(device) for k, v in weights.items() if k.endswith("_proj.weight")}
    return model, adapters, base


def default_task(adapters: dict, merged_task):
    """The task served when none is asked for: retrieval (or the first adapter), or the merged one."""
    if not adapters:
        return merged_task
    return "retrieval" if "retrieval" in adapters else next(iter(adapters))


def check_task(task, adapters: dict, merged_task, path: str):
    """``task`` (not None) if the checkpoint at ``path`` can serve it, else an error naming what it holds. A
    model whose weights have one task merged in serves only that task; when it does not record which (a merged
    repo under another name), no task can be asked for."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a str or None, got {type(task).__name__}")
    if adapters:
        if task not in adapters:
            raise ValueError(f"unknown task {task!r}; valid tasks: {list(adapters)}")
        return task
    if task == merged_task:
        return task
    holds = (f"its task is {merged_task!r}" if merged_task else
             "which task is merged into its weights is not recorded")
    raise ValueError(f"task {task!r} requested, but {path} has no adapters/ folder (a per-task merged "
                     f"checkpoint; {holds}); pass task=None to use it as it is, or load the base checkpoint "
                     f"with adapters/ to choose a task")


def merge(model, base: dict, adapter=None, keep_base: bool = False):
    """Set every fused projection of ``model`` to ``base`` plus ``adapter``'s W + s·B·A, merged in fp32 and
    cast once by ``set_linear`` (``adapter`` None: the base weights as they are). ``keep_base``: never hand
    the backbone a tensor of ``base`` itself, since later merges overwrite the layer tensors in place."""
    for i in range(model.args.num_layers):
        for name, parts in FUSED.items():
            ws = []
            for part in parts:
                key = f"layers.{i}.{part}"
                w = base[key]
                delta = adapter.delta(key) if adapter is not None else None
                ws.append(w if delta is None else w.float() + delta)
            if adapter is not None:  # merged parts are fp32; bring untouched parts to fp32 too
                ws = [w.float() for w in ws]
            fused = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
            if keep_base and len(ws) == 1 and fused.data_ptr() == base[key].data_ptr():
                fused = fused.clone()  # task switches overwrite the layer tensor in place: never the base
            model.set_linear(i, name, fused)


def check_truncate_dim(truncate_dim, dim: int, export_dim=None) -> int:
    """``truncate_dim`` as a plain int in 1..``dim`` (None: ``dim``); ``export_dim``: the width an ONNX
    export was made for, named in the error."""
    if truncate_dim is None:
        return dim
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
        raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
    if not 1 <= truncate_dim <= dim:
        if export_dim:
            raise ValueError(f"truncate_dim={truncate_dim} is out of range 1..{dim}: this ONNX export "
                             f"was made for truncate_dim={export_dim}; export again for a larger one")
        dims = [d for d in MATRYOSHKA_DIMS if d <= dim]
        raise ValueError(f"truncate_dim={truncate_dim} is out of range 1..{dim}; the Matryoshka "
                         f"dims are {dims}")
    return int(truncate_dim)
