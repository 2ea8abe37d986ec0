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
has no popc). Trade-off: the merge is O(K) per tile, so k > MAX_K (1024) runs ``hamming_topk_words_chunked``
instead: plain PyTorch on the same device, distances as an exact float32 matmul of the unpacked bits
(popcount(a ^ b) = |a| + |b| - 2 a·b; every partial sum is an integer <= nbits < 2**24), corpus in
chunks, a running torch.topk over the same int64 keys; memory bounded by CHUNKED_BUDGET_BYTES, not by N.
"""
from __future__ import annotations

import operator
import os

import torch

INT32_MAX = 2**31 - 1
MAX_K = 1024  # largest k the Triton kernel takes; above it hamming_topk_words runs the chunked torch path
CHUNKED_BUDGET_BYTES = 64 << 20  # per temporary of the chunked torch path (unpacked bits, key block)
_MAXKEY = 0x7FFFFFFFFFFFFFFF
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _check_tensor(x, what: str, dtype: torch.dtype, hint: str = ""):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}{hint}, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, {'words' if dtype == torch.int32 else 'bytes'}), "
                         f"got shape {tuple(x.shape)}")


def _check_pair(queries, corpus, k, dtype: torch.dtype, hint: str = "") -> int:
    _check_tensor(queries, "queries", dtype, hint)
    _check_tensor(corpus, "corpus", dtype, hint)
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries and corpus differ in width: {queries.shape[1]} vs {corpus.shape[1]} "
                         f"{'words' if dtype == torch.int32 else 'bytes'} per row")
    if queries.device != corpus.device:
        raise ValueError(f"queries and corpus must be on the same device, got {queries.device} and "
                         f"{corpus.device}")
    return _check_k(k)


def _check_k(k) -> int:
    if isinstance(k, bool) or not hasattr(k, "__index__"):  # int and numpy integers; not bool, float, str
        raise TypeError(f"k must be a positive integer, got {k!r} ({type(k).__name__})")
    if operator.index(k) <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return operator.index(k)


def hamming_topk_ref(queries: torch.Tensor, corpus: torch.Tensor, k: int):
    """Plain PyTorch: full (Q, N) distance matrix by a byte popcount table, stable sort by distance.

    queries (Q, B) and corpus (N, B) uint8 -> (D int32 (Q, k), I int64 (Q, k)).
    """
    k = _check_pair(queries, corpus, k, torch.uint8)
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


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (N, B) codes -> int32 (N, ceil(B/4)) words, rows zero-padded to a multiple of 4 bytes."""
    _check_tensor(codes, "codes", torch.uint8, " (packed binary codes)")
    pad = (-codes.shape[1]) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous().view(torch.int32)


def hamming_topk_words_chunked(qwords: torch.Tensor, cwords: torch.Tensor, k: int,
                               budget_bytes: int | None = None):
    """Exact top-k for any k on any torch device, in plain PyTorch -> the same (D, I) as ``hamming_topk_ref``.

    The corpus is unpacked to float32 bits ``rows`` at a time and scored by one matmul per chunk
    (exact: 0/1 inputs and integer partial sums <= nbits <= 2**24, which float32 holds exactly, also
    under TF32/bf16 matmul precision; hence the 2**24-bit limit). Keys
    ``d << 32 | id`` of up to ``span >= min(k, N)`` rows are merged with the running best by
    torch.topk; every temporary stays near ``budget_bytes`` (default CHUNKED_BUDGET_BYTES) apart from
    the (Q, k) output and a (queries-per-block, 2 * span) key block.
    """
    k = _check_pair(qwords, cwords, k, torch.int32, " (see pack_words)")
    nq, W = qwords.shape
    n = cwords.shape[0]
    if n >= 2**31:
        raise ValueError(f"the corpus holds {n} rows; ids are packed into 32 bits, so at most 2**31 - 1")
    if W > 2**19:
        raise ValueError(f"codes of {W} words ({32 * W} bits) are too wide for the chunked path: at most "
                         "2**19 words (2**24 bits), where float32 sums stay exact")
    budget = CHUNKED_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    dev = qwords.device
    D = torch.full((nq, k), INT32_MAX, dtype=torch.int32, device=dev)
    I = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    m = min(k, n)
    if nq == 0 or m == 0 or W == 0:
        if W == 0 and m:  # zero-width codes: every distance is 0, ids in order
            D[:, :m] = 0
            I[:, :m] = torch.arange(m, device=dev)
        return D, I
    nbits = 32 * W
    rows = max(1, budget // (4 * nbits))  # corpus rows unpacked per matmul
    span = rows * -(-m // rows)  # corpus rows merged per topk: a multiple of rows, >= m (merge linear in N)
    qrows = max(1, min(budget // (8 * (m + span)), budget // (4 * nbits)))
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)

    def unpack(w):  # int32 (r, W) -> float32 (r, 32 W) bits; bit order is irrelevant to a dot product
        b = w.contiguous().view(torch.uint8)
        return ((b[:, :, None] >> shifts) & 1).reshape(w.shape[0], nbits).to(torch.float32)

    for q0 in range(0, nq, qrows):
        qb = unpack(qwords[q0 : q0 + qrows])
        qpop = qb.sum(1, keepdim=True).to(torch.int64)
        best = torch.empty((qb.shape[0], 0), dtype=torch.int64, device=dev)
        for s0 in range(0, n, span):
            parts = [best]
            for c0 in range(s0, min(n, s0 + span), rows):
                cb = unpack(cwords[c0 : c0 + rows])
                dot = (qb @ cb.T).to(torch.int64)  # (qrows, rows); exact, see the docstring
                d = qpop + cb.sum(1).to(torch.int64)[None, :] - 2 * dot
                ids = torch.arange(c0, c0 + cb.shape[0], dtype=torch.int64, device=dev)
                parts.append((d << 32) | ids)
            best = torch.cat(parts, dim=1)
            if best.shape[1] > m:  # keys are unique, so the m smallest are one well-defined set
                best = torch.topk(best, m, dim=1, largest=False, sorted=False).values
        best = torch.sort(best, dim=1).values
        D[q0 : q0 + qrows, :m] = (best >> 32).to(torch.int32)
        I[q0 : q0 + qrows, :m] = best & 0xFFFFFFFF
    return D, I


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


def _check_block(value, name: str, allow_none: bool = False, pow2: bool = True, lo: int = 2, hi: int = 1024):
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and hasattr(value, "__index__")
    v = operator.index(value) if ok else None
    if not ok or v < lo or v > hi or (pow2 and v & (v - 1)):
        what = f"a power of two in {lo}..{hi}" if pow2 else f"an integer in {lo}..{hi}"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return v


def hamming_topk_words(qwords: torch.Tensor, cwords: torch.Tensor, k: int, block_q: int | None = None,
                       block_n: int = 64, splits: int | None = None):
    """Search on int32 words (from ``pack_words``) -> (D int32 (Q, k), I int64 (Q, k)).

    k <= MAX_K runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); a larger
    k runs ``hamming_topk_words_chunked`` on the same device (the block arguments do not apply there).
    """
    k = _check_pair(qwords, cwords, k, torch.int32, " (see pack_words)")
    block_q = _check_block(block_q, "block_q", allow_none=True)
    block_n = _check_block(block_n, "block_n")
    splits = _check_block(splits, "splits", allow_none=True, pow2=False, lo=1, hi=2**31 - 1)
    nq, W = qwords.shape
    n = cwords.shape[0]
    if n >= 2**31:
        raise ValueError(f"the corpus holds {n} rows; ids are packed into 32 bits, so at most 2**31 - 1")
    if k > MAX_K:
        return hamming_topk_words_chunked(qwords, cwords, k)
    if not HAS_TRITON:
        raise RuntimeError("the Triton Hamming kernel needs triton (pip install 'jv5fast[gpu]')")
    dev = qwords.device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton Hamming kernel runs on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got tensors on {dev}; use hamming_topk_words_chunked there")
    next_pow2, cdiv = triton.next_power_of_2, triton.cdiv
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
    I = torch.where(keys == _MAXKEY, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    return D, I


def hamming_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int, **kw):
    """Triton Hamming top-k: uint8 (Q, B) queries and (N, B) corpus (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1) -> (D int32 (Q, k), I int64 (Q, k)), equal to ``hamming_topk_ref``; k > MAX_K runs
    the chunked torch path on the same device."""
    _check_pair(queries, corpus, k, torch.uint8, " (packed binary codes)")
    return hamming_topk_words(pack_words(queries), pack_words(corpus), k, **kw)
