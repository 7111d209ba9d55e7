"""The import graph of the package, read from the source with `ast` (imports inside functions and
under ``TYPE_CHECKING`` included): no import loop, no import from a lower room to a higher one,
and no private name imported across modules. The rooms and their order are docs/ARCHITECTURE.md's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ctrak_fast"

# Each room's floor: a module may import its own room and the rooms on lower floors, never a
# higher one. Rooms on one floor do not import each other (checked separately).
FLOORS = {
    "_version": 0,
    "progress": 0,
    "kernels": 0,
    "engine": 1,
    "method": 2,
    "data": 3,
    "models": 4,
    "exports": 5,
    "figures": 5,
    "results": 6,
    "train": 7,
    "api": 8,
    "integrations": 9,
    "bench": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 11,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of the file."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            for a in node.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{mod}.{a.name}"
                out.append((sub, []) if sub in known else (mod, [a.name]))
    return out


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Edges between the package's modules, and the private names imported across modules."""
    mods = _modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for target, names in _imports(name, path, known):
            if target in known and target != name:
                edges[name].add(target)
            private += [(name, target, n) for n in names if n.startswith("_") and n[:2] != "__"]
    return edges, private


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


def test_no_import_loop():
    edges, _ = _graph()
    assert _loops(edges) == []


def test_no_upward_or_sideways_import():
    edges, _ = _graph()
    bad = [
        f"{a} -> {b}"
        for a, targets in sorted(edges.items())
        for b in sorted(targets)
        if _room(a) != _room(b) and FLOORS[_room(b)] >= FLOORS[_room(a)]
    ]
    assert bad == []


def test_no_private_name_imported_across_modules():
    _, private = _graph()
    assert private == []


@pytest.mark.parametrize("room", ["engine", "kernels"])
def test_the_engine_and_the_kernels_know_no_model(room):
    # The engine is model-agnostic and the kernels are a leaf: neither imports a room above it.
    edges, _ = _graph()
    above = {r for r, f in FLOORS.items() if f > FLOORS[room]}
    up = [(a, b) for a, t in edges.items() if _room(a) == room for b in t if _room(b) in above]
    assert up == []
