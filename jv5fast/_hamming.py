"""CPU Hamming search and sign-bit packing: the C++ extension ``jv5fast._C`` with a numpy fallback.

Codes are uint8 rows in np.packbits order (MSB-first), the sentence-transformers ``ubinary``
precision. int8 ``binary`` codes (``ubinary - 128``) are converted to ubinary bytes (XOR 0x80), so
both encodings may be mixed and give the same distances. Search results follow faiss
``IndexBinaryFlat``: D int32 ascending, ties by smaller id, I int64, k > N padded with
(INT32_MAX, -1).

Backend: the extension when it was built, else numpy. ``JV5FAST_NO_EXT=1`` (the same switch that
skips building it) or ``backend="numpy"`` forces the fallback; ``JV5FAST_HAMMING_SIMD`` =
auto | avx512 | avx2 | scalar picks the extension's popcount kernel (runtime dispatch: ``auto`` takes
AVX-512 VPOPCNTDQ, else AVX2, else the scalar 64-bit popcount; naming one the CPU lacks is an error).
"""
from __future__ import annotations

import os

import numpy as np

try:  # the optional C++ extension
    from . import _C  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: numpy fallback
    _C = None

INT32_MAX = np.iinfo(np.int32).max
BACKENDS = ("auto", "cpp", "numpy")


def has_extension() -> bool:
    return _C is not None


def resolve_backend(backend: str | None = None) -> str:
    """'cpp' or 'numpy' for an ``auto`` / None / explicit choice (explicit 'cpp' without _C is an error)."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and _C is None:
        raise RuntimeError("backend='cpp' requested but jv5fast._C was not built (reinstall with a C++ compiler)")
    if backend == "auto":
        use_ext = _C is not None and os.environ.get("JV5FAST_NO_EXT", "") in ("", "0")
        backend = "cpp" if use_ext else "numpy"
    return backend


SIMD_CHOICES = ("auto", "avx512", "avx2", "scalar")


def simd_from_env() -> str:
    """JV5FAST_HAMMING_SIMD, checked here so that a typo or a kernel this CPU lacks names the variable."""
    simd = os.environ.get("JV5FAST_HAMMING_SIMD", "auto").strip().lower() or "auto"
    if simd not in SIMD_CHOICES:
        raise ValueError(f"JV5FAST_HAMMING_SIMD={simd!r} is not valid; choose one of {list(SIMD_CHOICES)} "
                         f"(or unset it)")
    if simd != "auto" and _C is not None and simd not in simd_kernels():
        raise ValueError(f"JV5FAST_HAMMING_SIMD={simd!r}, but this CPU runs only {simd_kernels()}; "
                         f"unset it or choose one of those")
    return simd


def simd_kernels() -> list[str]:
    """Popcount kernels of the extension this CPU can run, best first (e.g. ['avx512', 'avx2', 'scalar'])."""
    return list(_C.simd_available()) if _C is not None else []


def default_threads() -> int:
    if _C is not None:
        return int(_C.num_threads())
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# Input checks


def as_codes(codes, nbytes: int | None, what: str = "codes") -> np.ndarray:
    """Validate and normalize packed codes to a C-contiguous uint8 (n, nbytes) array.

    Accepts numpy arrays or torch tensors of dtype uint8 (ubinary) or int8 (binary, converted by XOR
    0x80). A 1-D array is one code. Anything else is a ValueError naming the problem.
    """
    if hasattr(codes, "detach") and hasattr(codes, "cpu"):  # torch.Tensor, without importing torch
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.dtype == np.int8:
        codes = codes.view(np.uint8) ^ np.uint8(0x80)  # binary -> ubinary bytes
    elif codes.dtype != np.uint8:
        raise ValueError(
            f"{what} must be packed binary codes of dtype uint8 (ubinary) or int8 (binary), got {codes.dtype}; "
            "pack float embeddings with jv5fast.quantize(x, 'ubinary') or use EmbeddingIndex"
        )
    if codes.ndim == 1:
        codes = codes[None, :]
    if codes.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, nbytes), got shape {tuple(codes.shape)}")
    if nbytes is not None and codes.shape[1] != nbytes:
        raise ValueError(
            f"{what} have {codes.shape[1]} bytes per row ({codes.shape[1] * 8} bits) but the index holds "
            f"{nbytes}-byte ({nbytes * 8}-bit) codes"
        )
    return np.ascontiguousarray(codes)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return int(k)


def check_threads(threads) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads <= 0:
        raise ValueError(f"threads must be a positive integer or None (all cores), got {threads!r}")
    return int(threads)


# ----------------------------------------------------------------------------------------------
# Search


def hamming_topk_numpy(queries: np.ndarray, corpus: np.ndarray, k: int, block_bytes: int = 1 << 25):
    """Exact top-k by numpy ``bitwise_count``, corpus in blocks (memory ~block_bytes), same rules as _C.

    Each (distance, id) pair is folded into one int64 key ``d * (N + 1) + id``; keys are unique and
    order exactly like (distance, id), so argpartition + sort gives the faiss tie rule.
    """
    nq, nb = queries.shape
    n = corpus.shape[0]
    if k > n:  # only n results exist: search for n, pad the rest (faiss: INT32_MAX / -1)
        D = np.full((nq, k), INT32_MAX, dtype=np.int32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if n:
            D[:, :n], I[:, :n] = hamming_topk_numpy(queries, corpus, n, block_bytes)
        return D, I
    if nq > 256:  # bound the (Q, rows) block and the partition work
        parts = [hamming_topk_numpy(queries[i : i + 256], corpus, k, block_bytes) for i in range(0, nq, 256)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    # View rows as the widest words that divide them (distances do not depend on the grouping).
    wdt = next(t for t, s in ((np.uint64, 8), (np.uint32, 4), (np.uint16, 2), (np.uint8, 1)) if nb % s == 0)
    q = queries.view(wdt)
    c = corpus.view(wdt)
    sentinel = np.iinfo(np.int64).max
    best = np.full((nq, k), sentinel, dtype=np.int64)
    rows = max(1, block_bytes // max(1, nq * q.shape[1] * 8))
    for c0 in range(0, n, rows):
        cb = c[c0 : c0 + rows]
        d = np.bitwise_count(q[:, None, :] ^ cb[None, :, :]).sum(-1, dtype=np.int64)  # (Q, rows)
        keys = np.concatenate([best, d * (n + 1) + np.arange(c0, c0 + cb.shape[0], dtype=np.int64)], axis=1)
        if keys.shape[1] > k:
            keys = np.partition(keys, k - 1, axis=1)[:, :k]
        best = keys
    best.sort(axis=1)
    pad = best == sentinel
    D = np.where(pad, INT32_MAX, best // (n + 1)).astype(np.int32)
    I = np.where(pad, -1, best % (n + 1)).astype(np.int64)
    return D, I


def hamming_topk(queries, corpus, k: int, threads: int | None = None, backend: str | None = None):
    """Exact Hamming top-k of uint8 queries (Q, B) against uint8 corpus (N, B) -> (D int32, I int64)."""
    corpus = as_codes(corpus, None, "corpus")
    queries = as_codes(queries, corpus.shape[1], "queries")
    k = check_k(k)
    threads = check_threads(threads)
    if resolve_backend(backend) == "cpp":
        return _C.hamming_topk(queries, corpus, k, threads, simd_from_env())
    return hamming_topk_numpy(queries, corpus, k)


# ----------------------------------------------------------------------------------------------
# Sign-bit packing


def pack_signs(x, backend: str | None = None) -> np.ndarray:
    """``np.packbits(x > 0, axis=-1)`` for float (n, dim) embeddings -> uint8 (n, ceil(dim/8)).

    float32 and float16 run in C++ when the extension exists; bfloat16 tensors are widened to float32
    (exact); float64 stays in numpy (a cast to float32 would flush tiny values to zero).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) not in ("torch.float32", "torch.float16"):
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"embeddings must be floating point, got dtype {x.dtype}")
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, dim), got shape {tuple(x.shape)}")
    if resolve_backend(backend) == "cpp" and x.dtype in (np.float16, np.float32):
        if x.dtype == np.float16:
            out = _C.pack_signs_f16(np.ascontiguousarray(x).view(np.uint16))
        else:
            out = _C.pack_signs_f32(np.ascontiguousarray(x, dtype=np.float32))
    else:
        out = np.packbits(x > 0, axis=-1)
    return out[0] if squeeze else out
