"""LlamaIndex ``BaseEmbedding`` over a jv5fast ``Engine``: queries with the "Query: " prompt, texts (nodes)
with "Document: ", as jina v5 was trained (the same vectors as ``Engine.encode_query`` / ``encode_document``).

BaseEmbedding is a pydantic model: the engine is a private attribute (``PrivateAttr``), the options are
fields. ``embed_batch_size`` is honoured by BaseEmbedding itself (``get_text_embedding_batch`` hands us at most
that many texts per call); its default here is 64, not LlamaIndex's 10, since one call is one packed batch.
The async methods run the engine in the loop's default thread executor, so an ``await`` never blocks the event
loop. Needs ``llama-index-core`` (``pip install jv5fast[llamaindex]``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from ..engine import Engine
from . import engine_from

__all__ = ["JV5FastEmbedding"]


class JV5FastEmbedding(BaseEmbedding):
    """``JV5FastEmbedding(model, *, task=None, dimensions=None, embed_batch_size=64, engine_kwargs=None, **kw)``.

    model: a ``jv5fast.Engine`` or a checkpoint path (``engine_kwargs``, e.g. ``{"device": "cuda"}``, go to
    ``Engine``). task: the adapter for every call (default the engine's). dimensions: the Matryoshka
    ``truncate_dim`` (vectors stay unit norm). Other keywords (``callback_manager``, ``num_workers``, ...)
    go to ``BaseEmbedding``."""

    task: str | None = Field(default=None, description="jina v5 adapter (None: the engine's own task)")
    dimensions: int | None = Field(default=None, description="Matryoshka truncate_dim (None: full width)")
    _engine: Engine = PrivateAttr()

    def __init__(self, model: Any, *, task: str | None = None, dimensions: int | None = None,
                 embed_batch_size: int = 64, engine_kwargs: dict | None = None, **kwargs: Any) -> None:
        engine_kwargs = dict(engine_kwargs or {})
        if task is not None and not isinstance(model, Engine):
            engine_kwargs["task"] = task  # load with that adapter active
        engine = engine_from(model, "JV5FastEmbedding", **engine_kwargs)
        kwargs.setdefault("model_name", str(engine.path))
        super().__init__(task=task, dimensions=dimensions, embed_batch_size=embed_batch_size, **kwargs)
        self._engine = engine
        self._get_text_embeddings([])  # check task and dimensions now (an empty call computes nothing)

    @classmethod
    def class_name(cls) -> str:
        return "JV5FastEmbedding"

    @property
    def engine(self) -> Engine:
        return self._engine

    def _kw(self):
        return {"task": self.task, "truncate_dim": self.dimensions, "show_progress_bar": False}

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._engine.encode_query(query, **self._kw()).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._engine.encode_document(text, **self._kw()).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._engine.encode_document(list(texts), **self._kw()).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embeddings, texts)
