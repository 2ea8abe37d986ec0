"""MTEB 2.x encoder over a jv5fast ``Engine``: ``mteb.evaluate(JV5FastEncoder(path), tasks)``.

Adapter and prefix follow mteb's own jina v5 wrapper (``mteb/models/model_implementations/jina_models.py``),
which is how mteb evaluates the released models: the adapter comes from the task type (table below), the prefix
from the side: ``"Query: "`` iff mteb marks the input as a query, ``"Document: "`` otherwise (symmetric tasks
pass no side, so both inputs get ``"Document: "``). ``model_meta`` describes the checkpoint from its config
alone, so ``mteb.evaluate(model_meta(path), tasks)`` loads the weights only when a result is not cached.
Importing this module imports mteb; ``import jv5fast`` never does.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from ..config import QWEN3, load_model_args
from ..engine import Engine, merged_task_from_name
from ..loading import checkpoint_fingerprint, expected_shapes, list_adapter_tasks, resolve_checkpoint
from . import engine_from, missing_extra

try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType
except ModuleNotFoundError as e:
    missing_extra(e, "mteb", "mteb", "mteb")

log = logging.getLogger("jv5fast")

QUERY_PROMPT, DOCUMENT_PROMPT = "Query: ", "Document: "

# mteb task type -> adapter, as mteb's jina v5 wrapper routes them (its `model_prompts`, plus InstructionRetrieval,
# which that wrapper reaches through its fallback). Every other text task type falls back to FALLBACK_ADAPTER,
# as that wrapper does, with a warning; tasks with non-text inputs are refused.
TASK_TYPE_ADAPTERS = {
    "Retrieval": "retrieval", "Reranking": "retrieval",
    "InstructionRetrieval": "retrieval", "InstructionReranking": "retrieval",
    "STS": "text-matching", "PairClassification": "text-matching",
    "BitextMining": "text-matching", "Summarization": "text-matching",
    "Classification": "classification", "MultilabelClassification": "classification",
    "Clustering": "clustering",
}
FALLBACK_ADAPTER = "retrieval"

MATRYOSHKA_DIMS = (32, 64, 128, 256, 512, 768, 1024)
LICENSE = "cc-by-nc-4.0"  # both released repos (model-spec.md, Sources)
# model-spec.md §1 lists languages for nano only (EuroBERT's 15 main languages); small's are not listed.
NANO_LANGUAGES = ["eng-Latn", "fra-Latn", "deu-Latn", "spa-Latn", "zho-Hans", "ita-Latn", "rus-Cyrl", "pol-Latn",
                  "por-Latn", "jpn-Jpan", "vie-Latn", "nld-Latn", "ara-Arab", "tur-Latn", "hin-Deva"]
NO_REVISION = "no_revision_available"  # what mteb.ModelMeta.create_empty() uses
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
_fallback_warned = set()


def adapter_for_task_type(task_type: str) -> str:
    """The adapter the released models are evaluated with on an mteb task of type ``task_type``."""
    if not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str, got {type(task_type).__name__}")
    if task_type in TASK_TYPE_ADAPTERS:
        return TASK_TYPE_ADAPTERS[task_type]
    if task_type not in _fallback_warned:
        _fallback_warned.add(task_type)
        log.warning("mteb task type %r has no adapter of its own in the released evaluation; using %r as mteb's "
                    "jina v5 wrapper does (mapped types: %s)", task_type, FALLBACK_ADAPTER, sorted(TASK_TYPE_ADAPTERS))
    return FALLBACK_ADAPTER


class JV5FastEncoder(AbsEncoder):
    """An mteb ``EncoderProtocol`` over a jv5fast ``Engine`` (or a checkpoint path / hub id to build one with
    ``engine_kwargs``, e.g. ``device``, ``dtype``, ``max_length``). ``truncate_dim`` evaluates a Matryoshka
    prefix. Returns float32 unit vectors; mteb scores them with cosine similarity.

    An engine built from a per-task merged checkpoint serves only its own task: tasks that need another adapter
    raise ``ValueError`` naming both. The engine batches by tokens (``max_batch_tokens``); mteb's
    ``encode_kwargs["batch_size"]`` only sizes mteb's DataLoader."""

    def __init__(self, model, *, truncate_dim=None, name=None, revision=None, **engine_kwargs):
        self.engine = engine_from(model, "JV5FastEncoder", **engine_kwargs)
        self.truncate_dim = None if truncate_dim is None else self.engine._check_truncate_dim(truncate_dim)
        self.mteb_model_meta = model_meta(self.engine, truncate_dim=self.truncate_dim, name=name, revision=revision)

    def __repr__(self):
        return f"JV5FastEncoder({self.engine!r}, truncate_dim={self.truncate_dim})"

    def adapter_for(self, task_metadata) -> str:
        """The adapter ``task_metadata``'s task needs, checked against what this engine serves."""
        adapter = adapter_for_task_type(task_metadata.type)
        served = self.engine.tasks
        if adapter in served:
            return adapter
        what = f"{task_metadata.name} (type {task_metadata.type})"
        if not served:
            raise ValueError(f"{what} needs the {adapter!r} adapter, but {self.engine.path} is a merged checkpoint "
                             f"whose task is not recorded (it is read from the released folder name, e.g. "
                             f"jina-embeddings-v5-text-nano-{adapter}); keep that name, or load the base checkpoint "
                             f"with adapters/")
        if len(served) == 1 and not self.engine._adapters:
            raise ValueError(f"{what} needs the {adapter!r} adapter, but {self.engine.path} serves only "
                             f"{served[0]!r} (a per-task merged checkpoint); evaluate this task with the base "
                             f"checkpoint (with adapters/) or the {adapter!r} merged checkpoint")
        raise ValueError(f"{what} needs the {adapter!r} adapter, which {self.engine.path} does not hold; it holds "
                         f"{list(served)}")

    def encode(self, inputs, *, task_metadata, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        """mteb's encoder protocol: embed every ``text`` of the batches in ``inputs`` → (N, D) float32."""
        adapter = self.adapter_for(task_metadata)
        side = _side(prompt_type)
        other = sorted(set(task_metadata.get_modalities(side)) - {"text"})
        if other:
            raise ValueError(f"{task_metadata.name}: its {side.value + ' ' if side else ''}inputs are "
                             f"{other}; jina-embeddings-v5-text embeds text only")
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            raise ValueError(f"precision={precision!r} is not supported by JV5FastEncoder; valid: None, 'float32' "
                             f"(mteb scores with cosine similarity; for quantized scores wrap the encoder in "
                             f"mteb.models.CompressionWrapper)")
        texts = _texts(inputs, task_metadata.name)
        prompt = QUERY_PROMPT if side == PromptType.query else DOCUMENT_PROMPT
        out = self.engine.embed(texts, task=adapter, prompt=prompt, truncate_dim=self.truncate_dim,
                                show_progress_bar=kwargs.get("show_progress_bar"))
        return np.ascontiguousarray(out, dtype=np.float32)


def _side(prompt_type):
    """``prompt_type`` as a ``PromptType`` (mteb passes the enum; its string values are accepted), or None."""
    if prompt_type is None:
        return None
    try:
        return PromptType(prompt_type)
    except ValueError:
        raise ValueError(f"prompt_type {prompt_type!r} is not valid; choose None or one of "
                         f"{[p.value for p in PromptType]}") from None


def _texts(inputs, task_name) -> list:
    """Flatten mteb's batches (dicts with a ``text`` list; mteb has already joined titles, instructions and
    conversations into it) into one list of str."""
    texts = []
    for b, batch in enumerate(inputs):
        if not isinstance(batch, Mapping):
            raise TypeError(f"{task_name}: batch {b} is {type(batch).__name__}; mteb passes dicts with a 'text' field")
        other = sorted(k for k in ("image", "audio", "video") if k in batch)
        if other:
            raise ValueError(f"{task_name}: batch {b} carries {other}; jina-embeddings-v5-text embeds text only")
        if "text" not in batch:
            raise ValueError(f"{task_name}: batch {b} has no 'text' field (fields: {sorted(batch)})")
        items = batch["text"]
        items = [items] if isinstance(items, str) else list(items)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"{task_name}: text {len(texts) + i} is {type(t).__name__} ({t!r:.40}), expected str")
        texts.extend(items)
    return texts


# ---- metadata ---------------------------------------------------------------------------------------------
def _hub_revision(folder: str):
    """The commit of a hub-cache snapshot folder (.../models--org--name/snapshots/<sha>), else None."""
    parent, sha = os.path.split(os.path.normpath(folder))
    return sha if os.path.basename(parent) == "snapshots" and _SNAPSHOT.match(sha) else None


def _local_revision(folder: str) -> str:
    """A revision for a plain folder: a digest of its files' names, sizes and mtimes
    (``jv5fast.loading.checkpoint_fingerprint``), so that two checkpoints (or one retrained in place) never share
    mteb's result cache; a copy with the same files gets a new revision, which costs a re-run, never a wrong
    score. Reads no file contents."""
    digest = hashlib.sha256(json.dumps(checkpoint_fingerprint(folder)).encode()).hexdigest()
    return "local-" + digest[:16]


_ENGINE_OPTIONS = frozenset(inspect.signature(Engine.__init__).parameters) - {"self", "model_name_or_path"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compute_kwargs(model, engine_kwargs) -> dict:
    """What changes the vectors beyond the checkpoint and truncate_dim: the compute dtype (bf16 on CUDA by
    default), the ONNX backend and int8; recorded so that such runs are cached apart from fp32 torch runs."""
    if isinstance(model, Engine):
        out = {"dtype": _dtype_name(model.dtype)} if model.dtype != torch.float32 else {}
        if model.backend != "torch":
            out["backend"] = model.backend
        return out
    dtype = engine_kwargs.get("dtype")
    if dtype is None and engine_kwargs.get("backend", "torch") == "torch" and engine_kwargs.get("quantize") is None:
        device = str(engine_kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = "bfloat16" if device.startswith("cuda") else None
    out = {"dtype": _dtype_name(dtype)} if dtype is not None and _dtype_name(dtype) != "float32" else {}
    for key in ("backend", "quantize", "onnx_quantize"):
        if engine_kwargs.get(key) not in (None, "torch"):
            out[key] = engine_kwargs[key]
    return out


def model_meta(model, *, truncate_dim=None, name=None, revision=None, **engine_kwargs) -> ModelMeta:
    """``mteb.ModelMeta`` for an ``Engine`` or a checkpoint path / hub id (read from its config.json; no weights
    are loaded). Its ``loader`` builds a ``JV5FastEncoder``, so ``meta.load_model()`` and
    ``mteb.evaluate(meta, tasks)`` work. ``name`` defaults to ``jv5fast/jina-embeddings-v5-text-<size>[-<task>]``;
    ``revision`` to the hub snapshot's commit, or for a plain folder a digest of its files' names, sizes and
    mtimes (so two local checkpoints never share a cached score). ``truncate_dim``, a non-default ``max_length``
    and a compute setting other than fp32 torch (``dtype``, ``backend``, ``quantize``) go into
    ``experiment_kwargs``, so their results are cached apart."""
    unknown = sorted(set(engine_kwargs) - _ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"model_meta: unknown Engine option(s) {unknown}; valid: {sorted(_ENGINE_OPTIONS)}")
    if isinstance(model, Engine):
        if engine_kwargs:
            raise ValueError(f"model_meta: {sorted(engine_kwargs)} configure a new Engine, but an existing Engine "
                             f"was given; set them when building that Engine")
        folder, args, max_length = model.path, model.args, model.max_length
        merged = model.tasks[0] if len(model.tasks) == 1 and not model._adapters else None
        truncate_dim = None if truncate_dim is None else model._check_truncate_dim(truncate_dim)
        frameworks = ["PyTorch", "safetensors"] if model.backend == "torch" else ["ONNX"]
    else:
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model_meta: model must be a jv5fast.Engine or a checkpoint path, got "
                            f"{type(model).__name__}")
        folder = resolve_checkpoint(os.fspath(model))
        args = load_model_args(folder)
        max_length = engine_kwargs.get("max_length") or args.max_position_embeddings
        merged = None if list_adapter_tasks(folder) else merged_task_from_name(os.fspath(model))
        if truncate_dim is not None and (isinstance(truncate_dim, bool)
                                         or not isinstance(truncate_dim, (int, np.integer))):
            raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
        if truncate_dim is not None and not 1 <= truncate_dim <= args.hidden_size:
            raise ValueError(f"truncate_dim={truncate_dim!r} is out of range 1..{args.hidden_size}; the Matryoshka "
                             f"dims are {[d for d in MATRYOSHKA_DIMS if d <= args.hidden_size]}")
        frameworks = ["ONNX"] if engine_kwargs.get("backend") == "onnx" else ["PyTorch", "safetensors"]
    size = "small" if args.family == QWEN3 else "nano"
    released = f"jinaai/jina-embeddings-v5-text-{size}"
    shapes = expected_shapes(args)
    n_params = sum(int(np.prod(s)) for s in shapes.values())  # base weights, as mteb counts (adapters excluded)
    experiment = {}
    if truncate_dim is not None:
        truncate_dim = int(truncate_dim)
        experiment["embed_dim"] = truncate_dim  # mteb's own key: load_model(embed_dim=...) passes it back
    if max_length != args.max_position_embeddings:
        experiment["max_length"] = max_length
    experiment.update(_compute_kwargs(model, engine_kwargs))
    return ModelMeta(
        loader=_loader(model, truncate_dim, engine_kwargs),
        name=name or f"jv5fast/jina-embeddings-v5-text-{size}" + (f"-{merged}" if merged else ""),
        # mteb's own placeholder when unknown: with None its result cache warns and reuses the newest revision folder
        revision=revision or _hub_revision(folder) or _local_revision(folder),
        release_date=None,
        languages=list(NANO_LANGUAGES) if size == "nano" else None,
        n_parameters=n_params,
        n_embedding_parameters=int(np.prod(shapes["embed_tokens.weight"])),
        memory_usage_mb=float(round(n_params * 2 / 2**20)),  # stored in bf16
        max_tokens=max_length,
        embed_dim=truncate_dim or [d for d in MATRYOSHKA_DIMS if d < args.hidden_size] + [args.hidden_size],
        license=LICENSE,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=frameworks,
        reference=f"https://huggingface.co/{released}",
        similarity_fn_name="cosine",
        use_instructions=True,  # the "Query: " / "Document: " prefixes
        training_datasets=None,
        adapted_from=released,
        modalities=["text"],
        model_type=["dense"],
        experiment_kwargs=experiment or None,
    )


def _loader(source, truncate_dim, engine_kwargs):
    """mteb calls ``loader(name, revision=..., [device=...], **loader_kwargs, **experiment_kwargs)``. A closure,
    not loader_kwargs: mteb deep-copies and serialises the meta, and an Engine (or a torch dtype) survives
    neither; deepcopy treats a function as atomic."""
    def load(model_name=None, revision=None, *, device=None, embed_dim=None, **kwargs):
        k = truncate_dim if embed_dim is None else embed_dim
        if isinstance(source, Engine):
            if kwargs.get("max_length", source.max_length) == source.max_length:
                kwargs.pop("max_length", None)
            for key, value in _compute_kwargs(source, {}).items():  # experiment_kwargs coming back
                if kwargs.get(key) == value:
                    kwargs.pop(key)
            if device is not None or kwargs:
                given = sorted(kwargs) + (["device"] if device is not None else [])
                raise ValueError(f"this ModelMeta wraps an already-built Engine; {given} cannot change it (build the "
                                 f"meta from a checkpoint path instead)")
            return JV5FastEncoder(source, truncate_dim=k)
        opts = {**engine_kwargs, **kwargs}
        if device is not None:
            opts["device"] = device
        return JV5FastEncoder(source, truncate_dim=k, **opts)
    load.__name__ = load.__qualname__ = "JV5FastEncoder"  # how mteb names the loader in model_meta.json
    return load


__all__ = [
    "DOCUMENT_PROMPT",
    "FALLBACK_ADAPTER",
    "QUERY_PROMPT",
    "TASK_TYPE_ADAPTERS",
    "JV5FastEncoder",
    "adapter_for_task_type",
    "model_meta",
]
