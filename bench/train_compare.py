"""jv5fast's stage-2 retrieval step against transformers + PEFT LoRA with the losses written out naively.

Both sides start from the same state — the checkpoint's base weights, the same LoRA A (B = 0), the same ψ
projection and temperature — and see the same batches (the trainer's own sampler), so their loss curves
must agree step for step; the comparison also times one optimizer step of each (tokens/s).

The peer is what a user would write without jv5fast: transformers' ``EuroBertModel`` / ``Qwen3Model``
wrapped by ``peft.get_peft_model`` (LoRA on q/k/v/o/gate/up/down, no dropout), right-padded batches, the
last real token pooled and normalized, InfoNCE as a cross-entropy over the (B, B) score matrix, GOR over the
(B, B) Gram matrices, L_distill as 1 − cosine through ψ, AdamW, the trainer's schedule and clipping, and
bf16 autocast on CUDA as the trainer uses. Used by ``bench/gpu_check.py --only=train`` (full-size nano on
a GPU) and by tests/train/test_train_compare.py (a tiny checkpoint on CPU, fp32).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

WORDS = ["the", "model", "embedding", "vector", "search", "query", "document", "token", "fast", "kernel",
         "attention", "layer", "retrieval", "text", "data", "index", "graph", "memory", "speed", "sequence",
         "Berlin", "2024", "über", "naïve", "résumé", "GPU", "12.5%", "x", "of", "and"]


def make_examples(n, teacher_dim=32, q_words=(4, 16), d_words=(20, 120), seed=0):
    """n synthetic (query, document) pairs and aligned random teacher embeddings (unit rows)."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))
    examples = [{"query": text(*q_words), "document": text(*d_words)} for _ in range(n)]
    teach = {}
    for side in ("query", "document"):
        t = rng.standard_normal((n, teacher_dim)).astype(np.float32)
        teach[side] = t / np.linalg.norm(t, axis=1, keepdims=True)
    return examples, teach


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeftRetrievalStep:
    """The naive peer, initialised from a ``jv5fast.train.Trainer`` so both start from the same state."""

    def __init__(self, trainer):
        import peft

        from jv5fast.testing import reference_model
        c = trainer.config
        self.trainer, self.config, self.device = trainer, c, trainer.device
        base = reference_model(c.student, task=None, dtype=torch.float32, device=self.device)
        lcfg = peft.LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets),
                               lora_dropout=0.0, bias="none", init_lora_weights="gaussian")
        self.model = peft.get_peft_model(base, lcfg)
        self._copy_lora(trainer.model)
        self.projection = torch.nn.Linear(*reversed(trainer.model.projection.weight.shape)).to(self.device)
        self.projection.load_state_dict(trainer.model.projection.state_dict())
        self.log_tau = torch.nn.Parameter(trainer.log_tau.detach().clone(), requires_grad=trainer.log_tau.requires_grad)
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad]
        if len(lora) != sum(1 for _ in trainer.model.lora.parameters()):
            raise RuntimeError(f"PEFT made {len(lora)} LoRA tensors, jv5fast {len(trainer.model.lora)}")
        self.params = lora + list(self.projection.parameters()) + ([self.log_tau] if self.log_tau.requires_grad else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, trainer._lr_factor)
        self.step = 0

    def _copy_lora(self, tm):
        """jv5fast's ``{layer}_{target}_{A|B}`` (A (r, in), B (out, r)) into PEFT's lora_A / lora_B."""
        seen = 0
        for name, module in self.model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            parts = name.split(".")
            i, target = int(parts[parts.index("layers") + 1]), parts[-1]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(tm.lora[f"{i}_{target}_A"])
                module.lora_B["default"].weight.copy_(tm.lora[f"{i}_{target}_B"])
            seen += 1
        if 2 * seen != len(tm.lora):
            raise RuntimeError(f"copied {seen} LoRA pairs into PEFT, jv5fast has {len(tm.lora) // 2}")

    def _embed(self, ids):
        """Right-padded batch, last real token, L2-normalized: (B, E) fp32."""
        S = max(len(s) for s in ids)
        x = torch.zeros(len(ids), S, dtype=torch.long)
        mask = torch.zeros(len(ids), S, dtype=torch.long)
        for r, s in enumerate(ids):
            x[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        x, mask = x.to(self.device), mask.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            hs = self.model(input_ids=x, attention_mask=mask).last_hidden_state
        last = hs[torch.arange(len(ids), device=self.device), mask.sum(1) - 1].float()
        return F.normalize(last, dim=-1)

    def loss(self, step):
        """The retrieval loss of the trainer's batch for ``step``: λ_nce·InfoNCE + λ_distill·distill + λ_gor·GOR."""
        c, tr = self.config, self.trainer
        idx, _ = tr._indices(step, 0)
        ex = [tr.examples[i] for i in idx]
        queries, docs = [e["query"] for e in ex], [e["document"] for e in ex]
        ids, _ = tr.tokenizer.encode(["Query: " + t for t in queries] + ["Document: " + t for t in docs])
        e = self._embed(ids)
        B = len(idx)
        q, d = e[:B], e[B:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            proj = self.projection(e)
        teacher = torch.cat([tr._teach(idx, "query", queries), tr._teach(idx, "document", docs)])
        distill = (1 - F.cosine_similarity(proj.float(), teacher, dim=1)).mean()
        tau = self.log_tau.exp().clamp(0.01, 1.0)
        nce = F.cross_entropy(q @ d.T / tau, torch.arange(B, device=self.device))
        off = ~torch.eye(B, dtype=torch.bool, device=self.device)
        gor = sum(((x @ x.T)[off] ** 2).mean() for x in (q, d))
        total = c.lambda_nce * nce + c.lambda_distill * distill + c.lambda_gor * gor
        return total, sum(len(s) for s in ids)

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss, tokens = self.loss(self.step)
        loss.backward()
        value = loss.item()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return value, tokens


def compare(student, *, steps=5, batch_size=8, n_examples=64, device=None, lr=1e-3, seed=0, time_steps=True):
    """Train ``steps`` retrieval steps on each side from the same start. Returns a dict: the two loss
    curves, the largest relative difference between them, and tokens/s per side (median over the steps
    after the first, which compiles/warms up)."""
    from jv5fast.train.trainer import TrainConfig, Trainer
    examples, teach = make_examples(n_examples, seed=seed)
    with tempfile.TemporaryDirectory(prefix="jv5fast-train-compare-") as out:
        cfg = TrainConfig(stage="retrieval", student=student, output=out, steps=steps, batch_size=batch_size,
                          lr=lr, warmup_steps=0, seed=seed, device=device, resume=False, log_every=0)
        trainer = Trainer(cfg, examples, teacher_embeddings=teach)
        peer = PeftRetrievalStep(trainer)   # built before the trainer steps: the same starting state
        dev = trainer.device
        ours, theirs, t_ours, t_theirs = [], [], [], []
        for _ in range(steps):
            _sync(dev)
            t0 = time.perf_counter()
            trainer.train(progress=False, until=trainer.step + 1)
            _sync(dev)
            rec = trainer.history[-1]
            t_ours.append((rec.get("tokens_per_s", 0.0), time.perf_counter() - t0))
            ours.append(rec["loss"])
            t0 = time.perf_counter()
            value, tokens = peer.train_step()
            _sync(dev)
            t_theirs.append(tokens / (time.perf_counter() - t0))
            theirs.append(value)
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    later = slice(1, None) if steps > 1 else slice(None)
    return {"jv5fast_loss": ours, "peft_loss": theirs, "max_rel_diff": rel,
            "jv5fast_tokens_per_s": statistics.median(t for t, _ in t_ours[later]),
            "peft_tokens_per_s": statistics.median(t_theirs[later]),
            "device": str(dev), "steps": steps, "batch_size": batch_size}


def ratio(result) -> float:
    p = result["peft_tokens_per_s"]
    return result["jv5fast_tokens_per_s"] / p if p else math.nan
