"""LangChain ``Embeddings`` over a jv5fast ``Engine``: documents with the "Document: " prompt, queries with
"Query: ", as jina v5 was trained (the same vectors as ``Engine.encode_document`` / ``encode_query``).

The async methods run the engine in the loop's default thread executor (langchain-core's
``run_in_executor``), so an ``await`` never blocks the event loop; the engine's lock serialises the forward
passes. Needs ``langchain-core`` (``pip install jv5fast[langchain]``).
"""
from __future__ import annotations

from ..engine import Engine
from . import check_texts, engine_from, engine_spec, missing_extra

try:
    from langchain_core.embeddings import Embeddings
    from langchain_core.runnables.config import run_in_executor
except ModuleNotFoundError as e:
    missing_extra(e, "langchain_core", "langchain-core", "langchain")

__all__ = ["JV5FastEmbeddings"]


class JV5FastEmbeddings(Embeddings):
    """``JV5FastEmbeddings(model, *, task=None, dimensions=None, batch_size=None, **engine_kwargs)``.

    model: a ``jv5fast.Engine`` or a checkpoint path (``engine_kwargs`` such as device / dtype / max_length go
    to ``Engine``). task: the adapter for every call (default the engine's). dimensions: the Matryoshka
    ``truncate_dim`` (vectors stay unit norm). batch_size: at most this many texts per forward pass (None:
    the engine's token budget alone)."""

    def __init__(self, model, *, task=None, dimensions=None, batch_size=None, **engine_kwargs):
        if task is not None and not isinstance(model, Engine):
            engine_kwargs["task"] = task  # load with that adapter active
        self.engine = engine_from(model, "JV5FastEmbeddings", **engine_kwargs)
        self.task, self.dimensions, self.batch_size = task, dimensions, batch_size
        # how to load the engine again after pickling (an Engine holds locks and tensors; it is not pickled): the
        # folder it runs and its resolved options, not the arguments (quantize="int8" runs a cached export folder)
        self._source = (self.engine.path, engine_spec(self.engine))
        # check task, dimensions and batch_size now, not at the first document (an empty call computes nothing)
        self.embed_documents([])

    def _kw(self):
        return {"task": self.task, "truncate_dim": self.dimensions, "batch_size": self.batch_size,
                "show_progress_bar": False}

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector (list of float) per text, with the document prompt."""
        return self.engine.encode_document(check_texts(texts, "embed_documents"), **self._kw()).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The vector of ``text`` with the query prompt."""
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes one str, got {type(text).__name__}; use embed_documents for lists")
        return self.engine.encode_query(text, **self._kw()).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` in a worker thread: the event loop keeps running meanwhile."""
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """``embed_query`` in a worker thread: the event loop keeps running meanwhile."""
        return await run_in_executor(None, self.embed_query, text)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("engine")
        return state

    def __setstate__(self, state):
        """Unpickled (e.g. in another process): load the engine again from its path and options."""
        self.__dict__.update(state)
        path, kwargs = self._source
        self.engine = Engine(path, **kwargs)

    def __repr__(self):
        return f"JV5FastEmbeddings({self.engine!r}, task={self.task!r}, dimensions={self.dimensions!r})"
