"""The one dispatch point between model code and kernels.

Model code calls only ``jv5fast.ops.<op>``. Each op picks the Triton kernel from ``jv5fast.kernels``
when its tensors are on CUDA and Triton imports, and the plain-PyTorch ``*_ref`` otherwise.
``JV5FAST_BACKEND=torch`` forces the references, ``JV5FAST_BACKEND=triton`` forces the kernels
(on CPU that needs ``TRITON_INTERPRET=1`` set before the kernels are imported).

Shape letters used across jv5fast: B sequences, T packed tokens, S max sequence length, H / Hkv
query / key-value heads, D head dim, E embedding (hidden) dim, F SwiGLU width, W packed bytes.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from .kernels.attention import attention_last_ref, attention_varlen_ref
from .kernels.pooling import pack_bits_ref, pool_ref
from .kernels.rmsnorm import rms_norm_ref
from .kernels.rope import rope_ref, rope_tables  # noqa: F401  (rope_tables re-exported for the models)
from .kernels.swiglu import swiglu_ref

_BACKENDS = ("auto", "torch", "triton")
_triton_cache: dict = {}


def backend() -> str:
    b = os.environ.get("JV5FAST_BACKEND", "auto").strip().lower() or "auto"
    if b not in _BACKENDS:
        raise ValueError(f"JV5FAST_BACKEND={b!r} is not valid; choose one of {list(_BACKENDS)}")
    return b


def _triton_fn(module: str, name: str):
    """The Triton implementation ``jv5fast.kernels.<module>.<name>``, or None if unavailable."""
    key = (module, name)
    if key not in _triton_cache:
        fn = None
        try:
            import triton  # noqa: F401
            fn = getattr(importlib.import_module(f"{__package__}.kernels.{module}"), name, None)
        except ImportError:
            fn = None
        _triton_cache[key] = fn
    return _triton_cache[key]


def uses_triton(device) -> bool:
    """Whether ops on tensors on ``device`` run the Triton kernels (under the current JV5FAST_BACKEND)."""
    b = backend()
    if b == "torch" or _triton_fn("attention", "attention_varlen") is None:
        return False
    return b == "triton" or str(device).startswith("cuda")


def _pick(module: str, name: str, ref, x):
    b = backend()
    if b == "torch":
        return ref
    fn = _triton_fn(module, name)
    if b == "triton":
        if fn is None:
            raise RuntimeError(f"JV5FAST_BACKEND=triton but jv5fast.kernels.{module}.{name} is unavailable "
                               f"(is triton installed?)")
        return fn
    return fn if (fn is not None and x.is_cuda) else ref


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale=None):
    """q (T, H, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int32 -> (T, H, D); differentiable."""
    fn = _pick("attention", "attention_varlen", attention_varlen_ref, q)
    return fn(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)


def attention_last(q_last, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None):
    """q_last (B, H, D): each sequence's last query row; k/v (T, Hkv, D) -> (B, H, D). Inference only."""
    fn = _pick("attention", "attention_last", attention_last_ref, q_last)
    return fn(q_last, k, v, cu_seqlens, max_seqlen, softmax_scale=softmax_scale)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last axis; with ``residual`` returns (norm(x + residual), x + residual)."""
    return _pick("rmsnorm", "rms_norm", rms_norm_ref, x)(x, weight, eps, residual)


def rope(x, cos, sin, position_ids, norm_weight=None, eps=1e-6):
    """Rotate-half RoPE on x (T, H, D) at ``position_ids`` (T,), optionally after a per-head RMSNorm."""
    return _pick("rope", "rope", rope_ref, x)(x, cos, sin, position_ids, norm_weight, eps)


def swiglu(gate_up):
    """gate_up (T, 2F) = [gate | up] -> silu(gate) * up (T, F)."""
    return _pick("swiglu", "swiglu", swiglu_ref, gate_up)(gate_up)


def pool(hidden, cu_seqlens, *, mode="last", truncate_dim=None, normalize=True):
    """hidden (T, E) -> (B, E') fp32: pool (last | cls | mean), truncate, L2-normalize."""
    fn = _pick("pooling", "pool", pool_ref, hidden)
    return fn(hidden, cu_seqlens, mode=mode, truncate_dim=truncate_dim, normalize=normalize)


def pool_last(hidden, cu_seqlens, *, truncate_dim=None, normalize=True):
    """Last token of each sequence (T, E) -> (B, E') fp32, truncated and L2-normalized."""
    return pool(hidden, cu_seqlens, mode="last", truncate_dim=truncate_dim, normalize=normalize)


def pack_bits(v):
    """(B, K) -> (B, ceil(K/8)) uint8 in np.packbits(v > 0) order."""
    return _pick("pooling", "pack_bits", pack_bits_ref, v)(v)


# ---- linear: oneDNN-prepacked weights on CPU -----------------------------------------------------------
# On CPU, F.linear re-reads the fp32 weight in its row-major layout on every call, which at the few rows of a
# query batch streams at ~5 GB/s; a weight reordered once into oneDNN's blocked layout runs the same GEMM
# 2-4x faster at M <= 64 (measured: 768 -> 6144 at M = 1 / 20: 1.19 -> 0.29 ms / 3.5 -> 1.7 ms, 2 cores)
# and no slower at M = 512. The results are fp32 GEMMs either way (another summation order only).


def pack_linear(weight):
    """A oneDNN-prepacked copy of a (out, in) fp32 CPU weight for ``linear``, or None where that does not
    apply (another device or dtype, a weight that needs gradients, no oneDNN, JV5FAST_CPU_PACK=0)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.requires_grad
            or not torch.backends.mkldnn.is_available() or os.environ.get("JV5FAST_CPU_PACK", "1") == "0"):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)
    except (RuntimeError, AttributeError):  # a torch build without these ops
        return None


def linear(x, weight, packed=None):
    """x (M, in) @ weight (out, in)^T -> (M, out); ``packed`` (from ``pack_linear(weight)``) runs oneDNN's
    prepacked GEMM on CPU. Inference only: the packed path has no autograd."""
    if packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    return F.linear(x, weight)
