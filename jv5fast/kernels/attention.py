"""Varlen attention over a packed batch.

q (T, H, D), k/v (T, Hkv, D) hold B sequences back to back; ``cu_seqlens`` (B+1,) int32 gives their
offsets and ``max_seqlen`` the longest. Query head h reads KV head h // (H // Hkv) (GQA).
out_h = softmax(q_h k_g^T * scale + M) v_g, M causal (within each sequence) or none.

``attention_varlen_ref`` is the plain-PyTorch reference: it scatters the packed tokens into a
(B, H, S, D) tensor only inside this function, runs ``scaled_dot_product_attention`` with a
key-padding mask and gathers the real rows back. Batches formed by the engine are length-sorted, so
the padding is small; when it would more than double the work, it loops over sequences instead.

Over 500 lines and one file on purpose: it is the one attention op in the style.md kernel file shape (refs →
Triton kernels → launchers → ``AttentionVarlenFunction`` → ``attention_varlen`` / ``attention_last``), and the
forward, the last-token forward and the two backward kernels share one tiling, online softmax and block config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_varlen(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k/v must be (T, Hkv, D) matching q (T, H, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor (B+1,) with B >= 1")


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale=None):
    """Reference varlen attention; differentiable through autograd. Returns (T, H, D) in q.dtype."""
    _check_varlen(q, k, v, cu_seqlens)
    T, H, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    B = lens.numel()
    S = int(max_seqlen)
    gqa = H != Hkv
    if B == 1:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=causal, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    if B * S > 2 * T:
        # Very ragged: padding would dominate, run each sequence on its own.
        cu_list = cu.tolist()
        outs = [attention_varlen_ref(q[s:e], k[s:e], v[s:e], cu.new_tensor([0, e - s]), e - s,
                                     causal=causal, softmax_scale=scale)
                for s, e in zip(cu_list[:-1], cu_list[1:])]
        return torch.cat(outs, 0)
    # Scatter into (B, S, ·, D), right-padded.
    seq_idx = torch.repeat_interleave(torch.arange(B, device=q.device), lens)  # (T,)
    pos = torch.arange(T, device=q.device) - cu[:-1][seq_idx]                   # (T,)
    flat = seq_idx * S + pos

    def pad(x):  # (T, h, D) -> (B, h, S, D)
        buf = x.new_zeros(B * S, x.shape[1], D)
        buf = buf.index_copy(0, flat, x)
        return buf.view(B, S, x.shape[1], D).transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    if causal:
        # Right padding + causal: a real query never sees a padded key.
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        key_ok = torch.arange(S, device=q.device)[None, :] < lens[:, None]       # (B, S)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_ok[:, None, None, :],
                                             scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B * S, H, D).index_select(0, flat)



def attention_last_ref(q_last, k, v, cu_seqlens, max_seqlen, softmax_scale=None):
    """Attention of each sequence's last query row over all of that sequence's keys.

    q_last (B, H, D) holds the query of token cu_seqlens[b+1]-1; k/v (T, Hkv, D) the packed keys.
    The last row sees every key of its sequence under both masks (causal and bidirectional), so this
    is exactly those rows of ``attention_varlen_ref`` — what a last-token-pooled model's final layer
    needs. Returns (B, H, D).
    """
    B, H, D = q_last.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    cu = cu_seqlens.to(device=k.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    T, S = k.shape[0], int(max_seqlen)
    if B * S > 2 * T:  # very ragged: one sequence at a time
        bounds = cu.tolist()
        return torch.cat([attention_last_ref(q_last[b:b + 1], k[s:e], v[s:e], cu.new_tensor([0, e - s]), e - s,
                                             scale) for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    seq_idx = torch.repeat_interleave(torch.arange(B, device=k.device), lens)
    flat = seq_idx * S + torch.arange(T, device=k.device) - cu[:-1][seq_idx]

    def pad(x):  # (T, Hkv, D) -> (B, Hkv, S, D)
        return x.new_zeros(B * S, Hkv, D).index_copy(0, flat, x).view(B, S, Hkv, D).transpose(1, 2)

    key_ok = torch.arange(S, device=k.device)[None, :] < lens[:, None]          # (B, S)
    out = F.scaled_dot_product_attention(q_last[:, :, None, :], pad(k), pad(v), attn_mask=key_ok[:, None, None, :],
                                         scale=scale, enable_gqa=H != Hkv)
    return out[:, :, 0, :]

# ----------------------------------------------------------------------------------------------
# Triton kernels (FlashAttention-2 algorithm, Dao 2023) over the packed batch.
#
# Forward grid (cdiv(max_seqlen, BLOCK_M), B, H): one program per (query block, sequence, head); a
# program whose block starts past its sequence's end exits at once. K/V tiles stream through SRAM with
# an online softmax in the log2 domain (exp2, scale * log2(e) folded in); the accumulator and the
# running max / sum are fp32. The only extra memory is the log-sum-exp, (H, T) fp32, kept for backward.
# Causal: key tiles left of the diagonal run without masks, the diagonal tiles with the mask, and
# tiles right of it are never visited. Backward (Dao 2023, alg. 2) uses two kernels and no atomics:
# dK/dV per (key block, sequence, KV head), looping over every query head of its GQA group (so the
# group sum stays in registers), and dQ per (query block, sequence, head).
# head_dim D is padded to BLOCK_D = next power of two (>= 16) with masked loads and stores.
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the reference above still works
    HAS_TRITON = False

_LOG2E = 1.4426950408889634
FLAT_MAX_SEQS = 1024  # forward: batches of up to this many sequences use the flat grid (one compile)
from ._common import new_output  # noqa: E402


def _out_like(x, shape=None, dtype=None):
    return new_output(x.shape if shape is None else shape, x.dtype if dtype is None else dtype, x.device)

if HAS_TRITON:

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
        """Fold one masked score tile s (rows, BLOCK_N; log2 units, -inf where masked) and its value tile
        into the running (acc, max, sum) of every row."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                        offs_m, offs_d, d_ok, seqlen, lo, hi, qk_scale,
                        MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]   # (BLOCK_D, BLOCK_N): K^T
            v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]   # (BLOCK_N, BLOCK_D)
            if MASKED:
                kt = tl.load(k_ptrs, mask=(cols[None, :] < seqlen) & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen) & d_ok[None, :], other=0.0)
            elif EVEN_D:
                kt = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale               # (BLOCK_M, BLOCK_N), log2 units
            if MASKED:
                ok = cols[None, :] < seqlen
                if CAUSAL:
                    ok = ok & (cols[None, :] <= offs_m[:, None])
                s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["NSEQ"])
    def _attn_fwd_kernel(Q, K, V, O, LSE, CU, qk_scale, NSEQ,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh, stride_lh,
                         HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PREC: tl.constexpr, FLAT_B: tl.constexpr):
        if FLAT_B > 0:
            # Flat grid (cdiv(T, BLOCK_M) + B, H): sequence b owns cdiv(len_b, BLOCK_M) consecutive
            # program ids (at most cdiv(T, BLOCK_M) + B in all); the surplus programs exit. A program finds
            # its sequence from all B offsets at once (B <= FLAT_B), so no table is built on the host.
            flat = tl.program_id(0)
            h = tl.program_id(1)
            offs_b = tl.arange(0, FLAT_B)
            ok_b = offs_b < NSEQ
            lo = tl.load(CU + offs_b, mask=ok_b, other=0)
            hi = tl.load(CU + offs_b + 1, mask=ok_b, other=0)
            nblk = (hi - lo + BLOCK_M - 1) // BLOCK_M
            ends = tl.cumsum(nblk, 0)
            b = tl.sum((ends <= flat).to(tl.int32), 0)
            if b >= NSEQ:
                return
            # Last block of each sequence first: in causal mode it does the most work.
            pid_m = tl.sum(tl.where(offs_b <= b, nblk, 0), 0) - 1 - flat
        else:
            # Grid (cdiv(max_seqlen, BLOCK_M), B, H); longest-first order as above.
            pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
            b = tl.program_id(1)
            h = tl.program_id(2)
        seq_start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen:
            return
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
        row_ok = offs_m < seqlen
        q_ptrs = Q + seq_start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + seq_start * stride_kt + hk * stride_kh
        v_base = V + seq_start * stride_vt + hk * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            # Tiles wholly left of the diagonal (BLOCK_M is a multiple of BLOCK_N), then the diagonal.
            full_hi = start_m
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
        else:
            full_hi = (seqlen // BLOCK_N) * BLOCK_N
            hi = seqlen
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_m, offs_d, d_ok, seqlen, 0, full_hi, qk_scale,
                                        False, CAUSAL, EVEN_D, BLOCK_N, DOT_PREC)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_m, offs_d, d_ok, seqlen, full_hi, hi, qk_scale,
                                        True, CAUSAL, EVEN_D, BLOCK_N, DOT_PREC)
        # Every row sees key 0, so l_i > 0 and m_i is finite.
        acc = acc / l_i[:, None]
        o_ptrs = O + seq_start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse_ptrs = LSE + h * stride_lh + seq_start + offs_m
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _attn_last_kernel(Q, K, V, O, CU, qk_scale,
                          stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        # One program per (sequence, KV head): the GROUP query heads sharing that KV head are the rows
        # of one (BLOCK_G, D) tile, so each key/value tile is read once per group.
        b = tl.program_id(0)
        hk = tl.program_id(1)
        seq_start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < GROUP
        d_ok = offs_d < HEAD_DIM
        heads = hk * GROUP + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + seq_start * stride_kt + hk * stride_kh
        v_base = V + seq_start * stride_vt + hk * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + offs_n
            c_ok = cols < seqlen
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=c_ok[None, :] & d_ok[:, None], other=0.0)             # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)              # (BLOCK_N, BLOCK_D)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale                 # (BLOCK_G, BLOCK_N), log2
            s = tl.where(c_ok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
        acc = acc / l_i[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale, sm_scale,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                              stride_lh,
                              HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              DOT_PREC: tl.constexpr):
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        hk = tl.program_id(2)
        seq_start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        start_n = pid_n * BLOCK_N
        if start_n >= seqlen:
            return
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        col_ok = offs_n < seqlen
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + seq_start * stride_kt + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + seq_start * stride_vt + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Query rows above the diagonal never see this key block: start at its first block.
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
        offs_mb = tl.arange(0, BLOCK_M)
        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = Q + seq_start * stride_qt + h * stride_qh
            do_base = DO + seq_start * stride_dot + h * stride_doh
            for start_m in range(lo, seqlen, BLOCK_M):
                offs_m = start_m + offs_mb
                row_ok = offs_m < seqlen
                qd_mask = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
                lse = tl.load(LSE + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
                # Transposed scores: (BLOCK_N, BLOCK_M), so dK and dV need no transposes of P.
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
                ok = row_ok[None, :] & col_ok[:, None]
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
        dk = dk * sm_scale
        tl.store(DK + seq_start * stride_dkt + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + seq_start * stride_dvt + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, qk_scale, sm_scale,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                            HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PREC: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        seq_start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen:
            return
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < seqlen
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + seq_start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=qd_mask, other=0.0)
        do = tl.load(DO + seq_start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=qd_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
        k_base = K + seq_start * stride_kt + hk * stride_kh
        v_base = V + seq_start * stride_vt + hk * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(start_m + BLOCK_M, seqlen) if CAUSAL else seqlen
        offs_nb = tl.arange(0, BLOCK_N)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_nb
            col_ok = offs_n < seqlen
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)          # (BLOCK_D, BLOCK_N)
            vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
        dq = dq * sm_scale
        tl.store(DQ + seq_start * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fwd_config(D, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M must be a multiple of BLOCK_N (causal split)."""
    if device.type != "cuda" or _interpreting():
        return 64, 64, 4, 1  # the interpreter pays per program: big tiles
    if D <= 64:
        return 128, 64, 4, 3
    if D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def _bwd_config(D, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels."""
    if device.type != "cuda" or _interpreting():
        return 64, 64, 4, 1
    if D <= 64:
        return 64, 64, 4, 2
    if D <= 128:
        return 64, 64, 8, 2
    return 32, 32, 4, 1


def _dot_precision(dtype):
    # fp32 inputs are the accuracy path: no tf32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D):
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported by the Triton attention kernel")
    return max(16, triton.next_power_of_2(D))


def _attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale, blocks=None):
    T, H, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    BM, BN, warps, stages = blocks or _fwd_config(D, q.dtype, q.device)
    o = _out_like(q)
    lse = _out_like(q, (H, T), torch.float32)
    flat = B <= FLAT_MAX_SEQS
    # The flat grid is sized by the tokens, not by max_seqlen x B: a ragged batch (or a CUDA-graph bucket
    # whose max_seqlen is only an upper bound) launches no idle (block, sequence) programs.
    grid = (triton.cdiv(T, BM) + B, H) if flat else (triton.cdiv(max(int(max_seqlen), 1), BM), B, H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, scale * _LOG2E, B,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0),
        HEAD_DIM=D, GROUP=H // Hkv, CAUSAL=bool(causal), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D),
        DOT_PREC=_dot_precision(q.dtype), FLAT_B=FLAT_MAX_SEQS if flat else 0, num_warps=warps, num_stages=stages)
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, blocks=None):
    T, H, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    BM, BN, warps, stages = blocks or _bwd_config(D, q.device)
    do = do.contiguous()
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, (H, T) fp32 like the LSE.
    delta = (do.float() * o.float()).sum(-1).transpose(0, 1).contiguous()
    dq, dk, dv = _out_like(q), _out_like(k), _out_like(v)
    BD = _block_d(D)
    common = dict(GROUP=H // Hkv, CAUSAL=bool(causal), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  DOT_PREC=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    S = max(int(max_seqlen), 1)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, BN), B, Hkv)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), HEAD_DIM=D, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(S, BM), B, H)](
        q, k, v, do, lse, delta, dq, cu_seqlens, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), HEAD_DIM=D, **common)
    return dq, dk, dv


class AttentionVarlenFunction(torch.autograd.Function):
    """Varlen attention with O(T) saved state (q, k, v, o and the (H, T) log-sum-exp).

    Backward, with P = softmax(S), S = scale * Q K^T (masked), per head:
        dV = P^T dO (summed over the query heads of a KV group), dP = dO V^T,
        dS = P * (dP - delta), delta = rowsum(dO * O),
        dQ = scale * dS K,  dK = scale * dS^T Q (summed over the group).
    P is recomputed tile by tile from the LSE, never stored.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        o, lse = _attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale=None):
    """Triton varlen attention; same contract as ``attention_varlen_ref``, differentiable.

    q (T, H, D), k/v (T, Hkv, D) fp16/bf16/fp32, cu_seqlens (B+1,) int; returns (T, H, D) in q.dtype.
    On CPU it runs only under TRITON_INTERPRET=1 (tests).
    """
    if not HAS_TRITON:
        raise RuntimeError("attention_varlen needs Triton; use attention_varlen_ref")
    _check_varlen(q, k, v, cu_seqlens)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    return AttentionVarlenFunction.apply(q, k, v, cu, int(max_seqlen), bool(causal), scale)


def attention_last(q_last, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None):
    """Triton ``attention_last_ref``: each sequence's last query row over all of its keys (inference).

    q_last (B, H, D), k/v (T, Hkv, D), cu_seqlens (B+1,) with every sequence non-empty -> (B, H, D).
    No host synchronisation and no padded copies (the reference pads k/v to (B, Hkv, S, D)), so it can
    run inside a CUDA graph. ``max_seqlen`` is accepted for the common signature and not needed.
    """
    if not HAS_TRITON:
        raise RuntimeError("attention_last needs Triton; use attention_last_ref")
    if q_last.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q_last.shape[2] != k.shape[2]:
        raise ValueError(f"q_last must be (B, H, D) and k/v (T, Hkv, D) with the same D; got "
                         f"{tuple(q_last.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, D = q_last.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != B + 1:
        raise ValueError(f"cu_seqlens must be (B+1,) = ({B + 1},); got {tuple(cu_seqlens.shape)}")
    if not (q_last.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_last.dtype}, {k.dtype}, {v.dtype}")
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    q_last, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_last, k, v))
    cu = cu_seqlens.to(device=q_last.device, dtype=torch.int32).contiguous()
    o = _out_like(q_last)
    group = H // Hkv
    interp = q_last.device.type != "cuda" or _interpreting()
    BN = 64 if interp or D > 128 else 128
    _attn_last_kernel[(B, Hkv)](
        q_last, k, v, o, cu, scale * _LOG2E,
        q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        HEAD_DIM=D, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BN,
        BLOCK_D=_block_d(D), DOT_PREC=_dot_precision(q_last.dtype), num_warps=4, num_stages=2)
    return o
