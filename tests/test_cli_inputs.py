"""`jv5fast embed --input` / `search --input` formats: the extension (or --format) decides how a file is read,
an unknown extension is refused rather than read line by line, and every text a user gave comes back in order.
Also the counts the CLI prints (1 text, 2 texts)."""
import io
import json
import sys

import numpy as np
import pytest

from jv5fast.cli import main


def _embed(nano_ckpt, tmp_path, *args):
    out = tmp_path / "o.npy"
    rc = main(["embed", "--model", nano_ckpt, "--device", "cpu", "--no-progress", *map(str, args),
               "--output", str(out)])
    return rc, (np.load(out) if rc == 0 else None)


def _err(capsys, rc, want=2):
    err = capsys.readouterr().err
    assert rc == want, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line (argparse adds its usage above it)
    return err


def test_json_array_keeps_every_text_in_order(engines, nano_ckpt, tmp_path):
    texts = ["first", "", "zweiter Text, mit Komma", "line\nbreak inside", "東京", "last"]
    f = tmp_path / "texts.json"
    f.write_text(json.dumps([texts[0], {"text": texts[1]}, texts[2], {"text": texts[3], "id": 7}, *texts[4:]]),
                 encoding="utf-8")
    rc, got = _embed(nano_ckpt, tmp_path, "--input", f)
    assert rc == 0
    np.testing.assert_allclose(got, engines["nano"].embed(texts), atol=1e-6)
    # --text-column picks another field, for .json and .jsonl objects alike
    g = tmp_path / "body.jsonl"
    g.write_text('{"body": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    rc, got = _embed(nano_ckpt, tmp_path, "--input", g, "--text-column", "body")
    assert rc == 0
    np.testing.assert_allclose(got, engines["nano"].embed(["a", "", "b"]), atol=1e-6)


@pytest.mark.parametrize("content, needle", [
    ('["a", 3]', "bad.json index 1: expected a JSON string or an object with a 'text' string, got a number"),
    ('["a", "b", null]', "bad.json index 2: expected a JSON string or an object with a 'text' string, got null"),
    ('[["a"]]', "bad.json index 0: expected a JSON string or an object with a 'text' string, got an array"),
    ('["a", {"body": "x", "id": 1}]', "bad.json index 1: object without a 'text' field (keys: body, id)"),
    ('[{"text": 5}]', "bad.json index 0: expected a JSON string or an object with a 'text' string, got a number"),
    ('{"text": "a"}', 'bad.json: expected a JSON array of strings or of {"text": ...} objects, got an object'),
    ('"just one"', 'bad.json: expected a JSON array of strings or of {"text": ...} objects, got a string'),
    ('["a",\n "b"', "bad.json: not valid JSON ("),
])
def test_bad_json_is_refused_naming_the_index(nano_ckpt, tmp_path, capsys, content, needle):
    f = tmp_path / "bad.json"
    f.write_text(content, encoding="utf-8")
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", f)
    assert needle in _err(capsys, rc)


def test_unknown_extension_is_refused_and_format_overrides_it(engines, nano_ckpt, tmp_path, capsys):
    csv = tmp_path / "texts.csv"
    csv.write_text("id,text\n1,hello\n", encoding="utf-8")
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", csv)
    err = _err(capsys, rc)
    assert "--input " + str(csv) + ": unknown file type '.csv'" in err
    assert all(x in err for x in (".txt", ".jsonl", ".json", ".parquet", "--format txt|jsonl|json|parquet"))
    assert "[" not in err  # choices in words, not a Python list
    rc, got = _embed(nano_ckpt, tmp_path, "--input", csv, "--format", "txt")  # the user said so: every line
    assert rc == 0
    np.testing.assert_allclose(got, engines["nano"].embed(["id,text", "1,hello"]), atol=1e-6)
    as_json = tmp_path / "texts.data"
    as_json.write_text('["x", "y"]', encoding="utf-8")
    rc, got = _embed(nano_ckpt, tmp_path, "--input", as_json, "--format", "json")
    assert rc == 0
    np.testing.assert_allclose(got, engines["nano"].embed(["x", "y"]), atol=1e-6)
    plain = tmp_path / "TEXTS"  # no extension (a pipe such as /dev/fd/63 has none): one text per line
    plain.write_text("p\nq\n", encoding="utf-8")
    rc, got = _embed(nano_ckpt, tmp_path, "--input", plain)
    assert rc == 0 and got.shape == (2, 64)
    upper = tmp_path / "T.JSON"
    upper.write_text('["u"]', encoding="utf-8")
    rc, got = _embed(nano_ckpt, tmp_path, "--input", upper)
    assert rc == 0 and got.shape == (1, 64)
    # flags that only apply to --input
    capsys.readouterr()
    rc, _ = _embed(nano_ckpt, tmp_path, "x", "--format", "json")
    assert "--format applies to --input" in _err(capsys, rc)
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", plain, "--text-column", "body")
    assert "--text-column applies to jsonl, json and parquet input" in _err(capsys, rc)
    rc = main(["embed", "--model", nano_ckpt, "--input", str(csv), "--format", "csv"])
    assert "invalid choice: 'csv'" in _err(capsys, rc)


def test_parquet_input_reads_the_text_column(engines, nano_ckpt, tmp_path, capsys, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"text {i}" if i % 5 else "" for i in range(23)]
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(23)), "text": texts, "body": texts[::-1]}), f, row_group_size=4)
    want = engines["nano"].embed(texts)
    rc, got = _embed(nano_ckpt, tmp_path, "--input", f)
    assert rc == 0
    np.testing.assert_allclose(got, want, atol=1e-6)
    rc, got = _embed(nano_ckpt, tmp_path, "--input", f, "--text-column", "body")
    assert rc == 0
    np.testing.assert_allclose(got, want[::-1], atol=1e-6)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read_bytes())))
    rc, got = _embed(nano_ckpt, tmp_path, "--input", "-", "--format", "parquet")
    assert rc == 0
    np.testing.assert_allclose(got, want, atol=1e-6)
    monkeypatch.undo()
    # what cannot be embedded is named by row or column
    capsys.readouterr()
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", nulls)
    assert f"{nulls} row 1: 'text' is null" in _err(capsys, rc)
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", f, "--text-column", "title")
    assert "no column 'title' (columns: id, text, body); pass --text-column" in _err(capsys, rc)
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", f, "--text-column", "id")
    assert "column 'id' is int64; texts must be strings" in _err(capsys, rc)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello\n", encoding="utf-8")
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", not_parquet)
    assert f"--input {not_parquet}: not a readable Parquet file" in _err(capsys, rc)
    # without pyarrow: which extra to install, not a UTF-8 error
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc, _ = _embed(nano_ckpt, tmp_path, "--input", f)
    assert 'Parquet input needs the parquet extra: pip install "jv5fast[parquet]"' in _err(capsys, rc)


def test_counts_are_pluralized(nano_ckpt, tmp_path, capsys):
    rc, _ = _embed(nano_ckpt, tmp_path, "one")
    assert "embedded 1 text -> " in capsys.readouterr().err and rc == 0
    rc, _ = _embed(nano_ckpt, tmp_path, "one", "two")
    assert "embedded 2 texts -> " in capsys.readouterr().err and rc == 0
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": 1, "text": "only"}\n', encoding="utf-8")
    idx = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", str(docs), "--output", str(idx), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "indexed 1 document from " in capsys.readouterr().err
    from jv5fast.cli.messages import count
    assert [count(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]


def test_search_input_formats(nano_ckpt, tmp_path, capsys):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": f"doc {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    idx = tmp_path / "d.idx"
    assert main(["index", "--model", nano_ckpt, "--input", str(docs), "--output", str(idx), "--device", "cpu",
                 "--no-progress"]) == 0
    capsys.readouterr()
    queries = tmp_path / "q.json"
    queries.write_text('["doc 1", {"text": "doc 2"}]', encoding="utf-8")
    assert main(["search", str(idx), "--input", str(queries), "--json", "-k", "1", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == ["doc 1", "doc 2"]
    csv = tmp_path / "q.csv"
    csv.write_text("query\ndoc 1\n", encoding="utf-8")
    rc = main(["search", str(idx), "--input", str(csv), "--device", "cpu"])
    assert "unknown file type '.csv'" in _err(capsys, rc)
    assert main(["search", str(idx), "--input", str(csv), "--format", "txt", "--json", "--device", "cpu"]) == 0
    assert [json.loads(line)["query"] for line in capsys.readouterr().out.splitlines()] == ["query", "doc 1"]
    rc = main(["search", str(idx), "doc", "--format", "json"])
    assert "--format applies to --input" in _err(capsys, rc)
    bad = tmp_path / "bad.json"
    bad.write_text('["\\ud800"]', encoding="utf-8")  # the lone surrogate is named by the array index
    rc = main(["search", str(idx), "--input", str(bad), "--device", "cpu"])
    assert f"{bad} index 0 holds a lone surrogate" in _err(capsys, rc)
