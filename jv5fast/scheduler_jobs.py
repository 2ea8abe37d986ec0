"""What the Batcher (jv5fast/scheduler.py) queues: one ``Job`` per ``embed`` call, cut into ``Unit``s, and the rows
it gathers. A unit is a whole text or one window of a text over ``max_length`` (``overflow="chunk"``); windows are
cut one at a time as batches take them (a 1M-token text holds its token ids, never all its windows) and pooled per
text by a running ``overflow.WeightedMean``. Also ``Tokenized`` (``Batcher.tokenize``'s ids, a job's input) and
``EmbedResult`` (a job's output), and ``check_ids``. Bookkeeping only: no queue, lock or thread here; the Batcher
calls ``Job.take`` under its lock and ``put_rows`` / ``Job.result`` from its scheduler thread.
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import ops
from .overflow import WeightedMean, finish
from .postprocess import quantize


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # (N, D') in the requested precision, rows in input order
    tokens: int             # tokens the model saw, prompts and special tokens included (every window's)
    truncated: int = 0      # texts cut at max_length (overflow="truncate")
    chunked: int = 0        # texts over max_length embedded in windows (overflow="chunk")
    windows: int = 0        # the windows of those texts


class Tokenized(list):
    """``Batcher.tokenize``'s token id lists, one per text (an over-long text's: its first window), plus what
    tokenizing found: ``truncated``, the indices of texts cut at ``max_length``, and in chunk mode ``windows``,
    ``{index: overflow.TextWindows}`` of the texts over it (their ids, cut into windows only when scheduled)."""

    def __init__(self, ids, truncated=(), windows=None):
        super().__init__(ids)
        self.truncated, self.windows = list(truncated), dict(windows or {})


def check_ids(ids, vocab, max_length, normalize) -> dict:
    """Raise ValueError unless token id lists (a ``Tokenized`` also brings windows) are fit for a job, since one
    bad row would fail every job of its batch; return the windows of its chunked texts (``{}``: none)."""
    for i, seq in enumerate(ids):
        a = np.asarray(seq)
        if (not 0 < a.size <= max(max_length, 1) or a.ndim != 1 or a.dtype.kind not in "iu" or a.min() < 0
                or a.max() >= vocab):
            raise ValueError(f"ids[{i}] must hold 1..{max_length} integer token ids in 0..{vocab - 1}")
    windows = getattr(ids, "windows", None) or {}
    for i, tw in windows.items():
        if not 0 <= i < len(ids) or (tw.content.size and not 0 <= tw.content.min() <= tw.content.max() < vocab):
            raise ValueError(f"windows of ids[{i}] must hold token ids in 0..{vocab - 1}")
    if windows and not normalize:
        raise ValueError("overflow='chunk' averages the windows' unit vectors; pass normalize=True")
    return windows


class Unit(NamedTuple):
    """One sequence of a job to run: a whole text (``weight`` None) or one window of an over-long one."""
    row: int                   # the text's row in the job's output
    seq: list                  # its token ids
    weight: int | None         # a window's text tokens (its weight in the text's mean); None: a whole text


class Job:
    """One ``embed`` call: its units (texts, then the windows of over-long texts, cut lazily), options, and the
    rows filled in as batches finish."""

    def __init__(self, ids, task, k, normalize, precision, windows=None, full_dim=None, truncated=0):
        self.ids, self.task, self.k, self.normalize, self.precision = ids, task, k, normalize, precision
        self.windows = windows or {}  # row -> overflow.TextWindows of a chunked text
        self.full_dim = full_dim      # windows are pooled at the model's full width (then averaged)
        self.truncated = truncated
        self.tokens = (sum(len(s) for i, s in enumerate(ids) if i not in self.windows)
                       + sum(tw.tokens for tw in self.windows.values()))
        self.units = len(ids) - len(self.windows) + sum(tw.num_windows for tw in self.windows.values())
        self.left = self.tokens      # tokens of the units not yet scheduled
        self.out = torch.empty(len(ids), k, dtype=torch.float32)
        self._means = {}             # row -> [WeightedMean, windows not yet added] of a chunked text in flight
        self._units = self._iter_units()
        self.peek = next(self._units, None)  # the next unit to schedule (None: all scheduled)
        self.next = 0        # units scheduled
        self.done = 0        # units whose rows are written
        self.started = None  # when its first unit entered a batch
        self.submitted = self.served = time.monotonic()  # served: when a batch last took one of its units
        self.cancelled = False
        self.future = concurrent.futures.Future()

    def _iter_units(self):
        for i, seq in enumerate(self.ids):
            tw = self.windows.get(i)
            if tw is None:
                yield Unit(i, seq, None)
                continue
            for span in tw.spans():  # lazily: only the window being scheduled exists
                yield Unit(i, tw.ids(span), max(span[1] - span[0], 1))

    def take(self) -> Unit:
        """The next unit, now scheduled (under the batcher's lock)."""
        u = self.peek
        self.peek = next(self._units, None)
        self.next += 1
        self.left -= len(u.seq)
        return u

    def add_window(self, row, vector, weight):
        """A window's full-width unit vector; the text's last one writes its row: the token-weighted mean,
        renormalized, Matryoshka-truncated and renormalized (as ``Engine.embed``). A mean that cannot be
        normalized (a non-finite window) leaves a NaN row, which fails the job naming the input."""
        acc = self._means.get(row)
        if acc is None:
            acc = self._means[row] = [WeightedMean(vector.shape[0]), self.windows[row].num_windows]
        acc[0].add(vector, weight)
        acc[1] -= 1
        if acc[1] == 0:
            del self._means[row]
            try:
                self.out[row] = torch.from_numpy(finish(acc[0].result()[None], self.k, "float32")[0])
            except FloatingPointError:
                self.out[row] = float("nan")

    def result(self, dtype):
        """``(EmbedResult, None)`` from the written rows, in the requested precision, or ``(None, error)`` when a
        row is not finite (``dtype``: the engine's, named in the error)."""
        out = self.out
        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            return None, FloatingPointError(
                f"the model produced a non-finite embedding for input{bad[:10]} (dtype {dtype}); "
                f"the server's weights or dtype need attention (float32 avoids overflow)")
        res = out.numpy()
        return EmbedResult(res if self.precision == "float32" else quantize(res, self.precision), self.tokens,
                           truncated=self.truncated, chunked=len(self.windows),
                           windows=sum(tw.num_windows for tw in self.windows.values())), None


def put_rows(entries, lo, hi, rows):
    """Pool rows (B, E) of ``entries[lo:hi]`` (``(job, unit)`` pairs) with each job's options into its output rows;
    a window's row is pooled at full width, unit norm, into its text's running mean."""
    groups = {}
    for p in range(lo, hi):
        j, u = entries[p]
        key = (j.k, j.normalize, False) if u.weight is None else (j.full_dim, True, True)
        groups.setdefault(key, []).append(p)
    for (k, normalize, window), ps in groups.items():
        sel = rows if len(ps) == hi - lo else rows[torch.as_tensor([p - lo for p in ps], device=rows.device)]
        one_each = torch.arange(sel.shape[0] + 1, device=sel.device, dtype=torch.int32)
        emb = ops.pool_last(sel, one_each, truncate_dim=k, normalize=normalize).float().cpu()  # (B', k)
        for r, p in enumerate(ps):
            j, u = entries[p]
            if window:
                j.add_window(u.row, emb[r].numpy(), u.weight)
            else:
                j.out[u.row] = emb[r]
