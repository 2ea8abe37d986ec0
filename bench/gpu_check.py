"""One-shot GPU check for jv5fast (H100/H200): kernel correctness, attention TFLOP/s, engine tokens/s.

    python bench/gpu_check.py [results.md] [--only=correctness,profile,ncu,attention,engine,latency,server,train]

1. correctness: every Triton kernel in bf16 and fp16 against its fp32 reference on fresh random data
   (attention forward and dq/dk/dv included), error bounded as in tests (style.md): a small multiple of
   PyTorch's own error in the same dtype plus a floor; Hamming top-k for equality when it exists.
2. attention: forward and forward+backward TFLOP/s of ``attention_varlen`` against
   ``scaled_dot_product_attention`` (flash backend, (B, H, S, D), same total tokens) at head_dim 128
   (16 q / 8 kv heads, causal) and 64 (12 / 12, bidirectional), S = 512 … 32k, ~32k tokens per call.
3. engine: ``jv5fast.Engine`` tokens/s on a mixed-length corpus against transformers' Qwen3Model /
   EuroBertModel in bf16 (sdpa, length-sorted padded batches) on random full-size checkpoints, and the
   peak CUDA memory of one 32k-token text on small.
4. latency: ``embed`` of 1 / 8 / 32 short queries with CUDA graphs (after ``Engine.warmup``) against the
   same engine eager (``cuda_graphs=False``) and transformers bf16 sdpa, plus the graphs-vs-eager cosine.

Each section survives the failure of another (the error is printed and the table says so). One
markdown table is printed at the end and written to argv[1] if given. Budget: < 8 minutes on an H100.
The helpers above ``main`` (FLOP counting, tolerance, table formatting) run on CPU and are tested.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ATTN_SHAPES = [  # (label, H, Hkv, D, causal)
    ("d128 16/8 causal", 16, 8, 128, True),
    ("d64 12/12 bidir", 12, 12, 64, False),
]
ATTN_SEQLENS = [512, 2048, 8192, 32768]
TOTAL_TOKENS = 32768
DEVICE = "cuda"  # the CPU smoke test sets "cpu" (Triton interpreter)
ATTN_CHECK_CASES = [  # (lens, H, Hkv, D, causal)
    ([1, 77, 512, 1000, 2049], 16, 8, 128, True), ([3, 300, 1025], 12, 12, 64, False),
    ([97, 700, 1], 8, 2, 96, True), ([513, 64], 8, 1, 256, False)]
SMALL_LENS = [1, 2000, 2098]  # sequences for the RMSNorm / RoPE / SwiGLU checks
POOL_LENS = [1, 7, 513, 2048, 33]
LATENCY_BATCHES = (1, 8, 32)  # texts per embed() call in the short-batch latency section


def ensure_jv5fast_importable():
    """Run from a plain checkout too (no ``pip install -e .``): the Triton kernels live inside the package
    (jv5fast/kernels), so the repo root on ``sys.path`` is all a checkout needs."""
    try:
        import jv5fast.kernels  # noqa: F401
        return "installed"
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in [m for m in sys.modules if m == "jv5fast" or m.startswith("jv5fast.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    import jv5fast.kernels  # noqa: F401,F811
    return "checkout"


# ---- CPU-side helpers (tested in tests/test_gpu_check.py) -----------------------------------------
def attention_flops(seqlens, n_heads, head_dim, causal, mode="fwd"):
    """FLOPs of attention over sequences of the given lengths (FlashAttention's convention):
    forward 4·S²·H·D per sequence (two matmuls), halved when causal; backward = 2.5 × forward."""
    f = sum(4.0 * s * s * n_heads * head_dim for s in seqlens)
    if causal:
        f /= 2
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")


def batch_for(seqlen, total_tokens=TOTAL_TOKENS):
    """(B, S) with B·S ≈ total_tokens and B ≥ 1."""
    return max(1, total_tokens // seqlen), seqlen


def error_bound(torch_err, dtype, mult):
    """The style.md tolerance: mult × PyTorch's own low-precision error + a floor for the dtype."""
    return mult * torch_err + FLOOR[dtype]


def compare(out, ref32, ref_lowp, dtype, mult):
    """(ok, err, bound): max |out − ref32| against error_bound(max |ref_lowp − ref32|)."""
    out, ref32, ref_lowp = out.float(), ref32.float(), ref_lowp.float()
    if not torch.isfinite(out).all():
        return False, float("nan"), float("nan")
    err = (out - ref32).abs().max().item() if out.numel() else 0.0
    terr = (ref_lowp - ref32).abs().max().item() if out.numel() else 0.0
    bound = error_bound(terr, dtype, mult)
    return err <= bound, err, bound


def fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(header, rows):
    """A GitHub markdown table; cells pass through fmt()."""
    cells = [[fmt(c) for c in r] + [""] * (len(header) - len(r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def mixed_lengths(n, lo=8, hi=2048, seed=0):
    """n text lengths (in words), log-uniform between lo and hi: the embedding regime, many short texts."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    return [int(round(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))) for x in u.tolist()]


def random_text(n_words, seed):
    import random
    rng = random.Random(seed)
    vocab = ["the", "model", "embedding", "vector", "search", "query", "document", "token", "fast", "kernel",
             "attention", "layer", "retrieval", "text", "data", "index", "graph", "memory", "speed", "sequence",
             "Berlin", "2024", "über", "naïve", "résumé", "GPU", "12.5%", "x", "of", "and"]
    return " ".join(rng.choice(vocab) for _ in range(n_words))


class Report:
    """Collects rows (section, check, result, detail) and renders them as one markdown table."""

    def __init__(self):
        self.rows = []

    def add(self, section, check, result, detail=""):
        self.rows.append((section, check, result, detail))
        print(f"[{section}] {check}: {fmt(result)} {detail}", flush=True)

    def render(self, device="", note=""):
        head = [f"# jv5fast GPU check — {device}", "",
                f"{datetime.date.today().isoformat()} · torch {torch.__version__} · "
                f"triton {_version('triton')} · python {platform.python_version()}" + (f" · {note}" if note else ""),
                ""]
        return "\n".join(head) + markdown_table(["section", "check", "result", "detail"], self.rows) + "\n"


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "n/a"


# ---- GPU sections ----------------------------------------------------------------------------------
def _cuda_ms(fn, warmup=3, iters=10):
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _cu(lens, device=None):
    device = device or DEVICE
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def check_attention(rep, dtype):
    from jv5fast.kernels.attention import attention_varlen, attention_varlen_ref
    for lens, H, Hkv, D, causal in ATTN_CHECK_CASES:
        name = f"attention {dtype_name(dtype)} D{D} {H}/{Hkv} {'causal' if causal else 'bidir'}"
        try:
            T, S = sum(lens), max(lens)
            cu = _cu(lens)
            q, k, v = (torch.randn(T, h, D, device=DEVICE).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
            q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
            out = attention_varlen(q, k, v, cu, S, causal=causal)
            ref32 = attention_varlen_ref(q32, k32, v32, cu, S, causal=causal)
            ref_lp = attention_varlen_ref(q, k, v, cu, S, causal=causal)
            do = torch.randn_like(ref32)
            g = torch.autograd.grad(out, (q, k, v), do.to(dtype))
            g32 = torch.autograd.grad(ref32, (q32, k32, v32), do)
            glp = torch.autograd.grad(ref_lp, (q, k, v), do.to(dtype))
            res = [("out", compare(out, ref32, ref_lp, dtype, 2))]
            res += [(n, compare(a, b, c, dtype, 3)) for n, a, b, c in zip(("dq", "dk", "dv"), g, g32, glp)]
            ok = all(r[0] for _, r in res)
            rep.add("correctness", name, "PASS" if ok else "FAIL",
                    " ".join(f"{n} {fmt(e)}≤{fmt(b)}" for n, (_, e, b) in res))
        except Exception as e:  # noqa: BLE001
            _fail(rep, "correctness", name, e)
        name = f"attention_last {dtype_name(dtype)} D{D} {H}/{Hkv}"
        try:  # the engine's pruned final layer: each sequence's last query row over all its keys
            from jv5fast.kernels.attention import attention_last, attention_last_ref
            last = (cu[1:] - 1).long()
            ql = q.detach()[last]
            k0, v0 = k.detach(), v.detach()
            ok, err, bound = compare(attention_last(ql, k0, v0, cu, S),
                                     attention_last_ref(ql.float(), k0.float(), v0.float(), cu, S),
                                     attention_last_ref(ql, k0, v0, cu, S), dtype, 2)
            rep.add("correctness", name, "PASS" if ok else "FAIL", f"out {fmt(err)}≤{fmt(bound)}")
        except Exception as e:  # noqa: BLE001
            _fail(rep, "correctness", name, e)


def dtype_name(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _grad_check(rep, name, dtype, fn, ref, inputs, n_out=1):
    """fn/ref take the same inputs; compares outputs (×2) and input gradients (×3)."""
    leaves = [x.to(DEVICE).to(dtype).requires_grad_() if x.is_floating_point() else x.to(DEVICE) for x in inputs]
    leaves32 = [x.detach().float().requires_grad_() if x.is_floating_point() else x for x in leaves]
    outs = fn(*leaves)
    outs32, outs_lp = ref(*leaves32), ref(*leaves)
    if n_out == 1:
        outs, outs32, outs_lp = (outs,), (outs32,), (outs_lp,)
    res = [(f"out{i}", compare(a, b, c, dtype, 2)) for i, (a, b, c) in enumerate(zip(outs, outs32, outs_lp))]
    diff = [i for i, x in enumerate(leaves) if x.is_floating_point()]
    gos = [torch.randn(o.shape, device=DEVICE) for o in outs32]
    g = torch.autograd.grad(outs, [leaves[i] for i in diff], [x.to(outs[j].dtype) for j, x in enumerate(gos)])
    g32 = torch.autograd.grad(outs32, [leaves32[i] for i in diff], gos)
    glp = torch.autograd.grad(outs_lp, [leaves[i] for i in diff], [x.to(outs_lp[j].dtype) for j, x in enumerate(gos)])
    res += [(f"d{i}", compare(a, b, c, dtype, 3)) for i, a, b, c in zip(diff, g, g32, glp)]
    ok = all(r[0] for _, r in res)
    rep.add("correctness", f"{name} {dtype_name(dtype)}", "PASS" if ok else "FAIL",
            " ".join(f"{n} {fmt(e)}≤{fmt(b)}" for n, (_, e, b) in res))


def check_small_kernels(rep, dtype):
    T = sum(SMALL_LENS)
    try:
        from jv5fast.kernels.rmsnorm import rms_norm, rms_norm_ref
        _grad_check(rep, "rms_norm+residual N1024", dtype, lambda x, w, r: rms_norm(x, w, 1e-6, r),
                    lambda x, w, r: rms_norm_ref(x, w, 1e-6, r),
                    [torch.randn(T, 1024), 1 + 0.2 * torch.randn(1024), torch.randn(T, 1024)], n_out=2)
    except Exception as e:  # noqa: BLE001
        _fail(rep, "correctness", f"rms_norm {dtype_name(dtype)}", e)
    try:
        from jv5fast.kernels.rope import rope, rope_ref, rope_tables
        cos, sin = rope_tables(3.5e6, 128, 32768, device=DEVICE)
        pos = torch.cat([torch.arange(n) for n in SMALL_LENS]).to(DEVICE)
        _grad_check(rep, "rope+qk_norm D128", dtype, lambda x, w: rope(x, cos, sin, pos, w, 1e-6),
                    lambda x, w: rope_ref(x, cos, sin, pos, w, 1e-6),
                    [torch.randn(T, 16, 128), 1 + 0.2 * torch.randn(128)])
        cos64, sin64 = rope_tables(1e6, 64, 8192, device=DEVICE)
        _grad_check(rep, "rope D64", dtype, lambda x: rope(x, cos64, sin64, pos),
                    lambda x: rope_ref(x, cos64, sin64, pos), [torch.randn(T, 12, 64)])
    except Exception as e:  # noqa: BLE001
        _fail(rep, "correctness", f"rope {dtype_name(dtype)}", e)
    try:
        from jv5fast.kernels.swiglu import swiglu, swiglu_ref
        _grad_check(rep, "swiglu F3072", dtype, swiglu, swiglu_ref, [2 * torch.randn(T, 2 * 3072)])
    except Exception as e:  # noqa: BLE001
        _fail(rep, "correctness", f"swiglu {dtype_name(dtype)}", e)
    try:
        from jv5fast.kernels.pooling import pack_bits, pack_bits_ref, pool, pool_ref
        lens = POOL_LENS
        cu = _cu(lens)
        hidden = torch.randn(sum(lens), 1024, device=DEVICE).to(dtype)
        errs, exact = [], True
        for mode in ("last", "cls", "mean"):
            for k in (None, 256, 37):
                v, bits = pool(hidden, cu, mode=mode, truncate_dim=k, pack_bits=True)
                ref = pool_ref(hidden, cu, mode=mode, truncate_dim=k)
                errs.append((v - ref).abs().max().item())
                if mode != "mean":  # mean sums in another order: a near-zero sign may flip
                    exact &= torch.equal(bits, pack_bits_ref(ref))
        x = torch.randn(64, 1000, device=DEVICE)
        exact &= torch.equal(pack_bits(x), pack_bits_ref(x))
        ok = exact and max(errs) <= FLOOR[torch.float32]
        rep.add("correctness", f"pool/truncate/normalize/pack {dtype_name(dtype)}", "PASS" if ok else "FAIL",
                f"max err {fmt(max(errs))}, bits exact {exact}")
    except Exception as e:  # noqa: BLE001
        _fail(rep, "correctness", f"pooling {dtype_name(dtype)}", e)


def check_hamming(rep):
    try:
        from jv5fast.kernels.hamming import hamming_topk, hamming_topk_ref
    except Exception:  # noqa: BLE001
        rep.add("correctness", "hamming_topk", "n/a", "jv5fast.kernels.hamming.hamming_topk not available")
        return
    try:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        corpus = torch.randint(0, 256, (100_003, 32), dtype=torch.uint8, device=DEVICE, generator=g)
        corpus[5000:5100] = corpus[0]  # ties, broken by id
        queries = torch.cat([corpus[:4], torch.randint(0, 256, (60, 32), dtype=torch.uint8, device=DEVICE,
                                                       generator=g)])
        ok = True
        for k in (1, 10, 100):
            d, i = hamming_topk(queries, corpus, k)
            dr, ir = hamming_topk_ref(queries, corpus, k)
            ok &= torch.equal(d.cpu(), dr.cpu()) and torch.equal(i.cpu(), ir.cpu())
        ms = _cuda_ms(lambda: hamming_topk(queries, corpus, 10))
        rep.add("correctness", "hamming_topk 64q × 100k × 256 bit", "PASS" if ok else "FAIL",
                f"exact D and I for k 1/10/100; k=10 {fmt(ms)} ms")
    except Exception as e:  # noqa: BLE001
        _fail(rep, "correctness", "hamming_topk", e)


HAMMING_LARGE_K = dict(n=200_003, q=64, nbytes=128, ks=(1024, 1025, 4096))  # 1024-bit codes (small's dim)


def check_hamming_large_k(rep):
    """k above the Triton kernel's MAX_K runs the exact chunked torch path: equality with the reference, and
    both paths timed at k = MAX_K, which says where MAX_K belongs on this GPU."""
    from jv5fast.kernels.hamming import (MAX_K, hamming_topk, hamming_topk_ref, hamming_topk_words,
                                         hamming_topk_words_chunked, pack_words)
    p = HAMMING_LARGE_K
    g = torch.Generator(device=DEVICE).manual_seed(1)
    corpus = torch.randint(0, 256, (p["n"], p["nbytes"]), dtype=torch.uint8, device=DEVICE, generator=g)
    corpus[100:300] = corpus[0]  # ties, broken by id
    queries = torch.cat([corpus[:2], torch.randint(0, 256, (p["q"] - 2, p["nbytes"]), dtype=torch.uint8,
                                                   device=DEVICE, generator=g)])
    for k in p["ks"]:
        d, i = hamming_topk(queries, corpus, k)
        dr, ir = hamming_topk_ref(queries, corpus, k)
        ok = torch.equal(d.cpu(), dr.cpu()) and torch.equal(i.cpu(), ir.cpu())
        path = "Triton" if k <= MAX_K else "chunked torch"
        rep.add("correctness", f"hamming_topk k={k} ({path}) {p['q']}q × {p['n']} × {8 * p['nbytes']} bit",
                "PASS" if ok else "FAIL", "exact D and I")
    qw, cw = pack_words(queries), pack_words(corpus)
    k = min(MAX_K, p["n"])
    timer = _cuda_ms if str(DEVICE).startswith("cuda") else _wall_ms  # results stay on the device: events
    t_triton = timer(lambda: hamming_topk_words(qw, cw, k), iters=5)
    t_chunk = timer(lambda: hamming_topk_words_chunked(qw, cw, k), iters=5)
    rep.add("hamming", f"k={k}: Triton vs chunked torch", "info",
            f"Triton {fmt(t_triton)} ms, chunked {fmt(t_chunk)} ms, chunked/Triton {fmt(t_chunk / t_triton)}x "
            f"(below 1: move MAX_K down)")


def bench_attention(rep):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from jv5fast.kernels.attention import attention_varlen
    dtype = torch.bfloat16
    for label, H, Hkv, D, causal in ATTN_SHAPES:
        for S in ATTN_SEQLENS:
            name = f"{label} S={S}"
            try:
                B, S = batch_for(S)
                T = B * S
                cu = _cu([S] * B)
                q = torch.randn(T, H, D, device=DEVICE, dtype=dtype)
                k = torch.randn(T, Hkv, D, device=DEVICE, dtype=dtype)
                v = torch.randn(T, Hkv, D, device=DEVICE, dtype=dtype)
                # The peer's layout: (B, H, S, D) views of the same tokens, KV heads expanded for flash.
                qp = q.view(B, S, H, D).transpose(1, 2)
                kp = k.view(B, S, Hkv, D).repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
                vp = v.view(B, S, Hkv, D).repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
                fwd = attention_flops([S] * B, H, D, causal)
                with torch.no_grad():
                    ms_ours = _cuda_ms(lambda: attention_varlen(q, k, v, cu, S, causal=causal))
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        ms_sdpa = _cuda_ms(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal))
                t_o, t_s = tflops(fwd, ms_ours), tflops(fwd, ms_sdpa)
                rep.add("attention fwd", name, f"{fmt(t_o)} TF/s", f"SDPA flash {fmt(t_s)} TF/s, ratio {fmt(t_o / t_s)}")

                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                qpg, kpg, vpg = (x.detach().requires_grad_() for x in (qp, kp, vp))
                do = torch.randn_like(q)
                dop = do.view(B, S, H, D).transpose(1, 2)

                def ours():
                    attention_varlen(qg, kg, vg, cu, S, causal=causal).backward(do)

                def peer():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(qpg, kpg, vpg, is_causal=causal).backward(dop)

                fb = attention_flops([S] * B, H, D, causal, "fwd_bwd")
                t_o, t_s = tflops(fb, _cuda_ms(ours, 2, 5)), tflops(fb, _cuda_ms(peer, 2, 5))
                rep.add("attention fwd+bwd", name, f"{fmt(t_o)} TF/s", f"SDPA flash {fmt(t_s)} TF/s, ratio {fmt(t_o / t_s)}")
                del q, k, v, qp, kp, vp, qg, kg, vg, qpg, kpg, vpg, do, dop
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                _fail(rep, "attention", name, e)


def bench_engine(rep, n_texts=1500, budget_s=150):
    try:
        import jv5fast
        from jv5fast.testing import write_checkpoint
    except Exception as e:  # noqa: BLE001
        _fail(rep, "engine", "import jv5fast / jv5fast.testing.write_checkpoint", e)
        return
    t_start = time.time()
    lengths = mixed_lengths(n_texts)
    texts = [random_text(n, seed=i) for i, n in enumerate(lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("small", "nano"):
            if time.time() - t_start > budget_s:
                rep.add("engine", family, "skipped", f"time budget {budget_s} s spent")
                continue
            eng = model = None
            try:
                path = write_checkpoint(os.path.join(tmp, family), family=family, size="full", seed=0)
                eng = jv5fast.Engine(path, device=DEVICE, dtype="bfloat16")
                ids = eng.tokenize(texts)
                n_tok = sum(len(x) for x in ids)
                eng.embed(texts)  # warm-up: JIT-compile every kernel specialization this corpus hits
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ours = eng.embed(texts, convert_to_tensor=True)
                torch.cuda.synchronize()
                t_ours = time.perf_counter() - t0
                rep.add("engine", f"{family} jv5fast bf16", f"{fmt(n_tok / t_ours)} tok/s",
                        f"{n_texts} texts, {n_tok} tokens, {fmt(n_texts / t_ours)} seq/s")
            except Exception as e:  # noqa: BLE001
                _fail(rep, "engine", f"{family} jv5fast", e)
                continue
            if family == "small":
                try:  # one 32k-token text: activation memory above the weights
                    long_text = random_text(40000, seed=12345)
                    n_long = len(eng.tokenize(long_text))
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    eng.embed([long_text])  # warm-up (compiles the B=1 specializations)
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    eng.embed([long_text])
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                    rep.add("engine", f"small one {n_long}-token text", f"{fmt(peak)} GiB",
                            f"activation peak above weights (target ≤ 2 GB); {fmt(dt)} s")
                except Exception as e:  # noqa: BLE001
                    _fail(rep, "engine", "small 32k-token text", e)
            try:
                from jv5fast.testing import reference_embed, reference_model
                model = reference_model(path, task=eng.task, dtype=torch.bfloat16, device=DEVICE, attn="sdpa")
                reference_embed(model, ids[:64], device=DEVICE)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                peer = reference_embed(model, ids, device=DEVICE)
                torch.cuda.synchronize()
                t_peer = time.perf_counter() - t0
                cos = torch.nn.functional.cosine_similarity(ours.float().cpu(), peer.float(), dim=-1)
                rep.add("engine", f"{family} transformers bf16 sdpa", f"{fmt(n_tok / t_peer)} tok/s",
                        f"jv5fast speed-up {fmt(t_peer / t_ours)}×; cosine vs jv5fast min {fmt(cos.min().item())}")
            except Exception as e:  # noqa: BLE001
                _fail(rep, "engine", f"{family} transformers peer", e)
            del eng, model
            torch.cuda.empty_cache()


def query_batches(sizes=LATENCY_BATCHES, seed=7):
    """{batch size: texts}: query-like texts of 4–24 words (≈ 8–60 tokens with the prompt)."""
    import random
    rng = random.Random(seed)
    return {n: [random_text(rng.randint(4, 24), seed=seed * 1000 + n * 100 + i) for i in range(n)] for n in sizes}


def _wall_ms(fn, iters=20):
    """Median wall-clock ms of fn() (which ends in a host copy, so it is synchronous)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench_latency(rep, budget_s=120, size="full"):
    """Short batches, where launch overhead dominates: embed() latency with CUDA graphs vs eager vs the
    transformers peer, on full-size random checkpoints in bf16."""
    import jv5fast
    from jv5fast.testing import reference_embed, reference_model, write_checkpoint
    t_start = time.time()
    batches = query_batches()
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("small", "nano"):
            if time.time() - t_start > budget_s:
                rep.add("latency", family, "skipped", f"time budget {budget_s} s spent")
                continue
            graphs = eager = model = None
            try:
                path = write_checkpoint(os.path.join(tmp, family), family=family, size=size, seed=0)
                eager = jv5fast.Engine(path, device=DEVICE, dtype="bfloat16", cuda_graphs=False)
                graphs = jv5fast.Engine(path, device=DEVICE, dtype="bfloat16")
                t0 = time.perf_counter()
                n_graphs = graphs.warmup()
                t_warm = time.perf_counter() - t0
                rep.add("latency", f"{family} warmup", f"{fmt(t_warm)} s",
                        f"{n_graphs} graphs captured; graphs on: {graphs.cuda_graphs}")
                eager.warmup()
                model = reference_model(path, task=eager.task, dtype=torch.bfloat16, device=DEVICE, attn="sdpa")
                for n, texts in batches.items():
                    ids = eager.tokenize(texts, prompt_name="query")
                    n_tok = sum(len(x) for x in ids)
                    ms_g = _wall_ms(lambda: graphs.embed(texts, prompt_name="query"))
                    ms_e = _wall_ms(lambda: eager.embed(texts, prompt_name="query"))
                    ms_p = _wall_ms(lambda: reference_embed(model, ids, device=DEVICE))
                    a = torch.from_numpy(graphs.embed(texts, prompt_name="query"))
                    b = torch.from_numpy(eager.embed(texts, prompt_name="query"))
                    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
                    rep.add("latency", f"{family} {n} queries ({n_tok} tok)", f"{fmt(ms_g)} ms",
                            f"eager {fmt(ms_e)} ms ({fmt(ms_e / ms_g)}×), transformers {fmt(ms_p)} ms "
                            f"({fmt(ms_p / ms_g)}×); cosine graphs vs eager min {fmt(cos)}; "
                            f"graphs on: {graphs.cuda_graphs}")
            except Exception as e:  # noqa: BLE001
                _fail(rep, "latency", family, e)
            del graphs, eager, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def bench_server(rep, size="full", clients=64, requests=20, budget_s=150):
    """``jv5fast serve`` on this device, loopback, full-size nano (retrieval merged): p50 of 1-text requests
    at ``clients`` concurrent clients (issue 12's target: <= 5 ms), and tok/s under saturating load (16 texts
    per request) against the engine's offline ``embed`` of the same texts (target: >= 80%)."""
    import asyncio

    import jv5fast
    from jv5fast.testing import write_checkpoint
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_server as bs
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(os.path.join(tmp, "nano"), "nano", size, seed=0, merged_task="retrieval")
        cmd = [sys.executable, "-m", "jv5fast", "serve", "--model", path, "--port", "0", "--device", DEVICE,
               "--dtype", dtype, "--served-model-name", bs.MODEL, "--log-level", "warning"]
        sat = bs.plan(clients, max(2, requests // 4), seed=3, lo=16, hi=16)
        tokens = bs.count_tokens(path, sat)
        with bs.Server("jv5fast serve", cmd, os.path.join(tmp, "serve.log"), ready_timeout=budget_s) as srv:
            rep.add("server", "nano ready", f"{fmt(srv.ready_s)} s", "process start to /health 200 (load + warm-up)")
            asyncio.run(bs.load(srv.url, bs.plan(clients, 2, seed=1, lo=1, hi=1)))  # untimed warm-up
            r = asyncio.run(bs.load(srv.url, bs.plan(clients, requests, seed=2, lo=1, hi=1)))
            rep.add("server", f"nano 1-text requests, {clients} clients", f"p50 {fmt(r['p50'])} ms",
                    f"p99 {fmt(r['p99'])} ms, {fmt(r['req_s'])} req/s; target p50 <= 5 ms")
            if time.time() - t_start > budget_s:
                rep.add("server", "nano saturating load", "skipped", f"time budget {budget_s} s spent")
                return
            asyncio.run(bs.load(srv.url, sat[:4]))
            r = asyncio.run(bs.load(srv.url, sat))
        served = tokens / r["wall"]
        eng = jv5fast.Engine(path, device=DEVICE, dtype=dtype)
        eng.warmup()
        flat = [t for mine in sat for req in mine for t in req]
        eng.embed(flat[:256])
        t0 = time.perf_counter()
        eng.embed(flat)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        offline = tokens / (time.perf_counter() - t0)
        rep.add("server", f"nano saturating load, {clients} clients x 16 texts", f"{fmt(served)} tok/s",
                f"{fmt(served / offline)} of the engine's offline embed of the same {len(flat)} texts "
                f"({fmt(offline)} tok/s); p50 {fmt(r['p50'])} ms; target >= 0.8")


def _stage_ms(fn, iters):
    """Median ms of fn(), synchronizing the device around each call (host stages end on the host anyway)."""
    times = []
    for _ in range(iters):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def weight_bytes(eng) -> int:
    """Bytes of the weights one forward reads whole (every layer's tensors and the final norm; the token
    embedding is only gathered): the bandwidth floor of a short batch."""
    m = eng.model
    return sum(t.numel() * t.element_size() for layer in m.layers for t in layer.values()) + \
        m.norm.numel() * m.norm.element_size()


def profile_short_batch(rep, size="full", n=8, iters=20, top=8, families=("small", "nano")):
    """Where one short-batch ``embed`` call's time goes (issue 14): the call split into its stages —
    tokenize, forward (graph upload + replay, or eager), pool + read-back, and the rest (checks, planning,
    post-processing) — then torch.profiler's top device kernels and top host ops over a few calls, and the
    weights' read bandwidth against the forward time. ``JV5FAST_PROFILE_DIR`` keeps a Chrome trace."""
    import jv5fast
    from jv5fast import ops
    from jv5fast.batching import PackedBatch
    from jv5fast.testing import write_checkpoint
    from torch.profiler import ProfilerActivity, profile
    texts = query_batches((n,))[n]
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            eng = None
            try:
                path = write_checkpoint(os.path.join(tmp, family), family=family, size=size, seed=0)
                eng = jv5fast.Engine(path, device=DEVICE, dtype=dtype)
                eng.warmup()
                prefixed = ["Query: " + t for t in texts]
                seqs = eng._encode(prefixed)
                n_tok = sum(len(s) for s in seqs)
                holder = {}

                def forward():
                    with eng._lock, eng._on_device():
                        eng._activate(eng.task)
                        rows = eng._graphs.run(seqs) if eng._graphs is not None else None
                        if rows is None:
                            rows = eng.model.forward(PackedBatch.from_ids(seqs, eng.device), last_only=True)
                        holder["rows"] = rows

                def post():
                    one_each = torch.arange(len(seqs) + 1, device=eng.device, dtype=torch.int32)
                    ops.pool_last(holder["rows"], one_each).float().cpu()

                ms_total = _stage_ms(lambda: eng.embed(texts, prompt_name="query"), iters)
                ms_tok = _stage_ms(lambda: eng._encode(prefixed), iters)
                ms_fwd = _stage_ms(forward, iters)
                ms_post = _stage_ms(post, iters)
                rest = ms_total - ms_tok - ms_fwd - ms_post
                gb = weight_bytes(eng) / 1e9
                label = f"{family} {n} queries ({n_tok} tok)"
                rep.add("profile", f"{label} embed", f"{fmt(ms_total)} ms",
                        f"tokenize {fmt(ms_tok)} ms, forward {fmt(ms_fwd)} ms (graphs: {eng.cuda_graphs}), "
                        f"pool + read-back {fmt(ms_post)} ms, rest {fmt(rest)} ms")
                rep.add("profile", f"{label} weights", f"{fmt(gb / (ms_fwd / 1e3))} GB/s",
                        f"{fmt(gb)} GB of weights read per forward in {fmt(ms_fwd)} ms")
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        eng.embed(texts, prompt_name="query")
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                trace_dir = os.environ.get("JV5FAST_PROFILE_DIR")
                if trace_dir:
                    os.makedirs(trace_dir, exist_ok=True)
                    prof.export_chrome_trace(os.path.join(trace_dir, f"{family}_{n}q.json"))
                events = prof.key_averages()
                dev_key = "self_device_time_total"
                if DEVICE == "cuda":
                    kern = sorted((e for e in events if getattr(e, dev_key, 0) > 0), key=lambda e: -getattr(e, dev_key))
                    total = sum(getattr(e, dev_key) for e in kern) or 1.0
                    for e in kern[:top]:
                        rep.add("profile", f"{family} {n}q kernel {e.key[:60]}", f"{fmt(getattr(e, dev_key) / 5e3)} ms/call",
                                f"{fmt(100 * getattr(e, dev_key) / total)}% of device time, {e.count // 5} launches/call")
                host = sorted(events, key=lambda e: -e.self_cpu_time_total)
                for e in host[:top]:
                    rep.add("profile", f"{family} {n}q host {e.key[:60]}", f"{fmt(e.self_cpu_time_total / 5e3)} ms/call",
                            f"self CPU time, {e.count // 5} calls/call")
            except Exception as e:  # noqa: BLE001
                _fail(rep, "profile", family, e)
            del eng
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


NCU_METRICS = ("gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,"
               "dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,"
               "launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers")


def ncu_attention(rep, S=512, timeout_s=240):
    """``ncu`` on the attention forward at S=512 (d128 causal and d64 bidirectional, 32k tokens): duration,
    SM and DRAM throughput, achieved occupancy, grid and registers of each kernel launch."""
    import csv
    import io
    import shutil
    import subprocess
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        rep.add("profile", f"ncu attention S={S}", "n/a", "ncu is not installed on this machine")
        return
    for label, H, Hkv, D, causal in ATTN_SHAPES:
        B, _ = batch_for(S)
        code = ("import torch; from jv5fast.kernels.attention import attention_varlen as a\n"
                f"T={B * S}; q=torch.randn(T,{H},{D},device='cuda',dtype=torch.bfloat16)\n"
                f"k=torch.randn(T,{Hkv},{D},device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)\n"
                f"cu=torch.arange(0,T+1,{S},device='cuda',dtype=torch.int32)\n"
                f"for _ in range(3): a(q,k,v,cu,{S},causal={causal})\ntorch.cuda.synchronize()\n")
        try:
            r = subprocess.run([ncu, "--csv", "--metrics", NCU_METRICS, "-k", "regex:attn|fwd", "-s", "2", "-c", "1",
                                sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith('"')]
            if r.returncode != 0 or not lines:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
                rep.add("profile", f"ncu {label} S={S}", "ERROR", f"ncu exit {r.returncode}: {tail[0][:160]}")
                continue
            rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
            got = {row["Metric Name"]: f"{row['Metric Value']} {row.get('Metric Unit', '')}".strip() for row in rows}
            kernel = rows[0].get("Kernel Name", "?")[:50]
            rep.add("profile", f"ncu {label} S={S}", got.get("gpu__time_duration.sum", "?"),
                    f"{kernel}: " + ", ".join(f"{k.split('.')[0].split('__')[-1]} {v}" for k, v in got.items()
                                               if k != "gpu__time_duration.sum"))
        except Exception as e:  # noqa: BLE001
            _fail(rep, "profile", f"ncu {label} S={S}", e)


def bench_train(rep, size="full", steps=8, batch_size=32, n_examples=512, tol=3e-2):
    """Training throughput (issue 14): tokens/s of a stage-2 retrieval step on nano, jv5fast's trainer
    against transformers + PEFT LoRA with the losses written out naively (bench/train_compare.py), same
    batches from the same start; their loss curves must agree (bf16 autocast on CUDA on both sides)."""
    from jv5fast.testing import write_checkpoint
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_compare as tc
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(os.path.join(tmp, "nano"), "nano", size, seed=0)
        r = tc.compare(path, steps=steps, batch_size=batch_size, n_examples=n_examples, device=DEVICE, lr=1e-4)
    curve = " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(r["jv5fast_loss"], r["peft_loss"]))
    rep.add("train", f"nano retrieval step, {batch_size} pairs", f"{fmt(r['jv5fast_tokens_per_s'])} tok/s",
            f"transformers + PEFT {fmt(r['peft_tokens_per_s'])} tok/s, jv5fast {fmt(tc.ratio(r))}×")
    rep.add("train", f"nano loss curves, {steps} steps", "PASS" if r["max_rel_diff"] <= tol else "FAIL",
            f"max relative difference {r['max_rel_diff']:.2e} (bound {tol:g}); jv5fast/PEFT: {curve}")


def _fail(rep, section, check, e):
    traceback.print_exc()
    rep.add(section, check, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def main(argv):
    out_path = next((a for a in argv[1:] if not a.startswith("--")), None)
    only = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--only=")), "correctness,profile,ncu,attention,engine,latency,server,train")
    sections = set(only.split(","))
    rep = Report()
    try:
        print("jv5fast from", ensure_jv5fast_importable(), flush=True)
    except Exception as e:  # noqa: BLE001
        _fail(rep, "setup", "import jv5fast", e)
    if not torch.cuda.is_available():
        rep.add("setup", "CUDA", "n/a", "no CUDA device: nothing to check")
        print(rep.render("no GPU"))
        return 1
    device = torch.cuda.get_device_name()
    t0 = time.time()
    if "correctness" in sections:
        for dtype in (torch.bfloat16, torch.float16):
            torch.manual_seed(int(time.time()) % 10_000)  # fresh random data every run
            check_attention(rep, dtype)
            check_small_kernels(rep, dtype)
        check_hamming(rep)
        try:
            check_hamming_large_k(rep)
        except Exception as e:  # noqa: BLE001
            _fail(rep, "correctness", "hamming_topk large k", e)
        print(f"-- correctness done at {time.time() - t0:.0f} s", flush=True)
    for name, fn in (("profile", profile_short_batch), ("ncu", ncu_attention), ("attention", bench_attention),
                     ("engine", bench_engine), ("latency", bench_latency), ("server", bench_server),
                     ("train", bench_train)):
        if name in sections:
            try:
                fn(rep)
            except Exception as e:  # noqa: BLE001
                _fail(rep, name, "benchmark", e)
            print(f"-- {name} done at {time.time() - t0:.0f} s", flush=True)
    table = rep.render(device, note=f"total {time.time() - t0:.0f} s")
    print("\n" + table)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
