"""Varlen attention over a packed batch.

q (T, H, D), k/v (T, Hkv, D) hold B sequences back to back; ``cu_seqlens`` (B+1,) int32 gives their
offsets and ``max_seqlen`` the longest. Query head h reads KV head h // (H // Hkv) (GQA).
out_h = softmax(q_h k_g^T * scale + M) v_g, M causal (within each sequence) or none.

``attention_varlen_ref`` is the plain-PyTorch reference: it scatters the packed tokens into a
(B, H, S, D) tensor only inside this function, runs ``scaled_dot_product_attention`` with a
key-padding mask and gathers the real rows back. Batches formed by the engine are length-sorted, so
the padding is small; when it would more than double the work, it loops over sequences instead.
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
