"""Which CPU fp32 GEMM runs each projection shape: measured here, once, and remembered.

jv5fast ships two prepacked GEMMs for CPU inference (``jv5fast.ops.linear``): its own (csrc/sgemm.cpp,
16-column panels, AVX2 or AVX-512 picked at run time) and oneDNN's (through torch, its own blocked layout).
Which is faster depends on the CPU: on a 2-core Zen3 (AVX2) jv5fast's won at every batch size, on AVX-512
parts oneDNN is up to 2x faster at 8-32 queries. So under ``JV5FAST_CPU_GEMM=auto`` (the default) the engine
times both on the model's own projection shapes at the row counts that matter (``M_BUCKETS``: one query,
8 and 32 queries, the last also the CPU batch cap), interleaved, and keeps per shape the one with the lowest
mean slowdown against the best at each M (``pick``). Where that one is more than ``SPLIT_GAIN`` slower than
the other at some M, the shape is split by rows (``split``): both packed copies are kept (more memory: up to
another copy of that shape's weights, 0.45 GB for all of nano in fp32) and each input runs the GEMM that won at
the nearest measured M (``split_bounds``). ``JV5FAST_CPU_GEMM_SPLIT=0`` keeps one copy per shape.

The timings are cached in ``$JV5FAST_CACHE/cpu_gemm.json`` (else ``~/.cache/jv5fast``), keyed by the CPU
(model name and flags), the ISA level in use, the thread count, the shape, the candidates and the jv5fast and
torch versions; the file is untrusted (validated field by field; anything odd means measure again) and written
atomically. Timings taken while other processes keep the CPUs busy (load average above the CPU count) pick
that load's GEMMs for this process (every engine it loads gets the same choice, so the same bits) but are not
written to the file. ``JV5FAST_CPU_GEMM=jv5fast|onednn`` forces one kernel and measures
nothing; delete the file to measure again.

One file on purpose: the fused ops (``choose_fused``) are chosen by the same machinery as the GEMMs (``pick``,
``_timings``: the cache file, the in-process memo, the busy-machine check; ``M_BUCKETS``), and ``describe``
reports both; split, the fused half would reach back here for all of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time

import torch

log = logging.getLogger("jv5fast")

M_BUCKETS = (16, 128, 512)  # rows: 1 query (~16 tokens), 8 queries, 32 queries (= the CPU batch cap)
CACHE_FORMAT = 1
CACHE_FILE = "cpu_gemm.json"
MAX_CACHE_ENTRIES = 512    # oldest dropped first: the file never grows without bound
BUDGET_S = 2.0             # measuring stops after the first round that ends past this (min 2 rounds)
ROTATE = 4                 # weights of one shape cycled through, so small-M timings stream from memory
BUSY_MARGIN = 0.5          # load average above the CPU count by more than this: timings are not cached
REPS = {16: 6, 128: 2, 512: 1}  # samples per round at each M (the small ones are cheap and the most noisy)

SPLIT_GAIN = 0.15         # split a shape by rows only where the single pick is >15% slower at some M

_memo: dict = {}           # in-process: (key fields, shape) -> (timings, measured on a busy machine)
BUSY_AGAIN = "measured on a busy machine earlier in this process (not cached on disk)"


@dataclasses.dataclass(frozen=True)
class GemmChoice:
    shape: tuple           # (N, K): out, in features
    kind: str              # "jv5fast" | "onednn"
    reason: str            # "measured" | "cached" | "forced (JV5FAST_CPU_GEMM=...)" | "only candidate ..."
    timings_ms: dict       # {kind: {M: ms}} (empty where nothing was timed)
    kinds_by_m: dict = dataclasses.field(default_factory=dict)  # {M: kind} where split by rows, else {}

    @property
    def split(self) -> bool:
        return len(set(self.kinds_by_m.values())) > 1

    def describe(self) -> dict:
        kernel = self.kind if not self.split else "split: " + ", ".join(
            f"{k} up to {b} rows" if b else k for b, k in zip(*split_bounds(self.kinds_by_m)))
        return {"shape": list(self.shape), "kernel": kernel, "reason": self.reason,
                "timings_ms": {k: {str(m): round(v, 4) for m, v in t.items()} for k, t in self.timings_ms.items()}}


def pick(timings: dict) -> str:
    """The kernel with the lowest mean over M of (its time / the best time at that M); ties go to the earlier
    candidate. ``timings``: {kind: {M: seconds or ms}}, every kind timed at the same M values."""
    kinds = list(timings)
    ms = sorted(set.intersection(*(set(t) for t in timings.values())))
    if not ms:
        return kinds[0]
    best = {m: min(timings[k][m] for k in kinds) for m in ms}
    score = {k: sum(timings[k][m] / best[m] for m in ms) / len(ms) for k in kinds}
    return min(kinds, key=lambda k: (score[k], kinds.index(k)))


def split(timings: dict) -> dict:
    """{M: kind}: the fastest kind at each M where ``pick``'s single kind is more than SPLIT_GAIN slower than
    it at some M (and JV5FAST_CPU_GEMM_SPLIT is not '0'), else {} (one kind for every size)."""
    if os.environ.get("JV5FAST_CPU_GEMM_SPLIT", "1").strip() == "0":
        return {}
    one = pick(timings)
    ms = sorted(set.intersection(*(set(t) for t in timings.values())))
    best = {m: min(timings, key=lambda k: (timings[k][m], list(timings).index(k))) for m in ms}
    if all(timings[one][m] <= (1 + SPLIT_GAIN) * timings[best[m]][m] for m in ms):
        return {}
    return best


def split_bounds(kinds_by_m: dict) -> tuple:
    """({M: kind}) -> (bounds, kinds): runs of equal kinds merged; each run serves inputs up to the geometric
    mean of its last M and the next run's first M (rows), the last run any size (bound None)."""
    ms = sorted(kinds_by_m)
    bounds, kinds = [], []
    for j, m in enumerate(ms):
        if kinds and kinds[-1] == kinds_by_m[m]:
            bounds[-1] = None
        else:
            bounds.append(None)
            kinds.append(kinds_by_m[m])
        if j + 1 < len(ms) and kinds_by_m[ms[j + 1]] != kinds_by_m[m]:
            bounds[-1] = int(math.sqrt(m * ms[j + 1]))
    return bounds, kinds


# ---- cache -----------------------------------------------------------------------------------------------
def cache_path() -> str:
    from .int8 import cache_root
    return os.path.join(cache_root(), CACHE_FILE)


def cpu_id() -> tuple[str, str]:
    """(CPU model name, sha of its flag set): another CPU, or the same one under another hypervisor mask, differs."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and not model:
                    model = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(v.split()))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), hashlib.sha256(flags.encode()).hexdigest()[:16]


def key_fields(candidates, threads: int, isa: str) -> dict:
    from . import __version__
    model, flags = cpu_id()
    return {"cpu": model, "cpu_flags": flags, "isa": isa, "threads": int(threads), "candidates": list(candidates),
            "m": list(M_BUCKETS), "jv5fast": __version__, "torch": torch.__version__}


def _valid_timings(t, candidates) -> dict | None:
    """{kind: {M: ms}} from a cache entry's JSON, or None unless every candidate has a finite positive time at
    every M bucket (and nothing else)."""
    if not isinstance(t, dict) or set(t) != set(candidates):
        return None
    out = {}
    for kind, row in t.items():
        if not isinstance(row, dict) or set(row) != {str(m) for m in M_BUCKETS}:
            return None
        vals = {}
        for m in M_BUCKETS:
            v = row[str(m)]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                return None
            vals[m] = float(v)
        out[kind] = vals
    return out


def _read_entries(path) -> list:
    """The cache file's entries, or [] when it is missing, unreadable or not in the expected format."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), list):
        return []
    return [e for e in data["entries"] if isinstance(e, dict) and isinstance(e.get("key"), dict)]


def _shape(key: dict):
    """A cache entry's shape as a tuple (ints, and a fused entry's op name first), or None when it is not one."""
    shape = key.get("shape")
    if not isinstance(shape, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in shape):
        return None
    return tuple(shape)


def load_cached(path, fields: dict, shapes) -> dict:
    """{shape: timings} for the shapes whose entry in ``path`` has exactly ``fields`` plus that shape as its key
    and valid timings for exactly ``fields['candidates']``; other shapes are missing (to be measured)."""
    found = {}
    want = {tuple(s) for s in shapes}
    for e in _read_entries(path):
        shape = _shape(e["key"])
        if shape not in want or {k: v for k, v in e["key"].items() if k != "shape"} != fields:
            continue
        t = _valid_timings(e.get("timings_ms"), fields["candidates"])
        if t is not None:
            found[shape] = t
    return found


def save_cached(path, fields: dict, timings: dict) -> None:
    """Add (or replace) the entries for ``timings`` ({shape: {kind: {M: ms}}}) in ``path``, atomically (a
    temporary file in the same folder, then ``os.replace``); keeps others' valid-looking entries. Never raises:
    a read-only cache only costs measuring again."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mine = {tuple(s) for s in timings}
        keep = [e for e in _read_entries(path)
                if not (_shape(e["key"]) in mine and {k: v for k, v in e["key"].items() if k != "shape"} == fields)]
        new = [{"key": {**fields, "shape": list(s)},
                "timings_ms": {k: {str(m): v for m, v in row.items()} for k, row in t.items()}}
               for s, t in timings.items()]
        entries = (keep + new)[-MAX_CACHE_ENTRIES:]
        fd, tmp = tempfile.mkstemp(prefix=".cpu_gemm.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.debug("jv5fast: could not write the CPU GEMM cache %s (%s)", path, e)


# ---- measuring -------------------------------------------------------------------------------------------
def measure(weights_by_shape: dict, candidates, threads: int, budget_s: float = BUDGET_S) -> dict:
    """{shape: {kind: {M: ms}}}: the fastest of the rounds' times of ``ops.linear`` on each candidate's packed
    copy of the given weights (cycled, so small-M rows stream weights from memory as in a forward), the
    candidates interleaved (each round starts with another). The minimum, not the median: another process on
    the machine only ever adds time (a preempted thread waits a scheduler quantum), so the fastest sample is the
    kernel's own speed."""
    from . import ops
    packs = {(s, c): [ops.pack_linear(w, kind=c) for w in ws[:ROTATE]]
             for s, ws in weights_by_shape.items() for c in candidates}
    xs = {}
    for (n, k) in weights_by_shape:
        for m in M_BUCKETS:
            xs.setdefault((k, m), torch.randn(m, k))
    samples = {(s, c, m): [] for s in weights_by_shape for c in candidates for m in M_BUCKETS}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (s, c), ps in packs.items():  # warm-up: first-call costs (oneDNN primitive creation, page faults)
            for p in ps:
                ops.linear(xs[(s[1], M_BUCKETS[0])], None, p)
        t_start, r = time.perf_counter(), 0
        while True:
            order = list(candidates[r % len(candidates):]) + list(candidates[:r % len(candidates)])
            for s in weights_by_shape:
                for m in M_BUCKETS:
                    x = xs[(s[1], m)]
                    for c in order:
                        ps = packs[(s, c)]
                        for j in range(REPS[m]):  # several cheap samples: one that no other process delayed
                            p = ps[(r * REPS[m] + j) % len(ps)]
                            t0 = time.perf_counter()
                            ops.linear(x, None, p)
                            samples[(s, c, m)].append((time.perf_counter() - t0) * 1e3)
            r += 1
            if r >= 2 and (time.perf_counter() - t_start > budget_s or r >= 9):
                break
    finally:
        torch.set_num_threads(prev)
    return {s: {c: {m: min(samples[(s, c, m)]) for m in M_BUCKETS} for c in candidates} for s in weights_by_shape}


def _busy() -> str | None:
    """Why timings taken now may not be the kernels' own (other processes running: the 1-minute load average
    above the CPU count), or None. Such timings still pick this load's GEMMs, but are not cached."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    return f"load {load:.1f} on {cpus} CPUs" if load > cpus + BUSY_MARGIN else None


def choose(weights_by_shape: dict, *, threads: int | None = None, measure_fn=None, path: str | None = None) -> dict:
    """{shape: GemmChoice} for the fp32 CPU weights ``{(N, K): [weights of that shape]}`` under
    JV5FAST_CPU_GEMM: forced, or (auto) measured / read back from the cache. ``measure_fn(weights_by_shape,
    candidates, threads)`` replaces ``measure`` (tests inject timings); ``path`` the cache file."""
    from . import ops
    mode = ops.cpu_gemm_mode()
    shapes = [tuple(s) for s in weights_by_shape]
    candidates = ops.available_gemms()
    if mode != "auto":
        return {s: GemmChoice(s, ops.cpu_gemm(), f"forced (JV5FAST_CPU_GEMM={mode})", {}) for s in shapes}
    if len(candidates) < 2:
        kind = candidates[0] if candidates else ops.cpu_gemm()
        return {s: GemmChoice(s, kind, f"only candidate here ({', '.join(candidates) or 'none'})", {})
                for s in shapes}
    threads = int(threads or torch.get_num_threads())
    timings, reason = _timings(
        shapes, candidates, key_fields(candidates, threads, ops.cpu_isa()), path or cache_path(), "GEMMs",
        lambda todo: (measure_fn or measure)({s: weights_by_shape[s] for s in todo}, candidates, threads))
    return {s: GemmChoice(s, pick(timings[s]), reason[s], timings[s], split(timings[s])) for s in shapes}


def _timings(items, candidates, fields: dict, path: str, what: str, measure_todo) -> tuple:
    """``({item: {kind: {M: ms}}}, {item: reason})`` for ``items`` (GEMM shapes, or fused (op, *shape)) under
    the cache key ``fields``: remembered in this process, else read from ``path``, else timed together by
    ``measure_todo(items)`` (written to ``path`` unless the machine was busy)."""
    memo_key = json.dumps(fields, sort_keys=True)
    timings, reason = {}, {}
    for it in items:
        if (memo_key, it) in _memo:
            timings[it], was_busy = _memo[(memo_key, it)]
            reason[it] = BUSY_AGAIN if was_busy else "cached"
    todo = [it for it in items if it not in timings]
    if todo:
        for it, t in load_cached(path, fields, todo).items():
            timings[it], reason[it] = t, "cached"
    todo = [it for it in items if it not in timings]
    if todo:
        t0, busy = time.perf_counter(), _busy()
        got = measure_todo(todo)
        busy = busy or _busy()
        for it in todo:
            t = _valid_timings({c: {str(m): v for m, v in got[it][c].items()} for c in got[it]}, candidates)
            if t is None:
                raise RuntimeError(f"CPU {what} timings for {it} are incomplete: {got[it]!r}")
            timings[it] = t
            reason[it] = "measured" if busy is None else f"measured on a busy machine ({busy}; not cached)"
        log.info("jv5fast: timed the CPU %s on %d shapes in %.2f s%s", what, len(todo), time.perf_counter() - t0,
                 "" if busy is None else f" on a busy machine ({busy}): not cached on disk")
        if busy is None:
            save_cached(path, fields, {it: timings[it] for it in todo})
    for it in items:
        _memo[(memo_key, it)] = (timings[it], reason[it].startswith("measured on a busy"))
    return timings, reason


# ---- fused ops: jv5fast._C's kernel or the torch reference -----------------------------------------------
FUSED_CANDIDATES = ("jv5fast", "torch")
FUSED_BUDGET_S = 0.5


@dataclasses.dataclass(frozen=True)
class FusedChoice:
    op: str                # one of ops.FUSED_OPS
    key: tuple             # ops.fused_key: rms_norm (E,), rope (H, D), swiglu (2F,), attention (H, Hkv, D)
    kind: str              # "jv5fast" | "torch"
    reason: str
    timings_ms: dict       # {kind: {M: ms}}

    def describe(self) -> dict:
        return {"op": self.op, "shape": list(self.key), "kernel": self.kind, "reason": self.reason,
                "timings_ms": {k: {str(m): round(v, 4) for m, v in t.items()} for k, t in self.timings_ms.items()}}


def fused_keys(args) -> list:
    """[(op, key)] of the fused ops a forward of the model ``args`` runs (ops.fused_key's shapes)."""
    H, Hkv, D = args.num_heads, args.num_kv_heads, args.head_dim
    rope = [(H, D)] + ([(Hkv, D)] if Hkv != H else [])
    return ([("rms_norm", (args.hidden_size,))] + [("rope", k) for k in rope]
            + [("swiglu", (2 * args.intermediate_size,)), ("attention", (H, Hkv, D))])


def _fused_calls(args, op, key, m):
    """{kind: zero-argument callable} running ``op`` at ``key`` on m rows (sequences of 16 tokens, as queries)."""
    from . import ops
    from .kernels.attention import attention_varlen_ref
    g = torch.Generator().manual_seed(m)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    eps = args.rms_norm_eps
    if op == "rms_norm":
        x, res, w = r(m, key[0]), r(m, key[0]), r(key[0])
        return {"jv5fast": lambda: ops._rms_norm_cpu(x, w, eps, res), "torch": lambda: ops.rms_norm_ref(x, w, eps, res)}
    if op == "rope":
        x = r(m, *key)
        cos, sin = ops.rope_tables(args.rope_theta, key[1], 512)
        pos = torch.arange(m, dtype=torch.int64) % 16
        nw = r(key[1]) if args.qk_norm else None
        return {"jv5fast": lambda: ops._rope_cpu(x, cos, sin, pos, nw, eps),
                "torch": lambda: ops.rope_ref(x, cos, sin, pos, nw, eps)}
    if op == "swiglu":
        x = r(m, key[0])
        return {"jv5fast": lambda: ops._swiglu_cpu(x), "torch": lambda: ops.swiglu_ref(x)}
    H, Hkv, D = key
    q, k, v = r(m, H, D), r(m, Hkv, D), r(m, Hkv, D)
    cu = torch.arange(0, m + 1, 16, dtype=torch.int32)
    causal = args.causal
    return {"jv5fast": lambda: ops._attention_cpu(q, k, v, cu, causal, False, None),
            "torch": lambda: attention_varlen_ref(q, k, v, cu, 16, causal=causal)}


def measure_fused(args, keys, threads: int, budget_s: float = FUSED_BUDGET_S) -> dict:
    """{(op, key): {kind: {M: ms}}}: the fastest of the rounds' times of each fused op's two implementations,
    interleaved, at the M buckets (as ``measure`` does for the GEMMs)."""
    calls = {(op, key, m): _fused_calls(args, op, key, m) for op, key in keys for m in M_BUCKETS}
    samples = {(op, key, c, m): [] for op, key in keys for c in FUSED_CANDIDATES for m in M_BUCKETS}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fns in calls.values():  # warm-up
            for f in fns.values():
                f()
        t_start, r = time.perf_counter(), 0
        while True:
            order = FUSED_CANDIDATES[r % 2:] + FUSED_CANDIDATES[:r % 2]
            for (op, key, m), fns in calls.items():
                for c in order:
                    for _ in range(REPS[m]):
                        t0 = time.perf_counter()
                        fns[c]()
                        samples[(op, key, c, m)].append((time.perf_counter() - t0) * 1e3)
            r += 1
            if r >= 2 and (time.perf_counter() - t_start > budget_s or r >= 9):
                break
    finally:
        torch.set_num_threads(prev)
    return {(op, key): {c: {m: min(samples[(op, key, c, m)]) for m in M_BUCKETS} for c in FUSED_CANDIDATES}
            for op, key in keys}


def choose_fused(args, *, threads: int | None = None, measure_fn=None, path: str | None = None) -> list:
    """[FusedChoice] for the fused ops of model ``args`` on CPU fp32, under JV5FAST_CPU_FUSED (forced, or
    measured / cached like the GEMMs, in the same file, keyed by the op and its shape), and records each in
    ``ops.set_fused_choice``. [] where jv5fast._C's fused kernels do not run (nothing to choose)."""
    from . import ops
    if ops._cpu_ext() is None or ops.backend() != "auto":
        return []
    keys = fused_keys(args)
    mode = ops.cpu_fused_mode()
    if mode != "auto":
        return [FusedChoice(op, key, mode, f"forced (JV5FAST_CPU_FUSED={mode})", {}) for op, key in keys]
    threads = int(threads or torch.get_num_threads())
    items = [(op, *key) for op, key in keys]  # the cache keys: the op, then its shape

    def measure_todo(todo):
        got = (measure_fn or measure_fused)(args, [(it[0], tuple(it[1:])) for it in todo], threads)
        return {(op, *key): t for (op, key), t in got.items()}
    timings, reason = _timings(items, FUSED_CANDIDATES, key_fields(FUSED_CANDIDATES, threads, ops.cpu_isa()),
                               path or cache_path(), "fused ops", measure_todo)
    out = []
    for (op, key), it in zip(keys, items):
        c = FusedChoice(op, key, pick(timings[it]), reason[it], timings[it])
        ops.set_fused_choice(op, key, c.kind)
        out.append(c)
    return out


# ---- describing ------------------------------------------------------------------------------------------
def describe(engine) -> dict:
    """``Engine.describe()``: see there."""
    from . import ops
    out = {"device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
           "backend": engine.backend, "threads": torch.get_num_threads(),
           "cpu_precision": getattr(engine, "cpu_precision", "fp32")}
    bb = getattr(engine, "model", None)
    if engine.backend != "torch" or bb is None or engine.device.type != "cpu":
        return out
    model, _ = cpu_id()
    out["cpu"] = {"model": model, "isa_supported": ops.cpu_isa_supported(), "isa": ops.cpu_isa(),
                  "JV5FAST_CPU_ISA": os.environ.get("JV5FAST_CPU_ISA") or None}
    fused = ops._cpu_ext() is not None and ops.backend() == "auto" and engine.dtype == torch.float32
    out["fused_ops"] = (f"jv5fast._C ({ops.cpu_isa()}): rms_norm, rope, swiglu, attention up to "
                        f"{ops.CPU_ATTENTION_MAX_SEQLEN} tokens" if fused else "torch references")
    out["fused"] = {"mode": ops.cpu_fused_mode(), "ops": [c.describe() for c in getattr(bb, "fused_choice", [])]}
    if bb.packed is None:
        out["gemm"] = {"mode": "unpacked (F.linear)", "shapes": []}
        out["forward"] = "op-by-op (Backbone.hidden_states)"
        return out
    names = {}
    for (i, name), w in bb._projections().items():
        names.setdefault(tuple(w.shape), set()).add(name)
    out["gemm"] = {"mode": ops.cpu_gemm_mode(), "cache": cache_path(),
                   "shapes": [{**c.describe(), "projections": sorted(names.get(s, ()))}
                              for s, c in bb.gemm_choice.items()]}
    one_loop = bb.one_loop_ready()
    out["forward"] = (f"one loop of jv5fast._C calls (jv5fast/models/cpu_forward.py) for batches of sequences up to "
                      f"{ops.CPU_ATTENTION_MAX_SEQLEN} tokens, op-by-op above" if one_loop
                      else "op-by-op (Backbone.hidden_states)")
    return out


def format_description(d: dict) -> str:
    """``Engine.describe()`` as text, one line per item (a `jv5fast info` command can print this)."""
    lines = [(f"device {d['device']}, dtype {d['dtype']}, backend {d['backend']}, {d['threads']} threads, "
              f"cpu_precision {d['cpu_precision']}")]
    if "cpu" in d:
        c = d["cpu"]
        lines.append(f"cpu {c['model']}: kernels at {c['isa']} (CPU supports {c['isa_supported']}"
                     + (f", JV5FAST_CPU_ISA={c['JV5FAST_CPU_ISA']}" if c["JV5FAST_CPU_ISA"] else "") + ")")
        lines.append(f"fused ops: {d['fused_ops']}")
        for c in d.get("fused", {}).get("ops", []):
            t = "; ".join(f"{k} " + "/".join(f"{v:.3g}" for v in row.values()) + " ms"
                          for k, row in c["timings_ms"].items())
            lines.append(f"  {c['op']} {'x'.join(map(str, c['shape']))}: {c['kernel']}, {c['reason']}"
                         + (f" [M={'/'.join(map(str, M_BUCKETS))}: {t}]" if t else ""))
        lines.append(f"forward: {d['forward']}")
        g = d["gemm"]
        lines.append(f"gemm: JV5FAST_CPU_GEMM={g['mode']}" + (f", cache {g['cache']}" if "cache" in g else ""))
        for sh in g["shapes"]:
            t = "; ".join(f"{k} " + "/".join(f"{v:.3g}" for v in row.values()) + " ms"
                          for k, row in sh["timings_ms"].items())
            lines.append(f"  {sh['shape'][0]}x{sh['shape'][1]} ({', '.join(sh['projections'])}): {sh['kernel']}, "
                         f"{sh['reason']}" + (f" [M={'/'.join(map(str, M_BUCKETS))}: {t}]" if t else ""))
    return "\n".join(lines)
