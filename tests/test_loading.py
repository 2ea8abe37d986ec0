"""Strict loading: every missing, unexpected, mis-shaped or corrupt file is an error that names it."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import jv5fast
from jv5fast.config import ModelArgs


@pytest.fixture
def ck(ckpt_factory, tmp_path):
    """A private copy of a tiny nano checkpoint that a test may damage."""
    path = str(tmp_path / "ck")
    shutil.copytree(ckpt_factory("nano", seed=31, tasks=("retrieval", "clustering")), path)
    return path


def _edit_weights(path, fn):
    f = os.path.join(path, "model.safetensors")
    w = load_file(f)
    fn(w)
    save_file(w, f)


def _edit_config(path, fn, name="config.json"):
    f = os.path.join(path, name)
    cfg = json.load(open(f))
    fn(cfg)
    json.dump(cfg, open(f, "w"))


def test_missing_tensor(ck):
    _edit_weights(ck, lambda w: w.pop("layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.mlp\.up_proj\.weight.*\(96, 64\)"):
        jv5fast.Engine(ck)


def test_unexpected_tensor(ck):
    _edit_weights(ck, lambda w: w.__setitem__("layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'layers\.0\.extra\.weight'"):
        jv5fast.Engine(ck)


def test_lm_head_is_ignored(ck):
    _edit_weights(ck, lambda w: w.__setitem__("lm_head.weight", torch.zeros(3, 3)))
    assert jv5fast.Engine(ck).embed("x").shape == (64,)


def test_misshaped_tensor_names_both_shapes(ck):
    _edit_weights(ck, lambda w: w.__setitem__("layers.0.self_attn.k_proj.weight", torch.zeros(32, 64)))
    with pytest.raises(ValueError, match=r"k_proj\.weight.* has shape \(32, 64\), expected \(64, 64\)"):
        jv5fast.Engine(ck)


def test_family_mismatch_between_config_and_weights(ck):
    # a nano checkpoint whose config claims Qwen3 lacks q_norm/k_norm: an error, not a silent run
    _edit_config(ck, lambda c: c.pop("is_decoder"))
    with pytest.raises(ValueError, match=r"missing .*q_norm"):
        jv5fast.Engine(ck)


def test_duplicate_key_with_and_without_prefix(ck):
    _edit_weights(ck, lambda w: w.__setitem__("model.norm.weight", w["norm.weight"].clone()))
    with pytest.raises(ValueError, match="appears twice"):
        jv5fast.Engine(ck)


def test_corrupt_and_missing_files(ck):
    with open(os.path.join(ck, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"):
        jv5fast.Engine(ck)
    os.remove(os.path.join(ck, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        jv5fast.Engine(ck)


def test_corrupt_config_and_tokenizer(ck, tmp_path):
    with open(os.path.join(ck, "tokenizer.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"corrupt tokenizer file .*tokenizer\.json"):
        jv5fast.Engine(ck)
    os.remove(os.path.join(ck, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"missing file: .*tokenizer\.json"):
        jv5fast.Engine(ck)
    with open(os.path.join(ck, "config.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(ValueError, match=r"corrupt JSON file .*config\.json"):
        jv5fast.Engine(ck)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        jv5fast.Engine(str(tmp_path / "nope"))


def test_adapter_errors(ck):
    ad = os.path.join(ck, "adapters", "clustering")
    w = load_file(os.path.join(ad, "adapter_model.safetensors"))
    key = next(k for k in w if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    bad = dict(w)
    bad[key] = torch.zeros(5, 64)
    save_file(bad, os.path.join(ad, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.* has shape \(5, 64\), expected \(4, 64\)"):
        jv5fast.Engine(ck)
    bad = dict(w)
    bad.pop(key)
    save_file(bad, os.path.join(ad, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="has lora_B but not both"):
        jv5fast.Engine(ck)
    save_file(w, os.path.join(ad, "adapter_model.safetensors"))
    _edit_config(ck, lambda c: c.__setitem__("use_dora", True), "adapters/clustering/adapter_config.json")
    with pytest.raises(ValueError, match="use_dora=true is not supported"):
        jv5fast.Engine(ck)
    shutil.rmtree(ad)
    with pytest.raises(FileNotFoundError, match=r"adapters/ lacks \['clustering'\]"):
        jv5fast.Engine(ck)


def test_lora_scale_is_read_from_the_file(ck):
    base = jv5fast.Engine(ck, device="cpu")
    a = base.embed("scale check", task="clustering")
    _edit_config(ck, lambda c: c.__setitem__("lora_alpha", c["lora_alpha"] * 2),
                 "adapters/clustering/adapter_config.json")
    b = jv5fast.Engine(ck, device="cpu").embed("scale check", task="clustering")
    assert (a * b).sum() < 0.9999


def test_config_rules():
    from jv5fast.testing import hf_config
    cfg = hf_config("small")
    assert ModelArgs.from_hf_config(cfg).family == "qwen3"
    cfg2 = dict(cfg)
    theta = cfg2.pop("rope_theta")
    cfg2["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}  # transformers >= 5 spelling
    assert ModelArgs.from_hf_config(cfg2).rope_theta == theta
    cfg2.pop("rope_parameters")
    with pytest.raises(ValueError, match="neither 'rope_theta' nor 'rope_parameters.rope_theta'"):
        ModelArgs.from_hf_config(cfg2)
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        ModelArgs.from_hf_config(dict(cfg, model_type="bert"))
    with pytest.raises(ValueError, match="rope_scaling .* is not supported"):
        ModelArgs.from_hf_config(dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    ok = ModelArgs.from_hf_config(dict(cfg, rope_scaling={"type": "linear", "factor": 1.0}))
    assert ok.rope_theta == theta
    nano = ModelArgs.from_hf_config(hf_config("nano"))
    assert (nano.family, nano.causal, nano.qk_norm, nano.head_dim) == ("eurobert", False, False, 16)
    with pytest.raises(ValueError, match="required key 'rms_norm_eps' is missing"):
        ModelArgs.from_hf_config({k: v for k, v in hf_config("nano").items() if k != "rms_norm_eps"})


def test_hub_id_offline_error_says_how_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # the env var is read at import time
    with pytest.raises(OSError, match="pass its local folder path"):
        jv5fast.Engine("jinaai/jina-embeddings-v5-text-nano-does-not-exist")


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "/abs/model.safetensors", "sub/../../x.safetensors",
                                   "..\\x.safetensors", "model-00001-of-00002.bin", 7, ""])
def test_shard_names_must_stay_inside_the_checkpoint(ckpt_factory, tmp_path, entry):
    ck = str(tmp_path / "ck")
    shutil.copytree(ckpt_factory("nano", seed=31, shards=2, tasks=("retrieval",)), ck)
    # a real shard outside the folder that a hostile index points at
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(ck, "model-00001-of-00002.safetensors"), outside / "model.safetensors")
    jv5fast.Engine(ck)  # loads as written
    idx_path = os.path.join(ck, "model.safetensors.index.json")
    with open(idx_path) as f:
        idx = json.load(f)
    first = next(iter(idx["weight_map"]))
    if entry == "/abs/model.safetensors":
        entry = str(outside / "model.safetensors")
    idx["weight_map"][first] = entry
    with open(idx_path, "w") as f:
        json.dump(idx, f)
    with pytest.raises(ValueError, match=rf"weight_map\[{first!r}\]"):
        jv5fast.Engine(ck)
