"""The real `jv5fast` entry point, in subprocesses: every mistake a user can make is one clear line on
stderr, in CLI words, a non-zero exit (2 for usage errors) and never a traceback."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

EXE = shutil.which("jv5fast") or os.path.join(os.path.dirname(sys.executable), "jv5fast")


def run(*args, stdin=None, env=None, exe=None):
    cmd = (exe or [EXE]) + [str(a) for a in args]
    full_env = dict(os.environ)
    for key, value in (env or {}).items():  # PYTHONPATH entries go in front of the caller's
        full_env[key] = value + os.pathsep + full_env[key] if key == "PYTHONPATH" and full_env.get(key) else value
    full_env.pop("JV5FAST_DEBUG", None)
    p = subprocess.run(cmd, input=stdin, capture_output=True, env=full_env, timeout=300)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def run_many(cases):
    """Run independent (args, kwargs) cases concurrently: each one pays the interpreter + torch import."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: run(*c[0], **c[1]), cases))


def check(result, code, *needles):
    rc, out, err = result
    assert "Traceback" not in err and "Traceback" not in out, err
    assert rc == code, (rc, err)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith(" ")]
    if code:
        assert len(lines) == 1, err  # one line (argparse adds its usage lines above it)
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def files(tmp_path_factory, nano_ckpt):
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "ok.txt").write_text("a\nb\n", encoding="utf-8")
    (d / "latin1.txt").write_bytes("fine\nalso fine\ncaf\xe9\n".encode("latin-1"))
    (d / "bad.jsonl").write_text('"one"\n{"text": "two"\n', encoding="utf-8")
    (d / "notext.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (d / "a_folder").mkdir()
    (d / "model.safetensors").write_bytes(b"not a folder")
    fake_export = d / "fake-export"
    fake_export.mkdir()
    (fake_export / "jv5fast_onnx.json").write_text(json.dumps({"format": "jv5fast-onnx", "dtype": "float32",
                                                               "max_length": 64, "task": "retrieval"}))
    for name in ("config.json", "tokenizer.json", "config_sentence_transformers.json"):
        shutil.copy(os.path.join(nano_ckpt, name), fake_export / name)
    # an onnxruntime that is not installed, for the extra's message
    noort = d / "no_onnxruntime" / "onnxruntime"
    noort.mkdir(parents=True)
    (noort / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", "
                                       "name='onnxruntime')\n")
    return d


def test_usage_and_input_errors(nano_ckpt, files, tmp_path):
    d, out = files, tmp_path / "o.npy"
    emb = ["embed", "--model", nano_ckpt, "--output", out]
    cases = [
        ((), {}),
        (("--version",), {}),
        (("--version",), dict(exe=[sys.executable, "-m", "jv5fast"])),
        ((*emb, "--input", d / "missing.txt"), {}),
        ((*emb, "--input", d / "a_folder"), {}),
        ((*emb, "--input", d / "latin1.txt"), {}),
        ((*emb, "--input", d / "bad.jsonl"), {}),
        ((*emb, "--input", d / "notext.jsonl"), {}),
        ((*emb, "x", "--device", "cuda:99"), {}),  # missing on any machine
        (("embed", "--model", d / "missing-model", "--output", d / "no" / "such" / "o.npy", "x"), {}),
        (("embed", "--model", d / "model.safetensors", "--output", out, "x"), {}),
        (("embed", "--model", d / "fake-export", "--output", out, "x"), {}),
        (("embed", "--model", nano_ckpt, "--backend", "onnx", "--output", out, "x"), {}),
        (("embed", "--model", d / "fake-export", "--backend", "onnx", "--output", out, "x"),
         dict(env={"PYTHONPATH": str(d / "no_onnxruntime")})),
        ((*emb, "x", "--task", "retreival"), {}),
        ((*emb, "x" * 200, "--max-length", "8", "--no-truncate"), {}),
        ((*emb, "x", "--quantize", "int8", "--dtype", "bfloat16"), {}),
        (("embed", "--model", nano_ckpt, "--output", out), {}),
        ((*emb, "x", "--truncate-dim", "999"), {}),
        (("train", "--stage", "retrieval"), {}),
        (("embed", "--help"), {}),
        ((*emb, "x" * 200, "--max-length", "8", "--overflow", "error"), {}),
        ((*emb, "x", "--no-truncate", "--overflow", "chunk"), {}),
        ((*emb, "x", "--overflow", "chunk", "--chunk-overlap", "-3"), {}),
    ]
    r = run_many(cases)
    rc, stdout, _ = r[0]
    assert rc == 0 and "usage: jv5fast" in stdout and "embed" in stdout and "train" in stdout
    from jv5fast import __version__
    assert r[1][0] == 0 and r[1][1].strip() == f"jv5fast {__version__}"
    assert r[2][0] == 0 and r[2][1].strip() == f"jv5fast {__version__}"
    check(r[3], 2, "--input file not found", "missing.txt")
    check(r[4], 2, "is a folder; give a file")
    check(r[5], 2, "line 3 is not valid UTF-8")
    check(r[6], 2, "bad.jsonl line 2: not valid JSON")
    check(r[7], 2, "notext.jsonl line 1: object without a 'text' field")
    check(r[8], 2, "--device 'cuda:99'")
    assert "needs CUDA" in r[8][2] and "use --device cpu" in r[8][2] or "does not exist" in r[8][2]
    check(r[9], 2, "folder", "does not exist")  # the output is checked before the model is even looked at
    check(r[10], 2, "--model must be a checkpoint folder or a hub id, got a file")
    check(r[11], 2, "is an ONNX export; add --backend onnx")
    check(r[12], 2, "is not an ONNX export", "drop --backend onnx")
    check(r[13], 2, 'pip install "jv5fast[onnx]"')
    check(r[14], 2, "unknown task 'retreival'; valid tasks: ['retrieval'")
    check(r[15], 2, "more than --max-length 8", "leave out --no-truncate to cut it")
    check(r[16], 2, "--quantize int8 quantizes the float32 model; drop --dtype bfloat16")
    check(r[17], 2, "give either TEXT arguments or --input")
    check(r[18], 2, "--truncate-dim 999 is out of range 1..64")
    check(r[19], 2, "the following arguments are required: --data")
    assert r[20][0] == 0 and "(default: torch)" in r[20][1] and "{float32,float16,binary,ubinary}" in r[20][1]
    assert "--overflow {truncate,error,chunk}" in r[20][1]
    check(r[21], 2, "more than --max-length 8", "pass --overflow truncate to cut it, or --overflow chunk")
    check(r[22], 2, "--no-truncate means --overflow error; it conflicts with --overflow chunk")
    check(r[23], 2, "argument --chunk-overlap: expected an integer >= 0, got '-3'")


def test_every_flag_has_help_and_choices_are_listed():
    import argparse

    from jv5fast.cli import build_parser
    from jv5fast.config import TASKS
    from jv5fast.train.trainer import STAGES as TRAIN_STAGES
    assert TRAIN_STAGES == ("distill",) + TASKS
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"embed", "index", "search", "embed-corpus", "export-onnx", "train", "serve",
                         "make-checkpoint", "info"}
    from jv5fast.distributed import cli as corpus_cli  # python -m jv5fast.distributed.cli: the same command
    from jv5fast.postprocess import PRECISIONS
    assert corpus_cli.TASKS == TASKS and corpus_cli.PRECISIONS == PRECISIONS
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
    stage = next(a for a in subs["train"]._actions if "--stage" in a.option_strings)
    assert tuple(stage.choices) == TRAIN_STAGES
    for name in ("embed", "export-onnx", "index"):
        task = next(a for a in subs[name]._actions if "--task" in a.option_strings)
        assert all(t in task.help for t in ("retrieval", "text-matching", "clustering", "classification"))


def _pairs(n=12):
    rng = np.random.default_rng(0)
    w = "light speed vacuum cat dog tree river mountain city music code".split()
    return [{"query": " ".join(rng.choice(w, 3)), "document": " ".join(rng.choice(w, 6))} for _ in range(n)]


def test_train_errors_and_resume(ckpt_factory, files, tmp_path, capsys):
    student = str(tmp_path / "student")
    shutil.copytree(ckpt_factory("nano", seed=61, tasks=()), student)
    data = tmp_path / "pairs.jsonl"
    ex = _pairs()
    data.write_text("\n".join(json.dumps(e) for e in ex) + "\n", encoding="utf-8")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    rng = np.random.default_rng(1)
    np.save(teacher / "query.npy", rng.standard_normal((len(ex), 24)).astype(np.float32))
    np.save(teacher / "document.npy", rng.standard_normal((len(ex), 24)).astype(np.float32))
    teacher16 = tmp_path / "teacher16"
    teacher16.mkdir()
    np.save(teacher16 / "query.npy", rng.standard_normal((len(ex), 16)).astype(np.float32))
    np.save(teacher16 / "document.npy", rng.standard_normal((len(ex), 16)).astype(np.float32))
    (tmp_path / "nodoc.jsonl").write_text('{"query": "a", "document": "b"}\n{"query": "c"}\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"query": "a", "document": "b"}\n{"query": \n', encoding="utf-8")
    out = tmp_path / "out"
    base = ["train", "--stage", "retrieval", "--student", student, "--data", data, "--batch-size", "4",
            "--lora-r", "2", "--teacher-embeddings", teacher]
    r = run_many([
        ((*base, "--output", out, "--gather-negatives", "maybe"), {}),
        ((*base, "--output", out, "--teacher", student), {}),
        ((*base[:5], "--data", tmp_path / "nodoc.jsonl", "--output", out, "--teacher-embeddings", teacher), {}),
        ((*base[:5], "--data", tmp_path / "broken.jsonl", "--output", out, "--teacher-embeddings", teacher), {}),
        ((*base, "--output", out, "--matryoshka-dims", "32,999", "--steps", "1"), {}),
        ((*base, "--output", tmp_path / "no" / "such" / "out"), {}),
        ((*base[:-1], tmp_path / "empty-teacher", "--output", out), {}),
        ((*base, "--output", out, "--device", "cuda:99"), {}),
    ])
    check(r[0], 2, "argument --gather-negatives: 'maybe' is not a boolean")
    check(r[1], 2, "not allowed with argument")
    check(r[2], 2, "nodoc.jsonl line 2: missing key(s) ['document']; stage 'retrieval' expects")
    check(r[3], 2, "broken.jsonl line 2: not valid JSON")
    check(r[4], 2, "--matryoshka-dims [999] out of range", "1..63")
    check(r[5], 2, "does not exist")
    check(r[6], 2, "must hold query.npy and document.npy; missing: query.npy, document.npy")
    check(r[7], 2, "--device 'cuda:99'")
    assert not out.exists()  # nothing was started

    # --learn-temperature parses false (it used to crash for every value), then resumes are spoken aloud.
    # In-process (the same main() the entry point calls): these runs train, and a process each costs more.
    from jv5fast.cli import main

    def inproc(*args):
        rc = main([str(x) for x in args])
        return rc, "", capsys.readouterr().err

    check(inproc(*base, "--output", out, "--steps", "2", "--learn-temperature", "false"), 0, "trained retrieval")
    check(inproc(*base, "--output", out, "--steps", "2", "--learn-temperature", "false"), 0,
          "nothing to train", "already reached step 2 of 2", "--no-resume")
    check(inproc(*base, "--output", out, "--steps", "3", "--learn-temperature", "false", "--lr", "0.001"), 2,
          "lr: 0.0001 -> 0.001", "--no-resume")
    check(inproc(*base, "--output", out, "--steps", "3", "--learn-temperature", "false"), 0,
          "resuming from step 2 of 3", "trained retrieval")
    check(inproc(*base, "--output", out, "--steps", "1", "--lr", "0.001", "--no-resume"), 0, "trained retrieval")
    assert "resuming" not in inproc(*base, "--output", out, "--steps", "1", "--resume", "no")[2]
    # a teacher whose dimension differs from the projection the first run saved, through the real entry point
    check(run(*base[:-1], teacher16, "--output", tmp_path / "out2", "--student", out, "--steps", "1"), 2,
          "projection.safetensors maps 64 student dims to 24 teacher dims, but this teacher gives 16")


def test_serve_errors_fail_before_binding(nano_ckpt, files, tmp_path):
    """`jv5fast serve` refuses bad flags and a missing model folder at once (exit 2, one line), before it
    binds a port or loads anything."""
    s = ("serve", "--model", nano_ckpt, "--port", "0")
    r = run_many([
        (("serve", "--model", tmp_path / "no-such-model", "--port", "0"), {}),
        ((*s[:3], "--port", "70000"), {}),
        ((*s, "--max-wait-ms", "-1"), {}),
        ((*s, "--max-inputs", "0"), {}),
        ((*s, "--max-queue-tokens", "many"), {}),
        ((*s, "--quantize", "int8", "--device", "cuda"), {}),
        ((*s, "--backend", "onnx"), {}),
        ((*s, "--resident-tasks", "maybe"), {}),
        ((*s, "--device", "tpu"), {}),
        ((*s, "--num-cpus-per-replica", "0.5"), {}),
        ((*s, "--min-replicas", "3", "--max-replicas", "2"), {}),
    ])
    check(r[0], 2, "no-such-model", "no such folder")
    check(r[1], 2, "--port", "70000")
    check(r[2], 2, "--max-wait-ms", "-1")
    check(r[3], 2, "--max-inputs", "'0'")
    check(r[4], 2, "--max-queue-tokens", "many")
    check(r[5], 2, "--quantize int8 runs on the CPU", "drop --device cuda")
    check(r[6], 2, "not an ONNX export")
    check(r[7], 2, "--resident-tasks", "auto")
    check(r[8], 2, "tpu")
    check(r[9], 2, "--num-cpus-per-replica shapes Ray Serve replicas: it needs --replicas")
    check(r[10], 2, "--min-replicas 3 is over --max-replicas 2")
