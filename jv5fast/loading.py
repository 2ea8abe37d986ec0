"""Checkpoint loading: folder or hub id → strict weight map, adapters, tokenizer and prompt files.

Strict in the nanoGPT sense: every tensor the architecture needs must be present with its exact
shape, and anything else is an error naming the key (``lm_head.*`` is ignored; keys may carry a
``model.`` prefix or not, as the released and merged repos differ). LoRA adapters are PEFT files
(model-spec.md §7); they are kept as fp32 (A, B) factors plus their scale, merged on demand.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .config import ModelArgs, read_json

HUB_PATTERNS = [
    "config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "config_sentence_transformers.json", "modules.json", "adapters/*/adapter_config.json",
    "adapters/*/adapter_model.safetensors",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_checkpoint(name_or_path: str) -> str:
    """A local folder as is; anything else is a hub id fetched with snapshot_download (needed files only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or not _HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise FileNotFoundError(f"checkpoint folder not found: {name_or_path!r} (pass a folder in the released "
                                f"layout, or a hub id such as 'jinaai/jina-embeddings-v5-text-nano')")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, auth ...
        raise OSError(f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      f"Without network access, download the repository elsewhere and pass its local folder "
                      f"path instead, e.g. Engine('/models/jina-embeddings-v5-text-nano').") from e


MAX_CHECKPOINT_FILES = 10_000  # a checkpoint folder holds a few dozen; refuse to fingerprint a whole disk


def checkpoint_fingerprint(folder: str, max_files: int | None = None) -> list:
    """``[[relative name ("/"-separated), size, mtime_ns], ...]`` of every file under ``folder`` (hidden entries
    and dangling links left out; sub-folder links not followed, file links followed as a hub snapshot's are),
    sorted. Cheap, and it changes when a file is replaced: the identity of a local checkpoint for the int8
    cache, embed-corpus's resume check and the MTEB revision. More than ``max_files`` (default
    ``MAX_CHECKPOINT_FILES``) files is a ValueError: that is not a checkpoint folder."""
    limit = MAX_CHECKPOINT_FILES if max_files is None else max_files
    entries = []
    for base, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(base, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: not a file the engine can read either
                continue
            entries.append([os.path.relpath(path, folder).replace(os.sep, "/"), st.st_size, st.st_mtime_ns])
            if len(entries) > limit:
                raise ValueError(f"{folder} holds more than {limit} files; it does not look like a checkpoint "
                                 f"folder (pass the folder with config.json and the weights)")
    return sorted(entries)


def expected_shapes(args: ModelArgs) -> dict:
    """Checkpoint key (without prefix) → shape, for every tensor the backbone needs."""
    E, F, D = args.hidden_size, args.intermediate_size, args.head_dim
    dq, dkv = args.num_heads * D, args.num_kv_heads * D
    shapes = {"embed_tokens.weight": (args.vocab_size, E), "norm.weight": (E,)}
    for i in range(args.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (E,),
            p + "post_attention_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (dq, E),
            p + "self_attn.k_proj.weight": (dkv, E),
            p + "self_attn.v_proj.weight": (dkv, E),
            p + "self_attn.o_proj.weight": (E, dq),
            p + "mlp.gate_proj.weight": (F, E),
            p + "mlp.up_proj.weight": (F, E),
            p + "mlp.down_proj.weight": (E, F),
        })
        if args.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
    return shapes


def _safe_open(path):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except Exception as e:
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {e}") from None


def shard_name(index: str, key, name) -> str:
    """A weight_map entry, checked to name a .safetensors file inside the checkpoint folder: a relative
    path without ``..`` (the index is untrusted; it must not make us read files elsewhere). Symlinks are
    not resolved, since the hub cache links every file of a snapshot to a blob outside it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"corrupt index {index}: weight_map[{key!r}] is {name!r}, expected a shard file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in parts or not name.endswith(".safetensors"):
        raise ValueError(f"index {index}: weight_map[{key!r}] = {name!r} is not a .safetensors file inside the "
                         f"checkpoint folder; shard names must be relative paths without '..'")
    return name


def _weight_files(folder: str) -> list:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        idx = read_json(index)
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise ValueError(f"corrupt index {index}: no 'weight_map'")
        names = {shard_name(index, key, f) for key, f in idx["weight_map"].items()}
        return [os.path.join(folder, f) for f in sorted(names)]
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json")


def load_weights(folder: str, args: ModelArgs) -> dict:
    """Read and check every backbone tensor; returns {key without prefix: tensor in storage dtype}."""
    want = expected_shapes(args)
    out, where = {}, {}
    for path in _weight_files(folder):
        with _safe_open(path) as f:
            for raw in f.keys():
                key = raw[len("model."):] if raw.startswith("model.") else raw
                if key.startswith("lm_head.") or raw.startswith("lm_head."):
                    continue
                if key not in want:
                    raise ValueError(f"unexpected tensor {raw!r} in {path} (not part of a {args.family} "
                                     f"backbone with {args.num_layers} layers)")
                if key in out:
                    raise ValueError(f"tensor {key!r} appears twice: in {where[key]} and as {raw!r} in {path}")
                shape = tuple(f.get_slice(raw).get_shape())
                if shape != want[key]:
                    raise ValueError(f"tensor {raw!r} in {path} has shape {shape}, expected {want[key]} "
                                     f"from config.json")
                t = f.get_tensor(raw)
                if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise ValueError(f"tensor {raw!r} in {path} has dtype {t.dtype}; expected a float type")
                out[key], where[key] = t, path
    missing = [k for k in want if k not in out]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {folder}, e.g. "
                         f"{missing[:3]} (shape {want[missing[0]]})")
    return out


@dataclass
class LoraAdapter:
    """One task adapter: base key → (A (r, in), B (out, r)) as stored, and the scale alpha/r."""
    task: str
    scale: float
    factors: dict

    def delta(self, key: str):
        """s * B @ A in fp32 for a base key, or None when the adapter does not touch it."""
        ab = self.factors.get(key)
        if ab is None:
            return None
        return (ab[1].float() @ ab[0].float()) * self.scale

    def to(self, device) -> "LoraAdapter":
        self.factors = {k: (a.to(device), b.to(device)) for k, (a, b) in self.factors.items()}
        return self


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(layers\.\d+\.(?:self_attn|mlp)\.(\w+))"
                       r"\.lora_([AB])(?:\.default)?\.weight$")


def load_adapter(folder: str, task: str, args: ModelArgs) -> LoraAdapter:
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key}=true is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: adapters with bias or modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_path}: rank_pattern/alpha_pattern are not supported")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cfg_path}: 'r' and 'lora_alpha' must be numbers") from None
    if r <= 0:
        raise ValueError(f"{cfg_path}: r must be positive, got {r}")
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # PEFT allows a regex string
        targets = [t for t in LORA_TARGETS if re.search(targets, t)]
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"{cfg_path}: target_modules {bad} are not supported; valid: {list(LORA_TARGETS)}")
    want = expected_shapes(args)
    parts = {}
    path = os.path.join(folder, "adapter_model.safetensors")
    with _safe_open(path) as f:
        for raw in f.keys():
            m = _LORA_KEY.match(raw)
            if not m or m.group(2) not in targets:
                raise ValueError(f"unexpected tensor {raw!r} in {path}; expected LoRA factors of {targets}")
            base = m.group(1) + ".weight"
            if base not in want:
                raise ValueError(f"tensor {raw!r} in {path} targets {base!r}, which the backbone does not have")
            out_f, in_f = want[base]
            exp = (r, in_f) if m.group(3) == "A" else (out_f, r)
            shape = tuple(f.get_slice(raw).get_shape())
            if shape != exp:
                raise ValueError(f"tensor {raw!r} in {path} has shape {shape}, expected {exp}")
            t = f.get_tensor(raw)
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"tensor {raw!r} in {path} has dtype {t.dtype}; expected a float type")
            parts.setdefault(base, {})[m.group(3)] = t
    factors = {}
    for base, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {base!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        factors[base] = (ab["A"], ab["B"])
    if not factors:
        raise ValueError(f"{path}: no LoRA tensors found")
    return LoraAdapter(task=task, scale=scale, factors=factors)


def list_adapter_tasks(folder: str) -> list:
    root = os.path.join(folder, "adapters")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def load_adapters(folder: str, args: ModelArgs) -> dict:
    """task → LoraAdapter for every folder under adapters/ (order: config task_names, then the rest)."""
    found = list_adapter_tasks(folder)
    missing = [t for t in args.task_names if t not in found]
    if found and missing:
        raise FileNotFoundError(f"config.json names tasks {list(args.task_names)} but adapters/ lacks {missing}")
    order = [t for t in args.task_names if t in found] + [t for t in found if t not in args.task_names]
    return {t: load_adapter(os.path.join(folder, "adapters", t), t, args) for t in order}


def load_prompts(folder: str):
    """(prompts dict, default prompt name) from config_sentence_transformers.json, with the released defaults."""
    path = os.path.join(folder, "config_sentence_transformers.json")
    prompts, default = {"query": "Query: ", "document": "Document: "}, "document"
    if os.path.exists(path):
        cfg = read_json(path)
        prompts = dict(cfg.get("prompts") or prompts)
        default = cfg.get("default_prompt_name", default)
        if default is not None and default not in prompts:
            raise ValueError(f"{path}: default_prompt_name {default!r} is not one of the prompts {list(prompts)}")
    return prompts, default
