"""Test-session setup. Without a GPU, Triton kernels can only run in the interpreter, and Triton reads
TRITON_INTERPRET when a kernel is defined, so it must be set before any kernel module is imported."""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engine(quantize="int8") caches its export: tests (and the CLIs they start) never write the user's cache.
_CACHE = tempfile.mkdtemp(prefix="jv5fast-test-cache-")
os.environ["JV5FAST_CACHE"] = _CACHE

import pytest  # noqa: E402

from jv5fast import ops  # noqa: E402
from jv5fast.testing import write_checkpoint  # noqa: E402

# One kernel choice for the session and every process it starts (CLIs, servers, Ray workers). Left to
# measurement, each process times the GEMMs and fused ops for itself (the cache above starts empty, and timings
# taken on a busy machine are not written to it), so two processes could pick differently and their vectors
# differ by ~1e-6, at the edge of the cross-process checks. The measured choice itself is tested in
# test_cpu_tuning.py, which unsets both.
if ops._cpu_ext() is not None:
    os.environ.setdefault("JV5FAST_CPU_GEMM", "jv5fast")
    os.environ.setdefault("JV5FAST_CPU_FUSED", "jv5fast")


def _kernel_isas():
    """The ISA levels of jv5fast's C++ kernels this CPU runs (none without AVX2 or without the extension)."""
    from jv5fast import ops
    return [i for i in ("avx512", "avx2") if ops.CPU_ISAS.index(i) >= ops.CPU_ISAS.index(ops.cpu_isa_supported())]


@pytest.fixture(params=_kernel_isas())
def cpu_isa(request, monkeypatch):
    """Run a test at each ISA level (JV5FAST_CPU_ISA forces it down); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("cpu_isa")``."""
    from jv5fast import ops
    monkeypatch.setenv("JV5FAST_CPU_ISA", request.param)
    ops.reset_cpu_isa()
    assert ops.cpu_isa() == request.param
    yield request.param
    monkeypatch.undo()
    ops.reset_cpu_isa()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Write (and cache per argument set) a checkpoint in the released layout."""
    cache = {}

    def make(family="nano", size="tiny", seed=0, **kw):
        key = (family, size, seed, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}_{size}_{seed}")
            cache[key] = write_checkpoint(str(path), family, size, seed, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def small_ckpt(ckpt_factory):
    return ckpt_factory("small")


@pytest.fixture(scope="session")
def nano_ckpt(ckpt_factory):
    return ckpt_factory("nano")


@pytest.fixture(scope="session")
def engines(small_ckpt, nano_ckpt):
    import jv5fast
    return {"small": jv5fast.Engine(small_ckpt, device="cpu"), "nano": jv5fast.Engine(nano_ckpt, device="cpu")}
