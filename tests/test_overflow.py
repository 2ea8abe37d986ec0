"""overflow= (jv5fast/overflow.py): window planning, the weighted mean, streaming in bounded groups, the
prompt / text / special-token split on the real tokenizers, and ``Engine.embed(overflow=...)`` end to end
against a by-hand computation: ``Engine.tokenize`` for the ids, the engine's own forward on each window's ids,
the token-weighted mean in numpy."""
import numpy as np
import pytest

import jv5fast
from jv5fast.overflow import (Chunks, Splitter, TextWindows, WeightedMean, check_chunk_options, check_window,
                              count_windows, embed_chunked, finish, plan_windows, resolve_overflow,
                              special_template, stream_windows)
from jv5fast.testing import tokenizer_json

MAX_LENGTH = 24  # the chunking engines' context: long texts below span many windows
LONG = ("The speed of light in vacuum is exactly 299,792,458 metres per second; nothing travels faster. " * 4
        + "Ünïcödé and 東京 and emoji 🚀 at the end.")
MEDIUM = ("A document of a few dozen tokens, long enough that it needs two or three windows of twenty-four "
          "tokens each once the prompt and the special tokens are added.")
SHORT = ["how fast is light", "", "x"]


# ---- planning ----------------------------------------------------------------------------------------------
def _check_spans(n, w, o):
    spans = list(plan_windows(n, w, o))
    assert len(spans) == count_windows(n, w, o)
    if n <= w:
        assert spans == [(0, n)]
        return
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(0 <= s < e <= n and e - s <= w for s, e in spans)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 - s0 == w            # every window but the last is full
        assert s1 == e0 - o and s1 > s0  # neighbours share exactly the overlap, and it moves on
    covered = np.zeros(n, dtype=int)
    for s, e in spans:
        covered[s:e] += 1
    assert covered.min() == 1 and covered.max() <= -(-w // (w - o))  # no gap, no token in more windows than needed
    assert sum(e - s for s, e in spans) == n + (len(spans) - 1) * o


@pytest.mark.parametrize("window", [1, 2, 3, 8, 59, 97])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 58, 59, 60, 97, 1025])
def test_plan_windows_properties(n, window):
    for overlap in sorted({0, 1, window // 2, window - 1}):
        if overlap < window:
            _check_spans(n, window, overlap)


def test_plan_windows_is_lazy_and_counted_in_closed_form():
    it = plan_windows(10**15, 8, 3)  # a plan of 2e14 windows: only what is asked for exists
    assert [next(it) for _ in range(3)] == [(0, 8), (5, 13), (10, 18)]
    assert count_windows(10**15, 8, 3) == 1 + -(-(10**15 - 8) // 5)
    assert count_windows(9, 8, 0) == 2 and count_windows(8, 8, 7) == 1 and count_windows(0, 8, 0) == 1
    assert list(plan_windows(9, 8, 7)) == [(0, 8), (1, 9)]


@pytest.mark.parametrize("window, overlap, exc, words", [
    (8, 8, ValueError, ["chunk_overlap=8", "0..7"]),
    (8, 9, ValueError, ["chunk_overlap=9", "0..7"]),
    (8, -1, ValueError, ["chunk_overlap=-1"]),
    (1, 1, ValueError, ["chunk_overlap=1", "0..0"]),
    (0, 0, ValueError, ["window would be 0"]),
    (-3, 0, ValueError, ["window would be -3"]),
    (True, 0, ValueError, ["window would be True"]),
    (8, 1.5, TypeError, ["float"]),
    (8, True, TypeError, ["bool"]),
])
def test_plan_windows_bad_input(window, overlap, exc, words):
    with pytest.raises(exc) as e:
        list(plan_windows(100, window, overlap))
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(exc):
        count_windows(100, window, overlap)
    with pytest.raises(ValueError, match="n_tokens"):
        list(plan_windows(-1, 8, 0))
    with pytest.raises(ValueError, match=r"texts\[3\]"):
        check_window(8, 8, "texts[3]")


def test_resolve_overflow_and_its_alias():
    assert resolve_overflow() == "truncate"
    assert resolve_overflow(None, True) == "truncate" and resolve_overflow(None, False) == "error"
    for policy in ("truncate", "error", "chunk"):
        assert resolve_overflow(policy) == policy
    assert resolve_overflow("truncate", True) == "truncate" and resolve_overflow("error", False) == "error"
    for overflow, truncate in (("error", True), ("chunk", True), ("truncate", False), ("chunk", False)):
        with pytest.raises(ValueError, match=f"truncate={truncate} conflicts with overflow='{overflow}'"):
            resolve_overflow(overflow, truncate)
    for bad in ("Chunk", "split", "", 1, True):
        with pytest.raises(ValueError) as e:
            resolve_overflow(bad)
        assert repr(bad) in str(e.value) and "['truncate', 'error', 'chunk']" in str(e.value)
    with pytest.raises(TypeError, match="truncate must be a bool"):
        resolve_overflow(None, "yes")


def test_check_chunk_options():
    assert check_chunk_options("chunk", 0, False) == 0 and check_chunk_options("chunk", np.int64(5), True) == 5
    assert check_chunk_options("truncate", 0, False) == 0
    with pytest.raises(ValueError, match="chunk_overlap must be >= 0, got -2"):
        check_chunk_options("chunk", -2, False)
    with pytest.raises(TypeError, match="chunk_overlap must be an int"):
        check_chunk_options("chunk", 2.0, False)
    with pytest.raises(TypeError, match="return_chunks must be a bool"):
        check_chunk_options("chunk", 0, "yes")
    for policy in ("truncate", "error"):
        with pytest.raises(ValueError, match=f"overflow='chunk' only; overflow is '{policy}'"):
            check_chunk_options(policy, 3, False)
        with pytest.raises(ValueError, match="overflow='chunk' only"):
            check_chunk_options(policy, 0, True)
    with pytest.raises(ValueError, match="normalize=False"):
        check_chunk_options("chunk", 0, False, normalize=False)


# ---- the weighted mean -----------------------------------------------------------------------------------
def _unit(rng, shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_weighted_mean_by_hand():
    rng = np.random.default_rng(0)
    v, w = _unit(rng, (5, 13)), np.array([3, 8, 8, 1, 8])
    acc = WeightedMean(13)
    for row, weight in zip(v, w):
        acc.add(row, int(weight))
    want = (w[:, None] * v.astype(np.float64)).sum(0) / w.sum()
    want /= np.linalg.norm(want)
    got = acc.result()
    assert got.dtype == np.float32 and acc.count == 5 and acc.weight == 28
    np.testing.assert_allclose(got, want, atol=1e-7)
    one = WeightedMean(13)
    one.add(v[2], 7)
    np.testing.assert_allclose(one.result(), v[2], atol=1e-7)  # one window: its own vector
    scaled = WeightedMean(13)
    for row, weight in zip(v, w):
        scaled.add(row, 10 * int(weight))
    np.testing.assert_allclose(scaled.result(), got, atol=1e-7)  # only the weights' ratios count


def test_weighted_mean_errors():
    acc = WeightedMean(4)
    with pytest.raises(ValueError, match="mean of no vectors"):
        acc.result()
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.ones(5), 1)
    with pytest.raises(ValueError, match="weights must be > 0"):
        acc.add(np.ones(4), 0)
    acc.add(np.array([1, 0, 0, 0.0]), 2)
    acc.add(np.array([-1, 0, 0, 0.0]), 2)
    with pytest.raises(FloatingPointError, match="norm 0"):
        acc.result()


def test_finish_truncates_renormalizes_and_quantizes():
    x = _unit(np.random.default_rng(1), (4, 64))
    for k in (8, 13, 64):
        want = x[:, :k] / np.linalg.norm(x[:, :k], axis=1, keepdims=True)
        got = finish(x, k, "float32")
        np.testing.assert_allclose(got, want, atol=1e-7)
        np.testing.assert_array_equal(finish(x, k, "ubinary"), np.packbits(got > 0, axis=-1))
        np.testing.assert_array_equal(finish(x, k, "binary"),
                                      (np.packbits(got > 0, axis=-1).astype(np.int16) - 128).astype(np.int8))
        np.testing.assert_array_equal(finish(x, k, "float16"), got.astype(np.float16))


# ---- streaming -----------------------------------------------------------------------------------------
def _fake_embed(calls, dim=16):
    """Full-width unit vectors that depend on every id of a window (a seeded draw); records each call's ids."""
    def embed_ids(seqs):
        calls.append([list(s) for s in seqs])
        return np.stack([_unit(np.random.default_rng(abs(hash(tuple(s))) % 2**32), (dim,)) for s in seqs])
    return embed_ids


def _text(index, n, window, overlap, prefix=(7, 8), tail=(9,)):
    """A text whose own ids, 1000 * (index + 1) onwards, say which text a window is of."""
    first = 1000 * (index + 1)
    return TextWindows(index, np.asarray(prefix, dtype=np.int64), np.arange(first, first + n, dtype=np.int32),
                       np.asarray(tail, dtype=np.int64), window, overlap)


def _by_hand(tw, embed_ids):
    spans = list(plan_windows(len(tw.content), tw.window, tw.overlap))
    seqs = [list(tw.prefix) + list(tw.content[s:e]) + list(tw.tail) for s, e in spans]
    v = embed_ids(seqs).astype(np.float64)
    w = np.array([e - s for s, e in spans], dtype=np.float64)
    m = (w[:, None] * v).sum(0) / w.sum()
    return m / np.linalg.norm(m), v, seqs


def test_stream_windows_matches_by_hand_in_bounded_groups():
    sizes = [(5, 8, 0), (61, 8, 3), (1, 4, 0), (200, 16, 15), (33, 11, 2)]
    texts = [_text(i, n, w, o) for i, (n, w, o) in enumerate(sizes)]
    calls = []
    out = list(stream_windows(iter(texts), _fake_embed(calls), group_tokens=60, keep=True))
    assert [tw.index for tw, _, _ in out] == list(range(len(texts)))
    for tw, vector, vectors in out:
        want, v, seqs = _by_hand(tw, _fake_embed([]))
        np.testing.assert_allclose(vector, want, atol=1e-6)
        np.testing.assert_allclose(vectors, v, atol=1e-7)
        assert vectors.shape == (tw.num_windows, 16) and len(seqs) == tw.num_windows
    sent = [s for call in calls for s in call]
    assert sent == [s for tw in texts for s in _by_hand(tw, _fake_embed([]))[2]]  # every window once, in order
    assert all(sum(map(len, call)) <= 60 for call in calls)
    assert any(len({s[2] // 1000 for s in call}) > 1 for call in calls)  # windows of several texts share a group
    assert sum(tw.tokens for tw in texts) == sum(map(len, sent))
    # keep=False holds no window vectors
    assert all(vs is None for _, _, vs in stream_windows(iter(texts), _fake_embed([]), 60))


def test_stream_windows_is_lazy():
    """Texts are taken from the iterable only as their windows come up, and each is handed back as soon
    as the group holding its last window is done: a long list of long texts never exists at once."""
    made, seen = [], []

    def texts():
        for i in range(40):
            made.append(i)
            yield _text(i, 300, 10, 2, prefix=(), tail=())

    calls = []

    def embed_ids(seqs):
        seen.append(len(made))
        return _fake_embed(calls)(seqs)

    for tw, _, _ in stream_windows(texts(), embed_ids, group_tokens=50):
        assert len(made) <= tw.index + 2
    assert max(seen[:3]) == 1 and len(made) == 40
    assert all(sum(map(len, c)) <= 50 for c in calls)


def test_stream_windows_one_window_over_the_group_budget_travels_alone():
    calls = []
    tw = _text(0, 40, 30, 0)
    out = list(stream_windows([tw], _fake_embed(calls), group_tokens=5))
    assert [len(c) for c in calls] == [1, 1] and len(out) == 1


def test_stream_windows_names_the_text_of_a_non_finite_window():
    def bad(seqs):
        raise FloatingPointError("non-finite embedding for texts[1]")
    with pytest.raises(FloatingPointError, match=r"window of texts\[3, 4\]"):
        list(stream_windows([_text(3, 20, 8, 0), _text(4, 20, 8, 0)], bad, group_tokens=1000))


# ---- the split on the real tokenizers -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def tok(request):
    from tokenizers import Tokenizer
    full = Tokenizer.from_str(tokenizer_json(request.param))
    full.no_truncation()
    cut = Tokenizer.from_str(tokenizer_json(request.param))
    cut.enable_truncation(max_length=MAX_LENGTH, strategy="longest_first", direction="right", stride=0)
    return request.param, full, cut


def test_special_template(tok):
    kind, full, _ = tok
    assert special_template(full) == (([], [128001]) if kind == "llama3" else ([], []))


@pytest.mark.parametrize("prefix", ["Query: ", "Document: ", ""])
@pytest.mark.parametrize("overlap", [0, 5])
def test_splitter_windows_rebuild_the_text(tok, prefix, overlap):
    kind, full, cut = tok
    sp = Splitter(full, MAX_LENGTH)
    first = cut.encode(prefix + LONG).ids                 # what truncation feeds the model today
    p = sp.prompt_len(prefix, first)
    prompt = full.encode(prefix, add_special_tokens=False).ids
    assert p <= len(prompt) and first[:p] == prompt[:p]
    if prefix:  # BPE glues the prompt's trailing space to the text's first word
        assert p == len(prompt) - 1 and prompt[-1] != first[p]
    tw = sp.windows(0, prefix, LONG, p, overlap, first=first, keep_offsets=True)
    plain = full.encode(prefix + LONG, add_special_tokens=False).ids
    assert tw.content.tolist() == plain[p:] and tw.window == MAX_LENGTH - len(sp.tail) - p
    spans = list(tw.spans())
    assert tw.ids(spans[0]) == first                      # window 0 is exactly the truncated sequence
    for s, e in spans:
        seq = tw.ids((s, e))
        assert len(seq) <= MAX_LENGTH and seq[:p] == prompt[:p]
        assert seq[p:len(seq) - len(sp.tail)] == plain[p + s:p + e]
    assert tw.tokens == sum(len(tw.ids(s)) for s in spans)
    chars = [tw.char_span(s) for s in spans]
    assert chars[0][0] == 0 and chars[-1][1] == len(LONG)
    assert all(a <= b for a, b in chars) and all(c0[0] <= c1[0] for c0, c1 in zip(chars, chars[1:]))
    if overlap == 0:  # consecutive windows tile the text's characters (a character split across tokens aside)
        assert all(c1[0] <= c0[1] for c0, c1 in zip(chars, chars[1:]))


def test_splitter_refuses_a_window_that_cannot_fit(tok):
    kind, full, cut = tok
    sp = Splitter(full, MAX_LENGTH)
    prefix = "a very long prompt " * 8
    first = cut.encode(prefix + LONG).ids
    with pytest.raises(ValueError, match="no room"):
        check_window(sp.window(sp.prompt_len(prefix, first)), 0, "texts[0]")


def test_embed_chunked_routes_fitting_texts_untouched(tok):
    kind, full, cut = tok
    sp = Splitter(full, MAX_LENGTH)
    items = ["short one", LONG, "", MEDIUM]
    prefix = "Query: "
    encs = cut.encode_batch([prefix + t for t in items])
    ids, truncated = [e.ids for e in encs], [bool(e.overflowing) for e in encs]
    assert truncated == [False, True, False, True]
    fit_calls, calls = [], []

    def embed_fit(seqs):
        fit_calls.append(seqs)
        return np.full((len(seqs), 8), 0.5, dtype=np.float32)

    out, chunks, tokens = embed_chunked(sp, prefix, items, ids, truncated, overlap=2, embed_fit=embed_fit,
                                        embed_ids=_fake_embed(calls), k=8, precision="float32", group_tokens=100,
                                        keep=True)
    assert fit_calls == [[ids[0], ids[2]]]               # the fitting texts, whole, in one call: today's path
    np.testing.assert_array_equal(out[[0, 2]], 0.5)
    assert all(sum(map(len, c)) <= 100 for c in calls)
    for i in (1, 3):
        tw = sp.windows(i, prefix, items[i], sp.prompt_len(prefix, ids[i]), 2)
        want, v, _ = _by_hand(tw, _fake_embed([]))
        np.testing.assert_allclose(out[i], finish(want[None], 8, "float32")[0], atol=1e-6)
        assert isinstance(chunks[i], Chunks) and chunks[i].spans == list(tw.spans())
        np.testing.assert_allclose(chunks[i].vectors, finish(v, 8, "float32"), atol=1e-6)
        assert chunks[i].num_tokens == len(tw.content)
    assert chunks[0].spans == [(0, chunks[0].num_tokens)] and chunks[0].vectors.shape == (1, 8)
    assert chunks[2].offsets == [(0, 0)]
    assert tokens == len(ids[0]) + len(ids[2]) + sum(sum(map(len, c)) for c in calls)
    # the overlap is checked for every long text before any work
    calls.clear()
    fit_calls.clear()
    with pytest.raises(ValueError, match=r"texts\[1\].*windows hold"):
        embed_chunked(sp, prefix, items, ids, truncated, overlap=MAX_LENGTH, embed_fit=embed_fit,
                      embed_ids=_fake_embed(calls), k=8, precision="float32", group_tokens=100)
    assert not calls and not fit_calls


# ---- end to end: Engine.embed(..., overflow=...) ----------------------------------------------------------
@pytest.fixture(scope="module")
def cut_engines(ckpt_factory):
    return {f: jv5fast.Engine(ckpt_factory(f), device="cpu", max_length=MAX_LENGTH) for f in ("nano", "small")}


def by_hand(eng, ref, text, prompt_name, overlap=0):
    """The chunked vector of ``text`` from ``Engine.tokenize`` (``ref``: the same checkpoint with a context
    that holds the whole text) and ``eng``'s own forward on each window's ids. Returns (full-width unit vector,
    windows' ids, spans, windows' full-width vectors)."""
    n_tail = len(ref.tokenize("", prompt=""))            # nano appends EOS; small adds nothing; neither prepends
    full = ref.tokenize(text, prompt_name=prompt_name)
    prompt = ref.tokenize("", prompt_name=prompt_name)
    assert len(full) < ref.max_length
    plain, tail, prompt = full[:len(full) - n_tail], full[len(full) - n_tail:], prompt[:len(prompt) - n_tail]
    p = next((i for i, (a, b) in enumerate(zip(plain, prompt)) if a != b), min(len(plain), len(prompt)))
    content, window = plain[p:], eng.max_length - n_tail - p
    spans, s = [], 0
    while True:
        e = min(s + window, len(content))
        spans.append((s, e))
        if e == len(content):
            break
        s = e - overlap
    windows = [plain[:p] + content[s:e] + tail for s, e in spans]
    v = eng._embed_ids(windows, eng.task, eng.dim, True, "float32", False).astype(np.float64)
    w = np.array([e - s for s, e in spans], dtype=np.float64)
    m = (w[:, None] * v).sum(0) / w.sum()
    return m / np.linalg.norm(m), windows, spans, v


def _cut(x, k):
    x = np.asarray(x, dtype=np.float64)[..., :k]
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("family", ["nano", "small"])
@pytest.mark.parametrize("prompt_name", ["query", "document"])
@pytest.mark.parametrize("overlap", [0, 5])
def test_chunk_matches_by_hand(family, prompt_name, overlap, cut_engines, engines):
    eng, ref = cut_engines[family], engines[family]
    texts = [LONG, SHORT[0], MEDIUM]
    for k in (None, 32):
        got = eng.embed(texts, overflow="chunk", chunk_overlap=overlap, prompt_name=prompt_name, truncate_dim=k)
        for i in (0, 2):
            want, windows, spans, _ = by_hand(eng, ref, texts[i], prompt_name, overlap)
            assert len(spans) > 1 and windows[0] == eng.tokenize(texts[i], prompt_name=prompt_name)
            np.testing.assert_allclose(got[i], _cut(want, k or eng.dim), atol=1e-5)
        np.testing.assert_array_equal(got[1], eng.embed(SHORT[0], prompt_name=prompt_name, truncate_dim=k))
    ub = eng.embed(texts, overflow="chunk", chunk_overlap=overlap, prompt_name=prompt_name, truncate_dim=32,
                   precision="ubinary")
    b = eng.embed(texts, overflow="chunk", chunk_overlap=overlap, prompt_name=prompt_name, truncate_dim=32,
                  precision="binary")
    np.testing.assert_array_equal(ub, np.packbits(got > 0, axis=-1))
    np.testing.assert_array_equal(b, (ub.astype(np.int16) - 128).astype(np.int8))
    want = _cut(by_hand(eng, ref, LONG, prompt_name, overlap)[0], 32)
    clear = np.abs(want) > 1e-4  # away from zero, the bits are the by-hand signs
    np.testing.assert_array_equal(np.unpackbits(ub[0])[clear], (want > 0)[clear])


@pytest.mark.parametrize("family", ["nano", "small"])
def test_fitting_texts_take_todays_path_bit_for_bit(family, cut_engines):
    eng = cut_engines[family]
    for precision in ("float32", "binary"):
        today = eng.embed(SHORT, precision=precision, truncate_dim=32)
        chunked = eng.embed(SHORT, overflow="chunk", precision=precision, truncate_dim=32)
        np.testing.assert_array_equal(chunked, today)
        mixed = eng.embed(SHORT + [LONG], overflow="chunk", precision=precision, truncate_dim=32)
        np.testing.assert_array_equal(mixed[:len(SHORT)], today)


@pytest.mark.parametrize("family", ["nano", "small"])
def test_at_the_boundary(family, cut_engines, engines):
    """max_length tokens fit (today's vector); one more makes two windows, the second of one token."""
    eng, ref = cut_engines[family], engines[family]
    m = next(m for m in range(1, MAX_LENGTH) if len(ref.tokenize("a" + " a" * m)) == MAX_LENGTH)
    at, over = "a" + " a" * m, "a" + " a" * (m + 1)
    assert len(ref.tokenize(over)) == MAX_LENGTH + 1
    np.testing.assert_array_equal(eng.embed(at, overflow="chunk"), eng.embed(at))
    eng.embed(at, overflow="error")  # fits: no error
    vec, ch = eng.embed(over, overflow="chunk", return_chunks=True)
    w = ch.spans[0][1]
    assert ch.spans == [(0, w), (w, w + 1)] and ch.num_tokens == w + 1
    full = ch.vectors.astype(np.float64)
    mean = (w * full[0] + full[1]) / (w + 1)
    np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)


@pytest.mark.parametrize("family", ["nano", "small"])
def test_return_chunks(family, cut_engines, engines):
    eng, ref = cut_engines[family], engines[family]
    emb, chunks = eng.embed([LONG, SHORT[0]], overflow="chunk", chunk_overlap=3, return_chunks=True)
    want, windows, spans, v = by_hand(eng, ref, LONG, "document", 3)
    c = chunks[0]
    assert isinstance(c, Chunks) and c.spans == spans and c.vectors.shape == (len(spans), eng.dim)
    np.testing.assert_allclose(c.vectors, v, atol=1e-5)
    w = np.array([e - s for s, e in c.spans], dtype=np.float64)
    mean = (w[:, None] * c.vectors).sum(0)
    np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), atol=1e-6)  # a caller can pool them again
    assert c.num_tokens == spans[-1][1] and c.offsets[0][0] == 0 and c.offsets[-1][1] == len(LONG)
    assert all(a < b for a, b in c.offsets) and all(o0[0] < o1[0] for o0, o1 in zip(c.offsets, c.offsets[1:]))
    assert chunks[1].spans == [(0, chunks[1].num_tokens)] and chunks[1].offsets == [(0, len(SHORT[0]))]
    np.testing.assert_array_equal(chunks[1].vectors, emb[1:2])
    # Matryoshka and binary apply to the windows as to the text
    _, f32 = eng.embed(LONG, overflow="chunk", chunk_overlap=3, truncate_dim=32, return_chunks=True)
    _, b32 = eng.embed(LONG, overflow="chunk", chunk_overlap=3, truncate_dim=32, precision="ubinary",
                       return_chunks=True)
    np.testing.assert_allclose(f32.vectors, _cut(v, 32), atol=1e-5)
    assert b32.vectors.shape == (len(spans), 4) and b32.vectors.dtype == np.uint8 and b32.spans == spans
    np.testing.assert_array_equal(b32.vectors, np.packbits(f32.vectors > 0, axis=-1))
    empty, none = eng.embed([], overflow="chunk", return_chunks=True)
    assert empty.shape == (0, eng.dim) and none == []
    t, _ = eng.embed([LONG], overflow="chunk", return_chunks=True, convert_to_tensor=True)
    assert tuple(t.shape) == (1, eng.dim)


def test_windows_of_several_texts_share_batches(cut_engines):
    eng = cut_engines["nano"]
    texts = [LONG, MEDIUM, LONG[::-1], MEDIUM * 3]
    together = eng.embed(texts, overflow="chunk", chunk_overlap=2)
    alone = np.stack([eng.embed(t, overflow="chunk", chunk_overlap=2) for t in texts])
    assert (together * alone).sum(1).min() >= 0.99999


def test_a_long_text_streams_in_bounded_groups(cut_engines, engines, monkeypatch):
    eng, ref = cut_engines["nano"], engines["nano"]
    text = " ".join(f"w{i % 97}" for i in range(2500))
    sizes, real = [], eng._embed_ids

    def spy(ids, task, k, *a):
        if k == eng.dim:  # the windows' calls
            sizes.append((len(ids), sum(map(len, ids))))
        return real(ids, task, k, *a)
    monkeypatch.setattr(eng, "_embed_ids", spy)
    got = eng.embed(text, overflow="chunk")
    monkeypatch.undo()
    want, windows, _, _ = by_hand(eng, ref, text, "document")
    assert len(sizes) > 1 and sum(n for n, _ in sizes) == len(windows)
    assert max(t for _, t in sizes) <= 4 * max(512, MAX_LENGTH)  # overflow.group_budget on CPU
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_long_document_holds_its_token_ids_never_its_windows(ckpt_factory):
    """100,000 tokens in windows of 16 (some 7,700 windows): the peak of Python / numpy memory while embedding
    is what tokenizing the text whole costs (its ids), not its windows' ids or vectors; with return_chunks the
    vectors are kept (the measurement sees them)."""
    import tracemalloc
    eng = jv5fast.Engine(ckpt_factory("nano"), device="cpu", max_length=16)
    text = " ".join(f"w{i % 97}" for i in range(50_000))
    eng.embed(text[:2000], overflow="chunk", return_chunks=True)  # build the splitter, warm the kernels

    def peak(fn):
        tracemalloc.start()
        try:
            out = fn()
            return tracemalloc.get_traced_memory()[1], out
        finally:
            tracemalloc.stop()

    ids_bytes, n = peak(lambda: len(np.asarray(eng.tokenizer.untruncated().encode_batch([text])[0].ids)))
    assert n > 100_000
    embed_bytes, vec = peak(lambda: eng.embed(text, overflow="chunk"))
    kept_bytes, (_, chunks) = peak(lambda: eng.embed(text, overflow="chunk", return_chunks=True))
    windows = len(chunks.spans)
    vectors_bytes = windows * eng.dim * 4  # every window's vector, float32
    assert windows > 7_000 and vec.shape == (eng.dim,)
    assert embed_bytes - ids_bytes < min(vectors_bytes, ids_bytes) / 4, (embed_bytes, ids_bytes, vectors_bytes)
    assert kept_bytes - ids_bytes > vectors_bytes


@pytest.mark.parametrize("family", ["nano", "small"])
def test_policies_and_errors(family, cut_engines):
    eng = cut_engines[family]
    today = eng.embed([LONG, SHORT[0]])
    np.testing.assert_array_equal(eng.embed([LONG, SHORT[0]], overflow="truncate"), today)
    np.testing.assert_array_equal(eng.embed([LONG, SHORT[0]], truncate=True), today)
    for kw in ({"overflow": "error"}, {"truncate": False}, {"overflow": "error", "truncate": False}):
        with pytest.raises(ValueError, match=rf"texts\[0\] has \d+ tokens .*max_length={MAX_LENGTH}"):
            eng.embed([LONG, SHORT[0]], **kw)
    np.testing.assert_array_equal(eng.embed(SHORT, overflow="error"), eng.embed(SHORT))
    with pytest.raises(ValueError, match="conflicts"):
        eng.embed(LONG, truncate=True, overflow="error")
    with pytest.raises(ValueError, match="conflicts"):
        eng.embed(LONG, truncate=False, overflow="chunk")
    with pytest.raises(ValueError, match=r"overflow 'split' is not valid; choose one of \['truncate', 'error', "):
        eng.embed(LONG, overflow="split")
    with pytest.raises(ValueError, match="overflow='chunk' only"):
        eng.embed(LONG, chunk_overlap=4)
    with pytest.raises(ValueError, match="overflow='chunk' only"):
        eng.embed(LONG, return_chunks=True)
    with pytest.raises(ValueError, match=r"chunk_overlap=30 must be in 0\.\.\d+: texts\[1\]"):
        eng.embed([SHORT[0], LONG], overflow="chunk", chunk_overlap=30)
    with pytest.raises(ValueError, match="normalize=False"):
        eng.embed(LONG, overflow="chunk", normalize=False)
    assert eng.embed([], overflow="chunk", truncate_dim=32, precision="ubinary").shape == (0, 4)
    assert eng.embed(LONG, overflow="chunk").shape == (eng.dim,)
