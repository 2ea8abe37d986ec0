"""ONNX export and the onnxruntime backend against the torch engine (fp32, cosine >= 0.99999 per vector);
overwrite=True replaces only a previous export, atomically."""
import json
import os
import re

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


def _meta(folder):
    with open(os.path.join(folder, "jv5fast_onnx.json")) as f:
        return json.load(f)


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
    ref = jv5fast.Engine(ck, task="text-matching", max_length=48, device="cpu")
    eng = jv5fast.Engine.from_onnx(folder, max_length=48)
    # an export made for truncate_dim=32 serves 32 dims by default, and no more
    assert eng.tasks == ("text-matching",) and eng.dim == 32 and ref.dim == 64
    long_text = "a long text that certainly exceeds forty eight tokens " * 8
    texts = _texts(17, seed=1) + ["", long_text]
    for batch in (texts[:1], texts[:17], texts):  # batch 1, batch 17, length 1 (empty + prompt) and max length
        a, b = ref.embed(batch, truncate_dim=32), eng.embed(batch)
        assert a.shape == b.shape == (len(batch), 32) and (a * b).sum(1).min() >= COS
    assert len(eng.tokenize(long_text)) == 48
    np.testing.assert_array_equal(eng.embed(texts, precision="ubinary", truncate_dim=24),
                                  ref.embed(texts, precision="ubinary", truncate_dim=24))
    with pytest.raises(ValueError, match=r"truncate_dim=64 is out of range 1\.\.32: this ONNX export was made for "
                                         r"truncate_dim=32"):
        eng.embed(texts, truncate_dim=64)
    assert (eng.encode_query(texts) * ref.encode_query(texts, truncate_dim=32)).sum(1).min() >= COS
    with pytest.raises(ValueError, match="this ONNX export holds only"):
        eng.embed("x", task="retrieval")


@pytest.mark.parametrize("family", ["small", "nano"])
def test_graph_outputs_with_right_and_left_padding(family, exported):
    import onnxruntime as ort
    ck, folder = exported[family]
    ref = jv5fast.Engine(ck, task="text-matching", device="cpu")
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
        a = jv5fast.Engine(ck, task=task, device="cpu").embed(texts)
        b = jv5fast.Engine.from_onnx(folder).embed(texts)
        assert (a * b).sum(1).min() >= COS, task
    proto = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    on_disk = _meta(folder)
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
    ref = jv5fast.Engine(ck, device="cpu").embed(texts)
    assert (jv5fast.Engine.from_onnx(folder).embed(texts) * ref).sum(1).min() >= COS
    f16 = str(tmp_path / "f16")
    jv5fast.export_onnx(ck, f16, dtype="float16")
    eng16 = jv5fast.Engine.from_onnx(f16)
    assert eng16.dtype.is_floating_point and _meta(f16)["dtype"] == "float16"
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
    # the attention Loops survive quantization (their bodies stay float: only weight MatMuls are quantized)
    q8 = onnx.load(os.path.join(folder, "model_int8.onnx"))
    assert sum(n.op_type == "Loop" for n in q8.graph.node) == 2
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in q8.graph.node)


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
    with pytest.raises(ValueError, match=r"opset must be an int >= 14 or None \(17\), got '17'"):
        jv5fast.export_onnx(ck, str(tmp_path / "b"), opset="17")
    with pytest.raises(ValueError, match=r"opset 99 is newer than this torch's exporter supports; choose 14\.\."):
        jv5fast.export_onnx(ck, str(tmp_path / "b"), opset=99)
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
    assert "pass --overwrite" in capsys.readouterr().err
    # --overwrite never wipes a folder that is not a previous export
    assert main(["export-onnx", "--model", ck, "--out", str(tmp_path), "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and os.path.exists(ck)
    npy = str(tmp_path / "e.npy")
    assert main(["embed", "--model", out, "--backend", "onnx", "hello", "world", "--output", npy]) == 0
    want = jv5fast.Engine(ck, task="clustering", device="cpu").embed(["hello", "world"])
    assert (np.load(npy) * want).sum(1).min() >= COS


def test_export_onnx_takes_output_like_every_command_and_out_as_alias(ckpt_factory, tmp_path, capsys):
    from jv5fast.cli import build_parser, main
    ck = ckpt_factory("nano", seed=51, tasks=("retrieval", "clustering"))
    for flag in ("--output", "--out"):
        out = str(tmp_path / flag.strip("-"))
        assert main(["export-onnx", "--model", ck, flag, out, "--task", "clustering"]) == 0
        assert _meta(out)["task"] == "clustering" and f"-> {out}" in capsys.readouterr().err
    assert main(["export-onnx", "--model", ck]) == 2
    assert "the following arguments are required: --output/--out" in capsys.readouterr().err
    sub = build_parser()._subparsers._group_actions[0].choices["export-onnx"]
    assert "--output OUTPUT, --out OUTPUT" in sub.format_help()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_export_folder_follows_the_umask(ckpt_factory, tmp_path, umask, mode):
    """The export is staged in a private (0700) temporary folder, but the finished folder gets 0777 & ~umask
    like any folder, for a fresh export and a replaced one alike."""
    ck = ckpt_factory("nano", seed=51, tasks=("retrieval", "clustering"))
    out = tmp_path / "e"
    old = os.umask(umask)
    try:
        jv5fast.export_onnx(ck, str(out))
        assert os.stat(out).st_mode & 0o777 == mode
        jv5fast.export_onnx(ck, str(out), task="clustering", overwrite=True)
        assert os.stat(out).st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["e"]  # no staging folder left


def test_export_truncate_dim_is_served_and_int8_reported_once(ckpt_factory, tmp_path, capfd):
    """An export made for a dimension serves that dimension by default (a larger one is an error), and the
    CLI's int8 export prints its quality once, without onnxruntime's advice."""
    import warnings

    from jv5fast.cli import main
    ck = ckpt_factory("nano", seed=51, tasks=("retrieval", "clustering"))
    out = str(tmp_path / "d32")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["export-onnx", "--model", ck, "--out", out, "--truncate-dim", "32", "--quantize", "int8"]) == 0
    err = capfd.readouterr().err
    assert err.count("int8: mean cosine to float") == 1 and "quality vs float" not in err
    assert "pre-processing" not in err and not [w for w in seen if "int8" in str(w.message)]
    npy = str(tmp_path / "e.npy")
    for quant in ([], ["--quantize", "int8"]):
        assert main(["embed", "--model", out, "--backend", "onnx", *quant, "hello", "world", "--output", npy]) == 0
        got = np.load(npy)
        want = jv5fast.Engine(ck, device="cpu").embed(["hello", "world"], truncate_dim=32)
        assert got.shape == (2, 32) and (got * want).sum(1).min() >= (COS if not quant else 0.9)
    capfd.readouterr()
    assert main(["embed", "--model", out, "--backend", "onnx", "--truncate-dim", "48", "x", "--output", npy]) == 2
    assert "--truncate-dim 48 is out of range 1..32: this ONNX export was made for --truncate-dim 32" in \
        capfd.readouterr().err
    eng = jv5fast.Engine.from_onnx(out)
    assert eng.dim == 32 and eng.embed("x", truncate_dim=16).shape == (16,)


def test_onnx_export_never_swaps_the_task(ckpt_factory, tmp_path):
    """An explicit task the export (or its merged source) cannot serve is an error; None takes what it holds."""
    ck = ckpt_factory("nano", seed=55, tasks=("retrieval", "classification"))
    folder = str(tmp_path / "cls")
    jv5fast.export_onnx(ck, folder, task="classification")
    with pytest.raises(ValueError, match=r"task 'retrieval' requested, but this ONNX export holds only the "
                                         r"'classification' adapter"):
        jv5fast.Engine(folder, backend="onnx", task="retrieval")
    eng = jv5fast.Engine(folder, backend="onnx")
    assert eng.task == "classification" and jv5fast.Engine(folder, backend="onnx", task="classification").tasks == \
        ("classification",)
    with pytest.raises(ValueError, match="task 'retrieval' requested"):
        eng.embed("x", task="retrieval")
    import torch
    merged = ckpt_factory("nano", seed=55, merged_task="classification", dtype=torch.float32)
    meta = jv5fast.export_onnx(merged, str(tmp_path / "merged"))  # task=None: the merged weights as they are
    assert meta["task"] is None
    with pytest.raises(ValueError, match="task 'retrieval' requested"):
        jv5fast.export_onnx(merged, str(tmp_path / "merged2"), task="retrieval")
    ref = jv5fast.Engine(ck, task="classification", device="cpu").embed(["a b c"])
    assert (jv5fast.Engine.from_onnx(str(tmp_path / "merged")).embed(["a b c"]) * ref).sum() >= COS


def test_missing_onnx_extra_says_how_to_install(ckpt_factory, tmp_path, monkeypatch):
    import sys
    ck = ckpt_factory("nano", seed=49, tasks=("retrieval",))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r'pip install "jv5fast\[onnx\]"'):
        jv5fast.export_onnx(ck, str(tmp_path / "x"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from jv5fast.onnx_runtime import OnnxSession
    with pytest.raises(ModuleNotFoundError, match=r'pip install "jv5fast\[onnx\]"'):
        OnnxSession(str(tmp_path / "model.onnx"))


# ---- overwrite=True replaces only a previous export, atomically -------------------------------------
def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_overwrite_refuses_anything_but_a_previous_export(ckpt_factory, tmp_path, monkeypatch):
    ck = ckpt_factory("nano", seed=53, tasks=("retrieval",))
    user = tmp_path / "models"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    afile = tmp_path / "file.onnx"
    afile.write_text("not a folder")
    bad_meta = tmp_path / "bad_meta"
    bad_meta.mkdir()
    (bad_meta / "jv5fast_onnx.json").write_text('{"format": "something-else"}')
    (bad_meta / "model.onnx").write_text("x")
    before = _snapshot(tmp_path)
    cases = [(user, "it is not a jv5fast ONNX export"), (afile, "it is not a folder"),
             (bad_meta, "its jv5fast_onnx.json is not jv5fast ONNX metadata")]
    for path, why in cases:
        msg = f"refusing to overwrite {re.escape(str(path))}: {why}.*nothing was deleted"
        with pytest.raises(FileExistsError, match=msg):
            jv5fast.export_onnx(ck, str(path), overwrite=True)
    export = tmp_path / "export"
    jv5fast.export_onnx(ck, str(export))
    (export / "my_notes.md").write_text("keep me")   # a user's file inside a previous export
    with pytest.raises(FileExistsError, match=r"overwrite would delete: my_notes\.md; move them"):
        jv5fast.export_onnx(ck, str(export), overwrite=True)
    (export / "my_notes.md").unlink()
    monkeypatch.chdir(export)
    with pytest.raises(FileExistsError, match="current working directory"):
        jv5fast.export_onnx(ck, ".", overwrite=True)
    with pytest.raises(FileExistsError, match="current working directory"):
        jv5fast.export_onnx(ck, str(tmp_path), overwrite=True)
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # nothing deleted or changed
    assert sorted(os.listdir(tmp_path)) == ["bad_meta", "export", "file.onnx", "models"]


def test_overwrite_replaces_a_previous_export(ckpt_factory, tmp_path):
    ck = ckpt_factory("nano", seed=53, tasks=("retrieval", "clustering"))
    out = tmp_path / "export"
    with pytest.warns(UserWarning, match="int8 ONNX model quality"):
        jv5fast.export_onnx(ck, str(out), task="retrieval", quantize="int8")
    assert os.path.exists(out / "model_int8.onnx")
    meta = jv5fast.export_onnx(ck, str(out), task="clustering", overwrite=True)
    assert meta["task"] == _meta(str(out))["task"] == "clustering"
    assert not os.path.exists(out / "model_int8.onnx")  # the old folder is gone, not merged into
    assert os.listdir(tmp_path) == ["export"]  # no temporary sibling left
    texts = _texts(4, seed=6)
    want = jv5fast.Engine(ck, task="clustering", device="cpu").embed(texts)
    assert (jv5fast.Engine.from_onnx(str(out)).embed(texts) * want).sum(1).min() >= COS


@pytest.mark.parametrize("stage", ["export", "swap"])
def test_failed_overwrite_keeps_previous_export(stage, ckpt_factory, tmp_path, monkeypatch):
    ck = ckpt_factory("nano", seed=53, tasks=("retrieval", "clustering"))
    out = str(tmp_path / "export")
    jv5fast.export_onnx(ck, out, task="retrieval")
    before = _snapshot(out)
    from jv5fast import onnx_export
    if stage == "export":  # fails after the graph is written, before the swap
        def boom(*a, **k):
            raise RuntimeError("simulated failure while copying files")
        monkeypatch.setattr(onnx_export.shutil, "copy", boom)
    else:  # the previous export was set aside; moving the new one in fails
        real_replace = os.replace

        def replace(src, dst):
            if dst == out and ".jv5fast-export-" in src and not src.endswith(".old"):
                raise OSError("simulated rename failure")
            return real_replace(src, dst)
        monkeypatch.setattr(onnx_export.os, "replace", replace)
    with pytest.raises(RuntimeError, match="nothing was written"):
        jv5fast.export_onnx(ck, out, task="clustering", overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == before and _meta(out)["task"] == "retrieval"
    assert os.listdir(tmp_path) == ["export"]  # no temporary or set-aside folder left


@pytest.mark.parametrize("meta,msg", [
    ({"format": "jv5fast-onnx"}, "field 'dtype' is None"),
    ([1, 2], "not a jv5fast ONNX metadata file"),
    ({"format": "jv5fast-onnx", "dtype": "float32", "max_length": 0}, "field 'max_length' is 0"),
    ({"format": "jv5fast-onnx", "dtype": "float32", "max_length": 64, "task": 7}, "field 'task' is 7"),
    ({"format": "jv5fast-onnx", "dtype": "float32", "max_length": 64, "truncate_dim": True}, "field 'truncate_dim'"),
    ({"format": "jv5fast-onnx", "dtype": "float32", "max_length": 64, "truncate_dim": 999},
     r"fields 'dim' \(None\) and 'truncate_dim' \(999\) do not fit hidden_size 64"),
])
def test_corrupt_export_metadata_is_named(nano_ckpt, tmp_path, meta, msg):
    import json
    import shutil
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(nano_ckpt, name), folder / name)
    (folder / "jv5fast_onnx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=msg):
        jv5fast.Engine.from_onnx(str(folder))


def test_export_accepts_numpy_dims_and_cleans_up_after_ctrl_c(ckpt_factory, tmp_path, monkeypatch):
    ck = ckpt_factory("nano", seed=49, tasks=("retrieval",))
    meta = jv5fast.export_onnx(ck, str(tmp_path / "np"), truncate_dim=np.int64(32))
    assert meta["truncate_dim"] == 32 and type(meta["truncate_dim"]) is int
    import torch

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jv5fast.export_onnx(ck, str(tmp_path / "new" / "deeper" / "out"))
    assert sorted(os.listdir(tmp_path)) == ["np"]  # no temporary folder, no parent folders it made


def test_export_never_replaces_a_folder_that_appeared_without_overwrite(ckpt_factory, tmp_path, monkeypatch):
    from jv5fast import onnx_export
    ck = ckpt_factory("nano", seed=49, tasks=("retrieval",))
    out = tmp_path / "out"
    real = onnx_export._move_into_place

    def racing(tmp, out_dir, overwrite):  # another export lands first
        monkeypatch.setattr(onnx_export, "_move_into_place", real)
        jv5fast.export_onnx(ck, out_dir)
        return real(tmp, out_dir, overwrite)
    monkeypatch.setattr(onnx_export, "_move_into_place", racing)
    with pytest.raises(FileExistsError, match="appeared during the export"):
        jv5fast.export_onnx(ck, str(out), truncate_dim=32)
    assert jv5fast.Engine.from_onnx(str(out)).dim == 64  # the other export, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_server_over_an_onnx_engine(exported):
    """`create_app` over an ONNX engine: the batcher feeds onnxruntime the same packed batches, the export's one
    task is the only one served, and the vectors equal the ONNX engine's own embed."""
    import time

    from fastapi.testclient import TestClient

    from jv5fast.server import create_app
    ck, folder = exported["nano"]
    ref = jv5fast.Engine.from_onnx(folder, max_length=48)
    app = create_app(jv5fast.Engine.from_onnx(folder, max_length=48), served_model_name="m")
    texts = _texts(9, seed=3)
    with TestClient(app) as tc:
        t0 = time.time()
        while tc.get("/health").status_code != 200:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert tc.get("/v1/models").json()["data"][0]["tasks"] == ["text-matching"]
        r = tc.post("/v1/embeddings", json={"input": texts, "task": "text-matching", "dimensions": 16})
        got = np.array([d["embedding"] for d in r.json()["data"]])
        want = ref.embed(texts, truncate_dim=16)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
        r = tc.post("/v1/embeddings", json={"input": "x", "task": "retrieval.query"})
        assert r.status_code == 400 and "['text-matching']" in r.json()["error"]["message"]
