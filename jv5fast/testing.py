"""Checkpoints in the released layout, written from a seed — for tests and benchmarks (no downloads).

``write_checkpoint(path, family, size)`` writes config.json, model.safetensors (bf16, optionally
sharded and/or with ``model.`` key prefixes), four PEFT LoRA adapters, tokenizer.json and the
sentence-transformers files. Tokenizers are the real ones, rebuilt offline from the BPE vocabularies
in the PyPI package ``quicktok-v1`` (``qwen3`` = small's ids, ``llama3`` = nano's ids): merges are
derived from the BPE ranks, the pre-tokenizer regex and byte-level mapping are the published ones.
Without quicktok a tiny byte-level vocabulary is used instead.

``reference_embed`` is the peer the engine is tested against: transformers' own ``Qwen3Model`` /
``EuroBertModel`` on right-padded batches with last-token pooling (what sentence-transformers does).
"""
from __future__ import annotations

import json
import os
import struct

import torch

from .config import TASKS  # re-exported: tests and benches import it from here

QWEN3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# name → (family, config fields). "full" are the released shapes; "tiny" keep the real vocabularies
# (so the real tokenizers fit) and shrink everything else; head_dim != hidden/heads for small on purpose.
SIZES = {
    ("small", "full"): dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    ("small", "tiny"): dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    ("nano", "full"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=12),
    ("nano", "tiny"): dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4),
}


# ---- tokenizers -------------------------------------------------------------------------------------
def _byte_to_unicode():
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _quicktok_data(kind):
    import quicktok  # noqa: F401  (only its data files are used)
    d = os.path.join(os.path.dirname(quicktok.__file__), "data")
    with open(os.path.join(d, f"{kind}.vocab"), "rb") as f:
        b = f.read()
    (n,), off, ranks = struct.unpack_from("<I", b, 0), 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", b, off)
        tok = b[off + 2: off + 2 + ln]
        (rank,) = struct.unpack_from("<I", b, off + 2 + ln)
        ranks[tok] = rank
        off += 6 + ln
    with open(os.path.join(d, f"{kind}.special"), "rb") as f:
        b = f.read()
    (n,), off, special = struct.unpack_from("<I", b, 0), 4, {}
    for _ in range(n):
        rank, ln = struct.unpack_from("<IH", b, off)
        special[b[off + 6: off + 6 + ln].decode()] = rank
        off += 6 + ln
    return ranks, special


def _merges_from_ranks(ranks):
    """BPE merges from tiktoken-style ranks: each token of 2+ bytes is produced by merging any split of
    it into two tokens; merges are ordered by the rank of the token they produce."""
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        splits = [(ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                  if tok[:i] in ranks and tok[i:] in ranks]
        merges.extend((rank, rl, rr, left, right) for rl, rr, left, right in splits)
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def build_tokenizer(kind: str):
    """A ``tokenizers.Tokenizer`` equal to the released one: kind 'qwen3' (small) or 'llama3' (nano)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks, special = _quicktok_data(kind)
    b2u = _byte_to_unicode()

    def s(b):
        return "".join(b2u[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = [(s(a), s(b)) for a, b in _merges_from_ranks(ranks)]
    tok = Tokenizer(BPE(vocab, merges, ignore_merges=(kind == "llama3"), fuse_unk=False, byte_fallback=False))
    pattern = QWEN3_PATTERN if kind == "qwen3" else LLAMA3_PATTERN
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    if kind == "qwen3":
        tok.normalizer = normalizers.NFC()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        names = sorted(special, key=special.get)
    else:
        # EuroBERT renames two reserved Llama-3 slots: <|mask|> 128002, <|pad|> 128004.
        special = {{"<|reserved_special_token_0|>": "<|mask|>", "<|reserved_special_token_2|>": "<|pad|>"}.get(k, k): v
                   for k, v in special.items()}
        names = sorted(special, key=special.get)
        eos = "<|end_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, special[eos])])
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for n in names:
        if tok.token_to_id(n) != special[n]:
            raise RuntimeError(f"special token {n} got id {tok.token_to_id(n)}, expected {special[n]}")
    return tok


def _tiny_tokenizer(kind: str):
    """Fallback without quicktok: a byte-level BPE with a 256-byte alphabet and no merges, whose
    special ids sit where the real ones do (the id space between is filled with unused entries)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    b2u = _byte_to_unicode()
    if kind == "qwen3":
        specials = {"<|endoftext|>": 151643}
    else:
        specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|mask|>": 128002, "<|pad|>": 128004}
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({f"<|unused_{i}|>": i for i in range(256, max(specials.values()) + 1)})
    vocab.update(specials)
    tok = Tokenizer(BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|end_of_text|>:0", pair="$A:0 <|end_of_text|>:0 $B:1 <|end_of_text|>:1",
            special_tokens=[("<|end_of_text|>", 128001)])
    return tok


_TOKENIZER_CACHE: dict = {}


def tokenizer_json(kind: str, real: bool | None = None) -> str:
    """tokenizer.json text for 'qwen3' or 'llama3' (real when quicktok is installed, unless real=False)."""
    if real is None:
        try:
            import quicktok  # noqa: F401
            real = True
        except ImportError:
            real = False
    key = (kind, real)
    if key not in _TOKENIZER_CACHE:
        tok = build_tokenizer(kind) if real else _tiny_tokenizer(kind)
        _TOKENIZER_CACHE[key] = tok.to_str()
    return _TOKENIZER_CACHE[key]


# ---- checkpoints ------------------------------------------------------------------------------------
def hf_config(family: str, size: str = "tiny", merged: bool = False) -> dict:
    """config.json as released (``merged=False``) or as in the per-task merged repos."""
    dims = dict(SIZES[(family, size)])
    if family == "small":
        cfg = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=3500000.0, max_position_embeddings=32768,
                   hidden_act="silu", attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=dims["num_hidden_layers"], rope_scaling=None, tie_word_embeddings=True,
                   bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16", attention_dropout=0.0,
                   initializer_range=0.02, use_cache=False, **dims)
        if merged:
            cfg.update(model_type="qwen3", architectures=["Qwen3Model"], transformers_version="5.1.0")
        else:
            cfg.update(model_type="jina_embeddings_v5", architectures=["JinaEmbeddingsV5Model"],
                       task_names=list(TASKS), transformers_version="4.51.0")
    else:
        cfg = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=8192,
                   hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None,
                   tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
                   mask_token_id=128002, torch_dtype="float32", attention_dropout=0.0, initializer_range=0.02,
                   **dims)
        if merged:
            cfg.update(model_type="eurobert", architectures=["EuroBertModel"])
        else:
            cfg.update(model_type="jina_embeddings_v5", architectures=["JinaEmbeddingsV5Model"], is_decoder=False,
                       task_names=list(TASKS), transformers_version="4.40.0.dev0")
    return cfg


def random_weights(cfg: dict, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Backbone tensors (keys without prefix). Norm weights are 1 ± 0.2 so that they matter."""
    from .config import ModelArgs
    from .loading import expected_shapes
    args = ModelArgs.from_hf_config(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(args).items():
        if len(shape) == 1:
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key == "embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (shape[1] ** -0.5)
        out[key] = t.to(dtype)
    return out


def random_adapter(cfg: dict, seed: int, r: int, dtype=torch.bfloat16) -> dict:
    """PEFT-named LoRA factors for all 7 projections of every layer."""
    from .config import ModelArgs
    from .loading import expected_shapes
    args = ModelArgs.from_hf_config(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (n_out, n_in) in ((k, s) for k, s in expected_shapes(args).items() if k.endswith("_proj.weight")):
        stem = "base_model.model." + key[: -len(".weight")]
        out[stem + ".lora_A.weight"] = (torch.randn(r, n_in, generator=g) * n_in ** -0.5).to(dtype)
        out[stem + ".lora_B.weight"] = (torch.randn(n_out, r, generator=g) * 0.5 * r ** -0.5).to(dtype)
    return out


def merge_adapter(weights: dict, adapter: dict, scale: float) -> dict:
    """base + s·B·A in fp32 (returns fp32 tensors): the merged per-task checkpoint."""
    merged = {k: v.float().clone() for k, v in weights.items()}
    for k, a in adapter.items():
        if ".lora_A." in k:
            base = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            b = adapter[k.replace(".lora_A.", ".lora_B.")]
            merged[base] += scale * (b.float() @ a.float())
    return merged


def _save_safetensors(tensors: dict, folder: str, shards: int, prefix: str):
    from safetensors.torch import save_file
    items = [(prefix + k, v.contiguous()) for k, v in tensors.items()]
    if shards <= 1:
        save_file(dict(items), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(items) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = dict(items[s * per:(s + 1) * per])
        save_file(chunk, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    total = sum(v.numel() * v.element_size() for _, v in items)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def write_checkpoint(path, family: str = "nano", size: str = "tiny", seed: int = 0, *, tasks=TASKS,
                     lora_r: int | None = None, lora_alpha: float | None = None, dtype=torch.bfloat16,
                     key_prefix: bool = False, shards: int = 1, merged_task: str | None = None,
                     real_tokenizer: bool | None = None, config_overrides: dict | None = None) -> str:
    """Write a checkpoint folder; returns ``path``.

    family 'small' | 'nano'; size 'tiny' | 'full'. ``merged_task`` writes a per-task merged repo
    (plain Qwen3 / EuroBERT config, no adapters) of that task's adapter merged in fp32.
    """
    if (family, size) not in SIZES:
        families, sizes = sorted({f for f, _ in SIZES}), sorted({z for _, z in SIZES})
        raise ValueError(f"unknown family/size {family!r}/{size!r}; family is one of {', '.join(families)}, "
                         f"size one of {', '.join(sizes)}")
    os.makedirs(path, exist_ok=True)
    cfg = hf_config(family, size, merged=merged_task is not None)
    if merged_task is None:
        cfg["task_names"] = [t for t in TASKS if t in tasks]
    cfg.update(config_overrides or {})
    # A merged repo is the released bf16 base + bf16 adapter merged in fp32, then stored in ``dtype``.
    src_dtype = torch.bfloat16 if merged_task is not None else dtype
    weights = random_weights(cfg, seed, src_dtype)
    r = lora_r or (32 if size == "full" else 4)
    alpha = lora_alpha if lora_alpha is not None else (32.0 if size == "full" else 2.0 * r)
    adapters = {t: random_adapter(cfg, seed * 100 + i + 1, r, src_dtype)
                for i, t in enumerate(TASKS) if t in tasks}
    if merged_task is not None:
        weights = {k: v.to(dtype) for k, v in merge_adapter(weights, adapters[merged_task], alpha / r).items()}
        adapters = {}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    _save_safetensors(weights, path, shards, "model." if key_prefix else "")
    from safetensors.torch import save_file
    for task, tensors in adapters.items():
        d = os.path.join(path, "adapters", task)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": r, "lora_alpha": alpha,
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"],
                       "lora_dropout": 0.1, "bias": "none", "use_dora": False, "use_rslora": False,
                       "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": "gaussian",
                       "base_model_name_or_path": path}, f, indent=2)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    kind = "qwen3" if family == "small" else "llama3"
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json(kind, real_tokenizer))
    tok_cfg = {"tokenizer_class": "Qwen2Tokenizer" if family == "small" else "PreTrainedTokenizerFast",
               "model_max_length": cfg["max_position_embeddings"]}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"query": "Query: ", "document": "Document: "}, "default_prompt_name": "document",
                   "similarity_fn_name": "cosine"}, f, indent=2)
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "transformer", "path": "", "type": "custom_st.Transformer",
                    "kwargs": ["task", "truncate_dim"]}], f, indent=2)
    return path


# ---- the reference peer ----------------------------------------------------------------------------
def reference_model(path: str, task: str | None = None, dtype=torch.float32, device="cpu", attn="sdpa"):
    """transformers' own Qwen3Model / EuroBertModel with ``task``'s adapter merged in fp32."""
    from transformers import EuroBertConfig, EuroBertModel, Qwen3Config, Qwen3Model

    from .config import QWEN3, detect_family, read_json
    from .loading import load_adapter, load_weights
    from .config import ModelArgs
    cfg = read_json(os.path.join(path, "config.json"))
    args = ModelArgs.from_hf_config(cfg)
    weights = {k: v.float() for k, v in load_weights(path, args).items()}
    if task is not None:
        ad = load_adapter(os.path.join(path, "adapters", task), task, args)
        for k in ad.factors:
            weights[k] = weights[k] + ad.delta(k)
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map", "task_names",
                                                         "is_decoder", "transformers_version", "torch_dtype")}
    if detect_family(cfg) == QWEN3:
        model = Qwen3Model(Qwen3Config(**fields, attn_implementation=attn))
    else:
        model = EuroBertModel(EuroBertConfig(**fields, attn_implementation=attn))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"reference model: missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def reference_embed(model, token_ids, *, truncate_dim=None, normalize=True, batch_size=32, device="cpu"):
    """What sentence-transformers does: length-sorted, right-padded batches, last real token."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    out = [None] * len(token_ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        S = max(len(token_ids[i]) for i in idx)
        ids = torch.zeros(len(idx), S, dtype=torch.long)
        mask = torch.zeros(len(idx), S, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[r, :len(token_ids[i])] = 1
        hs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        last = hs[torch.arange(len(idx), device=hs.device), mask.to(device).sum(1) - 1].float()
        if truncate_dim is not None:
            last = last[:, :truncate_dim]
        if normalize:
            last = torch.nn.functional.normalize(last, dim=-1)
        last = last.cpu()  # one copy per batch, not one per row
        for r, i in enumerate(idx):
            out[i] = last[r]
    return torch.stack(out)


# ---- tolerances (style.md: bounded by torch's own low-precision error plus a floor per dtype) --------
TOL_FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_close_dtype(out, ref32, ref_lowp, dtype, mult, name=""):
    """out, ref_lowp: results in ``dtype``; ref32: the fp32 reference on the same (upcast) inputs.
    The kernel's error must stay within ``mult`` × torch's own error in ``dtype`` plus the floor."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out.float() - ref32).abs().max().item()
    torch_err = (ref_lowp.float() - ref32).abs().max().item()
    bound = mult * torch_err + TOL_FLOOR[dtype]
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own {torch_err:.3g})"
