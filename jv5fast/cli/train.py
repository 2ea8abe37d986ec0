"""``jv5fast train --stage STAGE --student DIR --output DIR --data FILE.jsonl [--teacher DIR |
--teacher-embeddings DIR]``.

Stage 1 distillation or one stage 2 task adapter. The flags are generated from ``TrainConfig``, one per
field (style habit 7: CLI flags map one-to-one onto the frozen config), so a new field is a new flag with
no edit here beyond its help line. Every example of ``--data`` is checked before training starts; a rerun
with the same ``--output`` resumes from its trainer state, and says so.
"""
from __future__ import annotations

import os
import sys

from .args import DEVICE_HELP, HelpWithDefaults, int_list, parse_bool, str_list
from .checks import check_device, check_model
from .inputs import json_line, read_lines
from .messages import CLIError, count

_HELPS = {
    "stage": "distill (stage 1) or the task adapter to train (stage 2)",
    "student": "student checkpoint folder (released layout)",
    "output": "where the result and trainer_state_<stage>.pt go",
    "steps": "optimizer steps (a resumed run may raise it)", "batch_size": "pairs (or anchors) per micro-batch",
    "grad_accum": "micro-batches per step", "lr": "peak learning rate", "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warmup steps", "schedule": "decay after warmup", "max_grad_norm": "gradient clip",
    "max_length": "tokens per text", "rope_theta": "training RoPE theta (default: the config's)",
    "lora_r": "LoRA rank (stage 2)", "lora_alpha": "LoRA alpha", "lora_targets": "projections with LoRA",
    "temperature": "InfoNCE temperature", "learn_temperature": "learn the temperature (default: retrieval only)",
    "cosent_tau": "CoSENT temperature", "lambda_nce": "InfoNCE weight", "lambda_distill": "distillation weight",
    "lambda_gor": "GOR weight (0 disables)", "lambda_rkd": "relational KD weight (classification)",
    "n_negatives": "different-label negatives per anchor (classification)",
    "matryoshka_dims": "also apply the contrastive losses at these truncated dims (each < the model dim)",
    "teacher_query_prompt": "prefix for teacher queries", "teacher_document_prompt": "prefix for teacher documents",
    "average_from_step": "average the adapter of this step with the final one",
    "gather_negatives": "under torchrun, other ranks' documents join the negatives",
    "save_every": "save the trainer state every N steps (0: at the end only)",
    "resume": "resume from OUTPUT/trainer_state_<stage>.pt when it exists", "seed": "random seed",
    "device": DEVICE_HELP, "log_every": "steps between log lines",
}


def register(sub):
    """``jv5fast train``: one flag per TrainConfig field (--stage, --student, --output, --steps, ...)."""
    import dataclasses

    from ..train.trainer import STAGES, TrainConfig
    t = sub.add_parser("train", help="stage 1 distillation or a stage 2 task adapter", formatter_class=HelpWithDefaults,
                       description="Train a student (stage distill) or one task adapter (stage = task). A rerun "
                       "with the same --output resumes from its trainer_state_<stage>.pt.")
    t.add_argument("--data", required=True, help="JSONL: {query, document[, negatives, score]} per line, or "
                   "{text, label} for classification")
    teach = t.add_mutually_exclusive_group()
    teach.add_argument("--teacher", default=None, help="a jv5fast checkpoint used as the teacher")
    teach.add_argument("--teacher-embeddings", default=None,
                       help="folder with query.npy and document.npy aligned with --data (memory-mapped)")
    choices = {"stage": STAGES, "schedule": ("cosine", "linear")}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw = dict(default=default, help=_HELPS.get(f.name, f.name.replace("_", " ")))
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if isinstance(default, bool) or f.name == "learn_temperature":
            t.add_argument(flag, type=parse_bool, metavar="BOOL", **kw)
        elif isinstance(default, tuple):
            t.add_argument(flag, type=int_list if f.name == "matryoshka_dims" else str_list, metavar="A,B,...", **kw)
        elif isinstance(default, (int, float)):
            t.add_argument(flag, type=type(default), **kw)
        elif f.name == "rope_theta":
            t.add_argument(flag, type=float, **kw)
        elif f.name == "average_from_step":
            t.add_argument(flag, type=int, **kw)
        else:
            t.add_argument(flag, required=required, **kw)
    t.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="start over even if OUTPUT holds a trainer state (same as --resume false)")


def _read_examples(path: str, stage: str) -> list:
    """Every example of ``--data``, each checked for what ``stage`` needs; a bad one is named by line."""
    from ..train.trainer import example_error
    name, lines = read_lines(path, "--data")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ex = json_line(name, n, line)
        err = example_error(ex, stage)
        if err:
            raise CLIError(f"{name} line {n}: {err}")
        out.append(ex)
    if not out:
        raise CLIError(f"{name} holds no training examples")
    return out


def run(a):
    import dataclasses

    from ..train.trainer import TrainConfig, Trainer
    check_model(a.student, "--student")
    if a.teacher:
        check_model(a.teacher, "--teacher")
    check_device(a.device)
    out_parent = os.path.dirname(os.path.abspath(a.output))
    if os.path.isfile(a.output):
        raise CLIError(f"--output {a.output} is a file; give a folder")
    if not os.path.isdir(out_parent):
        raise CLIError(f"--output {a.output}: folder {out_parent} does not exist")
    examples = _read_examples(a.data, a.stage)
    embeddings = teacher = None
    if a.teacher_embeddings:
        import numpy as np
        files = {s: os.path.join(a.teacher_embeddings, f"{s}.npy") for s in ("query", "document")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise CLIError(f"--teacher-embeddings {a.teacher_embeddings} must hold query.npy and document.npy; "
                           f"missing: {', '.join(os.path.basename(m) for m in missing)}")
        embeddings = {s: np.load(f, mmap_mode="r") for s, f in files.items()}
    elif a.teacher:
        from ..engine import Engine
        eng = Engine(a.teacher, device=a.device)

        def teacher(texts):
            return eng.embed(texts, prompt="")
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    cfg = TrainConfig(**{k: getattr(a, k) for k in fields if getattr(a, k) is not None or k == "rope_theta"})
    trainer = Trainer(cfg, examples, teacher=teacher, teacher_embeddings=embeddings)
    if trainer.resumed_from is not None:
        if trainer.resumed_from >= cfg.steps:  # train() still writes the result, in case it never was
            print(f"nothing to train: {trainer.state_path} already reached step {trainer.resumed_from} of "
                  f"{cfg.steps}; writing its result again (raise --steps to continue, or --no-resume to train "
                  f"again)", file=sys.stderr)
        else:
            print(f"resuming from step {trainer.resumed_from} of {cfg.steps} ({trainer.state_path})",
                  file=sys.stderr)
    trainer.train()
    print(f"trained {cfg.stage} ({count(cfg.steps, 'step')}) -> {cfg.output}", file=sys.stderr)
    return 0
