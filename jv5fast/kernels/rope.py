"""Rotate-half (NeoX) RoPE over packed tokens, optionally preceded by a per-head RMSNorm (Qwen3 QK-norm).

cos/sin are (P, D) fp32 tables built as [phi, phi] with phi[p, j] = p * theta^(-2j/D); each token
reads row ``position_ids[t]`` (positions restart at 0 for every sequence of a packed batch).
As in the HF reference, the tables are cast to the activation dtype before they are applied.
"""
from __future__ import annotations

import torch

from .rmsnorm import rms_norm_ref


def rope_tables(theta, head_dim, n_positions, device=None):
    """(P, D) fp32 cos and sin tables, computed the way the HF reference does (fp32 throughout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(n_positions, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_ref(x, cos, sin, position_ids, norm_weight=None, eps=1e-6):
    """x (T, H, D) -> (T, H, D). With ``norm_weight`` (D,), RMSNorm each head vector first."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    c = cos.index_select(0, position_ids).to(x.dtype)[:, None, :]  # (T, 1, D)
    s = sin.index_select(0, position_ids).to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rot * s


# ----------------------------------------------------------------------------------------------
# Triton kernels. Grid (cdiv(T, BLOCK_T), H): a (BLOCK_T, BLOCK_D) tile of one head; the rotate-half
# partner is a second load at column (d + D/2) mod D, so no shuffles are needed. With a norm weight,
# the per-head RMSNorm runs first in fp32 (rounded to the activation dtype before the weight, as the
# reference) and the normalized vector never leaves registers; 1/rms (H, T) is kept for backward.
# Backward, with out = xn * c + R(xn) * s and R(u)[d] = -u[d + D/2] (d < D/2), u[d - D/2] (else):
#   dxn[j] = dout[j] c[j] + sgn(j) dout[p(j)] s[p(j)],  p(j) = (j + D/2) mod D,  sgn = +1 (j < D/2) else -1
#   and through the norm (u = x * rstd, xn = w * u):  dx = rstd (dxn w - u mean(dxn w u)),  dw = sum dxn u.
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

from ._common import new_output as _out  # noqa: E402


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T"])  # row count varies per batch: one compile
    def _rope_fwd_kernel(X, COS, SIN, POS, W, Y, RSTD, T, D, stride_xt, stride_xh, stride_yt, stride_yh,
                         stride_c, eps,
                         HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        half = D // 2
        partner = (offs_d + half) % D
        t_ok = offs_t < T
        mask = t_ok[:, None] & (offs_d[None, :] < D)
        rows = offs_t.to(tl.int64)
        x_row = X + rows[:, None] * stride_xt + h * stride_xh
        x = tl.load(x_row + offs_d[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_row + partner[None, :], mask=mask, other=0.0)
        dt = x.dtype
        if HAS_NORM:
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
            w = tl.load(W + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            w2 = tl.load(W + partner, mask=offs_d < D, other=0.0).to(tl.float32)
            xn = ((xf * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]).to(Y.dtype.element_ty)
            xn2 = ((x2.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * w2[None, :]).to(Y.dtype.element_ty)
            tl.store(RSTD + h * T + offs_t, rstd, mask=t_ok)
        else:
            xn = x
            xn2 = x2
        pos = tl.load(POS + offs_t, mask=t_ok, other=0).to(tl.int64)
        # Tables are cast to the activation dtype first, as in the reference.
        c = tl.load(COS + pos[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0)
        s = tl.load(SIN + pos[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0)
        c = c.to(Y.dtype.element_ty).to(tl.float32)
        s = s.to(Y.dtype.element_ty).to(tl.float32)
        rot = tl.where(offs_d[None, :] < half, -xn2.to(tl.float32), xn2.to(tl.float32))
        y = xn.to(tl.float32) * c + rot * s
        tl.store(Y + rows[:, None] * stride_yt + h * stride_yh + offs_d[None, :], y.to(Y.dtype.element_ty),
                 mask=mask)

    @triton.jit(do_not_specialize=["T"])  # row count varies per batch: one compile
    def _rope_bwd_kernel(DY, X, COS, SIN, POS, W, RSTD, DX, DW, T, D, stride_c,
                         HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # DY, X, DX are contiguous (T, H, D); DW partials are (programs, D) fp32.
        h = tl.program_id(1)
        H = tl.num_programs(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        half = D // 2
        partner = (offs_d + half) % D
        t_ok = offs_t < T
        mask = t_ok[:, None] & (offs_d[None, :] < D)
        row = offs_t.to(tl.int64)[:, None] * (H * D) + h * D
        pos = tl.load(POS + offs_t, mask=t_ok, other=0).to(tl.int64)
        dt = DX.dtype.element_ty
        dy = tl.load(DY + row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(DY + row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + pos[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0).to(dt).to(tl.float32)
        s2 = tl.load(SIN + pos[:, None] * stride_c + partner[None, :], mask=mask, other=0.0).to(dt).to(tl.float32)
        dxn = dy * c + tl.where(offs_d[None, :] < half, dy2 * s2, -dy2 * s2)
        if HAS_NORM:
            x = tl.load(X + row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + h * T + offs_t, mask=t_ok, other=0.0)
            w = tl.load(W + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            u = x * rstd[:, None]
            g = dxn * w[None, :]
            dx = rstd[:, None] * (g - u * (tl.sum(g * u, 1) / D)[:, None])
            pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            tl.store(DW + pid * D + offs_d, tl.sum(dxn * u, 0), mask=offs_d < D)
        else:
            dx = dxn
        tl.store(DX + row + offs_d[None, :], dx.to(dt), mask=mask)


def _block_t(D, device):
    import os
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 64
    return max(1, min(32, 4096 // triton.next_power_of_2(D)))


class RopeFunction(torch.autograd.Function):
    """y = rope(norm(x)); backward equations in the kernel header above (casts treated as identity)."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids, norm_weight, eps):
        T, H, D = x.shape
        if x.stride(-1) != 1:
            x = x.contiguous()
        out_dtype = x.dtype if norm_weight is None else torch.promote_types(norm_weight.dtype, x.dtype)
        y = _out((T, H, D), out_dtype, x.device)
        rstd = _out((H, T), torch.float32, x.device) if norm_weight is not None else y
        BT = _block_t(D, x.device)
        _rope_fwd_kernel[(triton.cdiv(T, BT), H)](
            x, cos, sin, position_ids, norm_weight if norm_weight is not None else cos, y, rstd, T, D,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0), float(eps),
            HAS_NORM=norm_weight is not None, BLOCK_T=BT, BLOCK_D=triton.next_power_of_2(D))
        if norm_weight is not None:
            ctx.save_for_backward(x, cos, sin, position_ids, norm_weight, rstd)
        else:
            ctx.save_for_backward(cos, sin, position_ids)
        ctx.has_norm = norm_weight is not None
        ctx.shape = (T, H, D)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        T, H, D = ctx.shape
        if ctx.has_norm:
            x, cos, sin, pos, w, rstd = ctx.saved_tensors
            x = x.contiguous()
        else:
            cos, sin, pos = ctx.saved_tensors
            x = w = rstd = dy
        dy = dy.contiguous()
        BT = _block_t(D, dy.device)
        grid = (triton.cdiv(T, BT), H)
        dx = _out((T, H, D), ctx.x_dtype, dy.device)
        dw = _out((grid[0] * H, D), torch.float32, dy.device) if ctx.has_norm else dx
        _rope_bwd_kernel[grid](dy, x, cos, sin, pos, w, rstd, dx, dw, T, D, cos.stride(0),
                               HAS_NORM=ctx.has_norm, BLOCK_T=BT, BLOCK_D=triton.next_power_of_2(D))
        dw = dw.sum(0).to(w.dtype) if ctx.has_norm else None
        return dx, None, None, None, dw, None


def rope(x, cos, sin, position_ids, norm_weight=None, eps=1e-6):
    """Triton RoPE (optionally fused with per-head RMSNorm); the contract of ``rope_ref``. Differentiable
    in x and norm_weight. x (T, H, D) with D even; cos/sin (P, D) fp32; position_ids (T,) int."""
    if not HAS_TRITON:
        raise RuntimeError("rope needs Triton; use rope_ref")
    if x.dim() != 3 or x.shape[-1] % 2 or cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"x must be (T, H, D) with even D matching the tables; got {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}")
    cos = cos.to(device=x.device, dtype=torch.float32).contiguous()
    sin = sin.to(device=x.device, dtype=torch.float32).contiguous()
    position_ids = position_ids.to(x.device).contiguous()
    return RopeFunction.apply(x, cos, sin, position_ids, norm_weight, float(eps))
