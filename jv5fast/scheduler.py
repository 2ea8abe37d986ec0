"""Dynamic batching over one Engine: the texts of many callers, one packed forward pass at a time.

Callers (the HTTP server, or Python code with ``await Batcher.embed(...)``) hand in jobs; tokenization runs
on a worker thread, never on the event loop; one scheduler thread owns the engine and cuts packed batches
of at most ``max_batch_tokens`` tokens from the queued texts, back to back under load, and waits at most
``max_wait_ms`` for company when a job arrives at an idle engine. A token-budget queue as in
text-embeddings-inference, plus what an embedding server with task adapters needs:

- one task per batch, the task of the job that leads it (below); with the tasks' merged weights resident
  (``Engine.keep_tasks_resident``) a switch swaps tensors, so alternating tasks never re-merge; without
  them (too little memory) the batcher stays on the merged task while the other tasks' jobs have waited
  less than ``SWITCH_WAIT_S``, so a switch (a re-merge) happens at most about once per second;
- fairness: small jobs (that fit one batch) and bulk ones never share a batch; small jobs go first, whole,
  in arrival order, and any job that has waited ``BULK_WAIT_S`` since it was last served leads the next
  batch (so neither kind starves the other); bulk jobs' texts take turns one at a time, so a 2,000-text
  job is spread over many batches; and while a batch of a bulk job runs, small jobs that arrive are run
  between two of its layers (nested, same thread), so they wait for one layer of it, not for the whole
  batch (on CPU a 512-token batch of nano takes ~0.8 s, a layer ~70 ms);
- a cancelled job (its caller went away) has its texts that have not started dropped;
- ``max_queue_tokens`` bounds the queue: a job that would overflow it is refused with ``Overloaded``
  (with a retry delay from the measured throughput), never queued without bound. What counts is the work
  that would run before the job: for a small job the small jobs queued and the texts in its tokenizer (bulk
  jobs run behind it), for a bulk job everything;
- ``overflow="chunk"`` (jv5fast/overflow.py): a text over ``max_length`` becomes a stream of windows, the
  job's units after its fitting texts. Windows are cut one at a time as batches take them (a 1M-token text
  holds its token ids, never all its windows), ride in batches like any bulk text (so with other texts'
  windows, behind small jobs), and are pooled per text by a running ``overflow.WeightedMean``. Such texts count
  at their real token count against the queue, and are tokenized on a second thread, so a megabyte document
  never holds up the tokenization of short requests.

Results equal ``Engine.embed`` of the same texts and options: the same tokenization, forward pass,
pooling and quantization, only the batch composition differs (row-wise ops; GEMMs agree to fp rounding).
Here: the callers' side (checks, tokenizer threads, admission) and the scheduler thread (which batch next);
what a job is, its units and windows and how its rows are pooled, is in jv5fast/scheduler_jobs.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from collections import deque

from .engine import CPU_BATCH_TOKENS
from .overflow import check_chunk_options, resolve_overflow
from .postprocess import check_precision, quantize
from .scheduler_jobs import EmbedResult, Job, Tokenized, check_ids, put_rows

log = logging.getLogger("jv5fast")


BULK_WAIT_S = 1.0  # a job bigger than one batch waits at most this long between batches while small jobs run
SWITCH_WAIT_S = 1.0  # without resident task weights, jobs of another task wait up to this long for a switch


class Overloaded(RuntimeError):
    """The queue holds more tokens than ``max_queue_tokens`` allows; try again in ``retry_after`` seconds."""

    def __init__(self, message, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(RuntimeError):
    """The batcher is draining or closed and takes no new work."""


class BatchFailed(RuntimeError):
    """The forward pass of a batch raised; every job in it fails with this (the cause is chained)."""


class Batcher:
    """Batches ``embed`` calls from many callers onto one engine (see the module docstring).

    ``max_batch_tokens`` defaults to the engine's (on CPU at most 512, where fp32 GEMMs run fastest);
    ``max_wait_ms`` is how long a job that finds the engine idle waits for company; ``max_queue_tokens``
    bounds the tokens waiting ("auto": 262,144 or 64 batches, whichever is more; None: unbounded), counting
    texts still being tokenized at ~4 characters a token but at most ``max_length`` each (what one text can
    cost once truncated, special tokens included; an over-long text with truncation off is refused), except
    in chunk mode, where a text costs all its tokens;
    ``resident_tasks`` is passed to ``Engine.keep_tasks_resident`` ("auto": when memory allows).
    ``observer(texts, tokens, forward_s, queue_waits)`` is called after each batch (metrics), from the
    scheduler thread."""

    def __init__(self, engine, *, max_batch_tokens=None, max_wait_ms=2.0, max_queue_tokens="auto",
                 resident_tasks="auto", observer=None):
        for name, v in (("max_batch_tokens", max_batch_tokens), ("max_queue_tokens", max_queue_tokens)):
            if v is not None and v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if max_batch_tokens == "auto":
            raise ValueError("max_batch_tokens must be a positive int or None, got 'auto'")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 1e4:
            raise ValueError(f"max_wait_ms must be a number in [0, 10000), got {max_wait_ms!r}")
        self.engine = engine
        if max_batch_tokens is None:
            max_batch_tokens = engine.max_batch_tokens
            if engine.device.type == "cpu":
                max_batch_tokens = min(max_batch_tokens, CPU_BATCH_TOKENS)
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000.0
        if max_queue_tokens == "auto":
            max_queue_tokens = max(2**18, 64 * max_batch_tokens)
        self.max_queue_tokens, self.observer = max_queue_tokens, observer
        self.resident = engine.keep_tasks_resident(resident_tasks) if resident_tasks else False
        self._cond = threading.Condition()
        self._queue = deque()       # jobs with texts not yet scheduled, in arrival order
        self._queued_tokens = 0     # tokens of those texts
        self._queued_small = 0      # the part of them in small jobs (that fit one batch: they run first)
        self._pending_tokens = 0    # estimated tokens of texts being tokenized (admitted, not yet queued)
        self._pending_long = 0      # the part of them on the second tokenizer thread (chunked long texts)
        self.failed = None          # why the scheduler thread died, if it did (nothing is served then)
        self._running = False       # a batch is in the engine (jobs out of the queue finish with it)
        self._active = {}           # id -> job, for the jobs of the batch(es) in the engine
        self._nested = False        # a small batch is running between two layers of a bulk one
        self._nested_s = 0.0        # seconds spent in nested batches (kept out of the outer one's time)
        self._closing = False
        self._stop = False
        self._rate = None           # tokens/s of recent batches (EMA), for Retry-After
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jv5fast-tokenize")
        # chunk mode: texts over max_length (tokenized twice, whole: seconds for a megabyte) on their own thread
        self._long_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jv5fast-tokenize-long")
        self._thread = threading.Thread(target=self._loop, name="jv5fast-batcher", daemon=True)
        self._thread.start()

    # ---- callers -------------------------------------------------------------------------------
    @property
    def queued_texts(self) -> int:
        """Sequences waiting for a batch: texts, a chunked text counting once per window."""
        with self._cond:
            return sum(j.units - j.next for j in self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def closing(self) -> bool:
        return self._closing

    def prepare(self, texts, *, task=None, prompt_name=None, prompt=None, truncate_dim=None, normalize=True,
                precision="float32"):
        """Check the options as ``Engine.embed`` does (its errors) and return ``(texts with the prompt
        prefixed, options)`` for ``submit_ids``; cheap, so it may run on an event loop."""
        eng = self.engine
        items = eng._check_texts(texts)
        check_precision(precision)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        opts = dict(task=eng.task if task is None else eng._check_task(task),
                    k=eng._check_truncate_dim(truncate_dim), normalize=normalize, precision=precision)
        prefix = eng._prefix(prompt_name, prompt)
        return [prefix + t for t in items], opts

    def tokenize(self, prefixed, truncate=True, *, prefix="", chunk_overlap=0) -> Tokenized:
        """Token ids of prompt-prefixed texts (a ``Tokenized``), as ``Engine.embed`` tokenizes them.
        ``truncate``: True / False (a text over ``max_length`` is then a ValueError naming its index, as in
        ``Engine.embed``), or an ``overflow`` policy; with "chunk" the over-long texts are tokenized whole and
        planned into windows of ``chunk_overlap`` tokens of overlap (``prefix``: the prompt every text starts
        with). Blocking: run it off the event loop."""
        eng = self.engine
        policy = truncate if isinstance(truncate, str) else resolve_overflow(None, truncate)
        if policy != "chunk":
            ids, flags = eng._encode(prefixed, policy == "truncate", label="input", fix="allow truncation to cut it",
                                     plural="inputs", flags=True)
            return Tokenized(ids, [i for i, t in enumerate(flags) if t])
        check_chunk_options(policy, chunk_overlap, False)
        if not all(t.startswith(prefix) for t in prefixed):
            raise ValueError("every prompt-prefixed text must start with prefix (the prompt)")
        ids, flags = eng._tokenize(prefixed, label="input")
        items = [t[len(prefix):] for t in prefixed]
        return Tokenized(ids, windows=eng._windows(prefix, items, ids, flags, chunk_overlap, label="input"))

    def submit_ids(self, ids, *, task, k, normalize=True, precision="float32", _admitted=False
                   ) -> concurrent.futures.Future:
        """Queue token id lists (from ``tokenize``: a ``Tokenized`` also brings the windows of chunked texts) and
        return a future of ``EmbedResult``. Cancelling the future drops the texts (and windows) that have not
        started. Raises ``Overloaded`` or ``Closed``."""
        windows = check_ids(ids, self.engine.args.vocab_size, self.engine.max_length, normalize)
        job = Job(ids, task, k, normalize, precision, windows, self.engine.dim, len(getattr(ids, "truncated", ())))
        with self._cond:
            if self._closing or self.failed:
                raise Closed(self.failed or "the server is shutting down and takes no new requests")
            if not ids:
                job.future.set_result(EmbedResult(quantize(job.out.numpy(), precision), 0))
                return job.future
            # an embed() call was admitted on its estimate; its check now counts only what is already queued
            # ahead of it, not requests admitted after it that are still being tokenized
            self._admit(job.tokens, pending=not _admitted)
            self._queue.append(job)
            self._queued_tokens += job.tokens
            if self._small(job):
                self._queued_small += job.tokens
            self._cond.notify_all()
        job.future.add_done_callback(lambda f: f.cancelled() and self._cancel(job))
        return job.future

    async def embed(self, texts, *, task=None, prompt_name=None, prompt=None, truncate_dim=None, normalize=True,
                    precision="float32", truncate=None, overflow=None, chunk_overlap=0) -> EmbedResult:
        """``Engine.embed`` through the batcher, awaitable: the same options (always a list of rows; no
        ``return_chunks``) and the same vectors. Cancelling the awaiting task drops the texts (and windows) that
        have not started."""
        policy = resolve_overflow(overflow, truncate)
        chunk_overlap = check_chunk_options(policy, chunk_overlap, False, normalize)
        prefixed, opts = self.prepare(texts, task=task, prompt_name=prompt_name, prompt=prompt,
                                      truncate_dim=truncate_dim, normalize=normalize, precision=precision)
        estimate = self.estimate_tokens(prefixed, chunk=policy == "chunk")
        long = policy == "chunk" and any(len(t) // 4 + 1 > self.engine.max_length for t in prefixed)
        with self._cond:  # admission before tokenizing: the tokenizer's backlog counts against the queue
            if self._closing or self.failed:
                raise Closed(self.failed or "the server is shutting down and takes no new requests")
            self._admit(estimate, estimate=True)
            self._pending_tokens += estimate
            self._pending_long += estimate if long else 0
        try:
            if policy == "chunk":
                prefix = self.engine._prefix(prompt_name, prompt)
                work = functools.partial(self.tokenize, prefixed, "chunk", prefix=prefix, chunk_overlap=chunk_overlap)
            else:  # the two-argument call (prefixed, truncate) that wrappers of tokenize (tests) expect
                work = functools.partial(self.tokenize, prefixed, policy == "truncate")
            loop = asyncio.get_running_loop()
            try:
                fut = loop.run_in_executor(self._long_pool if long else self._tok_pool, work)
            except RuntimeError:  # the pool was shut down by close() in the meantime
                raise Closed("the server is shutting down and takes no new requests") from None
            ids = await fut
        finally:
            with self._cond:
                self._pending_tokens -= estimate
                self._pending_long -= estimate if long else 0
        return await asyncio.wrap_future(self.submit_ids(ids, **opts, _admitted=True))

    def estimate_tokens(self, prefixed, chunk=False) -> int:
        """Tokens that prompt-prefixed texts can cost before they are tokenized: ~4 characters a token, but
        at most ``max_length`` a text (truncation cuts it there, special tokens included; with truncation
        off a longer text is refused), so one long text never counts as if it were queued whole. In chunk mode
        (``chunk=True``) a text costs all its tokens: every one of them is embedded."""
        if chunk:
            return sum(len(t) // 4 + 1 for t in prefixed)
        cap = self.engine.max_length
        return sum(min(cap, len(t) // 4 + 1) for t in prefixed)

    def _small(self, job) -> bool:
        """A small job fits one batch: it is taken whole, ahead of bulk jobs."""
        return job.tokens <= self.max_batch_tokens

    def _admit(self, tokens, estimate=False, pending=True):
        """Raise Overloaded if ``tokens`` more would overflow ``max_queue_tokens`` (under the lock), counting the
        work that runs before them: for a small request (it fits one batch) the small jobs queued and the texts
        in the short-text tokenizer, since small jobs go before bulk ones; for a bulk request everything queued
        and being tokenized. ``pending=False`` is the exact check of a call admitted on its estimate: it counts
        only the queued jobs of its kind (not those admitted after it). A request alone is never refused: an
        empty queue takes one of any size (``max_inputs`` and the request-size limit bound it)."""
        limit = self.max_queue_tokens
        if tokens <= self.max_batch_tokens:
            waiting = self._queued_small + (self._pending_tokens - self._pending_long if pending else 0)
        elif pending:
            waiting = self._queued_tokens + self._pending_tokens
        else:
            waiting = self._queued_tokens - self._queued_small
        if limit is not None and waiting > 0 and waiting + tokens > limit:
            wait = max(1, math.ceil(waiting / self._rate)) if self._rate else 1
            raise Overloaded(f"overloaded: {waiting} tokens are queued and this request adds "
                             f"{'about ' if estimate else ''}{tokens} "
                             f"(limit {limit}); retry in {wait} s", retry_after=wait)

    def _unqueue(self, job, tokens):
        """``tokens`` of ``job`` left the queue (under the lock)."""
        self._queued_tokens -= tokens
        if self._small(job):
            self._queued_small -= tokens

    def close(self, timeout=None) -> bool:
        """Stop taking work, finish every job already queued (up to ``timeout`` seconds), then stop the
        scheduler. Jobs still unfinished at the timeout fail with ``Closed``. Returns whether all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._queue or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            drained = not self._queue and not self._running
            for job in list(self._queue) + list(self._active.values()):
                self._fail(job, Closed("the server shut down before this request was embedded"))
            self._queue.clear()
            self._queued_tokens = self._queued_small = 0
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=None if drained else 1.0)
        self._tok_pool.shutdown(wait=False)
        self._long_pool.shutdown(wait=False)
        return drained

    # ---- scheduler thread ----------------------------------------------------------------------
    def _cancel(self, job):
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self._unqueue(job, job.left)  # its unscheduled texts and windows are dropped with it
                self._cond.notify_all()

    def _loop(self):
        try:
            self._schedule()
        except BaseException as e:  # noqa: BLE001 — a bug here must not leave callers waiting forever
            log.exception("the batcher's scheduler thread died")
            with self._cond:
                self.failed = f"the embedding scheduler failed ({type(e).__name__}); see the server log"
                for job in list(self._queue) + list(self._active.values()):
                    self._fail(job, Closed(self.failed))
                self._queue.clear()
                self._queued_tokens = self._queued_small = 0
                self._cond.notify_all()

    def _schedule(self):
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                # A job that found the engine idle waits up to max_wait for company (under load the oldest
                # job has waited longer than that already, so batches run back to back).
                deadline = self._queue[0].submitted + self.max_wait
                while self._queued_tokens < self.max_batch_tokens and not self._stop and self._queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue:
                    continue
                task, entries, waits = self._take()
            self._run(task, entries, waits)

    def _take(self):
        """Cut the next batch (under the lock). Small jobs (that fit one batch) and bulk jobs never share a
        batch, or the small ones would wait for a whole bulk batch. The batch's kind and task are those of the
        first of: the job that has waited longest past ``BULK_WAIT_S`` since it was last served (so neither
        kind can starve the other, whatever the task), else the oldest small job, else the bulk job to serve
        next (not started first, then least recently served). That job goes first; small jobs are taken whole,
        first come first served, while they fit; bulk jobs take turns one unit (a text, or a window of a chunked
        one) at a time."""
        budget, now = self.max_batch_tokens, time.monotonic()

        def turn(j):
            return (j.started is not None, j.served)
        starved = [j for j in self._queue if now - j.served > BULK_WAIT_S]
        if starved:
            first = min(starved, key=lambda j: j.served)
        else:
            first = min([j for j in self._queue if j.tokens <= budget] or self._queue, key=turn)
        bulk = first.tokens > budget
        task, current = first.task, self.engine._active
        if (not starved and not self.resident and task != current and any(j.task == current for j in self._queue)
                and now - min(j.submitted for j in self._queue if j.task != current) < SWITCH_WAIT_S):
            task = current  # without resident weights a switch re-merges: stay while others can wait
            bulk = not any(j.task == task and j.tokens <= budget for j in self._queue)
        jobs = sorted((j for j in self._queue if j.task == task and (j.tokens > budget) == bulk),
                      key=lambda j: (j is not first, turn(j)))
        entries, waits, used = [], [], 0

        def take(j):
            nonlocal used
            if j.started is None:
                j.started = now
                waits.append(now - j.submitted)
            j.served = now
            u = j.take()
            entries.append((j, u))
            used += len(u.seq)
            self._unqueue(j, len(u.seq))
        if not bulk:  # whole jobs, first come first served (none skipped, so none can be overtaken for good)
            for j in jobs:
                if entries and used + j.tokens > budget:
                    break
                while j.peek is not None:
                    take(j)
        else:
            progress = True
            while progress and used < budget:
                progress = False
                for j in jobs:
                    if j.peek is not None and (not entries or used + len(j.peek.seq) <= budget):
                        take(j)
                        progress = True
                        if used >= budget:
                            break
        for j in jobs:
            if j.peek is None:
                self._queue.remove(j)
        self._running = True
        return task, entries, waits

    def _run(self, task, entries, waits):
        try:
            bulk = any(j.tokens > self.max_batch_tokens for j, _ in entries)
            self._run_batch(task, entries, waits, between=(lambda: self._between_layers(task)) if bulk else None)
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()

    def _between_layers(self, outer_task):
        """Between two layers of a bulk batch: run the small jobs (each fits one batch) that have not
        started, as one nested batch of one task, then give the outer batch its task back. Without resident
        task weights only jobs of the outer batch's task qualify (a switch would re-merge twice)."""
        if self._nested:
            return
        with self._cond:
            task, entries, waits, used, now = None, [], [], 0, time.monotonic()
            for j in self._queue:
                if j.started is not None or j.tokens > self.max_batch_tokens:
                    continue
                if task is None and (self.resident or j.task == outer_task):
                    task = j.task
                if j.task != task or used + j.tokens > self.max_batch_tokens:
                    continue
                j.started = now
                waits.append(now - j.submitted)
                while j.peek is not None:
                    entries.append((j, j.take()))
                used += j.tokens
            if not entries:
                return
            for j in {id(j): j for j, _ in entries}.values():
                self._queue.remove(j)
                self._unqueue(j, j.tokens)
        self._nested, t0 = True, time.perf_counter()
        try:
            self._run_batch(task, entries, waits)
        finally:
            self._nested = False
            self._nested_s += time.perf_counter() - t0
            if task != outer_task:
                self.engine._activate(outer_task)

    def _run_batch(self, task, entries, waits, between=None):
        eng = self.engine
        seqs = [u.seq for _, u in entries]
        t0, nested0 = time.perf_counter(), self._nested_s
        with self._cond:
            self._active.update((id(j), j) for j, _ in entries)
        try:
            with eng._lock, eng._on_device():
                eng._activate(task)
                eng._forward(seqs, lambda lo, hi, rows: put_rows(entries, lo, hi, rows), between=between)
        except Exception as e:  # noqa: BLE001 — the error goes to every caller in the batch
            log.exception("batch of %d texts failed", len(entries))
            with self._cond:
                for j in {id(j): j for j, _ in entries}.values():
                    if j in self._queue:
                        self._queue.remove(j)
                        self._unqueue(j, j.left)
                    err = BatchFailed(f"embedding failed on the server ({type(e).__name__}); see the server log")
                    err.__cause__ = e
                    self._fail(j, err)
                    self._active.pop(id(j), None)
                self._cond.notify_all()
            return
        dt = time.perf_counter() - t0 - (self._nested_s - nested0)
        tokens = sum(len(s) for s in seqs)
        finished = []
        with self._cond:
            rate = tokens / max(dt, 1e-6)
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
            for j, _ in entries:
                j.done += 1
                if j.done == j.units:
                    finished.append(j)
            for j, _ in entries:
                self._active.pop(id(j), None)
        for j in finished:
            self._finish(j)
        if self.observer is not None:
            try:
                self.observer(len(seqs), tokens, dt, waits)
            except Exception:  # noqa: BLE001 — metrics never fail a batch
                log.exception("batch observer failed")

    def _finish(self, job):
        if job.cancelled:
            return
        result, error = job.result(self.engine.dtype)
        with self._cond:  # close() may fail the same future from another thread
            if job.future.done() or not job.future.set_running_or_notify_cancel():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _fail(self, job, exc):
        with self._cond:
            if not job.future.done() and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
