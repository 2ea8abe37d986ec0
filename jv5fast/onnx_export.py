"""ONNX export: one checkpoint + one task adapter (merged in fp32) → a self-contained folder.

The graph takes right- or left-padded ``input_ids`` / ``attention_mask`` (int64, dynamic batch and
sequence) and returns ``last_hidden_state`` (B, S, E) and ``sentence_embedding`` (B, E'): the last real
token — the highest position whose mask is 1, so no padding side is frozen into the graph — truncated
to ``truncate_dim`` and L2-normalized. RoPE positions count real tokens only (cumsum of the mask), so
both padding sides give the packed engine's numbers. Beside ``model.onnx`` the folder holds the
tokenizer, the prompts and ``jv5fast_onnx.json`` (also written into the ONNX metadata): a consumer needs
nothing else.

Attention memory is linear in S: an ONNX ``Loop`` walks the queries in chunks of C = min(S,
``ATTENTION_CHUNK``) rows, so one iteration holds (B, H, C, S) fp32 scores and builds its key-padding
and causal masks from the chunk's row indices; no (S, S) tensor exists. The price is one Loop
iteration (a subgraph run) per chunk and up to C - 1 padded query rows in the last one: on 2 CPU cores
the 10–500-token benchmark corpus runs as fast in fp32 and ~13% slower in int8 than with a single (S, S)
score matrix (bench/results/onnx_cpu.md), while one 16.8k-token text peaks at 0.8 GiB of RSS instead of
12.9 GiB. The tracer sees one
``jv5fast::ChunkedAttention`` node (``_ChunkedAttention.symbolic``) that ``_expand_attention`` rewrites
into plain ONNX ops. Scores and softmax are fp32 in fp16 graphs too, and so is RoPE (``inv_freq``, the
angles, cos/sin and the rotation): an fp16 ``inv_freq`` puts the angles 0.2 rad off at position 4k and
1.5 rad at 32k.

The folder is built in a temporary sibling and moved into place only when complete. ``overwrite=True``
replaces only a previous export (valid ``jv5fast_onnx.json``, nothing but files an export writes; any
other file is listed in the refusal, never deleted): the old folder is renamed aside, the new one moved
in, and the old one deleted last, or put back if the move fails.

The model comes from the checkpoint code (``checkpoint.py``: backbone, adapters, one task merged), not from
the engine, which runs exports through its ``onnx`` and ``int8`` backends; ``quantize="int8"`` hands the
float graph to ``int8.quantize_int8``. One file: the graph, its export and the folder it lands in change
together (the metadata names the graph's inputs and outputs; ``EXPORT_FILES`` is what overwrite may replace).
"""
from __future__ import annotations

import json
import os
import reprlib
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (check_task, check_truncate_dim, default_task, merge, merged_task_from_name,
                         open_checkpoint)
from .config import load_model_args
from .int8 import QUALITY_TEXTS, quantize_int8, top10_overlap  # noqa: F401 (top10_overlap: bench_onnx)
from .kernels.rmsnorm import rms_norm_ref
from .loading import load_prompts, resolve_checkpoint
from .onnx_runtime import require_onnx
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "config_sentence_transformers.json", "config.json")
ATTENTION_CHUNK = 256  # query rows per Loop iteration: (B, H, 256, S) fp32 scores live at a time
MASKED = -1e30  # not -inf: a row with no visible key (a left-padding query) stays finite
EXPORT_FILES = frozenset(("model.onnx", "model.onnx_data", "model_int8.onnx", "jv5fast_onnx.json")
                         + COPIED_FILES)  # all an export writes: anything else in a folder blocks overwrite
_ONNX_FLOAT = {torch.float32: 1, torch.float16: 10}  # onnx.TensorProto.FLOAT, FLOAT16


def padded_attention_ref(q, k, v, key_mask, causal, scale, chunk=ATTENTION_CHUNK):
    """Attention on padded inputs, one chunk of query rows at a time (what the exported Loop computes).

    q (B, H, S, D), k and v (B, Hkv, S, D) with H a multiple of Hkv (query head h reads kv head
    h // (H / Hkv)), key_mask (B, S) nonzero for real tokens -> (B, H, S, D) in v's dtype. Query i sees
    key j when key_mask[j] and, if ``causal``, j <= i (indices into the padded row, which equals causal
    order over the real tokens for right and left padding). Scores and softmax are fp32.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    qg = (q.float() * scale).reshape(B, Hkv, H // Hkv, S, D)            # (B, Hkv, R, S, D)
    kt = k.float().transpose(-1, -2)[:, :, None]                        # (B, Hkv, 1, D, S)
    vg = v[:, :, None]                                                  # (B, Hkv, 1, S, D)
    visible = key_mask.bool()[:, None, None, None, :]                   # (B, 1, 1, 1, S)
    cols = torch.arange(S, device=q.device)
    out = []
    for s in range(0, S, chunk):
        rows = torch.arange(s, min(s + chunk, S), device=q.device)
        ok = visible & (cols[None, :] <= rows[:, None]) if causal else visible  # (B, 1, 1, C, S)
        scores = torch.where(ok, qg[:, :, :, s:s + chunk] @ kt, MASKED)  # (B, Hkv, R, C, S)
        out.append(scores.softmax(-1).to(v.dtype) @ vg)                 # (B, Hkv, R, C, D)
    return torch.cat(out, 3).reshape(B, H, S, D)


class _ChunkedAttention(torch.autograd.Function):
    """``padded_attention_ref`` that the TorchScript exporter records as one ``jv5fast::ChunkedAttention``
    node; ``_expand_attention`` turns it into standard ONNX ops. Inference only: no backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal, scale, chunk, num_heads, num_kv_heads, head_dim):
        return padded_attention_ref(q, k, v, key_mask, causal, scale, chunk)

    @staticmethod
    def symbolic(g, q, k, v, key_mask, causal, scale, chunk, num_heads, num_kv_heads, head_dim):
        dtype = v.type().dtype()
        out = g.op("jv5fast::ChunkedAttention", q, k, v, key_mask, causal_i=int(causal), scale_f=float(scale),
                   chunk_i=int(chunk), num_heads_i=num_heads, num_kv_heads_i=num_kv_heads,
                   head_dim_i=head_dim, out_dtype_i=_ONNX_FLOAT[dtype])
        out.setType(q.type().with_dtype(dtype))
        return out


class _Nodes:
    """Collects ONNX nodes with unique names under ``prefix``; each call returns the output's name."""

    def __init__(self, prefix):
        self.prefix, self.nodes = prefix, []

    def __call__(self, op_type, *inputs, out=None, **attrs):
        from onnx import helper
        name = f"{self.prefix}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name

    def const(self, value, dtype=np.int64):
        from onnx import numpy_helper
        return self("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _attention_loop(node, prefix):
    """The nodes that replace one ChunkedAttention placeholder (see ``padded_attention_ref``)."""
    from onnx import TensorProto, helper
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    H, Hkv, D, C = at["num_heads"], at["num_kv_heads"], at["head_dim"], at["chunk"]
    q, k, v, key_mask = node.input
    F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    g = _Nodes(prefix)
    qs = g("Mul", g("Cast", q, to=F32), g.const(at["scale"], np.float32))
    kt = g("Transpose", g("Cast", k, to=F32), perm=[0, 1, 3, 2])
    kt = g("Unsqueeze", kt, g.const([2]))  # (B, Hkv, 1, D, S)
    vg = g("Unsqueeze", v, g.const([2]))  # (B, Hkv, 1, S, D)
    seq = g("Gather", g("Shape", k), g.const([2]), axis=0)                                        # [S]
    chunk = g("Min", seq, g.const([C]))  # [C'] = [min(S, C)]
    n_chunks = g("Div", g("Sub", g("Add", seq, chunk), g.const([1])), chunk)
    pad = g("Sub", g("Mul", n_chunks, chunk), seq)
    q_pad = g("Pad", qs, g("Concat", g.const([0] * 6), pad, g.const([0]), axis=0))  # (B, H, N C', D)
    qg = g("Reshape", q_pad, g.const([0, Hkv, H // Hkv, -1, D]))  # (B, Hkv, R, N C', D)
    visible = g("Reshape", g("Cast", key_mask, to=BOOL), g.const([0, 1, 1, 1, -1]))  # (B, 1, 1, 1, S)
    chunk0 = g("Squeeze", chunk, g.const([0]))
    if at["causal"]:
        cols = g("Range", g.const(0), g("Squeeze", seq, g.const([0])), g.const(1))               # (S,)

    b = _Nodes(prefix + "/body")
    it, cond = prefix + "/iter", prefix + "/cond"
    start = b("Mul", it, chunk0)
    end = b("Add", start, chunk0)
    q_c = b("Slice", qg, b("Unsqueeze", start, b.const([0])), b("Unsqueeze", end, b.const([0])), b.const([3]))
    scores = b("MatMul", q_c, kt)  # (B, Hkv, R, C', S)
    ok = visible
    if at["causal"]:
        rows = b("Unsqueeze", b("Range", start, end, b.const(1)), b.const([1]))                  # (C', 1)
        ok = b("And", visible, b("LessOrEqual", cols, rows))  # (B, 1, 1, C', S)
    probs = b("Softmax", b("Where", ok, scores, b.const(MASKED, np.float32)), axis=-1)
    o_c = b("MatMul", b("Cast", probs, to=at["out_dtype"]), vg, out=prefix + "/o_chunk")  # (B, Hkv, R, C', D)
    b("Identity", cond, out=prefix + "/cond_out")
    body = helper.make_graph(
        b.nodes, prefix.replace("/", "_") + "_body",
        [helper.make_tensor_value_info(it, I64, []), helper.make_tensor_value_info(cond, BOOL, [])],
        [helper.make_tensor_value_info(prefix + "/cond_out", BOOL, []),
         helper.make_tensor_value_info(o_c, at["out_dtype"], None)])
    stacked = g("Loop", g("Squeeze", n_chunks, g.const([0])), "", body=body)  # (N, B, Hkv, R, C', D)
    o = g("Transpose", stacked, perm=[1, 2, 3, 0, 4, 5])  # (B, Hkv, R, N, C', D)
    o = g("Reshape", o, g.const([0, H, -1, D]))   # (B, H, N C', D)
    g("Slice", o, g.const([0]), seq, g.const([2]), out=node.output[0])  # (B, H, S, D)
    return g.nodes


def _expand_attention(model):
    """Rewrite every ChunkedAttention placeholder of ``model`` (an onnx ModelProto) in place."""
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.domain != "jv5fast":
            nodes.append(node)
        elif node.op_type == "ChunkedAttention":
            nodes.extend(_attention_loop(node, f"attention_{i}"))
        else:
            raise RuntimeError(f"unexpected placeholder {node.domain}::{node.op_type} in the traced graph")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != "jv5fast"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


class PaddedBackbone(nn.Module):
    """The engine's backbone on padded (B, S) inputs, written with ONNX-exportable ops only; weights in
    ``dtype``, RoPE in fp32 whatever the dtype."""

    def __init__(self, model, truncate_dim=None, dtype=torch.float32):
        super().__init__()
        a = self.args = model.args
        self.truncate_dim = truncate_dim
        self.embed = nn.Parameter(model.embed.detach().to(dtype, copy=True), requires_grad=False)
        self.norm = nn.Parameter(model.norm.detach().to(dtype, copy=True), requires_grad=False)
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList()
        for layer in model.layers:
            m = nn.Module()
            for name, t in layer.items():
                setattr(m, name, nn.Parameter(t.detach().to(dtype, copy=True), requires_grad=False))
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
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq              # (B, S, D/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, :, None, :], emb.sin()[:, :, None, :]         # (B, S, 1, D) fp32
        x = F.embedding(input_ids, self.embed)                                # (B, S, E)
        half = D // 2

        def rope(t):  # fp32 out: attention reads q and k in fp32 anyway, so they are never rounded to fp16
            t = t.float()
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
            q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, S, D)  # (B, H or Hkv, S, D)
            o = _ChunkedAttention.apply(q, k, v, mask, a.causal, D ** -0.5, ATTENTION_CHUNK, H, Hkv, D)
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


def export_onnx(model_name_or_path, out_dir, *, task=None, dtype="float32", opset=None, truncate_dim=None,
                quantize=None, external_data=None, overwrite=False):
    """Export ``model_name_or_path`` with ``task``'s adapter merged to ``out_dir``; returns the metadata dict.

    dtype "float32" | "float16"; opset default 17; ``external_data`` None = only above 2 GB, True forces
    ``model.onnx_data`` beside ``model.onnx``; ``quantize="int8"`` adds ``model_int8.onnx`` (dynamic
    quantization for CPU) and measures its quality against the float graph (stored in the metadata).
    ``task`` None: the engine's default (retrieval, or the task a merged checkpoint holds).
    """
    onnx = require_onnx("onnx")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r} is not supported for export; choose 'float32' or 'float16'")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize {quantize!r} is not supported; choose None or 'int8'")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, (int, np.integer))):
        raise ValueError(f"opset must be an int >= 14 or None (17), got {opset!r}")
    opset = 17 if opset is None else int(opset)
    if opset < 14:
        raise ValueError(f"opset {opset} is too old; jv5fast exports with opset >= 14 (default 17)")
    from torch.onnx import _constants  # the exporter's own bound; checked here, before any work
    top = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
    if top is not None and opset > top:
        raise ValueError(f"opset {opset} is newer than this torch's exporter supports; choose 14..{top} (default 17)")
    out_dir = os.path.abspath(str(out_dir))
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"output folder {out_dir} exists; pass overwrite=True to replace it")
        _check_replaceable(out_dir)  # fail before the (long) export, not after
    # the checkpoint with the task's adapter merged in fp32, as the torch engine serves it (checkpoint.py)
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"model_name_or_path must be a str or os.PathLike (a checkpoint folder or a hub id), "
                        f"got {type(model_name_or_path).__name__}: {reprlib.repr(model_name_or_path)}")
    folder = resolve_checkpoint(str(model_name_or_path))
    args = load_model_args(folder)
    tokenizer = Tokenizer(folder, args.max_position_embeddings)
    prompts, default_prompt_name = load_prompts(folder)
    model, adapters, base = open_checkpoint(folder, args, torch.device("cpu"), torch.float32)
    merged = None if adapters else merged_task_from_name(str(model_name_or_path))
    task = default_task(adapters, merged) if task is None else check_task(task, adapters, merged, folder)
    merge(model, base, adapters.get(task) if task is not None else None)
    del adapters, base
    if truncate_dim is not None:
        truncate_dim = check_truncate_dim(truncate_dim, args.hidden_size)  # a plain int (numpy ints are not JSON)
    module = PaddedBackbone(model, truncate_dim, getattr(torch, dtype)).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = bool(external_data) if external_data is not None else n_bytes > EXTERNAL_DATA_THRESHOLD
    meta = {
        "format": "jv5fast-onnx", "format_version": FORMAT_VERSION, "model_type": args.family,
        "task": task, "dim": args.hidden_size, "truncate_dim": truncate_dim, "max_length": tokenizer.max_length,
        "prompts": prompts, "default_prompt_name": default_prompt_name, "dtype": dtype,
        "opset": opset, "external_data": external, "inputs": ["input_ids", "attention_mask"],
        "outputs": ["last_hidden_state", "sentence_embedding"], "padding": "right or left",
    }

    parent = os.path.dirname(out_dir)
    created = []  # parent folders this export makes, removed again (if still empty) when it fails
    d = parent
    while not os.path.isdir(d) and d != os.path.dirname(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".jv5fast-export-", dir=parent)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        raw = os.path.join(tmp, "raw", "model.onnx")
        os.makedirs(os.path.dirname(raw))
        ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]], dtype=torch.int64)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (ids, mask), raw, dynamo=False, opset_version=opset, custom_opsets={"jv5fast": 1},
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state", "sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                              "attention_mask": {0: "batch_size", 1: "sequence_length"},
                              "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                              "sentence_embedding": {0: "batch_size"}},
                do_constant_folding=True)
        proto = onnx.load(raw)  # pulls in external data the exporter may have written
        _expand_attention(proto)
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        model_path = os.path.join(tmp, "model.onnx")
        onnx.save_model(proto, model_path, save_as_external_data=external, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
        shutil.rmtree(os.path.dirname(raw))
        onnx.checker.check_model(model_path)
        for name in COPIED_FILES:
            src = os.path.join(folder, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(tmp, name))
        if quantize == "int8":  # quality measured on the texts as the engine feeds them: default prompt first
            prefix = prompts[default_prompt_name] if default_prompt_name is not None else ""
            ids, _ = tokenizer.encode([prefix + t for t in QUALITY_TEXTS])
            meta["int8"] = quantize_int8(model_path, os.path.join(tmp, "model_int8.onnx"), ids)
        with open(os.path.join(tmp, "jv5fast_onnx.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # mkdtemp made the staging folder 0700 (private while incomplete); the finished export follows the
        # umask like any folder the user makes, so it can be shared as a model folder can.
        os.chmod(tmp, 0o777 & ~_umask())
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException as e:  # Ctrl-C too: never leave a hidden, possibly multi-GB temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if not isinstance(e, Exception) or isinstance(e, (ValueError, FileExistsError, _StrandedExport,
                                                          ModuleNotFoundError)):
            raise
        raise RuntimeError(f"ONNX export of {model_name_or_path!r} failed ({type(e).__name__}: {e}); "
                           f"nothing was written to {out_dir}") from e
    return meta


def _umask() -> int:
    """The process umask. Linux reports it in /proc (no window in which it is changed); elsewhere it is
    read by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_empty(folders):
    """Remove the folders an export created (innermost first), stopping at the first one not empty."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            break


class _StrandedExport(RuntimeError):
    """Neither the new nor the previous export could be moved to the output folder."""


def _check_replaceable(path):
    """Raise FileExistsError unless ``path`` is a previous jv5fast export that holds only files an export
    writes, so that ``overwrite=True`` can never delete a user's file."""
    why = None
    real = os.path.realpath(path)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was deleted
        cwd = None
    meta_path = os.path.join(path, "jv5fast_onnx.json")
    if os.path.islink(path):
        why = "it is a symbolic link"
    elif not os.path.isdir(path):
        why = "it is not a folder"
    elif cwd is not None and os.path.commonpath([cwd, real]) == real:
        why = "it is the current working directory or contains it"
    elif not os.path.isfile(meta_path):
        why = "it is not a jv5fast ONNX export (it has no jv5fast_onnx.json)"
    else:
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            meta = e
        if not isinstance(meta, dict) or meta.get("format") != "jv5fast-onnx":
            why = f"its jv5fast_onnx.json is not jv5fast ONNX metadata (format 'jv5fast-onnx'): {meta_path}"
        else:
            extra = sorted(set(os.listdir(path)) - EXPORT_FILES)
            if extra:
                why = (f"it holds files that an export does not write, which overwrite would delete: "
                       f"{', '.join(extra)}; move them elsewhere or remove the folder yourself")
    if why is not None:
        raise FileExistsError(f"refusing to overwrite {path}: {why}. Only a previous jv5fast ONNX export is "
                              f"replaced; nothing was deleted")


def _move_into_place(tmp, out_dir, overwrite):
    """Rename the finished export ``tmp`` to ``out_dir``. A previous export there is checked again (it may
    have changed or appeared during the export), renamed aside (POSIX renames only onto an empty folder),
    put back if the move fails and deleted only once the new folder is in place."""
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out_dir} appeared during the export; pass overwrite=True to "
                              f"replace it")
    _check_replaceable(out_dir)
    old = tmp + ".old"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException as e:
        try:
            os.replace(old, out_dir)
        except OSError:
            raise _StrandedExport(f"could not move the new export to {out_dir} ({e}) nor put the previous "
                                  f"one back; the previous export is at {old}") from e
        raise
    shutil.rmtree(old, ignore_errors=True)
