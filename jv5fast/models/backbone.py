"""The Qwen3 (small) / EuroBERT (nano) backbone over a packed varlen batch (model-spec.md §4).

The two families share the Llama pre-norm layer; they differ in ``causal`` (Qwen3 decoder vs
EuroBERT encoder) and ``qk_norm`` (Qwen3's per-head RMSNorm on q and k before RoPE). Weights are held
fused — q/k/v as one (dq + 2 dkv, E) matrix and gate/up as one (2F, E) — so each layer runs four
GEMMs over all T tokens of the batch. Every op other than the GEMMs goes through ``jv5fast.ops``, except
on CPU in fp32 inference, where ``cpu_forward`` calls the same fused kernels directly.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .. import cpu_tuning, ops
from ..batching import PackedBatch
from ..config import ModelArgs
from . import cpu_forward

# Our fused names → the checkpoint tensors they are built from (order matters for the concat).
FUSED = {
    "wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "wo": ("self_attn.o_proj.weight",),
    "w13": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "w2": ("mlp.down_proj.weight",),
}
NORMS = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}


class Backbone:
    """Weights plus a forward pass; no nn.Module, no autograd state at inference."""

    def __init__(self, args: ModelArgs, device, dtype):
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        self.embed = None
        self.norm = None
        self.layers = [dict() for _ in range(args.num_layers)]
        self._rope = None  # (cos, sin) fp32 tables, grown on demand
        self.version = 0   # bumped whenever a weight tensor is replaced (CUDA graphs hold addresses)
        self.packed = None  # (layer, name) -> ops.PackedLinear (CPU fp32 inference; see pack_linears)
        self.gemm_choice = {}  # (N, K) -> cpu_tuning.GemmChoice: which packed GEMM each weight shape runs
        self.fused_choice = []  # [cpu_tuning.FusedChoice]: jv5fast._C's fused op or the torch reference, per shape

    # ---- weights -------------------------------------------------------------------------------
    def set_static(self, weights: dict):
        """Embedding, final norm and per-layer norms (untouched by LoRA), cast once."""
        cast = dict(device=self.device, dtype=self.dtype)
        self.embed = weights["embed_tokens.weight"].to(**cast)
        self.norm = weights["norm.weight"].to(**cast)
        for i, layer in enumerate(self.layers):
            for ours, theirs in NORMS.items():
                key = f"layers.{i}.{theirs}"
                if key in weights:
                    layer[ours] = weights[key].to(**cast)

    def pack_linears(self, precision: str = "fp32"):
        """Keep a prepacked copy (``ops.pack_linear``) of every fused projection for the default linear (CPU
        fp32 inference: faster GEMMs at every batch size, at the cost of a second copy of the linear weights),
        each for the GEMM ``cpu_tuning.choose`` picks for its shape (measured here under JV5FAST_CPU_GEMM=auto,
        once per CPU and shape, cached on disk). ``precision="bf16"`` (opt-in, ``Engine(cpu_precision=...)``)
        packs every projection for oneDNN's bf16 GEMM instead. ``set_linear`` keeps the copies current. Returns
        whether packing applies here. The fused ops (RMSNorm, RoPE, SwiGLU, attention) are chosen here too, by
        measurement against their torch references (``cpu_tuning.choose_fused``)."""
        self.packed = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.fused_choice = cpu_tuning.choose_fused(self.args)
        if not ops.cpu_packing() or (precision == "bf16" and not ops.bf16_linear_ok()):
            return False  # JV5FAST_CPU_PACK=0, or no packed GEMM here
        projections = self._projections()
        by_shape: dict = {}
        for w in projections.values():
            by_shape.setdefault(tuple(w.shape), []).append(w)
        if precision == "bf16":
            self.gemm_choice = {s: cpu_tuning.GemmChoice(s, "onednn_bf16", "cpu_precision='bf16' (opt-in)", {})
                                for s in by_shape}
        else:  # up to cpu_tuning.ROTATE weights per shape, spread over the layers
            self.gemm_choice = cpu_tuning.choose({s: ws[::max(1, len(ws) // cpu_tuning.ROTATE)]
                                                  for s, ws in by_shape.items()})
        logging.getLogger("jv5fast").info("jv5fast: CPU fp32 GEMMs: %s", "; ".join(
            f"{n}x{k} {c.describe()['kernel']} ({c.reason})" for (n, k), c in self.gemm_choice.items()))
        self.packed = {key: self._pack_one(w) for key, w in projections.items()}
        if not self.packed or any(v is None for v in self.packed.values()):
            self.packed = None
        return self.packed is not None

    def _weight(self, i, name):
        """Projection ``name`` of layer ``i``; 'wq' / 'wkv' are the row slices of its wqkv that the pruned last
        layer reads apart."""
        if name in ("wq", "wkv"):
            dq = self.args.num_heads * self.args.head_dim
            w = self.layers[i]["wqkv"]
            return w[:dq] if name == "wq" else w[dq:]
        return self.layers[i][name]

    def _packed_names(self, i, names=("wqkv", "wo", "w13", "w2")) -> list:
        """Which of ``names`` layer ``i`` has a packed copy of: those it holds, plus wq / wkv beside the last
        layer's wqkv."""
        out = [n for n in names if n in self.layers[i]]
        return out + (["wq", "wkv"] if "wqkv" in out and i == len(self.layers) - 1 else [])

    def _projections(self) -> dict:
        """{(layer, name): weight} of every projection that gets a packed copy (the last layer's q and k/v
        row slices too)."""
        return {(i, n): self._weight(i, n) for i in range(len(self.layers)) for n in self._packed_names(i)}

    def _pack_one(self, w):
        c = self.gemm_choice.get(tuple(w.shape))
        if c is None or not c.split:
            return ops.pack_linear(w, kind=c.kind if c is not None else None)
        by_kind = {k: ops.pack_linear(w, kind=k) for k in dict.fromkeys(c.kinds_by_m.values())}
        if any(p is None or p.kind != k for k, p in by_kind.items()):
            return ops.pack_linear(w, kind=c.kind)  # one of the two cannot pack here after all
        bounds, packs = cpu_tuning.split_bounds(c.kinds_by_m)
        return ops.SplitLinear(bounds, [by_kind[k] for k in packs])

    def _pack(self, i, name):
        for n in self._packed_names(i, (name,)):
            self.packed[(i, n)] = self._pack_one(self._weight(i, n))

    def _linear(self, i, name, h):
        return ops.linear(h, self._weight(i, name), self.packed.get((i, name)) if self.packed is not None else None)

    def set_linear(self, i: int, name: str, weight: torch.Tensor):
        """Set a fused projection. A tensor of the same shape is overwritten in place, so its address
        (which captured CUDA graphs read) stays; otherwise the tensor is replaced and ``version`` bumped.
        A first set keeps ``weight`` itself when its dtype and device already match, so a caller that
        keeps using that tensor and will set this projection again must pass a copy."""
        w = weight.to(device=self.device, dtype=self.dtype)
        cur = self.layers[i].get(name)
        if cur is not None and cur.shape == w.shape:
            if cur.data_ptr() != w.data_ptr():
                cur.copy_(w)
        else:
            self.layers[i][name] = w.contiguous()
            self.version += 1
        if self.packed is not None:
            self._pack(i, name)

    def linears(self):
        """The fused projections as they are now, ``({(layer, name): weight}, prepacked copies or None)``,
        for ``use_linears``: the engine keeps each task's merged set resident this way."""
        ws = {(i, n): w for i, layer in enumerate(self.layers) for n, w in layer.items() if n in FUSED}
        return ws, (dict(self.packed) if self.packed is not None else None)

    def use_linears(self, ws: dict, packed, in_place: bool):
        """Make ``ws`` (from ``linears``) the fused projections: by reference, an instant switch, or with
        ``in_place`` copied into the current tensors, whose addresses captured CUDA graphs hold."""
        for (i, n), w in ws.items():
            if in_place:
                self.layers[i][n].copy_(w)
            else:
                self.layers[i][n] = w
        if packed is not None:
            self.packed = dict(packed)

    def one_loop_ready(self) -> bool:
        """Whether CPU batches of short sequences run as one loop of jv5fast._C calls (``cpu_forward.ready``)."""
        return cpu_forward.ready(self)

    def rope_tables(self, n_positions: int):
        if self._rope is None or self._rope[0].shape[0] < n_positions:
            a = self.args
            self._rope = ops.rope_tables(a.rope_theta, a.head_dim, max(n_positions, 512), device=self.device)
        return self._rope

    # ---- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: PackedBatch, last_only: bool = False, between=None) -> torch.Tensor:
        """Packed batch -> final-normed hidden states in the model dtype: (T, E), or with ``last_only``
        just each sequence's last token (B, E).

        On CPU in fp32 with the fused kernels (``cpu_forward.usable``), the same ops run as one loop of
        jv5fast._C calls over numpy buffers (``cpu_forward.forward``), with the same result.
        ``last_only`` skips the work nothing reads: in the final layer only the last rows need a query,
        the output projection, the MLP and the final norm (keys and values still cover every token).
        ``between()``, if given, is called after every layer but the last: the batcher runs urgent small
        batches there, nested, so a long batch holds them up for one layer, not for all of them.
        """
        if cpu_forward.usable(self, batch):
            return cpu_forward.forward(self, batch, last_only, between)
        return self.hidden_states(batch, last_only, between=between)

    def hidden_states(self, batch: PackedBatch, last_only: bool = False, linear=None, between=None) -> torch.Tensor:
        """``forward`` without inference mode, so the trainer can differentiate through it. ``linear(i,
        name, h)`` replaces ``F.linear(h, layers[i][name])`` for the fused projections (the trainer adds
        LoRA there); it needs the full path (``last_only=False``)."""
        if linear is not None and last_only:
            raise ValueError("a custom linear needs last_only=False")
        if linear is None:
            linear = self._linear
        a = self.args
        D, H, Hkv = a.head_dim, a.num_heads, a.num_kv_heads
        dq, dkv = H * D, Hkv * D
        cos, sin = self.rope_tables(batch.max_seqlen)
        pos, cu = batch.position_ids, batch.cu_seqlens
        x = F.embedding(batch.input_ids, self.embed)                      # (T, E)
        residual = None
        for n, layer in enumerate(self.layers):
            if residual is None:
                h, residual = ops.rms_norm(x, layer["attn_norm"], a.rms_norm_eps), x
            else:
                h, residual = ops.rms_norm(x, layer["attn_norm"], a.rms_norm_eps, residual)
            if last_only and n == len(self.layers) - 1:
                last = (cu[1:] - 1).long()                                 # (B,)
                kv = self._linear(n, "wkv", h)                             # (T, 2 dkv)
                k = ops.rope(kv[:, :dkv].view(-1, Hkv, D), cos, sin, pos, layer.get("k_norm"), a.rms_norm_eps)
                v = kv[:, dkv:].view(-1, Hkv, D).contiguous()
                q = self._linear(n, "wq", h.index_select(0, last)).view(-1, H, D)          # (B, H, D)
                q = ops.rope(q, cos, sin, pos.index_select(0, last), layer.get("q_norm"), a.rms_norm_eps)
                o = ops.attention_last(q, k, v, cu, batch.max_seqlen)                     # (B, H, D)
                residual = residual.index_select(0, last)
            else:
                qkv = linear(n, "wqkv", h)                                 # (T, dq + 2 dkv)
                q = qkv[:, :dq].view(-1, H, D)                             # (T, H, D)
                k = qkv[:, dq:dq + dkv].view(-1, Hkv, D)                   # (T, Hkv, D)
                v = qkv[:, dq + dkv:].view(-1, Hkv, D)
                q = ops.rope(q, cos, sin, pos, layer.get("q_norm"), a.rms_norm_eps)
                k = ops.rope(k, cos, sin, pos, layer.get("k_norm"), a.rms_norm_eps)
                o = ops.attention_varlen(q, k, v.contiguous(), cu, batch.max_seqlen, causal=a.causal)
            x = linear(n, "wo", o.reshape(o.shape[0], dq))                # (T or B, E)
            h, residual = ops.rms_norm(x, layer["mlp_norm"], a.rms_norm_eps, residual)
            x = linear(n, "w2", ops.swiglu(linear(n, "w13", h)))
            if between is not None and n < len(self.layers) - 1:
                between()
        return ops.rms_norm(x + residual, self.norm, a.rms_norm_eps)
