"""Model configuration read from a checkpoint's config.json.

Which backbone a checkpoint is follows model-spec.md §2.5: ``model_type`` "jina_embeddings_v5" with
``is_decoder: false`` is EuroBERT (bidirectional, no QK-norm); absent/true is Qwen3 (causal, QK-norm);
plain "qwen3" / "eurobert" configs are the per-task merged repos. Every number comes from the file;
nothing is defaulted to a model constant (a missing required key is an error naming it).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

# The released task adapters, in the order of config.json task_names (model-spec.md §7).
TASKS = ("retrieval", "text-matching", "clustering", "classification")

QWEN3, EUROBERT = "qwen3", "eurobert"


@dataclass(frozen=True)
class ModelArgs:
    family: str                   # "qwen3" (small; causal, QK-norm) or "eurobert" (nano; bidirectional)
    vocab_size: int
    hidden_size: int              # E, the embedding dim
    intermediate_size: int        # SwiGLU width F
    num_layers: int
    num_heads: int                # H query heads
    num_kv_heads: int             # Hkv
    head_dim: int                 # D (Qwen3 states it; EuroBERT derives hidden/heads)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    causal: bool
    qk_norm: bool
    task_names: tuple = ()        # adapters the config announces (base repos only)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        family = detect_family(cfg, source)

        def need(key):
            if key not in cfg or cfg[key] is None:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return cfg[key]

        rope = cfg.get("rope_theta")
        if rope is None and isinstance(cfg.get("rope_parameters"), dict):
            rope = cfg["rope_parameters"].get("rope_theta")
        if rope is None:
            raise ValueError(f"{source}: neither 'rope_theta' nor 'rope_parameters.rope_theta' is set")
        rs = cfg.get("rope_scaling")
        if rs:
            # The hub code maps rope_scaling null to linear x1.0, which is plain RoPE; nothing else is.
            rtype = rs.get("rope_type") or rs.get("type")
            if not (rtype == "default" or (rtype == "linear" and float(rs.get("factor", 1.0)) == 1.0)):
                raise ValueError(f"{source}: rope_scaling {rs!r} is not supported (plain RoPE only)")
        if isinstance(cfg.get("rope_parameters"), dict):
            rt = cfg["rope_parameters"].get("rope_type", "default")
            if rt != "default":
                raise ValueError(f"{source}: rope_type {rt!r} is not supported (plain RoPE only)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError(f"{source}: linear biases are not supported by jina-embeddings-v5 backbones")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (silu only)")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = cfg.get("head_dim") or hidden // heads
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=float(rope),
            max_position_embeddings=int(need("max_position_embeddings")),
            causal=family == QWEN3,
            qk_norm=family == QWEN3,
            task_names=tuple(cfg.get("task_names") or ()),
        )


def detect_family(cfg: dict, source: str = "config.json") -> str:
    mt = cfg.get("model_type")
    if mt == "jina_embeddings_v5":
        return EUROBERT if cfg.get("is_decoder") is False else QWEN3
    if mt == QWEN3:
        return QWEN3
    if mt == EUROBERT:
        return EUROBERT
    raise ValueError(f"{source}: model_type {mt!r} is not supported; expected one of "
                     f"'jina_embeddings_v5', 'qwen3', 'eurobert'")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON file {path}: {e}") from None


def load_model_args(folder: str) -> ModelArgs:
    path = os.path.join(folder, "config.json")
    cfg = read_json(path)
    if cfg.get("jv5fast_random_weights") is True:  # written by `jv5fast make-checkpoint`
        warnings.warn(f"{folder} holds RANDOM weights (jv5fast make-checkpoint): its embeddings are meaningless; "
                      f"use it to try commands and test offline only", UserWarning, stacklevel=3)
    return ModelArgs.from_hf_config(cfg, path)
