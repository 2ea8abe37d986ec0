"""RMSNorm, optionally fused with the residual add that precedes it.

y = w * cast(x / sqrt(mean(x^2) + eps)), computed in fp32 and cast back to the activation dtype
before the weight multiply (the Qwen3 / EuroBERT / Llama convention; no 1 + w offset).
With ``residual``: h = x + residual, y = rmsnorm(h), and h is returned as the new residual stream.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x, weight, eps, residual=None):
    """Returns y, or (y, h) when ``residual`` is given. Shapes (..., N); weight (N,)."""
    h = x if residual is None else x + residual
    u = h.float()
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * u.to(h.dtype)
    return y if residual is None else (y, h)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Each program normalizes ROWS rows of a (M, N) view held whole in registers
# (BLOCK_N = next power of two >= N, masked), fp32 statistics. The forward keeps the per-row
# 1/rms (M,) fp32 for backward; dW is reduced per program into (programs, N) fp32 and summed after.
# Backward, with u = h * rstd and g = dy * w:  dh = rstd * (g - u * mean(g * u)),  dw = sum_rows dy * u;
# with a fused residual, dx = dresidual = dh + dh_out (the gradient of the returned stream).
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

from ._common import new_output as _out  # noqa: E402


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])  # row count varies per batch: one compile
    def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, M, N, eps,
                             HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0)
        if HAS_RES:
            # The residual stream is rounded to the activation dtype, as the reference's x + residual.
            x = (x.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(H + offs, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, 1) / N + eps)
        u = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(Y + offs, (u * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < M)

    @triton.jit(do_not_specialize=["M"])  # row count varies per batch: one compile
    def _rms_norm_bwd_kernel(DY, DHO, H, W, RSTD, DX, DW, M, N,
                             HAS_DHO: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        u = h * rstd[:, None]
        g = dy * w[None, :]
        dh = rstd[:, None] * (g - u * (tl.sum(g * u, 1) / N)[:, None])
        if HAS_DHO:
            dh += tl.load(DHO + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW + pid * N + cols, tl.sum(dy * u, 0), mask=cols < N)


def _rows_per_program(N, device):
    import os
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 32  # the interpreter pays per program
    return max(1, min(16, 4096 // triton.next_power_of_2(N)))


def _rms_norm_fwd(x2, r2, weight, eps):
    M, N = x2.shape
    out_dtype = torch.promote_types(weight.dtype, x2.dtype)
    y = _out((M, N), out_dtype, x2.device)
    h = _out((M, N), x2.dtype, x2.device) if r2 is not None else x2
    rstd = _out((M,), torch.float32, x2.device)
    ROWS = _rows_per_program(N, x2.device)
    BLOCK_N = triton.next_power_of_2(N)
    _rms_norm_fwd_kernel[(triton.cdiv(M, ROWS),)](
        x2, r2 if r2 is not None else x2, weight, y, h, rstd, M, N, float(eps),
        HAS_RES=r2 is not None, ROWS=ROWS, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 2048 else 8)
    return y, h, rstd


def _rms_norm_bwd(dy2, dho2, h2, weight, rstd):
    M, N = h2.shape
    ROWS = _rows_per_program(N, h2.device)
    BLOCK_N = triton.next_power_of_2(N)
    grid = triton.cdiv(M, ROWS)
    dx = _out((M, N), h2.dtype, h2.device)
    dw_part = _out((grid, N), torch.float32, h2.device)
    _rms_norm_bwd_kernel[(grid,)](
        dy2, dho2 if dho2 is not None else dy2, h2, weight, rstd, dx, dw_part, M, N,
        HAS_DHO=dho2 is not None, ROWS=ROWS, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 2048 else 8)
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = w * cast(h * rstd), h = x (+ residual). Backward equations in the kernel header above;
    the cast to the activation dtype is treated as the identity."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        y, h, rstd = _rms_norm_fwd(x2, r2, weight.contiguous(), eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_res = residual is not None
        ctx.shape = shape
        y = y.view(shape)
        if residual is None:
            return y
        return y, h.view(shape)

    @staticmethod
    def backward(ctx, dy, dho=None):
        h, weight, rstd = ctx.saved_tensors
        N = ctx.shape[-1]
        dy2 = dy.reshape(-1, N).contiguous()
        dho2 = dho.reshape(-1, N).contiguous() if (ctx.has_res and dho is not None) else None
        dx, dw = _rms_norm_bwd(dy2, dho2, h, weight.contiguous(), rstd)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_res else None), None


def rms_norm(x, weight, eps, residual=None):
    """Triton RMSNorm with the contract of ``rms_norm_ref``: y, or (y, x + residual). Differentiable."""
    if not HAS_TRITON:
        raise RuntimeError("rms_norm needs Triton; use rms_norm_ref")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight, residual, float(eps))
