"""The import graph of ``lightning_eff``: no cycles, no import from a lower layer into a higher one.

The layers, lowest first (README, "Architecture"): a module may import its own layer or lower ones.
Every import counts, also those inside functions (a lazy import that runs upwards is still a
dependency that runs upwards). ``from package import name`` counts as importing the submodule
``package.name`` when that is a module. The package root ``lightning_eff/__init__.py`` is the
public facade and sits on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_eff"

#: (layer name, top-level modules / packages of ``lightning_eff`` in it), lowest first.
LAYERS = [
    ("floor", ["errors", "validation", "naming", "schedules", "batch", "atomic", "protocols"]),
    ("surgery", ["surgery"]),
    ("data", ["data"]),
    ("measure", ["measure"]),
    ("models", ["models"]),
    ("techniques", ["compression", "learning", "training"]),
    ("export", ["export"]),
    ("report", ["report"]),
    ("tasks", ["tasks"]),
    ("callbacks", ["callbacks", "strategies"]),
    ("app", ["recipes", "stages", "cli", "bench", "label_efficiency", ""]),
]
RANK = {top: rank for rank, (_, tops) in enumerate(LAYERS) for top in tops}


def module_name(path: Path) -> str:
    parts = ["lightning_eff", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The ``lightning_eff`` modules ``name`` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [source, *subs])
    return {m for m in found if m in modules and m != name and m != "lightning_eff"}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    if top not in RANK:
        raise AssertionError(f"{module}: top-level name {top!r} is in no layer; add it to LAYERS in tests/test_layers.py")
    return RANK[top]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_in_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_upward_imports():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in sorted(graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def test_no_import_cycles():
    # a package __init__ re-exporting its submodules is not a cycle with them: drop submodule -> own package edges
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_catches_a_violation(tmp_path):
    """The checks above can fail: an upward edge and a cycle planted in a copy of the graph are found."""
    edges = graph()
    edges["lightning_eff.batch"] = edges["lightning_eff.batch"] | {"lightning_eff.callbacks.export"}
    assert layer_of("lightning_eff.callbacks.export") > layer_of("lightning_eff.batch")
    edges["lightning_eff.callbacks.export"] = edges["lightning_eff.callbacks.export"] | {"lightning_eff.batch"}
    assert find_cycle(edges) is not None


@pytest.mark.parametrize("source, expected", [
    ("from lightning_eff.measure import count_macs\n", {"lightning_eff.measure"}),
    ("from lightning_eff import export as ex\n", {"lightning_eff.export"}),
    ("def f():\n    from lightning_eff.callbacks.common import example_inputs\n", {"lightning_eff.callbacks.common"}),
])
def test_imports_are_parsed(tmp_path, source, expected):
    path = ROOT / "batch.py"
    fake = tmp_path / "batch.py"
    fake.write_text(source)
    assert imports_of("lightning_eff.batch", fake, set(all_modules())) == expected
    assert path.exists()
