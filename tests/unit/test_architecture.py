"""The house's rules that code review alone would let slip: the pure core and the offline
linter load no I/O libraries, no module imports itself back through others, and imports run
down the rooms, never up (docs/architecture.md draws them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT

IO_LIBRARIES = ("aiohttp", "redis", "docker")
PACKAGE = ROOT / "edgeproxy"

# The rooms, bottom up. A room imports only the rooms it lists: data flows down, never back.
# "top" is cli, server, workers and __main__: the entry and process lifecycle that wires the
# rooms together. The package itself (`edgeproxy`, its __version__) may be read by any room.
ROOMS: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "policies": frozenset({"core"}),
    "routes": frozenset({"core", "policies"}),
    "telemetry": frozenset({"core", "policies", "routes"}),
    "clients": frozenset({"core", "policies", "routes", "telemetry"}),
    # The two planes stand side by side: neither imports the other.
    "control": frozenset({"core", "policies", "routes", "telemetry", "clients"}),
    "proxy": frozenset({"core", "policies", "routes", "telemetry", "clients"}),
    "ops": frozenset({"core", "policies", "routes", "telemetry", "clients", "control", "proxy"}),
}
TOP = frozenset({"edgeproxy.cli", "edgeproxy.server", "edgeproxy.workers", "edgeproxy.__main__"})


@dataclass(frozen=True)
class Import:
    """One `import` statement of an edgeproxy module naming another edgeproxy module."""

    source: str
    target: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`: never executed


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool,
             known: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolve against the importing module's package
            base = source.split(".")[: len(source.split(".")) - node.level + is_package]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from edgeproxy.core import headers` imports the module headers, not a name.
        names = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                 for a in node.names]
    for name in names:
        while name and name not in known:  # `import edgeproxy.x.y as z` -> the deepest module
            name = name.rpartition(".")[0]
        if name and name != source:
            yield name


def import_graph(root: Path = PACKAGE) -> list[Import]:
    """Every edgeproxy -> edgeproxy import, wherever it stands: top level, inside functions
    (lazy imports run too, later), or under `if TYPE_CHECKING:` (marked type_only)."""
    known = modules(root)
    found: list[Import] = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        type_only: set[int] = set()
        for block in ast.walk(tree):
            if _type_checking_block(block):
                type_only.update(id(n) for n in ast.walk(block))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, source, path.name == "__init__.py", known):
                    found.append(Import(source, target, node.lineno, id(node) in type_only))
    return found


def room_of(module: str) -> str | None:
    """The room a module lives in; "top" for the entry modules, None for the package itself."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] not in ROOMS:
        raise AssertionError(f"module {module} is in no room: put it in one of {sorted(ROOMS)} "
                             "or add it to TOP")
    return parts[1]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one a cycle."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def back_imports(edges: list[Import]) -> list[str]:
    """Imports that run against the rooms' direction, one readable line each."""
    out = []
    for e in edges:
        if e.type_only:
            continue
        source, target = room_of(e.source), room_of(e.target)
        if source in (None, "top") or target is None or source == target:
            continue
        if target == "top" or target not in ROOMS[source]:
            out.append(f"{e.source} (line {e.line}) imports {e.target}: room {source} may "
                       f"import only {sorted(ROOMS[source]) or 'itself'}")
    return out


def loaded_after(code: str) -> set[str]:
    """Top-level packages loaded by a fresh interpreter after running `code`."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("module", ["edgeproxy.routes.model", "edgeproxy.routes.labels",
                                    "edgeproxy.routes.table", "edgeproxy.core.paths",
                                    "edgeproxy.routes.transform", "edgeproxy.control.watcher",
                                    "edgeproxy.ops.check", "edgeproxy.ops.migrate"])
def test_pure_modules_load_no_io_library(module: str) -> None:
    assert loaded_after(f"import {module}") & set(IO_LIBRARIES) == set()


def test_core_and_routes_rooms_load_no_io_library() -> None:
    # Every module of the two pure rooms, present and future, not just the ones listed above.
    names = [m for m in modules() if room_of(m) in ("core", "routes")]
    assert len(names) > 8
    assert loaded_after("\n".join(f"import {m}" for m in names)) & set(IO_LIBRARIES) == set()


def test_edgeproxy_check_loads_no_io_library(tmp_path: object) -> None:
    code = ("import sys, tempfile, pathlib\n"
            "from edgeproxy.cli import main\n"
            "p = pathlib.Path(tempfile.mkdtemp()) / 'compose.yml'\n"
            "p.write_text('services: {a: {image: x, labels: {gateway.path: /a}}}')\n"
            "try:\n    main(['check', str(p)])\nexcept SystemExit:\n    pass")
    assert loaded_after(code) & set(IO_LIBRARIES) == set()


def test_import_graph_sees_top_level_lazy_and_type_only_imports() -> None:
    edges = {(e.source, e.target): e for e in import_graph()}
    assert ("edgeproxy.ops.admin", "edgeproxy.proxy.decide") in edges  # top level
    lazy = edges[("edgeproxy.cli", "edgeproxy.ops.check")]  # inside main(): `check` stays light
    assert not lazy.type_only
    assert edges[("edgeproxy.telemetry.tracing", "edgeproxy.proxy.exchange")].type_only
    assert ("edgeproxy.proxy.pipeline", "edgeproxy.core.headers") in edges  # from pkg import mod


def test_no_import_cycles() -> None:
    # Lazy imports count: they run too, only later, and a cycle through one still ties the two
    # modules into one unit. Imports under `if TYPE_CHECKING:` never run, so they cannot form a
    # cycle at import time; they only name types (exchange <-> tracing annotate each other).
    assert cycles([e for e in import_graph() if not e.type_only]) == []


def test_imports_run_down_the_rooms() -> None:
    assert back_imports(import_graph()) == []


def test_every_room_is_a_package_with_a_one_line_docstring() -> None:
    for room in ROOMS:
        init = PACKAGE / room / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc is not None and "\n" not in doc.strip(), f"{init}: one-line docstring"
    for module in modules():
        room_of(module)  # raises for a module outside every room
