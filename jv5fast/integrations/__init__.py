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
    """Engine options that rebuild ``engine`` from ``engine.path`` (device, dtype, max_length, backend): what an
    integration records so that it can be pickled or serialised and loaded again in another process."""
    spec = {"device": str(engine.device), "max_length": engine.max_length,
            "max_batch_tokens": engine.max_batch_tokens}
    if engine.backend == "torch":
        spec["dtype"] = str(engine.dtype).replace("torch.", "")
    else:
        spec["backend"] = engine.backend
        if engine.int8_quality is not None:
            spec["onnx_quantize"] = "int8"
    return spec


def check_texts(texts, what: str) -> list:
    """A list of str for a ``*_documents`` / ``*_text_embeddings`` call: a single str is refused (iterating it
    would embed its characters one by one)."""
    if isinstance(texts, str):
        raise TypeError(f"{what} takes a list of str, got one str ({texts!r:.40}); wrap it in a list, or use the "
                        f"query method for a single query")
    return list(texts)
