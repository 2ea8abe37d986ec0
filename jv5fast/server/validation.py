"""Request validation: from the bytes of ``POST /v1/embeddings`` to the arguments of ``Batcher.embed``.

The body is read under a size limit before any parsing, parsed as JSON, checked by a pydantic model that
refuses unknown fields (a misspelt option would otherwise be ignored silently), then each field is checked
against the served engine (its tasks, its dimension). Every refusal is an ``APIError`` naming the field and
the valid values. The request speaks OpenAI's API plus the Jina API's fields, plus ``overflow`` /
``chunk_overlap`` (``Engine.embed``'s: a text over the context is truncated, refused, or embedded in windows).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from ..overflow import OVERFLOW, resolve_overflow
from .errors import APIError

# Jina API task -> (adapter, prompt name). The query side of retrieval gets "Query: ", all else "Document: ".
JINA_TASKS = {
    "retrieval.query": ("retrieval", "query"),
    "retrieval.passage": ("retrieval", "document"),
    "text-matching": ("text-matching", "document"),
    "clustering": ("clustering", "document"),
    "separation": ("clustering", "document"),  # the name jina-embeddings-v3 used
    "classification": ("classification", "document"),
}
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
ENCODING_FORMATS = ("float", "base64")
MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)
OFF_LOOP_BYTES = 65536  # bodies up to this size are parsed on the event loop (a thread hop costs more)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request plus the Jina API's fields; anything else is refused (a misspelt
    option would otherwise be ignored silently)."""
    model_config = ConfigDict(extra="forbid")
    input: Any                                                   # str or list of str (checked by hand)
    model: Optional[StrictStr] = None
    encoding_format: Optional[StrictStr] = None                  # float | base64 (OpenAI)
    dimensions: Optional[StrictInt] = None                       # Matryoshka: truncate, then normalize
    user: Optional[StrictStr] = None                             # accepted and ignored, as OpenAI logs it
    task: Optional[StrictStr] = None                             # Jina: retrieval.query, ...
    embedding_type: Optional[Union[StrictStr, List[StrictStr]]] = None  # Jina: float|base64|binary|ubinary
    normalized: StrictBool = True                                # Jina (default false there; true here)
    truncate: Optional[StrictBool] = None                        # Jina (default false there; true here):
                                                                 # true = overflow "truncate", false = "error"
    late_chunking: StrictBool = False                            # Jina; only false is served
    overflow: Optional[StrictStr] = None                         # truncate (default) | error | chunk
    chunk_overlap: Optional[StrictInt] = None                    # chunk: tokens shared by neighbouring windows


@dataclass(frozen=True)
class EmbedCall:
    """A validated request: the arguments of ``Batcher.embed`` and how to encode its answer."""
    texts: List[str]
    task: Optional[str]           # the adapter (None: the engine's task)
    prompt_name: Optional[str]    # "query" | "document" | None where the model has no such prompt
    truncate_dim: Optional[int]   # Matryoshka dimension (None: full)
    normalize: bool
    overflow: str                 # truncate | error | chunk (Jina's truncate resolved into it)
    chunk_overlap: int
    types: List[str]              # distinct embedding types, in the order first named
    single: bool                  # one type asked as a string (or none): each row is the embedding itself
    base64_floats: bool           # encoding_format=base64: float rows as base64 of little-endian float32

    def batcher_kwargs(self) -> dict:
        return dict(task=self.task, prompt_name=self.prompt_name, truncate_dim=self.truncate_dim,
                    normalize=self.normalize, overflow=self.overflow, chunk_overlap=self.chunk_overlap)


async def read_body(request: Request, max_request_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over ``max_request_bytes``."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"bad Content-Length header {length!r}")
        if int(length) > max_request_bytes:
            raise APIError(413, f"request body of {int(length)} bytes is over this server's limit of "
                           f"{max_request_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_request_bytes:
            raise APIError(413, f"request body is over this server's limit of {max_request_bytes} bytes",
                           code="request_too_large")
    return bytes(body)


def parse_request(body: bytes) -> EmbeddingRequest:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON here: nested too deeply") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(raw).__name__}")
    try:
        return EmbeddingRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "body"
        if err["type"] == "missing":
            msg = f"missing field '{field}'"
        elif err["type"] == "extra_forbidden":
            msg = (f"unknown field '{field}'; valid fields: {list(EmbeddingRequest.model_fields)}")
        else:
            msg = f"field '{field}': {err['msg']} (got {err.get('input')!r:.60})"
        raise APIError(400, msg, param=field.split(".")[0]) from None


def embed_call(req: EmbeddingRequest, engine, model_name: str, max_inputs: int) -> EmbedCall:
    """Check ``req`` against the served ``engine`` (named ``model_name``), in the order the fields are named
    in the errors: late_chunking, model, input, task, dimensions, embedding_type, encoding_format, overflow
    (with truncate, its alias), chunk_overlap."""
    if req.late_chunking:
        raise APIError(400, "late_chunking=true is not supported by this server; send false or leave it out",
                       param="late_chunking")
    if req.model is not None and req.model not in (model_name, model_name.rsplit("/", 1)[-1], engine.path):
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    texts = _texts(req.input, max_inputs)
    adapter, prompt_name = _task(req.task, engine)
    k = _dimensions(req.dimensions, engine)
    types = _embedding_types(req.embedding_type)
    if req.encoding_format is not None and req.encoding_format not in ENCODING_FORMATS:
        raise APIError(400, f"encoding_format {req.encoding_format!r} is not valid; choose one of "
                       f"{list(ENCODING_FORMATS)}", param="encoding_format")
    policy, overlap = _overflow(req, engine)
    return EmbedCall(texts, adapter, prompt_name, k, req.normalized, policy, overlap, types,
                     single=req.embedding_type is None or isinstance(req.embedding_type, str),
                     base64_floats=req.encoding_format == "base64")


def served_tasks(engine) -> list:
    """The Jina task names ``engine`` can serve (its adapters)."""
    return [t for t, (adapter, _) in JINA_TASKS.items() if adapter in engine.tasks]


def _texts(value, max_inputs):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise APIError(400, f"'input' must be a string or a list of strings, got {type(value).__name__}",
                       param="input")
    if not value:
        raise APIError(400, "'input' is an empty list; send at least one string", param="input")
    if len(value) > max_inputs:
        raise APIError(413, f"'input' has {len(value)} items; this server takes at most {max_inputs} per "
                       f"request", param="input", code="too_many_inputs")
    for i, t in enumerate(value):
        if not isinstance(t, str):
            what = "token ids are not accepted, send text" if isinstance(t, (int, list)) else "expected a string"
            raise APIError(400, f"input[{i}] is {type(t).__name__} ({t!r:.40}); {what}", param="input")
    return value


def _task(task, engine):
    """(adapter, prompt name) for a Jina task (None: the engine's task, document prompt)."""
    doc = "document" if "document" in engine.prompts else None
    if task is None:
        return None, doc
    valid = served_tasks(engine)
    if task not in JINA_TASKS or task not in valid:
        if not valid:
            raise APIError(400, f"task {task!r}: this model serves one task that its files do not name; omit "
                           f"'task'", param="task")
        raise APIError(400, f"task {task!r} is not valid; choose one of {valid}", param="task")
    adapter, side = JINA_TASKS[task]
    return adapter, side if side in engine.prompts else None


def _overflow(req, engine):
    """(policy, chunk_overlap) from ``overflow``, Jina's ``truncate`` (its alias: true = "truncate", false =
    "error"; both given must agree) and ``chunk_overlap`` (chunk only; under ``max_length``: the exact bound,
    the window left once the prompt and special tokens are in, is checked per input when tokenized)."""
    if req.overflow is not None and req.overflow not in OVERFLOW:
        raise APIError(400, f"overflow {req.overflow!r} is not valid; choose one of {list(OVERFLOW)}",
                       param="overflow")
    alias = None if req.truncate is None else ("truncate" if req.truncate else "error")
    if req.overflow is not None and alias is not None and alias != req.overflow:
        raise APIError(400, f"truncate={str(req.truncate).lower()} conflicts with overflow={req.overflow!r} "
                       f"(truncate=true means overflow 'truncate', false means 'error'); send overflow alone",
                       param="truncate")
    policy = resolve_overflow(req.overflow, req.truncate)
    overlap = 0 if req.chunk_overlap is None else req.chunk_overlap
    if overlap and policy != "chunk":
        raise APIError(400, f"chunk_overlap applies to overflow 'chunk' only; overflow is {policy!r}",
                       param="chunk_overlap")
    if not 0 <= overlap < engine.max_length:
        raise APIError(400, f"chunk_overlap={overlap} must be in 0..{engine.max_length - 1}, and under the window "
                       f"(max_length={engine.max_length} less the prompt and special tokens)", param="chunk_overlap")
    if policy == "chunk" and not req.normalized:
        raise APIError(400, "overflow 'chunk' averages the windows' unit vectors, so normalized=false has no raw "
                       "vector to return for a long input; send normalized=true (or another overflow)",
                       param="normalized")
    return policy, overlap


def _dimensions(dimensions, engine):
    if dimensions is None:
        return None
    if not 1 <= dimensions <= engine.dim:
        dims = [d for d in MATRYOSHKA if d <= engine.dim]
        raise APIError(400, f"dimensions={dimensions} is out of range 1..{engine.dim}; the Matryoshka "
                       f"dimensions are {dims}", param="dimensions")
    return dimensions


def _embedding_types(value):
    """The distinct embedding types asked for, in the order first named (so at most len(EMBEDDING_TYPES)):
    a name listed twice is collapsed, as the response has one key per type and each is encoded once."""
    if value is None:
        value = "float"
    types = [value] if isinstance(value, str) else value
    if not types:
        raise APIError(400, "embedding_type is an empty list", param="embedding_type")
    types = list(dict.fromkeys(types))
    for t in types:
        if t not in EMBEDDING_TYPES:
            raise APIError(400, f"embedding_type {t!r} is not valid; choose one of {list(EMBEDDING_TYPES)}",
                           param="embedding_type")
    return types
