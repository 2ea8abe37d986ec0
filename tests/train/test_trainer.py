"""Trainer: each stage trains (the loss falls), writes what Engine loads, resumes exactly, rejects bad config."""
import os
import shutil

import numpy as np
import pytest
import torch

import jv5fast
from jv5fast.batching import PackedBatch
from jv5fast.train.model import TrainModel
from jv5fast.train.trainer import TrainConfig, Trainer

WORDS = "light speed vacuum cat dog tree river mountain city music code paper science ocean bread".split()


def char_trigram_teacher(dim=24, seed=0):
    """A deterministic stand-in teacher: hashed character trigrams through a fixed random projection."""
    W = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float32)

    def teacher(texts):
        out = np.zeros((len(texts), 256), np.float32)
        for r, t in enumerate(texts):
            for i in range(len(t) - 2):
                out[r, sum(map(ord, t[i:i + 3])) % 256] += 1
        return out @ W
    return teacher


def pairs(n=48, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = list(rng.choice(WORDS, 6))
        out.append({"query": " ".join(w[:3]), "document": " ".join(w), "negatives": [" ".join(rng.choice(WORDS, 5))]})
    return out


@pytest.fixture
def student(ckpt_factory, tmp_path):
    path = str(tmp_path / "student")
    shutil.copytree(ckpt_factory("nano", seed=61, tasks=()), path)
    return path


def _falls(history, key="loss"):
    v = [h[key] for h in history]
    return np.mean(v[-3:]) < np.mean(v[:3])


def test_stage1_then_retrieval_adapter(student, tmp_path):
    out = str(tmp_path / "out")
    teacher = char_trigram_teacher()
    h = Trainer(TrainConfig(stage="distill", student=student, output=out, steps=10, batch_size=8, lr=3e-3),
                pairs(), teacher=teacher).train(progress=False)
    assert _falls(h)
    assert os.path.exists(os.path.join(out, "projection.safetensors"))
    base = jv5fast.Engine(out)
    texts = ["cat dog tree", "music code", "x"]
    before = base.embed(texts)
    assert not np.allclose(before, jv5fast.Engine(student).embed(texts), atol=1e-3)  # the backbone moved
    tr = Trainer(TrainConfig(stage="retrieval", student=out, output=out, steps=8, batch_size=8, lr=3e-3),
                 pairs(seed=2), teacher=teacher)
    assert tr.model.load_projection(out)  # ψ reused
    h = tr.train(progress=False)
    assert {"nce", "distill", "gor"} <= set(h[-1]) and _falls(h)
    eng = jv5fast.Engine(out, task="retrieval")
    got = eng.encode_query(texts)
    assert (got * before).sum(1).min() < 0.9999  # the adapter changes the embeddings
    # and the engine reproduces the trainer's own forward pass with the saved adapter
    ids = eng.tokenize(texts, prompt_name="query")
    with torch.no_grad():
        mine = tr.model.embed(PackedBatch.from_ids(ids)).numpy()
    assert (got * mine).sum(1).min() >= 0.99999


def test_gor_off_and_text_matching_and_classification(student, tmp_path):
    teacher = char_trigram_teacher()
    h = Trainer(TrainConfig(stage="retrieval", student=student, output=str(tmp_path / "a"), steps=3, batch_size=6,
                            lambda_gor=0.0), pairs(), teacher=teacher).train(progress=False)
    assert "gor" not in h[-1]
    scored = [{"query": p["query"], "document": p["document"], "score": float(i % 5)} for i, p in enumerate(pairs())]
    h = Trainer(TrainConfig(stage="text-matching", student=student, output=str(tmp_path / "b"), steps=6,
                            batch_size=8, lr=3e-3), scored).train(progress=False)
    assert set(h[-1]) >= {"cosent"}
    rng = np.random.default_rng(3)
    labelled = [{"text": " ".join(rng.choice(WORDS, 4)) + f" topic{i % 3}", "label": i % 3} for i in range(30)]
    h = Trainer(TrainConfig(stage="classification", student=student, output=str(tmp_path / "c"), steps=3,
                            batch_size=4, lr=3e-3), labelled).train(progress=False)
    assert {"nce", "rkd"} <= set(h[-1]) and all(np.isfinite(r["loss"]) for r in h)
    assert jv5fast.Engine(str(tmp_path / "c"), task="classification").embed("x").shape == (64,)


def test_resume_reproduces_the_next_step(student, tmp_path):
    teacher = char_trigram_teacher()

    def cfg(out, steps):
        return TrainConfig(stage="retrieval", student=student, output=out, steps=steps, batch_size=6, lr=3e-3,
                           warmup_steps=2)
    full = Trainer(cfg(str(tmp_path / "full"), 5), pairs(), teacher=teacher).train(progress=False)
    Trainer(cfg(str(tmp_path / "part"), 5), pairs(), teacher=teacher).train(progress=False, until=3)  # interrupted
    resumed = Trainer(cfg(str(tmp_path / "part"), 5), pairs(), teacher=teacher)
    assert resumed.step == 3
    rest = resumed.train(progress=False)
    np.testing.assert_allclose([r["loss"] for r in rest[3:]], [r["loss"] for r in full[3:]], rtol=1e-5, atol=1e-6)


def test_bad_config(student, tmp_path):
    with pytest.raises(ValueError, match="unknown stage/task 'summaries'"):
        TrainConfig(stage="summaries", student=student, output=str(tmp_path))
    with pytest.raises(ValueError, match="lora_r must be positive"):
        TrainConfig(stage="retrieval", student=student, output=str(tmp_path), lora_r=0)
    with pytest.raises(FileNotFoundError, match="student checkpoint folder not found"):
        TrainConfig(stage="distill", student=str(tmp_path / "nope"), output=str(tmp_path))
    with pytest.raises(ValueError, match="needs a teacher"):
        Trainer(TrainConfig(stage="distill", student=student, output=str(tmp_path / "o")), pairs())
    with pytest.raises(ValueError, match=r"teacher_embeddings\['query'\] must have one row per example \(48\), got 3"):
        Trainer(TrainConfig(stage="distill", student=student, output=str(tmp_path / "o")), pairs(),
                teacher_embeddings={"query": np.zeros((3, 4)), "document": np.zeros((48, 4))})
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        TrainModel(student, lora_r=4, lora_targets=("qkv",))
    for name in ("lr", "lambda_nce", "temperature"):  # NaN would train silently and could never resume
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got nan"):
            TrainConfig(stage="retrieval", student=student, output=str(tmp_path), **{name: float("nan")})


def test_cli_train_with_precomputed_teacher(student, tmp_path):
    import json

    from jv5fast.cli import main
    data = tmp_path / "pairs.jsonl"
    ex = pairs(24)
    data.write_text("\n".join(json.dumps(e) for e in ex), encoding="utf-8")
    teacher = char_trigram_teacher()
    emb = tmp_path / "teacher"
    emb.mkdir()
    np.save(emb / "query.npy", teacher([e["query"] for e in ex]))
    np.save(emb / "document.npy", teacher([e["document"] for e in ex]))
    out = str(tmp_path / "out")
    rc = main(["train", "--stage", "retrieval", "--student", student, "--output", out, "--data", str(data),
               "--teacher-embeddings", str(emb), "--steps", "2", "--batch-size", "4", "--lora-r", "4"])
    assert rc == 0
    assert jv5fast.Engine(out, task="retrieval").embed("x").shape == (64,)
    assert main(["train", "--stage", "nope", "--student", student, "--output", out, "--data", str(data)]) == 2  # usage


def test_ddp_two_processes_stay_in_sync(student, tmp_path):
    """torchrun, 2 CPU processes (gloo): different data shards, identical weights after every step."""
    import subprocess
    import sys
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_trainer import pairs, char_trigram_teacher
from jv5fast.train import TrainConfig, Trainer
tr = Trainer(TrainConfig(stage="retrieval", student={student!r}, output={str(tmp_path / 'out')!r}, steps=3,
                         batch_size=4, lr=3e-3, lora_r=4), pairs(), teacher=char_trigram_teacher())
h = tr.train(progress=False)
print("RESULT", tr.rank, h[0]["loss"], float(tr.model.lora["0_q_proj_B"].abs().sum()), float(tr.log_tau), flush=True)
""")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=300)
    rows = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert len(rows) == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r0, loss0, b0, t0), (r1, loss1, b1, t1) = rows
    assert loss0 != loss1            # each rank saw its own shard
    assert b0 == b1 and t0 == t1     # ... and the synchronized update left identical weights (LoRA and τ)
    assert float(b0) > 0


def test_readme_flow_from_a_released_layout_init(ckpt_factory, tmp_path):
    """Released-layout init (config names four tasks, adapters/ holds them) -> stage 1 -> two stage-2 tasks:
    every student written on the way loads in Engine as it is, with eng.tasks exactly the adapters present."""
    init = ckpt_factory("nano", seed=62)  # the released layout, all four adapters
    assert jv5fast.Engine(init).tasks == ("retrieval", "text-matching", "clustering", "classification")
    student = str(tmp_path / "student")
    teacher = char_trigram_teacher()
    Trainer(TrainConfig(stage="distill", student=init, output=student, steps=2, batch_size=4), pairs(),
            teacher=teacher).train(progress=False)
    eng = jv5fast.Engine(student)
    assert eng.tasks == () and eng.task is None
    Trainer(TrainConfig(stage="retrieval", student=student, output=student, steps=2, batch_size=4, lora_r=2), pairs(),
            teacher=teacher).train(progress=False)
    eng = jv5fast.Engine(student, task="retrieval")
    assert eng.tasks == ("retrieval",)
    scored = [{"query": p["query"], "document": p["document"], "score": float(i % 5)} for i, p in enumerate(pairs())]
    Trainer(TrainConfig(stage="text-matching", student=student, output=student, steps=2, batch_size=4, lora_r=2),
            scored).train(progress=False)
    eng = jv5fast.Engine(student)
    assert eng.tasks == ("retrieval", "text-matching") and eng.task == "retrieval"
    a, b = eng.embed("cat dog", task="retrieval"), eng.embed("cat dog", task="text-matching")
    assert np.isfinite(a).all() and not np.allclose(a, b)


def test_resume_refuses_other_settings_or_data(student, tmp_path):
    teacher = char_trigram_teacher()
    out = str(tmp_path / "run")

    def cfg(**kw):
        return TrainConfig(**{**dict(stage="retrieval", student=student, output=out, steps=3, batch_size=4,
                                     lora_r=2), **kw})
    Trainer(cfg(), pairs(), teacher=teacher).train(progress=False, until=2)
    with pytest.raises(ValueError, match=r"other settings \(lora_r: 2 -> 3; lr: 0\.0001 -> 0\.001\)"):
        Trainer(cfg(lr=1e-3, lora_r=3), pairs(), teacher=teacher)
    with pytest.raises(ValueError, match="the training data differs"):
        Trainer(cfg(), pairs(seed=9), teacher=teacher)
    tr = Trainer(cfg(steps=5, save_every=1), pairs(), teacher=teacher)  # steps and saving may change
    assert tr.resumed_from == 2
    assert Trainer(cfg(lr=1e-3, resume=False), pairs(), teacher=teacher).resumed_from is None


@pytest.mark.parametrize("bad,msg", [
    ({"query": "a"}, r"examples\[1\]: missing key\(s\) \['document'\]"),
    ({"query": "a", "document": 3}, r"examples\[1\]: 'document' must be a string"),
    ({"query": "a", "document": "b", "negatives": "c"}, "'negatives' must be a list of strings"),
    ("just text", "expected a JSON object, got str"),
])
def test_bad_examples_are_named(student, tmp_path, bad, msg):
    with pytest.raises(ValueError, match=msg):
        Trainer(TrainConfig(stage="retrieval", student=student, output=str(tmp_path)), pairs(1) + [bad],
                teacher=char_trigram_teacher())


def test_matryoshka_dims_are_checked_against_the_student(student, tmp_path):
    with pytest.raises(ValueError, match=r"matryoshka_dims \[64\] out of range: each must be an int in 1\.\.63"):
        Trainer(TrainConfig(stage="retrieval", student=student, output=str(tmp_path), matryoshka_dims=(32, 64)),
                pairs(), teacher=char_trigram_teacher())


def test_rerun_after_a_failed_finish_writes_the_result(student, tmp_path, monkeypatch, capsys):
    """The state is saved before the result: a run that died in finish() must not leave a rerun with
    "nothing to train" and no adapter."""
    import json

    from jv5fast.cli import main
    scored = tmp_path / "scored.jsonl"  # text-matching with scores: CoSENT, no teacher needed
    scored.write_text("\n".join(json.dumps(dict(e, score=float(i % 3))) for i, e in enumerate(pairs(12))),
                      encoding="utf-8")
    out = str(tmp_path / "out")
    args = ["train", "--stage", "text-matching", "--student", student, "--output", out, "--data", str(scored),
            "--steps", "2", "--batch-size", "4", "--lora-r", "2"]

    def full_disk(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Trainer, "finish", full_disk)
    assert main(args) == 1
    assert not os.path.exists(os.path.join(out, "adapters"))
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert jv5fast.Engine(out).tasks == ("text-matching",)


def test_resume_refuses_another_teacher(student, tmp_path):
    out = str(tmp_path / "run")
    cfg = TrainConfig(stage="retrieval", student=student, output=out, steps=3, batch_size=4, lora_r=2)
    Trainer(cfg, pairs(), teacher=char_trigram_teacher(seed=0)).train(progress=False, until=1)
    assert Trainer(cfg, pairs(), teacher=char_trigram_teacher(seed=0)).resumed_from == 1
    with pytest.raises(ValueError, match="the teacher differs"):
        Trainer(cfg, pairs(), teacher=char_trigram_teacher(seed=1))
    emb = {s: char_trigram_teacher()([e[s] for e in pairs()]) for s in ("query", "document")}
    with pytest.raises(ValueError, match="the teacher differs"):
        Trainer(cfg, pairs(), teacher_embeddings=emb)
    # the same teacher on another device / dtype differs in the last bits: that still resumes
    base = char_trigram_teacher(seed=0)
    rng = np.random.default_rng(0)

    def bf16_like(texts):
        t = base(texts)
        return t * (1 + 4e-3 * rng.standard_normal(t.shape).astype(np.float32))
    assert Trainer(cfg, pairs(), teacher=bf16_like).resumed_from == 1


@pytest.mark.parametrize("emb,msg", [
    ({"query": np.zeros(48, np.float32), "document": np.zeros(48, np.float32)}, "must be a 2-D float array"),
    ({"query": np.zeros((48, 8), np.float32), "document": np.zeros((48, 6), np.float32)}, "8 query dims but 6"),
    ({"query": np.zeros((48, 0), np.float32), "document": np.zeros((48, 0), np.float32)}, "dim > 0"),
    ({"query": np.full((48, 4), np.nan, np.float32), "document": np.ones((48, 4), np.float32)}, "NaN or inf"),
])
def test_bad_teacher_embeddings_are_named(student, tmp_path, emb, msg):
    with pytest.raises(ValueError, match=msg):
        Trainer(TrainConfig(stage="retrieval", student=student, output=str(tmp_path)), pairs(),
                teacher_embeddings=emb)


def test_malformed_projection_is_a_clear_error(student, tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(24), "bias": torch.zeros(24)}, os.path.join(student, "projection.safetensors"))
    with pytest.raises(ValueError, match=r"projection\.safetensors holds .*expected weight \(24, 64\)"):
        Trainer(TrainConfig(stage="retrieval", student=student, output=str(tmp_path)), pairs(),
                teacher=char_trigram_teacher())
