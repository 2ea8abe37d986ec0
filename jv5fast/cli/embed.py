"""``jv5fast embed --model PATH_OR_ID [options] (TEXT... | --input FILE|-) [--output OUT.npy|OUT.jsonl]``.

Same semantics as ``Engine.embed``. ``--input`` is read by its extension (jv5fast/cli/inputs.py). ``.npy``
output holds the (N, D') array; ``.jsonl`` one {"index", "embedding"} object per text, in input order;
without ``--output`` the same JSON Lines go to stdout (progress and messages stay on stderr). The output is
written beside its target and renamed over it, so a failure never destroys an existing file, and the
``--input`` file is refused as ``--output``.
"""
from __future__ import annotations

import json
import os
import sys

from ..overflow import OVERFLOW
from .args import (MODEL_HELP, HelpWithDefaults, add_engine_flags, add_format, add_no_progress, add_precision,
                   add_task, nonneg_int)
from .checks import (check_cpu_precision, check_device, check_model, check_output_file, check_quantize,
                     quantize_kw, same_file)
from .inputs import input_format, read_texts
from .messages import CLIError, count, too_long_fix


def register(sub):
    e = sub.add_parser("embed", help="embed texts with a checkpoint folder, hub id or ONNX export",
                       formatter_class=HelpWithDefaults, description="Embed texts (arguments or --input) into a "
                       ".npy or .jsonl file. Blank input lines are empty texts, so row i is line i.")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    add_task(e)
    e.add_argument("--prompt-name", default=None, help="named prompt from the model: query or document "
                   "(default: the model's default, document)")
    e.add_argument("--prompt", default=None, help="a literal prefix instead of a named prompt ('' for none)")
    e.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension (default: the model's "
                   "dimension, or an ONNX export's truncate dim)")
    add_precision(e)
    e.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    e.add_argument("--no-truncate", action="store_true", help="error on texts longer than --max-length "
                   "instead of cutting them (the same as --overflow error)")
    e.add_argument("--overflow", choices=OVERFLOW, default=None, help="a text longer than --max-length: cut it "
                   "(truncate, the default), refuse it (error), or embed it whole in windows of --max-length "
                   "tokens, prompt included, whose unit vectors are averaged by token count (chunk)")
    e.add_argument("--chunk-overlap", type=nonneg_int, default=None, help="with --overflow chunk: tokens "
                   "shared by neighbouring windows (default: 0; less than a window)")
    e.add_argument("--max-length", type=int, default=None, help="tokens per text, prompt included (default: "
                   "the model's max_position_embeddings)")
    e.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one packed forward pass")
    add_engine_flags(e, backend_help="onnx: --model is a folder written by export-onnx (needs jv5fast[onnx])",
                     quantize_help="int8 on the CPU: the checkpoint's int8 ONNX export, built on first use and "
                     "cached ($JV5FAST_CACHE); with --backend onnx the export's model_int8.onnx")
    e.add_argument("--input", default=None, help="texts to embed, read by extension: .txt one per line, .jsonl "
                   "a JSON string or {\"text\": ...} per line, .json an array of them, .parquet a text column "
                   "(needs jv5fast[parquet]); - for stdin (.txt unless --format)")
    add_format(e)
    e.add_argument("--text-column", default=None, help="the field (.jsonl, .json objects) or Parquet column "
                   "holding each text (default: text)")
    e.add_argument("--output", default=None, help="OUT.npy or OUT.jsonl (its folder must exist; default: JSON "
                   "Lines on stdout)")
    add_no_progress(e)
    e.add_argument("texts", nargs="*", help="texts to embed (or use --input)")


def run(a):
    if bool(a.texts) == bool(a.input):
        raise CLIError("give either TEXT arguments or --input FILE (not both, not neither)")
    given = [flag for flag, v in (("--format", a.format), ("--text-column", a.text_column)) if v is not None]
    if given and not a.input:
        raise CLIError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --input; TEXT "
                       f"arguments are embedded as they are")
    fmt = input_format(a.input, a.format) if a.input else None
    if a.text_column is not None and fmt == "txt":
        raise CLIError(f"--text-column applies to jsonl, json and parquet input; --input {a.input} is read as txt "
                       f"(one text per line): pass --format, or leave out --text-column")
    check_quantize(a)
    check_cpu_precision(a)
    overflow = _overflow(a)
    if a.output is not None:
        check_output_file(a.output, "--output", (".npy", ".jsonl"))
        if a.input not in (None, "-") and same_file(a.output, a.input):
            raise CLIError(f"--output {a.output} is the --input file {a.input}; writing the embeddings there "
                           f"would replace the texts: give another --output")
    check_model(a.model, "--model", a.backend)
    check_device(a.device)
    texts = a.texts if a.texts else read_texts(a.input, fmt, a.text_column or "text")

    from ..engine import Engine
    kw = {} if a.task is None else {"task": a.task}
    eng = Engine(a.model, device=a.device, dtype=a.dtype, max_length=a.max_length, backend=a.backend,
                 max_batch_tokens=a.max_batch_tokens, **quantize_kw(a), **kw)
    try:
        emb = eng.embed(texts, prompt_name=a.prompt_name, prompt=a.prompt, truncate_dim=a.truncate_dim,
                        precision=a.precision, normalize=not a.no_normalize, overflow=overflow,
                        chunk_overlap=a.chunk_overlap or 0, show_progress_bar=False if a.no_progress else None)
    except ValueError as err:  # a text over --max-length: say which of the flags refused it
        raise ValueError(too_long_fix(str(err), "--no-truncate" if a.no_truncate else "--overflow error")) from None
    if a.output is None:  # JSON Lines on stdout; everything else (progress, warnings) is on stderr
        out = sys.stdout
        for i, row in enumerate(emb):
            out.write(json.dumps({"index": i, "embedding": row.tolist()}) + "\n")
        out.flush()
    else:
        _write(a.output, emb)
    print(f"embedded {count(len(texts), 'text')} -> {a.output or 'stdout'} {tuple(emb.shape)} {emb.dtype}",
          file=sys.stderr)
    return 0


def _overflow(a) -> str:
    """The overflow policy from --overflow, --no-truncate (its older spelling of 'error') and --chunk-overlap,
    refusing the combinations that contradict each other."""
    if a.no_truncate and a.overflow not in (None, "error"):
        raise CLIError(f"--no-truncate means --overflow error; it conflicts with --overflow {a.overflow}: give one")
    overflow = "error" if a.no_truncate else a.overflow or "truncate"
    if a.chunk_overlap is not None and overflow != "chunk":
        raise CLIError(f"--chunk-overlap applies to --overflow chunk; overflow is {overflow}")
    if overflow == "chunk" and a.no_normalize:
        raise CLIError("--overflow chunk averages the windows' unit vectors, so there is no unnormalized vector of a "
                       "long text: leave out --no-normalize, or use --overflow truncate")
    return overflow


def _write(out: str, emb):
    """Write to a temporary file beside the target, then rename over it: a failure part-way never destroys
    an existing file. A symlink's target is what gets replaced; an existing file keeps its mode."""
    import tempfile

    import numpy as np
    target = os.path.realpath(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".jv5fast-output-")
    except OSError as e:
        raise CLIError(f"cannot write --output {out}: {e.strerror or e}", code=1) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if out.endswith(".npy"):
                np.save(f, emb)
            else:
                for i, row in enumerate(emb):
                    f.write((json.dumps({"index": i, "embedding": row.tolist()}) + "\n").encode("utf-8"))
        if os.path.exists(target):
            mode = os.stat(target).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CLIError(f"cannot write --output {out}: {e.strerror or e}", code=1) from None
        raise
