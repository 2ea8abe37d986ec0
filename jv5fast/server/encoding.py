"""Response encoding: embeddings in their wire form, in OpenAI's response shape with the Jina API's types.

``float`` rows are JSON numbers, or base64 of little-endian float32 when the client asks OpenAI's
``encoding_format=base64`` (or the Jina type ``base64``); ``binary``/``ubinary`` are the packed sign bits as
int lists. Several Jina types at once give each row a ``{type: embedding}`` map. Encoding and serializing
cost in proportion to the response, so the server runs them off the event loop (``off_loop``).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json

import numpy as np
from fastapi.responses import Response

from ..postprocess import quantize


async def off_loop(fn, *args):
    """``fn(*args)`` in a worker thread: work proportional to a request's size never stalls the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def json_response(obj, status=200):
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


def response_body(res, types, single, base64_floats, model) -> bytes:
    """The JSON body for the batcher's ``res`` (an ``EmbedResult``) in the embedding ``types`` asked."""
    encoded = {t: _encode(res.embeddings, t, base64_floats) for t in types}
    data = [{"object": "embedding", "index": i,
             "embedding": encoded[types[0]][i] if single else {t: encoded[t][i] for t in types}}
            for i in range(res.embeddings.shape[0])]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": res.tokens, "total_tokens": res.tokens}},
                      separators=(",", ":")).encode()


def _encode(emb: np.ndarray, kind: str, base64_floats: bool):
    """Rows of float32 ``emb`` in the wire form of ``kind``: float lists (or base64 of little-endian float32
    when the client asked encoding_format=base64, or kind 'base64'), binary/ubinary as int lists."""
    if kind in ("binary", "ubinary"):
        return quantize(emb, kind).tolist()
    if kind == "base64" or base64_floats:
        le = emb.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in le]
    return emb.tolist()
