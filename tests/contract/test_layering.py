"""The layering of ``src/edgekiln`` as ``docs/architecture.md`` states it, checked on every import.

The checker reads every module with :mod:`ast` and collects each ``import``/``from ... import``
of an edgekiln module, at module level and inside functions, absolute and relative. The table
in ``docs/architecture.md`` is parsed here, so the document and this test cannot drift: a
package missing from the table, or an import its row does not allow, fails with file:line.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "edgekiln"
DOC = REPO / "docs" / "architecture.md"
TORCH = frozenset({"torch", "torchvision", "torchaudio", "torch_pruning"})
# Top-level names of the repository that the package must never import (they are outside it).
OUTSIDE = frozenset({"benchmarks", "tests"})
ROOT_KEY = "__init__.py"


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``module`` imported by ``importer`` at ``file:line``."""

    file: Path
    line: int
    importer: str            # dotted module name, e.g. edgekiln.codegen.ir
    module: str              # dotted module name imported (edgekiln..., or a third-party top name)
    in_function: bool
    type_checking: bool = False

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root.parent.parent)}:{self.line}"


@dataclass(frozen=True)
class Row:
    """One row of the layer table: the layer number, and the package keys its code may import."""

    layer: int
    may_import: frozenset[str]


# ---------------------------------------------------------------------------------------------
# The checker


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_relative(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path, src: Path):
        self.path, self.src = path, src
        self.importer = module_name(path, src)
        self.is_pkg = path.name == "__init__.py"
        self.depth = 0          # > 0 inside a function body
        self.type_checking = 0  # > 0 inside `if TYPE_CHECKING:`
        self.found: list[Import] = []

    def _add(self, node: ast.AST, module: str) -> None:
        self.found.append(Import(self.path, node.lineno, self.importer, module, self.depth > 0,
                                 self.type_checking > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                  (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.type_checking += guarded
        for child in node.body:
            self.visit(child)
        self.type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            module = _resolve_relative(self.importer, self.is_pkg, node.level, node.module)
        else:
            module = node.module or ""
        root = self.src.name
        if module == root or (module.startswith(root + ".") and _is_package(module, self.src)):
            # `from edgekiln import cli` / `from edgekiln.models import intake`: each name that is a
            # submodule is an import of that submodule.
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                self._add(node, sub if _exists(sub, self.src) else module)
        else:
            self._add(node, module)


def _path_of(module: str, src: Path) -> Path:
    return src.parent.joinpath(*module.split("."))


def _exists(module: str, src: Path) -> bool:
    p = _path_of(module, src)
    return p.is_dir() or p.with_suffix(".py").is_file()


def _is_package(module: str, src: Path) -> bool:
    return _path_of(module, src).is_dir()


def collect_imports(src: Path) -> list[Import]:
    """Every import statement in every module under ``src`` (a package directory)."""
    found: list[Import] = []
    for path in sorted(src.rglob("*.py")):
        collector = _Collector(path, src)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(collector.found)
    return found


def package_key(module: str, src: Path) -> str:
    """The table key of an edgekiln module: ``cli/`` for a subpackage, ``pipeline.py`` for a
    top-level module, ``__init__.py`` for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT_KEY
    top = src / parts[1]
    if top.is_dir():
        return parts[1] + "/"
    if top.with_suffix(".py").is_file():
        return parts[1] + ".py"
    return parts[1] + "/?"   # neither exists: named as a package that the table cannot list


def parse_table(markdown: str) -> dict[str, Row]:
    """The layer table of ``docs/architecture.md``: ``{package key: Row}``.

    The table is the first one whose header is ``layer | package(s) | what it holds | may import``.
    Package keys are the backticked names of the second column. The last column lists the
    backticked keys a row may import; ``every row below`` adds every row of a higher layer number.
    """
    lines = markdown.splitlines()
    header = [i for i, ln in enumerate(lines)
              if [c.strip().lower() for c in ln.strip().strip("|").split("|")] ==
              ["layer", "package(s)", "what it holds", "may import"]]
    if not header:
        raise AssertionError("docs/architecture.md has no table 'layer | package(s) | what it holds | may import'")
    cells_of: list[tuple[int, list[str], str]] = []
    for ln in lines[header[0] + 2:]:
        if not ln.strip().startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) != 4:
            raise AssertionError(f"docs/architecture.md: table row has {len(cells)} cells, not 4: {ln!r}")
        layer, packages, _, may = cells
        cells_of.append((int(layer), re.findall(r"`([^`]+)`", packages), may))
    table: dict[str, Row] = {}
    for i, (layer, packages, may) in enumerate(cells_of):
        allowed = set(re.findall(r"`([^`]+)`", may))
        if "every row below" in may:
            allowed |= {k for layer_below, pkgs, _ in cells_of[i + 1:] if layer_below > layer for k in pkgs}
        for key in packages:
            table[key] = Row(layer, frozenset(allowed))
    unknown = {k for row in table.values() for k in row.may_import} - set(table)
    if unknown:
        raise AssertionError(f"docs/architecture.md: 'may import' names {sorted(unknown)}, which no row lists")
    return table


def violations(imports: list[Import], table: dict[str, Row], src: Path) -> list[str]:
    """One line per import that the table does not allow, naming file:line and both layers."""
    root = src.name
    out = []
    for imp in imports:
        top = imp.module.split(".")[0]
        if top in OUTSIDE:
            out.append(f"{imp.where(src)}: {imp.importer} imports {imp.module}, which is outside the package")
            continue
        if top != root:
            continue
        a, b = package_key(imp.importer, src), package_key(imp.module, src)
        if a == b:
            continue
        if a not in table:
            out.append(f"{imp.where(src)}: {imp.importer} is in {a}, which docs/architecture.md does not list")
        elif b.endswith("?"):
            out.append(f"{imp.where(src)}: {a} (layer {table[a].layer}) imports {imp.module}, which does not exist")
        elif b not in table:
            out.append(f"{imp.where(src)}: {a} (layer {table[a].layer}) imports {imp.module}, "
                       f"in {b}, which docs/architecture.md does not list")
        elif b not in table[a].may_import:
            out.append(f"{imp.where(src)}: {a} (layer {table[a].layer}) imports {imp.module} from "
                       f"{b} (layer {table[b].layer}), which its row does not allow")
    return out


def package_graph(imports: list[Import], src: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.module.split(".")[0] != src.name:
            continue
        a, b = package_key(imp.importer, src), package_key(imp.module, src)
        graph[a]
        if a != b:
            graph[a].add(b)
    return graph


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan), each as a cycle
    path through its packages."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, comp) for comp in comps]


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first package of ``comp`` (breadth-first within ``comp``)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def torch_imports(imports: list[Import], modules: set[str]) -> list[Import]:
    return [imp for imp in imports if imp.importer in modules and imp.module.split(".")[0] in TORCH]


def reachable(start: str, imports: list[Import]) -> set[str]:
    """Every edgekiln module ``start`` can import, following imports at any depth."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        edges[imp.importer].add(imp.module)
    seen, todo = {start}, [start]
    while todo:
        for m in edges.get(todo.pop(), ()):
            if m not in seen and m.split(".")[0] == start.split(".")[0]:
                seen.add(m)
                todo.append(m)
    return seen


# ---------------------------------------------------------------------------------------------
# The package


@pytest.fixture(scope="module")
def imports():
    return collect_imports(SRC)


@pytest.fixture(scope="module")
def table():
    return parse_table(DOC.read_text(encoding="utf-8"))


def test_every_module_is_in_a_row_of_the_table(table):
    missing = sorted({package_key(module_name(p, SRC), SRC) for p in SRC.rglob("*.py")} - set(table))
    assert not missing, f"docs/architecture.md lists no row for {missing}"


def test_the_table_allows_no_upward_import(table):
    upward = [f"{a} (layer {ra.layer}) may import {b} (layer {table[b].layer})"
              for a, ra in table.items() for b in ra.may_import if table[b].layer < ra.layer]
    assert not upward, "docs/architecture.md allows imports that point up:\n" + "\n".join(upward)


def test_every_import_follows_the_layer_table(imports, table):
    bad = violations(imports, table, SRC)
    assert not bad, f"{len(bad)} imports run against docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages(imports):
    cycles = package_cycles(package_graph(imports, SRC))
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module(imports):
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgekiln"):
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names imported across modules (make them public or move the caller):\n" + \
        "\n".join(bad)


def _torch_free_modules(imports: list[Import]) -> set[str]:
    keys = {"runtime/", "codegen/", "execution/"}
    modules = {module_name(p, SRC) for p in SRC.rglob("*.py")}
    guarded = {m for m in modules if package_key(m, SRC) in keys}
    return guarded | reachable("edgekiln.fleet.agent", imports) | reachable("edgekiln.fleet.adapt", imports)


def test_runtime_codegen_execution_and_the_fleet_agent_never_import_torch(imports):
    guarded = _torch_free_modules(imports)
    assert "edgekiln.fleet.agent" in guarded and "edgekiln.runtime.engine" in guarded, sorted(guarded)
    bad = [f"{imp.where(SRC)}: {imp.importer} imports {imp.module}" + (" (inside a function)" if imp.in_function else "")
           for imp in torch_imports(imports, guarded)]
    assert not bad, "torch imported where it must never be:\n" + "\n".join(bad)


def test_importing_runtime_codegen_execution_and_the_agent_loads_no_torch():
    """The static check above, confirmed by importing them: no dependency pulls torch in either."""
    modules = sorted(m for m in (module_name(p, SRC) for p in SRC.rglob("*.py"))
                     if package_key(m, SRC) in {"runtime/", "codegen/", "execution/"})
    modules += ["edgekiln.fleet.agent", "edgekiln.fleet.adapt"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    if 'torch' in sys.modules:\n"
            "        sys.exit('importing ' + m + ' loaded torch')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:] or done.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# The checker itself, on a small synthetic tree: it must be able to fail.

_TABLE = """\
| layer | package(s) | what it holds | may import |
|---|---|---|---|
| 1 | `__init__.py`, `cli/` | commands | every row below |
| 2 | `passes/` | passes | `models/`, `errors.py` |
| 3 | `models/` | intake | `errors.py` |
| 4 | `errors.py` | the error type | nothing |
"""


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src" / "edgekiln"
    for name, text in {"__init__.py": "", "errors.py": "", "cli/__init__.py": "",
                       "passes/__init__.py": "", "models/__init__.py": "", **files}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def test_checker_catches_an_upward_import_inside_a_function(tmp_path):
    src = _tree(tmp_path, {
        "models/intake.py": "import os\n\n\ndef load():\n    from edgekiln.passes import quantize\n",
        "passes/quantize.py": "from edgekiln.models import intake\nfrom ..errors import X\n",
    })
    bad = violations(collect_imports(src), parse_table(_TABLE), src)
    assert bad == ["src/edgekiln/models/intake.py:5: models/ (layer 3) imports edgekiln.passes.quantize "
                   "from passes/ (layer 2), which its row does not allow"], bad


def test_checker_resolves_relative_imports_and_names_unlisted_packages(tmp_path):
    src = _tree(tmp_path, {
        "models/intake.py": "def f():\n    from .. import cli\n    from ..bench import x\n    import edgekiln.gone\n",
        "bench/__init__.py": "",
        "errors.py": "import benchmarks.suite\n",
    })
    bad = violations(collect_imports(src), parse_table(_TABLE), src)
    assert any(b.startswith("src/edgekiln/models/intake.py:2: models/ (layer 3) imports edgekiln.cli from cli/")
               for b in bad), bad
    assert any(b.startswith("src/edgekiln/models/intake.py:3:") and "does not list" in b for b in bad), bad
    assert any(b.startswith("src/edgekiln/models/intake.py:4:") and "does not exist" in b for b in bad), bad
    assert any(b.startswith("src/edgekiln/errors.py:1:") and "outside the package" in b for b in bad), bad
    assert len(bad) == 4, bad


def test_checker_prints_a_package_cycle(tmp_path):
    src = _tree(tmp_path, {
        "models/a.py": "def f():\n    import edgekiln.passes.b\n",
        "passes/b.py": "import edgekiln.models.a\n",
    })
    assert package_cycles(package_graph(collect_imports(src), src)) == [["models/", "passes/", "models/"]]


def test_checker_finds_torch_inside_a_function(tmp_path):
    src = _tree(tmp_path, {"models/a.py": "def f():\n    import torch.nn as nn\n"})
    found = torch_imports(collect_imports(src), {"edgekiln.models.a"})
    assert [(f.line, f.module, f.in_function) for f in found] == [(2, "torch.nn", True)], found


def test_table_parser_rejects_a_name_no_row_lists():
    with pytest.raises(AssertionError, match="search/"):
        parse_table(_TABLE.replace("`models/`, `errors.py`", "`search/`"))
