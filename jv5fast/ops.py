"""The one dispatch point between model code and kernels.

Model code calls only ``jv5fast.ops.<op>``. Each op picks the Triton kernel from ``jv5fast.kernels``
when its tensors are on CUDA and Triton imports; on CPU in fp32 outside autograd the C++ kernels of
``jv5fast._C`` (csrc/: the packed GEMM, RMSNorm, RoPE, SwiGLU, short-sequence attention) where the CPU has
AVX2/FMA (the ISA is picked at run time; ``JV5FAST_CPU_ISA=avx512|avx2|scalar`` caps it); and the
plain-PyTorch ``*_ref`` otherwise.
``JV5FAST_BACKEND=torch`` forces the references, ``JV5FAST_BACKEND=triton`` forces the kernels
(on CPU that needs ``TRITON_INTERPRET=1`` set before the kernels are imported).

Shape letters used across jv5fast: B sequences, T packed tokens, S max sequence length, H / Hkv
query / key-value heads, D head dim, E embedding (hidden) dim, F SwiGLU width, W packed bytes.
"""
from __future__ import annotations

import functools
import importlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from .kernels.attention import attention_last_ref, attention_varlen_ref
from .kernels.pooling import pack_bits_ref, pool_ref
from .kernels.rmsnorm import rms_norm_ref
from .kernels.rope import rope_ref, rope_tables  # noqa: F401  (rope_tables re-exported for the models)
from .kernels.swiglu import swiglu_ref

_BACKENDS = ("auto", "torch", "triton")
_triton_cache: dict = {}


def backend() -> str:
    b = os.environ.get("JV5FAST_BACKEND", "auto").strip().lower() or "auto"
    if b not in _BACKENDS:
        raise ValueError(f"JV5FAST_BACKEND={b!r} is not valid; choose one of {list(_BACKENDS)}")
    return b


def _triton_fn(module: str, name: str):
    """The Triton implementation ``jv5fast.kernels.<module>.<name>``, or None if unavailable."""
    key = (module, name)
    if key not in _triton_cache:
        fn = None
        try:
            import triton  # noqa: F401
            fn = getattr(importlib.import_module(f"{__package__}.kernels.{module}"), name, None)
        except ImportError:
            fn = None
        _triton_cache[key] = fn
    return _triton_cache[key]


def uses_triton(device) -> bool:
    """Whether ops on tensors on ``device`` run the Triton kernels (under the current JV5FAST_BACKEND)."""
    b = backend()
    if b == "torch" or _triton_fn("attention", "attention_varlen") is None:
        return False
    return b == "triton" or str(device).startswith("cuda")


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET, read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_triton_device(x) -> None:
    """JV5FAST_BACKEND=triton on a CPU tensor is only possible in the interpreter: say so instead of the
    compiled kernel's "Pointer argument cannot be accessed from Triton" (a CUDA host without the interpreter)."""
    if not x.is_cuda and not triton_interpreted():
        raise RuntimeError(f"JV5FAST_BACKEND=triton: the compiled Triton kernels need CUDA tensors, got one on "
                           f"{x.device}; use a CUDA device, JV5FAST_BACKEND=auto|torch, or set TRITON_INTERPRET=1 "
                           f"before jv5fast is imported to interpret them on CPU")


def _pick(module: str, name: str, ref, x):
    b = backend()
    if b == "torch":
        return ref
    fn = _triton_fn(module, name)
    if b == "triton":
        if fn is None:
            raise RuntimeError(f"JV5FAST_BACKEND=triton but jv5fast.kernels.{module}.{name} is unavailable "
                               f"(is triton installed?)")
        check_triton_device(x)
        return fn
    return fn if (fn is not None and x.is_cuda) else ref


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale=None):
    """q (T, H, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int32 -> (T, H, D); differentiable."""
    if _cpu_attention(q, k, v, cu_seqlens, max_seqlen):
        return _attention_cpu(q, k, v, cu_seqlens, causal, False, softmax_scale)
    fn = _pick("attention", "attention_varlen", attention_varlen_ref, q)
    return fn(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)


def attention_last(q_last, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None):
    """q_last (B, H, D): each sequence's last query row; k/v (T, Hkv, D) -> (B, H, D). Inference only."""
    if _cpu_attention(q_last, k, v, cu_seqlens, max_seqlen):
        return _attention_cpu(q_last, k, v, cu_seqlens, True, True, softmax_scale)
    fn = _pick("attention", "attention_last", attention_last_ref, q_last)
    return fn(q_last, k, v, cu_seqlens, max_seqlen, softmax_scale=softmax_scale)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last axis; with ``residual`` returns (norm(x + residual), x + residual)."""
    if _cpu_fused(x, weight, residual) and fused_kind("rms_norm", fused_key("rms_norm", x)) == "jv5fast":
        return _rms_norm_cpu(x, weight, eps, residual)
    return _pick("rmsnorm", "rms_norm", rms_norm_ref, x)(x, weight, eps, residual)


def rope(x, cos, sin, position_ids, norm_weight=None, eps=1e-6):
    """Rotate-half RoPE on x (T, H, D) at ``position_ids`` (T,), optionally after a per-head RMSNorm."""
    if (_cpu_fused(x, cos, sin, norm_weight) and x.stride(-1) == 1 and x.shape[-1] <= 1024
            and position_ids.dtype == torch.int64 and fused_kind("rope", fused_key("rope", x)) == "jv5fast"):
        return _rope_cpu(x, cos, sin, position_ids, norm_weight, eps)
    return _pick("rope", "rope", rope_ref, x)(x, cos, sin, position_ids, norm_weight, eps)


# ---- fused CPU RMSNorm and RoPE (csrc/cpu_ops.cpp) --------------------------------------------------------
# At a query's ~20 rows the references are ~10 tiny torch calls each whose dispatch outweighs the math; the
# C++ versions compute the same formulas in one call. Inference only (fp32 CPU tensors outside autograd);
# JV5FAST_BACKEND=torch keeps the references.


CPU_ISAS = ("avx512", "avx2", "scalar")  # JV5FAST_CPU_ISA: cap the C++ kernels' ISA (down only)


def _apply_cpu_isa(C) -> None:
    """Set jv5fast._C's ISA cap from JV5FAST_CPU_ISA (unset: the CPU's best). Forcing a level the CPU lacks is
    an error naming what it has."""
    want = os.environ.get("JV5FAST_CPU_ISA", "").strip().lower()
    has = C.cpu_isa_supported() if C is not None and hasattr(C, "cpu_isa_supported") else "scalar"
    if not want:
        if C is not None and hasattr(C, "set_isa_limit"):
            C.set_isa_limit("avx512")
        return
    if want not in CPU_ISAS:
        raise ValueError(f"JV5FAST_CPU_ISA={want!r} is not valid; choose one of {list(CPU_ISAS)} (or unset it)")
    if CPU_ISAS.index(want) < CPU_ISAS.index(has):
        runs = ", ".join(CPU_ISAS[CPU_ISAS.index(has):])
        why = "" if C is not None else " (jv5fast._C is not built)"
        raise RuntimeError(f"JV5FAST_CPU_ISA={want}, but this CPU runs only {runs}{why}: jv5fast can force its "
                           f"kernels down to a lower ISA, not up; unset it or choose one of those")
    if hasattr(C, "set_isa_limit"):
        C.set_isa_limit(want)


@functools.cache
def _cpu_ext():
    """jv5fast._C where its AVX2/FMA kernels (sgemm, rms_norm, rope, swiglu, attention) run here (the CPU has
    AVX2 + FMA and JV5FAST_CPU_ISA is not 'scalar'), else None. Applies JV5FAST_CPU_ISA on first use."""
    from ._hamming import _C  # imported after torch (this module's import): one libgomp for both
    _apply_cpu_isa(_C)
    return _C if _C is not None and hasattr(_C, "avx2_fma_available") and _C.avx2_fma_available() else None


_CPU_EXT = _cpu_ext  # the cached function itself, whatever a test patches ``_cpu_ext`` with


def reset_cpu_isa() -> None:
    """Re-read JV5FAST_CPU_ISA (tests and benchmarks that change it within one process)."""
    _CPU_EXT.cache_clear()
    _CPU_EXT()


def cpu_isa() -> str:
    """The ISA level jv5fast's C++ kernels run at now: 'avx512', 'avx2' or 'scalar' (references / oneDNN)."""
    C = _cpu_ext()
    return C.cpu_isa() if C is not None and hasattr(C, "cpu_isa") else "avx2" if C is not None else "scalar"


def cpu_isa_supported() -> str:
    """The highest ISA level this CPU gives jv5fast's C++ kernels ('scalar' without the extension)."""
    from ._hamming import _C
    return _C.cpu_isa_supported() if _C is not None and hasattr(_C, "cpu_isa_supported") else "scalar"


# ---- which fused CPU op runs (measured per shape at engine load: jv5fast.cpu_tuning.choose_fused) ----------
# Each fused C++ op has an alternative, its plain-torch reference. jv5fast's kernel is the default (it wins on
# the CPUs measured so far); the engine times both on its model's shapes and records a loser here, so a CPU on
# which ATen's vectorized ops beat the C++ ones (the scalar build on ARM, say) runs the references.
# ``JV5FAST_CPU_FUSED=jv5fast|torch`` forces one for every op and shape.
CPU_FUSED = ("auto", "jv5fast", "torch")
FUSED_OPS = ("rms_norm", "rope", "swiglu", "attention")
_fused_choice: dict = {}  # (op, shape key) -> 'jv5fast' | 'torch'


def cpu_fused_mode() -> str:
    """JV5FAST_CPU_FUSED checked: 'auto' (the measured choice per op and shape), 'jv5fast' or 'torch'."""
    m = os.environ.get("JV5FAST_CPU_FUSED", "auto").strip().lower() or "auto"
    if m not in CPU_FUSED:
        raise ValueError(f"JV5FAST_CPU_FUSED={m!r} is not valid; choose one of {list(CPU_FUSED)} (or unset it)")
    return m


def fused_key(op: str, x, k=None) -> tuple:
    """The shape key a fused op's choice is kept under: rms_norm (E,), rope (H, D), swiglu (2F,), attention
    (H, Hkv, D) (``k`` the keys)."""
    if op == "attention":
        return (int(x.shape[-2]), int(k.shape[-2]), int(x.shape[-1]))
    if op == "rope":
        return (int(x.shape[-2]), int(x.shape[-1]))
    return (int(x.shape[-1]),)


def set_fused_choice(op: str, key: tuple, kind: str) -> None:
    if op not in FUSED_OPS or kind not in ("jv5fast", "torch"):
        raise ValueError(f"fused op {op!r} / kind {kind!r}: choose an op of {list(FUSED_OPS)} and 'jv5fast' or 'torch'")
    _fused_choice[(op, tuple(key))] = kind


def fused_kind(op: str, key: tuple) -> str:
    """Which implementation of fused ``op`` runs at shape ``key`` on CPU: forced, measured, else 'jv5fast'."""
    m = cpu_fused_mode()
    return m if m != "auto" else _fused_choice.get((op, tuple(key)), "jv5fast")


def _cpu_fused(*tensors) -> bool:
    ts = [t for t in tensors if t is not None]
    return (ts[0].device.type == "cpu" and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not any(t.requires_grad for t in ts)
            and backend() == "auto" and _cpu_ext() is not None)


CPU_ATTENTION_MAX_SEQLEN = 512  # csrc/cpu_ops.cpp takes up to 1024; above ~512 SDPA's blocked kernel wins


def _cpu_attention(q, k, v, cu_seqlens, max_seqlen) -> bool:
    return (int(max_seqlen) <= CPU_ATTENTION_MAX_SEQLEN and _cpu_fused(q, k, v) and q.dim() == 3
            and cu_seqlens.dtype == torch.int32 and hasattr(_cpu_ext(), "attention")
            and fused_kind("attention", fused_key("attention", q, k)) == "jv5fast")


def _attention_cpu(q, k, v, cu_seqlens, causal, last_only, softmax_scale):
    """Short sequences on CPU (csrc/cpu_ops.cpp: one call instead of padding + masks + SDPA)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(q.shape, dtype=torch.float32)
    _cpu_ext().attention(q.contiguous().numpy(), k.contiguous().numpy(), v.contiguous().numpy(),
                         cu_seqlens.contiguous().numpy(), bool(causal), last_only, float(scale), out.numpy(),
                         torch.get_num_threads())
    return out


def _rms_norm_cpu(x, weight, eps, residual):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    y = torch.empty_like(x2)
    if residual is None:
        _cpu_ext().rms_norm(x2.numpy(), None, weight.contiguous().numpy(), eps, y.numpy(), None,
                            torch.get_num_threads())
        return y.view(shape)
    h = torch.empty_like(x2)
    _cpu_ext().rms_norm(x2.numpy(), residual.reshape(-1, shape[-1]).contiguous().numpy(),
                        weight.contiguous().numpy(), eps, y.numpy(), h.numpy(), torch.get_num_threads())
    return y.view(shape), h.view(shape)


def _rope_cpu(x, cos, sin, position_ids, norm_weight, eps):
    y = torch.empty(x.shape, dtype=torch.float32)
    _cpu_ext().rope(x.numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(),
                    position_ids.contiguous().numpy(), None if norm_weight is None else norm_weight.contiguous().numpy(),
                    eps, y.numpy(), torch.get_num_threads())
    return y


def _swiglu_cpu(gate_up):
    y = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=torch.float32)
    _cpu_ext().swiglu(gate_up.contiguous().numpy(), y.numpy(), torch.get_num_threads())
    return y


def swiglu(gate_up):
    """gate_up (T, 2F) = [gate | up] -> silu(gate) * up (T, F)."""
    if (_cpu_fused(gate_up) and gate_up.dim() == 2 and gate_up.shape[-1] % 2 == 0 and hasattr(_cpu_ext(), "swiglu")
            and fused_kind("swiglu", fused_key("swiglu", gate_up)) == "jv5fast"):
        return _swiglu_cpu(gate_up)
    return _pick("swiglu", "swiglu", swiglu_ref, gate_up)(gate_up)


def pool(hidden, cu_seqlens, *, mode="last", truncate_dim=None, normalize=True):
    """hidden (T, E) -> (B, E') fp32: pool (last | cls | mean), truncate, L2-normalize."""
    fn = _pick("pooling", "pool", pool_ref, hidden)
    return fn(hidden, cu_seqlens, mode=mode, truncate_dim=truncate_dim, normalize=normalize)


def pool_last(hidden, cu_seqlens, *, truncate_dim=None, normalize=True):
    """Last token of each sequence (T, E) -> (B, E') fp32, truncated and L2-normalized."""
    return pool(hidden, cu_seqlens, mode="last", truncate_dim=truncate_dim, normalize=normalize)


def pack_bits(v):
    """(B, K) -> (B, ceil(K/8)) uint8 in np.packbits(v > 0) order."""
    return _pick("pooling", "pack_bits", pack_bits_ref, v)(v)


# ---- linear: prepacked weights on CPU ------------------------------------------------------------------
# On CPU, F.linear re-reads the fp32 weight in its row-major layout on every call, which at the few rows of a
# query batch streams at ~5 GB/s. A weight packed once runs the same GEMM faster: jv5fast's own kernel
# (csrc/sgemm.cpp: 16-column panels, AVX-512 or AVX2 register tiles picked at run time, threads split the
# panels) or oneDNN's prepacked layout. Which one is faster depends on the CPU, so under
# ``JV5FAST_CPU_GEMM=auto`` the engine measures both per weight shape (jv5fast/cpu_tuning.py) and packs each
# weight for the winner; ``jv5fast`` | ``onednn`` forces one. The results are fp32 GEMMs either way (another
# summation order only). ``JV5FAST_CPU_PACK=0`` turns packing off (plain F.linear).

CPU_GEMMS = ("auto", "jv5fast", "onednn")
PANEL = 16  # columns per panel of jv5fast's packed layout (csrc/sgemm.cpp NR)


class PackedLinear:
    """A CPU fp32 weight (N, K) prepacked for ``linear``: ``kind`` 'jv5fast' (panels (ceil(N/16), K, 16) as a
    numpy array, zero-padded past N), 'onednn' (oneDNN's blocked tensor) or 'onednn_bf16' (the weight rounded
    to bf16 in oneDNN's layout; the opt-in ``Engine(cpu_precision="bf16")``: inputs rounded to bf16, products
    summed in fp32, the result rounded to bf16 by oneDNN and handed on in fp32; AMX / AVX512-BF16 where the
    CPU has them)."""

    __slots__ = ("kind", "data", "out_features")

    def __init__(self, kind, data, out_features):
        self.kind, self.data, self.out_features = kind, data, out_features


class SplitLinear:
    """One weight packed for two GEMMs, each run where it measured faster: ``packs[j]`` serves inputs of up to
    ``bounds[j]`` rows (the last bound is None: any row count). Kept only where the single best GEMM loses
    clearly at some batch size (``jv5fast.cpu_tuning``), since it holds a second packed copy."""

    __slots__ = ("bounds", "packs", "out_features")
    kind = "split"

    def __init__(self, bounds, packs):
        self.bounds, self.packs, self.out_features = tuple(bounds), tuple(packs), packs[0].out_features

    def for_rows(self, m: int) -> PackedLinear:
        for b, p in zip(self.bounds, self.packs):
            if b is None or m <= b:
                return p
        return self.packs[-1]


def for_rows(packed, m: int):
    """The PackedLinear that runs ``m`` rows: ``packed`` itself, or a SplitLinear's choice for that size."""
    return packed.for_rows(m) if isinstance(packed, SplitLinear) else packed


def cpu_gemm_mode() -> str:
    """JV5FAST_CPU_GEMM checked: 'auto' (measured per shape, jv5fast.cpu_tuning), 'jv5fast' or 'onednn'."""
    g = os.environ.get("JV5FAST_CPU_GEMM", "auto").strip().lower() or "auto"
    if g not in CPU_GEMMS:
        raise ValueError(f"JV5FAST_CPU_GEMM={g!r} is not valid; choose one of {list(CPU_GEMMS)} (or unset it)")
    if g == "jv5fast" and _cpu_ext() is None:
        raise RuntimeError(f"JV5FAST_CPU_GEMM=jv5fast, but jv5fast._C.sgemm does not run here (extension not "
                           f"built, a CPU without AVX2/FMA, or JV5FAST_CPU_ISA=scalar; this CPU runs "
                           f"{cpu_isa_supported()}); unset it or choose 'onednn'")
    return g


@functools.cache
def _onednn_linear_ok(dtype=torch.float32) -> bool:
    """Whether oneDNN's prepacked linear (torch's mkldnn ops) runs here in ``dtype``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=dtype), w, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):  # a torch build without these ops (or without bf16 in them)
        return False


def bf16_linear_ok() -> bool:
    """Whether oneDNN's bf16 linear runs here (fast where the CPU has AMX or AVX512-BF16)."""
    return _onednn_linear_ok(torch.bfloat16)


def available_gemms() -> tuple:
    """The packed CPU fp32 GEMMs that run here, jv5fast's first: a subset of ('jv5fast', 'onednn')."""
    return tuple(k for k, ok in (("jv5fast", _cpu_ext() is not None), ("onednn", _onednn_linear_ok())) if ok)


def cpu_packing() -> bool:
    """Whether fp32 CPU weights get packed copies (JV5FAST_CPU_PACK is not '0' and some packed GEMM runs)."""
    return os.environ.get("JV5FAST_CPU_PACK", "1") != "0" and bool(available_gemms())


def cpu_gemm() -> str:
    """The GEMM a weight is packed for when nothing measured it: JV5FAST_CPU_GEMM when forced, else jv5fast's
    kernel where it runs, else oneDNN. Under 'auto' the engine measures instead (``jv5fast.cpu_tuning``)."""
    g = cpu_gemm_mode()
    if g == "auto":
        g = "jv5fast" if _cpu_ext() is not None else "onednn"
    return g


def pack_panels(weight):
    """(N, K) fp32 -> (ceil(N/16), K, 16): panel p holds rows 16p..16p+15 of ``weight`` transposed."""
    n, k = weight.shape
    p = -(-n // PANEL)
    w = weight.detach().float()
    if p * PANEL != n:
        w = torch.cat([w, w.new_zeros(p * PANEL - n, k)])
    return w.reshape(p, PANEL, k).transpose(1, 2).contiguous()


_HUGE_PAGE = 2 << 20


def _on_huge_pages(a):
    """``a`` copied into anonymous memory the kernel is asked to back with 2 MiB pages (Linux THP,
    ``madvise``): the GEMM streams the panels with fewer TLB misses (measured ~4% at 17 rows, 2-core Zen3).
    Smaller arrays, or a system without madvise, keep ``a``."""
    import mmap
    if a.nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return a
    buf = mmap.mmap(-1, -(-a.nbytes // _HUGE_PAGE) * _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: plain pages
        buf.close()
        return a
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size).reshape(a.shape)  # holds buf alive
    out[...] = a
    return out


def pack_linear(weight, kind=None):
    """A prepacked copy (``PackedLinear``) of a (out, in) fp32 CPU weight for ``linear``, or None where that
    does not apply (another device or dtype, a weight that needs gradients, JV5FAST_CPU_PACK=0, neither
    jv5fast's kernel nor oneDNN here). ``kind``: 'jv5fast' or 'onednn' (the engine's measured choice);
    None = ``cpu_gemm()``. A kind that does not run here falls back to the other."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.requires_grad
            or os.environ.get("JV5FAST_CPU_PACK", "1") == "0"):
        return None
    kind = kind or cpu_gemm()
    if kind == "jv5fast" and _cpu_ext() is None:
        kind = "onednn"
    if kind == "onednn_bf16":
        if not bf16_linear_ok():
            return None
        return PackedLinear(kind, torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(torch.bfloat16).contiguous(), 64), weight.shape[0])
    if kind == "jv5fast":
        return PackedLinear("jv5fast", _on_huge_pages(pack_panels(weight).numpy()), weight.shape[0])
    if not _onednn_linear_ok():  # no mkldnn, or a torch build without these ops
        return None
    return PackedLinear("onednn", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64),
                        weight.shape[0])


def linear(x, weight, packed=None):
    """x (M, in) @ weight (out, in)^T -> (M, out); ``packed`` (from ``pack_linear(weight)``) runs the
    prepacked GEMM on CPU (``weight`` is then only the fallback for other inputs). Inference only: the packed
    path has no autograd."""
    if packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        packed = for_rows(packed, x.shape[0])
        if packed.kind == "jv5fast":
            x = x.contiguous()
            out = torch.empty(x.shape[0], packed.out_features, dtype=torch.float32)
            _cpu_ext().sgemm(x.numpy(), packed.data, out.numpy(), torch.get_num_threads())
            return out
        if packed.kind == "onednn_bf16":
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), packed.data, None, "none",
                                                      [], "").float()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.data, None, "none", [], "")
    return F.linear(x, weight)


try:  # the ISA cap applies to every jv5fast._C kernel (the Hamming search too) from import on
    _cpu_ext()
except (ValueError, RuntimeError):  # a bad JV5FAST_CPU_ISA is reported by the first op that needs the kernels
    _CPU_EXT.cache_clear()
