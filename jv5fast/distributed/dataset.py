"""``embed_dataset``: a Ray Data ``Dataset`` in, the same rows plus an ``embedding`` column out.

A pool of actors (``map_batches`` with a callable class, ``ActorPoolStrategy(size=concurrency)``) each
loads one ``Engine`` once and embeds the batches that stream through it, as in Ray's own batch-inference
recipe. The embedding is attached to the row it was computed from (same Arrow batch), so nothing depends
on the order Ray returns batches in. Arguments are checked against the checkpoint's files on the driver
before anything is built, so a typo fails at once rather than in every actor. Ray is imported lazily.
"""
from __future__ import annotations

import math
import os

PRECISION_TYPES = ("float32", "float16", "ubinary", "binary")
DEFAULT_BATCH_SIZE = 256  # rows per actor call: enough for full 512-token packed batches of short texts


def resolve_settings(model, *, task="retrieval", prompt_name="document", truncate_dim=None, precision="float32",
                     text_column="text", id_column="id", normalize=True) -> dict:
    """The manifest's ``settings`` for these arguments, checked against the checkpoint's files (config.json,
    adapters/, config_sentence_transformers.json) without loading weights. A bad value is a ValueError
    naming it and the valid choices."""
    return resolve_settings_and_folder(model, task=task, prompt_name=prompt_name, truncate_dim=truncate_dim,
                                       precision=precision, text_column=text_column, id_column=id_column,
                                       normalize=normalize)[0]


def checkpoint_fingerprint(folder) -> list:
    """jv5fast.loading.checkpoint_fingerprint: recorded in the manifest, so a resumed embed-corpus run cannot mix
    parts from two different weights."""
    from ..loading import checkpoint_fingerprint as fingerprint
    return fingerprint(folder)


def resolve_settings_and_folder(model, *, task="retrieval", prompt_name="document", truncate_dim=None,
                                precision="float32", text_column="text", id_column="id", normalize=True):
    """``(resolve_settings(...), the local checkpoint folder)``."""
    from ..config import TASKS, load_model_args
    from ..engine import merged_task_from_name
    from ..loading import list_adapter_tasks, load_prompts, resolve_checkpoint
    from ..postprocess import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {list(PRECISIONS)}")
    for name, col in (("text_column", text_column), ("id_column", id_column)):
        if not isinstance(col, str) or not col:
            raise ValueError(f"{name} must be a non-empty column name, got {col!r}")
    if text_column == id_column:
        raise ValueError(f"text_column and id_column are both {text_column!r}; they must differ")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a checkpoint folder or hub id (str), got {type(model).__name__}")
    model = os.fspath(model)
    folder = resolve_checkpoint(model)
    args = load_model_args(folder)
    tasks = list_adapter_tasks(folder)
    if tasks:
        if task is None:
            task = "retrieval" if "retrieval" in tasks else tasks[0]
        if task not in tasks:
            raise ValueError(f"task {task!r} is not valid for {model}; valid tasks: {tasks}"
                             + ("" if task in TASKS else f" (the model family's tasks are {list(TASKS)})"))
    else:  # a per-task merged checkpoint: its task is known only from its released name
        merged = merged_task_from_name(model)
        if task is not None and task != merged:
            raise ValueError(f"task {task!r} requested, but {model} has no adapters/ folder (a per-task merged "
                             f"checkpoint; its task is {merged!r}); pass task=None to use it as it is")
        task = merged or "merged"
    prompts, default = load_prompts(folder)
    if prompt_name is None:
        prompt_name = default
    if prompt_name is not None and prompt_name not in prompts:
        raise ValueError(f"unknown prompt_name {prompt_name!r}; valid: {list(prompts)}")
    prompt = prompts[prompt_name] if prompt_name is not None else None
    if truncate_dim is not None:
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int):
            raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
        if not 1 <= truncate_dim <= args.hidden_size:
            dims = [d for d in (32, 64, 128, 256, 512, 768, 1024) if d <= args.hidden_size]
            raise ValueError(f"truncate_dim={truncate_dim} is out of range 1..{args.hidden_size}; the Matryoshka "
                             f"dims are {dims}")
    if normalize not in (True, False):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    model_id = os.path.abspath(model) if os.path.isdir(model) else model
    return {"model": model_id, "task": task, "prompt_name": prompt_name, "prompt": prompt,
            "truncate_dim": truncate_dim, "dim": truncate_dim or args.hidden_size, "precision": precision,
            "normalize": bool(normalize), "id_column": id_column, "text_column": text_column}, folder


def embedding_type(settings: dict):
    """The Arrow type of the ``embedding`` column: fixed_size_list<float32|float16>[dim], or
    fixed_size_binary[ceil(dim / 8)] for the packed binary precisions."""
    import pyarrow as pa
    dim, precision = settings["dim"], settings["precision"]
    if precision == "float32":
        return pa.list_(pa.float32(), dim)
    if precision == "float16":
        return pa.list_(pa.float16(), dim)
    return pa.binary(math.ceil(dim / 8))


def embedding_array(emb, settings: dict):
    """(N, D') numpy from ``Engine.embed`` -> an Arrow array of ``embedding_type(settings)``."""
    import numpy as np
    import pyarrow as pa
    typ = embedding_type(settings)
    emb = np.ascontiguousarray(emb)
    if pa.types.is_fixed_size_binary(typ):
        return pa.FixedSizeBinaryArray.from_buffers(typ, len(emb), [None, pa.py_buffer(emb.tobytes())])
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), type=typ)


def _engine_kwargs(engine_kwargs) -> dict:
    kw = dict(engine_kwargs or {})
    for k in ("task", "model_name_or_path"):
        if k in kw:
            raise ValueError(f"engine_kwargs may not set {k!r}; pass it to embed_dataset itself")
    return kw


class EmbedWorker:
    """One Ray actor: loads one ``Engine`` in its constructor, then embeds Arrow batches in place.

    ``threads`` sets torch's intra-op threads deliberately (Ray sets OMP_NUM_THREADS to the actor's CPUs,
    but torch may already have chosen). ``count_tokens`` adds a ``_num_tokens`` column (the CLI's
    tokens/s); the public API never asks for it."""

    def __init__(self, settings, engine_kwargs=None, threads=None, count_tokens=False):
        import torch

        from ..engine import Engine
        if threads:
            torch.set_num_threads(int(threads))
        self.settings = settings
        task = None if settings["task"] == "merged" else settings["task"]
        self.engine = Engine(settings["model"], task=task, **_engine_kwargs(engine_kwargs))
        self.count_tokens = count_tokens

    def __call__(self, batch):
        return self.embed_table(batch, self.settings["text_column"], self.settings["id_column"])

    def embed_table(self, batch, text_column, id_column):
        """``batch`` (Arrow) plus the ``embedding`` column (and ``_num_tokens`` when counting)."""
        import pyarrow as pa
        s = self.settings
        texts = batch.column(text_column).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                ids = batch.column(id_column) if id_column in batch.column_names else None
                row = f"id {ids[i].as_py()!r}" if ids is not None else f"row {i} of a batch"
                raise ValueError(f"{row}: column {text_column!r} is {type(t).__name__} ({t!r:.40}), "
                                 f"expected a string")
        prompt = s["prompt"] or ""  # the resolved prefix, exactly what prompt_name gives Engine.embed
        if not (self.count_tokens and texts):
            emb = self.engine.embed(texts, prompt=prompt, truncate_dim=s["truncate_dim"], precision=s["precision"],
                                    normalize=s["normalize"], show_progress_bar=False)
            return batch.append_column("embedding", embedding_array(emb, s))
        # Engine.embed's steps, keeping the token ids for the tokens/s count (one tokenization, not two)
        eng = self.engine
        ids = eng._encode([prompt + t for t in texts])
        emb = eng._embed_ids(ids, eng.task, eng._check_truncate_dim(s["truncate_dim"]), s["normalize"],
                             s["precision"], False)
        out = batch.append_column("embedding", embedding_array(emb, s))
        return out.append_column("_num_tokens", pa.array([len(x) for x in ids], pa.int64()))


def _check_positive(name, value, kind=int, allow_zero=False):
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not (value >= 0 if allow_zero else value > 0) or (kind is float and not math.isfinite(value)):
        want = "a number >= 0" if allow_zero else f"a positive {'number' if kind is float else 'integer'}"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def map_embed(ds, settings, *, concurrency=1, num_gpus=0, num_cpus=None, batch_size=DEFAULT_BATCH_SIZE,
              engine_kwargs=None, threads=None, worker=None, worker_kwargs=None):
    """``ds.map_batches`` with ``EmbedWorker`` actors (settings already resolved); ``worker`` a subclass
    taking ``worker_kwargs`` too (the ``embed-corpus`` command's, which reads its own input)."""
    import ray.data
    _check_positive("concurrency", concurrency)
    _check_positive("batch_size", batch_size)
    _check_positive("num_gpus", num_gpus, float, allow_zero=True)
    if num_cpus is not None:
        _check_positive("num_cpus", num_cpus, float)
    kw = {} if num_cpus is None else {"num_cpus": num_cpus}
    if num_gpus:
        kw["num_gpus"] = num_gpus
    return ds.map_batches(worker or EmbedWorker, compute=ray.data.ActorPoolStrategy(size=concurrency),
                          batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
                          fn_constructor_kwargs={"settings": settings, "engine_kwargs": _engine_kwargs(engine_kwargs),
                                                 "threads": threads, **(worker_kwargs or {})},
                          **kw)


def embed_dataset(ds, model, *, text_column="text", id_column="id", task="retrieval", prompt_name="document", truncate_dim=None,
                  precision="float32", normalize=True, concurrency=1, num_gpus=0, num_cpus=None,
                  batch_size=DEFAULT_BATCH_SIZE, engine_kwargs=None):
    """The rows of ``ds`` plus an ``embedding`` column, computed by ``concurrency`` actors that each load
    ``Engine(model, task=task, **engine_kwargs)`` once; lazy and streaming, like any Ray Dataset.

    ``embedding`` holds ``Engine.embed(text, prompt_name=..., truncate_dim=..., precision=...)`` of the row's
    text: a fixed_size_list<float32|float16>[dim] for the float precisions, fixed_size_binary[ceil(dim/8)]
    (np.packbits order; ``binary`` is the int8 codes' raw bytes) for ``ubinary`` / ``binary``. Rows keep
    their own columns; Ray does not keep their order, so match them by a column of your own (an id).
    ``num_gpus`` per actor (1: one actor per GPU); ``num_cpus`` per actor (default Ray's, 1); ``batch_size``
    rows per call. ``id_column`` only names rows in errors (a null text). Every argument is checked before the dataset is built (ValueError with the choices)."""
    import ray.data
    if not isinstance(ds, ray.data.Dataset):
        raise TypeError(f"ds must be a ray.data.Dataset, got {type(ds).__name__}")
    settings = resolve_settings(model, task=task, prompt_name=prompt_name, truncate_dim=truncate_dim,
                                precision=precision, text_column=text_column, id_column=id_column,
                                normalize=normalize)
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        if text_column not in schema.names:
            raise ValueError(f"text_column {text_column!r} is not a column of the dataset; its columns: "
                             f"{list(schema.names)}")
        if "embedding" in schema.names:
            raise ValueError("the dataset already has an 'embedding' column; drop or rename it first")
    return map_embed(ds, settings, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus,
                     batch_size=batch_size, engine_kwargs=engine_kwargs)
