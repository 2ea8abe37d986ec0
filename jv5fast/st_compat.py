"""sentence-transformers' ``encode`` surface on ``jv5fast.Engine``: ``encode``, ``encode_query``,
``encode_document``, ``similarity`` and ``similarity_pairwise`` with ``SentenceTransformer``'s keywords
(docs/conventions.md §1–§3), mapped onto ``Engine.embed``. Engine binds these functions as methods.

Same vectors as ``SentenceTransformer(jina v5).encode(...)``: that model's own output is L2-normalized at full
width, and ST's ``truncate_dim`` slices it afterwards. So ``normalize_embeddings=False`` returns exactly that
(unit at full width, then sliced: not unit when truncated), ``True`` renormalizes after slicing, and the
default ``None`` means True: jv5fast's vectors are always unit norm (ST's ``encode`` defaults to False, which
differs only when ``truncate_dim`` is set, and then only in norm: same direction, same binary codes; int8/uint8
buckets, calibrated on the values, differ).
``batch_size`` caps texts per forward pass (the engine's token budget still applies); the default None
leaves batching to the budget alone. ``overflow`` / ``chunk_overlap`` are ``embed``'s (a text over
``max_length``: "truncate", as ST does, "error", or "chunk" into averaged windows). Precisions follow
``sentence_transformers.quantization``, int8/uint8 calibrated on the returned batch as ST's ``encode`` does.
Nothing here imports sentence-transformers.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import torch

from .overflow import resolve_overflow
from .postprocess import quantize

log = logging.getLogger("jv5fast")
_NAMED_TEXTS = re.compile(r"texts\[([0-9, ]+)\]")

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")  # ST's five plus jv5fast's float16
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # encode_document's default: the first one present
_VALID_EXTRA = ("task", "normalize", "truncate", "overflow", "chunk_overlap")  # beyond ST's encode keywords
_INPUT_NAMES = ("inputs", "sentences", "texts")  # ST >= 5.4, older ST, jv5fast's embed


def encode(engine, inputs=None, prompt_name=None, prompt=None, batch_size=None, show_progress_bar=None,
           output_value="sentence_embedding", precision="float32", convert_to_numpy=True, convert_to_tensor=False,
           device=None, normalize_embeddings=None, truncate_dim=None, pool=None, chunk_size=None, *, task=None,
           normalize=None, truncate=None, overflow=None, chunk_overlap=0, **kwargs):
    """``SentenceTransformer.encode`` on this engine. ``inputs`` (also ``sentences=``/``texts=``): a str →
    (D,), a list → (N, D) (an empty list → (0, D)). ``task`` picks the adapter (``engine.tasks``);
    ``normalize`` / ``truncate`` / ``overflow`` / ``chunk_overlap`` are ``embed``'s own. See the module
    docstring for ``normalize_embeddings``."""
    inputs = _one_input(inputs, kwargs)
    if kwargs:
        extra = "'processing_kwargs' is not supported: tokenization is fixed when the Engine is built " \
                "(Engine(path, max_length=...)). " if "processing_kwargs" in kwargs else ""
        raise ValueError(f"Engine.encode() got keyword arguments it does not use: {sorted(kwargs)}. {extra}Beyond "
                         f"SentenceTransformer.encode's parameters it accepts {list(_VALID_EXTRA)} (task: the adapter, "
                         f"one of {list(engine.tasks)})")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be a positive int or None, got {type(batch_size).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if output_value != "sentence_embedding":
        raise ValueError(f"output_value={output_value!r} is not supported: jv5fast pools the last token inside the "
                         f"forward pass and never keeps token embeddings; valid: 'sentence_embedding'")
    precision = "float32" if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {list(PRECISIONS)}")
    _check_device(engine, device)
    if pool is not None or chunk_size is not None:
        raise ValueError("pool / chunk_size (multi-process encoding) are not supported: one Engine serves one device "
                         "and is thread-safe; build one Engine per device instead")
    if normalize is not None and normalize_embeddings is not None:
        raise ValueError(f"pass normalize_embeddings (sentence-transformers) or normalize (jv5fast), not both; got "
                         f"normalize_embeddings={normalize_embeddings!r}, normalize={normalize!r}")

    single = isinstance(inputs, str)
    items = engine._check_texts(inputs)
    k = engine._check_truncate_dim(truncate_dim)
    if precision in ("int8", "uint8") and len(items) == 1:  # before any work, as the message says
        _to_precision(np.zeros((1, k), np.float32), precision)
    if prompt is not None and prompt_name is not None:
        log.warning("encode: both prompt=%r and prompt_name=%r were given; the prompt is used (as in "
                    "sentence-transformers)", prompt, prompt_name)
    slice_after = False  # ST's normalize_embeddings=False: the model's unit vector at full width, then sliced
    if normalize is None:
        normalize = True
        slice_after = normalize_embeddings is not None and not normalize_embeddings and k < engine.dim
    kw = {"prompt_name": prompt_name, "prompt": prompt, "task": task, "normalize": normalize, "truncate": truncate,
          "overflow": overflow, "chunk_overlap": chunk_overlap, "truncate_dim": None if slice_after else k}
    out = _embed_capped(engine, items, batch_size, show_progress_bar, kw)   # (N, K or dim) float32
    if slice_after:
        out = np.ascontiguousarray(out[:, :k])
    out = _to_precision(out, precision)
    if convert_to_tensor:
        res = torch.from_numpy(out)
    elif convert_to_numpy:
        res = out
    else:  # ST: a list of 1-D tensors
        res = list(torch.from_numpy(out))
    return res[0] if single else res


def encode_query(engine, inputs=None, prompt_name=None, prompt=None, *args, **kw):
    """``encode`` with the query prompt ("Query: "; a model without one gets its default prompt, as in
    sentence-transformers) unless ``prompt``/``prompt_name`` is given; None means this method's own prompt."""
    if prompt is None and prompt_name is None:  # as sentence-transformers: else the model's default prompt
        prompt_name = "query" if "query" in engine.prompts else None
    return encode(engine, inputs, prompt_name, prompt, *args, **kw)


def encode_document(engine, inputs=None, prompt_name=None, prompt=None, *args, **kw):
    """``encode`` with the document prompt ("Document: "; as in sentence-transformers the first of
    document / passage / corpus the model has, else its default prompt) unless ``prompt``/``prompt_name``
    is given."""
    if prompt is None and prompt_name is None:  # as sentence-transformers: else the model's default prompt
        prompt_name = next((p for p in _DOCUMENT_PROMPTS if p in engine.prompts), None)
    return encode(engine, inputs, prompt_name, prompt, *args, **kw)


SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")  # sentence-transformers' SimilarityFunction values


def _similarity_fn(engine) -> str:
    name = getattr(engine, "similarity_fn_name", "cosine")
    name = getattr(name, "value", name)  # sentence_transformers.SimilarityFunction is a str enum
    if name not in SIMILARITY_FNS:
        raise ValueError(f"similarity_fn_name={name!r} is not valid; choose one of {list(SIMILARITY_FNS)}")
    return name


def similarity(engine, embeddings1, embeddings2) -> torch.Tensor:
    """Similarity of every row of ``embeddings1`` with every row of ``embeddings2``: an (n1, n2) float tensor, as
    ``SentenceTransformer.similarity``, by ``engine.similarity_fn_name`` ("cosine" by default; "dot",
    "euclidean" and "manhattan" as in sentence-transformers, the distances negated). A 1-D input is one row."""
    fn = _similarity_fn(engine)
    a, b = _float_rows(embeddings1, "embeddings1"), _float_rows(embeddings2, "embeddings2")
    a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"similarity needs (n, dim) or (dim,) embeddings of one width; got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if fn == "cosine":
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    if fn == "dot":
        return a @ b.T
    return -torch.cdist(a, b, p=2.0 if fn == "euclidean" else 1.0)


def similarity_pairwise(engine, embeddings1, embeddings2) -> torch.Tensor:
    """Similarity of ``embeddings1[i]`` with ``embeddings2[i]``: an (n,) float tensor
    (``SentenceTransformer.similarity_pairwise``), by ``engine.similarity_fn_name``."""
    fn = _similarity_fn(engine)
    a, b = _float_rows(embeddings1, "embeddings1"), _float_rows(embeddings2, "embeddings2")
    if a.shape != b.shape or a.dim() not in (1, 2):
        raise ValueError(f"similarity_pairwise needs two (n, dim) (or (dim,)) embeddings of the same shape; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if fn == "cosine":
        return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)
    if fn == "dot":
        return (a * b).sum(-1)
    return -(a - b).abs().pow(2).sum(-1).sqrt() if fn == "euclidean" else -(a - b).abs().sum(-1)


# ---- helpers ---------------------------------------------------------------------------------------
def _one_input(inputs, kwargs):
    """The texts, given as ``inputs`` (positional or keyword), ``sentences=`` or ``texts=``: exactly one."""
    given = {name: kwargs.pop(name) for name in _INPUT_NAMES[1:] if name in kwargs}
    if inputs is not None:
        given = {"inputs": inputs, **given}
    if len(given) != 1:
        raise TypeError(f"encode() takes the texts once, as inputs (or its older names sentences / texts); got "
                        f"{list(given) or 'none'}")
    return next(iter(given.values()))


def _check_device(engine, device):
    """``device``: None, or the engine's own device; lists (ST's multi-process encoding) and other devices are
    refused, naming the engine's device."""
    if device is None:
        return
    if isinstance(device, (list, tuple)):  # ST's multi-process form: the value is refused, not its type
        raise ValueError(  # noqa: TRY004
            f"device={device!r}: multi-process encoding over a list of devices is not supported; an Engine runs on "
            f"one device ({engine.device}); build one Engine per device")
    try:
        want = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device; this engine runs on {engine.device}") from None
    have = engine.device
    same_index = want.index is None or have.index is None or want.index == have.index
    if want.type != have.type or not same_index:
        raise ValueError(f"device={device!r}, but this engine was loaded on {have} and stays there; pass "
                         f"device=None or {str(have)!r}, or build Engine(path, device={str(want)!r})")


def _embed_capped(engine, items, batch_size, show_progress_bar, kw):
    """``engine.embed(items, **kw)`` as float32 (N, K), at most ``batch_size`` texts per call (each call still
    splits by the token budget). Chunks are taken longest text first, as ST does; the order is restored."""
    n = len(items)
    if batch_size is None or n <= batch_size:
        return engine.embed(items, show_progress_bar=show_progress_bar, **kw)
    order = sorted(range(n), key=lambda i: -len(items[i]))
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    show = bool(show_progress_bar) if show_progress_bar is not None else len(chunks) > 8 and n > 64
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="text", desc="embed")
    out = None
    try:
        for chunk in chunks:
            try:
                part = engine.embed([items[i] for i in chunk], show_progress_bar=False, **kw)
            except ValueError as e:
                # a text-level error names its index within the chunk: check the whole input for the real one
                policy = resolve_overflow(kw["overflow"], kw["truncate"])
                if policy != "chunk":
                    engine._encode([engine._prefix(kw["prompt_name"], kw["prompt"]) + t for t in items],
                                   policy == "truncate")
                    raise
                raise ValueError(_renamed(str(e), chunk)) from None  # a window that cannot hold the overlap
            except FloatingPointError as e:  # "non-finite embedding for texts[2, 5] ...": chunk positions
                raise FloatingPointError(_renamed(str(e), chunk)) from None
            if out is None:
                out = np.empty((n, part.shape[1]), dtype=np.float32)
            out[chunk] = part
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out


def _renamed(message, chunk):
    """``message`` with its first ``texts[i, j]`` naming positions in the whole input instead of in ``chunk``."""
    return _NAMED_TEXTS.sub(lambda m: "texts[" + ", ".join(str(chunk[int(i)]) for i in m.group(1).split(",")) + "]",
                            message, count=1)


def _to_precision(x, precision):
    """float32 (N, K) → ``precision`` as ``SentenceTransformer.encode`` applies it, after every batch."""
    if precision not in ("int8", "uint8"):
        return x if precision == "float32" else quantize(x, precision)
    n, k = x.shape
    if n == 0:
        return np.zeros((0, k), dtype=np.int8 if precision == "int8" else np.uint8)
    if n == 1:
        raise ValueError(f"precision={precision!r} calibrates each dimension's range on the embeddings of this call, "
                         f"and one text gives no range (sentence-transformers refuses it too); embed more texts at "
                         f"once, or embed in float32 and quantize with ranges from a representative set")
    if n < 100:
        log.warning("computing %s quantization ranges from only %d embeddings (as sentence-transformers does); "
                    "more texts per call give steadier buckets", precision, n)
    # sentence_transformers.quantization.quantize_embeddings with ranges from the batch itself
    starts, ends = x.min(axis=0), x.max(axis=0)
    steps = (ends - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    q = np.clip(np.floor((x - starts) / steps), 0, 255)
    return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)


def _float_rows(x, name) -> torch.Tensor:
    """Embeddings (numpy, torch, or a list of vectors/rows) as a float tensor; integer codes are refused."""
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(v, torch.Tensor) for v in x):
            x = torch.stack(list(x))
        elif x and all(isinstance(v, np.ndarray) for v in x):
            x = np.stack(x)
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}: similarity takes float embeddings (binary / int8 codes are "
                        f"compared with jv5fast.HammingIndex or after dequantizing)")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
