"""Imports run one way: every module of the package (function-level imports included) imports
only from its own part or the parts below it, so no two parts import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dynconvert"

# bottom to top: a part imports only from the layers below its own
LAYERS = [
    {"errors", "version"},
    {"files", "progress", "options"},
    {"config", "models"},
    {"runtime"},
    {"toolkit"},
    {"passes"},
    {"export"},
    {"strategies"},
    {"recipe"},
    {"convert"},
    {"__init__"},
    {"coverage", "cli"},
    {"__main__"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """The part a dotted module name belongs to: its folder under the package, or its own name."""
    pieces = module.split(".")
    return "__init__" if len(pieces) == 1 else pieces[1]


def imports() -> list[tuple[str, str, int]]:
    """(importing module's file, imported module, line) for every import of a dynconvert module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                targets = [n for n in names[:1] if n.startswith("dynconvert")]
                if node.module == "dynconvert":  # `from dynconvert import x`: x may be a part
                    targets = [f"dynconvert.{a.name}" for a in node.names]
                found.extend((str(path.relative_to(PACKAGE.parent)), t, node.lineno) for t in targets)
            elif isinstance(node, ast.Import):
                found.extend(
                    (str(path.relative_to(PACKAGE.parent)), a.name, node.lineno)
                    for a in node.names
                    if a.name.startswith("dynconvert")
                )
    return found


def source_part(path: str) -> str:
    pieces = Path(path).with_suffix("").parts  # ("dynconvert", "toolkit", "data") or ("dynconvert", "cli")
    return pieces[1] if len(pieces) > 2 else pieces[-1]


def test_every_part_is_placed_in_a_layer():
    parts = {source_part(str(p.relative_to(PACKAGE.parent))) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LEVEL), f"place these in LAYERS: {sorted(parts - set(LEVEL))}"


def test_imports_only_go_down():
    upward = []
    for path, target, line in imports():
        source, imported = source_part(path), part_of(target)
        if imported not in LEVEL:  # `from dynconvert import __version__`-style names of the package
            imported = "__init__"
        if source != imported and LEVEL[imported] >= LEVEL[source]:
            upward.append(f"{path}:{line} imports {target} ({source} -> {imported})")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_cycle_between_parts():
    edges: dict[str, set[str]] = {}
    for path, target, _ in imports():
        source, imported = source_part(path), part_of(target)
        if source != imported:
            edges.setdefault(source, set()).add(imported)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
