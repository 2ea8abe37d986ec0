"""ONNX export and the onnxruntime backend against the torch engine (fp32, cosine >= 0.99999 per vector)."""
import json
import os

import numpy as np
import pytest

import jv5fast

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

COS = 0.99999


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "light vacuum travel Zeit café 東京 nuit metres réseau быстро the of and".split()
    return [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(0, 30, n)]


@pytest.fixture(scope="module")
def exported(ckpt_factory, tmp_path_factory):
    """family -> (checkpoint, export folder of the text-matching adapter, truncate_dim 32)."""
    out = {}
    for family in ("small", "nano"):
        ck = ckpt_factory(family, seed=41)
        folder = str(tmp_path_factory.mktemp("onnx") / family)
        jv5fast.export_onnx(ck, folder, task="text-matching", truncate_dim=32)
        out[family] = (ck, folder)
    return out


@pytest.mark.parametrize("family", ["small", "nano"])
def test_onnx_engine_matches_torch_engine(family, exported):
    ck, folder = exported[family]
    ref = jv5fast.Engine(ck, task="text-matching", max_length=48)
    eng = jv5fast.Engine.from_onnx(folder, max_length=48)
    assert eng.tasks == ("text-matching",) and eng.dim == ref.dim
    long_text = "a long text that certainly exceeds forty eight tokens " * 8
    texts = _texts(17, seed=1) + ["", long_text]
    for batch in (texts[:1], texts[:17], texts):  # batch 1, batch 17, length 1 (empty + prompt) and max length
        a, b = ref.embed(batch), eng.embed(batch)
        assert (a * b).sum(1).min() >= COS
    assert len(eng.tokenize(long_text)) == 48
    np.testing.assert_array_equal(eng.embed(texts, precision="ubinary", truncate_dim=64),
                                  ref.embed(texts, precision="ubinary", truncate_dim=64))
    assert (eng.encode_query(texts) * ref.encode_query(texts)).sum(1).min() >= COS
    with pytest.raises(ValueError, match="this ONNX export holds only"):
        eng.embed("x", task="retrieval")


@pytest.mark.parametrize("family", ["small", "nano"])
def test_graph_outputs_with_right_and_left_padding(family, exported):
    import onnxruntime as ort
    ck, folder = exported[family]
    ref = jv5fast.Engine(ck, task="text-matching")
    texts = _texts(6, seed=2) + ["x"]
    ids = ref.tokenize(texts)
    want = ref.embed(texts, truncate_dim=32)
    sess = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    S = max(map(len, ids))
    for side in ("right", "left"):
        a = np.zeros((len(ids), S), np.int64)
        m = np.zeros((len(ids), S), np.int64)
        for r, s in enumerate(ids):
            sl = slice(0, len(s)) if side == "right" else slice(S - len(s), S)
            a[r, sl], m[r, sl] = s, 1
        hidden, pooled = sess.run(None, {"input_ids": a, "attention_mask": m})
        assert pooled.shape == (len(ids), 32) and hidden.shape[:2] == (len(ids), S)
        assert (pooled * want).sum(1).min() >= COS, side


def test_every_task_and_metadata(ckpt_factory, tmp_path):
    ck = ckpt_factory("nano", seed=43)
    for task in ("retrieval", "text-matching", "clustering", "classification"):
        folder = str(tmp_path / task)
        meta = jv5fast.export_onnx(ck, folder, task=task)
        texts = _texts(5, seed=3)
        a = jv5fast.Engine(ck, task=task).embed(texts)
        b = jv5fast.Engine.from_onnx(folder).embed(texts)
        assert (a * b).sum(1).min() >= COS, task
    proto = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    on_disk = json.load(open(os.path.join(folder, "jv5fast_onnx.json")))
    assert props["task"] == on_disk["task"] == meta["task"] == "classification"
    assert props["model_type"] == "eurobert" and props["dim"] == 64 and props["max_length"] == 8192
    assert props["prompts"] == {"query": "Query: ", "document": "Document: "}
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "sentence_embedding"]
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))


def test_external_data_and_fp16(ckpt_factory, tmp_path):
    ck = ckpt_factory("small", seed=45, tasks=("retrieval",))
    folder = str(tmp_path / "ext")
    jv5fast.export_onnx(ck, folder, external_data=True)
    assert os.path.getsize(os.path.join(folder, "model.onnx_data")) > 10 * os.path.getsize(
        os.path.join(folder, "model.onnx"))
    onnx.checker.check_model(os.path.join(folder, "model.onnx"))
    texts = _texts(6, seed=4)
    ref = jv5fast.Engine(ck).embed(texts)
    assert (jv5fast.Engine.from_onnx(folder).embed(texts) * ref).sum(1).min() >= COS
    f16 = str(tmp_path / "f16")
    jv5fast.export_onnx(ck, f16, dtype="float16")
    eng16 = jv5fast.Engine.from_onnx(f16)
    assert eng16.dtype.is_floating_point and json.load(open(os.path.join(f16, "jv5fast_onnx.json")))["dtype"] == "float16"
    assert (eng16.embed(texts) * ref).sum(1).min() >= 0.999


def test_int8_is_reported_never_silent(ckpt_factory, tmp_path):
    ck = ckpt_factory("nano", seed=47, tasks=("retrieval",))
    folder = str(tmp_path / "q")
    with pytest.warns(UserWarning, match=r"int8 ONNX model quality vs float: mean cosine"):
        meta = jv5fast.export_onnx(ck, folder, quantize="int8")
    q = meta["int8"]
    assert 0.0 < q["cosine_min"] <= q["cosine_mean"] <= 1.0 and 0.0 <= q["top10_overlap"] <= 1.0
    texts = _texts(5, seed=5)
    e8 = jv5fast.Engine.from_onnx(folder, quantize="int8").embed(texts)
    e32 = jv5fast.Engine.from_onnx(folder).embed(texts)
    assert np.isfinite(e8).all() and (e8 * e32).sum(1).min() > 0.9


def test_bad_input(ckpt_factory, tmp_path, monkeypatch):
    ck = ckpt_factory("nano", seed=49, tasks=("retrieval",))
    with pytest.raises(ValueError, match=r"unknown task 'summaries'; valid tasks: \['retrieval'\]"):
        jv5fast.export_onnx(ck, str(tmp_path / "a"), task="summaries")
    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        jv5fast.export_onnx(ck, str(exists))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported for export"):
        jv5fast.export_onnx(ck, str(tmp_path / "b"), dtype="int8")
    import torch

    def boom(*a, **k):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="nothing was written"):
        jv5fast.export_onnx(ck, str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["exists"]  # no half-written folder, no temp left behind
    with pytest.raises(FileNotFoundError, match="not a jv5fast ONNX export"):
        jv5fast.Engine.from_onnx(str(exists))
    with pytest.raises(ValueError, match="backend 'tensorrt' is not valid"):
        jv5fast.Engine(ck, backend="tensorrt")


def test_cli_export_and_embed(ckpt_factory, tmp_path, capsys):
    from jv5fast.cli import main
    ck = ckpt_factory("nano", seed=51, tasks=("retrieval", "clustering"))
    out = str(tmp_path / "cli")
    assert main(["export-onnx", "--model", ck, "--out", out, "--task", "clustering"]) == 0
    assert main(["export-onnx", "--model", ck, "--out", out]) == 2
    assert "pass overwrite=True" in capsys.readouterr().err
    npy = str(tmp_path / "e.npy")
    assert main(["embed", "--model", out, "--backend", "onnx", "hello", "world", "--output", npy]) == 0
    want = jv5fast.Engine(ck, task="clustering").embed(["hello", "world"])
    assert (np.load(npy) * want).sum(1).min() >= COS
