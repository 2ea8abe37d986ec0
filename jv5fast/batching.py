"""The packed batch — the one currency between scheduler, model and kernels — and the token-budget scheduler.

Texts are concatenated with no padding: ``input_ids`` (T,), ``position_ids`` (T,) restarting at 0 per
text, ``cu_seqlens`` (B+1,) int32 offsets and ``max_seqlen``. Batches are cut from texts sorted by
length (longest first, as sentence-transformers does) so that each holds at most ``max_batch_tokens``
tokens; a text longer than the budget travels alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor     # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor    # (B+1,) int32
    max_seqlen: int

    @classmethod
    def from_ids(cls, seqs, device=None) -> "PackedBatch":
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        if lens.size == 0 or lens.min() <= 0:
            raise ValueError("a packed batch needs at least one sequence, each with at least one token")
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        cu = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        pos = np.arange(flat.size, dtype=np.int64) - np.repeat(cu[:-1], lens)
        return cls(
            input_ids=torch.from_numpy(flat).to(device),
            position_ids=torch.from_numpy(pos).to(device),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)).to(device),
            max_seqlen=int(lens.max()),
        )

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def plan_batches(lengths, max_batch_tokens: int, balance: bool = False):
    """Indices into ``lengths`` grouped into batches under the token budget, longest texts first.

    ``balance``: as few batches as the budget allows, but of even size (the smallest budget that needs no
    more batches): on CPU a 40-token tail batch streams every weight for little work, so 552 tokens under
    a 512 budget run as 2 x 276 rather than 512 + 40."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    batches = _greedy(order, lengths, max_batch_tokens)
    if balance and len(batches) > 1:
        lo, hi = -(-int(sum(lengths)) // len(batches)), max_batch_tokens  # hi always fits in len(batches)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(_greedy(order, lengths, mid)) <= len(batches):
                hi = mid
            else:
                lo = mid + 1
        batches = _greedy(order, lengths, hi)
    return batches


def _greedy(order, lengths, budget):
    batches, cur, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and used + n > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches
