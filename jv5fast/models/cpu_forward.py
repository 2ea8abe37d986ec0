"""The backbone's inference forward on CPU in fp32 as one loop of jv5fast._C calls over numpy buffers.

``Backbone.forward`` runs this where every op it needs has a fused CPU kernel (csrc/: RMSNorm with the
residual add, RoPE with Qwen3's q/k norm, SwiGLU and short-sequence varlen attention) and every projection is
prepacked, for jv5fast's GEMM (csrc/sgemm.cpp) or oneDNN's (called through torch on the same buffers), as
the engine measured per shape (jv5fast/cpu_tuning.py).
The ops, their order and their inputs are those of ``Backbone.hidden_states`` with the fused kernels, so
the result is the same to the bit; what goes is the per-op torch work around each kernel call (tensor
views, ``.numpy()``, empty tensors, dtype and device checks, environment lookups), ~100 calls per layer
that cost ~3 ms of a 30 ms nano query on a 2-core CPU.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..batching import PackedBatch

_KERNELS = ("sgemm", "rms_norm", "rope", "swiglu", "attention")


def ready(bb) -> bool:
    """Whether ``forward`` applies to this backbone for short enough batches: fp32 weights on CPU, every
    projection packed (either GEMM), the fused kernels built here, not turned off (JV5FAST_BACKEND) and each
    measured faster than its reference (``Backbone.fused_choice``)."""
    if bb.device.type != "cpu" or bb.dtype != torch.float32 or bb.packed is None:
        return False
    if ops.backend() != "auto" or bb.args.head_dim > 1024:
        return False
    ext = ops._cpu_ext()
    if ext is None or not all(hasattr(ext, name) for name in _KERNELS):
        return False
    if not all(p is not None for p in bb.packed.values()):
        return False
    if not bb.fused_choice or not all(ops.fused_kind(c.op, c.key) == "jv5fast" for c in bb.fused_choice):
        return False  # not chosen, or a reference measured faster here for some op: the op-by-op path runs it
    last = len(bb.layers) - 1
    return all((i, name) in bb.packed for i in range(last + 1) for name in ("wqkv", "wo", "w13", "w2")) and (
        (last, "wq") in bb.packed and (last, "wkv") in bb.packed)


def usable(bb, batch: PackedBatch) -> bool:
    """Whether ``forward`` applies to ``batch``: ``ready(bb)``, sequences short enough for the attention
    kernel, and the batch's index dtypes as PackedBatch makes them."""
    return (ready(bb) and batch.input_ids.device.type == "cpu" and 0 < batch.max_seqlen <= ops.CPU_ATTENTION_MAX_SEQLEN
            and batch.position_ids.dtype == torch.int64 and batch.cu_seqlens.dtype == torch.int32)


def forward(bb, batch: PackedBatch, last_only: bool, between=None) -> torch.Tensor:
    """``Backbone.hidden_states(batch, last_only)`` with the fused CPU kernels; (T, E) or (B, E) fp32."""
    ext = ops._cpu_ext()
    threads = torch.get_num_threads()
    a = bb.args
    D, H, Hkv, eps = a.head_dim, a.num_heads, a.num_kv_heads, a.rms_norm_eps
    dq, dkv = H * D, Hkv * D
    scale = D ** -0.5
    cos, sin = (t.contiguous().numpy() for t in bb.rope_tables(batch.max_seqlen))
    pos = batch.position_ids.contiguous().numpy()
    cu = batch.cu_seqlens.contiguous().numpy()
    packed = bb.packed

    def linear(x, i, name):
        p = ops.for_rows(packed[(i, name)], x.shape[0])
        if p.kind != "jv5fast":  # ops.linear's oneDNN call on the same (contiguous) rows: the same bits
            return ops.linear(torch.from_numpy(np.ascontiguousarray(x)), None, p).numpy()
        out = np.empty((x.shape[0], p.out_features), dtype=np.float32)
        ext.sgemm(x, p.data, out, threads)
        return out

    def rope(x, rows_pos, norm):
        y = np.empty(x.shape, dtype=np.float32)
        ext.rope(x, cos, sin, rows_pos, None if norm is None else norm.numpy(), eps, y, threads)
        return y

    x = F.embedding(batch.input_ids, bb.embed).numpy()  # (T, E), a new array: ours to overwrite
    T = x.shape[0]
    residual = None
    n_layers = len(bb.layers)
    for n, layer in enumerate(bb.layers):
        h = np.empty_like(x)
        if residual is None:
            ext.rms_norm(x, None, layer["attn_norm"].numpy(), eps, h, None, threads)
            residual = x
        else:  # residual += x in place (the kernel reads and writes each element once, in that order)
            ext.rms_norm(x, residual, layer["attn_norm"].numpy(), eps, h, residual, threads)
        if last_only and n == n_layers - 1:
            last = cu[1:].astype(np.int64) - 1                              # (B,)
            kv = linear(h, n, "wkv")                                        # (T, 2 dkv)
            k = rope(kv[:, :dkv].reshape(T, Hkv, D), pos, layer.get("k_norm"))
            v = np.ascontiguousarray(kv[:, dkv:]).reshape(T, Hkv, D)
            q = linear(h[last], n, "wq").reshape(-1, H, D)                  # (B, H, D)
            q = rope(q, pos[last], layer.get("q_norm"))
            o = np.empty_like(q)
            ext.attention(q, k, v, cu, True, True, scale, o, threads)
            residual = residual[last]
        else:
            qkv = linear(h, n, "wqkv")                                      # (T, dq + 2 dkv)
            q = rope(qkv[:, :dq].reshape(T, H, D), pos, layer.get("q_norm"))
            k = rope(qkv[:, dq:dq + dkv].reshape(T, Hkv, D), pos, layer.get("k_norm"))
            v = np.ascontiguousarray(qkv[:, dq + dkv:]).reshape(T, Hkv, D)
            o = np.empty_like(q)
            ext.attention(q, k, v, cu, bool(a.causal), False, scale, o, threads)
        x = linear(o.reshape(o.shape[0], dq), n, "wo")                      # (T or B, E)
        h = np.empty_like(x)
        ext.rms_norm(x, residual, layer["mlp_norm"].numpy(), eps, h, residual, threads)
        gate_up = linear(h, n, "w13")
        act = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=np.float32)
        ext.swiglu(gate_up, act, threads)
        x = linear(act, n, "w2")
        if between is not None and n < n_layers - 1:
            between()
    out = np.empty_like(x)
    ext.rms_norm(x, residual, bb.norm.numpy(), eps, out, residual, threads)
    return torch.from_numpy(out)
