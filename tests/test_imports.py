"""No import cycle anywhere in jv5fast: every module is read with ``ast`` (nothing is imported) and its
``jv5fast`` imports, absolute and relative, become edges of one graph; the test fails naming each cycle.

The rule:
- every ``import`` / ``from ... import`` counts wherever it stands: module level, inside a function
  (a lazy import is still a dependency: it only moves the failure to the first call), under ``if``/``try``;
- ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` itself;
  ``import a.b.c`` is an edge to the longest prefix that is a module;
- a package's ``__init__`` importing modules inside that package (re-exporting ``Engine``, a lazy
  ``__getattr__``) makes no edge: it is the package's face, not a dependency of its parts. Anything it
  imports from outside the package counts, and so does a module reading its own package (``from . import
  __version__``);
- dynamic imports (``importlib.import_module`` with a computed name) are invisible here.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jv5fast")


def modules(root: str, package: str) -> dict:
    """{dotted module name: path} of every .py file under ``root`` (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for name in sorted(files):
            if name.endswith(".py"):
                stem = name[:-3]
                out[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(folder, name)
    return out


def _longest_module(name: str, mods) -> str | None:
    parts = name.split(".")
    while parts and ".".join(parts) not in mods:
        parts.pop()
    return ".".join(parts) or None


def imports_of(name: str, path: str, mods, lines: dict | None = None) -> set:
    """The modules of ``mods`` that module ``name`` (at ``path``) imports anywhere in its source; ``lines``,
    if given, gets {target: line of its first import}."""
    is_pkg = os.path.basename(path) == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out, seen = set(), {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [_longest_module(a.name, mods) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]  # level 1: ``here``
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                full = f"{base}.{a.name}"
                targets.append(full if full in mods else _longest_module(base, mods))
        for t in targets:
            out.add(t)
            seen[t] = min(seen.get(t, node.lineno), node.lineno)
    out.discard(None)
    out.discard(name)
    if is_pkg:  # the __init__ re-exporting its own submodules: no edge (see the module docstring)
        out = {m for m in out if not m.startswith(name + ".")}
    if lines is not None:
        lines.update((t, seen[t]) for t in out)
    return out


def import_graph(root: str = ROOT, package: str = "jv5fast", where: dict | None = None) -> dict:
    """{module: the modules it imports}; ``where``, if given, gets {(module, target): "path:line"}."""
    mods = modules(root, package)
    graph = {}
    for name, path in mods.items():
        lines = {}
        graph[name] = imports_of(name, path, mods, lines)
        if where is not None:
            rel = os.path.relpath(path, os.path.dirname(root))
            where.update(((name, t), f"{rel}:{n}") for t, n in lines.items())
    return graph


def knots(graph: dict) -> list:
    """The strongly connected components that hold a cycle (Tarjan), as sets of modules."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):  # recursive: the package has a few hundred modules at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1 or v in graph.get(v, ()):
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def find_cycles(graph: dict) -> list:
    """One cycle (a list of modules, first == last) per knot: fixing it may leave another in the same knot."""
    return [_cycle_in(scc, graph) for scc in knots(graph)]


def _cycle_in(scc: set, graph: dict) -> list:
    """A shortest cycle through the alphabetically first module of ``scc`` (breadth-first within it)."""
    start = min(scc)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if v != start else [start, start]
                if w in scc and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(scc)}")


def test_no_import_cycle_in_jv5fast():
    where = {}
    graph = import_graph(where=where)
    assert "jv5fast.engine" in graph and graph["jv5fast.engine"], "the walker found no imports: wrong root?"
    report = []
    for scc in knots(graph):
        cycle = _cycle_in(scc, graph)
        report.append("  " + " -> ".join(cycle))
        report += [f"      {a} -> {b}  ({where[a, b]})" for a, b in zip(cycle, cycle[1:])]
        if len(scc) > len(cycle) - 1:
            report.append(f"    (one cycle of a knot of {len(scc)}: {', '.join(sorted(scc))})")
    assert not report, "import cycles in jv5fast (lazy imports count):\n" + "\n".join(report)


# ---- the walker itself, on packages made for the purpose ------------------------------------------
def _package(tmp_path, files: dict) -> str:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path / "pkg")


def test_find_cycles_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_walker_counts_lazy_and_relative_imports_but_not_init_reexports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .engine import Engine\n",                       # re-export: no edge
        "engine.py": "from . import ops\nfrom .sub import leaf\n\ndef f():\n    from .sub.leaf import g\n",
        "ops.py": "import pkg.sub\n",
        "sub/__init__.py": "from .leaf import g\nfrom .. import ops\n",       # ops is outside sub: an edge
        "sub/leaf.py": "def g():\n    from .. import engine\n    from pkg import __version__\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": set(), "pkg.engine": {"pkg.ops", "pkg.sub.leaf"}, "pkg.ops": {"pkg.sub"},
                     "pkg.sub": {"pkg.ops"}, "pkg.sub.leaf": {"pkg.engine", "pkg"}}
    # the function-local import in leaf closes engine -> leaf -> engine; sub <-> ops is another
    assert sorted(find_cycles(graph)) == [["pkg.engine", "pkg.sub.leaf", "pkg.engine"],
                                          ["pkg.ops", "pkg.sub", "pkg.ops"]]


@pytest.mark.parametrize("lazy", [False, True])
def test_walker_reports_a_cycle_as_the_suite_would(tmp_path, lazy):
    body = "def f():\n    from .a import x\n" if lazy else "from .a import x\n"
    root = _package(tmp_path, {"__init__.py": "", "a.py": "from .b import y\nx = 1\n",
                               "b.py": body + "y = 2\n"})
    assert find_cycles(import_graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.a"]]
