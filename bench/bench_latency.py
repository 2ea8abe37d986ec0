"""Query latency (issue 13): jv5fast against what a user would otherwise deploy, same weights, same texts,
same run; one pytest-benchmark group per (model, device, queries per call), jv5fast its first entry.

Every system loads one per-task merged checkpoint (full size, random weights, retrieval merged in fp32 and
stored in fp32, real tokenizer) and embeds queries of 4–24 words with the checkpoint's "Query: " prompt;
each is checked to feed its model jv5fast's token ids. Call k embeds the k-th slice of a fixed pool, so no
two calls embed the same texts and every system embeds the same ones. Outputs are checked against jv5fast's
fp32 vectors for the same texts: cosine >= 0.99999 for the fp32 systems, int8 and bf16 recorded only.
CPU: ``jv5fast`` (``Engine`` defaults: the GEMM per shape measured at load, jv5fast/cpu_tuning.py),
``jv5fast gemm=jv5fast`` / ``jv5fast gemm=onednn`` (``JV5FAST_CPU_GEMM`` forcing one GEMM for every shape),
``jv5fast bf16`` (opt-in ``cpu_precision="bf16"``: bf16 GEMMs on oneDNN/AMX, fp32 elsewhere),
``jv5fast int8`` (``quantize="int8"``), onnxruntime on jv5fast's own
export (fp32, dynamic int8), sentence-transformers (Transformer + last-token Pooling + Normalize, batch 32),
transformers' AutoModel (right-padded, last real token, L2 normalize). CUDA: jv5fast with and without CUDA
graphs, transformers bf16. Timed from text to unit vector, tokenization included.

    python bench/bench_latency.py [--families nano,small] [--systems "jv5fast,onnxruntime fp32"]
                                  [--out bench/results/latency_cpu.md]
    pytest bench/bench_latency.py [--bench-small]    # pytest-benchmark; small also with JV5FAST_BENCH_SMALL=1
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_pack import queries  # noqa: E402
from bench_engine import machine  # noqa: E402

import jv5fast  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402

BATCHES = (1, 8, 32)  # queries per call
WARMUP = 2  # untimed calls before the timed ones (same slicing: they embed the pool's first slices)
ROUNDS = {1: 30, 8: 12, 32: 6}  # timed calls per entry: about 1-2 s of jv5fast time each on 2 cores
POOL = (WARMUP + ROUNDS[32]) * 32  # the largest number of texts one entry embeds: no slice repeats
MIN_COSINE = 0.99999  # the fp32 systems against jv5fast's fp32 vectors
SYSTEMS = {  # per device, in measuring order: jv5fast first, the others report their ratio to it
    "cpu": ("jv5fast", "jv5fast gemm=jv5fast", "jv5fast gemm=onednn", "jv5fast bf16", "jv5fast int8",
            "onnxruntime fp32", "onnxruntime int8", "sentence-transformers", "transformers"),
    "cuda": ("jv5fast", "jv5fast no cuda graphs", "transformers bf16"),
}
ST_PAD = {"nano": "<|pad|>", "small": "<|endoftext|>"}  # tokenizer_config.json names no pad token


def merged_checkpoint(folder, family):
    """The checkpoint every system loads: seed 0, retrieval merged in fp32 and stored in fp32 (no bf16
    rounding of the merge), real tokenizer, so jv5fast and the peers compute on identical weights."""
    return write_checkpoint(os.path.join(folder, family), family, "full", seed=0, merged_task="retrieval",
                            dtype=torch.float32, real_tokenizer=True)


def onnx_export(folder, checkpoint):
    """jv5fast's own ONNX export of ``checkpoint`` into folder/onnx: model.onnx (fp32) and model_int8.onnx
    (dynamic int8)."""
    out = os.path.join(folder, "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        jv5fast.export_onnx(checkpoint, out, quantize="int8")
    return out


# ---- systems ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    embed: Callable  # list of query texts -> (B, E) float32 numpy, unit norm
    token_ids: Callable  # list of query texts -> the token ids the system feeds its model
    exact: bool  # fp32 end to end: its vectors must match jv5fast's (cosine >= MIN_COSINE)


class PaddedTokenizer:
    """The checkpoint's tokenizer.json (HF tokenizers) with the query prompt, right-padded to the longest
    text: what a deployer feeds onnxruntime or transformers."""

    def __init__(self, folder, prompt):
        from tokenizers import Tokenizer
        self.tok, self.prompt = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), prompt
        self.tok.enable_padding(direction="right", pad_id=0)  # masked out: the id does not matter

    def __call__(self, texts):
        """(input_ids, attention_mask), each (B, S) int64."""
        enc = self.tok.encode_batch([self.prompt + t for t in texts])
        return (np.array([e.ids for e in enc], dtype=np.int64),
                np.array([e.attention_mask for e in enc], dtype=np.int64))

    def token_ids(self, texts):
        ids, mask = self(texts)
        return [row[m == 1].tolist() for row, m in zip(ids, mask)]


def _jv5fast(eng, exact):
    return System(eng.encode_query, lambda texts: eng.tokenize(texts, prompt_name="query"), exact)


def _jv5fast_forced(fam, gemm):
    """The CPU fp32 engine with JV5FAST_CPU_GEMM=gemm while it loads (every projection on that GEMM)."""
    old = os.environ.get("JV5FAST_CPU_GEMM")
    os.environ["JV5FAST_CPU_GEMM"] = gemm
    try:
        eng = jv5fast.Engine(fam.checkpoint, device="cpu")
    finally:
        os.environ.pop("JV5FAST_CPU_GEMM") if old is None else os.environ.__setitem__("JV5FAST_CPU_GEMM", old)
    assert {p.kind for p in eng.model.packed.values()} == {gemm}
    return _jv5fast(eng, exact=True)


def cpu_isa_note() -> str:
    """The CPU model and the ISA level jv5fast's kernels ran at (recorded in every row)."""
    from jv5fast import cpu_tuning, ops
    return f"{cpu_tuning.cpu_id()[0]} ({ops.cpu_isa()})"


def _jv5fast_cuda(fam, cuda_graphs):
    eng = jv5fast.Engine(fam.checkpoint, device="cuda", cuda_graphs=cuda_graphs)
    eng.warmup()  # compile the kernels and capture every graph bucket now, not inside timed calls
    return _jv5fast(eng, exact=False)  # bf16, CUDA's default dtype


def _onnxruntime(fam, file, exact):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses for the others
    session = ort.InferenceSession(os.path.join(fam.export, file), opts, providers=["CPUExecutionProvider"])
    tok = PaddedTokenizer(fam.export, fam.prompt)

    def embed(texts):
        ids, mask = tok(texts)
        return session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    return System(embed, tok.token_ids, exact)


def _sentence_transformers(fam):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    # dtype: transformers 5 loads in config.json's torch_dtype (bfloat16 for small) unless told otherwise
    tr = Transformer(fam.checkpoint, model_kwargs={"dtype": torch.float32},
                     processor_kwargs={"pad_token": ST_PAD[fam.family]})
    pool = Pooling(tr.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[tr, pool, Normalize()], device="cpu", prompts=fam.prompts)

    def token_ids(texts):
        enc = model.preprocess(texts, prompt=fam.prompt)
        return [row[m == 1].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    return System(lambda texts: model.encode_query(texts, batch_size=32), token_ids, exact=True)


def _transformers(fam, device, dtype):
    from transformers import AutoModel
    # EuroBertModel / Qwen3Model; dtype given, else transformers 5 uses config.json's torch_dtype
    model = AutoModel.from_pretrained(fam.checkpoint, dtype=dtype).to(device).eval()
    tok = PaddedTokenizer(fam.checkpoint, fam.prompt)

    @torch.inference_mode()
    def embed(texts):
        ids, mask = (torch.from_numpy(a).to(device) for a in tok(texts))
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, E)
        last = hidden[torch.arange(len(texts), device=device), mask.sum(1) - 1]  # (B, E): the last real token
        return torch.nn.functional.normalize(last.float(), dim=-1).cpu().numpy()
    return System(embed, tok.token_ids, exact=dtype == torch.float32)


BUILDERS = {
    ("cpu", "jv5fast"): lambda fam: _jv5fast(fam.engine, exact=True),
    ("cpu", "jv5fast gemm=jv5fast"): lambda fam: _jv5fast_forced(fam, "jv5fast"),
    ("cpu", "jv5fast gemm=onednn"): lambda fam: _jv5fast_forced(fam, "onednn"),
    ("cpu", "jv5fast bf16"): lambda fam: _jv5fast(jv5fast.Engine(fam.checkpoint, device="cpu",
                                                                 cpu_precision="bf16"), exact=False),
    ("cpu", "jv5fast int8"): lambda fam: _jv5fast(jv5fast.Engine(fam.checkpoint, device="cpu",
                                                                 quantize="int8"), exact=False),
    ("cpu", "onnxruntime fp32"): lambda fam: _onnxruntime(fam, "model.onnx", exact=True),
    ("cpu", "onnxruntime int8"): lambda fam: _onnxruntime(fam, "model_int8.onnx", exact=False),
    ("cpu", "sentence-transformers"): _sentence_transformers,
    ("cpu", "transformers"): lambda fam: _transformers(fam, "cpu", torch.float32),
    ("cuda", "jv5fast"): lambda fam: _jv5fast_cuda(fam, cuda_graphs=None),
    ("cuda", "jv5fast no cuda graphs"): lambda fam: _jv5fast_cuda(fam, cuda_graphs=False),
    ("cuda", "transformers bf16"): lambda fam: _transformers(fam, "cuda", torch.bfloat16),
}


class Family:
    """One model's query pool, jv5fast's fp32 vectors for it (the reference), and its systems, each built on
    first use and checked to feed its model jv5fast's token ids for the whole pool."""

    def __init__(self, family, checkpoint, make_export):
        self.family, self.checkpoint, self._make_export = family, checkpoint, make_export
        with open(os.path.join(checkpoint, "config_sentence_transformers.json")) as f:
            self.prompts = json.load(f)["prompts"]
        self.prompt = self.prompts["query"]
        self.pool = queries(POOL, seed=0)
        self.engine = jv5fast.Engine(checkpoint, device="cpu")  # CPU fp32: the 'jv5fast' cpu entry too
        self.ids = self.engine.tokenize(self.pool, prompt_name="query")
        self.lengths = np.array([len(s) for s in self.ids])
        self.reference = self.engine.encode_query(self.pool, show_progress_bar=False)
        self.systems = {}

    @functools.cached_property
    def export(self):
        """The ONNX export folder, written on first use (only the onnxruntime systems need it)."""
        return self._make_export()

    def system(self, device, name) -> System:
        if (device, name) not in self.systems:
            system = BUILDERS[(device, name)](self)
            ids = system.token_ids(self.pool)
            bad = next((i for i, (a, b) in enumerate(zip(ids, self.ids)) if list(a) != list(b)), None)
            if bad is not None:
                raise AssertionError(f"{name}: token ids of query {bad} ({self.pool[bad]!r}) differ from "
                                     f"jv5fast's: {list(ids[bad])} vs {self.ids[bad]}")
            self.systems[(device, name)] = system
        return self.systems[(device, name)]


# ---- measuring (shared by the pytest entries and main) ----------------------------------------------
class Rounds:
    """One entry's calls: call k embeds the k-th slice of n texts of the pool (the WARMUP untimed calls
    first), keeping each output for the check against jv5fast's fp32 vectors for the same texts. Under pytest,
    ``benchmark.pedantic(rounds, setup=rounds.next_call, ...)`` makes and times the calls; main's
    ``time_all`` makes the same ones."""

    def __init__(self, fam: Family, system: System, n: int):
        self.fam, self.system, self.n = fam, system, n
        self.starts, self.outputs = [], []

    def next_call(self):
        """The next call's arguments (pytest-benchmark's ``setup``): the next slice of the pool."""
        start = len(self.starts) * self.n % POOL
        self.starts.append(start)
        return (self.fam.pool[start:start + self.n],), {}

    def __call__(self, texts):
        self.outputs.append(self.system.embed(texts))

    def time_all(self):
        """Seconds of each timed call (main: pytest-benchmark times them under pytest)."""
        times = []
        for _ in range(WARMUP + ROUNDS[self.n]):
            args, _ = self.next_call()
            t0 = time.perf_counter()
            self(*args)
            times.append(time.perf_counter() - t0)
        return times[WARMUP:]

    def result(self, name, times) -> dict:
        """The entry's numbers from its timed calls (seconds); asserts an exact system's vectors match."""
        ref = self.fam.reference
        cos = min(float((out * ref[s:s + self.n]).sum(1).min()) for s, out in zip(self.starts, self.outputs))
        if self.system.exact and cos < MIN_COSINE:
            raise AssertionError(f"{name}: min cosine {cos:.7f} to jv5fast's fp32 vectors < {MIN_COSINE}")
        tokens = [self.fam.lengths[s:s + self.n].sum() for s in self.starts[WARMUP:]]
        return dict(tokens_per_call=float(np.mean(tokens)), p50_ms=float(np.median(times) * 1e3),
                    p99_ms=float(np.percentile(times, 99) * 1e3), min_cosine=cos)


def group_name(family, device, n):
    return f"latency {family} {device} batch={n}"


# ---- pytest-benchmark entries -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_for(checkpoint, onnx_export_for):
    """family -> its Family, built once; building one drops the previous one (small: 2.4 GB per system)."""
    current = {}

    def get(family):
        if family not in current:
            current.clear()
            current[family] = Family(family, checkpoint(family), lambda: onnx_export_for(family))
        return current[family]
    return get


CASES = [(f, d, n, s) for f in ("nano", "small") for d in SYSTEMS for n in BATCHES for s in SYSTEMS[d]]


@pytest.mark.parametrize("family,device,n,name", CASES,
                         ids=[f"{f}-{d}-b{n}-{s.replace(' ', '_')}" for f, d, n, s in CASES])
def test_latency(benchmark, family, device, n, name, bench_small, family_for, groups):
    """One system in one (model, device, batch) group: ROUNDS[n] calls on successive slices of the pool."""
    if family == "small" and not bench_small:
        pytest.skip("full-size small is off by default (several times nano's time, 2.4 GB of fp32 weights "
                    "per system): pass --bench-small or set JV5FAST_BENCH_SMALL=1")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    fam = family_for(family)
    benchmark.group = group_name(family, device, n)
    rounds = Rounds(fam, fam.system(device, name), n)
    benchmark.pedantic(rounds, setup=rounds.next_call, rounds=ROUNDS[n], warmup_rounds=WARMUP)
    info = rounds.result(name, benchmark.stats.stats.data)
    info["slower_than_jv5fast_x"] = groups.record(benchmark, name)
    benchmark.extra_info.update(info)


# ---- the markdown table -----------------------------------------------------------------------------
def versions():
    import onnxruntime
    import sentence_transformers
    import transformers
    return (f"jv5fast {jv5fast.__version__}, onnxruntime {onnxruntime.__version__} "
            f"({torch.get_num_threads()} intra-op threads), sentence-transformers "
            f"{sentence_transformers.__version__}, transformers {transformers.__version__}")


def measure_family(family, devices, tmp, systems=None):
    """Rows of one model: per device and batch size, the systems' calls interleaved (call k of every system,
    then call k + 1, ...), so drift and other processes on a shared machine hit all alike; jv5fast first."""
    ckpt = merged_checkpoint(tmp, family)
    fam = Family(family, ckpt, lambda: onnx_export(os.path.join(tmp, f"{family}-export"), ckpt))
    rows = []
    for device in devices:
        names = [s for s in SYSTEMS[device] if systems is None or s in systems]
        for n in BATCHES:
            rounds = {name: Rounds(fam, fam.system(device, name), n) for name in names}
            times = {name: [] for name in names}
            for k in range(WARMUP + ROUNDS[n]):
                for name in (names if k % 2 == 0 else names[::-1]):
                    args, _ = rounds[name].next_call()
                    t0 = time.perf_counter()
                    rounds[name](*args)
                    times[name].append(time.perf_counter() - t0)
            for name in names:  # jv5fast first: base is its p50
                row = dict(family=family, device=device, n=n, name=name, cpu=cpu_isa_note() if device == "cpu"
                           else torch.cuda.get_device_name(), **rounds[name].result(name, times[name][WARMUP:]))
                if name == names[0]:
                    base = row["p50_ms"]
                row["slower_than_jv5fast_x"] = row["p50_ms"] / base
                rows.append(row)
                print(f"{group_name(family, device, n)}: {name}: p50 {row['p50_ms']:.1f} ms, p99 "
                      f"{row['p99_ms']:.1f} ms, {row['slower_than_jv5fast_x']:.2f}x jv5fast, min cosine "
                      f"{row['min_cosine']:.7f}", flush=True)
    gemms = fam.engine.describe()
    return rows, gemms


def table(rows):
    out = [("| model | device (ISA of jv5fast's kernels) | queries per call | system | tokens per call | p50 ms "
            "| p99 ms | p50 / jv5fast p50 | min cosine to jv5fast fp32 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['family']} | {r['device']}: {r['cpu']} | {r['n']} | {r['name']} | "
                   f"{r['tokens_per_call']:.1f} | "
                   f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['slower_than_jv5fast_x']:.2f}× | "
                   f"{r['min_cosine']:.7f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="nano")
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--systems", default=None, help="comma-separated subset of the systems (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    systems = None if a.systems is None else [s.strip() for s in a.systems.split(",")]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # Engine(quantize="int8") caches its export under a key that includes the checkpoint's mtimes: a fresh
        # temporary checkpoint would leave a new entry in ~/.cache on every run
        os.environ["JV5FAST_CACHE"] = os.path.join(tmp, "jv5fast-cache")
        for family in a.families.split(","):
            fam_rows, d = measure_family(family, a.devices.split(","), tmp, systems)
            rows += fam_rows
            from jv5fast import cpu_tuning
            notes += [f"{family}: the default engine's choice (`Engine.describe()`):", "", "```",
                      cpu_tuning.format_description(d), "```", ""]
    args = shlex.join(sys.argv[1:] if argv is None else argv)
    calls = ", ".join(f"{ROUNDS[n]} timed at {n}" for n in BATCHES)
    how = (f"Full-size random weights (retrieval merged in fp32, stored in fp32), real tokenizer; queries of "
           f"4–24 words with the \"Query: \" prompt (every system checked to get jv5fast's token ids), timed "
           f"from text to unit vector. Call k embeds the k-th slice of a {POOL}-query pool; {WARMUP} warm-up "
           f"calls, then {calls} queries per call. Per batch size the systems' calls are interleaved (one call "
           f"of each in turn, the order reversed every other call).")
    text = "\n".join(["# Query latency", "", f"{datetime.date.today()} · {machine()} · {versions()}", "",
                      f"Command: `python bench/bench_latency.py {args}`", "", how, "", table(rows), "", *notes])
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
