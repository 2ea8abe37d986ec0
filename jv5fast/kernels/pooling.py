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


# ----------------------------------------------------------------------------------------------
# Triton kernel: one program per sequence does gather (last / cls) or fp32 mean, truncation, L2
# normalization and, optionally, sign-bit packing, reading each hidden row once. The vector is held as
# a (BLOCK_BYTES, 8) tile, dimension = 8 * byte + bit, so the packed byte is a weighted sum along
# axis 1 with weights 128 >> bit (MSB first, as np.packbits) and no reshape is needed.
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

from ._common import new_output  # noqa: E402
_MODES = {"last": 0, "cls": 1, "mean": 2}

if HAS_TRITON:

    @triton.jit
    def _pool_kernel(HID, CU, OUT, BITS, stride_h, stride_o, stride_b, K,
                     MODE: tl.constexpr, NORMALIZE: tl.constexpr, STORE_V: tl.constexpr,
                     PACK: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        b = tl.program_id(0)
        start = tl.load(CU + b).to(tl.int64)
        end = tl.load(CU + b + 1).to(tl.int64)
        byte = tl.arange(0, BLOCK_BYTES)
        bit = tl.arange(0, 8)
        dim = byte[:, None] * 8 + bit[None, :]                      # (BLOCK_BYTES, 8)
        dmask = dim < K
        if MODE == 2:
            acc = tl.zeros([BLOCK_BYTES, 8], dtype=tl.float32)
            for r in range(start, end):
                acc += tl.load(HID + r * stride_h + dim, mask=dmask, other=0.0).to(tl.float32)
            v = acc / (end - start).to(tl.float32)
        else:
            row = end - 1 if MODE == 0 else start
            v = tl.load(HID + row * stride_h + dim, mask=dmask, other=0.0).to(tl.float32)
        if NORMALIZE:
            norm = tl.sqrt(tl.sum(tl.sum(v * v, 1), 0))
            v = v / tl.maximum(norm, 1e-12)
        if STORE_V:
            tl.store(OUT + b * stride_o + dim, v, mask=dmask)
        if PACK:
            weight = (128 >> bit)[None, :]
            packed = tl.sum(tl.where((v > 0) & dmask, weight, 0), 1)
            nbytes = (K + 7) // 8
            tl.store(BITS + b * stride_b + byte, packed.to(tl.uint8), mask=byte < nbytes)


def _launch_pool(hidden, cu, mode, K, normalize, store_v, pack):
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    B = cu.numel() - 1
    nbytes = (K + 7) // 8
    dev = hidden.device
    out = new_output((B, K), torch.float32, dev) if store_v else None
    bits = new_output((B, nbytes), torch.uint8, dev) if pack else None
    dummy = out if out is not None else bits
    _pool_kernel[(B,)](
        hidden, cu, out if out is not None else dummy, bits if bits is not None else dummy,
        hidden.stride(0), out.stride(0) if out is not None else 0, bits.stride(0) if bits is not None else 0, K,
        MODE=_MODES[mode], NORMALIZE=bool(normalize), STORE_V=store_v, PACK=pack,
        BLOCK_BYTES=triton.next_power_of_2(nbytes), num_warps=4)
    return out, bits


def pool(hidden, cu_seqlens, *, mode="last", truncate_dim=None, normalize=True, pack_bits=False):
    """Triton pooling with the contract of ``pool_ref``: (T, E) -> (B, E') fp32.

    With ``pack_bits=True`` returns ``(v, packed)``, packed = ``pack_bits_ref(v)`` (B, ceil(E'/8)) uint8,
    from the same kernel launch. Not differentiable (inference only).
    """
    if not HAS_TRITON:
        raise RuntimeError("pool needs Triton; use pool_ref")
    if mode not in _MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of 'last', 'cls', 'mean'")
    E = hidden.shape[1]
    K = E if truncate_dim is None else min(int(truncate_dim), E)
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int32).contiguous()
    out, bits = _launch_pool(hidden, cu, mode, K, normalize, True, bool(pack_bits))
    return (out, bits) if pack_bits else out


def pool_last(hidden, cu_seqlens, *, truncate_dim=None, normalize=True):
    return pool(hidden, cu_seqlens, mode="last", truncate_dim=truncate_dim, normalize=normalize)


def pack_bits(v):
    """(B, K) float -> (B, ceil(K/8)) uint8, byte for byte ``pack_bits_ref``; each row is its own 1-row
    'sequence' of the pooling kernel with normalization off."""
    if not HAS_TRITON:
        raise RuntimeError("pack_bits needs Triton; use pack_bits_ref")
    B, K = v.shape
    cu = torch.arange(B + 1, dtype=torch.int32, device=v.device)
    return _launch_pool(v, cu, "last", K, False, False, True)[1]
