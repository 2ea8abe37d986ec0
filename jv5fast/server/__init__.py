"""``jv5fast serve``: an OpenAI- and Jina-API-compatible embeddings server over ``jv5fast.scheduler.Batcher``.

Endpoints: ``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models``, ``GET /health`` (200 once
the model is loaded and warm; 503 while loading or draining), ``GET /metrics`` (Prometheus).
Needs the ``serve`` extra: ``pip install "jv5fast[serve]"``. The rooms, in the order a request meets them:

- ``process``    ``serve()``: the socket bound first, uvicorn, SIGTERM/SIGINT → drain, the exit code
- ``app``        ``create_app()``: assembles the rooms below into one ASGI app over one engine
- ``lifecycle``  ``State`` (loading | ready | draining | failed: what /health says), the load/drain lifespan
- ``routes``     the four endpoints, and ``replace_route`` for a host that swaps /health or /metrics
- ``auth``       the bearer API key
- ``validation`` the request body: size limit, JSON, the pydantic model, field checks against the engine
- ``encoding``   float/base64/binary/ubinary rows in OpenAI's response shape, encoded off the event loop
- ``errors``     OpenAI's error body, and the batcher's exceptions as status codes
- ``metrics``    the app's Prometheus registry and the request-counting ASGI wrapper
"""
from .app import create_app, display_name
from .auth import _api_key
from .encoding import _encode
from .errors import APIError, error_response
from .lifecycle import State
from .metrics import Metrics
from .process import listen_socket, serve
from .routes import replace_route
from .validation import EMBEDDING_TYPES, ENCODING_FORMATS, JINA_TASKS, MATRYOSHKA, EmbeddingRequest

__all__ = ["create_app", "serve", "listen_socket", "display_name", "replace_route", "State", "Metrics",
           "APIError", "error_response", "EmbeddingRequest", "JINA_TASKS", "EMBEDDING_TYPES",
           "ENCODING_FORMATS", "MATRYOSHKA"]
