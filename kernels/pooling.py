"""Pooling of packed hidden states → Matryoshka truncation → L2 normalize → optional sign-bit packing.

hidden (T, E), cu_seqlens (B+1,). last: row cu_seqlens[b+1]-1; cls: row cu_seqlens[b]; mean: the
average of the sequence's rows (fp32 accumulation). Then v = v[:truncate_dim],
v / max(||v||_2, 1e-12) (the F.normalize convention), computed in fp32. Packing follows
np.packbits(v > 0) (MSB first: dimension 0 → bit 7 of byte 0), zero-padded to whole bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pool_ref(hidden, cu_seqlens, *, mode="last", truncate_dim=None, normalize=True):
    """(T, E) -> (B, E') fp32."""
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    if mode == "last":
        v = hidden.index_select(0, cu[1:] - 1).float()
    elif mode == "cls":
        v = hidden.index_select(0, cu[:-1]).float()
    elif mode == "mean":
        lens = cu[1:] - cu[:-1]
        seq_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=hidden.device), lens)
        v = torch.zeros(lens.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        v = v.index_add(0, seq_idx, hidden.float()) / lens[:, None].float()
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of 'last', 'cls', 'mean'")
    if truncate_dim is not None:
        v = v[:, :truncate_dim]
    if normalize:
        v = F.normalize(v, p=2.0, dim=-1, eps=1e-12)
    return v


def pool_last_ref(hidden, cu_seqlens, *, truncate_dim=None, normalize=True):
    return pool_ref(hidden, cu_seqlens, mode="last", truncate_dim=truncate_dim, normalize=normalize)


def pack_bits_ref(v):
    """(B, K) float -> (B, ceil(K/8)) uint8, np.packbits(v > 0, axis=-1) byte for byte."""
    B, K = v.shape
    nbytes = (K + 7) // 8
    bits = torch.zeros(B, nbytes * 8, dtype=torch.uint8, device=v.device)
    bits[:, :K] = (v > 0).to(torch.uint8)
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=v.device)
    return (bits.view(B, nbytes, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)
