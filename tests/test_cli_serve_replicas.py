"""`jv5fast serve --replicas N` (and --min/--max-replicas, --ray-address, --num-*-per-replica, --request-timeout,
--target-ongoing-requests): the flags reach `jv5fast.distributed.serve.run` as its keywords, with its defaults when
left out; mistakes exit 2 with one line before Ray starts; without them `jv5fast serve` never imports Ray. One
end-to-end run on a local Ray: two replicas of the tiny nano checkpoint answer as Engine.embed, /health is 200,
SIGTERM exits 0.

Only the last test starts Ray (seconds on a 2-core machine); the others monkeypatch `run` or stop before it.
"""
from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")

import jv5fast  # noqa: E402
from jv5fast.cli import main  # noqa: E402
from jv5fast.cli import serve as serve_cli  # noqa: E402
from jv5fast.distributed import serve as on_ray  # noqa: E402
from procs import Pumped, free_port, wait_for  # noqa: E402

RUN = on_ray.run  # the real one (the fixture below replaces it)


@pytest.fixture
def captured(monkeypatch):
    """jv5fast.distributed.serve.run replaced by a recorder: (model, kwargs) of each call; exit status 0."""
    calls = []

    def fake_run(model, **kwargs):
        calls.append((model, kwargs))
        return 0
    monkeypatch.setattr(on_ray, "run", fake_run)
    monkeypatch.delenv("JV5FAST_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def accepted_by_run(model, kwargs):
    """Every keyword is one that run() / app() / create_app() / Engine take: checked as app() checks them,
    without Ray (jv5fast.distributed.serve._options)."""
    run_params = set(inspect.signature(RUN).parameters) - {"model", "app_kwargs"}
    app_params = set(inspect.signature(on_ray.app).parameters) - {"model", "options"}
    rest = {k: v for k, v in kwargs.items() if k not in run_params | app_params}
    on_ray._options(model, rest, kwargs.get("num_gpus_per_replica", 0), kwargs.get("drain_timeout", 30.0))


def test_help_states_the_defaults_of_run():
    sig = inspect.signature(on_ray.app).parameters
    for flag, (name, default) in serve_cli.REPLICA_ONLY.items():
        assert sig[name].default == default, flag
    assert inspect.signature(RUN).parameters["ray_address"].default is None
    import argparse

    from jv5fast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    helps = {a.option_strings[0]: a.help for a in sub._actions if a.option_strings}
    for flag, (_, default) in serve_cli.REPLICA_ONLY.items():
        assert f"(default: {default:g}" in helps[flag], flag
    assert "jv5fast[serve-ray]" in sub.format_help()


def test_replica_flags_map_onto_run(nano_ckpt, captured):
    assert main(["serve", "--model", nano_ckpt, "--replicas", "2"]) == 0
    model, kw = captured[-1]
    assert model == nano_ckpt
    assert kw == dict(ray_address=None, replicas=2, min_replicas=None, max_replicas=None, host="127.0.0.1", port=8080,
                      device=None, dtype=None, backend="torch", max_length=None, log_level="info", drain_timeout=30.0,
                      served_model_name=None, api_key=None, max_batch_tokens=None, max_wait_ms=2.0,
                      max_queue_tokens="auto", max_inputs=2048, max_request_bytes=8 * 2**20, resident_tasks="auto")
    accepted_by_run(model, kw)  # run()'s own defaults stand for the flags left out

    assert main(["serve", "--model", nano_ckpt, "--host", "0.0.0.0", "--port", "0", "--replicas", "1",
                 "--num-cpus-per-replica", "0.5", "--request-timeout", "12.5", "--dtype", "bfloat16",
                 "--max-length", "64", "--served-model-name", "m", "--api-key", "k", "--max-batch-tokens", "32",
                 "--max-wait-ms", "0", "--max-queue-tokens", "999", "--max-inputs", "7", "--max-request-bytes", "4096",
                 "--drain-timeout", "3", "--resident-tasks", "false", "--log-level", "warning",
                 "--cpu-precision", "bf16"]) == 2  # bf16 GEMMs need float32
    assert main(["serve", "--model", nano_ckpt, "--host", "0.0.0.0", "--port", "0", "--replicas", "1",
                 "--num-cpus-per-replica", "0.5", "--request-timeout", "12.5", "--device", "cpu",
                 "--max-length", "64", "--served-model-name", "m", "--api-key", "k", "--max-batch-tokens", "32",
                 "--max-wait-ms", "0", "--max-queue-tokens", "999", "--max-inputs", "7", "--max-request-bytes", "4096",
                 "--drain-timeout", "3", "--resident-tasks", "false", "--log-level", "warning",
                 "--cpu-precision", "bf16"]) == 0
    model, kw = captured[-1]
    assert kw == dict(ray_address=None, replicas=1, min_replicas=None, max_replicas=None, num_cpus_per_replica=0.5,
                      request_timeout_s=12.5, host="0.0.0.0", port=0, device="cpu", dtype=None, backend="torch",
                      max_length=64, cpu_precision="bf16", log_level="warning", drain_timeout=3.0,
                      served_model_name="m", api_key="k", max_batch_tokens=32, max_wait_ms=0.0, max_queue_tokens=999,
                      max_inputs=7, max_request_bytes=4096, resident_tasks=False)
    accepted_by_run(model, kw)

    # autoscaling: as many start as --min-replicas; the target only with autoscaling
    assert main(["serve", "--model", nano_ckpt, "--min-replicas", "2", "--max-replicas", "4",
                 "--target-ongoing-requests", "8"]) == 0
    _, kw = captured[-1]
    assert (kw["replicas"], kw["min_replicas"], kw["max_replicas"], kw["target_ongoing_requests"]) == (2, 2, 4, 8.0)
    assert main(["serve", "--model", nano_ckpt, "--min-replicas", "0", "--max-replicas", "3", "--replicas", "2"]) == 0
    assert [captured[-1][1][k] for k in ("replicas", "min_replicas", "max_replicas")] == [2, 0, 3]
    assert main(["serve", "--model", nano_ckpt, "--max-replicas", "3"]) == 0
    assert [captured[-1][1][k] for k in ("replicas", "min_replicas", "max_replicas")] == [1, None, 3]
    accepted_by_run(nano_ckpt, captured[-1][1])

    # on a cluster: the folder has to exist on its nodes only, and the local devices are not this machine's
    missing = os.path.join(os.path.dirname(nano_ckpt), "only-on-the-cluster")
    assert main(["serve", "--model", missing, "--ray-address", "auto", "--num-gpus-per-replica", "1",
                 "--device", "cuda"]) == 0
    model, kw = captured[-1]
    assert model == missing and kw["ray_address"] == "auto" and kw["num_gpus_per_replica"] == 1.0
    assert kw["replicas"] == 1 and kw["device"] == "cuda"
    assert len(captured) == 6


def test_replica_flag_mistakes_exit_2_before_ray(nano_ckpt, captured, capsys, monkeypatch):
    m = ["serve", "--model", nano_ckpt]
    cpus = os.cpu_count() or 1
    cases = [
        (["--num-cpus-per-replica", "1"], "--num-cpus-per-replica shapes Ray Serve replicas: it needs --replicas"),
        (["--num-gpus-per-replica", "0"], "--num-gpus-per-replica shapes Ray Serve replicas: it needs --replicas"),
        (["--request-timeout", "5"], "--request-timeout shapes Ray Serve replicas: it needs --replicas"),
        (["--target-ongoing-requests", "5"], "--target-ongoing-requests shapes Ray Serve replicas"),
        (["--replicas", "2", "--target-ongoing-requests", "5"], "--target-ongoing-requests applies to autoscaling"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is over --max-replicas 2"),
        (["--replicas", "5", "--max-replicas", "4"], "--replicas 5 (how many start) is over --max-replicas 4"),
        (["--replicas", "1", "--min-replicas", "2"], "--replicas 1 (how many start) is under --min-replicas 2"),
        (["--replicas", "0"], "argument --replicas: expected a positive integer, got '0'"),
        (["--max-replicas", "0"], "argument --max-replicas: expected a positive integer, got '0'"),
        (["--min-replicas", "-1"], "argument --min-replicas: expected an integer >= 0, got '-1'"),
        (["--replicas", "1", "--num-cpus-per-replica", "-1"], "expected a finite number >= 0, got '-1'"),
        (["--replicas", "1", "--request-timeout", "0"], "expected a finite number > 0, got '0'"),
        (["--replicas", "1", "--device", "cuda"], "--device cuda needs --num-gpus-per-replica > 0"),
        (["--ray-address", "auto", "--num-gpus-per-replica", "1", "--device", "cuda:1"],
         "--device cuda:1: a replica sees only the 1 GPU Ray reserves for it, numbered from cuda:0; use --device cuda"),
        (["--replicas", str(cpus + 1)], f"{cpus + 1} replicas x --num-cpus-per-replica 1 is {cpus + 1} CPUs, "
                                        f"more than this machine's {cpus}"),
        (["--replicas", "2", "--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["--replicas", "2", "--api-key", " "], "--api-key is empty or blank"),
        (["--replicas", "2", "--quantize", "int8", "--device", "cpu", "--dtype", "bfloat16"],
         "--quantize int8 quantizes the float32 model"),
    ]
    import torch
    if not torch.cuda.is_available():
        cases.append((["--replicas", "1", "--num-gpus-per-replica", "1"],
                      "1 replica x --num-gpus-per-replica 1 is 1 GPUs, more than this machine's 0 (a local Ray)"))
    for flags, needle in cases:
        capsys.readouterr()
        assert main([*m, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (flags, err)
    missing = os.path.join(os.path.dirname(nano_ckpt), "no-such-model")
    assert main(["serve", "--model", missing, "--replicas", "2"]) == 2  # a local Ray: this machine's folders
    assert f"--model {missing}: no such folder" in capsys.readouterr().err
    monkeypatch.setenv("JV5FAST_API_KEY", "")
    assert main([*m, "--replicas", "1"]) == 2
    assert "$JV5FAST_API_KEY is empty or blank" in capsys.readouterr().err
    assert captured == []


def test_without_ray_serve_the_message_names_the_extra(nano_ckpt, capsys, monkeypatch):
    monkeypatch.delenv("JV5FAST_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--model", nano_ckpt, "--replicas", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ('jv5fast serve: error: --replicas runs on Ray Serve, which is not installed (or older '
                           'than 2.60): pip install "jv5fast[serve-ray]"'), err


def test_serve_without_replicas_never_imports_ray(nano_ckpt):
    code = f"""
import sys
from jv5fast.cli import main
assert main(["serve", "--help"]) == 0
assert main(["serve", "--model", {nano_ckpt!r}, "--port", "70000"]) == 2
assert main(["serve", "--model", {nano_ckpt!r}, "--num-cpus-per-replica", "1"]) == 2
assert main(["serve", "--model", {nano_ckpt!r}, "--min-replicas", "3", "--max-replicas", "2"]) == 2
bad = [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
sys.exit(f"imported {{bad}}" if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "replicas on Ray Serve" in r.stdout and "--port must be in 0..65535" in r.stderr


# ---- end to end, on a local Ray ------------------------------------------------------------------------------------
def test_serve_replicas_end_to_end(nano_ckpt):
    """`jv5fast serve --replicas 2 --num-cpus-per-replica 0.5 --port P` on a Ray of its own (no RAY_ADDRESS):
    the ready line, vectors equal to Engine.embed, the API key enforced, /health 200 with both replicas, and
    SIGTERM -> drained, exit 0."""
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "jv5fast[serve-ray]"')
    import httpx
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "JV5FAST_API_KEY", "JV5FAST_DEBUG")}
    cmd = [sys.executable, "-m", "jv5fast", "serve", "--model", nano_ckpt, "--replicas", "2",
           "--num-cpus-per-replica", "0.5", "--port", str(port), "--api-key", "s3cret", "--served-model-name", "nano",
           "--max-batch-tokens", "64", "--drain-timeout", "5", "--log-level", "warning"]
    # its own session: a failed test kills the driver and the Ray it started, nothing else
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    out = Pumped(proc)
    lines, said = out.lines, out.said
    try:
        wait_for("the ready line", lambda: any("jv5fast serve: ready" in ln for ln in lines) or proc.poll() is not None,
                 120)
        assert proc.poll() is None, said()
        url = f"http://127.0.0.1:{port}"
        assert any(f"listening on {url} (Ray Serve; loading {nano_ckpt} on 2 replicas)" in ln for ln in lines), said()
        assert any("jv5fast serve: ready (2 replicas" in ln for ln in lines), said()
        batch = ["the fast engine", "", "über naïve vector search " * 3]
        key = {"Authorization": "Bearer s3cret"}
        r = httpx.post(url + "/v1/embeddings", json={"input": batch, "dimensions": 32}, headers=key, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "nano" and [d["index"] for d in body["data"]] == [0, 1, 2]
        want = jv5fast.Engine(nano_ckpt, device="cpu").embed(batch, truncate_dim=32)
        np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, atol=2e-6)
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text
        assert len([x for x in r.json()["replicas"] if x["status"] == "ready"]) == 2, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, said()
    finally:
        out.stop(group=True)  # kills the driver and its Ray if a check failed; reads the last lines
    assert any("jv5fast serve: draining" in ln for ln in lines) and lines[-1].startswith("jv5fast serve: stopped"), \
        said()
