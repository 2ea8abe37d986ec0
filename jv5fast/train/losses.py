"""The training losses of jina-embeddings-v5-text (model-spec §9), each beside its plain-PyTorch reference.

Stage 1 and the clustering adapter: ``distill_loss``. Retrieval: ``info_nce_loss`` + 2 ``distill_loss``
+ ``gor_loss``. Text-matching: ``cosent_loss`` (scored pairs), else NCE + distillation. Classification:
``bidirectional_info_nce_loss`` + 20 ``relational_kd_loss``. The ``*_ref`` functions are the formulas as
printed, written naively (loops, full pair matrices); tests hold the public functions to them. The public
functions are the fast forms: InfoNCE goes to the fused Triton kernel (jv5fast/kernels/contrastive.py) on CUDA,
GOR uses the (E, E) Gram instead of the (B, B) one. All return 0-d tensors, fp32 (float64 for float64
inputs), and are differentiable in every tensor input, the temperature included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.contrastive import info_nce_ref
from ..ops import backend, check_triton_device

_EPS = 1e-8   # floor for norms and RKD means: only keeps degenerate inputs finite


def _up(x):
    """fp32 math for fp16/bf16/fp32 inputs (bf16 autocast outputs included); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _out_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32

__all__ = [
    "distill_loss", "distill_loss_ref", "info_nce_loss", "info_nce_ref", "bidirectional_info_nce_loss",
    "bidirectional_info_nce_ref", "gor_loss", "gor_ref", "cosent_loss", "cosent_ref", "relational_kd_loss",
    "relational_kd_ref",
]


def _check_pair(a, b, names, min_rows=1):
    na, nb = names
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{na} and {nb} must be (B, E); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape; got {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] < min_rows or a.shape[1] < 1:
        raise ValueError(f"{na} must have B >= {min_rows} rows and E >= 1 columns; got {tuple(a.shape)}")


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")


def _check_positive(name, value):
    if not (float(value) > 0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be a finite float > 0; got {value}")


# ---- distillation (model-spec §9.2, Eq. 1) ------------------------------------------------------------
def distill_loss_ref(student_projected, teacher, *, reduction="mean"):
    """1 - cos per row, one row at a time, then mean (or sum)."""
    _check_pair(student_projected, teacher, ("student_projected", "teacher"))
    _check_reduction(reduction)
    terms = []
    for s, t in zip(student_projected.double(), teacher.double()):
        terms.append(1 - (s @ t) / (s.norm().clamp_min(_EPS) * t.norm().clamp_min(_EPS)))
    total = torch.stack(terms).sum()
    return (total if reduction == "sum" else total / len(terms)).to(_out_dtype(student_projected, teacher))


def distill_loss(student_projected, teacher, *, reduction="mean"):
    """L_distill: the mean over rows of 1 - cos(psi(student)_i, teacher_i).

    student_projected (B, m) is psi(z^S), teacher (B, m) the teacher embeddings. Neither needs to be
    normalized: each row is normalized here (cosine). For Stage 1 pass queries and documents stacked,
    (2B, m), so both count as in Eq. 1. ``reduction="mean"`` is the project default (model-spec §11 #11:
    the λ ratios then mean what the paper says); ``reduction="sum"`` is the paper's literal sum over the
    batch.
    """
    _check_pair(student_projected, teacher, ("student_projected", "teacher"))
    _check_reduction(reduction)
    cos = F.cosine_similarity(_up(student_projected), _up(teacher), dim=1, eps=_EPS)   # (B,)
    terms = 1 - cos
    return terms.sum() if reduction == "sum" else terms.mean()


# ---- InfoNCE (model-spec §9.3, retrieval and classification) ------------------------------------------
def _contrastive_impl(x):
    """The InfoNCE implementation for tensors like ``x``: the ops.py rule (Triton on CUDA, the reference
    elsewhere; JV5FAST_BACKEND=torch|triton forces one)."""
    b = backend()   # validates JV5FAST_BACKEND
    if b == "torch" or (b == "auto" and (not x.is_cuda or x.dtype == torch.float64)):
        return info_nce_ref
    from ..kernels import contrastive
    if not contrastive.HAS_TRITON:
        if b == "triton":
            raise RuntimeError("JV5FAST_BACKEND=triton but Triton is not installed "
                               "(jv5fast.kernels.contrastive)")
        return info_nce_ref
    if b == "triton":
        check_triton_device(x)
    return contrastive.info_nce


def info_nce_loss(q, d, *, temperature, hard_negatives=None):
    """L_NCE, one direction q -> d, mean over queries.

    q (B, E) queries, d (B, E) their positives (row i matches row i), L2-normalized: scores are dot
    products, i.e. cosines. Candidates of query i: every in-batch document plus the hard negatives, given as
      - ``(M, E)``: shared by every query (e.g. all mined negatives of the batch, or the classification
        negatives: "every positive and negative in the batch"), or
      - ``(B, n, E)``: per query, row i's n negatives seen by query i only (model-spec's N_i).
    ``temperature`` is a float or a scalar tensor > 0; gradients flow to a tensor (learnable τ; its
    parameterization, e.g. exp(log τ) clamped to [0.01, 1] per §11 #13, belongs to the caller).
    On CUDA this runs the fused Triton kernel, which never forms the (B, B + M) score matrix.
    """
    return _contrastive_impl(q)(q, d, temperature=temperature, hard_negatives=hard_negatives)


def bidirectional_info_nce_ref(q, d, *, temperature, hard_negatives=None):
    return (info_nce_ref(q, d, temperature=temperature, hard_negatives=hard_negatives)
            + info_nce_ref(d, q, temperature=temperature))


def bidirectional_info_nce_loss(q, d, *, temperature, hard_negatives=None):
    """Classification's L = L_NCE(q -> d) + L_NCE(d -> q) (model-spec §9.3).

    q -> d sees every in-batch document plus ``hard_negatives`` (for classification: the (7B, E)
    different-label negatives, shared); d -> q sees the in-batch queries only. Same conventions as
    ``info_nce_loss``.
    """
    return (info_nce_loss(q, d, temperature=temperature, hard_negatives=hard_negatives)
            + info_nce_loss(d, q, temperature=temperature))


# ---- GOR (model-spec §9.3, retrieval) -------------------------------------------------------------------
def gor_ref(q, p):
    """The paper's formula on the full (B, B) similarity matrices, off-diagonal squares averaged."""
    _check_pair(q, p, ("q", "p"))
    B = q.shape[0]
    if B < 2:
        return (q.sum() + p.sum()).to(_out_dtype(q, p)) * 0
    off = ~torch.eye(B, dtype=torch.bool, device=q.device)
    total = 0
    for x in (q.double(), p.double()):
        total = total + ((x @ x.T)[off] ** 2).sum() / (B * (B - 1))
    return total.to(_out_dtype(q, p))


def _gor_term(x):
    """sum_{i != j} (x_i . x_j)^2 / (B (B - 1)) = (||X^T X||_F^2 - sum_i ||x_i||^4) / (B (B - 1))."""
    B = x.shape[0]
    x = _up(x)   # fp32 at least: the subtraction cancels about B of the ~B + B^2/E total
    gram = x.T @ x                                                        # (E, E)
    return ((gram * gram).sum() - (x * x).sum(1).square().sum()) / (B * (B - 1))


def gor_loss(q, p):
    """L_GOR = mean_{i != j} (q_i . q_j)^2 + mean_{i != j} (p_i . p_j)^2, exactly as the paper defines it.

    q (B, E) queries, p (B, E) positive documents, L2-normalized (the scores are raw dot products; no
    hinge, no first moment, no negatives). Computed from the (E, E) Gram X^T X instead of the (B, B)
    one: O(B E^2) work and O(E^2) memory. With B < 2 there is no pair and the loss is 0 (differentiable).
    """
    _check_pair(q, p, ("q", "p"))
    if q.shape[0] < 2:
        return (_up(q).sum() + _up(p).sum()) * 0
    return _gor_term(q) + _gor_term(p)


# ---- CoSENT (model-spec §9.3, text-matching) -------------------------------------------------------------
def _check_cosent(a, b, scores, tau):
    _check_pair(a, b, ("a", "b"))
    if scores.dim() != 1 or scores.shape[0] != a.shape[0]:
        raise ValueError(f"scores must be (B,) = ({a.shape[0]},); got {tuple(scores.shape)}")
    _check_positive("tau", tau)


def cosent_ref(a, b, scores, *, tau=0.05):
    """ln(1 + sum over pairs with s_i > s_j of exp((cos_j - cos_i) / tau)), as a double loop in float64."""
    _check_cosent(a, b, scores, tau)
    cos = [(x @ y) / (x.norm().clamp_min(_EPS) * y.norm().clamp_min(_EPS))
           for x, y in zip(a.double(), b.double())]
    s = scores.tolist()
    total = torch.stack(cos).sum() * 0   # zero, but in the graph: no ordered pair still differentiates
    for i in range(len(s)):
        for j in range(len(s)):
            if s[i] > s[j]:
                total = total + torch.exp((cos[j] - cos[i]) / tau)
    return torch.log1p(total).to(_out_dtype(a, b))


def cosent_loss(a, b, scores, *, tau=0.05):
    """CoSENT: ln(1 + sum_{(i, j): s_i > s_j} exp((cos(a_j, b_j) - cos(a_i, b_i)) / tau)), standard form.

    a, b (B, E) the two sides of each pair (normalized here: cosines), scores (B,) their gold similarity
    (not differentiated). Pairs with tied scores contribute nothing; with no ordered pair the loss is 0.
    Computed as logsumexp over [0, all ordered-pair terms], so no exp overflows at small tau.
    """
    _check_cosent(a, b, scores, tau)
    cos = F.cosine_similarity(_up(a), _up(b), dim=1, eps=_EPS)        # (B,)
    diff = (cos[None, :] - cos[:, None]) / tau               # (B, B): [i, j] = (cos_j - cos_i) / tau
    s = scores.to(cos.device)
    diff = diff.masked_fill(~(s[:, None] > s[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), 0)


# ---- relational KD (Park et al. 2019; model-spec §9.3, classification) ------------------------------------
def _check_rkd(student, teacher):
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher must be (M, E_s) and (M, E_t) with the same M; "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] < 1 or student.shape[1] < 1 or teacher.shape[1] < 1:
        raise ValueError(f"student and teacher must be non-empty; got {tuple(student.shape)}, "
                         f"{tuple(teacher.shape)}")


def relational_kd_ref(student, teacher, *, mu_include_diagonal=False):
    """L_r with explicit loops over all (i, j) pairs, in float64."""
    _check_rkd(student, teacher)
    M = student.shape[0]
    if M < 2:
        return (student.sum() + teacher.sum()).to(_out_dtype(student, teacher)) * 0

    def dist(x):
        x = x.double()
        return [[1 - (x[i] @ x[j]) / (x[i].norm().clamp_min(_EPS) * x[j].norm().clamp_min(_EPS))
                 for j in range(M)] for i in range(M)]

    ds, dt = dist(student), dist(teacher)
    pairs = [(i, j) for i in range(M) for j in range(M) if mu_include_diagonal or i != j]
    mu_s = (sum(ds[i][j] for i, j in pairs) / len(pairs)).clamp_min(_EPS)
    mu_t = (sum(dt[i][j] for i, j in pairs) / len(pairs)).clamp_min(_EPS)
    total = sum((ds[i][j] / mu_s - dt[i][j] / mu_t) ** 2 for i in range(M) for j in range(M))
    return (total / M ** 2).to(_out_dtype(student, teacher))


def _cos_dist(x):
    xn = F.normalize(_up(x), dim=1, eps=_EPS)
    return 1 - xn @ xn.T                                                   # (M, M)


def relational_kd_loss(student, teacher, *, mu_include_diagonal=False):
    """Distance-wise relational KD (Park et al. 2019) with cosine distances, as model-spec §9.3 prints it:
        L_r = (1/M^2) sum_{i,j} ( (1 - cos(s_i, s_j)) / mu_S - (1 - cos(t_i, t_j)) / mu_T )^2.

    student (M, E_s), teacher (M, E_t): the same M samples (anchors, positives and negatives) through the
    adapted model and the adapter-less one (pass the teacher without gradients). Rows are normalized
    here. mu_S, mu_T are the means of the distance matrices over i != j (Park et al.; §11 #15);
    ``mu_include_diagonal=True`` averages over all M^2 entries, the zero diagonal included.
    With M < 2 there is no pair and the loss is 0.
    """
    _check_rkd(student, teacher)
    M = student.shape[0]
    if M < 2:
        return (_up(student).sum() + _up(teacher).sum()) * 0
    ds, dt = _cos_dist(student), _cos_dist(teacher)
    # The diagonal of a cosine-distance matrix is 0 up to rounding: make it exactly 0, so the i != j
    # mean and the sum over all (i, j) see no rounding residue.
    eye = torch.eye(M, dtype=torch.bool, device=ds.device)
    ds, dt = ds.masked_fill(eye, 0.0), dt.masked_fill(eye, 0.0)
    n = M * M if mu_include_diagonal else M * (M - 1)
    mu_s = (ds.sum() / n).clamp_min(_EPS)
    mu_t = (dt.sum() / n).clamp_min(_EPS)
    return ((ds / mu_s - dt / mu_t) ** 2).mean()
