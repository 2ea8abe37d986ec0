"""``jv5fast export-onnx --model PATH_OR_ID --output DIR [--task ..] [--dtype ..] [--quantize int8] ...``.

A self-contained ONNX folder (graph, tokenizer, jv5fast_onnx.json) that ``--backend onnx`` and
onnxruntime users can run; the work is ``jv5fast.onnx_export.export_onnx`` (needs jv5fast[onnx], imported
only when the command runs). With ``--quantize int8`` the int8 graph's agreement with the float one is
printed once, as one line.
"""
from __future__ import annotations

import sys

from .args import HelpWithDefaults, add_task
from .checks import check_model
from .messages import count


def register(sub):
    x = sub.add_parser("export-onnx", help="export a checkpoint + one task adapter to ONNX",
                       formatter_class=HelpWithDefaults,
                       description="Write a self-contained ONNX folder (needs jv5fast[onnx]).")
    x.add_argument("--model", required=True, help="checkpoint folder (released layout) or hub id")
    x.add_argument("--output", "--out", dest="output", required=True, help="output folder; must not exist, unless "
                   "--overwrite and it is a previous jv5fast export (--out is the older name)")
    add_task(x)
    x.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="graph dtype")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14)")
    x.add_argument("--truncate-dim", type=int, default=None, help="dimension of the sentence_embedding output, "
                   "served by default by --backend onnx (default: the model's dimension)")
    x.add_argument("--quantize", default=None, choices=("int8",), help="also write model_int8.onnx")
    x.add_argument("--external-data", action="store_true", help="force model.onnx_data (automatic above 2 GB)")
    x.add_argument("--overwrite", action="store_true", help="replace --output if it is a previous jv5fast export")


def run(a):
    import warnings

    from ..onnx_export import export_onnx
    check_model(a.model, "--model")
    with warnings.catch_warnings():  # the int8 quality report is printed once, below
        warnings.filterwarnings("ignore", message="int8 ONNX model quality")
        meta = export_onnx(a.model, a.output, task=a.task, dtype=a.dtype, opset=a.opset, truncate_dim=a.truncate_dim,
                           quantize=a.quantize, external_data=True if a.external_data else None,
                           overwrite=a.overwrite)
    print(f"exported {meta['model_type']} task={meta['task']} dtype={meta['dtype']} -> {a.output}", file=sys.stderr)
    if "int8" in meta:
        q = meta["int8"]
        print(f"int8: mean cosine to float {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f}), "
              f"top-10 overlap {q['top10_overlap']:.3f} on {count(q['texts'], 'text')}", file=sys.stderr)
    return 0
