"""What the server says when it says no: every error is OpenAI's body
``{"error": {"message", "type", "param", "code"}}``, never a stack trace or a server path.

``APIError`` is raised anywhere in a request and turned into that body by the handlers ``add_error_handlers``
installs; ``from_batcher`` maps the batcher's exceptions (overload, shutdown, NaN, a failed forward pass,
its own argument checks) onto status codes.
"""
from __future__ import annotations

import json
import logging

from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..scheduler import BatchFailed, Closed, Overloaded

log = logging.getLogger("jv5fast")


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


# what Batcher.embed raises on its own; ValueError/TypeError are its argument checks (e.g. overflow error on
# an over-long input), so they are the client's fault (400); the rest are the server's state or fault
BATCHER_ERRORS = (Overloaded, Closed, FloatingPointError, BatchFailed, ValueError, TypeError)


def from_batcher(e: BaseException, batcher) -> APIError:
    """The HTTP error for one of ``BATCHER_ERRORS`` raised by ``batcher`` (checked in that order)."""
    if isinstance(e, Overloaded):
        return APIError(429, str(e), type_="rate_limit_error", code="overloaded",
                        headers={"Retry-After": str(int(e.retry_after))})
    if isinstance(e, Closed):
        failed = batcher is not None and batcher.failed
        return APIError(503, str(e), type_="service_unavailable", code="failed" if failed else "draining")
    if isinstance(e, FloatingPointError):
        return APIError(500, str(e), type_="server_error", code="non_finite_embedding")
    if isinstance(e, BatchFailed):
        return APIError(500, str(e), type_="server_error", code="batch_failed")
    # overflow 'chunk': an overlap over the window of an input (it depends on the input's prompt and tokens)
    return APIError(400, str(e), param="chunk_overlap" if str(e).startswith("chunk_overlap=") else None)


def add_error_handlers(app) -> None:
    """Answer ``APIError``, unknown paths and methods, and anything unexpected with OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(Exception)
    async def _internal(request, err):  # never a stack trace or a path on the wire
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal server error ({type(err).__name__}); see the server log",
                              type_="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):  # unknown paths (404), wrong methods (405): OpenAI's body too
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                              code=str(err.status_code), headers=getattr(err, "headers", None))
