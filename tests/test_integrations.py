"""jv5fast.integrations: LangChain's Embeddings and LlamaIndex's BaseEmbedding driven through their own public
APIs (an InMemoryVectorStore, a VectorStoreIndex retriever) against brute force over Engine vectors; async
calls leave the event loop running; `import jv5fast` imports none of the frameworks."""
import asyncio
import random
import subprocess
import sys
import time

import numpy as np
import pytest

WORDS = ["light", "vacuum", "speed", "Ünïcödé", "東京", "constant", "photon", "a", "the", "of", "orbit", "moon",
         "tide", "river", "delta", "salt", "glacier", "retrieval", "query", "embedding"]


def fresh_texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 5, 11, 23)))) for _ in range(n)]


@pytest.fixture(scope="module")
def nano(engines):
    return engines["nano"]


def slow_forward(monkeypatch, engine, seconds=0.3):
    """Make every forward pass of ``engine`` take ``seconds`` longer (in the thread that runs it)."""
    forward = engine._forward

    def slow(*a, **k):
        time.sleep(seconds)
        return forward(*a, **k)
    monkeypatch.setattr(engine, "_forward", slow)


def ticks_during(coro_fn):
    """Run ``coro_fn()`` while a ticker task counts 5 ms sleeps; returns (its result, ticks seen meanwhile)."""
    async def main():
        ticks, done = 0, asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)   # let the ticker start
        start = ticks
        result = await coro_fn()
        seen = ticks - start
        done.set()
        await task
        return result, seen
    return asyncio.run(main())


def test_import_jv5fast_imports_no_framework():
    code = ("import sys, jv5fast, jv5fast.integrations; e = jv5fast.Engine; "
            "print([m for m in ('langchain_core', 'llama_index', 'sentence_transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- LangChain ----------------------------------------------------------------------------------------
def test_langchain_embeddings_and_vector_store(nano):
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    from jv5fast.integrations import JV5FastEmbeddings  # the lazy accessor
    emb = JV5FastEmbeddings(nano, task="text-matching", dimensions=32)
    assert isinstance(emb, Embeddings)
    docs, query = fresh_texts(19, seed=11), "the speed of light in a vacuum"
    got = emb.embed_documents(docs)
    assert isinstance(got, list) and len(got) == 19 and all(isinstance(v, list) and len(v) == 32 for v in got)
    assert all(type(x) is float for x in got[0])
    d = nano.encode_document(docs, task="text-matching", truncate_dim=32)
    q = nano.encode_query(query, task="text-matching", truncate_dim=32)
    np.testing.assert_array_equal(np.array(got, dtype=np.float32), d)
    np.testing.assert_array_equal(np.array(emb.embed_query(query), dtype=np.float32), q)
    assert emb.embed_documents([]) == []

    store = InMemoryVectorStore(embedding=emb)
    store.add_texts(docs, ids=[str(i) for i in range(len(docs))])
    hits = store.similarity_search_with_score(query, k=5)
    scores = d @ q   # unit vectors: cosine
    top = np.argsort(-scores, kind="stable")[:5]
    assert [h.id for h, _ in hits] == [str(i) for i in top]
    np.testing.assert_allclose([s for _, s in hits], scores[top], atol=1e-5)

    # async, through the base class's public API
    np.testing.assert_array_equal(np.array(asyncio.run(emb.aembed_query(query)), dtype=np.float32), q)
    np.testing.assert_array_equal(np.array(asyncio.run(emb.aembed_documents(docs[:3])), dtype=np.float32), d[:3])


def test_langchain_async_does_not_block_the_loop(nano, monkeypatch):
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    emb = JV5FastEmbeddings(nano)
    slow_forward(monkeypatch, nano)
    for call in (lambda: emb.aembed_query("a query"), lambda: emb.aembed_documents(["one", "two"])):
        result, ticks = ticks_during(call)
        assert ticks >= 10 and len(result) > 0   # 0.3 s in a worker thread: the loop ticked meanwhile


def test_langchain_from_path_and_bad_arguments(nano, nano_ckpt):
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    emb = JV5FastEmbeddings(nano_ckpt, task="clustering", device="cpu", batch_size=2)
    assert emb.engine.task == "clustering" and emb.engine is not nano
    np.testing.assert_allclose(emb.embed_documents(["a", "bb", "ccc"]),
                               nano.encode_document(["a", "bb", "ccc"], task="clustering"), atol=1e-6)
    with pytest.raises(ValueError, match=r"truncate_dim=65 is out of range 1\.\.64"):
        JV5FastEmbeddings(nano, dimensions=65)
    with pytest.raises(ValueError, match=r"unknown task 'summaries'; valid tasks"):
        JV5FastEmbeddings(nano, task="summaries")
    with pytest.raises(ValueError, match=r"\['device'\] configure a new Engine, but an existing Engine was given"):
        JV5FastEmbeddings(nano, device="cpu")
    with pytest.raises(TypeError, match="model must be a jv5fast.Engine or a checkpoint path, got int"):
        JV5FastEmbeddings(42)
    with pytest.raises(TypeError, match="embed_query takes one str, got list"):
        JV5FastEmbeddings(nano).embed_query(["a"])


# ---- LlamaIndex ---------------------------------------------------------------------------------------
def test_llama_index_embedding_public_api(nano, monkeypatch):
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from jv5fast.integrations import JV5FastEmbedding
    emb = JV5FastEmbedding(nano, dimensions=48, embed_batch_size=3)
    assert isinstance(emb, BaseEmbedding) and emb.engine is nano
    assert (emb.model_name, emb.task, emb.dimensions, emb.embed_batch_size) == (nano.path, None, 48, 3)
    assert JV5FastEmbedding.class_name() == "JV5FastEmbedding" and "_engine" not in emb.to_dict()
    texts, query = fresh_texts(7, seed=12), "which river ends in a delta"
    d, q = nano.encode_document(texts, truncate_dim=48), nano.encode_query(query, truncate_dim=48)

    calls = []
    embed = nano.embed
    monkeypatch.setattr(nano, "embed", lambda items, **kw: calls.append(len(items)) or embed(items, **kw))
    got = emb.get_text_embedding_batch(texts)
    assert calls == [3, 3, 1]   # embed_batch_size honoured: BaseEmbedding hands over at most 3 texts a call
    # other batch compositions than one call over all 7: equal up to fp32 GEMM blocking (test_engine: 1e-5)
    np.testing.assert_allclose(got, d, atol=1e-6)
    np.testing.assert_array_equal(np.array(emb.get_query_embedding(query), dtype=np.float32), q)
    np.testing.assert_allclose(emb.get_text_embedding(texts[2]), d[2], atol=1e-6)
    np.testing.assert_array_equal(np.array(asyncio.run(emb.aget_query_embedding(query)), dtype=np.float32), q)
    np.testing.assert_allclose(asyncio.run(emb.aget_text_embedding_batch(texts)), d, atol=1e-6)
    np.testing.assert_allclose(asyncio.run(emb.aget_text_embedding(texts[4])), d[4], atol=1e-6)


def test_llama_index_async_does_not_block_the_loop(nano, monkeypatch):
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    emb = JV5FastEmbedding(nano)
    slow_forward(monkeypatch, nano)
    for call in (lambda: emb.aget_query_embedding("a query"), lambda: emb.aget_text_embedding("a text"),
                 lambda: emb.aget_text_embedding_batch(["one", "two"])):
        result, ticks = ticks_during(call)
        assert ticks >= 10 and len(result) > 0


def test_llama_index_vector_store_index_retrieval(nano):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from jv5fast.integrations.llama_index import JV5FastEmbedding
    emb = JV5FastEmbedding(nano, task="retrieval", dimensions=32)
    texts, query = fresh_texts(17, seed=13), "glacier salt tide"
    index = VectorStoreIndex([TextNode(text=t, id_=str(i)) for i, t in enumerate(texts)], embed_model=emb)
    hits = index.as_retriever(similarity_top_k=4).retrieve(query)   # retrieval only: no LLM is involved
    scores = nano.encode_document(texts, truncate_dim=32) @ nano.encode_query(query, truncate_dim=32)
    top = np.argsort(-scores, kind="stable")[:4]
    assert [h.node.node_id for h in hits] == [str(i) for i in top]
    np.testing.assert_allclose([h.score for h in hits], scores[top], atol=1e-5)


def test_llama_index_from_path_and_bad_arguments(nano, nano_ckpt):
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    emb = JV5FastEmbedding(nano_ckpt, task="classification", engine_kwargs={"device": "cpu"})
    assert emb.engine.task == "classification" and emb.model_name == nano_ckpt
    np.testing.assert_allclose(emb.get_query_embedding("x"), nano.encode_query("x", task="classification"),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"truncate_dim=0 is out of range"):
        JV5FastEmbedding(nano, dimensions=0)
    with pytest.raises(ValueError, match=r"unknown task 'summaries'"):
        JV5FastEmbedding(nano, task="summaries")
    with pytest.raises(ValueError, match="an existing Engine was given"):
        JV5FastEmbedding(nano, engine_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="embed_batch_size"):
        JV5FastEmbedding(nano, embed_batch_size=0)   # BaseEmbedding's own check (pydantic, gt=0)


def test_single_str_is_refused_where_a_list_is_expected(nano):
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    lc = JV5FastEmbeddings(nano)
    with pytest.raises(TypeError, match=r"embed_documents takes a list of str, got one str \('abc'\)"):
        lc.embed_documents("abc")
    with pytest.raises(TypeError, match="embed_documents takes a list of str"):
        asyncio.run(lc.aembed_documents("abc"))
    li = JV5FastEmbedding(nano)
    with pytest.raises(TypeError, match="a query must be a str"):
        li.get_query_embedding(["a", "b"])


def test_pickle_serialise_and_copy_rebuild_the_same_embedder(nano, nano_ckpt):
    """Pipelines pickle or serialise the embed model (LlamaIndex workers, LangChain caches): the copy loads the
    same engine again from the recorded path and options and gives the same vectors."""
    import copy
    import pickle
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    texts = fresh_texts(3, seed=21)
    for src in (nano, nano_ckpt):
        li = JV5FastEmbedding(src, dimensions=32, embed_batch_size=2)
        want = li.get_text_embedding_batch(texts)
        for other in (pickle.loads(pickle.dumps(li)), JV5FastEmbedding.from_dict(li.to_dict()),
                      JV5FastEmbedding.from_json(li.to_json())):
            assert other.dimensions == 32 and other.embed_batch_size == 2 and other.engine is not li.engine
            np.testing.assert_allclose(other.get_text_embedding_batch(texts), want, rtol=0, atol=1e-6)
        assert copy.deepcopy(li).engine is li.engine
        lc = JV5FastEmbeddings(src, dimensions=32)
        again = pickle.loads(pickle.dumps(lc))
        np.testing.assert_allclose(again.embed_documents(texts), lc.embed_documents(texts), rtol=0, atol=1e-6)
    assert JV5FastEmbedding(nano).engine_kwargs == {"device": "cpu", "max_length": nano.max_length,
                                                    "max_batch_tokens": nano.max_batch_tokens, "task": "retrieval",
                                                    "dtype": "float32"}


def test_round_trips_keep_the_engines_task_and_options(nano_ckpt):
    """An Engine built with a non-default adapter, dtype, max_length and batch budget, wrapped with task=None:
    every copy (pickle, deepcopy, to_dict / from_dict, to_json / from_json) reloads it with the same options and
    gives the same vectors. It once reloaded the default adapter (vectors off by ~0.47)."""
    import copy
    import pickle

    import torch

    import jv5fast
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    engine = jv5fast.Engine(nano_ckpt, task="text-matching", device="cpu", dtype="bfloat16", max_length=9,
                            max_batch_tokens=40)
    texts = fresh_texts(5, seed=31)   # up to 23 words: most are cut at max_length=9
    assert max(len(ids) for ids in engine.tokenize(texts, prompt_name="document")) == 9
    default = jv5fast.Engine(nano_ckpt, device="cpu", dtype="bfloat16", max_length=9)
    want = engine.encode_document(texts, truncate_dim=48)
    assert np.abs(default.encode_document(texts, truncate_dim=48) - want).max() > 0.1   # the adapter matters
    options = (("text-matching",) * 2, (torch.bfloat16,) * 2, (9, 9), (40, 40))

    lc = JV5FastEmbeddings(engine, dimensions=48)
    li = JV5FastEmbedding(engine, dimensions=48)
    copies = [("langchain pickle", pickle.loads(pickle.dumps(lc))), ("langchain deepcopy", copy.deepcopy(lc)),
              ("llama_index pickle", pickle.loads(pickle.dumps(li))),
              ("llama_index from_dict", JV5FastEmbedding.from_dict(li.to_dict())),
              ("llama_index from_json", JV5FastEmbedding.from_json(li.to_json())),
              ("llama_index deepcopy", copy.deepcopy(li))]
    for what, other in copies:
        got = other.embed_documents(texts) if what.startswith("langchain") else other.get_text_embedding_batch(texts)
        e = other.engine
        assert tuple(zip((e.task, e.dtype, e.max_length, e.max_batch_tokens),
                         (engine.task, engine.dtype, engine.max_length, engine.max_batch_tokens))) == options, what
        np.testing.assert_allclose(np.array(got, dtype=np.float32), want, rtol=0, atol=1e-6, err_msg=what)


def test_a_bf16_cpu_engine_round_trips_as_bf16(nano_ckpt):
    """``cpu_precision="bf16"`` (opt-in bf16 GEMMs) changes the vectors: a copy must keep it."""
    import pickle

    import jv5fast
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    engine = jv5fast.Engine(nano_ckpt, device="cpu", cpu_precision="bf16")
    texts = fresh_texts(4, seed=5)
    want = np.array(JV5FastEmbeddings(engine).embed_documents(texts), dtype=np.float32)
    other = pickle.loads(pickle.dumps(JV5FastEmbeddings(engine)))
    assert other.engine.cpu_precision == "bf16"
    np.testing.assert_allclose(np.array(other.embed_documents(texts), dtype=np.float32), want, rtol=0, atol=1e-6)


def test_int8_engine_from_a_path_round_trips(nano_ckpt):
    """``quantize="int8"`` runs a cached ONNX export folder: a copy reloads that folder as an ONNX int8 engine (it
    once passed quantize="int8" again with the export folder, which is no checkpoint, and failed)."""
    import pickle
    import warnings
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from jv5fast.integrations.langchain import JV5FastEmbeddings
    from jv5fast.integrations.llama_index import JV5FastEmbedding
    texts = fresh_texts(4, seed=41)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the int8 quality report, on every load
        lc = JV5FastEmbeddings(nano_ckpt, quantize="int8", task="clustering", dimensions=32)
        li = JV5FastEmbedding(nano_ckpt, task="clustering", engine_kwargs={"quantize": "int8"})
        copies = [pickle.loads(pickle.dumps(lc)), pickle.loads(pickle.dumps(li)),
                  JV5FastEmbedding.from_json(li.to_json())]
    want = lc.embed_documents(texts)
    np.testing.assert_allclose(copies[0].embed_documents(texts), want, rtol=0, atol=1e-6)
    for other in copies[1:]:
        assert (other.engine.backend, other.engine.task) == ("onnx", "clustering")
        np.testing.assert_allclose(other.get_text_embedding_batch(texts), li.get_text_embedding_batch(texts),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocked,module,extra", [
    ("langchain_core", "langchain", "langchain"),
    ("llama_index.core", "llama_index", "llamaindex"),
    ("mteb", "mteb", "mteb"),
])
def test_missing_extra_names_the_pip_install(monkeypatch, blocked, module, extra):
    """Without its framework an integration says which extra to install, as the onnx / faiss / parquet extras do,
    through the module and through the lazy accessor of jv5fast.integrations."""
    import importlib

    import jv5fast.integrations
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.setitem(sys.modules, name, None)   # imports of it now fail as if it were not installed
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, f"jv5fast.integrations.{module}", raising=False)
    want = rf'this integration needs .*, in the {extra} extra: pip install "jv5fast\[{extra}\]"'
    with pytest.raises(ImportError, match=want) as info:
        importlib.import_module(f"jv5fast.integrations.{module}")
    assert info.value.name.split(".")[0] == blocked.split(".")[0]
    name = {"langchain": "JV5FastEmbeddings", "llama_index": "JV5FastEmbedding", "mteb": "JV5FastEncoder"}[module]
    with pytest.raises(ImportError, match=want):
        getattr(jv5fast.integrations, name)


def test_missing_extra_keeps_other_import_errors():
    """A dependency missing inside an installed framework is its own error, not "install the extra"."""
    from jv5fast.integrations import missing_extra
    inner = ModuleNotFoundError("No module named 'nltk'", name="nltk")
    with pytest.raises(ModuleNotFoundError) as info:
        missing_extra(inner, "llama_index.core", "llama-index-core", "llamaindex")
    assert info.value is inner
