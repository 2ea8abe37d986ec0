"""`jv5fast index` + `jv5fast search`: the three-command flow (documents or embed-corpus output -> index ->
search) returns the top-k of a brute force over Engine.embed vectors; settings that disagree with the index
are refused by name; bad input exits 2 with one line naming the file, line or row."""
import json

import numpy as np
import pytest
from test_index import write_corpus  # the embed-corpus folder format, written with pyarrow

from jv5fast.cli import main as _main
from jv5fast.index import EmbeddingIndex


def main(args):
    return _main([str(a) for a in args])

WORDS = ["light", "speed", "vacuum", "cat", "dog", "tree", "river", "mountain", "city", "music", "code", "night", "rain"]


def _docs(rng, n):
    return [" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(n)]


def _scores(engine, docs, query, truncate_dim=None, task=None):
    """Brute-force scores of every document for one query, by Engine vectors."""
    d = engine.encode_document(docs, truncate_dim=truncate_dim, task=task)
    return d @ engine.encode_query([query], truncate_dim=truncate_dim, task=task)[0]


def _assert_top_k(got, scores, k, atol=1e-5):
    """`got` (document positions in rank order) is a brute-force top k: the exact score of the hit at each rank
    equals the brute-force score at that rank to atol. Random documents repeat (a one-word text drawn twice), and a
    repeated text embeds to the last bit only by its row position in the batch, so equal scores may come in either
    order; a document that scores below the top k by more than atol fails."""
    got = list(got)
    assert len(got) == min(k, len(scores)) and len(set(got)) == len(got), got
    np.testing.assert_allclose(scores[got], np.sort(scores)[::-1][:len(got)], rtol=0, atol=atol)


def _search_json(capsys, *args):
    capsys.readouterr()
    assert main(["search", *map(str, args), "--json", "--device", "cpu"]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_jsonl_index_search_matches_brute_force(engines, nano_ckpt, tmp_path, capsys):
    rng = np.random.default_rng()
    docs = _docs(rng, 41)
    ids = [f"doc-{i}-{rng.integers(1e9)}" for i in range(41)]
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"key": i, "body": t, "other": 1}) + "\n" + ("\n" if j == 3 else "")
                           for j, (i, t) in enumerate(zip(ids, docs))), encoding="utf-8")
    out = tmp_path / "docs.idx"
    assert main(["index", "--model", nano_ckpt, "--input", inp, "--output", out, "--device", "cpu", "--task",
                 "text-matching", "--truncate-dim", "32", "--id-column", "key", "--text-column", "body",
                 "--text-chars", "12"]) == 0
    index = EmbeddingIndex.load(out)
    assert index.metadata["task"] == "text-matching" and index.metadata["truncate_dim"] == 32
    assert list(index.ids) == ids and list(index.texts) == [t[:12] for t in docs]
    queries = ["cat river", "music at night in the city", "x"]
    k = 7
    rows = _search_json(capsys, out, *queries, "-k", k, "--rescore", 6)  # shortlist 42 >= 41: exact
    assert [r["query"] for r in rows] == queries
    pos = {d: i for i, d in enumerate(ids)}
    for qi, r in enumerate(rows):
        assert [h["rank"] for h in r["results"]] == list(range(1, k + 1))
        got = [pos[h["id"]] for h in r["results"]]
        scores = _scores(engines["nano"], docs, queries[qi], 32, "text-matching")
        _assert_top_k(got, scores, k)
        np.testing.assert_allclose([h["score"] for h in r["results"]], np.sort(scores)[::-1][:k], atol=1e-5)
        assert [h["text"] for h in r["results"]] == [docs[i][:12] for i in got]
    # plain output: rank, score, id, text start; k > N lists every document once
    capsys.readouterr()
    assert main(["search", str(out), queries[0], "-k", "100", "--rescore", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 41 and lines[0].split()[0] == "1"
    assert sorted(pos[line.split()[2]] for line in lines) == list(range(41))
    _assert_top_k([pos[lines[0].split()[2]]], _scores(engines["nano"], docs, queries[0], 32, "text-matching"), 1)


def test_embed_corpus_folder_index_search(engines, nano_ckpt, tmp_path, capsys):
    """embed-corpus output (float16 parts, int ids) -> index (no embedding done) -> search."""
    rng = np.random.default_rng()
    docs = _docs(rng, 30)
    vecs = engines["nano"].encode_document(docs)
    ids = rng.choice(10**9, 30, replace=False)
    d = write_corpus(tmp_path / "corpus", [(ids[:13], vecs[:13]), (ids[13:], vecs[13:])], "float16",
                     settings={"model": nano_ckpt})
    out = tmp_path / "c.idx"
    assert main(["index", "--input", d, "--output", out, "--store", "int8", "--model", nano_ckpt]) == 0
    assert "indexed 30 documents from embed-corpus output" in capsys.readouterr().err
    rows = _search_json(capsys, out, "dog in the rain", "-k", 5, "--rescore", 6)
    scores = _scores(engines["nano"], docs, "dog in the rain")
    pos = {int(v): i for i, v in enumerate(ids)}
    got = [pos[h["id"]] for h in rows[0]["results"]]
    # int8 storage of float16 vectors rescores to ~3e-3 of the exact score (2.6e-3 the worst of 1,900 draws): the
    # 5 hits are within the brute-force top 8, and the first is the top 1 up to that rounding
    best = np.sort(scores)[::-1]
    assert len(got) == 5 and (scores[got] >= best[7] - 1e-5).all() and scores[got[0]] >= best[0] - 6e-3, got
    assert all("text" not in h for h in rows[0]["results"])  # embed-corpus output holds no texts


def test_settings_that_disagree_with_the_index_are_refused(nano_ckpt, small_ckpt, tmp_path, capsys):
    rng = np.random.default_rng()
    inp = tmp_path / "d.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(_docs(rng, 9))))
    out = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", inp, "--output", out, "--device", "cpu",
                 "--truncate-dim", "48"]) == 0
    other = EmbeddingIndex(40, metadata={"model": nano_ckpt, "task": "retrieval", "truncate_dim": None, "dim": 40})
    other.add(rng.standard_normal((3, 40)).astype(np.float32))
    other.save(tmp_path / "other.idx")
    corpus = write_corpus(tmp_path / "corpus", [([1, 2], rng.standard_normal((2, 64)).astype(np.float32))],
                          settings={"model": nano_ckpt})
    binary = write_corpus(tmp_path / "bin", [([1, 2], rng.standard_normal((2, 64)).astype(np.float32))],
                          "ubinary", settings={"model": nano_ckpt})
    cases = [
        (["search", out, "q", "--task", "clustering"],
         "--task clustering differs from the index's task retrieval"),
        (["search", out, "q", "--truncate-dim", "32"], "--truncate-dim 32 differs from the index's dimension 48"),
        (["search", tmp_path / "other.idx", "q"], "gives 64-d embeddings, but"),
        (["search", out, "q", "--model", tmp_path / "nope"], "checkpoint folder not found"),
        (["index", "--input", corpus, "--output", tmp_path / "x.idx", "--model", small_ckpt],
         f"--model {small_ckpt} differs from the embed-corpus output's model {nano_ckpt}"),
        (["index", "--input", corpus, "--output", tmp_path / "x.idx", "--task", "clustering"],
         "--task clustering differs from the embed-corpus output's task retrieval"),
        (["index", "--input", binary, "--output", tmp_path / "x.idx"],
         "needs float embeddings, but this embed-corpus output has precision 'ubinary'"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (needle, err)
    assert not (tmp_path / "x.idx").exists()


@pytest.mark.parametrize("content,needle", [
    ('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 1, "text": "c"}\n',
     "line 3: duplicate id 1 (first at {f} line 1)"),
    ('{"id": "a", "text": "a"}\n{"text": "b"}\n', "line 2: no 'id' field (keys: text); pass --id-column"),
    ('{"id": "a", "text": "a"}\n{"id": "b", "text": 5}\n', "line 2 (id 'b'): 'text' must be a string, got int"),
    ('{"id": "a", "text": "a"}\n{"id": 2, "text": "b"}\n', "line 2: id 2 is a int, but {f} line 1 has a str id"),
    ('{"id": 1.5, "text": "a"}\n', "line 1: 'id' must be an int or a str, got float"),
    ('{"id": "a", "text": "a"}\n["x"]\n', "line 2: expected an object with 'id' and 'text', got list"),
    ('{"id": "a", "text": null}\n', "line 1 (id 'a'): 'text' must be a string, got null"),
    ("\n\n", "holds no documents"),
])
def test_bad_documents_exit_2_naming_the_line(nano_ckpt, tmp_path, capsys, content, needle):
    f = tmp_path / "docs.jsonl"
    f.write_text(content, encoding="utf-8")
    assert main(["index", "--model", nano_ckpt, "--input", str(f), "--output", str(tmp_path / "o.idx")]) == 2
    err = capsys.readouterr().err
    assert needle.format(f=f) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.idx").exists()


def test_parquet_documents_and_their_errors(engines, nano_ckpt, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng()
    docs = _docs(rng, 23)
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"doc_id": np.arange(0, 10), "t": docs[:10]}), folder / "a.parquet")
    pq.write_table(pa.table({"doc_id": np.arange(10, 23), "t": docs[10:]}), folder / "b.parquet")
    (folder / "notes.txt").write_text("not a part")
    out = tmp_path / "p.idx"
    assert main(["index", "--model", nano_ckpt, "--input", folder, "--output", out, "--device", "cpu",
                 "--id-column", "doc_id", "--text-column", "t", "--store", "float16"]) == 0
    rows = _search_json(capsys, out, "code and music", "-k", 4, "--rescore", 6)
    # float16 storage rescores to ~1e-3 of the exact score
    _assert_top_k([h["id"] for h in rows[0]["results"]], _scores(engines["nano"], docs, "code and music"), 4,
                  atol=1e-3)
    pq.write_table(pa.table({"doc_id": [1, 2, 2], "t": ["a", "b", "c"]}), tmp_path / "dup.parquet")
    pq.write_table(pa.table({"doc_id": [1, 2], "t": ["a", None]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"doc_id": [1.5], "t": ["a"]}), tmp_path / "float.parquet")
    for name, needle in (("dup.parquet", "dup.parquet row 2: duplicate id 2 (first at"),
                         ("null.parquet", "null.parquet row 1 (id 2): 't' must be a string, got null"),
                         ("float.parquet", "column 'doc_id' is double; ids must be integers or strings")):
        capsys.readouterr()
        assert main(["index", "--model", nano_ckpt, "--input", str(tmp_path / name), "--output", str(out),
                     "--id-column", "doc_id", "--text-column", "t"]) == 2
        assert needle in capsys.readouterr().err, needle
    capsys.readouterr()
    assert main(["index", "--model", nano_ckpt, "--input", str(tmp_path / "dup.parquet"), "--output", str(out)]) == 2
    assert "no column 'id' (columns: doc_id, t); pass --id-column" in capsys.readouterr().err
    assert len(EmbeddingIndex.load(out)) == 23  # every failed run left the earlier index as it was


# ----------------------------------------------------------------------------------------------
# review fixes


def _err(capsys, args, code=2):
    capsys.readouterr()
    assert main(args) == code, args
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured


def _docs_file(tmp_path, rng, n=5, name="d.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(_docs(rng, n))))
    return f


def test_index_output_never_replaces_the_input_or_a_foreign_file(nano_ckpt, tmp_path, capsys):
    import os
    rng = np.random.default_rng()
    docs = _docs_file(tmp_path, rng)
    before = docs.read_bytes()
    corpus = write_corpus(tmp_path / "corpus", [([1, 2], rng.standard_normal((2, 64)).astype(np.float32))],
                          settings={"model": nano_ckpt})
    manifest = (corpus / "manifest.json").read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    os.link(docs, tmp_path / "hardlink.jsonl")
    (tmp_path / "link.idx").symlink_to(docs)
    cases = [
        (docs, docs, "is the --input"),
        (docs, tmp_path / "hardlink.jsonl", "is the --input"),
        (docs, tmp_path / "link.idx", "is the --input"),
        (corpus, corpus / "manifest.json", "is inside the --input folder"),
        (corpus, corpus / "index.idx", "is inside the --input folder"),
        (docs, notes, "exists and is not a jv5fast index file"),
    ]
    for inp, out, needle in cases:
        model = [] if inp == corpus else ["--model", nano_ckpt]
        err = _err(capsys, ["index", *model, "--input", inp, "--output", out, "--device", "cpu"]).err
        assert needle in err and str(out) in err, err
    assert docs.read_bytes() == before and (corpus / "manifest.json").read_bytes() == manifest
    assert notes.read_text() == "my notes" and not (corpus / "index.idx").exists()
    # an earlier index is replaced (atomically), and so is an empty file
    idx = tmp_path / "d.idx"
    for _ in range(2):
        assert main(["index", "--model", nano_ckpt, "--input", docs, "--output", idx, "--device", "cpu"]) == 0
    empty = tmp_path / "empty.idx"
    empty.touch()
    assert main(["index", "--input", corpus, "--output", empty]) == 0
    assert len(EmbeddingIndex.load(idx)) == 5 and len(EmbeddingIndex.load(empty)) == 2


def test_embed_corpus_model_is_made_absolute_and_its_dim_recorded(nano_ckpt, tmp_path, capsys, monkeypatch):
    """A manifest may name the model relative to where embed-corpus ran: resolved at index time (when it
    resolves from there), with the model's width, so search from elsewhere uses the same checkpoint."""
    import os
    rng = np.random.default_rng()
    docs = _docs(rng, 12)
    import jv5fast
    eng = jv5fast.Engine(nano_ckpt, device="cpu")
    vecs = eng.encode_document(docs, truncate_dim=32)
    monkeypatch.chdir(os.path.dirname(nano_ckpt))
    rel = os.path.basename(nano_ckpt)
    d = write_corpus(tmp_path / "corpus", [(np.arange(12), vecs)], settings={"model": rel, "truncate_dim": 32})
    out = tmp_path / "c.idx"
    assert main(["index", "--input", d, "--output", out]) == 0
    meta = EmbeddingIndex.load(out).metadata
    assert meta["model"] == os.path.abspath(nano_ckpt) and meta["model_dim"] == eng.dim and meta["dim"] == 32
    monkeypatch.chdir(tmp_path)
    rows = _search_json(capsys, out, "cat and dog", "-k", 3, "--rescore", 4)
    _assert_top_k([h["id"] for h in rows[0]["results"]], _scores(eng, docs, "cat and dog", 32), 3)


def test_merged_checkpoint_task_and_task_errors_are_worded_for_the_index(ckpt_factory, nano_ckpt, tmp_path, capsys):
    """embed-corpus records task 'merged' for a merged checkpoint whose task it cannot name: search builds the
    engine without a task. A recorded task the model cannot serve is the index's, not a --task flag."""
    import jv5fast
    merged = ckpt_factory("nano", seed=43, merged_task="classification")
    eng = jv5fast.Engine(merged, device="cpu")
    assert eng.task is None
    rng = np.random.default_rng()
    docs = _docs(rng, 10)
    d = write_corpus(tmp_path / "corpus", [(np.arange(10), eng.encode_document(docs))],
                     settings={"model": merged, "task": "merged"})
    out = tmp_path / "m.idx"
    assert main(["index", "--input", d, "--output", out]) == 0
    rows = _search_json(capsys, out, "rain at night", "-k", 3, "--rescore", 4)
    _assert_top_k([h["id"] for h in rows[0]["results"]], _scores(eng, docs, "rain at night"), 3)
    err = _err(capsys, ["search", out, "q", "--task", "retrieval", "--device", "cpu"]).err
    assert "--task retrieval differs from the only task of the merged checkpoint" in err
    # an index built with a task (clustering) searched with a merged model: no "leave out --task" (none given)
    inp = _docs_file(tmp_path, rng)
    idx = tmp_path / "c.idx"
    assert main(["index", "--model", nano_ckpt, "--input", inp, "--output", idx, "--task", "clustering",
                 "--device", "cpu"]) == 0
    err = _err(capsys, ["search", idx, "q", "--model", merged, "--device", "cpu"]).err
    assert "the index's task clustering" in err and "cannot be used with" in err and "--task" not in err, err


def test_id_column_equal_to_text_column_is_refused(nano_ckpt, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    for name, extra in (("t.parquet", ["--id-column", "text", "--text-column", "text"]),
                        ("t.jsonl", ["--id-column", "text"])):
        err = _err(capsys, ["index", "--model", nano_ckpt, "--input", tmp_path / name, "--output",
                            tmp_path / "o.idx", *extra]).err
        assert "--id-column and --text-column are both 'text'" in err, err
    assert not (tmp_path / "o.idx").exists()


def _no_engine(monkeypatch):
    import jv5fast.engine

    def refuse(*a, **k):
        raise AssertionError("the documents were embedded before the input was checked")
    monkeypatch.setattr(jv5fast.engine, "Engine", refuse)


@pytest.mark.parametrize("content,needle", [
    ('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "c\\ud800", "text": "z"}\n',
     "line 3: id 'c\\ud800' holds a lone surrogate at character 1"),
    ('{"id": 1, "text": "x"}\n\n{"id": 2, "text": "ok \\udc80 no"}\n',
     "line 3 (id 2): 'text' holds a lone surrogate at character 3"),
    ('{"id": 1, "text": "x"}\n{"id": -1, "text": "y"}\n', "line 2: id -1 is reserved"),
])
def test_bad_ids_and_texts_are_named_by_line_before_embedding(nano_ckpt, tmp_path, capsys, monkeypatch,
                                                              content, needle):
    f = tmp_path / "docs.jsonl"
    f.write_text(content, encoding="utf-8")
    _no_engine(monkeypatch)
    err = _err(capsys, ["index", "--model", nano_ckpt, "--input", f, "--output", tmp_path / "o.idx"]).err
    assert f"{f} {needle}" in err, err


def test_surrogate_past_the_stored_text_is_embedded(nano_ckpt, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"id": 1, "text": "abc \\ud800"}\n{"id": 2, "text": "x"}\n', encoding="utf-8")
    assert main(["index", "--model", nano_ckpt, "--input", f, "--output", tmp_path / "o.idx", "--text-chars", "3",
                 "--device", "cpu"]) == 0
    assert list(EmbeddingIndex.load(tmp_path / "o.idx").texts) == ["abc", "x"]


def test_parquet_invalid_utf8_is_named_by_row(nano_ckpt, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = b"okfine\xed\xa0\x80x"
    offsets = np.array([0, 2, 6, 10], np.int32)
    texts = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    pq.write_table(pa.table({"id": [1, 2, 3], "text": texts}), tmp_path / "bad.parquet")
    _no_engine(monkeypatch)
    err = _err(capsys, ["index", "--model", nano_ckpt, "--input", tmp_path / "bad.parquet", "--output",
                        tmp_path / "o.idx"]).err
    assert f"{tmp_path / 'bad.parquet'} row 2: column 'text' is not valid UTF-8" in err, err


def test_k_is_capped_at_the_index_size(nano_ckpt, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng()
    out = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", _docs_file(tmp_path, rng, n=2), "--output", out,
                 "--device", "cpu"]) == 0
    seen = []
    real = EmbeddingIndex.search

    def spy(self, q, k, **kw):
        seen.append(k)
        return real(self, q, min(k, len(self)), **kw)  # never the (Q, 2e9) arrays, fix or not
    monkeypatch.setattr(EmbeddingIndex, "search", spy)
    rows = _search_json(capsys, out, "q", "-k", 2_000_000_000)
    assert seen == [2] and len(rows[0]["results"]) == 2


def test_query_with_a_lone_surrogate_is_named_before_any_output(nano_ckpt, tmp_path, capsys):
    rng = np.random.default_rng()
    out = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", _docs_file(tmp_path, rng), "--output", out,
                 "--device", "cpu"]) == 0
    qf = tmp_path / "q.jsonl"
    qf.write_text('"fine"\n"also fine"\n"bad \\ud800"\n', encoding="utf-8")
    got = _err(capsys, ["search", out, "--input", qf, "--json", "--device", "cpu"])
    assert f"{qf} line 3 holds a lone surrogate at character 4" in got.err and got.out == "", got
    got = _err(capsys, ["search", out, "ok", "caf\udce9", "--device", "cpu"])
    assert "query argument 2 holds a lone surrogate at character 3" in got.err and got.out == "", got


def test_broken_stdout_stops_quietly_with_141(nano_ckpt, tmp_path, capsys, monkeypatch):
    import io
    import sys
    rng = np.random.default_rng()
    out = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", _docs_file(tmp_path, rng), "--output", out,
                 "--device", "cpu"]) == 0

    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", Gone())
    capsys.readouterr()
    assert main(["search", out, "q", "--device", "cpu"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag,value", [("--id-column", "key"), ("--text-column", "body"), ("--text-chars", "5"),
                                        ("--max-length", "16"), ("--max-batch-tokens", "512")])
def test_embedding_flags_are_refused_with_embed_corpus_output(tmp_path, capsys, flag, value):
    rng = np.random.default_rng()
    d = write_corpus(tmp_path / "corpus", [([1, 2], rng.standard_normal((2, 16)).astype(np.float32))])
    err = _err(capsys, ["index", "--input", d, "--output", tmp_path / "o.idx", flag, value]).err
    assert f"{flag} does not apply to embed-corpus output" in err and "leave it out" in err, err
    assert not (tmp_path / "o.idx").exists()
