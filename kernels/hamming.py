"""Exact Hamming top-k over packed binary codes on CUDA (Triton), with a plain-PyTorch reference.

D[q, j] = popcount(query_q XOR corpus_{I[q, j]}) for the k nearest rows, ascending distance, ties by
smaller id, k > N padded with (INT32_MAX, -1) — faiss ``IndexBinaryFlat`` semantics. Codes are uint8
rows (np.packbits order); the kernel reads them as int32 words (rows zero-padded to a multiple of 4
bytes: XOR of the pad is 0, and popcount does not care how bytes are grouped into words).

Kernel: a program owns BLOCK_Q queries and a contiguous range of corpus tiles (BLOCK_N rows each).
Per tile it accumulates the (BLOCK_Q, BLOCK_N) distances word by word and folds each (d, id) into
one int64 key ``d << 32 | id``, whose order is exactly the tie rule. A running top-K of keys per query
is merged with a tile only when some key beats the current K-th (rare after the first tiles), by K
rounds of min-extraction. Each program writes its K best keys; one torch.sort merges the programs.
Popcount is PTX ``popc.b32`` on GPU and a SWAR bit-count under TRITON_INTERPRET=1 (the interpreter
has no popc). Trade-off: the merge is O(K) per tile, so very large k (> 1024) is refused here.
"""
from __future__ import annotations

import os

import torch

INT32_MAX = 2**31 - 1
MAX_K = 1024
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def hamming_topk_ref(queries: torch.Tensor, corpus: torch.Tensor, k: int):
    """Plain PyTorch: full (Q, N) distance matrix by a byte popcount table, stable sort by distance.

    queries (Q, B) and corpus (N, B) uint8 -> (D int32 (Q, k), I int64 (Q, k)).
    """
    assert queries.dtype == torch.uint8 and corpus.dtype == torch.uint8, "codes must be uint8"
    assert queries.ndim == 2 and corpus.ndim == 2 and queries.shape[1] == corpus.shape[1], "shape mismatch"
    assert k > 0, "k must be positive"
    nq, n = queries.shape[0], corpus.shape[0]
    table = _POPCOUNT8.to(queries.device)
    rows = max(1, (1 << 26) // max(1, n * corpus.shape[1]))  # bound the (rows, N, B) XOR temporary
    d = torch.cat(
        [table[(queries[i : i + rows, None, :] ^ corpus[None]).long()].sum(-1) for i in range(0, nq, rows)]
    ) if nq else torch.zeros((0, n), dtype=torch.int64, device=queries.device)  # (Q, N)
    # Columns are in id order, so a stable sort by distance breaks ties by smaller id.
    dist, idx = torch.sort(d, dim=1, stable=True)
    m = min(k, n)
    D = torch.full((nq, k), INT32_MAX, dtype=torch.int32, device=queries.device)
    I = torch.full((nq, k), -1, dtype=torch.int64, device=queries.device)
    D[:, :m] = dist[:, :m].to(torch.int32)
    I[:, :m] = idx[:, :m]
    return D, I


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Triton kernel (defined only where Triton imports; the reference above works everywhere).
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

from ._common import new_output  # noqa: E402

if HAS_TRITON:

    @triton.jit
    def _popcount32(x, USE_POPC: tl.constexpr):
        # x: uint32. SWAR: pairs, nibbles, bytes, then the byte sum lands in the top byte.
        if USE_POPC:
            c = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
        else:
            x = x - ((x >> 1) & 0x55555555)
            x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
            x = (x + (x >> 4)) & 0x0F0F0F0F
            c = ((x * 0x01010101) >> 24).to(tl.int32)
        return c

    @triton.jit
    def _hamming_topk_fwd_kernel(
        Q, C, Out, nq, n, tiles_per_split,
        W: tl.constexpr, WC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, USE_POPC: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_s = tl.program_id(1)
        nsplit = tl.num_programs(1)
        MAXKEY: tl.constexpr = 0x7FFFFFFFFFFFFFFF
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < nq
        kidx = tl.arange(0, KP)
        best = tl.full((BLOCK_Q, KP), MAXKEY, tl.int64)  # running top-K keys, sorted; columns >= K stay MAXKEY
        t0 = pid_s * tiles_per_split
        for t in range(t0, t0 + tiles_per_split):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n
            acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
            for w0 in range(0, W, WC):  # WC contiguous words per row: coalesced (rows, WC) tiles
                offs_w = w0 + tl.arange(0, WC)
                mask_w = offs_w < W
                qt = tl.load(Q + offs_q[:, None] * W + offs_w[None, :], mask=mask_q[:, None] & mask_w[None, :],
                             other=0)  # (BLOCK_Q, WC)
                ct = tl.load(C + offs_n.to(tl.int64)[:, None] * W + offs_w[None, :],
                             mask=mask_n[:, None] & mask_w[None, :], other=0)  # (BLOCK_N, WC)
                x = (qt[:, None, :] ^ ct[None, :, :]).to(tl.uint32, bitcast=True)  # (BLOCK_Q, BLOCK_N, WC)
                acc += tl.sum(_popcount32(x, USE_POPC), axis=2)
            key = (acc.to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]
            key = tl.where(mask_n[None, :], key, MAXKEY)
            worst = tl.max(tl.where(kidx[None, :] < K, best, -1), axis=1)  # (BLOCK_Q,) K-th best so far
            nbeat = tl.sum(tl.sum((key < worst[:, None]).to(tl.int32), axis=1), axis=0)
            if nbeat > 0:
                new = tl.full((BLOCK_Q, KP), MAXKEY, tl.int64)
                for j in range(K):  # extract the K smallest keys of best ∪ tile, in order
                    m = tl.minimum(tl.min(key, axis=1), tl.min(best, axis=1))
                    new = tl.where(kidx[None, :] == j, m[:, None], new)
                    key = tl.where(key == m[:, None], MAXKEY, key)
                    best = tl.where(best == m[:, None], MAXKEY, best)
                best = new
        out_ptrs = Out + (offs_q[:, None] * nsplit + pid_s) * K + kidx[None, :]
        tl.store(out_ptrs, best, mask=mask_q[:, None] & (kidx[None, :] < K))


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (N, B) codes -> int32 (N, ceil(B/4)) words, rows zero-padded to a multiple of 4 bytes."""
    assert codes.dtype == torch.uint8 and codes.ndim == 2, "codes must be a 2-D uint8 tensor"
    pad = (-codes.shape[1]) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous().view(torch.int32)


def hamming_topk_words(qwords: torch.Tensor, cwords: torch.Tensor, k: int, block_q: int | None = None,
                       block_n: int = 64, splits: int | None = None):
    """Triton search on int32 words (from ``pack_words``) -> (D int32 (Q, k), I int64 (Q, k))."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton Hamming kernel needs triton (pip install 'jv5fast[gpu]')")
    next_pow2, cdiv = triton.next_power_of_2, triton.cdiv
    assert qwords.dtype == torch.int32 and cwords.dtype == torch.int32, "words must be int32 (see pack_words)"
    assert qwords.shape[1] == cwords.shape[1], "queries and corpus differ in width"
    assert 0 < k <= MAX_K, f"k must be in 1..{MAX_K} on the Triton path, got {k}"
    nq, W = qwords.shape
    n = cwords.shape[0]
    assert n < 2**31, "the Triton path packs ids into 32 bits"
    dev = qwords.device
    if nq == 0:
        return torch.empty((0, k), dtype=torch.int32, device=dev), torch.empty((0, k), dtype=torch.int64, device=dev)
    KP = max(2, next_pow2(k))
    if block_q is None:  # no wasted lanes for a handful of queries; fewer registers for a large K
        block_q = min(16 if KP < 256 else 4, max(2, next_pow2(nq)))
    WC = min(8, next_pow2(W))
    tiles = max(1, cdiv(n, block_n))
    qblocks = cdiv(nq, block_q)
    if splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        splits = cdiv(4 * sms, qblocks)
    splits = max(1, min(tiles, splits))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)
    out = new_output((nq, splits, k), torch.int64, dev, int_marker=-7)
    use_popc = dev.type == "cuda" and not _interpreting() and not os.environ.get("JV5FAST_TRITON_SWAR")
    _hamming_topk_fwd_kernel[(qblocks, splits)](
        qwords.contiguous(), cwords.contiguous(), out, nq, n, tiles_per_split,
        W=W, WC=WC, K=k, KP=KP, BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=use_popc,
    )
    keys = out.view(nq, splits * k)
    keys = torch.sort(keys, dim=1).values[:, :k] if splits > 1 else keys
    D = (keys >> 32).to(torch.int32)  # the MAXKEY sentinel decodes to INT32_MAX
    I = torch.where(keys == 0x7FFFFFFFFFFFFFFF, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    return D, I


def hamming_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int, **kw):
    """Triton Hamming top-k: uint8 (Q, B) queries and (N, B) corpus (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1) -> (D int32 (Q, k), I int64 (Q, k)), equal to ``hamming_topk_ref``."""
    assert queries.device == corpus.device, "queries and corpus must be on the same device"
    return hamming_topk_words(pack_words(queries), pack_words(corpus), k, **kw)
