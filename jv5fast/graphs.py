"""CUDA graphs for short batches: one replay instead of ~10 kernel launches per layer.

A query of 20 tokens on small costs ~300 launches (28 layers x GEMMs, norms, RoPE, attention, SwiGLU);
at a few microseconds each the GPU idles between them, so short batches are launch-bound. For
batches of at most ``max_tokens`` tokens the engine replays a captured graph instead.

A graph has fixed shapes, so a batch of B texts and T tokens is padded up to a bucket (T_b, B_b):
B_b = next power of two >= B + 1, and T_b = the smallest of 64, 128, 256, 512, 768, 1024, ... (steps of
256 above 512, so at most ~1/3 of the rows are padding there) that is >= T + (B_b - B). The padding
forms B_b - B dummy sequences of the pad id after the real ones, its tokens spread evenly over them
(short dummies: little attention work); every op works within a sequence (attention) or a row
(everything else), so real rows never see padding, and the dummy rows are dropped. ``max_seqlen`` of a
bucket is T_b, an upper bound: the attention forward's grid is sized by tokens + sequences, not by it.

What a graph captures is addresses, so everything it reads must stay where it was at capture:
static input buffers (ids, positions, cu_seqlens: views of ``max_tokens``-long buffers), the RoPE
tables (each graph holds the ones it was captured with), and the weights — ``Backbone.set_linear`` copies a new task's merged weights into
the existing tensors, and bumps ``Backbone.version`` when it has to replace one, which drops every
graph. All graphs share one memory pool (they are replayed one at a time, under the engine's lock).

Each new bucket is captured after an eager run on the same static inputs (which also compiles the
Triton kernels outside the capture); the first replay must reproduce that run (cosine >= 0.999 per
row, finite where it was finite), else, or if capture raises, graphs are switched off for the engine
with a warning and batches run eagerly. ``emulate=True`` (tests on CPU) keeps every step but the
capture: a "replay" re-runs the eager forward on the static buffers.
"""
from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import torch

from .batching import PackedBatch

log = logging.getLogger("jv5fast")

GRAPH_MAX_TOKENS = 2048   # beyond this a batch is compute-bound and runs eagerly
GRAPH_MIN_TOKENS = 64
GRAPH_MAX_SEQS = 256      # batches of more texts (all tiny) run eagerly
PAD_ID = 0
_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process (each engine has its own lock)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def token_buckets(max_tokens: int = GRAPH_MAX_TOKENS):
    """64, 128, 256, 512, then steps of 256, up to ``max_tokens``."""
    out, t = [], GRAPH_MIN_TOKENS
    while t <= max_tokens:
        out.append(t)
        t = t * 2 if t < 512 else t + 256
    return out


def bucket(num_tokens: int, num_seqs: int, max_tokens: int = GRAPH_MAX_TOKENS, max_seqs: int = GRAPH_MAX_SEQS):
    """(T_b, B_b) for a batch of ``num_seqs`` texts and ``num_tokens`` tokens, or None if it is too big."""
    if num_seqs < 1 or num_tokens < num_seqs:
        raise ValueError(f"a batch needs >= 1 sequence and >= 1 token per sequence; got {num_seqs} "
                         f"sequences, {num_tokens} tokens")
    b = _next_pow2(num_seqs + 1)
    need = num_tokens + b - num_seqs
    t = next((t for t in token_buckets(max_tokens) if t >= need), None)
    if t is None or b > max_seqs:
        return None
    return t, b


def pad_layout(lengths, t_b: int, b_b: int):
    """Lengths of the B_b sequences of a bucket: the real ones, then B_b - B dummies sharing the remaining
    tokens evenly (each >= 1)."""
    lengths = [int(n) for n in lengths]
    n_dummy, pad = b_b - len(lengths), t_b - sum(lengths)
    if n_dummy < 1 or pad < n_dummy:
        raise ValueError(f"bucket ({t_b} tokens, {b_b} seqs) cannot hold {len(lengths)} texts of "
                         f"{sum(lengths)} tokens plus padding")
    q, r = divmod(pad, n_dummy)
    return lengths + [q + 1] * r + [q] * (n_dummy - r)


class _Graph:
    __slots__ = ("replay", "out", "keep")

    def __init__(self, replay, out, keep=None):
        self.replay, self.out = replay, out
        self.keep = keep  # tensors the graph reads that nothing else may keep alive (the RoPE tables)


class CudaGraphRunner:
    """Captures ``model.forward(batch, last_only=True)`` per bucket and replays it for short batches."""

    def __init__(self, model, max_tokens: int = GRAPH_MAX_TOKENS, *, max_seqs: int = GRAPH_MAX_SEQS,
                 emulate: bool = False):
        if not emulate and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        self.model, self.max_tokens, self.max_seqs, self.emulate = model, int(max_tokens), int(max_seqs), emulate
        dev = model.device
        self.ids = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.cu = torch.zeros(self.max_tokens + 1, dtype=torch.int32, device=dev)
        # Host staging (pinned on CUDA, so the three uploads are asynchronous; the engine reads every
        # result back to the host before the next upload, so a staging buffer is never overwritten early).
        pin = dev.type == "cuda"
        self._ids_h, self._pos_h, self._cu_h = (
            torch.zeros(n, dtype=dt, pin_memory=pin) for n, dt in
            ((self.max_tokens, torch.int64), (self.max_tokens, torch.int64), (self.max_tokens + 1, torch.int32)))
        model.rope_tables(self.max_tokens)   # grown once here, not inside a capture
        self.graphs: dict = {}
        self.pool = None
        self.version = model.version
        self.disabled = None  # reason, once graphs are off
        self.replays = 0
        self._stream = None  # the capture stream (CUDA), made on first capture

    # ---- static inputs ---------------------------------------------------------------------------
    def _load(self, seqs, t_b, b_b):
        lens = np.asarray(pad_layout([len(s) for s in seqs], t_b, b_b), dtype=np.int64)
        ids, pos, cu = self._ids_h.numpy()[:t_b], self._pos_h.numpy()[:t_b], self._cu_h.numpy()[:b_b + 1]
        n_real = sum(len(s) for s in seqs)
        ids[:n_real] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        ids[n_real:] = PAD_ID
        cu[0] = 0
        np.cumsum(lens, out=cu[1:])
        pos[:] = np.arange(t_b, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
        for dst, src, n in ((self.ids, self._ids_h, t_b), (self.pos, self._pos_h, t_b), (self.cu, self._cu_h, b_b + 1)):
            dst[:n].copy_(src[:n], non_blocking=True)

    def _batch(self, t_b, b_b) -> PackedBatch:
        return PackedBatch(self.ids[:t_b], self.pos[:t_b], self.cu[:b_b + 1], t_b)

    # ---- public ----------------------------------------------------------------------------------
    def run(self, seqs):
        """Last-token hidden rows (B, E) of ``seqs`` (lists of token ids) via a graph, or None when the
        batch is too big or graphs are off (the caller then runs eagerly). The rows are a view of the
        graph's output: read them before the next call."""
        if self.disabled is not None or not seqs:
            return None
        key = bucket(sum(len(s) for s in seqs), len(seqs), self.max_tokens, self.max_seqs)
        if key is None:
            return None
        self._check_version()
        self._load(seqs, *key)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(*key)
            if g is None:
                return None
            self.graphs[key] = g
        else:
            g.replay()
        self.replays += 1
        return g.out[:len(seqs)]

    def capture_all(self, max_tokens=None):
        """Capture every bucket up to ``max_tokens`` now (Engine.warmup). Returns how many exist."""
        limit = self.max_tokens if max_tokens is None else min(int(max_tokens), self.max_tokens)
        self._check_version()
        for t in token_buckets(limit):
            b = 2
            while b <= min(t, self.max_seqs) and self.disabled is None:
                if (t, b) not in self.graphs:
                    self._load([[PAD_ID]], t, b)
                    g = self._capture(t, b)
                    if g is not None:
                        self.graphs[(t, b)] = g
                b *= 2
        return len(self.graphs)

    def _check_version(self):
        if self.model.version != self.version:   # a weight tensor was replaced: addresses changed
            self._drop()
            self.version = self.model.version

    def _drop(self):
        """Forget every graph, and their pool with them (a new capture must not reuse its handle)."""
        self.graphs.clear()
        self.pool = None

    # ---- capture ---------------------------------------------------------------------------------
    def _disable(self, reason):
        self.disabled = reason
        self._drop()
        warnings.warn(f"jv5fast: CUDA graphs switched off for this engine ({reason}); batches run eagerly",
                      RuntimeWarning, stacklevel=4)

    def _capture(self, t_b, b_b):
        batch = self._batch(t_b, b_b)
        try:
            if self.emulate:
                eager = self.model.forward(batch, last_only=True).clone()
                out = self.model.forward(batch, last_only=True).clone()

                def replay():
                    out.copy_(self.model.forward(batch, last_only=True))
                g = _Graph(replay, out)
                g.replay()
            else:
                g, eager = self._capture_cuda(batch)
        except torch.OutOfMemoryError:
            # Transient: this batch runs eagerly (where the engine splits it on OOM); the bucket is
            # tried again next time.
            torch.cuda.empty_cache()
            log.info("out of memory capturing a (%d tokens, %d seqs) CUDA graph; running eagerly", t_b, b_b)
            return None
        except Exception as e:  # noqa: BLE001 — any other capture failure means: run eagerly
            self._disable(f"capturing a ({t_b} tokens, {b_b} seqs) graph failed: {type(e).__name__}: {e}")
            return None
        bad = self.check(g.out, eager)
        if bad:
            self._disable(f"a ({t_b} tokens, {b_b} seqs) graph's replay differs from the eager run: {bad}")
            return None
        # The model may later grow (replace) its RoPE tables for a longer eager batch; the graph still
        # reads the ones it was captured with.
        g.keep = self.model.rope_tables(t_b)
        log.debug("captured CUDA graph for (%d tokens, %d seqs)", t_b, b_b)
        return g

    def _capture_cuda(self, batch):
        dev = self.model.device
        with torch.cuda.device(dev):
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=dev)
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                # Eager run first: compiles every Triton kernel outside the capture; gives the check value.
                eager = self.model.forward(batch, last_only=True).clone()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One capture at a time in the process (engines have separate locks); our own stream, entered
            # outside torch.cuda.graph, so a failed capture_end cannot leave this thread on it.
            # thread_local: other threads' plain CUDA work does not invalidate the capture.
            with _CAPTURE_LOCK, torch.cuda.stream(side):
                with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                    out = self.model.forward(batch, last_only=True)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self.pool is None:
                self.pool = graph.pool()
            graph.replay()
        return _Graph(graph.replay, out), eager

    @staticmethod
    def check(out, eager) -> str:
        """'' if ``out`` reproduces ``eager`` (cosine >= 0.999 per row, finite where eager is), else why."""
        o, e = out.float(), eager.float()
        fin = torch.isfinite(e).all(1)
        if not bool((torch.isfinite(o).all(1) | ~fin).all()):
            rows = (~torch.isfinite(o).all(1) & fin).nonzero().flatten().tolist()
            return f"non-finite rows {rows[:8]}"
        cos = torch.nn.functional.cosine_similarity(o[fin], e[fin], dim=1)
        if cos.numel() and float(cos.min()) < 0.999:
            return f"cosine {float(cos.min()):.5f} < 0.999 at row {int(cos.argmin())}"
        return ""
