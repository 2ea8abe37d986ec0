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
