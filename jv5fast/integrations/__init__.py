"""Adapters for the frameworks users already use (LangChain, LlamaIndex, MTEB); each needs its own extra and
is imported only when used."""
from __future__ import annotations

import os

_LAZY = {"JV5FastEmbeddings": "langchain", "JV5FastEmbedding": "llama_index",  # name -> submodule
         "JV5FastEncoder": "mteb", "model_meta": "mteb"}


def __getattr__(name):  # jv5fast.integrations.JV5FastEmbeddings imports langchain-core only on first use
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def missing_extra(e: ModuleNotFoundError, module: str, dist: str, extra: str):
    """Raise ``e`` (from importing ``module``, pip distribution ``dist``) as every jv5fast extra does: naming the
    ``pip install "jv5fast[extra]"`` that is missing. An error from inside an installed package (one of its own
    dependencies missing) is re-raised unchanged."""
    if (e.name or "").split(".")[0] != module.split(".")[0]:
        raise e
    raise ModuleNotFoundError(f"{e}: this integration needs {dist}, in the {extra} extra: "
                              f'pip install "jv5fast[{extra}]"', name=e.name) from None


def engine_from(model, what: str, **engine_kwargs):
    """``model`` as a ``jv5fast.Engine``: an existing one (then ``engine_kwargs`` must be empty) or a checkpoint
    path / hub id loaded with ``engine_kwargs``. Shared by the integrations."""
    from ..engine import Engine
    if isinstance(model, Engine):
        if engine_kwargs:
            raise ValueError(f"{what}: {sorted(engine_kwargs)} configure a new Engine, but an existing Engine was "
                             f"given; set them when building that Engine")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{what}: model must be a jv5fast.Engine or a checkpoint path, got {type(model).__name__}")
    return Engine(model, **engine_kwargs)


def engine_spec(engine) -> dict:
    """Engine options that rebuild ``engine`` from ``engine.path`` with the same vectors (task, device, dtype,
    max_length, backend and int8 graph): what an integration records so that it can be pickled or serialised and
    loaded again in another process. ``cuda_graphs`` is left out: it replays the same kernels."""
    spec = {"device": str(engine.device), "max_length": engine.max_length,
            "max_batch_tokens": engine.max_batch_tokens}
    if len(engine.tasks) > 1:  # adapters to choose from; a merged or ONNX model has its one task in its weights
        spec["task"] = engine.task
    if engine.backend == "torch":
        spec["dtype"] = str(engine.dtype).replace("torch.", "")
        if getattr(engine, "cpu_precision", "fp32") != "fp32":  # opt-in bf16 GEMMs: other vectors than fp32's
            spec["cpu_precision"] = engine.cpu_precision
    else:
        spec["backend"] = engine.backend
        # the graph file the engine runs (an int8 export may lack the quality record int8_quality comes from)
        graph = getattr(getattr(engine.model, "session", None), "model_path", "")
        if engine.int8_quality is not None or os.path.basename(graph) == "model_int8.onnx":
            spec["onnx_quantize"] = "int8"
    return spec


def check_texts(texts, what: str) -> list:
    """A list of str for a ``*_documents`` / ``*_text_embeddings`` call: a single str is refused (iterating it
    would embed its characters one by one)."""
    if isinstance(texts, str):
        raise TypeError(f"{what} takes a list of str, got one str ({texts!r:.40}); wrap it in a list, or use the "
                        f"query method for a single query")
    return list(texts)
