"""embed-corpus's output folder as untrusted state: resume, refusal and repair, without Ray.

``corpus._embed_units`` is swapped for a stand-in that commits zero vectors through the real
``Output.commit`` (optionally only some inputs' units, then a KeyboardInterrupt: a killed driver), so
each test plans, commits and resumes for real in well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from jv5fast.distributed import cli as dcli
from jv5fast.distributed import corpus
from jv5fast.distributed.corpus import LOCK, CorpusError, run_corpus
from jv5fast.distributed.dataset import embedding_type


class FakeEmbed:
    """Stand-in for ``corpus._embed_units``: commits zero vectors; with ``only`` (input base names) commits
    just those inputs' units and then raises KeyboardInterrupt, as a driver killed mid-run."""

    def __init__(self, only=None):
        self.only, self.calls = only, []

    def __call__(self, out, todo, settings, engine_kwargs, id_type, **kw):
        self.calls.append(([u.key for u in todo], dict(engine_kwargs)))
        for u in todo:
            if self.only is not None and os.path.basename(u.input) not in self.only:
                continue
            typ = pa.int64() if id_type == "int64" else pa.string()
            out.commit(u, pa.table({"id": pa.array(u.ids, typ),
                                    "embedding": pa.array([[0.0] * settings["dim"]] * len(u.ids),
                                                          embedding_type(settings))}))
        if self.only is not None:
            raise KeyboardInterrupt
        return {"rows_embedded_now": sum(len(u.ids) for u in todo), "tokens_now": 0, "seconds": 0.0}


@pytest.fixture
def fake(monkeypatch):
    def install(only=None):
        f = FakeEmbed(only)
        monkeypatch.setattr(corpus, "_embed_units", f)
        return f
    return install


def wj(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def go(ckpt, inp, out, **kw):
    kw.setdefault("on_error", "skip")
    return run_corpus(model=ckpt, input=str(inp), output=str(out), progress=False, connect=lambda: None,
                      log=lambda msg: None, **kw)


def manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def ids_in(out):
    m = manifest(out)
    ids = []
    for p in m["parts"]:
        ids += pq.read_table(os.path.join(out, p["file"])).column("id").to_pylist()
    return ids, m


def cli(*argv):
    p = argparse.ArgumentParser(prog="jv5fast")
    dcli.add_parser(p.add_subparsers(dest="cmd"))
    return dcli.run(p.parse_args(["embed-corpus", *argv, "--no-progress"]))


@pytest.fixture
def three_units(tmp_path, nano_ckpt, fake):
    """A complete folder of 3 parts (ids 0..8, rows_per_part 3)."""
    src = tmp_path / "in.jsonl"
    wj(src, [{"id": i, "text": f"t{i}"} for i in range(9)])
    out = tmp_path / "o"
    fake()
    go(nano_ckpt, src, out, rows_per_part=3)
    return src, out


# ---- 1. duplicates across inputs: an edited earlier input is refused once any part exists --------------------
@pytest.mark.parametrize("edit", ["change", "add"])
def test_edited_earlier_input_refused_once_a_later_part_exists(tmp_path, nano_ckpt, fake, edit):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "o"
    rows_a = [{"id": i, "text": f"a{i}"} for i in (1, 2, 3, 20)]
    wj(a, rows_a)
    wj(b, [{"id": i, "text": f"b{i}"} for i in (10, 11, 20)])
    fake(only={"b.jsonl"})
    with pytest.raises(KeyboardInterrupt):
        go(nano_ckpt, tmp_path / "*.jsonl", out)
    ids, m = ids_in(out)
    assert ids == [10, 11] and not m["complete"]
    if edit == "change":  # b's 20 is no longer a duplicate, b's 10 now is
        rows_a[3]["id"] = 10
    else:
        rows_a.append({"id": 10, "text": "dup"})
    wj(a, rows_a)
    fake()
    with pytest.raises(CorpusError, match=rf"{a} changed since it was embedded into .*sha256"):
        go(nano_ckpt, tmp_path / "*.jsonl", out)
    assert ids_in(out)[0] == [10, 11]


def test_committed_unit_ids_checked_against_the_plan(tmp_path, nano_ckpt, fake):
    """Even past the sha256 check (here: an edited manifest), a committed unit whose rows or ids differ from
    the plan is refused, naming the part."""
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "o"
    wj(a, [{"id": i, "text": f"a{i}"} for i in (1, 2, 3, 20)])
    wj(b, [{"id": i, "text": f"b{i}"} for i in (10, 11, 20)])
    fake(only={"b.jsonl"})
    with pytest.raises(KeyboardInterrupt):
        go(nano_ckpt, tmp_path / "*.jsonl", out)
    wj(a, [{"id": i, "text": f"a{i}"} for i in (1, 2, 3, 10)])
    m = manifest(out)
    for r in m["inputs"]:
        if r["path"] == str(a):
            r["sha256"], r["size"] = corpus.Planner("id", "text", 3).scan(str(a)).sha256, os.path.getsize(a)
    (out / "manifest.json").write_text(json.dumps(m))
    fake()
    with pytest.raises(CorpusError, match=r"part-00000\.parquet holds 2 rows of .*b\.jsonl rows 0\.\.3, but this "
                                          r"run plans 2 rows there with other ids"):
        go(nano_ckpt, tmp_path / "*.jsonl", out)


# ---- 2. every listed part is checked when the folder is opened ------------------------------------------------
def test_missing_part_is_redone(three_units, nano_ckpt, fake):
    src, out = three_units
    os.remove(out / "part-00001.parquet")
    f = fake()
    go(nano_ckpt, src, out)
    assert [k for k, _ in f.calls] == [[(str(src), 3, 6)]]
    ids, m = ids_in(out)
    assert sorted(ids) == list(range(9)) and m["complete"] and len(m["parts"]) == 3


def test_listed_part_of_ours_that_does_not_match_is_replaced(three_units, nano_ckpt, fake):
    src, out = three_units
    shutil.copyfile(out / "part-00000.parquet", out / "part-00001.parquet")  # our file, another unit's rows
    fake()
    go(nano_ckpt, src, out)
    ids, m = ids_in(out)
    assert sorted(ids) == list(range(9)) and m["complete"]
    assert sorted(p["file"] for p in m["parts"]) == ["part-00000.parquet", "part-00002.parquet",
                                                     "part-00003.parquet"]
    assert not (out / "part-00001.parquet").exists()


@pytest.mark.parametrize("damage", ["PAR1", "foreign", "symlink"])
def test_listed_part_we_cannot_prove_ours_is_refused_and_kept(three_units, nano_ckpt, fake, tmp_path, damage):
    src, out = three_units
    target = out / "part-00002.parquet"
    if damage == "PAR1":
        target.write_bytes(b"PAR1")
        want = "not a readable Parquet file"
    elif damage == "foreign":
        pq.write_table(pa.table({"id": [6, 7, 8]}), target)
        want = "its metadata does not carry this folder's settings"
    else:
        os.remove(target)
        (tmp_path / "elsewhere.parquet").write_bytes(b"x")
        os.symlink(tmp_path / "elsewhere.parquet", target)
        want = "is a symbolic link"
    before = os.lstat(target)
    f = fake()
    with pytest.raises(CorpusError, match=rf"part-00002\.parquet is listed in manifest\.json.*{want}.*Move it out"):
        go(nano_ckpt, src, out)
    assert f.calls == [] and os.lstat(target) == before and manifest(out)["complete"]


# ---- 3. the manifest's fields ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, edit, want", [
    ("rows_per_part", lambda m: m.update(rows_per_part="10"), "'rows_per_part' must be a positive integer, got '10'"),
    ("rows_per_part", lambda m: m.update(rows_per_part=-1), "'rows_per_part' must be a positive integer, got -1"),
    ("settings", lambda m: m.update(settings="x"), "'settings' must be a JSON object, got 'x'"),
    ("parts", lambda m: m.pop("parts"), "'parts' must be present"),
    ("parts[0].file", lambda m: m["parts"][0].update(file="../x.parquet"),
     r"'parts\[0\]\.file' must be a part name like part-00000\.parquet \(no folders\), got '\.\./x\.parquet'"),
    ("parts[1].file", lambda m: m["parts"][1].update(file="../../../etc/passwd"), r"'parts\[1\]\.file' must be"),
    ("parts[0].rows", lambda m: m["parts"][0].update(rows=99), r"'parts\[0\]\.rows' must be an integer in 0\.\.3"),
    ("parts[2].stop", lambda m: m["parts"][2].update(stop=12), r"'parts\[2\]\.stop' must be an integer in 7\.\.9"),
    ("parts[0].input", lambda m: m["parts"][0].update(input="/x.jsonl"), r"'parts\[0\]\.input' must be one of"),
    ("parts", lambda m: m["parts"].append(dict(m["parts"][0], file="part-00009.parquet")), "the only part of its"),
    ("inputs", lambda m: m.update(inputs={}), "'inputs' must be a list"),
    ("inputs[0].sha256", lambda m: m["inputs"][0].update(sha256=None), r"'inputs\[0\]\.sha256' must be 64"),
    ("complete", lambda m: m.update(complete="yes"), "'complete' must be true or false"),
    ("engine.checkpoint", lambda m: m["engine"].update(checkpoint="x"), "'engine.checkpoint' must be a list"),
    ("id_type", lambda m: m.update(id_type="float"), "'id_type' must be null, 'int64' or 'string'"),
    ("manifest", lambda m: m.clear() or m.update(format=[1]), "is not an embed-corpus manifest"),
    ("engine", lambda m: m.update(engine={"dtype": None, "max_length": None}), "written by an earlier jv5fast"),
])
def test_manifest_fields_are_validated(three_units, nano_ckpt, fake, field, edit, want):
    src, out = three_units
    m = manifest(out)
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    before = sorted(os.listdir(out))
    fake()
    with pytest.raises(CorpusError, match=want):
        go(nano_ckpt, src, out)
    assert sorted(os.listdir(out)) == before


# ---- 4. rows that would have failed the whole run -------------------------------------------------------------
def test_huge_int_and_lone_surrogates_are_bad_rows(tmp_path, nano_ckpt, fake):
    src, out = tmp_path / "in.jsonl", tmp_path / "o"
    wj(src, ['{"id": 1, "text": "fine"}', '{"id": ' + "9" * 5000 + ', "text": "x"}',
             '{"id": 2, "text": "bad \\ud800"}', '{"id": "\\udfff", "text": "x"}', '{"id": 3, "text": "ok"}'])
    fake()
    with pytest.raises(CorpusError, match=rf"{src} line 2: not valid JSON \(.*4300.*\); 2 more bad rows"):
        go(nano_ckpt, src, out, on_error="fail")
    assert go(nano_ckpt, src, out)["error_rows"] == 3
    assert sorted(ids_in(out)[0]) == [1, 3]
    with open(out / "errors.jsonl") as f:
        errors = {e["line"]: e["reason"] for e in map(json.loads, f)}
    assert errors[2].startswith("not valid JSON")
    assert errors[3] == r"text is not valid Unicode (a lone surrogate such as \ud800)"
    assert errors[4] == r"id is not valid Unicode (a lone surrogate such as \ud800)"


# ---- 5. the compute dtype, the device and the checkpoint's files are recorded ------------------------------
def test_device_dtype_and_checkpoint_recorded_and_checked(tmp_path, nano_ckpt, fake):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(nano_ckpt, ckpt)
    src, out = tmp_path / "in.jsonl", tmp_path / "o"
    wj(src, [{"id": i, "text": f"t{i}"} for i in range(4)])
    f = fake(only=set())
    with pytest.raises(KeyboardInterrupt):  # nothing committed yet: the engine recorded all the same
        go(ckpt, src, out, rows_per_part=2)
    assert {k: f.calls[0][1][k] for k in ("device", "dtype")} == {"device": "cpu", "dtype": "float32"}
    eng = manifest(out)["engine"]
    assert {k: eng[k] for k in ("device", "dtype", "max_length")} == {"device": "cpu", "dtype": "float32",
                                                                       "max_length": None}
    assert "config.json" in [e[0] for e in eng["checkpoint"]]
    with pytest.raises(CorpusError, match=r"was embedded on 'cpu' in 'float32', this run would compute on 'cuda' in "
                                          r"'bfloat16' \(from --num-gpus-per-worker and --dtype\)"):
        go(ckpt, src, out, num_gpus_per_worker=1)
    with pytest.raises(CorpusError, match=r"on 'cpu' in 'float32', this run would compute on 'cpu' in 'bfloat16'"):
        go(ckpt, src, out, engine_kwargs={"dtype": "bf16"})
    st = os.stat(ckpt / "config.json")
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CorpusError, match=r"the checkpoint of --model .*ckpt, whose file config\.json changed "
                                          r"\(size \d+ -> \d+, mtime_ns"):
        go(ckpt, src, out)
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    fake()
    go(ckpt, src, out)
    m = manifest(out)
    assert m["complete"] and all(
        pq.read_schema(out / p["file"]).metadata[b"jv5fast.engine"] == json.dumps(m["engine"]).encode()
        for p in m["parts"])


# ---- 6. errors.jsonl comes after the manifest ---------------------------------------------------------------
def test_killed_right_after_errors_file_resumes(tmp_path, nano_ckpt, fake, monkeypatch):
    src, out = tmp_path / "in.jsonl", tmp_path / "o"
    wj(src, [{"id": 1, "text": None}, {"id": 2, "text": "x"}])
    real = corpus.Output.write_errors

    def write_then_die(self, errors):
        real(self, errors)
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus.Output, "write_errors", write_then_die)
    fake()
    with pytest.raises(KeyboardInterrupt):
        go(nano_ckpt, src, out)
    monkeypatch.setattr(corpus.Output, "write_errors", real)
    assert go(nano_ckpt, src, out)["error_rows"] == 1
    assert ids_in(out)[0] == [2]


# ---- 7. an input glob that covers the output folder ---------------------------------------------------------
def test_glob_covering_output_leaves_it_out(tmp_path, nano_ckpt, fake):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    wj(data / "sub" / "a.jsonl", [{"id": 1, "text": None}, {"id": 2, "text": "x"}])
    fake()
    for out in (data / "emb", data / "emb", tmp_path / "link"):  # the rerun, then a link to the same folder
        if out.name == "link":
            os.symlink(data / "emb", out)
        go(nano_ckpt, data / "**" / "*.jsonl", out)
        assert [r["path"] for r in manifest(data / "emb")["inputs"]] == [str(data / "sub" / "a.jsonl")]
    assert (data / "emb" / "errors.jsonl").exists()
    with pytest.raises(CorpusError, match=r"errors\.jsonl lies inside --output"):
        go(nano_ckpt, tmp_path / "link" / "errors.jsonl", data / "emb")
    with pytest.raises(CorpusError, match=r"the pattern matches no files outside --output"):
        go(nano_ckpt, data / "emb" / "*.jsonl", tmp_path / "link")


# ---- 8. driver memory and unbounded lines -------------------------------------------------------------------
def test_overlong_line_is_refused_naming_file_and_line(tmp_path, nano_ckpt, fake, monkeypatch):
    monkeypatch.setattr("jv5fast.distributed.plan.MAX_LINE_BYTES", 1000)  # read by Planner._scan_jsonl
    src = tmp_path / "in.jsonl"
    wj(src, [{"id": 1, "text": "x" * 900}, {"id": 2, "text": "x" * 1000}])
    fake()
    with pytest.raises(CorpusError, match=rf"{src} line 2 is longer than"):
        go(nano_ckpt, src, tmp_path / "o")


def test_planner_keeps_one_int_per_id(tmp_path):
    """Duplicate detection holds an int (input index, line) per id, not a 'FILE line N' string."""
    import tracemalloc
    n = 20000
    src = tmp_path / "in.jsonl"
    wj(src, [{"id": 10**6 + i, "text": "t"} for i in range(n)] + [{"id": 10**6, "text": "dup"}])
    planner = corpus.Planner("id", "text", 50_000)
    tracemalloc.start()
    plan = planner.scan(str(src))
    per_row = tracemalloc.get_traced_memory()[0] / n
    tracemalloc.stop()
    assert all(type(v) is int for v in planner.seen.values())
    assert per_row < 160, f"{per_row:.0f} bytes per row"
    assert plan.rows == n + 1
    assert planner.errors[0]["reason"] == f"duplicate id (first seen in {src} line 1)"


def test_errors_file_is_written_line_by_line(tmp_path):
    import tracemalloc
    out = corpus.Output(str(tmp_path / "o"), {"model": "m"}, {"device": "cpu"}, None)
    errors = [{"file": "/data/in.jsonl", "line": i, "id": i, "reason": "text is null"} for i in range(20000)]
    tracemalloc.start()
    out.write_errors(errors)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out.close()
    size = os.path.getsize(tmp_path / "o" / "errors.jsonl")
    assert size > 1_000_000 and peak < size / 4, (peak, size)


# ---- 9. exit status of a failure while embedding --------------------------------------------------------------
def test_worker_value_error_is_exit_1_and_capped(tmp_path, nano_ckpt, monkeypatch, capsys):
    ray = pytest.importorskip("ray")

    class WorkerError(ValueError):  # as Ray's RayTaskError subclasses the task's own error type
        pass

    def boom(*a, **kw):
        raise WorkerError("Traceback ...\n" + "x" * 10000)
    monkeypatch.setattr(corpus, "_embed_units", boom)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connect() joins nothing
    src = tmp_path / "in.jsonl"
    wj(src, [{"id": 1, "text": "a"}])
    assert cli("--model", nano_ckpt, "--input", str(src), "--output", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "more characters; JV5FAST_DEBUG=1 shows all" in err and len(err) < 2200
    assert cli("--model", nano_ckpt, "--input", str(src), "--output", str(tmp_path / "o2"),
               "--prompt-name", "passage") == 2  # a ValueError before embedding: a flag mistake
    assert "unknown --prompt-name 'passage'" in capsys.readouterr().err


# ---- 10. the lock file -------------------------------------------------------------------------------------------
def test_lock_is_not_followed_nor_left_in_an_unrelated_folder(tmp_path, nano_ckpt, fake):
    src = tmp_path / "in.jsonl"
    wj(src, [{"id": 1, "text": "a"}])
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(tmp_path / "target", out / LOCK)  # dangling
    fake()
    with pytest.raises(CorpusError, match=r"\.jv5fast-embed-corpus\.lock is a symbolic link"):
        go(nano_ckpt, src, out)
    assert not (tmp_path / "target").exists() and os.path.islink(out / LOCK)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match=r"is not empty \(notes\.txt, \.\.\.\) and holds no manifest\.json"):
        go(nano_ckpt, src, other)
    assert os.listdir(other) == ["notes.txt"]
    # a refusal removes the lock file only if this run created it
    go(nano_ckpt, src, out / "fresh")
    for created in (False, True):
        if created:
            os.remove(out / "fresh" / LOCK)
        with pytest.raises(CorpusError, match="was written with --truncate-dim"):
            go(nano_ckpt, src, out / "fresh", truncate_dim=32)
        assert (out / "fresh" / LOCK).exists() is not created
