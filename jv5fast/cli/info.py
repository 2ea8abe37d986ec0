"""``jv5fast info --model PATH_OR_ID [--json]``: load a model as ``embed`` would and print
``Engine.describe()``: device, dtype, the ISA of the C++ kernels, the forward path and, on the CPU, which
GEMM runs each projection shape and the timings that chose it (jv5fast/cpu_tuning.py).
"""
from __future__ import annotations

import json

from .args import HelpWithDefaults, add_engine_flags
from .checks import check_cpu_precision, check_device, check_model, check_quantize, quantize_kw


def register(sub):
    i = sub.add_parser("info", help="load a model and say what runs where (device, ISA, each GEMM and why)",
                       formatter_class=HelpWithDefaults, description="Load --model as `embed` would and print "
                       "Engine.describe(): device, dtype, the ISA of jv5fast's C++ kernels, the forward path and, "
                       "on the CPU, which GEMM runs each projection shape and the timings that chose it.")
    i.add_argument("--model", required=True, help="checkpoint folder (released layout), hub id, or ONNX export")
    add_engine_flags(i, backend_help="engine backend", quantize_help="as in embed")
    i.add_argument("--json", action="store_true", help="print the description as one JSON object")


def run(a):
    check_quantize(a)
    check_cpu_precision(a)
    check_model(a.model, "--model", a.backend)
    check_device(a.device)
    from ..cpu_tuning import format_description
    from ..engine import Engine
    eng = Engine(a.model, device=a.device, dtype=a.dtype, backend=a.backend, **quantize_kw(a))
    desc = eng.describe()
    if a.json:
        print(json.dumps({"model": eng.path, "family": eng.args.family, "dim": eng.dim, "task": eng.task, **desc}))
    else:
        print(f"{eng.path}: {eng.args.family}, {eng.dim}-d, task {eng.task}\n{format_description(desc)}")
    return 0
