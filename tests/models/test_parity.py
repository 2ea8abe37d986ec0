"""Parity with transformers' own Qwen3Model / EuroBertModel (adapter merged in fp32), fp32 on CPU.

Every vector must reach cosine >= 0.99999 against the reference, for both families, all four
adapters, several Matryoshka sizes, ragged batches with length 1 and max_length, GQA ratios, both
key-prefix spellings, sharded files and the per-task merged layout.
"""
import random

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast.testing import reference_embed, reference_model

COS = 0.99999


def _texts(n, seed):
    rng = random.Random(seed)
    words = "light vacuum travel Zeit café 東京 nuit 299,792,458 metres réseau быстро ✓ the of and".split()
    out = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(n)]
    return out + ["", "x", "Ünïcödé\tmixed\nlines"]


def _check(eng, path, texts, task, truncate_dim=None, **embed_kw):
    got = eng.embed(texts, task=task, truncate_dim=truncate_dim, **embed_kw)
    ids = eng.tokenize(texts, prompt_name=embed_kw.get("prompt_name"), prompt=embed_kw.get("prompt"))
    ref = reference_embed(reference_model(path, task if eng.tasks else None), ids,
                          truncate_dim=truncate_dim).numpy()
    assert got.shape == ref.shape
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= COS, (task, truncate_dim, cos.min(), int(cos.argmin()))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    return got


@pytest.mark.parametrize("family", ["small", "nano"])
def test_all_adapters_and_matryoshka(family, engines, small_ckpt, nano_ckpt):
    eng, path = engines[family], {"small": small_ckpt, "nano": nano_ckpt}[family]
    texts = _texts(9, seed=hash(family) % 1000)
    outs = {}
    for task, dim in zip(eng.tasks, [None, 32, 48, 8]):
        outs[task] = _check(eng, path, texts, task, truncate_dim=dim, prompt_name="query")
    # the adapters really differ (a test that would pass with adapters ignored is worthless)
    full = {t: eng.embed(texts[:3], task=t) for t in eng.tasks}
    assert not np.allclose(full["retrieval"], full["classification"], atol=1e-3)


@pytest.mark.parametrize("family", ["small", "nano"])
def test_ragged_with_length_one_and_max_length(family, ckpt_factory):
    path = ckpt_factory(family, seed=3)
    eng = jv5fast.Engine(path, device="cpu", max_length=40, max_batch_tokens=64)
    long_text = "a long text that will certainly exceed the forty token limit of this engine " * 4
    # with no prompt, "" is nano's lone EOS and "z" one token on small: length-1 sequences
    texts = ["" if family == "nano" else "z", long_text, "hi", long_text[:90], "x"]
    ids = eng.tokenize(texts, prompt="")
    assert len(ids[1]) == 40 and min(len(s) for s in ids) == 1
    if family == "nano":
        assert ids[1][-1] == 128001  # truncation keeps the EOS the post-processor appends
    _check(eng, path, texts, "retrieval", prompt="")


@pytest.mark.parametrize("family,kv", [("small", 1), ("small", 4), ("nano", 2), ("nano", 1)])
def test_gqa_ratios(family, kv, ckpt_factory):
    path = ckpt_factory(family, seed=5, config_overrides={"num_key_value_heads": kv}, tasks=("retrieval",))
    eng = jv5fast.Engine(path, device="cpu")
    _check(eng, path, _texts(5, seed=kv), "retrieval")


@pytest.mark.parametrize("family", ["small", "nano"])
def test_prefixed_keys_and_shards_load_the_same(family, ckpt_factory):
    plain = jv5fast.Engine(ckpt_factory(family, seed=7, tasks=("retrieval",)), device="cpu")
    sharded = ckpt_factory(family, seed=7, tasks=("retrieval",), key_prefix=True, shards=3)
    other = jv5fast.Engine(sharded, device="cpu")
    texts = _texts(4, seed=1)
    np.testing.assert_array_equal(plain.embed(texts), other.embed(texts))
    _check(other, sharded, texts, "retrieval")


@pytest.mark.parametrize("family", ["small", "nano"])
def test_merged_task_repo_matches_base_plus_adapter(family, ckpt_factory):
    base = jv5fast.Engine(ckpt_factory(family, seed=11), device="cpu", task="text-matching")
    merged_path = ckpt_factory(family, seed=11, merged_task="text-matching", dtype=torch.float32)
    merged = jv5fast.Engine(merged_path, device="cpu")
    assert merged.tasks == () and merged.task is None
    texts = _texts(5, seed=2)
    a, b = base.embed(texts), merged.embed(texts)
    assert (a * b).sum(1).min() >= COS
    _check(merged, merged_path, texts, None)


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_storage_dtypes(storage, ckpt_factory):
    path = ckpt_factory("small", seed=13, dtype=storage, tasks=("retrieval", "clustering"))
    eng = jv5fast.Engine(path, device="cpu")
    _check(eng, path, _texts(4, seed=3), "clustering")


def test_bfloat16_engine_close_to_fp32(engines, small_ckpt):
    eng16 = jv5fast.Engine(small_ckpt, device="cpu", dtype="bfloat16")
    texts = _texts(6, seed=9)
    a, b = engines["small"].embed(texts), eng16.embed(texts)
    assert (a * b).sum(1).min() >= 0.99


def test_parity_check_is_sensitive_to_rope_theta(ckpt_factory):
    """Guard against a vacuous comparison: a slightly wrong rope_theta must fail the 0.99999 bar."""
    path = ckpt_factory("small", seed=17, tasks=("retrieval",))
    eng = jv5fast.Engine(path, device="cpu")
    texts = [" ".join(["word"] * 30) + " end", "short text here with several tokens"]
    ids = eng.tokenize(texts)
    ref = reference_embed(reference_model(path, "retrieval"), ids).numpy()
    a = eng.args
    eng.model._rope = jv5fast.ops.rope_tables(a.rope_theta / 3.5, a.head_dim, 512)  # the backbone's 1M
    bad = eng.embed(texts)
    assert (bad * ref).sum(1).min() < COS
