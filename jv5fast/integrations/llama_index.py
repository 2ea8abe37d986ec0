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

from ..engine import Engine
from . import check_texts, engine_from, engine_spec, missing_extra

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
except ModuleNotFoundError as e:
    missing_extra(e, "llama_index.core", "llama-index-core", "llamaindex")

__all__ = ["JV5FastEmbedding"]


class JV5FastEmbedding(BaseEmbedding):
    """``JV5FastEmbedding(model, *, task=None, dimensions=None, embed_batch_size=64, engine_kwargs=None, **kw)``.

    model: a ``jv5fast.Engine`` or a checkpoint path (``engine_kwargs``, e.g. ``{"device": "cuda"}``, go to
    ``Engine``). task: the adapter for every call (default the engine's). dimensions: the Matryoshka
    ``truncate_dim`` (vectors stay unit norm). Other keywords (``callback_manager``, ``num_workers``, ...)
    go to ``BaseEmbedding``."""

    task: str | None = Field(default=None, description="jina v5 adapter (None: the engine's own task)")
    dimensions: int | None = Field(default=None, description="Matryoshka truncate_dim (None: full width)")
    engine_kwargs: dict = Field(default_factory=dict, description="Engine options that load model_name again "
                                "(after pickling or from_dict / from_json)")
    _engine: Engine | None = PrivateAttr(default=None)

    def __init__(self, model: Any = None, *, task: str | None = None, dimensions: int | None = None,
                 embed_batch_size: int = 64, engine_kwargs: dict | None = None, **kwargs: Any) -> None:
        engine_kwargs = dict(engine_kwargs or {})
        if model is None:  # from_dict / from_json: the serialised model_name and engine_kwargs
            model = kwargs.get("model_name")
            if model is None or model == "unknown":
                raise TypeError("JV5FastEmbedding needs model: a jv5fast.Engine or a checkpoint path")
        if task is not None and not isinstance(model, Engine):
            engine_kwargs["task"] = task  # load with that adapter active
        engine = engine_from(model, "JV5FastEmbedding", **engine_kwargs)
        kwargs["model_name"] = str(engine.path)
        spec = engine_spec(engine)  # resolved options for model_name, the folder the engine runs (JSON-able)
        super().__init__(task=task, dimensions=dimensions, embed_batch_size=embed_batch_size, engine_kwargs=spec,
                         **kwargs)
        self._engine = engine
        self._get_text_embeddings([])  # check task and dimensions now (an empty call computes nothing)

    @classmethod
    def class_name(cls) -> str:
        return "JV5FastEmbedding"

    @property
    def engine(self) -> Engine:
        """The engine; after unpickling (LlamaIndex drops unpicklable private attributes) it is loaded again
        from ``model_name`` and ``engine_kwargs``."""
        if getattr(self, "_engine", None) is None:  # unpickled: the attribute itself may be gone
            self._engine = Engine(self.model_name, **self.engine_kwargs)
        return self._engine

    def __getstate__(self):
        """Pickle the options without the engine (it holds locks and tensors); ``engine`` loads it again."""
        engine, self._engine = self._engine, None
        try:
            return super().__getstate__()
        finally:
            self._engine = engine

    def __deepcopy__(self, memo=None):
        """A copy of the options sharing this engine (an Engine holds locks and is thread-safe: never copied)."""
        return self.model_copy()

    def _kw(self):
        return {"task": self.task, "truncate_dim": self.dimensions, "show_progress_bar": False}

    def _get_query_embedding(self, query: str) -> Embedding:
        if not isinstance(query, str):
            raise TypeError(f"a query must be a str, got {type(query).__name__}")
        return self.engine.encode_query(query, **self._kw()).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        if not isinstance(text, str):
            raise TypeError(f"a text must be a str, got {type(text).__name__}; use get_text_embedding_batch for lists")
        return self.engine.encode_document(text, **self._kw()).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self.engine.encode_document(check_texts(texts, "get_text_embedding_batch"), **self._kw()).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embeddings, texts)
