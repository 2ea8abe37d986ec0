"""Engine API: shapes, prompts, precisions, batching invariance, order, threads, task switching, bad input."""
import os
import shutil
import threading

import numpy as np
import pytest
import torch

import jv5fast

TEXTS = ["What is the speed of light?", "", "   ", "Ünïcödé and 東京 and emoji 🚀",
         "A considerably longer document about vacuum, light and the constants of nature. " * 3, "x"]


@pytest.fixture(scope="module")
def nano(engines):
    return engines["nano"]


@pytest.fixture(scope="module")
def small(engines):
    return engines["small"]


def test_shapes_and_properties(nano, small):
    assert nano.dim == 64 and small.dim == 64
    assert nano.tasks == ("retrieval", "text-matching", "clustering", "classification")
    assert nano.max_length == 8192 and small.max_length == 32768
    e = nano.embed(TEXTS)
    assert e.shape == (len(TEXTS), 64) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    one = nano.embed(TEXTS[0])
    assert one.shape == (64,)
    np.testing.assert_allclose(one, e[0], atol=1e-6)
    empty = nano.embed([])
    assert empty.shape == (0, 64) and empty.dtype == np.float32
    assert nano.embed([], precision="ubinary", truncate_dim=32).shape == (0, 4)
    t = nano.embed(TEXTS[:2], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 64)


def test_prompts(nano):
    text = "how fast is light"
    doc = nano.embed(text)
    np.testing.assert_array_equal(doc, nano.embed(text, prompt_name="document"))
    np.testing.assert_array_equal(doc, nano.encode_document(text))
    np.testing.assert_array_equal(doc, nano.embed(text, prompt="Document: "))
    np.testing.assert_array_equal(doc, nano.embed("Document: " + text, prompt=""))
    q = nano.encode_query(text)
    np.testing.assert_array_equal(q, nano.embed("Query: " + text, prompt=""))
    assert not np.allclose(q, doc)
    # an explicit prompt wins over encode_query's default
    np.testing.assert_array_equal(nano.encode_query(text, prompt="Document: "), doc)
    assert nano.tokenize(text, prompt_name="query")[:2] == nano.tokenize("Query:", prompt="")[:2]


def test_precisions_match_sentence_transformers_rules(nano):
    f = nano.embed(TEXTS, truncate_dim=32)
    ub = nano.embed(TEXTS, truncate_dim=32, precision="ubinary")
    b = nano.embed(TEXTS, truncate_dim=32, precision="binary")
    h = nano.embed(TEXTS, truncate_dim=32, precision="float16")
    np.testing.assert_array_equal(ub, np.packbits(f > 0, axis=-1))
    np.testing.assert_array_equal(b, (np.packbits(f > 0, axis=-1).astype(np.int16) - 128).astype(np.int8))
    assert ub.dtype == np.uint8 and b.dtype == np.int8 and ub.shape == (len(TEXTS), 4)
    np.testing.assert_array_equal(h, f.astype(np.float16))
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:
        try:
            from sentence_transformers.util import quantize_embeddings
        except ImportError:
            quantize_embeddings = None
    if quantize_embeddings is not None:
        np.testing.assert_array_equal(ub, quantize_embeddings(f, precision="ubinary"))
        np.testing.assert_array_equal(b, quantize_embeddings(f, precision="binary"))
    # jv5fast.quantize on the same floats, numpy or torch, odd widths padded with zero bits
    x = np.random.default_rng(0).standard_normal((5, 13)).astype(np.float32)
    x[0, 0] = 0.0  # 0.0 is bit 0 (strictly greater than zero)
    np.testing.assert_array_equal(jv5fast.quantize(x, "ubinary"), np.packbits(x > 0, axis=-1))
    np.testing.assert_array_equal(jv5fast.quantize(torch.from_numpy(x), "ubinary"), np.packbits(x > 0, axis=-1))


def test_truncate_dim_then_normalize(nano):
    full = nano.embed(TEXTS, normalize=False)
    for k in (8, 32, 63, 64):
        got = nano.embed(TEXTS, truncate_dim=k)
        want = full[:, :k] / np.linalg.norm(full[:, :k], axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=2e-6)
    raw = nano.embed(TEXTS, normalize=False, truncate_dim=16)
    np.testing.assert_array_equal(raw, full[:, :16])


@pytest.mark.parametrize("family", ["small", "nano"])
def test_batch_invariance_and_order(family, engines):
    eng = engines[family]
    rng = np.random.default_rng(1)
    texts = [" ".join(["token"] * int(n)) + f" {i}" for i, n in enumerate(rng.integers(0, 60, 23))] + TEXTS
    together = eng.embed(texts)
    alone = np.stack([eng.embed(t) for t in texts])
    assert (together * alone).sum(1).min() >= 0.99999
    perm = rng.permutation(len(texts))
    shuffled = eng.embed([texts[i] for i in perm])
    np.testing.assert_allclose(shuffled, together[perm], atol=1e-5)
    # a tiny token budget forces many batches (and the progress bar); same vectors
    small_budget = jv5fast.Engine(eng.path, device="cpu", max_batch_tokens=16)
    many = small_budget.embed(texts, show_progress_bar=True)
    assert (many * together).sum(1).min() >= 0.99999


def test_threads(nano):
    texts = [f"thread text number {i} " * (i % 7 + 1) for i in range(40)]
    want = nano.embed(texts)
    results, errors = {}, []

    def work(t):
        try:
            task = ("retrieval", "clustering")[t % 2]
            results[t] = (task, nano.embed(texts, task=task))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    clus = nano.embed(texts, task="clustering")
    for task, r in results.values():
        np.testing.assert_allclose(r, want if task == "retrieval" else clus, atol=1e-5)


def test_task_switch_needs_no_disk(ckpt_factory, tmp_path):
    src = ckpt_factory("nano", seed=21)
    path = str(tmp_path / "ck")
    shutil.copytree(src, path)
    eng = jv5fast.Engine(path, device="cpu")
    texts = TEXTS[:3]
    before = {t: eng.embed(texts, task=t) for t in eng.tasks}
    shutil.rmtree(path)
    for t in reversed(eng.tasks):
        np.testing.assert_array_equal(eng.embed(texts, task=t), before[t])
    assert eng.task == "retrieval"  # a per-call task does not change the default


def test_truncation(ckpt_factory):
    eng = jv5fast.Engine(ckpt_factory("nano"), device="cpu", max_length=16)
    long = "word " * 100
    ids = eng.tokenize(long)
    assert len(ids) == 16 and ids[-1] == 128001
    assert np.isfinite(eng.embed(long)).all()
    with pytest.raises(ValueError, match=r"texts\[1\] has \d+ tokens .*max_length=16"):
        eng.embed(["short", long], truncate=False)
    eng.embed(["short"], truncate=False)


def test_unicode_and_control_characters(nano, small):
    weird = ["lone \ud800 surrogate", "\udfff", "nul\x00 and \x07 bell", "\u200b\u200b", "\t\n\r", "e\u0301"]
    for eng in (nano, small):
        e = eng.embed(weird)
        assert np.isfinite(e).all() and e.shape == (len(weird), eng.dim)
        np.testing.assert_allclose(eng.embed("lone \ufffd surrogate"), e[0], atol=1e-5)


@pytest.mark.parametrize("bad,exc,msg", [
    (["ok", 3], TypeError, r"texts\[1\] is int"),
    (["ok", None], TypeError, r"texts\[1\] is NoneType"),
    ([b"bytes"], TypeError, r"texts\[0\] is bytes"),
    (None, TypeError, "str or a list of str"),
    (42, TypeError, "str or a list of str"),
])
def test_bad_texts(nano, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        nano.embed(bad)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(truncate_dim=0), ValueError, r"truncate_dim=0 is out of range 1\.\.64"),
    (dict(truncate_dim=65), ValueError, r"out of range"),
    (dict(truncate_dim=-3), ValueError, r"out of range"),
    (dict(truncate_dim=3.5), TypeError, "must be an int"),
    (dict(precision="int4"), ValueError, r"precision 'int4' is not valid.*ubinary"),
    (dict(prompt_name="passage"), ValueError, r"unknown prompt_name 'passage'.*query"),
    (dict(prompt_name=["query"]), ValueError, r"prompt_name must be one name \(a str\), got list \['query'\]; valid: "
                                              r"\['query', 'document'\]"),
    (dict(task="retreival"), ValueError, r"unknown task 'retreival'; valid tasks: \['retrieval'"),
])
def test_bad_options(nano, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        nano.embed(["text"], **kw)


def test_bad_engine_arguments(nano_ckpt):
    with pytest.raises(TypeError, match=r"must be a str or os.PathLike .* got list: \['"):
        jv5fast.Engine([nano_ckpt])
    assert jv5fast.Engine(__import__("pathlib").Path(nano_ckpt)).embed(["a"]).shape[0] == 1  # a Path is fine
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        jv5fast.Engine(nano_ckpt, task="summarize")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        jv5fast.Engine(nano_ckpt, dtype="int8")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        jv5fast.Engine(nano_ckpt, max_length=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        jv5fast.Engine(nano_ckpt, max_batch_tokens=-1)
    with pytest.warns(UserWarning, match="exceeds the model's max_position_embeddings=8192"):
        jv5fast.Engine(nano_ckpt, max_length=9000)


def test_empty_prompt_and_empty_text_on_small_is_an_error(small):
    with pytest.raises(ValueError, match=r"texts\[1\] produced no tokens"):
        small.embed(["a", ""], prompt="")
    assert np.isfinite(small.embed("")).all()  # with the default prompt "" embeds fine


def test_non_finite_output_is_an_error(ckpt_factory, monkeypatch):
    eng = jv5fast.Engine(ckpt_factory("nano", seed=23, tasks=("retrieval",)), device="cpu")
    forward = eng.model.forward

    def poisoned(batch, **kw):
        h = forward(batch, **kw).clone()
        h[0] = float("nan")  # the pooled row of the batch's first (longest) text
        return h

    monkeypatch.setattr(eng.model, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite embedding for texts\["):
        eng.embed(["a", "bb bb bb"])


def test_cpu_oom_is_retried_in_halves(ckpt_factory, monkeypatch):
    eng = jv5fast.Engine(ckpt_factory("nano", seed=23, tasks=("retrieval",)), device="cpu")
    texts = [f"text {i}" for i in range(5)]
    want = eng.embed(texts)
    forward, calls = eng.model.forward, []

    def flaky(batch, **kw):
        calls.append(batch.num_seqs)
        if batch.num_seqs > 2:
            raise torch.OutOfMemoryError("simulated")
        return forward(batch, **kw)

    monkeypatch.setattr(eng.model, "forward", flaky)
    np.testing.assert_allclose(eng.embed(texts), want, atol=1e-6)
    assert calls == [5, 2, 3, 1, 2]  # 5 fails -> 2 + 3; 3 fails -> 1 + 2


def test_env_backend_validation(nano, monkeypatch):
    monkeypatch.setenv("JV5FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="JV5FAST_BACKEND='cuda-magic' is not valid"):
        nano.embed("x")
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    assert nano.embed("x").shape == (64,)
    assert os.environ["JV5FAST_BACKEND"] == "torch"


# ---- regressions from the review of issue 10 ---------------------------------------------------------
@pytest.mark.parametrize("method,own", [("encode_query", "query"), ("encode_document", "document")])
def test_encode_prompt_name_none_means_the_methods_own_prompt(small, method, own):
    """Wrappers forward prompt_name=None explicitly; it must not fall back to the default (document) prompt."""
    texts = ["how fast is light", "Ünïcödé 東京", "x"]
    want = small.embed(texts, prompt_name=own)
    got = getattr(small, method)(texts, prompt_name=None)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(getattr(small, method)(texts, prompt_name=None, prompt=None), want)
    other = "document" if own == "query" else "query"
    np.testing.assert_array_equal(getattr(small, method)(texts, prompt_name=other), small.embed(texts, prompt_name=other))
    np.testing.assert_array_equal(getattr(small, method)(texts, prompt=""), small.embed(texts, prompt=""))


class _Interrupt(BaseException):
    """Stands for Ctrl-C or a CUDA OOM raised between two layer writes."""


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, _Interrupt])
@pytest.mark.parametrize("fail_after", [0, 1, 5])
def test_failed_task_switch_leaves_no_mix_of_adapters(ckpt_factory, monkeypatch, exc, fail_after):
    ck = ckpt_factory("small", seed=41)
    fresh = jv5fast.Engine(ck, device="cpu")
    texts = ["a task switch that fails half-way", "second", "x y z"]
    want = {t: fresh.embed(texts, task=t) for t in ("retrieval", "clustering")}
    eng = jv5fast.Engine(ck, device="cpu")
    np.testing.assert_array_equal(eng.embed(texts), want["retrieval"])
    set_linear, calls = eng.model.set_linear, []

    def flaky(*a, **kw):
        calls.append(a[:2])
        if len(calls) > fail_after:
            raise exc("simulated failure in the middle of a switch")
        return set_linear(*a, **kw)

    monkeypatch.setattr(eng.model, "set_linear", flaky)
    with pytest.raises(exc):
        eng.embed(texts, task="clustering")
    monkeypatch.setattr(eng.model, "set_linear", set_linear)
    # the next calls re-merge every layer, whichever task they ask for
    np.testing.assert_array_equal(eng.embed(texts), want["retrieval"])
    np.testing.assert_array_equal(eng.embed(texts, task="clustering"), want["clustering"])
    monkeypatch.setattr(eng.model, "set_linear", flaky)
    calls.clear()
    with pytest.raises(exc):
        eng.embed(texts, task="retrieval")
    monkeypatch.setattr(eng.model, "set_linear", set_linear)
    np.testing.assert_array_equal(eng.embed(texts, task="clustering"), want["clustering"])


def test_requested_task_is_never_silently_replaced(ckpt_factory, tmp_path):
    merged = ckpt_factory("nano", seed=43, merged_task="classification")
    # a merged repo records no task: any explicit task is refused, naming what it holds
    with pytest.raises(ValueError, match=r"task 'retrieval' requested, but .* no adapters/ folder .*not recorded"):
        jv5fast.Engine(merged, device="cpu", task="retrieval")
    eng = jv5fast.Engine(merged, device="cpu")
    assert eng.task is None and eng.tasks == ()
    with pytest.raises(ValueError, match="task 'retrieval' requested"):
        eng.embed("x", task="retrieval")
    # under its released name the repo's task is known: that task is served, any other refused
    named = tmp_path / "jina-embeddings-v5-text-nano-classification"
    shutil.copytree(merged, named)
    eng = jv5fast.Engine(str(named) + os.sep, device="cpu", task="classification")
    assert eng.task == "classification" and eng.tasks == ("classification",)
    np.testing.assert_array_equal(eng.embed("x", task="classification"), jv5fast.Engine(merged, device="cpu").embed("x"))
    with pytest.raises(ValueError, match=r"task 'retrieval' requested, but .*its task is 'classification'"):
        jv5fast.Engine(str(named), device="cpu", task="retrieval")
    assert jv5fast.Engine(str(named), device="cpu").task == "classification"
    # an adapter checkpoint without a retrieval adapter defaults to its first task, and refuses the absent one
    only = ckpt_factory("nano", seed=43, tasks=("clustering",))
    assert jv5fast.Engine(only, device="cpu").task == "clustering"
    with pytest.raises(ValueError, match=r"unknown task 'retrieval'; valid tasks: \['clustering'\]"):
        jv5fast.Engine(only, device="cpu", task="retrieval")
    with pytest.raises(TypeError, match="task must be a str or None"):
        jv5fast.Engine(only, device="cpu", task=3)


def test_merged_task_from_released_names_only():
    from jv5fast.engine import merged_task_from_name as m
    assert m("jinaai/jina-embeddings-v5-text-small-retrieval") == "retrieval"
    assert m("/data/snapshots/jina-embeddings-v5-text-nano-text-matching/") == "text-matching"
    assert m("/hf/hub/models--jinaai--jina-embeddings-v5-text-small-clustering/snapshots/0a1b2c") == "clustering"
    assert m("/hf/hub/models--someone--other-model/snapshots/0a1b2c") is None
    assert m("/models/my-classifier") is None and m("jina-embeddings-v5-text-small") is None


@pytest.mark.parametrize("gemm", ["jv5fast", "onednn"])
def test_cpu_prepacked_linears_match_plain_and_follow_task_switches(ckpt_factory, monkeypatch, gemm):
    """CPU fp32 engines run the projections on prepacked weights (jv5fast's own AVX2 GEMM, or oneDNN's);
    the vectors equal the plain F.linear engine's (another fp32 summation order only), and a task switch
    re-packs every layer."""
    import torch

    from jv5fast import ops
    if gemm == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    if gemm == "jv5fast" and ops._cpu_ext() is None:
        pytest.skip("jv5fast._C.sgemm does not run here (no AVX2/FMA, or the extension was not built)")
    ck = ckpt_factory("small", seed=71)
    texts = ["a query about light", "Ünïcödé 東京", "x", "a longer document about the speed of light " * 9]
    monkeypatch.setenv("JV5FAST_CPU_PACK", "0")
    plain = jv5fast.Engine(ck, device="cpu")
    assert plain.model.packed is None
    monkeypatch.delenv("JV5FAST_CPU_PACK")
    monkeypatch.setenv("JV5FAST_CPU_GEMM", gemm)
    packed = jv5fast.Engine(ck, device="cpu")
    n_layers = packed.args.num_layers
    assert packed.model.packed is not None and len(packed.model.packed) == 4 * n_layers + 2
    assert {p.kind for p in packed.model.packed.values()} == {gemm}
    for task in ("retrieval", "clustering", "retrieval", "classification"):
        a, b = plain.embed(texts, task=task), packed.embed(texts, task=task)
        assert (a * b).sum(1).min() >= 0.99999 and np.abs(a - b).max() < 1e-4, task
    # the packed copies are the active task's: poisoning the plain weights changes nothing packed-side
    w = packed.model.layers[0]["w13"]
    saved = w.clone()
    w.mul_(0)
    np.testing.assert_allclose(packed.embed(texts, task="classification"), b, atol=1e-6)
    w.copy_(saved)
    assert not jv5fast.Engine(ck, device="cpu", dtype="bfloat16").model.packed  # fp32 only
