"""The API key: one shared bearer key guarding ``/v1/*`` (``--api-key`` or ``$JV5FAST_API_KEY``), as OpenAI's
clients send it (``Authorization: Bearer <key>``). Compared in constant time; a blank key is refused at start,
never read as "no authentication".
"""
from __future__ import annotations

import hmac
import os

from fastapi import Request

from .errors import APIError


def _api_key(api_key, name="api_key"):
    """The configured API key, stripped as the client's key is (None: ``$JV5FAST_API_KEY``; unset: no key).
    An empty or blank key is an error, never "no authentication" (``--api-key "$KEY"`` with KEY unset);
    ``name`` is what the message calls the argument (the CLI's ``--api-key``)."""
    where = name
    if api_key is None:
        api_key, where = os.environ.get("JV5FAST_API_KEY"), "$JV5FAST_API_KEY"
        if api_key is None:
            return None
    if not isinstance(api_key, str):
        raise TypeError(f"{name} must be a str or None, got {type(api_key).__name__}")
    if not api_key.strip():
        raise ValueError(f"{where} is empty or blank ({api_key!r}); give the key clients must send, or leave "
                         f"{name} and JV5FAST_API_KEY unset to serve without authentication")
    return api_key.strip()


def check_key(request: Request, key_bytes) -> None:
    """Raise 401 unless ``request`` carries the key (``key_bytes``: the key's UTF-8; None: no key needed)."""
    if key_bytes is None:
        return
    auth = request.headers.get("authorization", "")
    if not auth:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    scheme, _, given = auth.partition(" ")
    # headers arrive decoded as latin-1: encoding back gives the bytes the client sent (a UTF-8 key too)
    if not hmac.compare_digest(given.strip().encode("latin-1"), key_bytes) or scheme.lower() != "bearer":
        raise APIError(401, "invalid API key", code="invalid_api_key")
