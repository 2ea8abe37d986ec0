"""SwiGLU activation on the fused gate/up projection output.

gate_up (T, 2F) holds [gate | up] along the last axis; out = silu(gate) * up, shape (T, F).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return F.silu(gate) * up
    return F.silu(gate).mul_(up)  # inference: one temporary fewer (a memory-bound op on CPU)


# ----------------------------------------------------------------------------------------------
# Triton kernels: elementwise over (BLOCK_T, BLOCK_F) tiles of the (T, 2F) input, fp32 math.
# Backward, with s = sigmoid(g):  d_gate = dout * up * s * (1 + g (1 - s)),  d_up = dout * g * s.
# ----------------------------------------------------------------------------------------------
import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

from ._common import new_output as _out  # noqa: E402


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T"])  # row count varies per batch: one compile
    def _swiglu_fwd_kernel(GU, OUT, T, F, stride_gu, stride_o, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows[:, None] < T) & (cols[None, :] < F)
        base = GU + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
        g = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + F, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(OUT + rows[:, None].to(tl.int64) * stride_o + cols[None, :], out.to(OUT.dtype.element_ty),
                 mask=mask)

    @triton.jit(do_not_specialize=["T"])  # row count varies per batch: one compile
    def _swiglu_bwd_kernel(GU, DO, DGU, T, F, stride_gu, stride_do, stride_dgu,
                           BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows[:, None] < T) & (cols[None, :] < F)
        r64 = rows[:, None].to(tl.int64)
        g = tl.load(GU + r64 * stride_gu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + r64 * stride_gu + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + r64 * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = do * u * s * (1.0 + g * (1.0 - s))
        du = do * g * s
        dt = DGU.dtype.element_ty
        tl.store(DGU + r64 * stride_dgu + cols[None, :], dg.to(dt), mask=mask)
        tl.store(DGU + r64 * stride_dgu + F + cols[None, :], du.to(dt), mask=mask)


def _blocks(device):
    import os
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 64, 256
    return 4, 1024


class SwiGLUFunction(torch.autograd.Function):
    """out = silu(gate) * up; backward equations in the kernel header above."""

    @staticmethod
    def forward(ctx, gate_up):
        shape = gate_up.shape
        gu = gate_up.reshape(-1, shape[-1])
        if gu.stride(-1) != 1:
            gu = gu.contiguous()
        T, F = gu.shape[0], shape[-1] // 2
        out = _out((T, F), gate_up.dtype, gate_up.device)
        BT, BF = _blocks(gu.device)
        _swiglu_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(F, BF))](
            gu, out, T, F, gu.stride(0), out.stride(0), BLOCK_T=BT, BLOCK_F=BF)
        ctx.save_for_backward(gu)
        ctx.shape = shape
        return out.view(*shape[:-1], F)

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        T, F = gu.shape[0], gu.shape[1] // 2
        do = dout.reshape(T, F).contiguous()
        dgu = _out((T, 2 * F), gu.dtype, gu.device)
        BT, BF = _blocks(gu.device)
        _swiglu_bwd_kernel[(triton.cdiv(T, BT), triton.cdiv(F, BF))](
            gu, do, dgu, T, F, gu.stride(0), do.stride(0), dgu.stride(0), BLOCK_T=BT, BLOCK_F=BF)
        return dgu.view(ctx.shape)


def swiglu(gate_up):
    """Triton SwiGLU with the contract of ``swiglu_ref``: (..., 2F) -> (..., F). Differentiable."""
    if not HAS_TRITON:
        raise RuntimeError("swiglu needs Triton; use swiglu_ref")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even; got {tuple(gate_up.shape)}")
    return SwiGLUFunction.apply(gate_up)
