"""Engine.encode / encode_query / encode_document / similarity against a real SentenceTransformer (Transformer +
last-token Pooling + Normalize, as bench/bench_latency.py builds it) on the same merged fp32 weights: same calls,
same vectors; plus the keywords jv5fast maps, refuses or adds (jv5fast/st_compat.py)."""
import json
import logging
import os
import random

import numpy as np
import pytest
import torch

import jv5fast

ST_PAD = {"nano": "<|pad|>", "small": "<|endoftext|>"}  # tokenizer_config.json names no pad token
COS = 0.99999
WORDS = ["light", "vacuum", "speed", "Ünïcödé", "東京", "🚀", "constant", "nature", "photon", "a", "the", "of",
         "and", "is", "matryoshka", "quantum", "tokenizer,", "embedding.", "retrieval?", "query:", "document"]


def fresh_texts(n, seed):
    """n texts of 0..~120 words, new for each seed (first one empty, one single character)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 3, 7, 19, 40, 77)))) for _ in range(n)]
    return ["", "x"] + texts[2:]


@pytest.fixture(scope="module", params=["nano", "small"])
def peers(request, ckpt_factory):
    """(jv5fast Engine, SentenceTransformer) on one per-task merged checkpoint, fp32 end to end."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    family = request.param
    path = ckpt_factory(family, seed=7, merged_task="retrieval", dtype=torch.float32, real_tokenizer=True)
    with open(os.path.join(path, "config_sentence_transformers.json")) as f:
        cfg = json.load(f)
    tr = Transformer(path, model_kwargs={"dtype": torch.float32}, processor_kwargs={"pad_token": ST_PAD[family]})
    pool = Pooling(tr.get_embedding_dimension(), pooling_mode="lasttoken")
    st = SentenceTransformer(modules=[tr, pool, Normalize()], device="cpu", prompts=cfg["prompts"],
                             default_prompt_name=cfg["default_prompt_name"])
    eng = jv5fast.Engine(path, device="cpu")
    texts = fresh_texts(13, seed=1)
    enc = st.preprocess(texts, prompt="Query: ")   # the precondition: both feed their model the same ids
    ids = [row[m == 1].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    assert ids == eng.tokenize(texts, prompt_name="query")
    return eng, st


def assert_same_floats(got, want):
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    g, w = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    cos = (g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
    assert cos.min() >= COS
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)


def assert_same_bits(got, want, floats):
    """Identical packed codes, except bits whose float value (from ``floats``, the same rows) is within 1e-6
    of zero, where fp32 rounding may flip the sign."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    flips = np.unpackbits(got.view(np.uint8), axis=-1) != np.unpackbits(want.view(np.uint8), axis=-1)
    flips = flips[..., :floats.shape[-1]]  # the zero-padded tail bits never differ
    assert np.all(np.abs(floats[flips]) < 1e-6), f"{flips.sum()} bits differ away from zero"


CASES = [  # (method, kwargs): called the same way on both
    ("encode", {}),
    ("encode", {"prompt": "Represent: "}),
    ("encode_query", {}),
    ("encode_document", {}),
    ("encode", {"truncate_dim": 32, "normalize_embeddings": True}),
    ("encode_query", {"truncate_dim": 24, "normalize_embeddings": False}),   # ST: unit at full width, sliced
    ("encode", {"normalize_embeddings": False}),
    ("encode", {"convert_to_tensor": True, "prompt_name": "query"}),
    ("encode", {"convert_to_numpy": False}),
    ("encode", {"batch_size": 5, "show_progress_bar": False, "device": "cpu", "prompt_name": "query"}),
]


def test_encode_matches_sentence_transformers(peers):
    eng, st = peers
    texts = fresh_texts(13, seed=2)
    for method, kw in CASES:
        got, want = getattr(eng, method)(texts, **kw), getattr(st, method)(texts, **kw)
        assert type(got) is type(want), (method, kw)
        if isinstance(want, list):  # convert_to_numpy=False: a list of 1-D tensors
            got, want = torch.stack(got), torch.stack(want)
        assert_same_floats(got, want)
        if "batch_size" not in kw:  # a single str: one 1-D vector
            one_got, one_want = getattr(eng, method)(texts[5], **kw), getattr(st, method)(texts[5], **kw)
            assert type(one_got) is type(one_want) and one_got.shape == one_want.shape == want.shape[1:]
            assert_same_floats(one_got, one_want)
    # the old name of the first argument
    assert_same_floats(eng.encode(sentences=texts[:3]), st.encode(sentences=texts[:3]))
    # jv5fast's default normalizes after truncation (ST's default slices the unit vector): same direction
    got, want = eng.encode(texts, truncate_dim=32), st.encode(texts, truncate_dim=32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert_same_floats(got, want / np.linalg.norm(want, axis=1, keepdims=True))


@pytest.mark.parametrize("precision", ["ubinary", "binary"])
def test_binary_precisions_match_sentence_transformers(peers, precision):
    eng, st = peers
    texts = fresh_texts(11, seed=3)
    floats = st.encode_query(texts, truncate_dim=40)
    for kw in ({"truncate_dim": 40}, {"truncate_dim": 40, "normalize_embeddings": True}, {}):
        got = eng.encode_query(texts, precision=precision, **kw)
        want = st.encode_query(texts, precision=precision, **kw)
        assert got.dtype == want.dtype == (np.uint8 if precision == "ubinary" else np.int8)
        assert_same_bits(got, want, st.encode_query(texts, **kw))
    assert_same_bits(eng.encode_query(texts[4], precision=precision, truncate_dim=40),
                     st.encode_query(texts[4], precision=precision, truncate_dim=40), floats[4])


def test_int8_uint8_and_empty_input_match_sentence_transformers(peers, caplog):
    eng, st = peers
    texts = fresh_texts(9, seed=4)
    for precision, norm in (("int8", False), ("uint8", True), ("int8", None)):
        with caplog.at_level(logging.WARNING, logger="jv5fast"):
            got = eng.encode(texts, precision=precision, truncate_dim=48, normalize_embeddings=norm)
        assert "only 9 embeddings" in caplog.text
        want = st.encode(texts, precision=precision, truncate_dim=48, normalize_embeddings=norm is not False)
        assert got.dtype == want.dtype and got.shape == want.shape
        # calibrated on the batch: floor() may step by one level where the floats differ by ~1e-7
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
        with pytest.raises(ValueError, match=f"precision='{precision}' calibrates .* one text gives no range"):
            eng.encode(texts[3], precision=precision)
    # empty input: ST returns shape (0,); jv5fast keeps the width, (0, dim), in the requested dtype
    for kw, dtype, width in (({}, np.float32, 64), ({"precision": "ubinary", "truncate_dim": 40}, np.uint8, 5),
                             ({"precision": "int8"}, np.int8, 64)):
        got, want = eng.encode([], **kw), st.encode([], **kw)
        assert want.size == 0 and got.shape == (0, width) and got.dtype == dtype
    assert eng.encode([], convert_to_tensor=True).shape == (0, 64)
    assert eng.encode([], convert_to_numpy=False) == st.encode([], convert_to_numpy=False) == []


def test_similarity_matches_sentence_transformers(nano):
    from sentence_transformers.util import cos_sim, pairwise_cos_sim
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(5, 40, generator=g) * 3, torch.randn(7, 40, generator=g)  # not unit norm on purpose
    for x, y in ((a, b), (a.numpy(), b.numpy()), (list(a.numpy()), list(b)), (a[2], b), (a[1].numpy(), b[3])):
        got, want = nano.similarity(x, y), cos_sim(x, y)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # half is upcast to float32 (as ST does); mixed with float64 the result is float64 (ST's mm would raise)
    got = nano.similarity(a.half(), b.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, cos_sim(a.half().double(), b.double()), rtol=1e-6, atol=1e-7)
    got = nano.similarity_pairwise(a, b[:5])
    assert got.shape == (5,)
    torch.testing.assert_close(got, pairwise_cos_sim(a, b[:5]), rtol=1e-5, atol=1e-6)
    q, d = nano.encode_query(fresh_texts(3, seed=6)), nano.encode_document(fresh_texts(6, seed=7))
    torch.testing.assert_close(nano.similarity(q, d), torch.from_numpy(q @ d.T), rtol=1e-5, atol=1e-6)
    assert nano.similarity_fn_name == "cosine"


@pytest.fixture(scope="module")
def nano(engines):
    return engines["nano"]


def test_batch_size_caps_texts_per_forward_not_the_vectors(nano, monkeypatch):
    texts = fresh_texts(23, seed=8)
    want = nano.embed(texts, task="clustering", prompt_name="query")
    sizes = []
    forward = nano._forward

    def spy(seqs, *a, **k):
        sizes.append(len(seqs))
        return forward(seqs, *a, **k)
    monkeypatch.setattr(nano, "_forward", spy)
    got = nano.encode_query(texts, batch_size=4, task="clustering")
    assert sizes and max(sizes) <= 4 and sum(sizes) == 23
    np.testing.assert_allclose(got, want, atol=1e-5)
    sizes.clear()
    np.testing.assert_array_equal(nano.encode_query(texts, task="clustering"), want)  # no cap: embed itself
    assert max(sizes) > 4


def test_normalize_keywords(nano):
    texts = fresh_texts(7, seed=9)
    full, raw = nano.embed(texts), nano.embed(texts, normalize=False)
    np.testing.assert_array_equal(nano.encode(texts, truncate_dim=16), nano.embed(texts, truncate_dim=16))
    np.testing.assert_array_equal(nano.encode(texts, truncate_dim=16, normalize_embeddings=False), full[:, :16])
    np.testing.assert_array_equal(nano.encode(texts, normalize=False), raw)   # jv5fast's own keyword
    with pytest.raises(ValueError, match="normalize_embeddings .* or normalize .*, not both"):
        nano.encode(texts, normalize=True, normalize_embeddings=True)


def test_error_in_a_capped_batch_names_the_global_index(small):
    texts = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "", "ggggggg"]
    with pytest.raises(ValueError, match=r"texts\[6\] produced no tokens"):
        small.encode(texts, prompt="", batch_size=3)


@pytest.fixture(scope="module")
def small(engines):
    return engines["small"]


@pytest.mark.parametrize("kw, exc, msg", [
    ({"foo": 1}, ValueError,
     r"does not use: \['foo'\].*\['task', 'normalize', 'truncate', 'overflow', 'chunk_overlap'\].*'retrieval'"),
    ({"processing_kwargs": {}}, ValueError, r"'processing_kwargs' is not supported.*max_length"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -3}, ValueError, "batch_size must be a positive integer, got -3"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be a positive int or None, got float"),
    ({"output_value": "token_embeddings"}, ValueError, r"output_value='token_embeddings'.*'sentence_embedding'"),
    ({"output_value": None}, ValueError, r"output_value=None is not supported"),
    ({"precision": "int4"}, ValueError, r"precision 'int4' is not valid.*'int8', 'uint8', 'binary', 'ubinary'"),
    ({"device": ["cpu", "cpu"]}, ValueError, r"multi-process encoding .* one device \(cpu\)"),
    ({"device": "cuda:1"}, ValueError, r"device='cuda:1', but this engine was loaded on cpu.*device=None or 'cpu'"),
    ({"device": "toaster"}, ValueError, r"device 'toaster' is not a device"),
    ({"pool": {}}, ValueError, "multi-process encoding"),
    ({"chunk_size": 8}, ValueError, "multi-process encoding"),
    ({"task": "retreival"}, ValueError, r"unknown task 'retreival'; valid tasks"),
    ({"truncate_dim": 65}, ValueError, "out of range"),
    ({"prompt_name": "passage"}, ValueError, r"unknown prompt_name 'passage'"),
    ({"sentences": ["b"]}, TypeError, r"takes the texts once.*\['inputs', 'sentences'\]"),
])
def test_bad_arguments(nano, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        nano.encode(["a", "b"], **kw)


def test_bad_similarity_and_missing_input(nano):
    with pytest.raises(TypeError, match=r"takes the texts once.*none"):
        nano.encode()
    with pytest.raises(TypeError, match=r"embeddings1 has dtype torch.uint8: similarity takes float"):
        nano.similarity(nano.encode(["a", "b"], precision="ubinary"), nano.encode(["c"]))
    with pytest.raises(ValueError, match=r"one width; got shapes \(2, 64\) and \(1, 32\)"):
        nano.similarity(nano.encode(["a", "b"]), nano.encode(["c"], truncate_dim=32))
    with pytest.raises(ValueError, match=r"same shape; got \(2, 64\) and \(3, 64\)"):
        nano.similarity_pairwise(nano.encode(["a", "b"]), nano.encode(["c", "d", "e"]))


def test_similarity_functions_follow_similarity_fn_name(nano, monkeypatch):
    """Setting similarity_fn_name (as ST users do) changes the function, as in sentence-transformers."""
    from sentence_transformers import util
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 16, generator=g), torch.randn(6, 16, generator=g)
    want = {"dot": (util.dot_score, util.pairwise_dot_score), "euclidean": (util.euclidean_sim,
            util.pairwise_euclidean_sim), "manhattan": (util.manhattan_sim, util.pairwise_manhattan_sim),
            "cosine": (util.cos_sim, util.pairwise_cos_sim)}
    for name, (full, pair) in want.items():
        monkeypatch.setattr(nano, "similarity_fn_name", name, raising=False)
        torch.testing.assert_close(nano.similarity(a, b), full(a, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nano.similarity_pairwise(a, b[:4]), pair(a, b[:4]), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(nano, "similarity_fn_name", "jaccard", raising=False)
    with pytest.raises(ValueError, match=r"similarity_fn_name='jaccard' is not valid; choose one of \['cosine'"):
        nano.similarity(a, b)


def test_query_and_document_prompts_fall_back_to_the_default_prompt(ckpt_factory, tmp_path):
    """A model without a "query" (or any document-like) prompt: sentence-transformers uses its default prompt."""
    import shutil
    path = shutil.copytree(ckpt_factory("nano"), str(tmp_path / "ck"))
    with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"passage": "Passage: ", "other": "Other: "}, "default_prompt_name": "other"}, f)
    eng = jv5fast.Engine(path, device="cpu")
    texts = fresh_texts(3, seed=11)
    np.testing.assert_allclose(eng.encode_query(texts), eng.embed(texts, prompt="Other: "), atol=1e-6)
    np.testing.assert_allclose(eng.encode_document(texts), eng.embed(texts, prompt="Passage: "), atol=1e-6)
    with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"other": "Other: "}, "default_prompt_name": "other"}, f)
    eng = jv5fast.Engine(path, device="cpu")
    np.testing.assert_allclose(eng.encode_document(texts), eng.embed(texts, prompt="Other: "), atol=1e-6)


def test_non_finite_error_in_a_capped_batch_names_the_global_index(nano, monkeypatch):
    """A NaN vector (a stand-in for a low-precision overflow) is named by its index in the caller's list, also
    when batch_size splits the input into longest-first chunks."""
    texts = fresh_texts(6, seed=12)
    poison = nano.tokenize(texts[5])
    real = nano._run

    def run(idx, ids, out, k, normalize):
        real(idx, ids, out, k, normalize)
        for i in idx:
            if ids[i] == poison:
                out[i] = float("nan")
    monkeypatch.setattr(nano, "_run", run)
    for kw in ({}, {"batch_size": 2}, {"batch_size": 4}):
        with pytest.raises(FloatingPointError, match=r"non-finite embedding for texts\[5\]"):
            nano.encode(texts, **kw)
