"""Shared setup of `pytest bench/`: the --bench-small switch, one checkpoint and one ONNX export per model for
the session, and each group's ratios to jv5fast (in the entries' extra_info and printed at the end).

Each benchmark group compares like with like (one model, one device, one workload); its first entry is
jv5fast and every later entry reports its p50 divided by jv5fast's p50 measured in the same session.
"""
from __future__ import annotations

import functools
import os

import pytest
from bench_latency import merged_checkpoint, onnx_export


def pytest_addoption(parser):
    parser.addoption("--bench-small", action="store_true",
                     help="also run full-size small (minutes on 2 cores); or set JV5FAST_BENCH_SMALL=1")


@pytest.fixture(scope="session")
def bench_small(request):
    """Whether full-size small runs: --bench-small or JV5FAST_BENCH_SMALL=1."""
    return request.config.getoption("--bench-small") or os.environ.get("JV5FAST_BENCH_SMALL") == "1"


@pytest.fixture(scope="session", autouse=True)
def int8_cache(tmp_path_factory):
    """Engine(quantize="int8")'s export cache in the session's temp dir, not ~/.cache: its key includes the
    checkpoint files' mtimes, so each session's freshly written checkpoint would leave another entry there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JV5FAST_CACHE", str(tmp_path_factory.mktemp("jv5fast-cache")))
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """family -> the full-size merged fp32 checkpoint (bench_latency.merged_checkpoint), written once."""
    @functools.cache
    def get(family):
        return merged_checkpoint(str(tmp_path_factory.mktemp("checkpoint")), family)
    return get


@pytest.fixture(scope="session")
def onnx_export_for(checkpoint, tmp_path_factory):
    """family -> jv5fast's ONNX export (fp32 and int8) of ``checkpoint(family)``, written once."""
    @functools.cache
    def get(family):
        return onnx_export(str(tmp_path_factory.mktemp(f"{family}-onnx")), checkpoint(family))
    return get


class Groups:
    """The p50 of every entry measured so far, per benchmark group."""

    def __init__(self):
        self.p50 = {}  # (group, entry name) -> seconds

    def record(self, benchmark, name, baseline="jv5fast"):
        """Store ``benchmark``'s p50 as entry ``name`` of its group; return it divided by the ``baseline``
        entry's p50 in the same group, or None when that entry did not run in this session (deselected or
        failed)."""
        p50 = benchmark.stats.stats.median
        self.p50[(benchmark.group, name)] = p50
        base = self.p50.get((benchmark.group, baseline))
        return None if base is None else p50 / base


_GROUPS = Groups()


@pytest.fixture(scope="session")
def groups():
    return _GROUPS


def pytest_terminal_summary(terminalreporter):
    if not _GROUPS.p50:
        return
    terminalreporter.section("p50 per group, and its ratio to the group's jv5fast entry (same session)")
    for group in sorted({g for g, _ in _GROUPS.p50}):
        base = _GROUPS.p50.get((group, "jv5fast"))
        for (g, name), p50 in _GROUPS.p50.items():
            if g == group:
                ratio = "" if base is None else f"  {p50 / base:.2f}x jv5fast"
                terminalreporter.write_line(f"{group:<36} {name:<28} {p50 * 1e3:10.1f} ms{ratio}")
