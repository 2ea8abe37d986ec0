"""Command line: ``jv5fast embed --model PATH_OR_ID [options] (TEXT... | --input FILE|-) --output OUT.npy|OUT.jsonl``
``jv5fast export-onnx --model PATH_OR_ID --out DIR [--task ..] [--dtype ..] [--quantize int8] ...`` and
``jv5fast train --stage STAGE --student DIR --output DIR --data FILE.jsonl [--teacher DIR | --teacher-embeddings DIR]``.

Same semantics as ``Engine.embed``. ``--input`` reads one text per line, split on newlines only (one
trailing carriage return is dropped; form feeds, U+2028 and the like stay inside the text). A .jsonl
file may instead hold one JSON string, or an object with a "text" field, per line. ``.npy`` output holds the (N, D')
array; ``.jsonl`` one {"index", "embedding"} object per text, in input order.
"""
from __future__ import annotations

import argparse
import json
import sys

from .postprocess import PRECISIONS


def split_lines(text: str) -> list:
    """One text per input line: split on "\n" only (str.splitlines also breaks on form feed, U+0085,
    U+2028, \x1c-\x1e, which may sit inside a text), drop one trailing "\r" per line (CRLF files), and
    let a final newline end the last line rather than start an empty one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_texts(path: str):
    # Bytes, decoded here: text mode's universal newlines would also split on a lone "\r".
    if path == "-":
        raw = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    lines = split_lines(raw.decode("utf-8"))
    if path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if isinstance(obj, dict):
                if "text" not in obj:
                    raise SystemExit(f"error: {path} line {n}: object without a 'text' field")
                obj = obj["text"]
            if not isinstance(obj, str):
                raise SystemExit(f"error: {path} line {n}: expected a string, got {type(obj).__name__}")
            texts.append(obj)
        return texts
    return lines


def _write(out: str, emb):
    import numpy as np
    if out.endswith(".npy"):
        np.save(out, emb)
    elif out.endswith(".jsonl"):
        with open(out, "w", encoding="utf-8") as f:
            for i, row in enumerate(emb):
                f.write(json.dumps({"index": i, "embedding": row.tolist()}) + "\n")
    else:
        raise SystemExit(f"error: --output must end in .npy or .jsonl, got {out!r}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="jv5fast", description="jina-embeddings-v5-text engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="embed texts with a checkpoint folder or hub id")
    e.add_argument("--model", required=True, help="checkpoint folder (released layout) or hub id")
    e.add_argument("--task", default=None, help="adapter: retrieval, text-matching, clustering, classification")
    e.add_argument("--prompt-name", default=None, help="query or document (default: document)")
    e.add_argument("--prompt", default=None, help="a literal prefix instead of a named prompt")
    e.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension")
    e.add_argument("--precision", default="float32", choices=PRECISIONS)
    e.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    e.add_argument("--no-truncate", action="store_true", help="error on texts longer than max length")
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    e.add_argument("--input", default=None, help="file with one text per line, or - for stdin")
    e.add_argument("--output", required=True, help="OUT.npy or OUT.jsonl")
    e.add_argument("texts", nargs="*", help="texts to embed (or use --input)")
    e.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="onnx: --model is a folder written by export-onnx")
    x = sub.add_parser("export-onnx", help="export a checkpoint + one task adapter to ONNX")
    x.add_argument("--model", required=True, help="checkpoint folder (released layout) or hub id")
    x.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    x.add_argument("--task", default="retrieval")
    x.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    x.add_argument("--opset", type=int, default=None)
    x.add_argument("--truncate-dim", type=int, default=None, help="dimension of the sentence_embedding output")
    x.add_argument("--quantize", default=None, choices=("int8",), help="also write model_int8.onnx")
    x.add_argument("--external-data", action="store_true", help="force model.onnx_data (auto above 2 GB)")
    x.add_argument("--overwrite", action="store_true")
    _add_train_parser(sub)
    a = p.parse_args(argv)
    if a.cmd == "export-onnx":
        return _export(a)
    if a.cmd == "train":
        return _train(a)

    if bool(a.texts) == bool(a.input):
        p.error("give either TEXT arguments or --input FILE (not both, not neither)")
    if not (a.output.endswith(".npy") or a.output.endswith(".jsonl")):
        p.error(f"--output must end in .npy or .jsonl, got {a.output!r}")
    texts = a.texts if a.texts else _read_texts(a.input)

    from .engine import Engine
    try:
        kw = {} if a.task is None else {"task": a.task}
        eng = Engine(a.model, device=a.device, dtype=a.dtype, max_length=a.max_length, backend=a.backend, **kw)
        emb = eng.embed(texts, prompt_name=a.prompt_name, prompt=a.prompt, truncate_dim=a.truncate_dim,
                        precision=a.precision, normalize=not a.no_normalize, truncate=not a.no_truncate)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write(a.output, emb)
    print(f"embedded {len(texts)} texts -> {a.output} {tuple(emb.shape)} {emb.dtype}", file=sys.stderr)
    return 0


def _add_train_parser(sub):
    """``jv5fast train``: one flag per TrainConfig field (--stage, --student, --output, --steps, ...)."""
    import dataclasses

    from .train.trainer import TrainConfig
    t = sub.add_parser("train", help="stage 1 distillation or a stage 2 task adapter (see TrainConfig)")
    t.add_argument("--data", required=True, help="JSONL: {query, document[, negatives, score]} or {text, label}")
    t.add_argument("--teacher", default=None, help="a jv5fast checkpoint used as the teacher (Engine.embed)")
    t.add_argument("--teacher-embeddings", default=None,
                   help="folder with query.npy and document.npy aligned with --data (memory-mapped)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if isinstance(default, bool) or f.name in ("resume",):
            t.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default,
                           metavar="BOOL")
        elif isinstance(default, tuple):
            cast = int if f.name == "matryoshka_dims" else str
            t.add_argument(flag, type=lambda v, c=cast: tuple(c(x) for x in v.split(",") if x), default=default,
                           metavar="A,B,...")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            t.add_argument(flag, type=type(default), default=default)
        elif f.name in ("rope_theta",):
            t.add_argument(flag, type=float, default=default)
        elif f.name in ("average_from_step",):
            t.add_argument(flag, type=int, default=default)
        else:
            t.add_argument(flag, default=default, required=required)


def _train(a):
    import dataclasses

    import numpy as np

    from .train.trainer import TrainConfig, Trainer
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    try:
        cfg = TrainConfig(**{k: getattr(a, k) for k in fields if getattr(a, k) is not None or k == "rope_theta"})
        with open(a.data, encoding="utf-8") as f:
            examples = [json.loads(line) for line in f if line.strip()]
        teacher = embeddings = None
        if a.teacher_embeddings:
            embeddings = {s: np.load(f"{a.teacher_embeddings}/{s}.npy", mmap_mode="r") for s in ("query", "document")}
        elif a.teacher:
            from .engine import Engine
            eng = Engine(a.teacher)

            def teacher(texts):
                return eng.embed(texts, prompt="")
        Trainer(cfg, examples, teacher=teacher, teacher_embeddings=embeddings).train()
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"trained {cfg.stage} -> {cfg.output}", file=sys.stderr)
    return 0


def _export(a):
    from .onnx_export import export_onnx
    try:
        meta = export_onnx(a.model, a.out, task=a.task, dtype=a.dtype, opset=a.opset, truncate_dim=a.truncate_dim,
                           quantize=a.quantize, external_data=True if a.external_data else None,
                           overwrite=a.overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {meta['model_type']} task={meta['task']} dtype={meta['dtype']} -> {a.out}", file=sys.stderr)
    if "int8" in meta:
        q = meta["int8"]
        print(f"int8: mean cosine to float {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f}), "
              f"top-10 overlap {q['top10_overlap']:.3f} on {q['texts']} texts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
