"""The checkout must not shadow other packages: `python -m pytest` and `python -c` put the repo root first on
sys.path, so a top-level `kernels/` there hid PyPI's `kernels` (a dependency of transformers >= 5), and
`import transformers.activations` (hence sentence-transformers, peft) failed from the repo root. The Triton
kernels now live in jv5fast/kernels/, where they are installed from."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_root(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_nothing_at_the_repo_root_is_importable_as_a_top_level_kernels():
    assert not any(os.path.exists(os.path.join(ROOT, n)) for n in ("kernels", "kernels.py")), os.listdir(ROOT)
    out = run_in_root("import importlib.util as u, json\n"
                      "s = u.find_spec('kernels')\n"
                      "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    import json
    spec = json.loads(out)
    if spec is not None:  # PyPI's kernels (or nothing): never a folder of this checkout
        for where in [spec[0] or "", *spec[1]]:
            assert not os.path.realpath(where).startswith(os.path.realpath(ROOT) + os.sep), spec


def test_transformers_and_jv5fast_kernels_import_from_the_repo_root():
    pytest.importorskip("transformers")
    out = run_in_root("import transformers.activations, jv5fast.kernels, jv5fast.kernels.attention, jv5fast.ops\n"
                      "import jv5fast.kernels as k; print(k.__file__)")
    assert out.strip().endswith(os.path.join("jv5fast", "kernels", "__init__.py")), out


def test_pypi_kernels_is_the_one_imported_when_installed():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed (transformers < 5 does not need it)")
    out = run_in_root("import kernels; print(kernels.__file__)")
    assert os.path.realpath(out.strip()).startswith(os.path.realpath(str(dist.locate_file(""))))
