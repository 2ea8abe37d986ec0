"""`jv5fast info` (what runs where, from Engine.describe) and `--cpu-precision` on embed / serve."""
import json
import subprocess
import sys

import numpy as np
import pytest

import jv5fast


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jv5fast", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_info_says_what_runs_each_shape(nano_ckpt):
    p = run("info", "--model", nano_ckpt, "--device", "cpu", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = jv5fast.Engine(nano_ckpt, device="cpu").describe()
    assert got["device"] == "cpu" and got["dim"] == 64 and got["task"] == "retrieval"
    assert {k: got[k] for k in want if k in ("device", "dtype", "backend", "cpu_precision")} == \
        {k: want[k] for k in ("device", "dtype", "backend", "cpu_precision")}
    text = run("info", "--model", nano_ckpt, "--device", "cpu")
    assert text.returncode == 0 and "device cpu, dtype float32" in text.stdout, text.stderr


def test_embed_cpu_precision_bf16_is_the_engines(nano_ckpt, tmp_path):
    out = tmp_path / "e.npy"
    p = run("embed", "--model", nano_ckpt, "--device", "cpu", "--cpu-precision", "bf16", "one text", "another",
            "--output", str(out))
    assert p.returncode == 0, p.stderr
    want = jv5fast.Engine(nano_ckpt, device="cpu", cpu_precision="bf16").embed(["one text", "another"])
    fp32 = jv5fast.Engine(nano_ckpt, device="cpu").embed(["one text", "another"])
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-6)
    assert np.abs(fp32 - want).max() > 0  # bf16 GEMMs really ran


@pytest.mark.parametrize("cmd", ["embed", "serve", "info"])
@pytest.mark.parametrize("flags,bad", [(("--backend", "onnx"), "--backend onnx"), (("--quantize", "int8"), "--quantize"),
                                       (("--dtype", "bfloat16"), "--dtype bfloat16")])
def test_cpu_precision_bf16_needs_the_cpu_fp32_torch_engine(nano_ckpt, cmd, flags, bad):
    args = [cmd, "--model", nano_ckpt, "--cpu-precision", "bf16", *flags] + (["x"] if cmd == "embed" else [])
    p = run(*args)
    assert p.returncode == 2, p.stderr
    assert "--cpu-precision bf16" in p.stderr and bad in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
