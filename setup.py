"""Build script: everything is in pyproject.toml except the optional C++ extension.

`jv5fast._C` (csrc/, pybind11) is compiled with -O3 and AVX2/POPCNT when the CPU has them. The
install never fails because of it: without a compiler (or on a build error) it prints a warning
and jv5fast falls back to numpy at run time.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _cpu_flags():
    """Extra -m flags for the CPU we build on (the wheel is built where it runs)."""
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return flags
    if " avx2" in info:
        flags += ["-mavx2", "-mfma"]
    if " popcnt" in info:
        flags += ["-mpopcnt"]
    if " bmi2" in info:
        flags += ["-mbmi2"]
    return flags


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler, missing headers, ...
            print(f"WARNING: jv5fast._C was not built ({e}); using the numpy fallback", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: jv5fast._C was not built ({e}); using the numpy fallback", file=sys.stderr)


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("JV5FAST_NO_EXT"):
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: pybind11 not found; jv5fast._C is not built", file=sys.stderr)
        return []
    return [
        Pybind11Extension(
            "jv5fast._C",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi", *_cpu_flags()],
            extra_link_args=["-fopenmp"],
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
