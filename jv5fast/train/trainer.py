"""``TrainConfig`` and ``Trainer``: stage 1 (embedding distillation) and stage 2 (one LoRA task adapter).

Losses per model-spec §9 (weights configurable): distill = L_distill over queries and documents through
ψ; retrieval = L_NCE (learnable τ) + 2·L_distill + 1·GOR; text-matching = CoSENT(τ′) on scored pairs,
else L_NCE + 2·L_distill; clustering = L_distill with the teacher's topic instruction; classification =
bidirectional L_NCE over 1 positive + 7 different-label negatives per anchor + 20·relational KD against
the adapter-less model. Batches are sampled from a generator seeded by (seed, step), so a resumed run
draws exactly the batches an uninterrupted one would. Optimizer AdamW, linear warmup then cosine or
linear decay, gradient clipping, bf16 autocast on CUDA, DDP under torchrun with every rank's documents
gathered as extra negatives. Just over 500 lines and one file on purpose: ``TrainConfig``, the example checks
and the data fingerprint are the inputs the ``Trainer`` checks at start and compares on resume, kept beside it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from ..batching import PackedBatch
from ..config import TASKS, load_model_args
from ..devices import check_device
from ..loading import LORA_TARGETS
from ..tokenizer import Tokenizer
from . import losses
from .model import TrainModel

STAGES = ("distill",) + TASKS  # stage 1, then one stage-2 adapter per released task
TEACHER_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
CLUSTERING_PROMPT = "Instruct: Identify the topic or theme of the given document:\nQuery:"


@dataclass(frozen=True)
class TrainConfig:
    stage: str                          # "distill" (stage 1) or a task name (stage 2 adapter)
    student: str                        # checkpoint folder in the released layout
    output: str                         # where the result (and trainer_state.pt) goes
    steps: int = 100
    batch_size: int = 16                # pairs (or anchors) per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"            # "cosine" | "linear" decay after warmup
    max_grad_norm: float = 1.0
    max_length: int = 512
    rope_theta: float | None = None     # per-phase training theta (model-spec §9.4); None = config's
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_targets: tuple = LORA_TARGETS
    temperature: float = 0.02
    learn_temperature: bool | None = None  # default: only for retrieval (model-spec §11 #13)
    cosent_tau: float = 0.05
    lambda_nce: float = 1.0
    lambda_distill: float = 2.0
    lambda_gor: float = 1.0             # 0 disables GOR (the Table 6 ablation)
    lambda_rkd: float = 20.0
    n_negatives: int = 7                # classification: different-label negatives per anchor
    matryoshka_dims: tuple = ()         # project choice (§11 #9): contrastive losses summed over these dims
    teacher_query_prompt: str = TEACHER_QUERY_PROMPT
    teacher_document_prompt: str = ""
    average_from_step: int | None = None  # average the adapter of this step with the final one (§11 #17)
    gather_negatives: bool = True       # under DDP, other ranks' documents join each query's candidates (§11 #14)
    save_every: int = 0
    resume: bool = True
    seed: int = 0
    device: str | None = None
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage/task {self.stage!r}; choose one of {list(STAGES)}")
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stage != "distill" and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive for a task adapter, got {self.lora_r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule {self.schedule!r} is not valid; choose 'cosine' or 'linear'")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        if self.temperature <= 0 or self.cosent_tau <= 0:
            raise ValueError("temperature and cosent_tau must be positive")
        if not os.path.isdir(self.student):
            raise FileNotFoundError(f"student checkpoint folder not found: {self.student!r}")


# Settings a resumed run may change: they do not shape the updates already made.
RESUMABLE_CHANGES = ("steps", "output", "resume", "save_every", "log_every", "device")


def example_error(ex, stage: str):
    """What is wrong with one training example for ``stage`` (None when it is fine): the keys and types
    each stage expects, named, so the CLI can point at the file line."""
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    if stage == "classification":
        need, want = ("text", "label"), "{text, label}"
    else:
        need, want = ("query", "document"), "{query, document} (+ negatives, score)"
    missing = [k for k in need if k not in ex]
    if missing:
        return f"missing key(s) {missing}; stage {stage!r} expects objects with {want}, got keys {sorted(ex)}"
    for k in need:
        if k != "label" and not isinstance(ex[k], str):
            return f"{k!r} must be a string, got {type(ex[k]).__name__}"
    if stage == "classification" and (isinstance(ex["label"], bool) or not isinstance(ex["label"], (str, int))):
        return f"'label' must be a string or an integer, got {type(ex['label']).__name__}"
    negs = ex.get("negatives")
    if negs is not None and (not isinstance(negs, list) or not all(isinstance(n, str) for n in negs)):
        return "'negatives' must be a list of strings"
    score = ex.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)):
        return f"'score' must be a finite number, got {score!r}"
    return None


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-30), (a == b).all(1))))


def examples_fingerprint(examples) -> str:
    """A hash of the training data, stored with the trainer state: a resumed run must see the same data."""
    import hashlib
    import json
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


class Trainer:
    """``Trainer(config, examples, teacher=None, teacher_embeddings=None).train()``.

    examples: a list of dicts — {"query", "document"} pairs (+ optional "negatives": [str], "score": float)
    for distill / retrieval / text-matching / clustering; {"text", "label"} for classification.
    teacher: a callable ``teacher(texts) -> (n, m) array`` (it receives the teacher prompts prepended), or
    teacher_embeddings: {"query": (N, m), "document": (N, m)} arrays aligned with ``examples`` (np.load
    with mmap_mode="r" amortizes a big teacher).
    """

    def __init__(self, config: TrainConfig, examples, teacher=None, teacher_embeddings=None):
        c = self.config = config
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("no training examples")
        for i, ex in enumerate(self.examples):
            err = example_error(ex, c.stage)
            if err:
                raise ValueError(f"examples[{i}]: {err}")
        self.needs_teacher = c.stage in ("distill", "retrieval", "clustering") or (
            c.stage == "text-matching" and "score" not in self.examples[0])
        if self.needs_teacher and teacher is None and teacher_embeddings is None:
            raise ValueError(f"stage {c.stage!r} needs a teacher: pass teacher= (callable) or teacher_embeddings=")
        from ..engine import Engine
        if isinstance(teacher, Engine):  # any Engine: raw texts in (the trainer adds the teacher prompts)
            engine = teacher

            def teacher(texts):
                return engine.embed(texts, prompt="")
        if teacher_embeddings is not None:
            for side in ("query", "document"):
                if side not in teacher_embeddings or len(teacher_embeddings[side]) != len(self.examples):
                    got = len(teacher_embeddings[side]) if side in teacher_embeddings else "missing"
                    raise ValueError(f"teacher_embeddings[{side!r}] must have one row per example "
                                     f"({len(self.examples)}), got {got}")
        self.teacher, self.teacher_embeddings = teacher, teacher_embeddings
        if c.stage == "classification":
            self._by_label = {}
            for i, ex in enumerate(self.examples):
                self._by_label.setdefault(ex["label"], []).append(i)
            if len(self._by_label) < 2:
                raise ValueError("classification needs examples of at least two labels")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        dev = str(check_device(c.device, "device")) if c.device else ("cuda" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
            if dev == "cuda":
                dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(dev)
        torch.manual_seed(c.seed)
        dim = load_model_args(c.student).hidden_size
        bad = [d for d in c.matryoshka_dims if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < dim]
        if bad:
            raise ValueError(f"matryoshka_dims {bad} out of range: each must be an int in 1..{dim - 1} "
                             f"(the student's dimension is {dim})")
        self._teacher_probe = self._teacher_fingerprint() if self.needs_teacher else None
        teacher_dim = self._teacher_probe.shape[1] if self.needs_teacher else None
        self.model = TrainModel(c.student, lora_r=0 if c.stage == "distill" else c.lora_r, lora_alpha=c.lora_alpha,
                                lora_targets=c.lora_targets, train_backbone=c.stage == "distill",
                                teacher_dim=teacher_dim, rope_theta=c.rope_theta, device=self.device, seed=c.seed)
        if teacher_dim:
            self.model.load_projection(c.student)  # ψ from stage 1 is reused in stage 2
        learn_t = c.learn_temperature if c.learn_temperature is not None else c.stage == "retrieval"
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(c.temperature), device=self.device),
                                          requires_grad=learn_t)
        self.tokenizer = Tokenizer(c.student, c.max_length)
        params = [p for p in self.model.parameters() if p.requires_grad] + ([self.log_tau] if learn_t else [])
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.history = []
        self._avg_snapshot = None
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # ψ is applied outside forward and is unused in some stages; let DDP tolerate that
            self.ddp = DistributedDataParallel(self.model, find_unused_parameters=True)
        self.state_path = os.path.join(c.output, f"trainer_state_{c.stage}.pt")  # one per stage/task
        self._data_hash = examples_fingerprint(self.examples)
        self.resumed_from = None  # the step a resumed run continued from
        if c.resume and os.path.exists(self.state_path):
            self.load_state(self.state_path)
            self.resumed_from = self.step

    # ---- schedule, state -----------------------------------------------------------------------------
    def _lr_factor(self, step):
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        frac = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) if c.schedule == "cosine" else max(0.0, 1 - frac)

    def _trainable_state(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {names[id(p)]: p.detach().clone() for p in self.params if id(p) in names}
        out["log_tau"] = self.log_tau.detach().clone()
        return out

    def save_state(self, path=None):
        path = path or self.state_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"step": self.step, "params": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "config": asdict(self.config),
                    "data": self._data_hash, "teacher": self._teacher_probe, "avg_snapshot": self._avg_snapshot,
                    "history": self.history},
                   path + ".tmp")
        os.replace(path + ".tmp", path)

    def load_state(self, path):
        st = torch.load(path, map_location=self.device, weights_only=False)
        if st["config"]["stage"] != self.config.stage:
            raise ValueError(f"{path} holds a {st['config']['stage']!r} run, not {self.config.stage!r}")
        self._check_resumable(path, st)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in st["params"].items():
                (self.log_tau if name == "log_tau" else params[name]).copy_(value)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        # the learning rate follows this run's schedule (a resumed run may extend ``steps``)
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * self._lr_factor(self.scheduler.last_epoch)
        self.step, self._avg_snapshot, self.history = st["step"], st["avg_snapshot"], st["history"]

    def _check_resumable(self, path, st):
        """Refuse to continue a run whose settings (other than RESUMABLE_CHANGES) or data differ: the
        result would belong to neither run."""
        now, then = asdict(self.config), st["config"]
        def same(k):
            a, b = now.get(k), then.get(k)
            if k == "student":
                return os.path.realpath(str(a)) == os.path.realpath(str(b))
            return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)
        diff = [k for k in sorted(set(now) | set(then)) if k not in RESUMABLE_CHANGES and not same(k)]
        changes = [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in diff]
        if st.get("data") is not None and st["data"] != self._data_hash:
            changes.append("the training data differs")
        a, b = st.get("teacher"), self._teacher_probe
        if "teacher" in st and not (a is None and b is None or a is not None and b is not None and
                                    a.shape == b.shape and _min_cosine(a, b) >= 0.99):
            changes.append("the teacher differs")
        if changes:
            raise ValueError(f"{path} is a run with other settings ({'; '.join(changes)}); resuming it would mix "
                             f"two runs. Pass resume=False to start over, or use another output")

    # ---- data ----------------------------------------------------------------------------------------
    def _check_teacher_embeddings(self):
        """Precomputed teacher rows: 2-D float arrays of one width (> 0) on both sides; a few rows are
        checked finite here (every batch is checked again when it is read)."""
        widths = {}
        for side in ("query", "document"):
            a = self.teacher_embeddings[side]
            shape, kind = getattr(a, "shape", None), getattr(getattr(a, "dtype", None), "kind", None)
            if shape is None or len(shape) != 2 or kind != "f" or shape[1] == 0:
                raise ValueError(f"teacher_embeddings[{side!r}] must be a 2-D float array (examples, dim > 0), got "
                                 f"shape {shape} dtype {getattr(a, 'dtype', type(a).__name__)}")
            widths[side] = shape[1]
        if widths["query"] != widths["document"]:
            raise ValueError(f"teacher_embeddings have {widths['query']} query dims but {widths['document']} "
                             f"document dims; both sides must come from the same teacher")

    def _teacher_fingerprint(self) -> np.ndarray:
        """A few teacher vectors that identify it: precomputed rows (first, middle, last of each side) or the
        callable's answer to fixed probes. Its width is the teacher's dimension; on resume the rows are
        compared by cosine (a teacher's output differs in the last bits between devices and dtypes)."""
        if self.teacher_embeddings is not None:
            self._check_teacher_embeddings()
            rows = sorted({0, len(self.examples) // 2, len(self.examples) - 1})
            out = np.concatenate([np.asarray(self.teacher_embeddings[s][rows], dtype=np.float32)
                                  for s in ("query", "document")])
        else:
            out = np.asarray(self.teacher(["probe", "jv5fast teacher fingerprint"]), dtype=np.float32)
            if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] == 0:
                raise ValueError(f"the teacher must return one vector per text, (n, dim); for 2 texts it returned "
                                 f"shape {out.shape}")
        if not np.isfinite(out).all():
            raise ValueError("the teacher's embeddings contain NaN or inf")
        return out

    def _teach(self, idx, side, texts):
        if self.teacher_embeddings is not None:
            arr = np.asarray(self.teacher_embeddings[side][np.asarray(idx)], dtype=np.float32)
        else:
            c = self.config
            prompt = c.teacher_query_prompt if side == "query" else c.teacher_document_prompt
            if self.config.stage == "clustering":
                prompt = c.extra.get("clustering_prompt", CLUSTERING_PROMPT)
            arr = np.asarray(self.teacher([prompt + t for t in texts]), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    def _embed(self, groups, use_lora=True, grad=True):
        """Embed [(prefix, texts), ...] in ONE packed forward pass (one DDP call per micro-step); returns the
        per-group embeddings, the per-group ψ projections (or Nones) and the token count."""
        texts = [prefix + t for prefix, group in groups for t in group]
        ids, _ = self.tokenizer.encode(texts)
        batch = PackedBatch.from_ids(ids, self.device)
        model = self.ddp if (self.ddp is not None and grad) else self.model  # DDP synchronizes the gradients
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            e, proj = model(batch, use_lora=use_lora)
        sizes = [len(g) for _, g in groups]
        es = torch.split(e.float(), sizes)
        ps = torch.split(proj.float(), sizes) if proj is not None else [None] * len(sizes)
        return es, ps, batch.num_tokens

    def _indices(self, step, micro):
        rng = np.random.default_rng([self.config.seed, step, micro])
        idx = rng.choice(len(self.examples), size=min(self.config.batch_size * self.world, len(self.examples)),
                         replace=False)
        return idx[self.rank::self.world].tolist(), rng

    # ---- losses --------------------------------------------------------------------------------------
    def _tau(self):
        return self.log_tau.exp().clamp(0.01, 1.0)

    def _nested(self, fn, *xs):
        """fn on the full embeddings, plus (Matryoshka option) on each truncated, renormalized size."""
        total = fn(*xs)
        for d in self.config.matryoshka_dims:
            total = total + fn(*[torch.nn.functional.normalize(x[..., :d], dim=-1) for x in xs])
        return total / (1 + len(self.config.matryoshka_dims))

    def _loss(self, step, micro):
        c = self.config
        idx, rng = self._indices(step, micro)
        ex = [self.examples[i] for i in idx]
        if c.stage == "classification":
            return self._classification_loss(idx, rng)
        queries, docs = [e["query"] for e in ex], [e["document"] for e in ex]
        qp = "Document: " if c.stage in ("clustering", "text-matching") else "Query: "
        groups = [(qp, queries), ("Document: ", docs)]
        if c.stage == "retrieval" and ex[0].get("negatives"):
            groups.append(("Document: ", [n for e in ex for n in e["negatives"]]))
        es, ps, tokens = self._embed(groups)
        q, d = es[0], es[1]
        negs = es[2] if len(es) > 2 else None
        parts = {}
        if c.stage == "text-matching" and "score" in ex[0]:
            scores = torch.tensor([e["score"] for e in ex], dtype=torch.float32, device=self.device)
            parts["cosent"] = self._nested(lambda a, b: losses.cosent_loss(a, b, scores, tau=c.cosent_tau), q, d)
            return sum(parts.values()), parts, tokens
        if self.needs_teacher:
            tq, td = self._teach(idx, "query", queries), self._teach(idx, "document", docs)
            parts["distill"] = losses.distill_loss(torch.cat([ps[0], ps[1]]), torch.cat([tq, td]))
            if c.stage in ("distill", "clustering"):
                return parts["distill"], parts, tokens
            parts["distill"] = c.lambda_distill * parts["distill"]
        if self.world > 1 and c.gather_negatives:
            others = self._gather_others(torch.cat([d] + ([negs] if negs is not None else [])))
            negs = others if negs is None else torch.cat([negs, others])
        parts["nce"] = c.lambda_nce * self._nested(
            lambda a, b, *n: losses.info_nce_loss(a, b, temperature=self._tau(), hard_negatives=n[0] if n else None),
            q, d, *([negs] if negs is not None else []))
        if c.stage == "retrieval" and c.lambda_gor:
            parts["gor"] = c.lambda_gor * losses.gor_loss(q, d)
        return sum(parts.values()), parts, tokens

    def _gather_others(self, local):
        """Every other rank's ``local`` rows (differentiable all_gather), to join as shared negatives."""
        import torch.distributed.nn.functional as dist_f
        everything = dist_f.all_gather(local.contiguous())
        return torch.cat([t for r, t in enumerate(everything) if r != self.rank])

    def _classification_loss(self, idx, rng):
        c = self.config
        labels = list(self._by_label)
        anchors, positives, negatives = [], [], []
        for i in idx:
            lab = self.examples[i]["label"]
            same = [j for j in self._by_label[lab] if j != i] or [i]
            positives.append(self.examples[int(rng.choice(same))]["text"])
            anchors.append(self.examples[i]["text"])
            others = [lb for lb in labels if lb != lab]
            for _ in range(c.n_negatives):
                pool = self._by_label[others[int(rng.integers(len(others)))]]
                negatives.append(self.examples[int(rng.choice(pool))]["text"])
        texts = anchors + positives + negatives
        (emb,), _, tokens = self._embed([("Document: ", texts)])
        B = len(anchors)
        a, p, n = emb[:B], emb[B:2 * B], emb[2 * B:]
        if self.world > 1 and c.gather_negatives:
            n = torch.cat([n, self._gather_others(torch.cat([p, n]))])
        parts = {"nce": losses.bidirectional_info_nce_loss(a, p, temperature=self._tau(), hard_negatives=n)}
        with torch.no_grad():  # the "teacher" is the same backbone with the adapter switched off
            (teacher,), _, _ = self._embed([("Document: ", texts)], use_lora=False, grad=False)
        parts["rkd"] = c.lambda_rkd * losses.relational_kd_loss(emb, teacher)
        return sum(parts.values()), parts, tokens

    # ---- loop ----------------------------------------------------------------------------------------
    def train(self, progress=None, until=None):
        """Run until ``config.steps`` (or stop early at step ``until``, saving the state as an interrupted
        run would); returns the loss history (one dict per step)."""
        c = self.config
        stop = c.steps if until is None else min(until, c.steps)
        show = progress if progress is not None else self.rank == 0
        bar = None
        if show:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.stage}", unit="step")
        while self.step < stop:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            total, tokens, logged = 0.0, 0, {}
            for micro in range(c.grad_accum):
                loss, parts, n_tok = self._loss(self.step, micro)
                (loss / c.grad_accum).backward()
                total += loss.item() / c.grad_accum
                tokens += n_tok
                for k, v in parts.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / c.grad_accum
            if self.world > 1 and self.log_tau.grad is not None:  # τ lives outside the DDP module
                torch.distributed.all_reduce(self.log_tau.grad)
                self.log_tau.grad /= self.world
            if c.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            rec = {"step": self.step, "loss": total, **logged, "tau": float(self._tau().detach()),
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            self.history.append(rec)
            if c.average_from_step is not None and self.step == c.average_from_step:
                self._avg_snapshot = self._trainable_state()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if c.save_every and self.step % c.save_every == 0 and self.rank == 0:
                self.save_state()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            self.save_state()
            if self.step >= c.steps:
                self.finish()
        return self.history

    def finish(self):
        """Write the result: stage 1 → the student checkpoint (+ ψ); stage 2 → adapters/<task>/ (+ ψ)."""
        c, m = self.config, self.model
        if self._avg_snapshot is not None:  # uniform average of the snapshot and the final weights
            params = dict(m.named_parameters())
            with torch.no_grad():
                for name, value in self._avg_snapshot.items():
                    if name in params:
                        params[name].mul_(0.5).add_(value, alpha=0.5)
        os.makedirs(c.output, exist_ok=True)
        if c.stage == "distill":
            m.save_backbone(c.output)
        else:
            if os.path.abspath(c.output) != os.path.abspath(c.student):
                for name in os.listdir(c.student):
                    src, dst = os.path.join(c.student, name), os.path.join(c.output, name)
                    if name.startswith("trainer_state_") or os.path.exists(dst):
                        continue
                    # a copy cut short (disk full) never passes for done; the staging folder is created here
                    # (exclusively), so a failure removes only what this run wrote
                    stage = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=c.output)
                    try:
                        tmp = os.path.join(stage, name)
                        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, tmp)
                        os.replace(tmp, dst)
                    finally:
                        shutil.rmtree(stage, ignore_errors=True)
            m.save_adapter(c.output, c.stage)
        m.save_projection(c.output)
