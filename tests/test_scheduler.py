"""Batcher (jv5fast/scheduler.py): the vectors of many concurrent callers equal ``Engine.embed`` of the same
texts and options, whatever batch they rode in; plus what a shared server needs: resident task weights,
fairness, cancellation, a bounded queue, errors that reach exactly the jobs they belong to, and close().

Ordering is made deterministic by holding the engine lock: the scheduler thread can then cut a batch but not
run it, so the test decides what is queued when. Every wait has a timeout so a scheduler bug fails the test
instead of hanging the suite. References are separate engines on the same checkpoint (conftest ``engines``).
"""
import asyncio
import concurrent.futures
import contextlib
import re
import threading
import time

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast.postprocess import quantize
from jv5fast.scheduler import BatchFailed, Batcher, Closed, EmbedResult, Overloaded

BUDGET = 48      # max_batch_tokens: small, so that calls share batches and long texts split them
WAIT_S = 30.0    # the longest any single wait may take
TASKS = ("retrieval", "text-matching", "clustering", "classification")
PRECISIONS = ("float32", "float16", "binary", "ubinary")
WORDS = ("light", "speed", "of", "the", "vacuum", "Ünïcödé", "東京", "🚀", "x", "42", "constant", "nature",
         "e\u0301", "documents", "query")


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, int(n_words)))


def _texts(rng, n, lo=1, hi=14):
    return [_text(rng, rng.integers(lo, hi)) for _ in range(n)]


# ---- harness -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(ckpt_factory):
    """Engines the batchers run on (one per family, built on first use), separate from the references."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = jv5fast.Engine(ckpt_factory(family), device="cpu")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def short_engine(nano_ckpt):
    """max_length=16, so a truncation error needs no 8k-token text."""
    return jv5fast.Engine(nano_ckpt, device="cpu", max_length=16)


@contextlib.contextmanager
def _serving(engine, **kw):
    kw.setdefault("max_batch_tokens", BUDGET)
    b = Batcher(engine, **kw)
    try:
        yield b
    finally:
        b.close(timeout=WAIT_S)


@contextlib.contextmanager
def _held(engine):
    """Hold the engine lock: the scheduler can cut the next batch but not run it until the block exits."""
    assert engine._lock.acquire(timeout=WAIT_S), "engine lock not free"
    try:
        yield
    finally:
        engine._lock.release()


def _wait_until(pred, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


async def _async_wait_until(pred, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def _submit(b, texts, truncate=True, **options):
    """The deterministic path: check, tokenize and queue on this thread; returns (token id lists, future)."""
    prefixed, opts = b.prepare(texts, **options)
    ids = b.tokenize(prefixed, truncate)
    return ids, b.submit_ids(ids, **opts)


def _block_scheduler(b, engine):
    """With the engine lock held: queue a one-text job and wait until the scheduler has cut it into a batch
    (so it waits for the lock and everything queued from now on stays queued). Returns its future."""
    _, fut = _submit(b, ["a blocker"])
    _wait_until(lambda: b.queued_tokens == 0, "the scheduler to cut the blocker's batch")
    return fut


class _ForwardLog:
    """Wraps ``engine._forward`` and records each batch's token id lists: the very list objects the jobs hold
    (``Batcher.tokenize`` output), so a job's texts are recognised by identity."""

    def __init__(self, engine, monkeypatch):
        self.batches = []
        inner = engine._forward

        def spy(seqs, consume, *a, **kw):
            self.batches.append(list(seqs))
            return inner(seqs, consume, *a, **kw)

        monkeypatch.setattr(engine, "_forward", spy)

    def count(self, ids):
        """How many texts of ``ids`` reached the engine."""
        want = {id(s) for s in ids}
        return sum(id(s) in want for batch in self.batches for s in batch)

    def first_batch_with(self, ids):
        want = {id(s) for s in ids}
        return next((n for n, batch in enumerate(self.batches) if any(id(s) in want for s in batch)), None)


def _count_submits(b):
    """Wrap ``b.submit_ids`` (which ``b.embed`` calls) to record (ids, future) of every accepted job."""
    subs, inner = [], b.submit_ids

    def counting(ids, **kw):
        fut = inner(ids, **kw)
        subs.append((ids, fut))
        return fut

    b.submit_ids = counting
    return subs


def _assert_matches(got, ref, texts, *, precision="float32", normalize=True, **opts):
    """``got`` equals ``ref.embed(texts, ...)`` with the same options.

    Only the batch composition differs from the reference, which changes GEMM rounding and nothing else.
    fp32 engines, unit rows: max abs diff <= 1e-6 x D/k (a k-dim Matryoshka prefix renormalized). Raw rows (normalize=False) reach |x| ~ 3.5, where
    Engine.embed itself differs by ~4e-6 between two batch compositions (measured): 2e-6 times the row's
    scale. bf16 engines: two bf16 epsilons (measured ~2e-3). float16: the reference's cast within one fp16
    ulp (a last-bit difference can round the other way). binary/ubinary: byte-identical, except a sign bit
    whose float value lies within the tolerance of zero. The reference's quantization is ``quantize`` of its
    floats, as in Engine.embed."""
    f = ref.embed(texts, normalize=normalize, **opts)
    want = quantize(f, precision)
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, \
        (got.dtype, got.shape, want.dtype, want.shape)
    if not len(texts):
        return
    # Renormalizing a Matryoshka prefix of k of D dims scales the rounding error up by about D/k.
    unit = (1e-6 if ref.dtype == torch.float32 else 2 * 2.0 ** -7) * ref.dim / f.shape[1]
    tol = unit if normalize else 2 * unit * np.maximum(1.0, np.abs(f).max(axis=1, keepdims=True))
    tol = np.broadcast_to(tol, f.shape)
    if precision == "float32":
        err = np.abs(got - f)
        assert (err <= tol).all(), f"max abs diff {err.max():.3g} (tol {tol.max():.3g}), options {opts}"
    elif precision == "float16":
        err = np.abs(got.astype(np.float32) - want.astype(np.float32))
        ulp = np.spacing(np.abs(want)).astype(np.float32)
        assert (err <= ulp + tol).all(), f"float16 differs by {err.max():.3g}, options {opts}"
    else:
        to_ub = (lambda a: a.view(np.uint8) ^ np.uint8(0x80)) if precision == "binary" else (lambda a: a)
        flips = np.unpackbits(to_ub(got) ^ to_ub(want), axis=1)
        k = f.shape[1]
        assert not flips[:, k:].any(), "padding bits set"
        flipped = flips[:, :k].astype(bool)
        assert (np.abs(f[flipped]) <= tol[flipped]).all(), \
            f"{flipped.sum()} sign bits differ, not all at near-zero values; options {opts}"


# ---- 1. equality under concurrency, mixed options ------------------------------------------------------
@pytest.mark.parametrize("family,seed", [("nano", 11), ("small", 12)])
def test_concurrent_embeds_equal_engine_embed_with_mixed_options(served, engines, monkeypatch, family, seed):
    eng, ref = served(family), engines[family]
    rng = np.random.default_rng(seed)
    long_text = _text(rng, 70)
    assert len(ref.tokenize(long_text, prompt_name="query")) > BUDGET  # it must travel alone
    prompts, dims = ("query", "document", None), (7, 32, None, 63)
    calls = []
    for c in range(34):
        texts = _texts(rng, int(rng.choice([1, 1, 2, 3, 6])))
        if c in (5, 22):
            texts.insert(int(rng.integers(0, len(texts) + 1)), long_text)
        if c in (9, 23):
            texts.append("")
        if c == 13:
            texts = []
        opts = dict(task=TASKS[c % 4], prompt_name=prompts[c % 3], truncate_dim=dims[int(rng.integers(4))],
                    normalize=bool(rng.integers(2)), precision=PRECISIONS[(c // 4) % 4])
        calls.append((texts, opts))
    # the grid really covers every option value
    for key, values in (("task", TASKS), ("prompt_name", prompts), ("truncate_dim", dims),
                        ("normalize", (True, False)), ("precision", PRECISIONS)):
        assert {o[key] for _, o in calls} == set(values), key

    observed = []
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng, observer=lambda n, tokens, dt, waits: observed.append((n, tokens))) as b:
        subs = _count_submits(b)

        async def main():
            with _held(eng):  # everything is queued before the second batch is cut
                pending = [asyncio.ensure_future(b.embed(texts, **opts)) for texts, opts in calls]
                await _async_wait_until(lambda: len(subs) == len(calls), "every call to be queued")
            return await asyncio.gather(*pending)

        results = _run(main())

    # references grouped by task: the reference engine re-merges on every task switch
    for c in sorted(range(len(calls)), key=lambda c: calls[c][1]["task"]):
        (texts, opts), res = calls[c], results[c]
        assert isinstance(res, EmbedResult)
        _assert_matches(res.embeddings, ref, texts, **opts)
        assert res.tokens == sum(len(ids) for ids in ref.tokenize(texts, prompt_name=opts["prompt_name"]))
    # which call each forwarded text belongs to, by the identity of its token id list
    call_of = {}
    for ids, fut in subs:
        c = next(c for c, r in enumerate(results) if fut.result(0) is r)
        call_of.update({id(seq): c for seq in ids})
    n_texts = sum(len(texts) for texts, _ in calls)
    batches = [[call_of[id(seq)] for seq in batch] for batch in log.batches]
    # every text ran exactly once; no batch over the budget unless it is one over-long text alone
    want_calls = sorted(c for c, (texts, _) in enumerate(calls) for _ in texts)
    assert sorted(c for batch in batches for c in batch) == want_calls
    assert sum(n for n, _ in observed) == n_texts and len(observed) == len(batches)
    assert sum(t for _, t in observed) == sum(r.tokens for r in results)
    assert sorted(observed) == sorted((len(b), sum(map(len, b))) for b in log.batches)
    for n, tokens in observed:
        assert tokens <= BUDGET or n == 1, (n, tokens)
    assert any(n == 1 and tokens > BUDGET for n, tokens in observed)
    # one task per batch, and calls really shared batches
    for batch in batches:
        assert len({calls[c][1]["task"] for c in batch}) == 1
    assert max(len(set(batch)) for batch in batches) > 1


# ---- 2. resident task weights ---------------------------------------------------------------------------
class _MergeSpy:
    """Counts adapter merges (``LoraAdapter.delta``) and layer writes (``Backbone.set_linear``)."""

    def __init__(self, eng, monkeypatch):
        self.deltas = self.sets = 0
        for adapter in eng._adapters.values():
            delta = adapter.delta

            def counted(key, _delta=delta):
                self.deltas += 1
                return _delta(key)

            monkeypatch.setattr(adapter, "delta", counted)
        set_linear = eng.model.set_linear

        def counted_set(*a, **kw):
            self.sets += 1
            return set_linear(*a, **kw)

        monkeypatch.setattr(eng.model, "set_linear", counted_set)

    def reset(self):
        self.deltas = self.sets = 0


@pytest.mark.parametrize("family,dtype", [("nano", "float32"), ("small", "bfloat16")])
def test_resident_tasks_switch_without_merging_and_equal_a_fresh_engine(ckpt_factory, monkeypatch, family,
                                                                        dtype):
    """fp32 on CPU also swaps the oneDNN-prepacked copies; bf16 has none."""
    ck = ckpt_factory(family)
    fresh = jv5fast.Engine(ck, device="cpu", dtype=dtype)
    rng = np.random.default_rng(21)
    texts = _texts(rng, 5) + [""]
    want = {t: fresh.embed(texts, task=t) for t in TASKS}
    eng = jv5fast.Engine(ck, device="cpu", dtype=dtype)
    with pytest.raises(ValueError, match="enable must be True, False or 'auto'"):
        eng.keep_tasks_resident("yes")
    assert eng.keep_tasks_resident(True) is True
    assert eng.keep_tasks_resident(True) is True  # idempotent
    spy = _MergeSpy(eng, monkeypatch)
    order = [TASKS[i % 4] for i in range(11)]  # 10 switches, every task, back and forth
    order[5:] = order[5:][::-1]
    for t in order:
        np.testing.assert_array_equal(eng.embed(texts, task=t), want[t], err_msg=t)
    assert (spy.deltas, spy.sets) == (0, 0)

    # dropped: the same vectors, now by re-merging (which shows the spy does see merges)
    assert eng.keep_tasks_resident(False) is False
    for t in order:
        np.testing.assert_array_equal(eng.embed(texts, task=t), want[t], err_msg=t)
    assert spy.deltas > 0 and spy.sets > 0

    # resident again (built from whatever the layers hold now), and through a Batcher
    assert eng.keep_tasks_resident(True) is True
    spy.reset()
    with _serving(eng, resident_tasks=True) as b:
        assert b.resident is True
        subs = _count_submits(b)

        async def main():
            with _held(eng):
                pending = [asyncio.ensure_future(b.embed(texts, task=t)) for t in order]
                await _async_wait_until(lambda: len(subs) == len(order), "every call to be queued")
            return await asyncio.gather(*pending)

        results = _run(main())
    for t, res in zip(order, results):
        _assert_matches(res.embeddings, fresh, texts, task=t)
    assert (spy.deltas, spy.sets) == (0, 0)
    np.testing.assert_array_equal(eng.embed(texts, task="clustering"), want["clustering"])


def test_keep_tasks_resident_is_false_without_several_adapters(ckpt_factory):
    merged = jv5fast.Engine(ckpt_factory("nano", seed=43, merged_task="classification"), device="cpu")
    assert merged.keep_tasks_resident(True) is False
    one = jv5fast.Engine(ckpt_factory("nano", seed=23, tasks=("retrieval",)), device="cpu")
    assert one.keep_tasks_resident(True) is False
    with _serving(merged, resident_tasks=True) as b:
        assert b.resident is False
        res = _run(b.embed(["a merged checkpoint", "x"]))
    _assert_matches(res.embeddings, merged, ["a merged checkpoint", "x"])


# ---- 3. fairness -----------------------------------------------------------------------------------------
def _big_then_small(b, eng, big_texts, small_texts):
    """Queue a big job, let the scheduler cut its first batch, then queue a small job; all under the engine
    lock. Returns (big ids, big future, small ids, small future, completion order)."""
    done = []
    with _held(eng):
        big_ids, fbig = _submit(b, big_texts)
        _wait_until(lambda: b.queued_texts < len(big_texts), "the first batch to be cut")
        small_ids, fsmall = _submit(b, small_texts)
        fbig.add_done_callback(lambda f: done.append("big"))
        fsmall.add_done_callback(lambda f: done.append("small"))
    concurrent.futures.wait([fbig, fsmall], timeout=WAIT_S)
    return big_ids, fbig, small_ids, fsmall, done


@pytest.mark.parametrize("n_small", [1, 9])
def test_small_job_rides_in_the_next_batch_after_a_big_job(served, engines, monkeypatch, n_small):
    """1 text: it may also run between two layers of the big job's batch. 9 texts (more tokens than a batch
    holds, so never run between layers): the round-robin takes one of its texts into every batch."""
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(31)
    big_texts, small_texts = _texts(rng, 300, 1, 5), _texts(rng, n_small, 3, 8)
    if n_small > 1:
        assert sum(map(len, eng.tokenize(small_texts))) > BUDGET
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng) as b:
        _, fbig, small_ids, fsmall, done = _big_then_small(b, eng, big_texts, small_texts)
    assert log.first_batch_with(small_ids) in (0, 1), log.first_batch_with(small_ids)
    assert len(log.batches) > 10  # the big job really was spread over many batches
    assert done == ["small", "big"]
    _assert_matches(fsmall.result(0).embeddings, ref, small_texts)
    _assert_matches(fbig.result(0).embeddings, ref, big_texts)


def test_one_over_long_text_job_is_not_starved_by_an_older_big_job(served, engines, monkeypatch):
    eng, ref = served("nano"), engines["nano"]
    big_texts = [f"short text {i}" for i in range(300)]
    small_texts = [" ".join(["light"] * 60)]
    if len(eng.tokenize(small_texts[0])) <= BUDGET:
        pytest.fail("the one text must be longer than the budget; the precondition changed")
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng) as b:
        _, _, small_ids, fsmall, done = _big_then_small(b, eng, big_texts, small_texts)
    _assert_matches(fsmall.result(0).embeddings, ref, small_texts)
    assert log.first_batch_with(small_ids) in (0, 1), log.first_batch_with(small_ids)
    assert done == ["small", "big"]


@pytest.mark.parametrize("resident,small_task,nested", [
    (True, "clustering", True),    # another task: swapped in and out between two layers
    (False, "retrieval", True),    # without resident weights only the outer batch's task qualifies
    (False, "clustering", False),
])
def test_small_job_runs_between_layers_of_a_bulk_batch(served, engines, monkeypatch, resident, small_task,
                                                       nested):
    """A small job (it fits one batch) that arrives while a batch of a bulk job runs is embedded between two
    of that batch's layers; the bulk batch then goes on with its own task's weights, without a re-merge."""
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(35)
    big_texts, small_texts = _texts(rng, 40), _texts(rng, 2, 1, 4)
    seen, inner = {}, eng._forward

    def hooked(seqs, consume, *a, between=None, **kw):
        if between is None or "small" in seen:
            return inner(seqs, consume, *a, between=between, **kw)

        def between_hook():  # the small job arrives while the bulk batch is between layers 0 and 1
            if "small" not in seen:
                # submitted from another thread, as a caller does (this one is inside inference mode)
                def arrive():
                    seen["small"] = _submit(b, small_texts, task=small_task)[1]

                caller = threading.Thread(target=arrive)
                caller.start()
                caller.join(WAIT_S)
                between()
                seen["done_in_between"] = seen["small"].done()
            else:
                between()

        return inner(seqs, consume, *a, between=between_hook, **kw)

    monkeypatch.setattr(eng, "_forward", hooked)
    with _serving(eng, resident_tasks=resident) as b:
        if not resident:
            assert eng.keep_tasks_resident(False) is False
        spy = _MergeSpy(eng, monkeypatch)
        with _held(eng):
            _, fbig = _submit(b, big_texts, task="retrieval")
            _wait_until(lambda: b.queued_texts < len(big_texts), "the first (bulk) batch to be cut")
        fbig.result(WAIT_S)
        assert "small" in seen, "the bulk batch never called between()"
        fsmall = seen["small"]
        assert seen["done_in_between"] is nested
        _assert_matches(fsmall.result(WAIT_S).embeddings, ref, small_texts, task=small_task)
        _assert_matches(fbig.result(0).embeddings, ref, big_texts, task="retrieval")
        if resident or small_task == "retrieval":  # no switch, or a resident one: nothing re-merged
            assert (spy.deltas, spy.sets) == (0, 0)


# ---- 4. cancellation -------------------------------------------------------------------------------------
def test_cancelled_queued_job_never_reaches_the_engine(served, engines, monkeypatch):
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(41)
    big_texts, other_texts = _texts(rng, 40), _texts(rng, 3)
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            big_ids, fbig = _submit(b, big_texts, task="clustering")
            assert b.queued_tokens == sum(map(len, big_ids)) and b.queued_texts == len(big_texts)
            assert fbig.cancel()
            assert b.queued_tokens == 0 and b.queued_texts == 0
            other_ids, fother = _submit(b, other_texts, truncate_dim=32)
        _assert_matches(fother.result(WAIT_S).embeddings, ref, other_texts, truncate_dim=32)
        fblock.result(WAIT_S)
        # a later job of the cancelled job's task is fine too
        later_ids, flater = _submit(b, big_texts[:5], task="clustering")
        _assert_matches(flater.result(WAIT_S).embeddings, ref, big_texts[:5], task="clustering")
    assert fbig.cancelled()
    assert log.count(big_ids) == 0
    assert log.count(other_ids) == len(other_texts) and log.count(later_ids) == 5
    assert b.queued_tokens == 0


def test_cancelled_running_job_drops_only_its_unstarted_texts(served, engines, monkeypatch):
    eng, ref = served("small"), engines["small"]
    rng = np.random.default_rng(42)
    big_texts, other_texts = _texts(rng, 60), _texts(rng, 2)
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng) as b:
        with _held(eng):
            big_ids, fbig = _submit(b, big_texts)
            _wait_until(lambda: b.queued_texts < len(big_texts), "the first batch to be cut")
            started = len(big_texts) - b.queued_texts
            assert 0 < started < len(big_texts)
            assert fbig.cancel()
            assert b.queued_tokens == 0 and b.queued_texts == 0
        other_ids, fother = _submit(b, other_texts)
        _assert_matches(fother.result(WAIT_S).embeddings, ref, other_texts)
    assert log.count(big_ids) == started and log.count(other_ids) == len(other_texts)
    assert fbig.cancelled()


def test_cancelling_the_awaiting_task_drops_its_texts(served, engines, monkeypatch):
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(43)
    big_texts, other_texts = _texts(rng, 30), _texts(rng, 3)
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng) as b:
        subs = _count_submits(b)

        async def main():
            with _held(eng):
                blocker = asyncio.ensure_future(b.embed(["a blocker"]))
                await _async_wait_until(lambda: len(subs) == 1 and b.queued_tokens == 0,
                                        "the blocker's batch to be cut")
                big = asyncio.ensure_future(b.embed(big_texts, prompt_name="query"))
                await _async_wait_until(lambda: len(subs) == 2, "the big job to be queued")
                assert b.queued_tokens == sum(map(len, subs[1][0]))
                big.cancel()
                await _async_wait_until(lambda: b.queued_tokens == 0, "the cancelled job to leave the queue")
                assert subs[1][1].cancelled()
            with pytest.raises(asyncio.CancelledError):
                await big
            await blocker
            return await b.embed(other_texts)

        res = _run(main())
    _assert_matches(res.embeddings, ref, other_texts)
    assert log.count(subs[1][0]) == 0 and log.count(subs[2][0]) == len(other_texts)


# ---- 5. overload -----------------------------------------------------------------------------------------
def test_overload_refuses_a_job_that_would_overflow_the_queue(served, engines):
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(51)
    queued_texts, refused_texts = _texts(rng, 6), _texts(rng, 4)
    tq = sum(map(len, eng.tokenize(queued_texts)))
    tr = sum(map(len, eng.tokenize(refused_texts)))
    limit = max(tq, tr) + min(tq, tr) // 2  # each fits alone, not both
    assert tq <= limit < tq + tr and tr <= limit
    with _serving(eng, max_queue_tokens=limit) as b:
        for _ in range(2):  # the second time the retry delay comes from the measured rate
            with _held(eng):
                fblock = _block_scheduler(b, eng)
                _, fq = _submit(b, queued_texts)
                assert b.queued_tokens == tq
                msg = rf"{tq} tokens are queued .* adds {tr} \(limit {limit}\)"
                with pytest.raises(Overloaded, match=msg) as e:
                    _submit(b, refused_texts)
                assert isinstance(e.value.retry_after, int) and e.value.retry_after >= 1
                with pytest.raises(Overloaded):
                    _run(b.embed(refused_texts))
                assert b.queued_tokens == tq  # refusals leave no trace
            fblock.result(WAIT_S)
            _assert_matches(fq.result(WAIT_S).embeddings, ref, queued_texts)
            _wait_until(lambda: b.queued_tokens == 0, "the queue to drain")
            # drained: the refused job is accepted now
            _, fr = _submit(b, refused_texts)
            _assert_matches(fr.result(WAIT_S).embeddings, ref, refused_texts)
            assert b._rate is not None


# ---- 6. errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts,kw", [
    (["text"], dict(task="retreival")),
    (["text"], dict(task=3)),
    (["text"], dict(truncate_dim=0)),
    (["text"], dict(truncate_dim=65)),
    (["text"], dict(truncate_dim=3.5)),
    (["text"], dict(precision="int4")),
    (["text"], dict(prompt_name="passage")),
    (["ok", 3], {}),
    (["ok", "fine", None], {}),
    (None, {}),
    (b"bytes", {}),
])
def test_bad_options_raise_as_engine_embed_does(served, engines, texts, kw):
    eng, ref = served("nano"), engines["nano"]
    with pytest.raises(Exception) as want:
        ref.embed(texts, **kw)
    with _serving(eng) as b:
        with pytest.raises(type(want.value)) as got:
            _run(b.embed(texts, **kw))
        assert str(got.value) == str(want.value)
        assert b.queued_tokens == 0
        assert _run(b.embed(["still serving"])).embeddings.shape == (1, 64)


def test_batcher_only_errors_name_the_input(served, short_engine):
    with _serving(short_engine) as b:
        with pytest.raises(TypeError, match="normalize must be a bool, got str"):
            _run(b.embed(["text"], normalize="yes"))
        long = "word " * 40
        with pytest.raises(ValueError, match=r"input\[1\] has \d+ tokens \(prompt included\), more than "
                                             r"max_length=16.*\(2 inputs are too long\)"):
            _run(b.embed(["short", long, "x", long], truncate=False))
        # truncated by default, as Engine.embed does
        res = _run(b.embed(["short", long]))
        _assert_matches(res.embeddings, short_engine, ["short", long])
        assert res.tokens == 16 + len(short_engine.tokenize("short"))
        assert b.queued_tokens == 0
    with _serving(served("small")) as b, pytest.raises(ValueError, match=r"input\[1\] produced no tokens"):
        _run(b.embed(["a", ""], prompt=""))


@pytest.mark.parametrize("kw,msg", [
    (dict(max_batch_tokens=0), "max_batch_tokens must be a positive int"),
    (dict(max_batch_tokens=True), "max_batch_tokens must be a positive int"),
    (dict(max_batch_tokens=4.5), "max_batch_tokens must be a positive int"),
    (dict(max_queue_tokens=-1), "max_queue_tokens must be a positive int"),
    (dict(max_wait_ms=-1), r"max_wait_ms must be a number in \[0, 10000\)"),
    (dict(max_wait_ms=1e4), r"max_wait_ms must be a number"),
    (dict(max_wait_ms=True), r"max_wait_ms must be a number"),
])
def test_bad_batcher_arguments(served, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Batcher(served("nano"), **kw)


def test_forward_error_fails_every_job_of_its_batch_and_serving_goes_on(served, engines, monkeypatch):
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(61)
    forward, calls = eng.model.forward, []

    def flaky(batch, **kw):
        calls.append(batch.num_seqs)
        if len(calls) == 2:  # the batch after the blocker's
            raise RuntimeError("simulated kernel failure")
        return forward(batch, **kw)

    monkeypatch.setattr(eng.model, "forward", flaky)
    # two bulk jobs (each more than one batch: small and bulk jobs never share a batch), so the failing batch
    # holds texts of both and leaves part of each queued
    a_texts, c_texts, later_texts = _texts(rng, 30), _texts(rng, 30), _texts(rng, 2)
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            a_ids, fa = _submit(b, a_texts)
            c_ids, fc = _submit(b, c_texts)
            assert sum(map(len, a_ids)) > BUDGET and sum(map(len, c_ids)) > BUDGET
        for f in (fa, fc):  # a server fault, named by type; the cause stays chained for the log
            with pytest.raises(BatchFailed, match=r"embedding failed on the server \(RuntimeError\)") as info:
                f.result(WAIT_S)
            assert "simulated kernel failure" in str(info.value.__cause__)
        _assert_matches(fblock.result(0).embeddings, ref, ["a blocker"])
        _wait_until(lambda: b.queued_tokens == 0, "the failed job's remaining texts to be dropped")
        assert b.queued_texts == 0
        later_ids, flater = _submit(b, later_texts, precision="ubinary")
        assert sum(map(len, later_ids)) <= BUDGET  # one batch
        _assert_matches(flater.result(WAIT_S).embeddings, ref, later_texts, precision="ubinary")
    assert calls[0] == 1 and calls[1] >= 2 and len(calls) == 3  # A's and C's unstarted texts never ran


def test_failing_observer_never_fails_a_batch(served, engines):
    eng, ref = served("nano"), engines["nano"]

    def observer(*a):
        raise ValueError("metrics are broken")

    with _serving(eng, observer=observer) as b:
        res = _run(b.embed(["metrics", "do not matter"]))
    _assert_matches(res.embeddings, ref, ["metrics", "do not matter"])


# ---- 7. non-finite output -----------------------------------------------------------------------------
def test_non_finite_row_fails_its_job_naming_the_input(served, engines, monkeypatch):
    eng, ref = served("small"), engines["small"]
    rng = np.random.default_rng(71)
    bad_texts, good_texts, later_texts = _texts(rng, 3), _texts(rng, 2), _texts(rng, 2)
    poison, inner = [], eng._forward

    def poisoned(seqs, consume, *a, **kw):
        def consume_nan(lo, hi, rows):
            rows = rows.clone()
            for r, s in enumerate(seqs):
                if any(s is p for p in poison):
                    rows[r] = float("nan")
            return consume(lo, hi, rows)
        return inner(seqs, consume_nan, *a, **kw)

    monkeypatch.setattr(eng, "_forward", poisoned)
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            bad_ids, fbad = _submit(b, bad_texts)
            poison.append(bad_ids[2])
            _, fgood = _submit(b, good_texts)  # shares the batch with the poisoned row
        with pytest.raises(FloatingPointError, match=r"non-finite embedding for input\[2\]"):
            fbad.result(WAIT_S)
        _assert_matches(fgood.result(WAIT_S).embeddings, ref, good_texts)
        fblock.result(WAIT_S)
        _, flater = _submit(b, later_texts, normalize=False)
        _assert_matches(flater.result(WAIT_S).embeddings, ref, later_texts, normalize=False)


# ---- 8. close -------------------------------------------------------------------------------------------
def test_close_drains_queued_jobs_then_refuses_new_ones(served, engines):
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(81)
    jobs = [(_texts(rng, n), dict(task=t))
            for n, t in ((3, "retrieval"), (20, "clustering"), (1, "retrieval"))]
    drained = []
    with _serving(eng) as b:
        with _held(eng):
            futs = [_submit(b, texts, **opts)[1] for texts, opts in jobs]
            closer = threading.Thread(target=lambda: drained.append(b.close(WAIT_S)))
            closer.start()
            _wait_until(lambda: b.closing, "close() to start")
            with pytest.raises(Closed):  # draining already refuses new work
                _submit(b, ["too late"])
            assert not any(f.done() for f in futs)
        closer.join(WAIT_S)
        assert not closer.is_alive() and drained == [True]
        for f, (texts, opts) in zip(futs, jobs):
            _assert_matches(f.result(0).embeddings, ref, texts, **opts)
        prefixed, opts = b.prepare(["after close"])
        with pytest.raises(Closed):
            b.submit_ids(b.tokenize(prefixed), **opts)
        with pytest.raises(Closed):
            _run(b.embed(["after close"]))
        assert b.close(1.0) is True  # closing twice is harmless


def test_close_timeout_fails_queued_jobs_with_closed(served):
    eng = served("nano")
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            _, fq = _submit(b, ["queued behind the blocker", "x"])
            t0 = time.monotonic()
            assert b.close(0.2) is False
            assert time.monotonic() - t0 >= 0.2
            assert isinstance(fq.exception(timeout=0), Closed)
            assert b.queued_tokens == 0
        concurrent.futures.wait([fblock], timeout=WAIT_S)  # let the cut batch end before teardown
        with pytest.raises(Closed):
            _submit(b, ["after close"])


def test_close_timeout_fails_the_in_flight_job_too(served, monkeypatch):
    eng = served("nano")
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            assert b.close(0.2) is False
            closed_at_return = fblock.done() and isinstance(fblock.exception(timeout=0), Closed)
        # the cut batch ends after close(): it must neither overwrite the result nor kill the scheduler
        b._thread.join(WAIT_S)
        assert not b._thread.is_alive() and not crashes
        assert closed_at_return, "the in-flight job was still pending when close() returned False"
        assert isinstance(fblock.exception(timeout=0), Closed)


def test_submit_of_nothing_after_close_raises_closed(served):
    with _serving(served("nano")) as b:
        assert b.close(1.0) is True
        with pytest.raises(Closed):
            _run(b.embed([]))
        raised = False
        try:
            b.submit_ids([], task="retrieval", k=64)
        except Closed:
            raised = True
        assert raised, "submit_ids([]) after close() did not raise Closed"


# ---- 9. empty input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("truncate_dim", [None, 13])
def test_empty_input_gives_zero_rows_in_the_right_dtype(served, engines, truncate_dim):
    eng, ref = served("nano"), engines["nano"]
    with _serving(eng) as b:
        for precision in PRECISIONS:
            want = ref.embed([], truncate_dim=truncate_dim, precision=precision)
            res = _run(b.embed([], truncate_dim=truncate_dim, precision=precision))
            assert res.tokens == 0
            assert res.embeddings.shape == want.shape and res.embeddings.dtype == want.dtype, precision
            prefixed, opts = b.prepare([], truncate_dim=truncate_dim, precision=precision)
            direct = b.submit_ids(b.tokenize(prefixed), **opts).result(WAIT_S)
            assert direct.tokens == 0 and direct.embeddings.shape == want.shape
            assert direct.embeddings.dtype == want.dtype
    k = truncate_dim or 64
    assert want.shape == (0, (k + 7) // 8)  # ubinary, the last one


def test_small_and_bulk_jobs_never_share_a_batch_and_bulk_is_not_starved(served, engines, monkeypatch):
    """A small job (it fits one batch) never waits for a whole batch of bulk texts: the two kinds never share
    a batch. A steady stream of small jobs still lets a bulk job through once it waited BULK_WAIT_S."""
    import jv5fast.scheduler as sched
    monkeypatch.setattr(sched, "BULK_WAIT_S", 0.3)
    eng, ref = served("nano"), engines["nano"]
    rng = np.random.default_rng(71)
    log = _ForwardLog(eng, monkeypatch)
    big_texts = _texts(rng, 60)
    with _serving(eng) as b:
        big_ids, fbig = _submit(b, big_texts)
        smalls = []
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end and not fbig.done():  # small jobs back to back, one always waiting
            smalls.append(_submit(b, _texts(rng, 1)))
            smalls[-1][1].result(WAIT_S)
        fbig.result(WAIT_S)
    bulk = {id(s) for s in big_ids}
    small = {id(s) for ids, _ in smalls for s in ids}
    for batch in log.batches:
        kinds = {id(s) in bulk for s in batch if id(s) in bulk | small}
        assert len(kinds) <= 1, "a batch mixed bulk and small texts"
    assert log.count(big_ids) == len(big_texts)  # the bulk job finished while small ones kept coming
    _assert_matches(fbig.result(0).embeddings, ref, big_texts)
    for ids, f in smalls[:5]:
        assert f.result(0).embeddings.shape[0] == 1


@pytest.mark.parametrize("switch_wait,max_switches", [(60.0, 1), (0.0, None)])
def test_without_resident_weights_task_switches_are_rationed(nano_ckpt, monkeypatch, switch_wait, max_switches):
    """Without resident task weights a switch re-merges every layer, so jobs of another task wait (up to
    SWITCH_WAIT_S) while the merged task has work: alternating traffic switches once, not per batch. With no
    wait the batcher follows arrival order and switches per job (the test's own check that it can fail)."""
    import jv5fast.scheduler as sched
    monkeypatch.setattr(sched, "SWITCH_WAIT_S", switch_wait)
    eng = jv5fast.Engine(nano_ckpt, device="cpu")
    active, inner = [], eng._activate

    def spy(task):
        if task != eng._active:
            active.append(task)
        return inner(task)

    monkeypatch.setattr(eng, "_activate", spy)
    rng = np.random.default_rng(81)
    with _serving(eng, resident_tasks=False) as b:
        assert not b.resident
        with _held(eng):
            fblock = _block_scheduler(b, eng)  # the engine's task, retrieval
            # jobs of several batches each, so that tasks could alternate batch by batch
            jobs = [_submit(b, _texts(rng, 12), task=("clustering", "retrieval")[i % 2]) for i in range(6)]
            assert all(sum(map(len, ids)) > BUDGET for ids, _ in jobs)
        for _, f in jobs:
            f.result(WAIT_S)
        fblock.result(WAIT_S)
    switches = len(active)
    if max_switches is None:
        assert switches >= 5, active
    else:
        assert switches <= max_switches, active


def test_small_jobs_are_taken_whole_and_finish_in_arrival_order(served, monkeypatch):
    """Small jobs are never split across batches, so under a standing queue they finish first-come first-served
    (split jobs used to rank behind every new one and could wait forever)."""
    eng = served("nano")
    rng = np.random.default_rng(91)
    log = _ForwardLog(eng, monkeypatch)
    done = []
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            jobs = [_submit(b, _texts(rng, int(rng.integers(2, 5)), 1, 6)) for _ in range(30)]
            assert all(sum(map(len, ids)) <= BUDGET for ids, _ in jobs)
            for i, (_, f) in enumerate(jobs):
                f.add_done_callback(lambda f, i=i: done.append(i))
        for _, f in jobs:
            f.result(WAIT_S)
        fblock.result(WAIT_S)
    assert done == sorted(done)
    for ids, _ in jobs:  # each job's texts all in one batch
        assert sum(any(id(s) in {id(x) for x in ids} for s in batch) for batch in log.batches) == 1


@pytest.mark.parametrize("bulk_wait,bulk_first", [(0.0, True), (60.0, False)])
def test_a_waiting_bulk_job_of_any_task_goes_before_small_jobs(served, monkeypatch, bulk_wait, bulk_first):
    """A bulk job that has waited BULK_WAIT_S since it was last served gets the next batch even if small jobs of
    another task are queued (with resident weights); before that, small jobs go first."""
    import jv5fast.scheduler as sched
    monkeypatch.setattr(sched, "BULK_WAIT_S", bulk_wait)
    eng = served("nano")
    rng = np.random.default_rng(92)
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng, resident_tasks=True) as b:
        assert b.resident
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            big_ids, fbig = _submit(b, _texts(rng, 40), task="retrieval")
            small = [_submit(b, _texts(rng, 1), task="text-matching") for _ in range(3)]
        for _, f in small + [(None, fbig), (None, fblock)]:
            f.result(WAIT_S)
    second = {id(s) for s in log.batches[1]}
    assert any(id(s) in second for s in big_ids) == bulk_first


def test_submit_ids_refuses_rows_that_would_fail_a_shared_batch(served):
    eng = served("nano")
    with _serving(eng) as b:
        for bad, why in (([[5, 6], []], "ids[1]"), ([[eng.args.vocab_size]], "ids[0]"), ([[-1, 3]], "ids[0]"),
                         ([[1.5, 2]], "ids[0]")):
            with pytest.raises(ValueError, match=re.escape(why) + r" must hold 1\.\.\d+ integer token ids in 0\.\.\d+"):
                b.submit_ids(bad, task="retrieval", k=8)
        assert b.queued_tokens == 0
        assert b.submit_ids([[5, 6]], task="retrieval", k=8).result(WAIT_S).embeddings.shape == (1, 8)


def test_texts_being_tokenized_count_against_the_queue_limit(served, monkeypatch):
    """Admission happens before tokenization: a backlog in the tokenizer is refused with Overloaded too, so
    huge bodies cannot pile up in memory in front of the one tokenizer thread."""
    eng = served("nano")
    gate, started = threading.Event(), threading.Event()
    with _serving(eng, max_queue_tokens=100) as b:
        inner = b.tokenize

        def slow(prefixed, truncate=True):
            started.set()
            assert gate.wait(WAIT_S)
            return inner(prefixed, truncate)
        monkeypatch.setattr(b, "tokenize", slow)

        async def main():
            first = asyncio.ensure_future(b.embed(["word " * 100]))  # ~500 chars: ~125 tokens estimated
            while not started.is_set():
                await asyncio.sleep(0.01)
            with pytest.raises(Overloaded, match="adds about"):
                await b.embed(["another text"])
            gate.set()
            return await first
        res = _run(main())
        assert res.embeddings.shape == (1, eng.dim) and b.queued_tokens == 0


def test_a_dead_scheduler_fails_waiting_jobs_and_refuses_new_ones(served, monkeypatch):
    eng = served("nano")
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            _, f = _submit(b, ["queued"])
            monkeypatch.setattr(b, "_take", lambda: 1 / 0)  # a bug in the scheduler
        with pytest.raises(Closed, match="scheduler failed"):
            f.result(WAIT_S)
        fblock.result(WAIT_S)
        assert b.failed and "ZeroDivisionError" in b.failed
        with pytest.raises(Closed, match="scheduler failed"):
            _submit(b, ["new"])


def test_a_job_past_its_wait_is_served_first_whatever_its_kind(served, monkeypatch):
    """The job that waited past BULK_WAIT_S goes first in its batch: a started bulk job is not crowded out by
    newer (unstarted) bulk jobs of its task, with other tasks' bulk and small jobs queued too."""
    import jv5fast.scheduler as sched
    eng = served("nano")
    rng = np.random.default_rng(93)
    log = _ForwardLog(eng, monkeypatch)
    with _serving(eng, resident_tasks=True) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            old_ids, fold = _submit(b, _texts(rng, 20), task="retrieval")
            fresh = [_submit(b, _texts(rng, 6), task="retrieval") for _ in range(6)]
            a_ids, fa = _submit(b, _texts(rng, 30), task="clustering")
            small_ids, fsmall = _submit(b, _texts(rng, 1), task="classification")
            old = next(j for j in b._queue if j.ids is old_ids)
            old.started = old.served = time.monotonic() - 5  # it was served long ago
            for j in b._queue:
                if j.ids is not old_ids:
                    j.started = None
            monkeypatch.setattr(sched, "BULK_WAIT_S", 1.0)
        for f in [fold, fa, fsmall, fblock] + [f for _, f in fresh]:
            f.result(WAIT_S)
    assert any(id(s) in {id(x) for x in old_ids} for s in log.batches[1])  # the batch after the blocker


# ---- 9. overflow="chunk": windows of over-long texts ---------------------------------------------------------
CHUNK_LEN = 24  # max_length of the chunking engines: a few dozen words span several windows
LONG = ("The speed of light in vacuum is exactly 299,792,458 metres per second; nothing travels faster. " * 4
        + "Ünïcödé and 東京 and emoji 🚀 at the end.")


@pytest.fixture(scope="module")
def chunking(ckpt_factory):
    """(batcher's engine, reference engine) per family, both with max_length=CHUNK_LEN."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tuple(jv5fast.Engine(ckpt_factory(family), device="cpu", max_length=CHUNK_LEN)
                                  for _ in range(2))
        return cache[family]

    return get


def _submit_chunked(b, texts, overlap=0, **options):
    """``_submit`` in chunk mode: the over-long texts are planned into windows when tokenized."""
    prefixed, opts = b.prepare(texts, **options)
    prefix = b.engine._prefix(options.get("prompt_name"), options.get("prompt"))
    ids = b.tokenize(prefixed, "chunk", prefix=prefix, chunk_overlap=overlap)
    return ids, b.submit_ids(ids, **opts)


def _window_tokens(ref, texts, overlap=0, **opts):
    """Tokens ``Engine.embed(texts, overflow='chunk')`` feeds the model: every window's, prompts included."""
    prefix = ref._prefix(opts.get("prompt_name"), opts.get("prompt"))
    return ref._embed_chunked(texts, prefix, ref.task, ref.dim, "float32", overlap, False, False)[2]


@pytest.mark.parametrize("family", ["nano", "small"])
def test_chunked_jobs_equal_engine_embed_chunk_under_concurrency(chunking, family):
    eng, ref = chunking(family)
    rng = np.random.default_rng(101)
    calls = [([LONG, "short"], dict(overlap=0)),
             ([LONG[::-1], LONG + LONG, "x"], dict(overlap=5, prompt_name="query", truncate_dim=32)),
             ([_text(rng, 40)], dict(overlap=2, precision="ubinary", truncate_dim=16)),
             (_texts(rng, 3), dict(overlap=0, precision="float16")),  # nothing over max_length: today's path
             ([LONG, _text(rng, 30)], dict(overlap=3, task="clustering", precision="binary"))]

    async def main():
        return await asyncio.gather(*[b.embed(texts, overflow="chunk", chunk_overlap=kw["overlap"],
                                              **{k: v for k, v in kw.items() if k != "overlap"})
                                      for texts, kw in calls])

    with _serving(eng) as b:
        results = _run(main())
    for (texts, kw), res in zip(calls, results):
        opts = {k: v for k, v in kw.items() if k != "overlap"}
        _assert_matches(res.embeddings, ref, texts, overflow="chunk", chunk_overlap=kw["overlap"], **opts)
        over = [len(ref.tokenize(t, prompt_name=opts.get("prompt_name"))) for t in texts]
        assert res.tokens == _window_tokens(ref, texts, kw["overlap"], **opts)
        assert res.chunked == sum(n == CHUNK_LEN for n in over) and res.truncated == 0
        assert (res.windows > res.chunked) == (res.chunked > 0)


def test_truncated_inputs_are_counted(chunking):
    eng, ref = chunking("nano")
    with _serving(eng) as b:
        res = _run(b.embed([LONG, "short", LONG[::-1]]))
        assert (res.truncated, res.chunked, res.windows) == (2, 0, 0)
        assert res.tokens == sum(map(len, ref.tokenize([LONG, "short", LONG[::-1]])))
        with pytest.raises(ValueError, match=r"input\[0\] has \d+ tokens .*max_length=24"):
            _run(b.embed([LONG], overflow="error"))
        with pytest.raises(ValueError, match=r"input\[1\] has \d+ tokens"):
            _run(b.embed(["ok", LONG], truncate=False))


def test_windows_are_cut_as_batches_take_them_and_share_batches(chunking, monkeypatch):
    """A long text's windows exist only as batches take them (the job holds its token ids, and looks one window
    ahead); every batch stays within the budget, and windows of two callers' long texts share batches."""
    from jv5fast.overflow import TextWindows
    eng, ref = chunking("nano")
    cut, inner = [], TextWindows.ids

    def counted(self, span):
        cut.append(span)
        return inner(self, span)

    monkeypatch.setattr(TextWindows, "ids", counted)
    log = _ForwardLog(eng, monkeypatch)
    outstanding, logged = [], eng._forward

    def spy(seqs, consume, *a, **kw):  # windows cut but not yet run, when a batch starts
        outstanding.append((len(cut) - sum(map(len, log.batches[1:])), len(seqs)))
        return logged(seqs, consume, *a, **kw)

    monkeypatch.setattr(eng, "_forward", spy)
    text_a, text_b = " ".join(["light"] * 400), " ".join(["vacuum"] * 300)
    with _serving(eng) as b:
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            ids_a, fa = _submit_chunked(b, [text_a])
            ids_b, fb = _submit_chunked(b, [text_b])
            n_windows = ids_a.windows[0].num_windows + ids_b.windows[0].num_windows
            assert n_windows > 30 and len(cut) == 2  # planned, not cut: one window looked ahead per job
            assert b.queued_tokens == ids_a.windows[0].tokens + ids_b.windows[0].tokens
            assert b.queued_texts == n_windows
        ra, rb = fa.result(WAIT_S), fb.result(WAIT_S)
        fblock.result(WAIT_S)
    assert len(cut) == n_windows  # each window cut exactly once
    assert all(waiting <= in_batch + 2 for waiting, in_batch in outstanding[1:]), outstanding
    _assert_matches(ra.embeddings, ref, [text_a], overflow="chunk")
    _assert_matches(rb.embeddings, ref, [text_b], overflow="chunk")
    window_batches = log.batches[1:]
    assert all(sum(map(len, batch)) <= BUDGET for batch in window_batches)
    of_a, of_b = set(ids_a.windows[0].content.tolist()), set(ids_b.windows[0].content.tolist())
    assert not of_a & of_b
    mixed = [batch for batch in window_batches
             if any(s[-2] in of_a for s in batch) and any(s[-2] in of_b for s in batch)]
    assert mixed, "windows of the two texts never shared a batch"


def test_a_short_job_is_served_between_the_batches_of_a_long_chunked_one(chunking, monkeypatch):
    eng, ref = chunking("nano")
    long_text = " ".join(["light"] * 600)
    log = _ForwardLog(eng, monkeypatch)
    done = []
    with _serving(eng) as b:
        with _held(eng):
            ids, flong = _submit_chunked(b, [long_text])
            n_windows = ids.windows[0].num_windows
            _wait_until(lambda: b.queued_texts < n_windows, "the first window batch to be cut")
            small_ids, fsmall = _submit(b, ["how fast is light", "x"])
            flong.add_done_callback(lambda f: done.append("long"))
            fsmall.add_done_callback(lambda f: done.append("small"))
        concurrent.futures.wait([flong, fsmall], timeout=WAIT_S)
    assert done == ["small", "long"] and len(log.batches) > 10
    assert log.first_batch_with(small_ids) in (0, 1)  # between layers of the first window batch, or next
    _assert_matches(fsmall.result(0).embeddings, ref, ["how fast is light", "x"])
    _assert_matches(flong.result(0).embeddings, ref, [long_text], overflow="chunk")


def test_cancelling_a_chunked_job_drops_its_untaken_windows(chunking, monkeypatch):
    eng, _ = chunking("nano")
    log = _ForwardLog(eng, monkeypatch)
    long_text = " ".join(["light"] * 500)
    with _serving(eng) as b:
        with _held(eng):
            ids, fut = _submit_chunked(b, [long_text, "short"])
            _wait_until(lambda: len(b._queue) == 1 and b._queue[0].next > 0, "the first batch to be cut")
            started = b._queue[0].next
            assert started < ids.windows[0].num_windows
            assert fut.cancel()
            assert b.queued_tokens == 0 and b.queued_texts == 0
        _, other = _submit(b, ["still serving"])
        other.result(WAIT_S)
    assert sum(map(len, log.batches)) == started + 1  # the windows taken before the cancel, and the other job


def test_admission_counts_a_chunked_text_whole_and_never_sheds_small_requests_for_it(chunking):
    """A chunked text costs all its tokens: a second long document is refused while one is queued, yet small
    requests (they run first) are admitted and served; the same text truncated costs max_length."""
    eng, ref = chunking("nano")
    long_text = " ".join(["light"] * 300)
    limit = 200
    with _serving(eng, max_queue_tokens=limit) as b:
        prefixed = [eng._prefix(None, None) + long_text]
        assert b.estimate_tokens(prefixed, chunk=True) > limit > b.estimate_tokens(prefixed) == CHUNK_LEN
        with _held(eng):
            fblock = _block_scheduler(b, eng)
            ids, flong = _submit_chunked(b, [long_text])
            assert b.queued_tokens == ids.windows[0].tokens > limit  # alone, any size is admitted
            with pytest.raises(Overloaded, match=rf"{b.queued_tokens} tokens are queued .* adds about"):
                _run(b.embed([long_text], overflow="chunk"))
            with pytest.raises(Overloaded):
                _submit_chunked(b, [long_text])
            small = [_submit(b, [f"word {i}"]) for i in range(5)]  # not refused for the document's tokens
            truncated = _run_until_queued(b, [long_text])  # truncated: max_length tokens, a small job
        for _, f in small:
            f.result(WAIT_S)
        _assert_matches(flong.result(WAIT_S).embeddings, ref, [long_text], overflow="chunk")
        _assert_matches(truncated.result(WAIT_S).embeddings, ref, [long_text])
        fblock.result(WAIT_S)


def _run_until_queued(b, texts):
    """``b.embed(texts)`` on a loop in another thread, returned as a future once its job is queued."""
    subs = _count_submits(b)
    fut = concurrent.futures.Future()

    def run():
        try:
            fut.set_result(asyncio.run(b.embed(texts)))
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(e)
    threading.Thread(target=run, daemon=True).start()
    _wait_until(lambda: subs or fut.done(), "the job to be queued")
    return fut


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(overflow="chunk", chunk_overlap=CHUNK_LEN), ValueError, r"chunk_overlap=24 must be in 0\.\.\d+: input\[0\]"),
    (dict(overflow="chunk", normalize=False), ValueError, "normalize=False"),
    (dict(overflow="split"), ValueError, r"overflow 'split' is not valid"),
    (dict(overflow="chunk", truncate=False), ValueError, "conflicts"),
    (dict(overflow="error", truncate=True), ValueError, "conflicts"),
    (dict(chunk_overlap=3), ValueError, "overflow='chunk' only"),
    (dict(overflow="chunk", chunk_overlap=-1), ValueError, "chunk_overlap must be >= 0"),
    (dict(overflow="chunk", chunk_overlap=1.5), TypeError, "chunk_overlap must be an int"),
])
def test_bad_overflow_options_raise_as_engine_embed_does(chunking, kw, exc, msg):
    eng, ref = chunking("nano")
    with pytest.raises(exc, match=msg.replace("input", "texts")):
        ref.embed([LONG], **kw)
    with _serving(eng) as b:
        with pytest.raises(exc, match=msg):
            _run(b.embed([LONG], **kw))
        assert b.queued_tokens == 0 and b._pending_tokens == 0


def test_a_non_finite_window_fails_its_job_naming_the_input(chunking, monkeypatch):
    eng, ref = chunking("nano")
    inner, poison = eng._forward, []

    def poisoned(seqs, consume, *a, **kw):
        def consume_nan(lo, hi, rows):
            rows = rows.clone()
            for r, s in enumerate(seqs[lo:hi]):
                if len(s) == CHUNK_LEN and s[-2] == poison[0]:
                    rows[r] = float("nan")
            return consume(lo, hi, rows)
        return inner(seqs, consume_nan, *a, **kw)

    monkeypatch.setattr(eng, "_forward", poisoned)
    poison.append(ref.tokenize(" vacuum", prompt="")[0])
    with _serving(eng) as b:
        _, fbad = _submit_chunked(b, ["fine", " ".join(["vacuum"] * 60)])
        _, fgood = _submit_chunked(b, [LONG])
        with pytest.raises(FloatingPointError, match=r"non-finite embedding for input\[1\]"):
            fbad.result(WAIT_S)
        _assert_matches(fgood.result(WAIT_S).embeddings, ref, [LONG], overflow="chunk")
