"""`jv5fast.server.create_app` driven in-process (Starlette's TestClient): what a request may cost the event
loop, admission by what a text can cost after truncation, the API key, warm-up before serving, and a lifespan
that ends while the model loads. Slow steps are injected (a gate or a fixed sleep), so nothing here depends on
how fast this CPU is."""
import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

import jv5fast

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from jv5fast import server  # noqa: E402
from jv5fast.scheduler import Batcher, Overloaded  # noqa: E402

WAIT_S = 30.0  # the longest any single wait may take


@pytest.fixture(scope="module")
def eng(nano_ckpt):
    return jv5fast.Engine(nano_ckpt, device="cpu")


def _ready(tc):
    t0 = time.monotonic()
    while tc.get("/health").status_code != 200:
        assert time.monotonic() - t0 < WAIT_S, tc.get("/health").text
        time.sleep(0.01)
    return tc


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


# ---- 1. embedding_type lists, and the event loop ----------------------------------------------------------
def test_duplicate_embedding_types_are_encoded_once_each_off_the_event_loop(eng, monkeypatch):
    calls = []
    encode = server.encoding._encode

    def counted(emb, kind, base64_floats):
        calls.append((kind, _on_event_loop()))
        return encode(emb, kind, base64_floats)
    monkeypatch.setattr(server.encoding, "_encode", counted)
    with TestClient(server.create_app(eng)) as tc:
        _ready(tc)
        types = ["ubinary", "float"] * 20000  # 40,000 names, 360 KB
        r = tc.post("/v1/embeddings", json={"input": ["a", "b"], "embedding_type": types})
        assert r.status_code == 200, r.text
        rows = [d["embedding"] for d in r.json()["data"]]
        assert [list(row) for row in rows] == [["ubinary", "float"]] * 2  # a key per distinct type, in order
        assert rows[1]["float"] == pytest.approx(eng.embed("b").tolist(), abs=1e-6)
        assert sorted(k for k, _ in calls) == ["float", "ubinary"]  # once per distinct name, not 40,000 times
        assert not any(on_loop for _, on_loop in calls), "the response was encoded on the event loop"
        # a duplicate of a bad name is still named
        r = tc.post("/v1/embeddings", json={"input": "a", "embedding_type": ["float", "float", "int4"]})
        assert r.status_code == 400 and "'int4'" in r.json()["error"]["message"], r.text


def test_health_answers_while_a_response_is_being_built(eng, monkeypatch):
    entered, release, done = threading.Event(), threading.Event(), threading.Event()
    encode = server.encoding._encode

    def blocking(emb, kind, base64_floats):
        entered.set()
        release.wait(5)  # the test releases it at once; on the event loop it would stall /health for 5 s
        done.set()
        return encode(emb, kind, base64_floats)
    monkeypatch.setattr(server.encoding, "_encode", blocking)
    with TestClient(server.create_app(eng)) as tc:
        _ready(tc)
        out = {}
        t = threading.Thread(target=lambda: out.update(r=tc.post("/v1/embeddings", json={"input": "x"})))
        t.start()
        try:
            assert entered.wait(WAIT_S)
            assert tc.get("/health").status_code == 200
            assert not done.is_set(), "/health waited for the response being built"
        finally:
            release.set()
            t.join(WAIT_S)
        assert out["r"].status_code == 200


# ---- 2. admission counts what a text can cost once truncated ---------------------------------------------
def _gated_tokenize(monkeypatch, long_chars):
    """Block the tokenization of texts over ``long_chars`` characters until ``gate`` is set."""
    gate, started = threading.Event(), threading.Event()
    tokenize = Batcher.tokenize

    def gated(self, prefixed, truncate=True):
        if max(map(len, prefixed)) > long_chars:
            started.set()
            assert gate.wait(WAIT_S)
        return tokenize(self, prefixed, truncate)
    monkeypatch.setattr(Batcher, "tokenize", gated)
    return gate, started


def test_a_long_text_counts_max_length_tokens_and_sheds_no_small_request(nano_ckpt, monkeypatch):
    """One 200,000-character text (truncated to max_length=64 tokens) is in the tokenizer: one-word requests
    are admitted behind it, not refused as if 50,000 tokens were queued."""
    short = jv5fast.Engine(nano_ckpt, device="cpu", max_length=64)
    gate, started = _gated_tokenize(monkeypatch, 1000)
    b = Batcher(short, max_queue_tokens=1000, max_batch_tokens=64)
    try:
        async def main():
            long = asyncio.ensure_future(b.embed(["word " * 40000]))
            while not started.is_set():
                await asyncio.sleep(0.01)
            small = [asyncio.ensure_future(b.embed([f"word{i}"])) for i in range(30)]
            for _ in range(3):  # each has passed admission and waits for the tokenizer
                await asyncio.sleep(0)
            refused = [t for t in small if t.done() and isinstance(t.exception(), Overloaded)]
            assert not refused, refused[0].exception()
            with pytest.raises(Overloaded, match="adds about 64000"):  # 1000 x 64: over the limit, refused
                await b.embed(["w" * 4000] * 1000, truncate_dim=8)
            gate.set()
            return await asyncio.gather(long, *small)
        results = asyncio.run(main())
        assert results[0].tokens == 64 and all(r.embeddings.shape == (1, 64) for r in results)
    finally:
        gate.set()
        b.close(WAIT_S)


def test_http_one_long_text_does_not_get_small_requests_429(nano_ckpt, monkeypatch):
    short = jv5fast.Engine(nano_ckpt, device="cpu", max_length=64)
    gate, started = _gated_tokenize(monkeypatch, 1000)
    admitted = []
    admit = Batcher._admit

    def recorded(self, tokens, estimate=False, pending=True):
        ok = False
        try:
            admit(self, tokens, estimate, pending)
            ok = True
        finally:
            if estimate:  # the check before tokenizing (submit_ids checks again, on the exact count)
                admitted.append(ok)
    monkeypatch.setattr(Batcher, "_admit", recorded)
    with TestClient(server.create_app(short, max_queue_tokens=1000)) as tc:
        _ready(tc)
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            big = pool.submit(tc.post, "/v1/embeddings", json={"input": "word " * 40000})
            assert started.wait(WAIT_S)
            small = [pool.submit(tc.post, "/v1/embeddings", json={"input": f"w{i}"}) for i in range(8)]
            t0 = time.monotonic()
            while len(admitted) < 9:  # every request has been through admission while the long text tokenizes
                assert time.monotonic() - t0 < WAIT_S
                time.sleep(0.01)
            gate.set()
            codes = [f.result(WAIT_S).status_code for f in [big, *small]]
        assert admitted == [True] * 9 and codes == [200] * 9, (admitted, codes)


# ---- 3. API key ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
def test_a_blank_api_key_is_an_error_never_no_auth(eng, monkeypatch, key):
    monkeypatch.delenv("JV5FAST_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key is empty or blank"):
        server.create_app(eng, api_key=key)
    monkeypatch.setenv("JV5FAST_API_KEY", key)
    with pytest.raises(ValueError, match=r"\$JV5FAST_API_KEY is empty or blank"):
        server.create_app(eng)
    with pytest.raises(TypeError, match="api_key must be a str"):
        server.create_app(eng, api_key=b"s3cret")


def test_the_configured_key_is_stripped_as_the_clients_is(eng, monkeypatch):
    monkeypatch.setenv("JV5FAST_API_KEY", "from-env")  # an explicit key wins over the environment
    with TestClient(server.create_app(eng, api_key=" s3cret\n")) as tc:
        _ready(tc)
        assert tc.post("/v1/embeddings", json={"input": "x"}).status_code == 401
        assert tc.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer from-env"}
                       ).status_code == 401
        assert tc.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"}
                       ).status_code == 200


# ---- 4, 5. warm-up before serving; a lifespan that ends while the model loads -----------------------------
def test_an_app_on_an_engine_is_warm_and_ready_from_its_first_request(eng, monkeypatch):
    warmups = []
    warmup = eng.warmup

    def slow_warmup(*a, **kw):
        time.sleep(0.5)  # startup waits for it, however long it takes
        warmups.append(1)
        return warmup(*a, **kw)
    monkeypatch.setattr(eng, "warmup", slow_warmup)
    with TestClient(server.create_app(eng)) as tc:
        assert warmups == [1]
        assert tc.get("/health").json() == {"status": "ready"}
        assert tc.post("/v1/embeddings", json={"input": "x"}).status_code == 200


@pytest.mark.parametrize("drain_timeout", [30.0, 0.2])
def test_leaving_the_client_while_loading_never_serves_the_late_model(eng, monkeypatch, drain_timeout):
    """Leaving `with TestClient(app)` before the loader returns: the shutdown waits for it (up to the drain
    timeout), and a model that arrives after shutdown began is neither warmed nor given a scheduler thread."""
    gate, entered, warmups = threading.Event(), threading.Event(), []
    monkeypatch.setattr(eng, "warmup", lambda *a, **kw: warmups.append(1))

    def loader():
        entered.set()
        assert gate.wait(WAIT_S)
        return eng
    app = server.create_app(loader=loader, drain_timeout=drain_timeout)
    batchers = {t for t in threading.enumerate() if t.name == "jv5fast-batcher"}

    def leave_early():
        with TestClient(app) as tc:
            assert entered.wait(WAIT_S)
            assert tc.get("/health").status_code == 503
    t = threading.Thread(target=leave_early)
    t.start()
    try:
        assert entered.wait(WAIT_S)
        t.join(0.5 if drain_timeout > 1 else WAIT_S)
        # with time to drain, leaving waits for the loader (it cannot return before the gate opens)
        assert t.is_alive() == (drain_timeout > 1)
    finally:
        gate.set()
        t.join(WAIT_S)
    st = app.state.jv5fast
    st.loading.join(WAIT_S)
    assert not t.is_alive() and not st.loading.is_alive()
    assert st.batcher is None and st.status == "draining" and warmups == []
    assert {t for t in threading.enumerate() if t.name == "jv5fast-batcher"} <= batchers


# ---- 6. overflow: truncate | error | chunk -------------------------------------------------------------------
CUT = 24  # max_length of the engines below: a few dozen words span several windows
LONG = ("The speed of light in vacuum is exactly 299,792,458 metres per second; nothing travels faster. " * 4
        + "Ünïcödé and 東京 and emoji 🚀 at the end.")


@pytest.fixture(scope="module")
def cut(nano_ckpt):
    """(served engine, reference engine), both with max_length=CUT."""
    return (jv5fast.Engine(nano_ckpt, device="cpu", max_length=CUT),
            jv5fast.Engine(nano_ckpt, device="cpu", max_length=CUT))


def _metric(tc, name):
    for line in tc.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def _chunk_plan(ref, texts, prompt_name, overlap):
    """(tokens the model sees, windows) of ``texts`` under overflow='chunk', by ``Engine``'s own planning."""
    prefix = ref._prefix(prompt_name, None)
    ids, flags = ref._tokenize([prefix + t for t in texts])
    windows = ref._windows(prefix, texts, ids, flags, overlap)
    tokens = sum(len(s) for i, s in enumerate(ids) if i not in windows) + sum(w.tokens for w in windows.values())
    return tokens, sum(w.num_windows for w in windows.values())


def test_http_chunk_equals_engine_embed_with_usage_and_counters(cut):
    eng, ref = cut
    texts = [LONG, "how fast is light", LONG[::-1] + LONG]
    with TestClient(server.create_app(eng, max_batch_tokens=48)) as tc:
        _ready(tc)
        r = tc.post("/v1/embeddings", json={"input": texts, "overflow": "chunk", "chunk_overlap": 3, "dimensions": 32,
                                            "task": "retrieval.query", "embedding_type": ["float", "ubinary"]})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"]["float"] for d in r.json()["data"]])
        want = ref.embed(texts, overflow="chunk", chunk_overlap=3, truncate_dim=32, task="retrieval",
                         prompt_name="query")
        assert np.abs(got - want).max() <= 1e-6 * eng.dim / 32
        bits = np.array([d["embedding"]["ubinary"] for d in r.json()["data"]], dtype=np.uint8)
        np.testing.assert_array_equal(bits, np.packbits(got > 0, axis=-1))
        tokens, windows = _chunk_plan(ref, texts, "query", 3)
        assert r.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert tokens > 2 * CUT and windows > 4
        assert (_metric(tc, "jv5fast_inputs_chunked_total"), _metric(tc, "jv5fast_chunk_windows_total"),
                _metric(tc, "jv5fast_inputs_truncated_total")) == (2, windows, 0)
        assert _metric(tc, "jv5fast_tokens_total") == tokens

        # Jina's truncate is the alias: true cuts (counted), false refuses, as overflow truncate / error
        for body in ({"truncate": True}, {}, {"overflow": "truncate"}, {"overflow": "truncate", "truncate": True}):
            r = tc.post("/v1/embeddings", json={"input": [LONG, "x"], **body})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == CUT + len(ref.tokenize("x"))
            row = np.array(r.json()["data"][0]["embedding"])
            assert np.abs(row - ref.embed(LONG)).max() <= 1e-6
        assert _metric(tc, "jv5fast_inputs_truncated_total") == 4
        for body in ({"truncate": False}, {"overflow": "error"}, {"overflow": "error", "truncate": False}):
            r = tc.post("/v1/embeddings", json={"input": ["x", LONG], **body})
            assert r.status_code == 400 and "input[1]" in r.text and f"max_length={CUT}" in r.text, r.text
        assert tc.post("/v1/embeddings", json={"input": ["x"], "overflow": "error"}).status_code == 200
        assert _metric(tc, "jv5fast_inputs_chunked_total") == 2 and _metric(tc, "jv5fast_inputs_truncated_total") == 4


@pytest.mark.parametrize("body, param, words", [
    ({"overflow": "split"}, "overflow", ["'split'", "['truncate', 'error', 'chunk']"]),
    ({"overflow": 3}, "overflow", ["overflow"]),
    ({"overflow": "chunk", "truncate": False}, "truncate", ["truncate=false conflicts with overflow='chunk'"]),
    ({"overflow": "error", "truncate": True}, "truncate", ["truncate=true conflicts"]),
    ({"chunk_overlap": 2}, "chunk_overlap", ["overflow 'chunk' only", "'truncate'"]),
    ({"overflow": "error", "chunk_overlap": 2}, "chunk_overlap", ["'error'"]),
    ({"overflow": "chunk", "chunk_overlap": -1}, "chunk_overlap", ["chunk_overlap=-1", f"0..{CUT - 1}"]),
    ({"overflow": "chunk", "chunk_overlap": CUT}, "chunk_overlap", [f"chunk_overlap={CUT}"]),
    ({"overflow": "chunk", "chunk_overlap": "2"}, "chunk_overlap", ["chunk_overlap"]),
    ({"overflow": "chunk", "chunk_overlap": 1.5}, "chunk_overlap", ["chunk_overlap"]),
    ({"overflow": "chunk", "normalized": False}, "normalized", ["normalized=false"]),
    # over the window this input gets (max_length less its prompt and EOS): found when it is tokenized
    ({"overflow": "chunk", "chunk_overlap": CUT - 3}, "chunk_overlap", [f"chunk_overlap={CUT - 3} must be in",
                                                                        "input[1]'s windows"]),
])
def test_bad_overflow_fields_are_400_naming_the_field(cut, body, param, words):
    eng, _ = cut
    with TestClient(server.create_app(eng)) as tc:
        _ready(tc)
        r = tc.post("/v1/embeddings", json={"input": ["x", LONG], **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and all(w in err["message"] for w in words), err
        assert tc.post("/v1/embeddings", json={"input": ["x", LONG], "overflow": "chunk"}).status_code == 200


def test_a_short_request_completes_while_a_long_chunked_one_is_in_flight(cut, monkeypatch):
    """A long document in chunk mode runs as many window batches; short requests are admitted (the document's
    tokens, over the queue limit, do not count against them) and served between those batches."""
    eng, ref = cut
    batches, forward = [], eng._forward

    def slow_forward(seqs, *a, **kw):
        time.sleep(0.01)  # so the document takes a while whatever the CPU
        batches.append(len(seqs))
        return forward(seqs, *a, **kw)
    monkeypatch.setattr(eng, "_forward", slow_forward)
    document = " ".join(["light"] * 3000)
    with TestClient(server.create_app(eng, max_batch_tokens=48, max_queue_tokens=300)) as tc:
        _ready(tc)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(tc.post, "/v1/embeddings", json={"input": document, "overflow": "chunk"})
            t0 = time.monotonic()
            while len(batches) < 3:
                assert time.monotonic() - t0 < WAIT_S and not long.done(), long.done() and long.result().text
                time.sleep(0.005)
            for i in range(4):
                r = tc.post("/v1/embeddings", json={"input": f"short {i}"})
                assert r.status_code == 200, r.text
                assert np.abs(np.array(r.json()["data"][0]["embedding"]) - ref.embed(f"short {i}")).max() <= 1e-6
                assert not long.done(), "the short request waited for the whole document"
            r = long.result(WAIT_S)
        assert r.status_code == 200, r.text
        tokens, windows = _chunk_plan(ref, [document], "document", 0)
        assert r.json()["usage"]["prompt_tokens"] == tokens > 300 and windows > 50
        got = np.array(r.json()["data"][0]["embedding"])
        assert np.abs(got - ref.embed(document, overflow="chunk")).max() <= 1e-6
