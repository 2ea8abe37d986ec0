"""onnxruntime backend: run a folder written by ``export_onnx`` behind the engine's packed-batch interface.

The engine keeps its own tokenization, prompts, batching and post-processing; this module turns a
packed batch into the right-padded (B, S) arrays the graph takes and returns each sequence's last
hidden state (B, E) — the same contract as ``Backbone.forward(batch, last_only=True)``. ``require_onnx``
is the one place that says which extra installs onnx / onnxruntime (the export uses it too).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .batching import PackedBatch


def require_onnx(name: str):
    """Import ``onnx`` / ``onnxruntime``, or say which extra installs it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ModuleNotFoundError(f"{name} is not installed; the ONNX export and backend need the onnx extra: "
                                  f'pip install "jv5fast[onnx]"', name=name) from None


def read_metadata(folder: str) -> dict:
    path = os.path.join(folder, "jv5fast_onnx.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a jv5fast ONNX export: missing {path}")
    from .config import read_json
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "jv5fast-onnx":
        raise ValueError(f"{path}: not a jv5fast ONNX metadata file")

    def positive_int(key, optional=False):
        v = meta.get(key)
        if (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return
        raise ValueError(f"{path}: field {key!r} is {v!r}, expected a positive integer"
                         + (" or null" if optional else ""))
    # the file is untrusted: every field the engine reads is checked before it is used
    if meta.get("dtype") not in ("float32", "float16"):
        raise ValueError(f"{path}: field 'dtype' is {meta.get('dtype')!r}, expected 'float32' or 'float16'")
    positive_int("max_length")
    positive_int("dim", optional=True)
    positive_int("truncate_dim", optional=True)
    task = meta.get("task")
    if task is not None and (not isinstance(task, str) or not task):
        raise ValueError(f"{path}: field 'task' is {task!r}, expected a task name or null")
    return meta


class OnnxSession:
    """An onnxruntime session over one exported graph (CUDA provider first when available)."""

    def __init__(self, model_path: str, device: str = "cpu"):
        ort = require_onnx("onnxruntime")
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"missing file: {model_path}")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the one thread knob: torch.set_num_threads
        try:
            self.session = ort.InferenceSession(model_path, options, providers=providers)
        except Exception as e:
            raise ValueError(f"corrupt or unreadable ONNX model {model_path}: {e}") from None
        self.model_path = model_path

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        hidden, pooled = self.session.run(["last_hidden_state", "sentence_embedding"],
                                          {"input_ids": input_ids, "attention_mask": attention_mask})
        return hidden, pooled

    def pooled(self, token_ids, batch_size: int = 16) -> np.ndarray:
        """sentence_embedding for lists of token ids (right-padded batches)."""
        out = []
        for s in range(0, len(token_ids), batch_size):
            ids, mask = pad_right(token_ids[s:s + batch_size])
            out.append(self.run(ids, mask)[1])
        return np.concatenate(out).astype(np.float32)


def pad_right(seqs):
    S = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), S), dtype=np.int64)
    mask = np.zeros((len(seqs), S), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask


class OnnxBackbone:
    """Drop-in for ``Backbone`` in the engine: ``forward(batch, last_only=True)`` -> (B, E) float32."""

    def __init__(self, folder: str, file: str = "model.onnx", device: str = "cpu"):
        self.session = OnnxSession(os.path.join(folder, file), device)

    def forward(self, batch: PackedBatch, last_only: bool = True) -> torch.Tensor:
        if not last_only:
            raise ValueError("the ONNX backend returns pooled rows only")
        cu = batch.cu_seqlens.cpu().numpy()
        flat = batch.input_ids.cpu().numpy()
        seqs = [flat[s:e] for s, e in zip(cu[:-1], cu[1:])]
        ids, mask = pad_right(seqs)
        hidden, _ = self.session.run(ids, mask)
        lens = np.diff(cu)
        rows = hidden[np.arange(len(seqs)), lens - 1].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows))


def onnx_file_for(folder: str, quantize: str | None) -> str:
    if quantize in (None, "none"):
        return "model.onnx"
    if quantize == "int8":
        if not os.path.exists(os.path.join(folder, "model_int8.onnx")):
            raise FileNotFoundError(f"{folder} has no model_int8.onnx; export with quantize='int8'")
        return "model_int8.onnx"
    raise ValueError(f"quantize {quantize!r} is not valid; choose None or 'int8'")
