"""The package's import graph: no cycles, and the layers keep to their rules.

The graph is read from the sources (``ast``), not by importing them, so a cycle that
Python happens to tolerate today (a deferred import, a ``TYPE_CHECKING`` guard) is still
seen. What counts as an edge ``a -> b``: every ``import fleet.b`` / ``from fleet.b import
x`` in ``a``, wherever it stands (module level, under ``if TYPE_CHECKING:``, inside a
function). They are all design dependencies: a type annotation naming ``b`` means ``a``
is written against ``b``, and an import moved into a function is the usual way of hiding
a cycle rather than removing it. ``from fleet.p import m`` is an edge to ``fleet.p.m``
when ``m`` is a submodule, else to the package ``fleet.p`` (its ``__init__``). Parent
packages are not added implicitly: a package ``__init__`` that re-exports its modules
would otherwise close a cycle with each of them.

Layer rules (docs/architecture.md): fleet/engine decides and
never reaches pyVmomi or the wire (``fleet.vsphere.client``/``session``/``transport``);
fleet/sim is vCenter and never imports the client side (``fleet.vsphere``) or the engine.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fleet"

#: Cycles that exist today outside fleet/sim, each named by its sorted members. Other
#: work on issue 12 removes them; this set may only shrink (a cycle listed here that is
#: gone fails the test, so the entry is deleted with the fix). fleet/sim may have none.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> Iterator[tuple[str, str | None, int]]:
    """(module, imported attribute or None, line) for every import in ``path``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name, node.lineno


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported fleet module: first line importing it}."""
    mods = modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        out: dict[str, int] = {}
        for base, attr, line in imported_names(path, name):
            if attr is not None and f"{base}.{attr}" in mods:
                target = f"{base}.{attr}"
            elif base in mods:
                target = base
            else:
                continue
            if target != name:
                out.setdefault(target, line)
        edges[name] = out
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(component: frozenset[str], edges: dict[str, dict[str, int]]) -> str:
    """The component's members and the imports that tie them together."""
    ties = [f"{a} -> {b} (line {line})" for a in sorted(component)
            for b, line in sorted(edges[a].items()) if b in component]
    return "{" + ", ".join(sorted(component)) + "}\n    " + "\n    ".join(ties)


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The walker itself: a cycle hidden under TYPE_CHECKING or in a function is found."""
    src = tmp_path / "a.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from fleet.b import X\n"
                   "def f():\n    import fleet.c\n"
                   "from . import d\n")
    found = {(b, a) for b, a, _ in imported_names(src, "fleet.a")}
    assert found == {("typing", "TYPE_CHECKING"), ("fleet.b", "X"), ("fleet.c", None),
                     ("fleet", "d")}
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [
        frozenset({"a", "b", "c"})]


def test_no_import_cycles() -> None:
    edges = graph()
    found = cycles(edges)
    in_sim = [c for c in found if any(m.startswith("fleet.sim") for m in c)]
    assert not in_sim, "import cycle(s) in fleet/sim:\n" + "\n".join(
        describe(c, edges) for c in in_sim)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "new import cycle(s) (issue 12 removes cycles, never adds):\n" + "\n".join(
        describe(c, edges) for c in new)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"cycle(s) gone: delete them from KNOWN_CYCLES: {gone}"


def _imports_of(package: str) -> Iterator[tuple[str, str, int]]:
    for name, path in modules().items():
        if name == package or name.startswith(package + "."):
            for base, attr, line in imported_names(path, name):
                full = f"{base}.{attr}" if attr is not None else base
                yield name, full, line


def _breaks(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{mod} line {line} imports {full}" for mod, full, line in _imports_of(package)
            if any(full == f or full.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("fleet.engine", ("pyVmomi", "pyVim", "fleet.vsphere.client", "fleet.vsphere.session",
                      "fleet.vsphere.transport")),
    ("fleet.sim", ("fleet.vsphere", "fleet.engine")),
])
def test_layer_rules(package: str, forbidden: tuple[str, ...]) -> None:
    assert not _breaks(package, forbidden)


def test_the_layer_check_sees_a_break() -> None:
    """The rule check can fail: fleet/sim does import pyVmomi, so forbidding it shows up."""
    assert _breaks("fleet.sim", ("pyVmomi",))


#: The simulator's top: the composition root and what serves it. Everything else in
#: fleet/sim is given narrow services (fleet.sim.runtime) and never sees these.
SIM_TOP = ("fleet.sim.simulator", "fleet.sim.dispatch", "fleet.sim.server")


def test_sim_objects_never_reach_the_simulator() -> None:
    reaching = [f"{mod} line {line} imports {full}" for mod, full, line in _imports_of("fleet.sim")
                if mod not in SIM_TOP and any(full == t or full.startswith(t + ".")
                                              for t in SIM_TOP)]
    assert not reaching
