"""`jv5fast embed` has the same semantics as Engine.embed."""
import json
import subprocess
import sys

import numpy as np
import pytest

from jv5fast.cli import main


def test_embed_texts_to_npy(engines, nano_ckpt, tmp_path):
    out = tmp_path / "q.npy"
    rc = main(["embed", "--model", nano_ckpt, "--device", "cpu", "--prompt-name", "query", "--truncate-dim", "32",
               "how fast is light", "second text", "--output", str(out)])
    assert rc == 0
    want = engines["nano"].encode_query(["how fast is light", "second text"], truncate_dim=32)
    np.testing.assert_allclose(np.load(out), want, atol=1e-6)


def test_embed_file_and_stdin_to_jsonl(engines, nano_ckpt, tmp_path, monkeypatch):
    inp = tmp_path / "in.txt"
    inp.write_text("first line\n\nthird line after an empty one\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert main(["embed", "--model", nano_ckpt, "--device", "cpu", "--task", "clustering", "--precision", "ubinary",
                 "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    want = engines["nano"].embed(["first line", "", "third line after an empty one"], task="clustering",
                                 precision="ubinary")
    np.testing.assert_array_equal(np.array([r["embedding"] for r in rows]), want)
    # stdin through the console entry point
    proc = subprocess.run([sys.executable, "-m", "jv5fast.cli", "embed", "--model", nano_ckpt, "--device", "cpu",
                           "--input", "-",
                           "--output", str(tmp_path / "s.npy")], input="a\nb\n", text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    # Another process: fp32 CPU GEMMs there agree to ~1e-7 usually, but now and then (~1 process in 30 on
    # the 2-core dev VM) one computes a fixed variant 2.6e-5 away; 1e-4 still catches a wrong prompt/task.
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), engines["nano"].embed(["a", "b"]), atol=1e-4)


def test_cli_errors(nano_ckpt, tmp_path, capsys):
    assert main(["embed", "--model", nano_ckpt, "--task", "nope", "x", "--output", str(tmp_path / "o.npy")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["embed", "--model", nano_ckpt, "--output", str(tmp_path / "o.npy")]) == 2  # no texts
    assert "give either TEXT arguments or --input" in capsys.readouterr().err
    assert main(["embed", "--model", nano_ckpt, "x", "--output", str(tmp_path / "o.csv")]) == 2
    assert "--output must end in .npy or .jsonl" in capsys.readouterr().err
    assert main(["embed", "--model", str(tmp_path / "missing"), "x", "--output", str(tmp_path / "o.npy")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_input_lines_split_on_newline_only(engines, nano_ckpt, tmp_path):
    """Form feed, U+0085, U+2028, \\x1c-\\x1e and a lone \\r sit inside a line; CRLF ends one."""
    texts = ["page one\x0cpage two", "next\x85line", "para\u2028graph", "fs\x1cgs\x1drs\x1e", "lone\rcr", "", "last"]
    inp = tmp_path / "in.txt"
    inp.write_bytes(("\r\n".join(texts[:3]) + "\n" + "\n".join(texts[3:]) + "\n").encode("utf-8"))
    out = tmp_path / "o.jsonl"
    assert main(["embed", "--model", nano_ckpt, "--device", "cpu", "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), engines["nano"].embed(texts), atol=1e-6)
    from jv5fast.cli.inputs import split_lines
    assert split_lines("a\nb") == split_lines("a\nb\n") == split_lines("a\r\nb\r\n") == ["a", "b"]
    assert split_lines("") == [] and split_lines("\n") == [""] and split_lines("a\r\r\n") == ["a\r"]


def test_cli_words_leave_paths_and_file_fields_alone():
    from jv5fast.cli.messages import cli_words
    assert cli_words("truncate_dim=0 is out of range; pass overwrite=True") == \
        "--truncate-dim 0 is out of range; pass --overwrite"
    assert cli_words("max_length must be a positive int") == "--max-length must be a positive int"
    msg = "/data/max_length/x/jv5fast_onnx.json: field 'truncate_dim' is 0"
    assert cli_words(msg) == msg


def test_input_bom_and_deep_json_and_atomic_output(engines, nano_ckpt, tmp_path, capsys, monkeypatch):
    inp = tmp_path / "bom.txt"
    inp.write_bytes("\ufefffirst\nsecond\n".encode("utf-8"))
    out = tmp_path / "o.npy"
    assert main(["embed", "--model", nano_ckpt, "--device", "cpu", "--input", str(inp), "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), engines["nano"].embed(["first", "second"]), atol=1e-6)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('"ok"\n' + "[" * 100000 + "\n", encoding="utf-8")
    assert main(["embed", "--model", nano_ckpt, "--input", str(deep), "--output", str(out)]) == 2
    assert "deep.jsonl line 2" in capsys.readouterr().err
    # a write that fails part-way leaves the previous output as it was, and no temporary file
    before = out.read_bytes()

    def boom(f, *a, **k):  # half a file, then a full disk
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", boom)
    assert main(["embed", "--model", nano_ckpt, "x", "--output", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bom.txt", "deep.jsonl", "o.npy"]
    # a symlinked output replaces the file it points to, and an existing file keeps its mode
    real = tmp_path / "real.npy"
    real.write_bytes(b"old")
    real.chmod(0o600)
    link = tmp_path / "link.npy"
    link.symlink_to(real)
    monkeypatch.undo()
    assert main(["embed", "--model", nano_ckpt, "--device", "cpu", "x", "--output", str(link)]) == 0
    assert link.is_symlink() and np.load(real).shape == (1, 64)
    assert real.stat().st_mode & 0o777 == 0o600


def test_help_shows_zero_defaults():
    import argparse

    from jv5fast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = sub.format_help()
    assert "(default: 0)" in " ".join(text.split())  # --seed, --warmup-steps, --save-every


def test_embed_without_output_writes_json_lines_to_stdout(engines, nano_ckpt):
    """Through the real entry point: stdout holds only the JSON Lines (progress bar, warnings and the summary
    go to stderr); binary rows are lists of ints."""
    texts = [f"text number {i} " * (i % 4) for i in range(70)]  # > 64 texts: the progress bar shows
    base = [sys.executable, "-m", "jv5fast", "embed", "--model", nano_ckpt, "--device", "cpu", "--input", "-",
            "--max-batch-tokens", "64", "--max-length", "100000"]  # a warning (max_length) on stderr too
    proc = subprocess.run(base + ["--precision", "binary"], input="\n".join(texts) + "\n", text=True,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(70)) and "-> stdout" in proc.stderr
    assert all(isinstance(v, int) for r in rows for v in r["embedding"])
    np.testing.assert_array_equal(np.array([r["embedding"] for r in rows]),
                                  engines["nano"].embed(texts, precision="binary"))
    assert "max_length" in proc.stderr and "embed: 100%" in proc.stderr  # the warning and the bar: on stderr


def test_embed_output_is_never_the_input(nano_ckpt, tmp_path, capsys):
    import os
    inp = tmp_path / "texts.jsonl"
    inp.write_text('"a"\n"b"\n', encoding="utf-8")
    os.link(inp, tmp_path / "same.jsonl")
    for out in (inp, tmp_path / "same.jsonl", tmp_path / "." / "texts.jsonl"):
        capsys.readouterr()
        assert main(["embed", "--model", nano_ckpt, "--input", str(inp), "--output", str(out)]) == 2
        assert f"--output {out} is the --input file" in capsys.readouterr().err
    assert inp.read_text(encoding="utf-8") == '"a"\n"b"\n'


def test_closed_stdout_stops_quietly_with_141(nano_ckpt):
    """`jv5fast embed ... | head -1`: the reader goes away; no '[Errno 32] Broken pipe', no 'Exception
    ignored' at exit, status 141 (128 + SIGPIPE, what the shell reports for cat or grep there)."""
    texts = "".join(f"text {i}\n" for i in range(400))  # ~300 KB of JSON Lines: far past a pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "jv5fast", "embed", "--model", nano_ckpt, "--device", "cpu",
                             "--input", "-", "--no-progress"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(texts.encode())
    proc.stdin.close()
    first = proc.stdout.readline()
    proc.stdout.close()  # like head -1
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert json.loads(first)["index"] == 0
    assert "Broken pipe" not in err and "Exception ignored" not in err and "Traceback" not in err, err


LONG = " ".join(f"word{i} embedding vector search" for i in range(20))  # ~100 tokens: several 16-token windows


def test_embed_overflow_chunk_equals_engine_embed(nano_ckpt, tmp_path):
    """--overflow chunk [--chunk-overlap N] is Engine.embed(overflow="chunk", chunk_overlap=N): long texts in
    windows, short ones as they are, with a prompt, a Matryoshka dim and a binary precision on top."""
    import jv5fast
    eng = jv5fast.Engine(nano_ckpt, device="cpu", max_length=16)
    texts = [LONG, "short", LONG[:120]]
    base = ["embed", "--model", nano_ckpt, "--device", "cpu", "--max-length", "16", "--no-progress", *texts]
    for flags, kw in ((["--overflow", "chunk"], {}),
                      (["--overflow", "chunk", "--chunk-overlap", "5", "--prompt-name", "query", "--truncate-dim",
                        "32"], dict(chunk_overlap=5, prompt_name="query", truncate_dim=32)),
                      (["--overflow", "chunk", "--precision", "ubinary"], dict(precision="ubinary"))):
        out = tmp_path / "o.npy"
        assert main([*base, *flags, "--output", str(out)]) == 0, flags
        want = eng.embed(texts, overflow="chunk", **kw)
        got = np.load(out)
        if got.dtype == np.uint8:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-6)
        # the windows matter: truncation gives another vector for the long text, the same for the short one
        cut = eng.embed(texts, **{k: v for k, v in kw.items() if k != "chunk_overlap"})
        assert not np.array_equal(got[0], cut[0]) and np.array_equal(got[1] != 0, cut[1] != 0), flags
    assert main([*base, "--overflow", "truncate", "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), eng.embed(texts), atol=1e-6)


def test_embed_overflow_flag_errors(nano_ckpt, tmp_path, capsys):
    base = ["embed", "--model", nano_ckpt, "--device", "cpu", "--max-length", "16", "--no-progress", LONG, "--output",
            str(tmp_path / "o.npy")]
    cases = [
        (["--overflow", "error"], "more than --max-length 16; pass --overflow truncate to cut it, or --overflow "
                                  "chunk to embed it whole in windows"),
        (["--no-truncate"], "more than --max-length 16; leave out --no-truncate to cut it, or use --overflow chunk"),
        (["--no-truncate", "--overflow", "chunk"], "--no-truncate means --overflow error; it conflicts with "
                                                   "--overflow chunk"),
        (["--no-truncate", "--overflow", "truncate"], "conflicts with --overflow truncate"),
        (["--chunk-overlap", "2"], "--chunk-overlap applies to --overflow chunk; overflow is truncate"),
        (["--overflow", "error", "--chunk-overlap", "0"], "--chunk-overlap applies to --overflow chunk"),
        (["--overflow", "chunk", "--chunk-overlap", "-1"], "--chunk-overlap: expected an integer >= 0, got '-1'"),
        (["--overflow", "chunk", "--no-normalize"], "leave out --no-normalize"),
        (["--overflow", "chunk", "--chunk-overlap", "99"], "--chunk-overlap 99 must be in 0..12"),
        (["--overflow", "chop"], "invalid choice: 'chop'"),
    ]
    for flags, needle in cases:
        capsys.readouterr()
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err, (flags, err)
    assert not (tmp_path / "o.npy").exists()
    assert main([*base, "--no-truncate", "--overflow", "error"]) == 2  # the same thing said twice is fine
    assert "leave out --no-truncate to cut it" in capsys.readouterr().err
