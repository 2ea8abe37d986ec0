"""`jv5fast make-checkpoint DIR`: a random-weight checkpoint in the released layout, written offline, that
every command loads; it says loudly that its vectors are meaningless, and never touches what a user has."""
import json
import os
import sys

import numpy as np
import pytest

import jv5fast
from jv5fast.cli import main

pytest.importorskip("quicktok")


def _err(capsys, rc, want=2):
    err = capsys.readouterr().err
    assert rc == want, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line (argparse adds its usage above it)
    return err


@pytest.mark.parametrize("family, dim", [("nano", 64), ("small", 64)])
def test_make_checkpoint_writes_a_checkpoint_embed_and_engine_load(family, dim, tmp_path, capsys):
    from jv5fast.testing import tokenizer_json
    d = tmp_path / f"jv5-{family}"
    assert main(["make-checkpoint", str(d), "--family", family, "--size", "tiny", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: RANDOM WEIGHTS" in err and "MEANINGLESS" in err and str(d) in err
    readme = (d / "README.txt").read_text(encoding="utf-8")
    assert readme.startswith("RANDOM WEIGHTS") and "MEANINGLESS" in readme and "seed 3" in readme
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["jv5fast_random_weights"] is True and cfg["hidden_size"] == dim
    assert sorted(os.listdir(d / "adapters")) == sorted(jv5fast.testing.TASKS)
    adapter = json.loads((d / "adapters" / "retrieval" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(d)  # not the hidden folder it was written in
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no staging folder left
    kind = "qwen3" if family == "small" else "llama3"
    assert (d / "tokenizer.json").read_text(encoding="utf-8") == tokenizer_json(kind, real=True)
    # the folder works as --model and as Engine(path)
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(d), "--device", "cpu", "--no-progress", "hello", "world",
                 "--output", str(out)]) == 0
    eng = jv5fast.Engine(str(d), device="cpu")
    want = eng.embed(["hello", "world"])
    assert want.shape == (2, dim) and np.isfinite(want).all()
    np.testing.assert_allclose(np.load(out), want, atol=1e-6)


def test_same_seed_same_weights_and_an_empty_folder_is_used(tmp_path, capsys):
    from safetensors.torch import load_file
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()  # an existing empty folder is fine (a mount point, say): the files go into it
    assert main(["make-checkpoint", str(a), "--seed", "7"]) == 0
    assert main(["make-checkpoint", str(b), "--seed", "7"]) == 0
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_make_checkpoint_follows_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["make-checkpoint", str(tmp_path / "m")]) == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "m" / "model.safetensors").st_mode & 0o777 == 0o640


def test_make_checkpoint_refusals_touch_nothing(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc = main(["make-checkpoint", str(mine)])
    err = _err(capsys, rc)
    assert f"DIR {mine} exists and is not empty (it holds notes.txt)" in err and "never overwrites" in err
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"DIR {afile} exists and is not a folder" in _err(capsys, main(["make-checkpoint", str(afile)]))
    deep = tmp_path / "no" / "such" / "ck"
    assert "folder " + str(tmp_path / "no" / "such") + " does not exist" in \
        _err(capsys, main(["make-checkpoint", str(deep)]))
    err = _err(capsys, main(["make-checkpoint", str(tmp_path / "x"), "--family", "large"]))
    assert "argument --family: invalid choice: 'large' (choose from 'nano', 'small')" in err
    err = _err(capsys, main(["make-checkpoint", str(tmp_path / "x"), "--size", "huge"]))
    assert "argument --size: invalid choice: 'huge' (choose from 'tiny', 'full')" in err
    err = _err(capsys, main(["make-checkpoint", str(tmp_path / "x"), "--seed", "-1"]))
    assert "argument --seed: expected an integer in 0..4294967295, got '-1'" in err
    assert "required: DIR" in _err(capsys, main(["make-checkpoint"]))
    monkeypatch.setitem(sys.modules, "quicktok", None)
    err = _err(capsys, main(["make-checkpoint", str(tmp_path / "x")]))
    assert "quicktok-v1 is not installed" in err and "pip install quicktok-v1" in err
    assert sorted(os.listdir(tmp_path)) == ["afile", "mine"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_dir_as_it_was(existing, tmp_path, capsys, monkeypatch):
    import jv5fast.testing as testing
    real = testing.write_checkpoint

    def full_disk(path, *a, **k):  # half a checkpoint, then a full disk
        real(path, *a, **k)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(testing, "write_checkpoint", full_disk)
    d = tmp_path / "ck"
    if existing:
        d.mkdir()
    assert "No space left on device" in _err(capsys, main(["make-checkpoint", str(d)]), want=1)
    assert (os.listdir(d) == []) if existing else not d.exists()


def test_an_engine_on_a_made_checkpoint_warns_that_its_weights_are_random(tmp_path):
    import subprocess
    out = tmp_path / "m"
    p = subprocess.run([sys.executable, "-m", "jv5fast", "make-checkpoint", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    with pytest.warns(UserWarning, match="RANDOM weights"):
        jv5fast.Engine(str(out), device="cpu")
