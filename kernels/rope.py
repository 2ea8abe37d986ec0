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
