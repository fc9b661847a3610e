"""The shape of the code, read from the source text alone (nothing from toolkit is imported):

    .venv/bin/python -m pytest tests/test_layout.py -q

(a) no import cycle among the `toolkit` modules' import-time imports; (b) no toolkit module
imports a private name (leading underscore) from another toolkit module; (c) no test module
imports another test module (shared test code lives in `conftest.py` or the `tests/helpers`
package).

Import-time ("module-level") means run when the module is imported: top-level statements,
class bodies, top-level `if`/`try` blocks. Imports inside a function run when it is called and
do not close a cycle; imports under `if TYPE_CHECKING:` never run and are left out of (a). An
import of a submodule is an edge to that submodule only: the parent packages Python imports on
the way are not edges, so `toolkit/data/__init__.py` importing `toolkit.data.cifar` and
cifar importing `toolkit.data.base` is not a cycle, but cifar importing a name defined in
`toolkit/data/__init__.py` (`from toolkit.data import DATASETS`) is an edge back to the package.
`from toolkit.pkg import sub` is an edge to the submodule `toolkit.pkg.sub` when that file exists.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "toolkit"
TESTS = ROOT / "tests"
ALLOWED_TEST_IMPORTS = {"conftest", "helpers"}  # tests/conftest.py, the tests/helpers package


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    path: Path  # its file
    line: int
    target: str  # imported module, dotted (absolute)
    name: str | None  # the name taken from it (`from target import name`), None for `import target`
    top: bool  # at import time (see the module docstring): not in a function nor under TYPE_CHECKING

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def modules(top: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package in folder `top` (packages: __init__.py)."""
    out = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module):
    """-> (node, at import time) for every Import / ImportFrom in the tree."""
    stack = [(n, True) for n in reversed(tree.body)]
    while stack:
        node, top = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            children = [(c, False) for c in ast.iter_child_nodes(node)]
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            children = [(c, False) for c in node.body] + [(c, top) for c in node.orelse]
        else:
            children = [(c, top) for c in ast.iter_child_nodes(node)]
        stack.extend(reversed(children))


def _base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in `path`, with `from pkg import sub` resolved to the submodule when `known`
    has it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node, top in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, path, node.lineno, a.name, None, top) for a in node.names]
            continue
        base = _base(module, is_package, node.level, node.module)
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in known:
                out.append(Import(module, path, node.lineno, sub, None, top))
            else:
                out.append(Import(module, path, node.lineno, base, a.name, top))
    return out


def package_imports() -> tuple[dict[str, Path], list[Import]]:
    mods = modules(ROOT / PACKAGE)
    known = set(mods)
    edges = [i for m, p in mods.items() for i in imports(m, p, known)
             if i.target in known and i.target != i.source]
    return mods, edges


# ------------------------------------------------------------------------------------------
# (a) cycles


def _sccs(nodes, succ) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(succ.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def _shortest_cycle(start: str, succ, inside: set[str]) -> list[str]:
    """start -> ... -> start within `inside`, fewest edges (BFS)."""
    prev = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(succ.get(v, ())):
            if w not in inside:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return []


def import_cycles(edges: list[Import]) -> list[str]:
    """One line per cycle (one shortest cycle per strongly connected set of modules), each edge
    with the file:line of its first import-time import."""
    first: dict[tuple[str, str], Import] = {}
    for e in edges:
        if e.top:
            first.setdefault((e.source, e.target), e)
    succ: dict[str, set[str]] = {}
    for a, b in first:
        succ.setdefault(a, set()).add(b)
    nodes = sorted(set(succ) | {b for bs in succ.values() for b in bs})
    found = []
    for comp in _sccs(nodes, succ):
        if len(comp) < 2:
            continue
        cycle = _shortest_cycle(comp[0], succ, set(comp))
        steps = [f"{a} -> {b} ({first[a, b].where})" for a, b in zip(cycle, cycle[1:])]
        inside = [f"  {e.where}: {a} -> {b}" for (a, b), e in sorted(first.items())
                  if a in comp and b in comp]
        found.append(f"cycle among {', '.join(comp)}: " + "; ".join(steps)
                     + "\n every import-time edge among them:\n" + "\n".join(inside))
    return found


def test_no_import_cycles():
    _, edges = package_imports()
    assert edges, "no imports found: is ROOT right?"
    cycles = import_cycles(edges)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


# ------------------------------------------------------------------------------------------
# (b) private names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(edges: list[Import]) -> list[str]:
    bad = []
    for e in edges:
        owner, taken = (e.target, e.name) if e.name is not None else e.target.rsplit(".", 1)
        if _private(taken):
            bad.append(f"{e.where}: {e.source} imports {taken} from {owner}")
    return bad


def test_no_private_imports_across_modules():
    _, edges = package_imports()
    bad = private_imports(edges)
    assert not bad, "private names imported from another toolkit module:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------
# (c) test modules


def cross_test_imports(tests: Path = TESTS) -> list[str]:
    """`import test_x` / `from test_x import ...` (also `tests.test_x`, `.test_x`) in any file
    under `tests`."""
    files = sorted(tests.rglob("*.py"))
    test_modules = {p.stem for p in files if p.stem.startswith("test_") or p.stem.endswith("_test")}
    bad: dict[tuple[str, str], list[str]] = {}  # (file:line, test module) -> names taken
    for path in files:
        module = ".".join(path.relative_to(tests.parent).with_suffix("").parts)
        for i in imports(module, path, set()):
            names = [i.target] + ([f"{i.target}.{i.name}"] if i.name else [])
            for dotted in names:
                parts = dotted.split(".")
                if parts[0] == "tests":
                    parts = parts[1:]
                if parts and parts[0] in test_modules and parts[0] not in ALLOWED_TEST_IMPORTS:
                    taken = bad.setdefault((i.where, parts[0]), [])
                    if i.name and i.name != parts[0]:
                        taken.append(i.name)
                    break
    return [f"{where}: imports {mod}" + (f" ({', '.join(names)})" if names else "")
            for (where, mod), names in bad.items()]


def test_no_test_module_imports_another():
    bad = cross_test_imports()
    assert not bad, ("test modules importing other test modules (move the shared code to "
                     "tests/helpers/ or conftest.py):\n" + "\n".join(bad))


# ------------------------------------------------------------------------------------------
# the checker itself, on small trees written here


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def _edges(top: Path) -> list[Import]:
    mods = modules(top)
    return [i for m, p in mods.items() for i in imports(m, p, set(mods))
            if i.target in mods and i.target != i.source]


def test_checker_finds_a_cycle_and_ignores_deferred_imports(tmp_path):
    top = _tree(tmp_path, {
        "pkg/__init__.py": "from pkg import a  # noqa\nREG = {}\n",
        "pkg/a.py": "from pkg import REG\nfrom . import b\n",
        "pkg/b.py": "def f():\n    from pkg.a import REG\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import X\n",
        "pkg/d.py": "from pkg.c import Y\n",
    }) / "pkg"
    edges = _edges(top)
    cycles = import_cycles(edges)
    assert len(cycles) == 1 and "pkg -> pkg.a" in cycles[0] and "pkg.a -> pkg" in cycles[0], cycles
    assert "pkg/a.py:1" in cycles[0]
    assert any(e.source == "pkg.a" and e.target == "pkg.b" for e in edges)  # `from . import b`: the submodule
    assert any(e.source == "pkg.b" and e.target == "pkg.a" and not e.top for e in edges)


def test_checker_finds_private_imports(tmp_path):
    top = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "_X = 1\n__version__ = 2\n",
        "pkg/b.py": "from pkg.a import _X, __version__\n",
        "pkg/c.py": "def f():\n    from .a import _X\n",
    }) / "pkg"
    bad = private_imports(_edges(top))
    assert len(bad) == 2 and all("_X" in b for b in bad) and "b.py:1" in bad[0] and "c.py:2" in bad[1], bad


def test_checker_finds_imports_between_tests(tmp_path):
    tests = _tree(tmp_path, {
        "tests/conftest.py": "",
        "tests/helpers/__init__.py": "from tests.helpers.folders import make\n",
        "tests/test_a.py": "from conftest import x\nfrom helpers import make\nimport test_b\n",
        "tests/test_b.py": "def f():\n    from test_a import _image\n",
        "tests/test_c.py": "from tests import test_a\nfrom .test_b import f\n",
    }) / "tests"
    bad = cross_test_imports(tests)
    assert [b.split(": ")[0].replace("\\", "/").rsplit("/", 1)[-1] for b in bad] == [
        "test_a.py:3", "test_b.py:2", "test_c.py:1", "test_c.py:2"], bad
