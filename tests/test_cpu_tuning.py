"""The measured CPU GEMM choice (jv5fast/cpu_tuning.py): the pick rule on injected timings, the on-disk cache
(corrupt, foreign and wrong-key files are measured again, never trusted; writes are atomic), the
JV5FAST_CPU_GEMM override, JV5FAST_CPU_ISA forcing, and that the engine's vectors stay within fp32 tolerance
whichever GEMM each shape gets; the same for the fused ops (jv5fast._C's kernel or the torch reference,
JV5FAST_CPU_FUSED)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast import cpu_tuning, ops

M = cpu_tuning.M_BUCKETS
BOTH = ops.available_gemms() == ("jv5fast", "onednn")
needs_both = pytest.mark.skipif(not BOTH, reason="needs jv5fast's GEMM and oneDNN")


def _t(*ms):
    return dict(zip(M, ms))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    """Each test: its own cache folder, no in-process memo, JV5FAST_CPU_GEMM unset."""
    monkeypatch.setenv("JV5FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JV5FAST_CPU_GEMM", raising=False)
    monkeypatch.delenv("JV5FAST_CPU_FUSED", raising=False)
    monkeypatch.setattr(cpu_tuning, "_memo", {})
    monkeypatch.setattr(ops, "_fused_choice", {})
    monkeypatch.setattr(cpu_tuning, "_busy", lambda: None)  # the test machine may be shared


class Fake:
    """An injected measure(): fixed timings per shape, counting the shapes it was asked for."""

    def __init__(self, timings):
        self.timings, self.asked = timings, []

    def __call__(self, weights_by_shape, candidates, threads):
        self.asked += list(weights_by_shape)
        return {s: {c: dict(self.timings[s][c]) for c in candidates} for s in weights_by_shape}


def test_pick_lowest_mean_slowdown():
    assert cpu_tuning.pick({"jv5fast": _t(1, 2, 4), "onednn": _t(2, 3, 5)}) == "jv5fast"
    assert cpu_tuning.pick({"jv5fast": _t(1, 4, 16), "onednn": _t(1.1, 2, 8)}) == "onednn"
    # 2x faster at one query beats 10% slower at 8 and 32 queries
    assert cpu_tuning.pick({"jv5fast": _t(1, 1.1, 1.1), "onednn": _t(2, 1, 1)}) == "jv5fast"
    assert cpu_tuning.pick({"jv5fast": _t(3, 3, 3), "onednn": _t(3, 3, 3)}) == "jv5fast"  # ties: the first
    assert cpu_tuning.pick({"onednn": _t(3, 3, 3), "jv5fast": _t(3, 3, 3)}) == "onednn"


@needs_both
def test_measured_once_then_cached_in_process_and_on_disk():
    shapes = {(48, 32): [torch.randn(48, 32)], (32, 96): [torch.randn(32, 96)]}
    fake = Fake({(48, 32): {"jv5fast": _t(1, 2, 3), "onednn": _t(2, 3, 4)},
                 (32, 96): {"jv5fast": _t(5, 9, 9), "onednn": _t(4, 3, 3)}})
    got = cpu_tuning.choose(shapes, measure_fn=fake)
    assert {s: c.kind for s, c in got.items()} == {(48, 32): "jv5fast", (32, 96): "onednn"}
    assert {c.reason for c in got.values()} == {"measured"} and sorted(fake.asked) == sorted(shapes)
    assert got[(32, 96)].timings_ms["onednn"] == _t(4, 3, 3)
    again = cpu_tuning.choose(shapes, measure_fn=fake)  # same process
    assert len(fake.asked) == 2 and {c.reason for c in again.values()} == {"cached"}
    cpu_tuning._memo.clear()  # a new process: the file answers
    from_disk = cpu_tuning.choose(shapes, measure_fn=fake)
    assert len(fake.asked) == 2 and {s: c.kind for s, c in from_disk.items()} == {s: c.kind for s, c in got.items()}
    # a new shape is measured alone, the old ones stay cached
    shapes[(16, 16)] = [torch.randn(16, 16)]
    fake.timings[(16, 16)] = {"jv5fast": _t(1, 1, 1), "onednn": _t(1, 1, 1)}
    cpu_tuning._memo.clear()
    cpu_tuning.choose(shapes, measure_fn=fake)
    assert fake.asked[2:] == [(16, 16)]
    d = os.path.dirname(cpu_tuning.cache_path())
    assert os.listdir(d) == [cpu_tuning.CACHE_FILE]  # atomic writes leave no temporary files


def _entry(fields, shape, timings):
    return {"key": {**fields, "shape": list(shape)},
            "timings_ms": {k: {str(m): v for m, v in row.items()} if isinstance(row, dict) else row
                           for k, row in timings.items()}}


GOOD = {"jv5fast": _t(1, 2, 3), "onednn": _t(9, 9, 9)}


@needs_both
@pytest.mark.parametrize("content", [
    b"", b"\x00\xff garbage", b"[1, 2, 3]", b'{"format": 1}', b'{"format": 99, "entries": []}',
    b'{"format": 1, "entries": {"a": 1}}', b"[" * 100000, b'{"format": 1, "entries": [1, "x", null]}'])
def test_a_corrupt_cache_is_measured_again_and_replaced(content):
    path = cpu_tuning.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    fake = Fake({(32, 32): {"jv5fast": _t(1, 2, 3), "onednn": _t(2, 3, 4)}})
    assert cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)].reason == "measured"
    assert fake.asked == [(32, 32)]
    with open(path) as fh:
        data = json.load(fh)
    assert data["format"] == cpu_tuning.CACHE_FORMAT and len(data["entries"]) == 1


@needs_both
@pytest.mark.parametrize("shape", [[[32], {}], [32, True], "32x32", [None, 32]])
def test_an_entry_with_a_malformed_shape_is_ignored(shape):
    """An untrusted file's shape that is not a list of ints (and op names) neither crashes nor matches."""
    path = cpu_tuning.cache_path()
    os.makedirs(os.path.dirname(path))
    fields = cpu_tuning.key_fields(ops.available_gemms(), torch.get_num_threads(), ops.cpu_isa())
    with open(path, "w") as f:
        json.dump({"format": 1, "entries": [{"key": {**fields, "shape": shape},
                                             "timings_ms": {"jv5fast": {"16": 1, "128": 1, "512": 1},
                                                            "onednn": {"16": 2, "128": 2, "512": 2}}}]}, f)
    fake = Fake({(32, 32): {"jv5fast": _t(1, 2, 3), "onednn": _t(2, 3, 4)}})
    assert cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)].reason == "measured"
    assert fake.asked == [(32, 32)]


@needs_both
@pytest.mark.parametrize("mutate", [
    lambda f, t: ({**f, "cpu": "Another CPU"}, t),                      # foreign: another machine
    lambda f, t: ({**f, "threads": f["threads"] + 7}, t),               # another thread count
    lambda f, t: ({**f, "jv5fast": "0.0.1"}, t),                        # another version
    lambda f, t: ({**f, "isa": "scalar"}, t),                           # another forced ISA
    lambda f, t: (f, {"jv5fast": t["jv5fast"]}),                        # a candidate missing
    lambda f, t: (f, {**t, "blas": t["onednn"]}),                       # an unknown candidate
    lambda f, t: (f, {**t, "jv5fast": _t(1, 2, -3)}),                   # a negative time
    lambda f, t: (f, {**t, "jv5fast": _t(1, math.nan, 3)}),             # NaN (json writes NaN)
    lambda f, t: (f, {**t, "jv5fast": _t(1, 2, True)}),                 # a bool
    lambda f, t: (f, {**t, "jv5fast": {"16": 1, "128": 2}}),            # an M missing
    lambda f, t: (f, {**t, "jv5fast": [1, 2, 3]}),                      # not a dict
])
def test_wrong_key_or_bad_timings_are_not_trusted(mutate):
    fields = cpu_tuning.key_fields(ops.available_gemms(), torch.get_num_threads(), ops.cpu_isa())
    f, t = mutate(fields, GOOD)
    path = cpu_tuning.cache_path()
    os.makedirs(os.path.dirname(path))
    entry = _entry(f, (32, 32), t)
    with open(path, "w") as fh:
        json.dump({"format": cpu_tuning.CACHE_FORMAT, "entries": [entry]}, fh)
    fake = Fake({(32, 32): {"jv5fast": _t(5, 5, 5), "onednn": _t(1, 1, 1)}})
    got = cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)]
    assert got.reason == "measured" and got.kind == "onednn" and fake.asked == [(32, 32)]
    if f != fields:  # another machine's (or setting's) entry is kept beside ours
        with open(path) as fh:
            assert entry in json.load(fh)["entries"]


@needs_both
def test_a_valid_entry_is_used_as_is():
    fields = cpu_tuning.key_fields(ops.available_gemms(), torch.get_num_threads(), ops.cpu_isa())
    path = cpu_tuning.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as fh:
        json.dump({"format": cpu_tuning.CACHE_FORMAT, "entries": [_entry(fields, (32, 32), GOOD)]}, fh)
    got = cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=Fake({}))[(32, 32)]
    assert (got.kind, got.reason, got.timings_ms) == ("jv5fast", "cached", GOOD)


@needs_both
def test_timings_from_a_busy_machine_pick_but_are_not_cached(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_busy", lambda: "load 5.0 on 2 CPUs")
    fake = Fake({(32, 32): {"jv5fast": _t(1, 2, 3), "onednn": _t(2, 3, 4)}})
    got = cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)]
    assert got.kind == "jv5fast" and got.reason == "measured on a busy machine (load 5.0 on 2 CPUs; not cached)"
    assert not os.path.exists(cpu_tuning.cache_path())
    again = cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)]
    # one process keeps one choice (engines loaded side by side give the same bits); the file stays unwritten
    assert fake.asked == [(32, 32)] and again.kind == "jv5fast" and again.reason == cpu_tuning.BUSY_AGAIN
    assert not os.path.exists(cpu_tuning.cache_path())
    cpu_tuning._memo.clear()  # a new process measures again
    cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)
    assert fake.asked == [(32, 32)] * 2


def test_an_unwritable_cache_only_costs_measuring(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("JV5FAST_CACHE", str(blocker / "sub"))  # a folder under a file: cannot be made
    cpu_tuning.save_cached(cpu_tuning.cache_path(), {"a": 1}, {(1, 1): GOOD})  # no exception


@pytest.mark.parametrize("forced", ["jv5fast", "onednn"])
def test_override_measures_nothing(forced, monkeypatch):
    if forced not in ops.available_gemms():
        pytest.skip(f"{forced} does not run here")
    monkeypatch.setenv("JV5FAST_CPU_GEMM", forced)
    fake = Fake({})
    got = cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)[(32, 32)]
    assert got.kind == forced and got.reason == f"forced (JV5FAST_CPU_GEMM={forced})" and not fake.asked
    monkeypatch.setenv("JV5FAST_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="JV5FAST_CPU_GEMM='fastest' is not valid"):
        cpu_tuning.choose({(32, 32): [torch.randn(32, 32)]}, measure_fn=fake)


@needs_both
def test_real_measurement_is_complete_and_bounded():
    ws = {(40, 24): [torch.randn(40, 24) for _ in range(2)], (24, 40): [torch.randn(24, 40)]}
    got = cpu_tuning.measure(ws, ("jv5fast", "onednn"), 2, budget_s=0.05)
    for s in ws:
        assert set(got[s]) == {"jv5fast", "onednn"}
        assert all(set(row) == set(M) and all(v > 0 for v in row.values()) for row in got[s].values())


def _engine(path, monkeypatch, timings_for):
    """An engine whose GEMM choice comes from injected timings ``timings_for(shape)``."""
    monkeypatch.setattr(cpu_tuning, "measure", lambda ws, cands, threads: {s: timings_for(s) for s in ws})
    return jv5fast.Engine(path, device="cpu")


@needs_both
def test_engine_vectors_agree_whichever_gemm_is_picked(ckpt_factory, monkeypatch):
    path = ckpt_factory("small", seed=11)
    texts = ["a", "a somewhat longer text, with punctuation and more words than the others", "x y z " * 20]
    fast_j = {"jv5fast": _t(1, 1, 1), "onednn": _t(2, 2, 2)}
    fast_o = {"jv5fast": _t(2, 2, 2), "onednn": _t(1, 1, 1)}
    picks = {"jv5fast": lambda s: fast_j, "onednn": lambda s: fast_o,
             "mixed": lambda s: fast_j if s[0] >= s[1] else fast_o}
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    monkeypatch.setenv("JV5FAST_CPU_PACK", "0")
    ref = jv5fast.Engine(path, device="cpu").embed(texts)
    monkeypatch.delenv("JV5FAST_BACKEND")
    monkeypatch.delenv("JV5FAST_CPU_PACK")
    for name, timings_for in picks.items():
        cpu_tuning._memo.clear()
        monkeypatch.setenv("JV5FAST_CACHE", os.path.join(os.environ["JV5FAST_CACHE"], name))
        eng = _engine(path, monkeypatch, timings_for)
        kinds = {p.kind for p in eng.model.packed.values()}
        assert kinds == ({"jv5fast", "onednn"} if name == "mixed" else {name}), (name, kinds)
        d = eng.describe()
        assert {sh["kernel"] for sh in d["gemm"]["shapes"]} == kinds
        assert all(sh["reason"] == "measured" and sh["timings_ms"] for sh in d["gemm"]["shapes"])
        assert "one loop" in d["forward"] and d["cpu"]["isa"] == ops.cpu_isa()
        text = cpu_tuning.format_description(d)
        assert all(f"{sh['shape'][0]}x{sh['shape'][1]}" in text for sh in d["gemm"]["shapes"])
        got = eng.embed(texts)
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
        assert float((got * ref).sum(1).min()) > 0.99999


def test_split_by_rows_only_where_one_kernel_loses_clearly(monkeypatch):
    # jv5fast 2x faster at one query, oneDNN 2x faster at 8 and 32: keep both, switch between 16 and 128 rows
    t = {"jv5fast": _t(1, 4, 8), "onednn": _t(2, 2, 4)}
    assert cpu_tuning.split(t) == {16: "jv5fast", 128: "onednn", 512: "onednn"}
    assert cpu_tuning.split_bounds(cpu_tuning.split(t)) == ([45, None], ["jv5fast", "onednn"])
    # within SPLIT_GAIN everywhere: one kernel
    assert cpu_tuning.split({"jv5fast": _t(1, 1.1, 1.1), "onednn": _t(1.05, 1, 1)}) == {}
    assert cpu_tuning.split_bounds({16: "a", 128: "b", 512: "a"}) == ([45, 256, None], ["a", "b", "a"])
    assert cpu_tuning.split_bounds({16: "a", 128: "a", 512: "a"}) == ([None], ["a"])
    monkeypatch.setenv("JV5FAST_CPU_GEMM_SPLIT", "0")
    assert cpu_tuning.split(t) == {}


@needs_both
@pytest.mark.parametrize("family", ["nano", "small"])
def test_engine_split_gemm_runs_each_kernel_where_it_won(family, ckpt_factory, monkeypatch):
    """A shape split by rows: short inputs run jv5fast's GEMM, long ones oneDNN's (counted), describe() says
    so, and the vectors match the unpacked reference at both sizes."""
    path = ckpt_factory(family, seed=15)
    short, long_ = ["q"], ["a longer text " * 30] * 3  # 1 + specials rows vs > 45 rows
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    monkeypatch.setenv("JV5FAST_CPU_PACK", "0")
    ref = jv5fast.Engine(path, device="cpu")
    want_s, want_l = ref.embed(short), ref.embed(long_)
    monkeypatch.delenv("JV5FAST_BACKEND")
    monkeypatch.delenv("JV5FAST_CPU_PACK")
    split_t = {"jv5fast": _t(1, 4, 8), "onednn": _t(2, 2, 4)}
    eng = _engine(path, monkeypatch, lambda s: split_t)
    assert all(isinstance(p, ops.SplitLinear) for p in eng.model.packed.values())
    shapes = eng.describe()["gemm"]["shapes"]
    assert all(sh["kernel"] == "split: jv5fast up to 45 rows, onednn" for sh in shapes)
    assert "one loop" in eng.describe()["forward"]
    seen = []
    real = ops.for_rows
    monkeypatch.setattr(ops, "for_rows", lambda p, m: seen.append((m, real(p, m).kind)) or real(p, m))
    got_s = eng.embed(short)
    assert seen and all(k == "jv5fast" for m, k in seen if m <= 45)
    seen.clear()
    got_l = eng.embed(long_)
    assert any(m > 45 for m, _ in seen) and all(k == "onednn" for m, k in seen if m > 45)
    np.testing.assert_allclose(got_s, want_s, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got_l, want_l, atol=2e-5, rtol=0)
    cpu_tuning._memo.clear()
    monkeypatch.setenv("JV5FAST_CACHE", os.path.join(os.environ["JV5FAST_CACHE"], "nosplit"))
    monkeypatch.setenv("JV5FAST_CPU_GEMM_SPLIT", "0")
    one = _engine(path, monkeypatch, lambda s: split_t)
    assert {p.kind for p in one.model.packed.values()} == {cpu_tuning.pick(split_t)}


def test_isa_forcing_errors(monkeypatch):
    class FakeC:
        def __init__(self, has):
            self.has, self.limit = has, None

        def cpu_isa_supported(self):
            return self.has

        def set_isa_limit(self, name):
            self.limit = name

    monkeypatch.setenv("JV5FAST_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match=r"JV5FAST_CPU_ISA=avx512, but this CPU runs only avx2, scalar"):
        ops._apply_cpu_isa(FakeC("avx2"))
    with pytest.raises(RuntimeError, match=r"runs only scalar \(jv5fast._C is not built\)"):
        ops._apply_cpu_isa(None)
    c = FakeC("avx512")
    ops._apply_cpu_isa(c)
    assert c.limit == "avx512"
    monkeypatch.setenv("JV5FAST_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"JV5FAST_CPU_ISA='sse9' is not valid; choose one of \['avx512', 'avx2', "
                                         r"'scalar'\]"):
        ops._apply_cpu_isa(c)
    monkeypatch.setenv("JV5FAST_CPU_ISA", "scalar")
    ops._apply_cpu_isa(c)
    assert c.limit == "scalar"


def test_forced_scalar_runs_references_and_onednn(ckpt_factory, monkeypatch):
    """JV5FAST_CPU_ISA=scalar: none of jv5fast's C++ CPU kernels run (what a CPU without AVX2 gets); the engine
    packs for oneDNN, runs the op-by-op forward on the references, and gives the same vectors."""
    path = ckpt_factory("nano", seed=12)
    texts = ["one", "two words", "a third, longer text " * 5]
    want = jv5fast.Engine(path, device="cpu").embed(texts)
    before, old = ops.cpu_isa(), os.environ.get("JV5FAST_CPU_ISA")
    os.environ["JV5FAST_CPU_ISA"] = "scalar"
    ops.reset_cpu_isa()
    try:
        assert ops._cpu_ext() is None and ops.cpu_isa() == "scalar"
        assert "jv5fast" not in ops.available_gemms()
        with pytest.raises(RuntimeError, match="JV5FAST_CPU_GEMM=jv5fast, but jv5fast._C.sgemm does not run here"):
            monkeypatch.setenv("JV5FAST_CPU_GEMM", "jv5fast")
            ops.cpu_gemm_mode()
        monkeypatch.delenv("JV5FAST_CPU_GEMM")
        eng = jv5fast.Engine(path, device="cpu")
        d = eng.describe()
        assert d["cpu"]["isa"] == "scalar" and d["fused_ops"] == "torch references"
        assert "op-by-op" in d["forward"]
        if eng.model.packed is not None:
            assert {p.kind for p in eng.model.packed.values()} == {"onednn"}
        np.testing.assert_allclose(eng.embed(texts), want, atol=2e-5, rtol=0)
    finally:
        if old is None:
            os.environ.pop("JV5FAST_CPU_ISA", None)
        else:
            os.environ["JV5FAST_CPU_ISA"] = old
        ops.reset_cpu_isa()
    assert ops.cpu_isa() == before


# ---- fused ops: jv5fast._C's kernel or the torch reference, measured per op and shape ----------------------
needs_ext = pytest.mark.skipif(ops._cpu_ext() is None, reason="needs jv5fast._C's fused CPU kernels")
FAST_C = {"jv5fast": _t(1, 1, 1), "torch": _t(3, 2, 1.5)}
FAST_T = {"jv5fast": _t(2, 2, 2), "torch": _t(1, 1, 1)}


class FakeFused:
    """An injected measure_fused(): per op, the timings ``by_op`` gives (FAST_C by default); counts calls."""

    def __init__(self, by_op=None):
        self.by_op, self.asked = by_op or {}, []

    def __call__(self, args, keys, threads):
        self.asked += list(keys)
        return {(op, key): {c: dict(self.by_op.get(op, FAST_C)[c]) for c in cpu_tuning.FUSED_CANDIDATES}
                for op, key in keys}


@needs_ext
@pytest.mark.parametrize("family", ["nano", "small"])
def test_fused_ops_follow_the_measurement(family, ckpt_factory, monkeypatch):
    """A reference measured faster for one op: that op runs the reference (the one-loop forward steps aside), the
    others stay fused, describe() says so, and the vectors match the all-reference engine."""
    path = ckpt_factory(family, seed=13)
    texts = ["a", "a somewhat longer text, with punctuation and more words", "x y z " * 30]
    monkeypatch.setenv("JV5FAST_BACKEND", "torch")
    ref = jv5fast.Engine(path, device="cpu").embed(texts)
    monkeypatch.delenv("JV5FAST_BACKEND")
    for slow_op in (None, "rms_norm", "rope", "swiglu", "attention"):
        monkeypatch.setattr(ops, "_fused_choice", {})
        cpu_tuning._memo.clear()
        monkeypatch.setenv("JV5FAST_CACHE", os.path.join(os.environ["JV5FAST_CACHE"], str(slow_op)))
        fake = FakeFused({slow_op: FAST_T} if slow_op else {})
        monkeypatch.setattr(cpu_tuning, "measure_fused", fake)
        calls = {"c": 0, "ref": 0}
        c_name = {"rms_norm": "_rms_norm_cpu", "rope": "_rope_cpu", "swiglu": "_swiglu_cpu",
                  "attention": "_attention_cpu"}
        if slow_op:  # count which implementation of the slow op runs
            for name, real in ((c_name[slow_op], getattr(ops, c_name[slow_op])),
                               (f"{slow_op}_ref" if slow_op != "attention" else "attention_varlen_ref",
                                getattr(ops, f"{slow_op}_ref" if slow_op != "attention" else "attention_varlen_ref"))):
                def counted(*a, _real=real, _k="c" if name.endswith("_cpu") else "ref", _calls=calls, **k):
                    _calls[_k] += 1
                    return _real(*a, **k)
                monkeypatch.setattr(ops, name, counted)
        eng = jv5fast.Engine(path, device="cpu")
        assert {(op, tuple(key)) for op, key in fake.asked} == set(cpu_tuning.fused_keys(eng.model.args))
        d = eng.describe()
        kinds = {c["op"]: c["kernel"] for c in d["fused"]["ops"]}
        assert all(k == ("torch" if op == slow_op else "jv5fast") for op, k in kinds.items()), kinds
        assert all(c["reason"] == "measured" for c in d["fused"]["ops"])
        assert ("one loop" in d["forward"]) == (slow_op is None)
        assert (slow_op or "rms_norm") in cpu_tuning.format_description(d)
        got = eng.embed(texts)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
        if slow_op:
            assert calls["c"] == 0 and calls["ref"] > 0, (slow_op, calls)


@needs_ext
def test_fused_choice_is_cached_and_forcible(tmp_path, monkeypatch, small_ckpt):
    from jv5fast.config import load_model_args
    args = load_model_args(small_ckpt)
    path = str(tmp_path / "c.json")
    fake = FakeFused({"swiglu": FAST_T})
    got = cpu_tuning.choose_fused(args, measure_fn=fake, path=path)
    assert [c.kind for c in got if c.op == "swiglu"] == ["torch"] and all(c.reason == "measured" for c in got)
    assert ops.fused_kind("swiglu", (2 * args.intermediate_size,)) == "torch"
    cpu_tuning._memo.clear()
    monkeypatch.setattr(ops, "_fused_choice", {})
    again = FakeFused()
    got2 = cpu_tuning.choose_fused(args, measure_fn=again, path=path)  # from the file, not measured
    assert not again.asked and [(c.op, c.kind) for c in got2] == [(c.op, c.kind) for c in got]
    assert all(c.reason == "cached" for c in got2)
    # the GEMM entries and the fused entries share the file without mixing
    assert cpu_tuning.load_cached(path, cpu_tuning.key_fields(("jv5fast", "onednn"), 2, ops.cpu_isa()),
                                  [(2 * args.intermediate_size,)]) == {}
    monkeypatch.setenv("JV5FAST_CPU_FUSED", "torch")
    forced = cpu_tuning.choose_fused(args, measure_fn=again, path=path)
    assert not again.asked and {c.kind for c in forced} == {"torch"}
    assert all(c.reason == "forced (JV5FAST_CPU_FUSED=torch)" for c in forced)
    assert ops.fused_kind("rms_norm", (args.hidden_size,)) == "torch"
    monkeypatch.setenv("JV5FAST_CPU_FUSED", "c++")
    with pytest.raises(ValueError, match=r"JV5FAST_CPU_FUSED='c\+\+' is not valid; choose one of \['auto', "
                                         r"'jv5fast', 'torch'\]"):
        ops.fused_kind("rms_norm", (args.hidden_size,))


@needs_ext
@pytest.mark.parametrize("family", ["nano", "small"])
def test_real_fused_measurement_is_complete_and_bounded(family, ckpt_factory):
    from jv5fast.config import load_model_args
    args = load_model_args(ckpt_factory(family, seed=14))
    keys = cpu_tuning.fused_keys(args)
    assert {op for op, _ in keys} == set(ops.FUSED_OPS)
    got = cpu_tuning.measure_fused(args, keys, 2, budget_s=0.05)
    assert set(got) == set(keys)
    for t in got.values():
        assert set(t) == set(cpu_tuning.FUSED_CANDIDATES)
        assert all(set(row) == set(M) and all(v > 0 for v in row.values()) for row in t.values())
