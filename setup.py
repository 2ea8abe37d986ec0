"""Build script: everything is in pyproject.toml except the optional C++ extension.

`jv5fast._C` (csrc/, pybind11) is compiled with -O3 and no ISA flags: the AVX2 / AVX-512 kernels carry
their own GCC targets and are picked at run time (csrc/cpu_features.h), so one build runs on any x86-64 CPU
and builds on ARM (portable code only; jv5fast then runs the references and oneDNN). The install never fails
because of it: without a compiler (or on a build error) it prints a warning and jv5fast falls back to numpy
at run time.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


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
            extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
