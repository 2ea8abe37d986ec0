"""The trainable student: the engine's backbone with fp32 master weights, optional LoRA, and ψ.

Training runs the same code path as inference (``Backbone.hidden_states`` over packed batches, every
op through ``jv5fast.ops``: Triton autograd Functions on CUDA, differentiable references on CPU); only
the fused projections gain a LoRA term, y = x Wᵀ + s·(x Aᵀ) Bᵀ per target (s = alpha / r), added to the
matching slice of the fused q/k/v and gate/up outputs. ψ (``projection``) maps student embeddings to the
teacher's space (Linear with bias) and is saved beside the student.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..batching import PackedBatch
from ..config import load_model_args
from ..loading import LORA_TARGETS, load_weights
from ..models.backbone import FUSED, NORMS, Backbone

# fused weight → (LoRA target, checkpoint key suffix) of each of its row blocks, in order
PARTS = {
    "wqkv": (("q_proj", "self_attn.q_proj.weight"), ("k_proj", "self_attn.k_proj.weight"),
             ("v_proj", "self_attn.v_proj.weight")),
    "wo": (("o_proj", "self_attn.o_proj.weight"),),
    "w13": (("gate_proj", "mlp.gate_proj.weight"), ("up_proj", "mlp.up_proj.weight")),
    "w2": (("down_proj", "mlp.down_proj.weight"),),
}
assert {k: tuple(p[1] for p in v) for k, v in PARTS.items()} == FUSED


class TrainModel(nn.Module):
    """Student backbone (+ LoRA, + ψ). ``embed(batch)`` returns L2-normalized (B, E) fp32 embeddings."""

    def __init__(self, folder, *, lora_r=0, lora_alpha=32.0, lora_targets=LORA_TARGETS, train_backbone=True,
                 teacher_dim=None, rope_theta=None, device="cpu", seed=0):
        super().__init__()
        self.folder = folder
        args = load_model_args(folder)
        if rope_theta is not None:  # per-phase training theta (model-spec §9.4); the saved config keeps its own
            args = replace(args, rope_theta=float(rope_theta))
        self.args = args
        bad = [t for t in lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; valid: {list(LORA_TARGETS)}")
        if lora_r < 0 or (lora_r == 0 and not train_backbone):
            raise ValueError(f"lora_r must be > 0 when the backbone is frozen, got {lora_r}")
        weights = load_weights(folder, args)
        self.backbone = Backbone(args, device, torch.float32)
        self.backbone.set_static(weights)
        for i in range(args.num_layers):
            for name, parts in PARTS.items():
                self.backbone.set_linear(i, name, torch.cat([weights[f"layers.{i}.{k}"] for _, k in parts], 0))
        self.base = nn.ParameterDict()  # the same tensors the backbone reads, registered as parameters
        bb = self.backbone
        bb.embed = self._param("embed", bb.embed, train_backbone)
        bb.norm = self._param("norm", bb.norm, train_backbone)
        for i, layer in enumerate(bb.layers):
            for name in list(layer):
                layer[name] = self._param(f"layers_{i}_{name}", layer[name], train_backbone)
        self.lora_r, self.lora_alpha, self.lora_targets = int(lora_r), float(lora_alpha), tuple(lora_targets)
        self.lora = nn.ParameterDict()
        if lora_r:
            g = torch.Generator().manual_seed(seed)
            for i, layer in enumerate(bb.layers):
                for name, parts in PARTS.items():
                    rows = 0
                    for target, _ in parts:
                        n_out = self._part_rows(name, target)
                        n_in = layer[name].shape[1]
                        if target in self.lora_targets:
                            # PEFT's "gaussian" init: A ~ N(0, 1/r), B = 0, so training starts at the base model
                            a = torch.randn(lora_r, n_in, generator=g) / lora_r
                            self.lora[f"{i}_{target}_A"] = nn.Parameter(a.to(device))
                            self.lora[f"{i}_{target}_B"] = nn.Parameter(torch.zeros(n_out, lora_r, device=device))
                        rows += n_out
                    assert rows == layer[name].shape[0]
        self.projection = nn.Linear(args.hidden_size, teacher_dim).to(device) if teacher_dim else None

    def _param(self, key, t, trainable):
        p = nn.Parameter(t.detach().clone(), requires_grad=trainable)
        self.base[key] = p
        return p

    def _part_rows(self, name, target):
        a = self.args
        return {"q_proj": a.num_heads * a.head_dim, "k_proj": a.num_kv_heads * a.head_dim,
                "v_proj": a.num_kv_heads * a.head_dim, "o_proj": a.hidden_size, "gate_proj": a.intermediate_size,
                "up_proj": a.intermediate_size, "down_proj": a.hidden_size}[target]

    def _linear(self, i, name, h):
        y = F.linear(h, self.backbone.layers[i][name])
        if not self.lora_r or not any(t in self.lora_targets for t, _ in PARTS[name]):
            return y
        s = self.lora_alpha / self.lora_r
        deltas = []
        for target, _ in PARTS[name]:
            if target in self.lora_targets:
                deltas.append(F.linear(F.linear(h, self.lora[f"{i}_{target}_A"]), self.lora[f"{i}_{target}_B"]) * s)
            else:
                deltas.append(h.new_zeros(h.shape[0], self._part_rows(name, target)))
        return y + torch.cat(deltas, -1)

    def embed(self, batch: PackedBatch, use_lora: bool = True, truncate_dim=None) -> torch.Tensor:
        """(B, E') L2-normalized last-token embeddings, differentiable."""
        hidden = self.backbone.hidden_states(batch, linear=self._linear if use_lora else None)
        return ops.pool_last(hidden, batch.cu_seqlens, truncate_dim=truncate_dim, normalize=True)

    def forward(self, batch: PackedBatch, use_lora: bool = True):
        """(embeddings (B, E), ψ(embeddings) (B, m) or None): the one call per step that DDP wraps."""
        e = self.embed(batch, use_lora=use_lora)
        return e, (self.projection(e) if self.projection is not None else None)

    # ---- saving --------------------------------------------------------------------------------
    def save_adapter(self, folder, task):
        """PEFT layout under ``folder/adapters/<task>/``, loadable by ``Engine(folder, task=task)``."""
        from safetensors.torch import save_file
        if not self.lora_r:
            raise ValueError("this model has no LoRA adapter to save")
        d = os.path.join(folder, "adapters", task)
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for i in range(self.args.num_layers):
            for name, parts in PARTS.items():
                for target, key in parts:
                    if target in self.lora_targets:
                        stem = "base_model.model.layers.%d.%s" % (i, key[: -len(".weight")])
                        tensors[stem + ".lora_A.weight"] = self.lora[f"{i}_{target}_A"].detach().float().cpu()
                        tensors[stem + ".lora_B.weight"] = self.lora[f"{i}_{target}_B"].detach().float().cpu()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": self.lora_r,
                       "lora_alpha": self.lora_alpha, "target_modules": list(self.lora_targets), "bias": "none",
                       "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
                       "init_lora_weights": "gaussian", "lora_dropout": 0.0}, f, indent=2)
        sync_task_names(folder)

    def save_backbone(self, folder):
        """The student as a checkpoint in the released layout (fp32 weights; config/tokenizer copied)."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        bb, out = self.backbone, {}
        out["embed_tokens.weight"], out["norm.weight"] = bb.embed, bb.norm
        for i, layer in enumerate(bb.layers):
            for ours, theirs in NORMS.items():
                if ours in layer:
                    out[f"layers.{i}.{theirs}"] = layer[ours]
            for name, parts in PARTS.items():
                rows = [self._part_rows(name, t) for t, _ in parts]
                for (_, key), w in zip(parts, torch.split(layer[name], rows, 0)):
                    out[f"layers.{i}.{key}"] = w
        save_file({k: v.detach().float().cpu().contiguous() for k, v in out.items()},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        if os.path.abspath(folder) != os.path.abspath(self.folder):
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "config_sentence_transformers.json", "modules.json"):
                src = os.path.join(self.folder, name)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(folder, name))
        sync_task_names(folder)

    def save_projection(self, folder):
        from safetensors.torch import save_file
        if self.projection is not None:
            save_file({"weight": self.projection.weight.detach().cpu().contiguous(),
                       "bias": self.projection.bias.detach().cpu().contiguous()},
                      os.path.join(folder, "projection.safetensors"))

    def load_projection(self, folder):
        from safetensors.torch import load_file
        path = os.path.join(folder, "projection.safetensors")
        if self.projection is not None and os.path.exists(path):
            t = load_file(path)
            want = tuple(self.projection.weight.shape)
            if set(t) != {"weight", "bias"} or tuple(t["weight"].shape) != want or tuple(t["bias"].shape) != want[:1]:
                got = {k: tuple(v.shape) for k, v in t.items()}
                if set(t) == {"weight", "bias"} and len(got["weight"]) == 2 and got["weight"][1] == want[1]:
                    raise ValueError(f"{path} maps {want[1]} student dims to {got['weight'][0]} teacher dims, but "
                                     f"this teacher gives {want[0]}: train with the teacher that stage 1 used, or "
                                     f"move projection.safetensors away to learn a new psi")
                raise ValueError(f"{path} holds {got}, expected weight {want} and bias {want[:1]} (a psi from "
                                 f"{want[1]} student dims to {want[0]} teacher dims)")
            with torch.no_grad():
                self.projection.weight.copy_(t["weight"])
                self.projection.bias.copy_(t["bias"])
            return True
        return False


def sync_task_names(folder):
    """Make config.json's ``task_names`` list exactly the adapters under ``folder/adapters/`` (keeping the
    listed order), so ``Engine(folder)`` loads what each training stage wrote: stage 1 copies a config that
    names the released tasks but writes no adapters; stage 2 adds one adapter at a time."""
    from ..loading import list_adapter_tasks
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        cfg = json.load(f)
    if "task_names" not in cfg and cfg.get("model_type") != "jina_embeddings_v5":
        return  # a plain (merged-style) config: Engine reads adapters/ without task_names
    present = list_adapter_tasks(folder)
    names = [t for t in (cfg.get("task_names") or []) if t in present] + \
        [t for t in present if t not in (cfg.get("task_names") or [])]
    if cfg.get("task_names") != names:
        cfg["task_names"] = names
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(path + ".tmp", path)
