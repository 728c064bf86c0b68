"""The house stays standing: the package's modules import only from layers below their own
(never sideways into a circle, never up), as DESIGN.md's layout describes. Read with `ast`, so
lazy imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "omnigen2_batch"

# Bottom to top. A module may import from its own layer or any layer below, never above; a
# package (model/, executors/, report/, toy/) is one unit here and may import within itself.
LAYERS = [
    ["__init__", "errors"],  # __init__ holds only __version__
    ["config", "rules", "jobs", "progress"],
    ["typed_yaml", "yaml_document", "images", "prompt_budget", "toy", "cost"],
    ["model"],
    ["recipe_types", "recipe_weights", "sweep"],
    ["recipe"],
    ["plan", "expand", "plan_options"],
    ["store"],
    ["scoring", "generate", "reflection"],
    ["worker", "preflight"],
    ["rescore", "report", "export", "picks"],
    ["executors"],
    ["run"],
    ["cli", "console"],
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """omnigen2_batch.model.pipeline -> model; omnigen2_batch.store -> store."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every package module `path` imports, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    units = {unit_of(name) for name in import_graph()}
    assert units <= set(LEVEL), f"add these to LAYERS (and DESIGN.md): {sorted(units - set(LEVEL))}"


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items()
                    for target in targets if LEVEL[unit_of(target)] > LEVEL[unit_of(name)])
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    units = {unit_of(n) for n in graph}
    edges = {u: {unit_of(t) for n, ts in graph.items() if unit_of(n) == u for t in ts} - {u}
             for u in units}
    circles = [cycle for cycle in (_cycle_from(u, edges) for u in sorted(units)) if cycle]
    assert not circles, "import circles between units: " + "; ".join(" -> ".join(c) for c in circles)
    inner = {n: {t for t in ts if unit_of(t) == unit_of(n)} for n, ts in graph.items()}
    circles = [cycle for cycle in (_cycle_from(n, inner) for n in sorted(graph)) if cycle]
    assert not circles, "import circles inside a package: " + "; ".join(" -> ".join(c) for c in circles)


def _cycle_from(start: str, edges: dict[str, set[str]]) -> list[str]:
    """A path start -> ... -> start if there is one, else []."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert _cycle_from("a", graph) == expected
