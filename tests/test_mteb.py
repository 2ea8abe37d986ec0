"""jv5fast.integrations.mteb: mteb 2.x runs fully offline on two small tasks built here (a retrieval task with
titles and graded relevance, an STS task); its reported nDCG@10 and cosine Spearman must equal the same metrics
computed by hand from the engine's own vectors with the adapter and prefix the released evaluation uses. Also:
the task-type → (adapter, prefix) table, merged single-task checkpoints, ModelMeta against the checkpoint and
against mteb's registry entries for the released models, clear errors, and that `import jv5fast` stays mteb-free.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

# Set before the imports: datasets / huggingface_hub read these when imported, and mteb creates its default
# result cache (MTEB_CACHE) then. conftest's JV5FAST_CACHE folder is removed when the session ends.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["MTEB_CACHE"] = os.path.join(os.environ.get("JV5FAST_CACHE") or tempfile.mkdtemp(), "mteb")

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")
scipy_stats = pytest.importorskip("scipy.stats")

import torch
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType

import jv5fast
from jv5fast.integrations.mteb import JV5FastEncoder, model_meta
from jv5fast.testing import hf_config, write_checkpoint

GENERAL = {
    "description": "A tiny offline task for jv5fast's tests.", "reference": "https://github.com/embeddings-benchmark/mteb",
    "dataset": {"path": "NA", "revision": "NA"}, "category": "t2t", "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"], "date": ("2024-01-01", "2024-01-02"), "dialect": [], "domains": [],
    "task_subtypes": [], "license": "cc-by-4.0", "annotations_creators": "derived", "modalities": ["text"],
    "sample_creation": "found", "bibtex_citation": "",
}

QUERIES = {"q1": "how fast does light travel in a vacuum?", "q2": "capital city of France",
           "q3": "what do pandas eat", "q4": "Ünïcödé: 東京の天気は?", "q5": "python list comprehension syntax"}
# (title, text): titles are joined as mteb does; ragged lengths on purpose
CORPUS = {
    "d01": ("Light", "In a vacuum, light travels 299,792,458 metres every second."),
    "d02": ("", "Paris is the capital and most populous city of France."),
    "d03": ("Giant panda", "Pandas eat bamboo almost exclusively " + "and sometimes small animals " * 6),
    "d04": ("", "東京は晴れ、気温は二十度です。"),
    "d05": ("Python", "A list comprehension is written as [expr for x in xs if cond]."),
    "d06": ("", "Sound travels much more slowly than light."),
    "d07": ("France", "Lyon and Marseille are large French cities."),
    "d08": ("", "Red pandas also eat bamboo."),
    "d09": ("Weather", "Rain is expected tomorrow."),
    "d10": ("", "Generators in Python are lazy."),
    "d11": ("", "x"),
    "d12": ("Misc", "An unrelated sentence about gardening and tomatoes."),
}
QRELS = {"q1": {"d01": 2, "d06": 1}, "q2": {"d02": 2, "d07": 1, "d09": 0}, "q3": {"d03": 1, "d08": 1},
         "q4": {"d04": 3}, "q5": {"d05": 2, "d10": 1}}

STS_PAIRS = [
    ("A man is playing a guitar.", "A person plays an instrument.", 4.2),
    ("The cat sits on the mat.", "A dog runs in the park.", 0.5),
    ("Stocks fell sharply today.", "The market dropped steeply.", 4.6),
    ("She is cooking pasta.", "He reads a newspaper.", 0.2),
    ("Kids are swimming in a lake.", "Children swim outdoors.", 3.9),
    ("", "An empty sentence on the left.", 0.0),
    ("The train was late again.", "Delays hit the railway once more.", 3.5),
    ("I love green tea.", "Green tea is my favourite drink.", 4.8),
    ("Snow covers the mountain.", "The beach is hot and sunny.", 0.8),
    ("Quantum computers use qubits.", "Qubits are the basis of quantum computing.", 4.4),
    ("A bird flies over the sea.", "Seagulls glide above the ocean.", 3.2),
    ("He fixed the bicycle.", "The bike was repaired by him.", 4.1),
]


class ToyRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="JV5FastToyRetrieval", main_score="ndcg_at_10", **GENERAL)

    def load_data(self, num_proc=None, **kwargs):
        queries = datasets.Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items()])
        corpus = datasets.Dataset.from_list([{"id": k, "title": t, "text": x} for k, (t, x) in CORPUS.items()])
        split = RetrievalSplitData(queries=queries, corpus=corpus, relevant_docs=QRELS, top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class ToySTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="JV5FastToySTS", main_score="cosine_spearman", **GENERAL)
    min_score, max_score = 0, 5

    def load_data(self, num_proc=None, **kwargs):
        s1, s2, score = zip(*STS_PAIRS)
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"sentence1": list(s1), "sentence2": list(s2), "score": list(score)})})
        self.data_loaded = True


def _meta(task_type, **update):
    """Task metadata of type ``task_type`` (only the fields the encoder reads change)."""
    return ToyRetrieval.metadata.model_copy(update={"type": task_type, "name": f"Toy{task_type}", **update})


def _loader(texts, batch_size=3):
    return torch.utils.data.DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=batch_size)


def _evaluate(model, task, tmp_path):
    res = mteb.evaluate(model, task, cache=mteb.ResultCache(tmp_path / "mteb-cache"), co2_tracker=False,
                        show_progress_bar=False, overwrite_strategy="always")
    assert not res.exceptions, res.exceptions
    (tr,) = res.task_results
    (score,) = tr.scores["test"]
    return score


def _ndcg_at_10(scores, doc_ids, qrels):
    """trec_eval's ndcg_cut.10 (gain = grade, log2 discount), averaged over the queries with a positive."""
    out = []
    for qi, (q, rel) in enumerate(qrels.items()):
        order = np.argsort(-scores[qi], kind="stable")[:10]
        dcg = sum(rel.get(doc_ids[j], 0) / math.log2(r + 2) for r, j in enumerate(order))
        ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:10]
        out.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
    return float(np.mean(out))


@pytest.fixture(scope="module")
def nano_engine(nano_ckpt):
    return jv5fast.Engine(nano_ckpt, device="cpu")


@pytest.fixture
def spy(monkeypatch):
    """Wrap an engine's embed to record (task, prompt, n_texts) per call."""
    def attach(engine):
        calls, real = [], engine.embed

        def embed(texts, **kw):
            calls.append((kw.get("task"), kw.get("prompt"), len(texts)))
            return real(texts, **kw)
        monkeypatch.setattr(engine, "embed", embed)
        return calls
    return attach


# ---- the two tasks through mteb.evaluate ---------------------------------------------------------------
def test_retrieval_ndcg_matches_hand_computation(nano_engine, tmp_path, spy):
    engine = nano_engine
    docs = list(CORPUS)
    q = engine.embed(list(QUERIES.values()), task="retrieval", prompt="Query: ")
    d = engine.embed([(t + " " + x).strip() if t else x.strip() for t, x in CORPUS.values()],
                     task="retrieval", prompt="Document: ")
    scores = q @ d.T
    top = np.sort(scores, axis=1)
    assert np.diff(top, axis=1).min() > 1e-5, "ties would make the ranking depend on tie-breaking"
    expected = _ndcg_at_10(scores, docs, QRELS)

    calls = spy(engine)
    got = _evaluate(JV5FastEncoder(engine), ToyRetrieval(), tmp_path)
    assert got["ndcg_at_10"] == pytest.approx(expected, abs=1e-5)
    assert got["main_score"] == got["ndcg_at_10"]
    assert sorted(calls) == sorted([("retrieval", "Query: ", len(QUERIES)), ("retrieval", "Document: ", len(CORPUS))])
    # the results landed in the test's cache with a readable model_meta.json (the loader is a closure)
    (meta_file,) = (tmp_path / "mteb-cache").rglob("model_meta.json")
    saved = json.loads(meta_file.read_text())
    assert saved["name"] == "jv5fast/jina-embeddings-v5-text-nano" and saved["loader"] == "JV5FastEncoder"


def test_sts_spearman_matches_scipy(nano_engine, tmp_path, spy):
    s1, s2, gold = zip(*STS_PAIRS)
    e1 = nano_engine.embed(list(s1), task="text-matching", prompt="Document: ")
    e2 = nano_engine.embed(list(s2), task="text-matching", prompt="Document: ")
    cos = np.sum(e1 * e2, axis=1)  # unit vectors
    expected = scipy_stats.spearmanr(cos, gold).statistic

    calls = spy(nano_engine)
    got = _evaluate(JV5FastEncoder(nano_engine), ToySTS(), tmp_path)
    assert got["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    assert calls == [("text-matching", "Document: ", len(STS_PAIRS))] * 2
    # a different adapter gives a different score here, so the comparison above does pin the adapter
    other = scipy_stats.spearmanr(np.sum(nano_engine.embed(list(s1), task="retrieval", prompt="Document: ")
                                         * nano_engine.embed(list(s2), task="retrieval", prompt="Document: "),
                                         axis=1), gold).statistic
    assert abs(other - expected) > 1e-6


# ---- adapter and prefix per task type --------------------------------------------------------------------
ROUTES = [  # (mteb task type, prompt_type, adapter, prefix)
    ("Retrieval", PromptType.query, "retrieval", "Query: "),
    ("Retrieval", PromptType.document, "retrieval", "Document: "),
    ("Reranking", "query", "retrieval", "Query: "),
    ("InstructionRetrieval", PromptType.query, "retrieval", "Query: "),
    ("InstructionReranking", PromptType.document, "retrieval", "Document: "),
    ("STS", None, "text-matching", "Document: "),
    ("PairClassification", None, "text-matching", "Document: "),
    ("PairClassification", PromptType.query, "text-matching", "Query: "),  # asymmetric pairs (TERRa.V2), as mteb's wrapper
    ("BitextMining", None, "text-matching", "Document: "),
    ("Summarization", None, "text-matching", "Document: "),
    ("Classification", None, "classification", "Document: "),
    ("MultilabelClassification", None, "classification", "Document: "),
    ("Clustering", None, "clustering", "Document: "),
    ("Regression", None, "retrieval", "Document: "),  # no adapter of its own: mteb's wrapper falls back to retrieval
]


@pytest.mark.parametrize("task_type,prompt_type,adapter,prefix", ROUTES)
def test_adapter_and_prefix_per_task_type(nano_engine, task_type, prompt_type, adapter, prefix):
    texts = ["first text", "", "a much longer third text " * 9, "vierter Text", "x"]
    enc = JV5FastEncoder(nano_engine)
    got = enc.encode(_loader(texts), task_metadata=_meta(task_type), hf_split="test", hf_subset="default",
                     prompt_type=prompt_type, batch_size=3, show_progress_bar=False)
    assert got.dtype == np.float32 and got.shape == (len(texts), nano_engine.dim)
    np.testing.assert_array_equal(got, nano_engine.embed(texts, task=adapter, prompt=prefix))
    assert enc.adapter_for(_meta(task_type)) == adapter


def test_truncate_dim_and_empty_input(nano_engine):
    enc = JV5FastEncoder(nano_engine, truncate_dim=32)
    texts = ["alpha", "beta gamma"]
    got = enc.encode(_loader(texts), task_metadata=_meta("Clustering"), hf_split="test", hf_subset="default")
    np.testing.assert_array_equal(got, nano_engine.embed(texts, task="clustering", prompt="Document: ",
                                                         truncate_dim=32))
    assert enc.mteb_model_meta.embed_dim == 32 and enc.mteb_model_meta.experiment_kwargs == {"embed_dim": 32}
    empty = enc.encode(_loader([]), task_metadata=_meta("STS"), hf_split="test", hf_subset="default")
    assert empty.shape == (0, 32) and empty.dtype == np.float32


# ---- merged single-task checkpoints ----------------------------------------------------------------------
def test_merged_checkpoint_serves_only_its_task(tmp_path):
    folder = write_checkpoint(str(tmp_path / "jina-embeddings-v5-text-nano-retrieval"), "nano",
                              merged_task="retrieval", real_tokenizer=False)
    enc = JV5FastEncoder(folder, device="cpu")
    assert enc.mteb_model_meta.name == "jv5fast/jina-embeddings-v5-text-nano-retrieval"
    got = enc.encode(_loader(["q"]), task_metadata=_meta("Reranking"), hf_split="test", hf_subset="default",
                     prompt_type=PromptType.query)
    np.testing.assert_array_equal(got, enc.engine.embed(["q"], prompt="Query: "))
    with pytest.raises(ValueError, match=r"ToySTS \(type STS\) needs the 'text-matching' adapter.*serves only "
                                         r"'retrieval'"):
        enc.encode(_loader(["a"]), task_metadata=_meta("STS"), hf_split="test", hf_subset="default")
    # under another folder name the merged task is unknown: refused rather than guessed
    os.symlink(folder, tmp_path / "my-model")
    anon = JV5FastEncoder(str(tmp_path / "my-model"), device="cpu")
    with pytest.raises(ValueError, match="needs the 'retrieval' adapter.*task is not recorded"):
        anon.encode(_loader(["a"]), task_metadata=_meta("Retrieval"), hf_split="test", hf_subset="default",
                    prompt_type=PromptType.query)


# ---- ModelMeta ------------------------------------------------------------------------------------------
def test_model_meta_from_checkpoint(nano_ckpt, nano_engine):
    from safetensors import safe_open
    with safe_open(os.path.join(nano_ckpt, "model.safetensors"), "pt") as f:
        names = f.keys()
        n_file = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    for meta in (model_meta(nano_ckpt), model_meta(nano_engine), JV5FastEncoder(nano_engine).mteb_model_meta):
        assert meta.n_parameters == n_file
        assert meta.n_embedding_parameters == 128256 * nano_engine.dim
        assert meta.embed_dim == [32, 64] and meta.max_tokens == 8192
        assert meta.similarity_fn_name == mteb.models.model_meta.ScoringFunction.COSINE
        assert (meta.license, meta.open_weights, meta.modalities) == ("cc-by-nc-4.0", True, ["text"])
        assert meta.revision == model_meta(nano_ckpt).revision and meta.experiment_kwargs is None
        assert meta.revision.startswith("local-")
        assert "eng-Latn" in meta.languages and len(meta.languages) == 15
    short = model_meta(nano_ckpt, max_length=128, truncate_dim=64)
    assert (short.max_tokens, short.embed_dim, short.experiment_kwargs) == (128, 64, {"embed_dim": 64,
                                                                                     "max_length": 128})


@pytest.mark.parametrize("size", ["small", "nano"])
def test_model_meta_matches_mteb_registry_for_released_shapes(size, tmp_path):
    """The released shapes (config only: model_meta reads no weights) give the numbers mteb lists."""
    folder = tmp_path / f"jina-embeddings-v5-text-{size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(size, "full")))
    ours, ref = model_meta(str(folder)), mteb.get_model_meta(f"jinaai/jina-embeddings-v5-text-{size}")
    for field in ("n_parameters", "n_embedding_parameters", "memory_usage_mb", "max_tokens", "embed_dim", "license",
                  "similarity_fn_name", "open_weights", "modalities"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.languages is None if size == "small" else len(ours.languages) == 15


def test_meta_loader(nano_ckpt, nano_engine):
    # mteb hands experiment_kwargs (embed_dim, max_length) back to the loader
    meta = model_meta(nano_ckpt, device="cpu", truncate_dim=32, max_length=128)
    enc = meta.load_model()
    assert isinstance(enc, JV5FastEncoder) and enc.mteb_model_meta.name == meta.name
    assert (enc.truncate_dim, enc.engine.max_length) == (32, 128)
    got = enc.encode(_loader(["hello"]), task_metadata=_meta("Classification"), hf_split="t", hf_subset="d")
    np.testing.assert_array_equal(got, nano_engine.embed(["hello"], task="classification", prompt="Document: ",
                                                         truncate_dim=32))
    # a meta over a built engine reuses it and refuses options that would need another one
    again = model_meta(nano_engine).load_model(embed_dim=32)
    assert again.engine is nano_engine and again.truncate_dim == 32
    assert again.mteb_model_meta.experiment_kwargs == {"embed_dim": 32}
    with pytest.raises(ValueError, match=r"already-built Engine; \['device'\] cannot change it"):
        model_meta(nano_engine).load_model(device="cuda")


# ---- errors --------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(nano_engine):
    enc = JV5FastEncoder(nano_engine)
    kw = {"task_metadata": _meta("STS"), "hf_split": "test", "hf_subset": "default"}
    with pytest.raises(ValueError, match=r"batch 0 carries \['image'\]; jina-embeddings-v5-text embeds text only"):
        enc.encode([{"image": [object()], "text": ["a"]}], **kw)
    with pytest.raises(ValueError, match=r"batch 1 has no 'text' field \(fields: \['audio_path'\]\)"):
        enc.encode([{"text": ["a"]}, {"audio_path": ["a.wav"]}], **kw)
    with pytest.raises(TypeError, match=r"text 1 is list"):
        enc.encode([{"text": ["a", ["turn 1", "turn 2"]]}], **kw)
    with pytest.raises(ValueError, match=r"its query inputs are \['image'\]; .* text only"):
        enc.encode(_loader(["a"]), task_metadata=_meta("Any2AnyRetrieval", category="i2t",
                                                       modalities=["image", "text"]),
                   hf_split="test", hf_subset="default", prompt_type="query")
    with pytest.raises(ValueError, match=r"prompt_type 'passage' is not valid; choose None or one of "
                                         r"\['query', 'document'\]"):
        enc.encode(_loader(["a"]), prompt_type="passage", **kw)
    with pytest.raises(ValueError, match=r"precision='ubinary' is not supported.*valid: None, 'float32'"):
        enc.encode(_loader(["a"]), precision="ubinary", **kw)
    with pytest.raises(ValueError, match=r"truncate_dim=65 is out of range 1\.\.64"):
        JV5FastEncoder(nano_engine, truncate_dim=65)
    with pytest.raises(ValueError, match=r"JV5FastEncoder: \['device'\] configure a new Engine, but an existing"):
        JV5FastEncoder(nano_engine, device="cpu")
    with pytest.raises(TypeError, match=r"model_meta: model must be a jv5fast.Engine or a checkpoint path, got int"):
        model_meta(3)


def test_import_jv5fast_does_not_import_mteb():
    code = ("import sys, jv5fast, jv5fast.integrations; jv5fast.Engine; "
            "bad = [m for m in sys.modules if m == 'mteb' or m.startswith('mteb.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_local_checkpoints_and_compute_settings_never_share_a_cache_entry(ckpt_factory, nano_ckpt, tmp_path):
    """mteb reuses cached scores by (name, revision, experiment_kwargs): two local checkpoints of one family, or
    one checkpoint in bf16 / ONNX, must not collide with an fp32 torch run of another."""
    import shutil
    other = ckpt_factory("nano", seed=5)
    assert model_meta(other).name == model_meta(nano_ckpt).name
    assert model_meta(other).revision != model_meta(nano_ckpt).revision
    copy = shutil.copytree(nano_ckpt, str(tmp_path / "copy"))
    os.utime(os.path.join(copy, "model.safetensors"), ns=(1, 1))  # same bytes, rewritten: a new revision
    assert model_meta(copy).revision != model_meta(nano_ckpt).revision
    assert model_meta(nano_ckpt, dtype="bfloat16").experiment_kwargs == {"dtype": "bfloat16"}
    assert model_meta(nano_ckpt, device="cpu").experiment_kwargs is None
    assert model_meta(nano_ckpt, backend="onnx").experiment_kwargs == {"backend": "onnx"}
    with pytest.raises(TypeError, match=r"unknown Engine option\(s\) \['devcie'\]"):
        model_meta(nano_ckpt, devcie="cpu")
    assert model_meta(nano_ckpt, truncate_dim=np.int64(32)).embed_dim == 32
