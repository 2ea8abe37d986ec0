"""jv5fast.distributed: ``embed_dataset`` and ``embed-corpus`` on a local Ray (2 CPUs, one instance per module),
checked against ``Engine.embed`` on the same texts (float within 1e-6, binary byte-identical).

Ray runs are the slow part (each starts an actor pool that loads an Engine), so each run checks several
things: the mixed glob run (JSON Lines + Parquet, bad rows skipped, 2 actors) also feeds the refusal tests,
and the killed-driver test reruns into the same folder with the other concurrency.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")

from jv5fast.distributed import cli as dcli

WORDS = ["alpha", "beta", "gamma", "delta", "model", "vector", "search", "the", "of", "and", "query", "document", "kernel", "über", "naïve"]
SETTINGS_KEYS = ["model", "task", "prompt_name", "prompt", "truncate_dim", "dim", "precision", "normalize",
                 "id_column", "text_column"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(nano_ckpt):
    import jv5fast
    return jv5fast.Engine(nano_ckpt, device="cpu")


def texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def cli(*argv):
    """Parse like `jv5fast embed-corpus ARGS` and run in this process (on the module's Ray)."""
    p = argparse.ArgumentParser(prog="jv5fast")
    dcli.add_parser(p.add_subparsers(dest="cmd"))
    return dcli.run(p.parse_args(["embed-corpus", *argv, "--no-progress"]))


def read_output(folder):
    """(manifest, {id: embedding row}) from the parts the manifest lists; asserts no id twice."""
    with open(os.path.join(folder, "manifest.json")) as f:
        m = json.load(f)
    out = {}
    for part in m["parts"]:
        t = pq.read_table(os.path.join(folder, part["file"]))
        assert t.num_rows == part["rows"]
        assert json.loads(t.schema.metadata[b"jv5fast"]) == m["settings"]
        for i, e in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
            assert i not in out, f"id {i} written twice"
            out[i] = e
    return m, out


# ---- the mixed corpus: two JSON Lines files and a Parquet file, with bad rows --------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    a, b = texts(70, 1), texts(40, 2)
    rows_a = [{"id": i, "text": t} for i, t in enumerate(a)]
    rows_a[3]["text"] = None                     # null text
    rows_a[5] = {"text": "no id here"}           # missing id
    rows_a[8]["text"] = 17                       # not a string
    rows_a[9]["id"] = 2                          # duplicate within the file (id 2 is row 2)
    rows_a.insert(20, "")                        # a blank line: no row at all
    write_jsonl(d / "a.jsonl", rows_a)
    rows_b = [{"id": 1000 + i, "text": t, "extra": [1, 2]} for i, t in enumerate(b)]
    rows_b[4]["id"] = 7                          # duplicate across files (first in a.jsonl)
    write_jsonl(d / "b.jsonl", rows_b)
    c = texts(50, 3)
    pq.write_table(pa.table({"id": pa.array(range(2000, 2050), pa.int32()), "text": c}), d / "c.parquet",
                   row_group_size=16)
    expect = {r["id"]: r["text"] for r in rows_a if isinstance(r, dict) and "id" in r
              and isinstance(r.get("text"), str) and r is not rows_a[9]}
    expect.update({r["id"]: r["text"] for r in rows_b if r is not rows_b[4]})
    expect.update({2000 + i: t for i, t in enumerate(c)})
    bad = {(str(d / "a.jsonl"), 4), (str(d / "a.jsonl"), 6), (str(d / "a.jsonl"), 9), (str(d / "a.jsonl"), 10),
           (str(d / "b.jsonl"), 5)}
    return d, expect, bad


@pytest.fixture(scope="module")
def mixed_run(local_ray, mixed, nano_ckpt, tmp_path_factory):
    d, _, _ = mixed
    out = str(tmp_path_factory.mktemp("mixed_out") / "emb")
    t0 = time.perf_counter()
    rc = cli("--model", nano_ckpt, "--input", str(d / "*"), "--output", out, "--on-error", "skip",
             "--concurrency", "2", "--rows-per-part", "30", "--batch-size", "16")
    assert rc == 0
    return out, time.perf_counter() - t0


def test_glob_jsonl_parquet_skip_matches_engine(mixed, mixed_run, engine, nano_ckpt):
    d, expect, bad = mixed
    out, _ = mixed_run
    m, got = read_output(out)
    assert list(m)[:4] == ["format", "version", "settings", "parts"]
    assert (m["format"], m["version"], m["complete"]) == ("jv5fast-embed-corpus", 1, True)
    assert list(m["settings"]) == SETTINGS_KEYS
    assert m["settings"] == {"model": os.path.abspath(nano_ckpt), "task": "retrieval", "prompt_name": "document",
                             "prompt": "Document: ", "truncate_dim": None, "dim": 64, "precision": "float32",
                             "normalize": True, "id_column": "id", "text_column": "text"}
    assert {k: m["engine"][k] for k in ("device", "dtype", "max_length")} == {"device": "cpu", "dtype": "float32",
                                                                              "max_length": None}
    assert {p["input"] for p in m["parts"]} == {str(d / n) for n in ("a.jsonl", "b.jsonl", "c.parquet")}
    from jv5fast.distributed.corpus import ids_digest
    for p in m["parts"]:  # each part records its unit's ids: a resumed run checks them against its plan
        assert p["ids_sha256"] == ids_digest(pq.read_table(os.path.join(out, p["file"])).column("id").to_pylist())
    assert sorted(os.listdir(out)) == sorted([p["file"] for p in m["parts"]] + ["manifest.json", "errors.jsonl",
                                                                                 ".jv5fast-embed-corpus.lock"])
    t = pq.read_table(os.path.join(out, m["parts"][0]["file"]))
    assert t.schema.field("id").type == pa.int64()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    # exactly one row per good input row, equal to Engine.embed on the same texts
    assert sorted(got) == sorted(expect)
    ids = sorted(expect)
    ref = engine.embed([expect[i] for i in ids], prompt_name="document")
    np.testing.assert_allclose(np.array([got[i] for i in ids], np.float32), ref, rtol=0, atol=1e-6)
    # bad rows went to errors.jsonl, each with its file, line and reason
    with open(os.path.join(out, "errors.jsonl")) as f:
        errors = [json.loads(line) for line in f]
    assert {(e["file"], e["line"]) for e in errors} == bad
    reasons = {e["line"]: e["reason"] for e in errors if e["file"].endswith("a.jsonl")}
    assert reasons[4] == "text is null" and reasons[6].startswith("missing id")
    assert reasons[9].startswith("text is int") and reasons[10].startswith("duplicate id (first seen in")
    dup = [e for e in errors if e["file"].endswith("b.jsonl")][0]
    assert dup["id"] == 7 and "a.jsonl line 8" in dup["reason"]


def test_bad_rows_fail_names_row_and_file(mixed, mixed_run, nano_ckpt, tmp_path, capsys):
    d, _, _ = mixed
    rc = cli("--model", nano_ckpt, "--input", str(d), "--output", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{d / 'a.jsonl'} line 4 (id 3): text is null; 4 more bad rows" in err
    assert "--on-error skip" in err
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_rerun_refuses_other_settings_and_changed_inputs(mixed, mixed_run, nano_ckpt, tmp_path, capsys):
    d, _, _ = mixed
    out, _ = mixed_run
    before = sorted(os.listdir(out))
    rc = cli("--model", nano_ckpt, "--input", str(d / "*"), "--output", out, "--on-error", "skip",
             "--truncate-dim", "32")
    err = capsys.readouterr().err
    assert rc == 2 and "was written with --truncate-dim (unset), this run asks for 32" in err
    rc = cli("--model", nano_ckpt, "--input", str(d / "*"), "--output", out, "--on-error", "skip",
             "--prompt-name", "query")
    err = capsys.readouterr().err
    assert rc == 2 and "with --prompt-name 'document', this run asks for 'query'" in err
    # a complete folder and the same settings: nothing to do (Ray is not needed)
    rc = cli("--model", nano_ckpt, "--input", str(d / "*"), "--output", out, "--on-error", "skip")
    assert rc == 0 and "nothing to embed" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    # an input changed under committed parts: refused, nothing touched
    copy = tmp_path / "in"
    copy.mkdir()
    for n in ("a.jsonl", "b.jsonl", "c.parquet"):
        (copy / n).write_bytes((d / n).read_bytes())
    rc = cli("--model", nano_ckpt, "--input", str(d / "*"), "--output", out, "--on-error", "skip",
             "--task", "clustering")
    assert rc == 2 and "--task 'retrieval', this run asks for 'clustering'" in capsys.readouterr().err
    rc = cli("--model", nano_ckpt, "--input", str(copy / "a.jsonl"), "--output", out, "--on-error", "skip")
    assert rc == 2 and "is not in this run's --input" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_changed_input_refused(local_ray, nano_ckpt, tmp_path, capsys):
    """An input edited after some of its units were committed is refused. No actors needed: a unit whose rows
    are all bad is committed as an empty part without Ray."""
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": 1, "text": None}, {"id": 2, "text": None}])
    out = str(tmp_path / "o")
    assert cli("--model", nano_ckpt, "--input", str(src), "--output", out, "--on-error", "skip") == 0
    m, got = read_output(out)
    assert got == {} and len(m["parts"]) == 1 and m["parts"][0]["rows"] == 0
    write_jsonl(src, [{"id": 1, "text": None}, {"id": 2, "text": "now a text"}])
    capsys.readouterr()
    assert cli("--model", nano_ckpt, "--input", str(src), "--output", out, "--on-error", "skip") == 2
    err = capsys.readouterr().err
    assert "changed since it was embedded" in err and "sha256" in err


def test_embed_dataset_binary_matches_engine(local_ray, nano_ckpt, engine):
    from jv5fast.distributed import embed_dataset
    docs = texts(45, 5)
    ds = ray.data.from_items([{"doc_id": f"d{i}", "body": t} for i, t in enumerate(docs)], override_num_blocks=3)
    out = embed_dataset(ds, nano_ckpt, text_column="body", truncate_dim=36, precision="binary", concurrency=1,
                        batch_size=8, prompt_name="query")
    t = pa.concat_tables(list(out.iter_batches(batch_format="pyarrow", batch_size=None)))
    assert t.schema.field("embedding").type == pa.binary(5)
    got = dict(zip(t.column("doc_id").to_pylist(), t.column("embedding").to_pylist()))
    assert sorted(got) == sorted(f"d{i}" for i in range(45))
    ref = engine.embed(docs, truncate_dim=36, precision="binary", prompt_name="query")
    assert ref.dtype == np.int8
    for i in range(45):
        assert got[f"d{i}"] == ref[i].tobytes()


def test_embed_dataset_checks_arguments_first(local_ray, nano_ckpt):
    from jv5fast.distributed import embed_dataset
    ds = ray.data.from_items([{"text": "a"}])
    with pytest.raises(ValueError, match=r"precision 'int4' is not valid; choose one of \['float32'"):
        embed_dataset(ds, nano_ckpt, precision="int4")
    with pytest.raises(ValueError, match=r"task 'qa' is not valid .* valid tasks: \["):
        embed_dataset(ds, nano_ckpt, task="qa")
    with pytest.raises(ValueError, match=r"truncate_dim=65 is out of range 1..64"):
        embed_dataset(ds, nano_ckpt, truncate_dim=65)
    with pytest.raises(ValueError, match=r"unknown prompt_name 'passage'; valid: \['query', 'document'\]"):
        embed_dataset(ds, nano_ckpt, prompt_name="passage")
    with pytest.raises(ValueError, match=r"text_column 'body' is not a column of the dataset; its columns: \['text'\]"):
        embed_dataset(ds, nano_ckpt, text_column="body")
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        embed_dataset(ds, nano_ckpt, concurrency=0)


# ---- a driver killed mid-run, then rerun -----------------------------------------------------------------------
def test_killed_driver_then_rerun_is_exactly_once(local_ray, nano_ckpt, engine, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    docs = texts(800, 7)
    write_jsonl(src / "a.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(docs[:460])])
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(460, 800)], "text": docs[460:]}), src / "b.parquet",
                   row_group_size=64)  # units: 12 of a.jsonl (the last 20 lines), 9 of b.parquet (the last 20 rows)
    out = tmp_path / "o"
    args = ["--model", nano_ckpt, "--input", str(src), "--output", str(out), "--precision", "binary",
            "--truncate-dim", "40", "--rows-per-part", "40", "--batch-size", "8"]
    env = dict(os.environ, JV5FAST_DEBUG="1")
    p = subprocess.Popen([sys.executable, "-m", "jv5fast.distributed.cli", *args, "--concurrency", "1",
                          "--num-cpus", "2", "--object-store-mb", "200", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    parts = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:
            try:
                with open(out / "manifest.json") as f:
                    parts = len(json.load(f)["parts"])
            except (OSError, ValueError):
                parts = 0
            if parts >= 1:
                break
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver and the local Ray it started (its group)
            os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    assert 1 <= parts < 21, f"not killed mid-run ({parts} parts): {err.decode()[-2000:]}"
    m, got = read_output(out)
    kept = {p["file"]: (out / p["file"]).read_bytes() for p in m["parts"]}
    assert not m["complete"] and 1 <= len(m["parts"]) < 21

    assert cli(*args, "--concurrency", "2") == 0
    m, got = read_output(out)
    assert m["complete"] and len(m["parts"]) == 21 and sum(p["rows"] for p in m["parts"]) == 800
    assert sorted((p["input"], p["start"], p["stop"]) for p in m["parts"]) == sorted(
        [(str(src / "a.jsonl"), s, min(s + 40, 460)) for s in range(0, 460, 40)]
        + [(str(src / "b.parquet"), s, min(s + 40, 340)) for s in range(0, 340, 40)])
    for name, data in kept.items():  # parts committed before the kill are kept as they were
        assert (out / name).read_bytes() == data
    assert not [n for n in os.listdir(out) if n.startswith(".part-") or n.startswith(".manifest")]
    t = pq.read_table(out / m["parts"][0]["file"])
    assert t.schema.field("id").type == pa.string() and t.schema.field("embedding").type == pa.binary(5)
    ref = engine.embed(docs, truncate_dim=40, precision="binary")
    assert sorted(got) == sorted(f"s{i}" for i in range(800))
    for i in range(800):
        assert got[f"s{i}"] == ref[i].tobytes(), f"row s{i}"


# ---- no Ray at import time --------------------------------------------------------------------------------------
def test_importing_does_not_import_ray():
    code = ("import sys, argparse, jv5fast, jv5fast.distributed, jv5fast.distributed.cli as c; "
            "c.add_parser(argparse.ArgumentParser().add_subparsers()); "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_index_from_corpus_output_finds_what_brute_force_finds(mixed, mixed_run, engine, nano_ckpt, tmp_path):
    """The three-command flow on embed-corpus output: from_parquet keeps the ids and settings, `jv5fast index`
    takes the folder as it is, and `jv5fast search` ranks as brute force over Engine vectors does."""
    import jv5fast
    from jv5fast.cli import main
    _, expect, _ = mixed
    out, _ = mixed_run
    ids = sorted(expect)
    docs = engine.embed([expect[i] for i in ids], prompt_name="document")
    queries = texts(5, 9)
    q = engine.embed(queries, prompt_name="query")
    want = np.argsort(-(q @ docs.T), axis=1, kind="stable")[:, :5]
    emb = jv5fast.EmbeddingIndex.from_parquet(out)
    assert len(emb) == len(ids) and sorted(emb.ids.tolist()) == ids and emb.metadata["task"] == "retrieval"
    S, I = emb.search(q, 5, rescore_multiplier=len(ids))  # a shortlist of everything: exact ranking
    for r in range(len(queries)):
        got_ids = emb.map_ids(I[r]).tolist()
        assert got_ids[0] == ids[want[r, 0]]
        np.testing.assert_allclose(S[r], np.sort(q[r] @ docs.T)[::-1][:5], rtol=0, atol=1e-5)
    ham = jv5fast.HammingIndex.from_parquet(out)
    assert sorted(ham.ids.tolist()) == ids and ham.nbits == 64
    idx = str(tmp_path / "corpus.idx")
    assert main(["index", "--input", out, "--output", idx, "--no-progress"]) == 0
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["search", idx, *queries, "-k", "3", "--rescore", str(len(ids)), "--json"]) == 0
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [ln["query"] for ln in lines] == queries
    assert [ln["results"][0]["id"] for ln in lines] == [ids[want[r, 0]] for r in range(len(queries))]


def test_worker_counts_tokens_from_its_own_tokenization(nano_ckpt, engine):
    """The command's tokens/s column comes from the ids the worker embeds (one tokenization): the counts are
    Engine.tokenize's and the vectors Engine.embed's."""
    from jv5fast.distributed.dataset import EmbedWorker, resolve_settings
    settings = resolve_settings(nano_ckpt, truncate_dim=32)
    batch = pa.table({"id": [1, 2, 3], "text": texts(3, 31)})
    counted = EmbedWorker(settings, count_tokens=True).embed_table(batch, "text", "id")
    plain = EmbedWorker(settings).embed_table(batch, "text", "id")
    want = [len(x) for x in engine.tokenize(batch.column("text").to_pylist(), prompt_name="document")]
    assert counted.column("_num_tokens").to_pylist() == want and "_num_tokens" not in plain.column_names
    ref = engine.embed(batch.column("text").to_pylist(), prompt_name="document", truncate_dim=32)
    for t in (counted, plain):
        np.testing.assert_allclose(np.array(t.column("embedding").to_pylist(), np.float32), ref, rtol=0, atol=1e-6)
