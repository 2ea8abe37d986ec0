"""Engine(path, device="cpu", quantize="int8"): a cached int8 ONNX export built on first use (jv5fast/int8.py)."""
import os
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import jv5fast  # noqa: E402
from jv5fast import int8  # noqa: E402
from jv5fast.onnx_runtime import OnnxSession, pad_right  # noqa: E402

TEXTS = ["how fast is light?", "Die Katze schläft auf dem Sofa.", "x", "a longer sentence about rivers and the sea " * 3]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JV5FAST_CACHE", str(root))
    return root


@pytest.fixture
def ckpt(tmp_path):
    from jv5fast.testing import write_checkpoint
    return write_checkpoint(str(tmp_path / "nano"), "nano", "tiny", seed=3, tasks=("retrieval", "clustering"))


def _entries(cache):
    d = cache / "int8"
    return sorted(os.listdir(d)) if d.exists() else []


def _load(ckpt, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng = jv5fast.Engine(ckpt, quantize="int8", **kw)
    return eng, [str(x.message) for x in w]


def test_built_once_cached_and_reported(ckpt, cache, monkeypatch):
    eng, msgs = _load(ckpt)
    (entry,) = _entries(cache)
    folder = cache / "int8" / entry
    assert eng.backend == "onnx" and eng.path == str(folder) and eng.task == "retrieval"
    q = eng.int8_quality
    assert 0.9 < q["cosine_min"] <= q["cosine_mean"] <= 1.0 and q["texts"] >= 16
    report = [m for m in msgs if m.startswith("jv5fast int8 model")]
    assert len(report) == 1 and f"mean {q['cosine_mean']:.4f}" in report[0] and str(folder) in report[0]
    assert not [m for m in msgs if m.startswith("int8 ONNX model quality")]  # reported once, by the engine

    # the vectors are exactly onnxruntime's int8 graph on the engine's token ids (same batch composition)
    got = eng.embed(TEXTS)
    ids, mask = pad_right(eng.tokenize(TEXTS, prompt_name=None))
    hidden, _ = OnnxSession(str(folder / "model_int8.onnx")).run(ids, mask)
    want = hidden[np.arange(len(TEXTS)), mask.sum(1) - 1]
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # and close to the exact fp32 engine
    ref = jv5fast.Engine(ckpt, device="cpu").embed(TEXTS)
    assert (got * ref).sum(1).min() > 0.95

    # a second engine loads the cache: no export runs
    def no_export(*a, **k):
        raise AssertionError("export_onnx ran although the cache holds the entry")
    monkeypatch.setattr("jv5fast.onnx_export.export_onnx", no_export)
    again, msgs = _load(ckpt)
    assert again.path == eng.path and any(m.startswith("jv5fast int8 model") for m in msgs)
    np.testing.assert_array_equal(again.embed(TEXTS), got)


def test_each_task_and_changed_checkpoint_get_their_own_entry(ckpt, cache):
    eng, _ = _load(ckpt, task="clustering")
    assert eng.task == "clustering" and eng.tasks == ("clustering",)
    with pytest.raises(ValueError, match="holds only the 'clustering' adapter"):
        eng.embed(["x"], task="retrieval")
    assert len(_entries(cache)) == 1
    # a changed weight file (size or mtime) is another checkpoint
    cfg = os.path.join(ckpt, "config.json")
    st = os.stat(cfg)
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _load(ckpt, task="clustering")
    assert len(_entries(cache)) == 2


def test_broken_entry_is_rebuilt(ckpt, cache):
    eng, _ = _load(ckpt)
    folder = eng.path
    os.remove(os.path.join(folder, "model_int8.onnx"))
    again, _ = _load(ckpt)
    assert again.path == folder and os.path.isfile(os.path.join(folder, "model_int8.onnx"))
    np.testing.assert_allclose(again.embed(TEXTS), eng.embed(TEXTS), atol=1e-6)


def test_entry_holding_a_foreign_file_is_refused_not_deleted(ckpt, cache):
    eng, _ = _load(ckpt)
    folder = eng.path
    os.remove(os.path.join(folder, "model_int8.onnx"))
    mine = os.path.join(folder, "notes.txt")
    with open(mine, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _load(ckpt)
    assert open(mine).read() == "keep me"


def test_concurrent_build_uses_the_other_process_entry(ckpt, cache, monkeypatch):
    """Two processes building one entry: the one whose move into place finds the other's finished folder
    uses it."""
    from jv5fast import onnx_export
    real = onnx_export.export_onnx

    def racing(path, dest, **kw):
        real(path, dest, **kw)  # "the other process" finished first
        raise FileExistsError(f"output folder {dest} appeared during the export")
    monkeypatch.setattr(onnx_export, "export_onnx", racing)
    eng, _ = _load(ckpt)
    assert eng.embed(["x"]).shape == (1, eng.dim)

    def refused(path, dest, **kw):
        raise FileExistsError("refusing to overwrite")
    shutil.rmtree(cache)
    monkeypatch.setattr(onnx_export, "export_onnx", refused)
    with pytest.raises(FileExistsError, match="refusing"):
        _load(ckpt)


@pytest.mark.parametrize("kw, match", [
    (dict(quantize="int4"), "quantize 'int4' is not valid; choose None"),
    (dict(quantize="int8", device="cuda"), "runs on the CPU"),
    (dict(quantize="int8", dtype="bfloat16"), "dtype='bfloat16' is not valid with it"),
    (dict(quantize="int8", backend="onnx"), "leave backend, onnx_quantize and cuda_graphs unset"),
    (dict(quantize="int8", onnx_quantize="int8"), "leave backend, onnx_quantize and cuda_graphs unset"),
    (dict(quantize="int8", task="retreival"), "task 'retreival' is not valid"),
])
def test_bad_options(ckpt, cache, kw, match):
    with pytest.raises(ValueError, match=match):
        jv5fast.Engine(ckpt, **kw)
    assert _entries(cache) == []  # refused before any export


def test_fingerprint_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(int8, "MAX_CHECKPOINT_FILES", 3)
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    with pytest.raises(ValueError, match="more than 3 files"):
        int8.cache_key(str(tmp_path), "x", None)


def test_cache_root(monkeypatch):
    monkeypatch.setenv("JV5FAST_CACHE", "/tmp/somewhere")
    assert int8.cache_root() == "/tmp/somewhere"
    monkeypatch.delenv("JV5FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    assert int8.cache_root() == "/tmp/xdg/jv5fast"
