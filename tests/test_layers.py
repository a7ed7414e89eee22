"""The package's shape: layers import only downward, and no import circle (issues 16, 44).

Floors, bottom to top: the base modules (config, errors, stopping, userimport), `data`, `core`,
`execution`, then the product's rooms, one concern each (`training`, `evaluation`, `use`,
`sweeps`, `bench`, `cli`), then the public surface (`api.py`, the package's top, `__main__`).
Every import of the package is counted, at module level or inside a function, so a circle
cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distributed_maml"
FLOORS = ("data", "core", "execution", "training", "evaluation", "use", "sweeps", "bench", "cli")
LAYERS = {name: i + 1 for i, name in enumerate(FLOORS)}  # anything else in the package: 0 (base)
SURFACE = len(FLOORS) + 1
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TOP = {"distributed_maml", "distributed_maml.api"}  # the public surface: the package's top and api.py


def layer(module: str) -> int:
    """0 for the base modules, SURFACE for `python -m distributed_maml` and the public surface
    (the package's own names, api.py), which stand above all."""
    parts = module.split(".")
    if parts[-1] == "__main__" or module in TOP:
        return SURFACE
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from pkg import mod` counts as mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: imports(p, modules) - {m} for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_circle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_a_circle_is_found():
    """The checker itself can fail: a two-module circle and a longer one are reported."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_goes_down_the_layers():
    upward = [
        f"{m} ({layer(m)}) imports {n} ({layer(n)})" for m, deps in graph().items() for n in deps if layer(n) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_an_upward_import_is_found():
    assert layer("distributed_maml.core.maml") > layer("distributed_maml.data.store") > layer("distributed_maml.errors")
    assert (
        layer("distributed_maml.cli.main")
        > layer("distributed_maml.bench.methods")
        > layer("distributed_maml.sweeps.tune")
    )
    assert layer("distributed_maml.use.serving") > layer("distributed_maml.evaluation.evaluate")
    assert layer("distributed_maml.evaluation.evaluate") > layer("distributed_maml.training.train")
    assert layer("distributed_maml.training.train") > layer("distributed_maml.execution.driver")
    assert layer("distributed_maml") > layer("distributed_maml.use.runs")  # the public surface on top


def test_a_room_importing_one_above_it_is_found():
    """The check itself can fail: training importing the use room, or evaluation the CLI."""
    fake = {"distributed_maml.training.train": {"distributed_maml.use.runs", "distributed_maml.data.store"},
            "distributed_maml.evaluation.plots": {"distributed_maml.cli.main"}}  # fmt: skip
    upward = sorted((m, n) for m, deps in fake.items() for n in deps if layer(n) > layer(m))
    assert upward == [
        ("distributed_maml.evaluation.plots", "distributed_maml.cli.main"),
        ("distributed_maml.training.train", "distributed_maml.use.runs"),
    ]


def test_every_package_folder_is_a_floor():
    """A new folder of the package must be given its floor here (else it would count as the base)."""
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"config", *FLOORS}, folders ^ {"config", *FLOORS}


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


if __name__ == "__main__":  # docs/architecture.md's table: which layer imports which
    names = {0: "base", **{i + 1: f for i, f in enumerate(FLOORS)}, SURFACE: "api, __main__"}
    edges: dict[int, set[int]] = {}
    for m, deps in graph().items():
        edges.setdefault(layer(m), set()).update(layer(n) for n in deps if layer(n) != layer(m))
    for src in sorted(edges, reverse=True):
        print(f"{names[src]:>10} -> {', '.join(names[d] for d in sorted(edges[src], reverse=True)) or '-'}")
