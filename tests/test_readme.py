"""The README's Python snippets run as written, on tiny (64-d) checkpoints: model paths point at them,
Matryoshka dims (truncate_dim=, dimensions=) become 32, and the training snippet's step count and batch size are shrunk; nothing else is changed, so README and code
cannot drift apart."""
import os
import re
import shutil

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_snippets_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("Engine(" in b for b in blocks) and any("export_onnx" in b for b in blocks)
    assert any("Trainer(" in b for b in blocks)
    assert any("OpenAI(" in b for b in blocks) and any("Batcher(" in b for b in blocks)


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_python_snippet_runs(i, ckpt_factory, tmp_path, monkeypatch):
    src = python_blocks()[i]
    src = src.replace("/models/jina-embeddings-v5-text-small", ckpt_factory("small"))
    src = src.replace("/models/jina-embeddings-v5-text-nano", ckpt_factory("nano"))
    src = re.sub(r"\b(truncate_dim|dimensions)=\d+", r"\1=32", src)  # the tiny models are 64-d
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(i)
    words = "light speed vacuum cat dog tree river mountain city music code paper".split()
    docs = [" ".join(rng.choice(words, 8)) for _ in range(40)]
    ns = {"docs": docs, "pairs": [" ".join(rng.choice(words, 5)) for _ in range(6)]}
    if "Trainer(" in src:
        import jv5fast.train
        real = jv5fast.train.TrainConfig
        monkeypatch.setattr(jv5fast.train, "TrainConfig", lambda **kw: real(**{**kw, "steps": 2, "batch_size": 4}))
        shutil.copytree(ckpt_factory("nano", seed=62), "init")  # a released-layout init, four adapters
        pairs = [{"query": " ".join(rng.choice(words, 3)), "document": d} for d in docs]
        np.save("tq.npy", rng.standard_normal((len(pairs), 16)).astype(np.float32))
        np.save("td.npy", rng.standard_normal((len(pairs), 16)).astype(np.float32))
        proj = rng.standard_normal((64, 16)).astype(np.float32)
        import jv5fast
        teacher = jv5fast.Engine("init")

        def fn(texts):  # a teacher callable: the same 16-d space as tq/td
            return teacher.embed(texts, prompt="") @ proj
        ns.update(pairs=pairs, triplets=[dict(p, negatives=[docs[-1 - k]]) for k, p in enumerate(pairs)], fn=fn)
    server = None
    if "OpenAI(" in src:  # the serving snippet talks to a real `jv5fast serve` of the nano checkpoint
        import subprocess
        import sys
        server = subprocess.Popen([sys.executable, "-m", "jv5fast", "serve", "--model", ckpt_factory("nano"),
                                   "--port", "0", "--device", "cpu", "--log-level", "warning", "--served-model-name",
                                   "jina-embeddings-v5-text-nano"], stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().split("listening on ")[1].split()[0]
        _wait_healthy(url)
        src = src.replace("http://127.0.0.1:8080", url)
    try:
        exec(compile(src, f"README.md python block {i + 1}", "exec"), ns)
    finally:
        if server is not None:
            server.terminate()
            assert server.wait(60) == 0
    if "OpenAI(" in src:
        import jv5fast
        ref = jv5fast.Engine(ckpt_factory("nano"), device="cpu").embed(["how fast is light?", "c = 299,792 km/s"],
                                                                      truncate_dim=32)
        assert np.abs(np.array(ns["vectors"]) - ref).max() <= 1e-6


def _wait_healthy(url, timeout=120):
    import time

    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never became healthy")


def test_quickstart_offline_commands_run_as_written(tmp_path):
    """The Quickstart's first block (make-checkpoint, then embed with it) runs verbatim in an empty folder, and the
    vector it writes equals Engine.embed on the folder it made."""
    import subprocess
    import sys
    with open(README, encoding="utf-8") as f:
        text = f.read()
    quick = text[text.index("## Quickstart"):]
    block = re.search(r"^```\n(.*?)^```", quick, flags=re.S | re.M).group(1)
    assert "make-checkpoint" in block and "jv5fast embed" in block
    commands = [c.split("#")[0].strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    import shlex
    for c in commands:
        argv = shlex.split(c)
        assert argv[0] == "jv5fast", c
        p = subprocess.run([sys.executable, "-m", "jv5fast", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, (c, p.stderr[-2000:])
    import jv5fast
    made = os.path.join(tmp_path, "jv5-nano")
    want = jv5fast.Engine(made, task="retrieval", device="cpu").embed(
        ["How fast does light travel in a vacuum?"], prompt_name="query", truncate_dim=32)
    assert np.abs(np.load(tmp_path / "q.npy") - want).max() <= 1e-6
