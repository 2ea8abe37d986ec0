"""Fused, tiled InfoNCE (contrastive) loss, q -> d, whose forward and backward never materialise the
B x N similarity matrix.

Math. q (B, E) queries, d (B, E) their positive documents (row i of d is the positive of query i),
inv_tau = 1 / temperature. The candidates of query i are the N rows of C = [d; shared negatives]
(all in-batch documents plus, optionally, M negatives shared by every query), and in the per-query
convention also its own n mined negatives H_i (hard_negatives shaped (B, n, E)). With dot products
s_ij = q_i . c_j (pass L2-normalized vectors: the scores are then the cosines of model-spec §9.3),
    lse_i = log sum_j exp(inv_tau s_ij)            [ logaddexp with log sum_k exp(inv_tau q_i . h_ik) ]
    L     = (1/B) sum_i ( lse_i - inv_tau q_i . d_i )
which is exactly -(1/B) sum_i log( S(x_i, y_i) / (S(x_i, y_i) + sum_{n in N_i} S(x_i, n)) ).

Only lse_i touches B x N pairs, so only it is a kernel: ``ContrastiveLSEFunction`` streams over tiles of
C with an online logsumexp (FlashAttention-style: running max and sum, fp32, log2 domain) and keeps
O(B) state: lse_i and the softmax-weighted mean score sbar_i = sum_j p_ij s_ij, which is d lse_i / d
inv_tau, so the temperature gradient costs nothing in backward. The per-query negatives (B x n
scores) and the positive term are O(B n E) and stay in PyTorch. Trade-off: backward recomputes the
score tiles (no stored P), and once more per BLOCK_EO-wide slice of E it writes (E > 128 only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import new_output


def _check_info_nce(q, d, temperature, hard_negatives):
    """Validate shapes and the temperature; returns inv_tau as a (1,) tensor on q's device (fp32, or
    float64 for float64 q)."""
    if q.dim() != 2 or d.dim() != 2:
        raise ValueError(f"q and d must be (B, E); got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape != d.shape:
        raise ValueError(f"q and d must have the same shape (B, E); got {tuple(q.shape)} vs {tuple(d.shape)}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q and d must be non-empty (B, E) with B, E >= 1; got {tuple(q.shape)}")
    if hard_negatives is not None:
        hn = hard_negatives
        E = q.shape[1]
        if hn.dim() == 2:
            if hn.shape[1] != E:
                raise ValueError(f"shared hard_negatives must be (M, E={E}); got {tuple(hn.shape)}")
        elif hn.dim() == 3:
            if hn.shape[0] != q.shape[0] or hn.shape[2] != E:
                raise ValueError(f"per-query hard_negatives must be (B={q.shape[0]}, n, E={E}); "
                                 f"got {tuple(hn.shape)}")
        else:
            raise ValueError(f"hard_negatives must be (M, E) shared or (B, n, E) per query; "
                             f"got {tuple(hn.shape)}")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if torch.is_tensor(temperature):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar; got shape {tuple(temperature.shape)}")
        if not bool((temperature > 0).all()):
            raise ValueError(f"temperature must be > 0; got {temperature.item()}")
        return (1.0 / temperature.to(device=q.device, dtype=dt)).reshape(1)
    temperature = float(temperature)
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite float > 0; got {temperature}")
    return torch.full((1,), 1.0 / temperature, dtype=dt, device=q.device)


def _candidates(d, hard_negatives):
    """C = [d; shared negatives] (N, E); per-query negatives are handled beside it."""
    if hard_negatives is not None and hard_negatives.dim() == 2 and hard_negatives.shape[0] > 0:
        return torch.cat([d, hard_negatives.to(d.dtype)], 0)
    return d


def info_nce_ref(q, d, *, temperature, hard_negatives=None):
    """Reference InfoNCE q -> d: the full (B, N [+ n]) logit matrix and a cross-entropy, in fp32.

    q, d (B, E); hard_negatives None, (M, E) shared by all queries, or (B, n, E) per query;
    temperature a float or a scalar tensor (gradients flow to it). Returns a 0-d fp32 tensor
    (float64 for float64 inputs).
    """
    inv_tau = _check_info_nce(q, d, temperature, hard_negatives)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32   # fp32 math, float64 kept
    qf, c = q.to(dt), _candidates(d, hard_negatives).to(dt)
    logits = qf @ c.T                                                     # (B, N)
    if hard_negatives is not None and hard_negatives.dim() == 3:
        logits = torch.cat([logits, torch.einsum("be,bne->bn", qf, hard_negatives.to(dt))], 1)  # (B, N + n)
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits * inv_tau, labels)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Forward grid (cdiv(B, BLOCK_M),): each program owns BLOCK_M query rows and streams
# over BLOCK_N-row tiles of C; the score tile is a sum of (BLOCK_M, BLOCK_E) x (BLOCK_E, BLOCK_N) dots,
# so any E works without E-wide register tiles. Backward, with g_i = dL/dlse_i and
# p_ij = exp(inv_tau s_ij - lse_i) recomputed from the saved lse:
#     dq_i = inv_tau sum_j g_i p_ij c_j        (grid over query blocks x E slices)
#     dc_j = inv_tau sum_i g_i p_ij q_i        (grid over candidate blocks x E slices)
#     d inv_tau = sum_i g_i sbar_i             (sbar saved by the forward)
# Two kernels, each owning its output rows, so no atomics.
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the reference above still works
    HAS_TRITON = False

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _scores(A, Bm, offs_a, a_ok, offs_b, b_ok, stride_a, stride_b, E,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PREC: tl.constexpr):
        """(BLOCK_A, BLOCK_B) fp32 tile of A[offs_a] . Bm[offs_b]^T, summed over E in BLOCK_E chunks."""
        s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_ok = offs_e < E
            a = tl.load(A + offs_a[:, None] * stride_a + offs_e[None, :], mask=a_ok[:, None] & e_ok[None, :],
                        other=0.0)
            bt = tl.load(Bm + offs_b[None, :] * stride_b + offs_e[:, None],
                         mask=b_ok[None, :] & e_ok[:, None], other=0.0)
            s += tl.dot(a, bt, input_precision=DOT_PREC)
        return s

    @triton.jit
    def _lse_fwd_kernel(Q, C, INV_TAU, LSE, SBAR, B, N, E, stride_q, stride_c,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                        DOT_PREC: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < B
        scale = tl.load(INV_TAU).to(tl.float32) * 1.4426950408889634   # inv_tau * log2(e)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_i = tl.zeros([BLOCK_M], dtype=tl.float32)   # sum_j 2^(x_ij - m_i) s_ij, for sbar
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            s = _scores(Q, C, offs_m, row_ok, cols, col_ok, stride_q, stride_c, E,
                        BLOCK_M, BLOCK_N, BLOCK_E, DOT_PREC)
            x = tl.where(col_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(x - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            w_i = w_i * alpha + tl.sum(p * s, 1)
            m_i = m_new
        # N >= 1, so every row saw a finite score: m_i finite, l_i >= 1.
        tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
        tl.store(SBAR + offs_m, w_i / l_i, mask=row_ok)

    @triton.jit
    def _lse_bwd_dq_kernel(Q, C, INV_TAU, LSE, G, DQ, B, N, E, stride_q, stride_c, stride_dq,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_EO: tl.constexpr, DOT_PREC: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_eo = tl.program_id(1) * BLOCK_EO + tl.arange(0, BLOCK_EO)
        row_ok = offs_m < B
        eo_ok = offs_eo < E
        inv_tau = tl.load(INV_TAU).to(tl.float32)
        scale = inv_tau * 1.4426950408889634
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        g = tl.load(G + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_EO], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            s = _scores(Q, C, offs_m, row_ok, cols, col_ok, stride_q, stride_c, E,
                        BLOCK_M, BLOCK_N, BLOCK_E, DOT_PREC)
            ok = row_ok[:, None] & col_ok[None, :]
            gp = tl.where(ok, tl.exp2(s * scale - lse2[:, None]), 0.0) * g[:, None]   # (BLOCK_M, BLOCK_N)
            c = tl.load(C + cols[:, None] * stride_c + offs_eo[None, :],
                        mask=col_ok[:, None] & eo_ok[None, :], other=0.0)
            dq += tl.dot(gp.to(c.dtype), c, input_precision=DOT_PREC)
        tl.store(DQ + offs_m[:, None] * stride_dq + offs_eo[None, :], (dq * inv_tau).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & eo_ok[None, :])

    @triton.jit
    def _lse_bwd_dc_kernel(Q, C, INV_TAU, LSE, G, DC, B, N, E, stride_q, stride_c, stride_dc,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_EO: tl.constexpr, DOT_PREC: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_eo = tl.program_id(1) * BLOCK_EO + tl.arange(0, BLOCK_EO)
        col_ok = cols < N
        eo_ok = offs_eo < E
        inv_tau = tl.load(INV_TAU).to(tl.float32)
        scale = inv_tau * 1.4426950408889634
        dc = tl.zeros([BLOCK_N, BLOCK_EO], dtype=tl.float32)
        for start_m in range(0, B, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < B
            lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            g = tl.load(G + offs_m, mask=row_ok, other=0.0)
            # Transposed tile (BLOCK_N, BLOCK_M), so dC needs no transpose of P.
            st = _scores(C, Q, cols, col_ok, offs_m, row_ok, stride_c, stride_q, E,
                         BLOCK_N, BLOCK_M, BLOCK_E, DOT_PREC)
            ok = col_ok[:, None] & row_ok[None, :]
            gpt = tl.where(ok, tl.exp2(st * scale - lse2[None, :]), 0.0) * g[None, :]
            q = tl.load(Q + offs_m[:, None] * stride_q + offs_eo[None, :],
                        mask=row_ok[:, None] & eo_ok[None, :], other=0.0)
            dc += tl.dot(gpt.to(q.dtype), q, input_precision=DOT_PREC)
        tl.store(DC + cols[:, None] * stride_dc + offs_eo[None, :], (dc * inv_tau).to(DC.dtype.element_ty),
                 mask=col_ok[:, None] & eo_ok[None, :])


def _config(E, device):
    """(BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EO, num_warps): dot chunk BLOCK_E, backward output slice BLOCK_EO.

    One config for the GPU and the interpreter (which pays per program, so wants these big tiles); not
    yet tuned on a GPU. The loss is a sliver of a training step: B x N x E multiply-adds, 2-5x in backward.
    """
    e2 = max(16, triton.next_power_of_2(E))
    return 64, 64, min(e2, 64), min(e2, 128), 4


def _dot_precision(dtype):
    # fp32 inputs are the accuracy path: at tau = 0.02 a tf32 score error is magnified 50x in the logits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _lse_fwd(q, c, inv_tau, blocks=None):
    B, E = q.shape
    N = c.shape[0]
    BM, BN, BE, _, warps = blocks or _config(E, q.device)
    lse = new_output((B,), torch.float32, q.device)
    sbar = new_output((B,), torch.float32, q.device)
    _lse_fwd_kernel[(triton.cdiv(B, BM),)](
        q, c, inv_tau, lse, sbar, B, N, E, q.stride(0), c.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, DOT_PREC=_dot_precision(q.dtype), num_warps=warps)
    return lse, sbar


def _lse_bwd(g, q, c, inv_tau, lse, need_dq, need_dc, blocks=None):
    B, E = q.shape
    N = c.shape[0]
    BM, BN, BE, BEO, warps = blocks or _config(E, q.device)
    g = g.float().contiguous()
    common = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, BLOCK_EO=BEO, DOT_PREC=_dot_precision(q.dtype),
                  num_warps=warps)
    dq = dc = None
    if need_dq:
        dq = new_output((B, E), q.dtype, q.device)
        _lse_bwd_dq_kernel[(triton.cdiv(B, BM), triton.cdiv(E, BEO))](
            q, c, inv_tau, lse, g, dq, B, N, E, q.stride(0), c.stride(0), dq.stride(0), **common)
    if need_dc:
        dc = new_output((N, E), c.dtype, c.device)
        _lse_bwd_dc_kernel[(triton.cdiv(N, BN), triton.cdiv(E, BEO))](
            q, c, inv_tau, lse, g, dc, B, N, E, q.stride(0), c.stride(0), dc.stride(0), **common)
    return dq, dc


class ContrastiveLSEFunction(torch.autograd.Function):
    """lse_i = log sum_j exp(inv_tau q_i . c_j) for q (B, E), c (N, E), inv_tau (1,) fp32; returns (B,) fp32.

    Saves q, c, inv_tau, lse and sbar_i = sum_j p_ij (q_i . c_j), p_ij = exp(inv_tau q_i . c_j - lse_i).
    Backward, with g = dL/dlse (B,):
        dq_i = inv_tau g_i sum_j p_ij c_j,  dc_j = inv_tau sum_i g_i p_ij q_i,  d inv_tau = sum_i g_i sbar_i.
    """

    @staticmethod
    def forward(ctx, q, c, inv_tau, blocks=None):
        lse, sbar = _lse_fwd(q, c, inv_tau, blocks)
        ctx.save_for_backward(q, c, inv_tau, lse, sbar)
        ctx.blocks = blocks
        return lse

    @staticmethod
    def backward(ctx, g):
        q, c, inv_tau, lse, sbar = ctx.saved_tensors
        need_dq, need_dc, need_tau = ctx.needs_input_grad[:3]
        dq, dc = _lse_bwd(g, q, c, inv_tau, lse, need_dq, need_dc, ctx.blocks)
        dtau = (g.float() * sbar).sum().reshape(1) if need_tau else None
        return dq, dc, dtau, None


def info_nce(q, d, *, temperature, hard_negatives=None, blocks=None):
    """Triton InfoNCE q -> d with the contract of ``info_nce_ref``; differentiable w.r.t. q, d,
    hard_negatives and a tensor temperature. Returns a 0-d fp32 tensor.

    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EO, num_warps) overrides the tile config (tests).
    On CPU it runs only under TRITON_INTERPRET=1 (tests).
    """
    if not HAS_TRITON:
        raise RuntimeError("info_nce needs Triton; use info_nce_ref")
    inv_tau = _check_info_nce(q, d, temperature, hard_negatives)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton InfoNCE takes fp32/fp16/bf16 inputs; got {q.dtype} (use info_nce_ref)")
    c = _candidates(d, hard_negatives)
    if c.dtype != q.dtype:
        raise ValueError(f"q and d (and hard_negatives) must share a dtype; got {q.dtype} and {c.dtype}")
    qc = q if q.stride(-1) == 1 else q.contiguous()
    cc = c if c.stride(-1) == 1 else c.contiguous()
    lse = ContrastiveLSEFunction.apply(qc, cc, inv_tau, blocks)                  # (B,)
    qf = q.float()
    if hard_negatives is not None and hard_negatives.dim() == 3 and hard_negatives.shape[1] > 0:
        s_hn = torch.einsum("be,bne->bn", qf, hard_negatives.float()) * inv_tau   # (B, n): O(B n E)
        lse = torch.logaddexp(lse, torch.logsumexp(s_hn, 1))
    pos = (qf * d.float()).sum(1) * inv_tau                                    # (B,)
    return (lse - pos).mean()
