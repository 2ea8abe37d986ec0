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


def _brute(engine, docs, queries, k, truncate_dim=None, task=None):
    d = engine.encode_document(docs, truncate_dim=truncate_dim, task=task)
    q = engine.encode_query(queries, truncate_dim=truncate_dim, task=task)
    s = q @ d.T
    order = np.lexsort((np.broadcast_to(np.arange(len(docs)), s.shape), -s), axis=-1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


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
    want_i, want_s = _brute(engines["nano"], docs, queries, k, truncate_dim=32, task="text-matching")
    rows = _search_json(capsys, out, *queries, "-k", k, "--rescore", 6)  # shortlist 42 >= 41: exact
    assert [r["query"] for r in rows] == queries
    for qi, r in enumerate(rows):
        assert [h["rank"] for h in r["results"]] == list(range(1, k + 1))
        assert [h["id"] for h in r["results"]] == [ids[i] for i in want_i[qi]]
        np.testing.assert_allclose([h["score"] for h in r["results"]], want_s[qi], atol=1e-5)
        assert [h["text"] for h in r["results"]] == [docs[i][:12] for i in want_i[qi]]
    # plain output: rank, score, id, text start; k > N lists every document once
    capsys.readouterr()
    assert main(["search", str(out), queries[0], "-k", "100", "--rescore", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 41 and lines[0].split()[0] == "1" and lines[0].split()[2] == ids[want_i[0][0]]


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
    want_i, _ = _brute(engines["nano"], docs, ["dog in the rain"], 30)
    got = [h["id"] for h in rows[0]["results"]]
    # int8 storage of float16 vectors: the top 5 are the brute-force top 5 up to near-ties
    assert set(got) <= {int(ids[i]) for i in want_i[0][:8]} and got[0] == int(ids[want_i[0][0]])
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
    ('{"id": "a", "text": "a"}\n{"text": "b"}\n', "line 2: no 'id' field (keys: ['text']); pass --id-column"),
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
    want_i, _ = _brute(engines["nano"], docs, ["code and music"], 4)
    assert [h["id"] for h in rows[0]["results"]] == want_i[0].tolist()
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
    assert "no column 'id' (columns: ['doc_id', 't']); pass --id-column" in capsys.readouterr().err
    assert len(EmbeddingIndex.load(out)) == 23  # every failed run left the earlier index as it was
