"""Output precisions (sentence-transformers' ``quantize_embeddings`` rules, model-spec.md §8).

float32 / float16: a cast. ubinary: ``np.packbits(x > 0, axis=-1)`` — strictly greater than zero, MSB
first, tail zero-padded. binary: ubinary − 128 as int8 (ubinary XOR 0x80 per byte), so Hamming
distances are identical for the two.
"""
from __future__ import annotations

import numpy as np
import torch

PRECISIONS = ("float32", "float16", "binary", "ubinary")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {list(PRECISIONS)}")
    return precision


def output_layout(dim: int, precision: str) -> tuple:
    """(row width, numpy dtype) of ``dim``-wide embeddings in ``precision`` (binary ones pack 8 dims a byte)."""
    packed = precision in ("binary", "ubinary")
    return ((dim + 7) // 8 if packed else dim,
            {"float32": np.float32, "float16": np.float16, "binary": np.int8, "ubinary": np.uint8}[precision])


def quantize(embeddings, precision: str):
    """Convert float embeddings (N, K) or (K,) — numpy or torch — to ``precision``; returns numpy."""
    check_precision(precision)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().cpu().numpy()
    x = np.asarray(embeddings)
    if x.dtype.kind != "f":
        raise TypeError(f"quantize expects float embeddings, got dtype {x.dtype}")
    if precision == "float32":
        return x.astype(np.float32, copy=False)
    if precision == "float16":
        return x.astype(np.float16)
    packed = np.packbits(x > 0, axis=-1)
    if precision == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)
