"""ONNX export: one checkpoint + one task adapter (merged in fp32) → a self-contained folder.

The graph takes right- or left-padded ``input_ids`` / ``attention_mask`` (int64, dynamic batch and
sequence) and returns ``last_hidden_state`` (B, S, E) and ``sentence_embedding`` (B, E'): the last real
token — the highest position whose mask is 1, so no padding side is frozen into the graph — truncated
to ``truncate_dim`` and L2-normalized. RoPE positions count real tokens only (cumsum of the mask), so
both padding sides give the packed engine's numbers. Beside ``model.onnx`` the folder holds the
tokenizer, the prompts and ``jv5fast_onnx.json`` (also written into the ONNX metadata): a consumer needs
nothing else. The folder is built in a temporary sibling and moved into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.rmsnorm import rms_norm_ref

FORMAT_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "config_sentence_transformers.json", "config.json")
QUALITY_TEXTS = [
    "How fast does light travel in a vacuum?", "The speed of light is 299,792,458 metres per second.",
    "Photosynthesis converts light energy into chemical energy.", "Plants need sunlight, water and CO2.",
    "The Eiffel Tower is in Paris.", "Paris is the capital of France.", "Berlin ist die Hauptstadt Deutschlands.",
    "Le chat dort sur le canapé.", "A cat is sleeping on the sofa.", "Stock markets fell sharply on Monday.",
    "Interest rates were raised by the central bank.", "The match ended in a draw after extra time.",
    "Python is a popular programming language.", "Rust guarantees memory safety without a garbage collector.",
    "Mount Everest is the highest mountain above sea level.", "The Pacific is the largest ocean on Earth.",
    "東京は日本の首都です。", "Water boils at 100 degrees Celsius at sea level.", "Ice melts at zero degrees.",
    "The mitochondria is the powerhouse of the cell.", "DNA carries genetic information.",
    "Shakespeare wrote Hamlet.", "Beethoven composed nine symphonies.", "The moon orbits the Earth.",
    "Mars is called the red planet.", "Jupiter has dozens of moons.", "Electric cars use batteries.",
    "Bicycles are an efficient way to travel.", "Coffee contains caffeine.", "Tea is popular in Britain.",
    "The library opens at nine in the morning.", "Museums preserve cultural heritage.",
]


class PaddedBackbone(nn.Module):
    """The engine's backbone on padded (B, S) inputs, written with ONNX-exportable ops only."""

    def __init__(self, model, truncate_dim=None):
        super().__init__()
        a = self.args = model.args
        self.truncate_dim = truncate_dim
        self.embed = nn.Parameter(model.embed.detach().clone(), requires_grad=False)
        self.norm = nn.Parameter(model.norm.detach().clone(), requires_grad=False)
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList()
        for layer in model.layers:
            m = nn.Module()
            for name, t in layer.items():
                setattr(m, name, nn.Parameter(t.detach().clone(), requires_grad=False))
            self.layers.append(m)

    def _rms(self, x, w):
        return rms_norm_ref(x, w, self.args.rms_norm_eps)

    def forward(self, input_ids, attention_mask):
        a = self.args
        B, S = input_ids.shape
        H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
        dq, dkv = H * D, Hkv * D
        mask = attention_mask.to(torch.int64)
        pos = (mask.cumsum(1) - 1).clamp(min=0)                               # (B, S): real tokens from 0
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq              # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = F.embedding(input_ids, self.embed)                                # (B, S, E)
        cos, sin = emb.cos().to(x.dtype)[:, :, None, :], emb.sin().to(x.dtype)[:, :, None, :]
        allowed = mask[:, None, None, :].bool()                               # (B, 1, 1, S) key padding
        if a.causal:
            allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
        # a large negative instead of -inf: rows with no allowed key (left-padding rows) stay finite
        bias = torch.where(allowed, 0.0, -1e30)                               # fp32
        half = D // 2

        def rope(t):
            rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
            return t * cos + rot * sin

        for layer in self.layers:
            h = self._rms(x, layer.attn_norm)
            qkv = F.linear(h, layer.wqkv)
            q = qkv[..., :dq].reshape(B, S, H, D)
            k = qkv[..., dq:dq + dkv].reshape(B, S, Hkv, D)
            v = qkv[..., dq + dkv:].reshape(B, S, Hkv, D)
            if a.qk_norm:
                q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)
            q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)           # (B, H, S, D)
            v = v.transpose(1, 2)
            if H != Hkv:
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (D ** -0.5) + bias
            o = torch.matmul(scores.softmax(-1).to(v.dtype), v)               # (B, H, S, D)
            x = x + F.linear(o.transpose(1, 2).reshape(B, S, dq), layer.wo)
            h = self._rms(x, layer.mlp_norm)
            gate, up = F.linear(h, layer.w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.w2)
        hidden = self._rms(x, self.norm)                                      # (B, S, E)
        last = (mask * torch.arange(S, device=x.device)[None, :]).argmax(1)   # highest real position
        pooled = hidden[torch.arange(B, device=x.device), last].float()
        if self.truncate_dim is not None:
            pooled = pooled[:, : self.truncate_dim]
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return hidden, pooled


def _metadata(eng, task, dtype, opset, truncate_dim, external):
    return {
        "format": "jv5fast-onnx", "format_version": FORMAT_VERSION, "model_type": eng.args.family,
        "task": task, "dim": eng.dim, "truncate_dim": truncate_dim, "max_length": eng.max_length,
        "prompts": eng.prompts, "default_prompt_name": eng.default_prompt_name, "dtype": dtype,
        "opset": opset, "external_data": external, "inputs": ["input_ids", "attention_mask"],
        "outputs": ["last_hidden_state", "sentence_embedding"], "padding": "right or left",
    }


def export_onnx(model_name_or_path, out_dir, *, task="retrieval", dtype="float32", opset=None, truncate_dim=None,
                quantize=None, external_data=None, overwrite=False):
    """Export ``model_name_or_path`` with ``task``'s adapter merged to ``out_dir``; returns the metadata dict.

    dtype "float32" | "float16"; opset default 17; ``external_data`` None = only above 2 GB, True forces
    ``model.onnx_data`` beside ``model.onnx``; ``quantize="int8"`` adds ``model_int8.onnx`` (dynamic
    quantization for CPU) and measures its quality against the float graph (stored in the metadata).
    """
    import onnx

    from .engine import Engine

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r} is not supported for export; choose 'float32' or 'float16'")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize {quantize!r} is not supported; choose None or 'int8'")
    opset = 17 if opset is None else int(opset)
    if opset < 14:
        raise ValueError(f"opset {opset} is too old; jv5fast exports with opset >= 14 (default 17)")
    out_dir = os.path.abspath(str(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists; pass overwrite=True to replace it")
    eng = Engine(model_name_or_path, task=task, device="cpu", dtype="float32")
    if truncate_dim is not None:
        eng._check_truncate_dim(truncate_dim)
    module = PaddedBackbone(eng.model, truncate_dim).eval()
    if dtype == "float16":
        module = module.half()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = bool(external_data) if external_data is not None else n_bytes > EXTERNAL_DATA_THRESHOLD
    meta = _metadata(eng, eng.task, dtype, opset, truncate_dim, external)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jv5fast-export-", dir=parent)
    try:
        raw = os.path.join(tmp, "raw", "model.onnx")
        os.makedirs(os.path.dirname(raw))
        ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]], dtype=torch.int64)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (ids, mask), raw, dynamo=False, opset_version=opset,
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state", "sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                              "attention_mask": {0: "batch_size", 1: "sequence_length"},
                              "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                              "sentence_embedding": {0: "batch_size"}},
                do_constant_folding=True)
        proto = onnx.load(raw)  # pulls in external data the exporter may have written
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        model_path = os.path.join(tmp, "model.onnx")
        onnx.save_model(proto, model_path, save_as_external_data=external, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
        shutil.rmtree(os.path.dirname(raw))
        onnx.checker.check_model(model_path)
        for name in COPIED_FILES:
            src = os.path.join(eng.path, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(tmp, name))
        if quantize == "int8":
            meta["int8"] = _quantize_int8(model_path, os.path.join(tmp, "model_int8.onnx"), eng)
        with open(os.path.join(tmp, "jv5fast_onnx.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (ValueError, FileExistsError)):
            raise
        raise RuntimeError(f"ONNX export of {model_name_or_path!r} failed ({type(e).__name__}: {e}); "
                           f"nothing was written to {out_dir}") from e
    return meta


def top10_overlap(a, b):
    """Mean fraction of each row's 10 nearest other rows (dot product) that ``a`` and ``b`` agree on."""
    import numpy as np
    ta = np.argsort(-(a @ a.T), axis=1)[:, 1:11]
    tb = np.argsort(-(b @ b.T), axis=1)[:, 1:11]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)]))


def _quantize_int8(src, dst, eng):
    """Dynamic int8 quantization (weights int8, activations quantized at run time) plus its quality on a
    fixed multilingual corpus: cosine to the float graph per text and top-10 retrieval overlap."""
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    from .onnx_runtime import OnnxSession
    texts = QUALITY_TEXTS
    ids = eng.tokenize(texts)
    ref = OnnxSession(src).pooled(ids)
    q8 = OnnxSession(dst).pooled(ids)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q8 = q8 / np.linalg.norm(q8, axis=1, keepdims=True)
    cos = (ref * q8).sum(1)
    overlap = top10_overlap(ref, q8)
    quality = {"file": "model_int8.onnx", "texts": len(texts), "cosine_mean": float(cos.mean()),
               "cosine_min": float(cos.min()), "top10_overlap": overlap}
    warnings.warn(f"int8 ONNX model quality vs float: mean cosine {quality['cosine_mean']:.4f}, "
                  f"min {quality['cosine_min']:.4f}, top-10 overlap {overlap:.3f} on {len(texts)} texts",
                  stacklevel=3)
    return quality
