"""The package's layout: imports go one way (no cycle, counting imports inside functions), no
module is over 500 lines, and the lower floors never import the higher ones."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rwkv_ref"
MAX_LINES = 500
# Modules that must stay at the bottom: they import no other rwkv_ref module but these.
FLOORS = {
    "state": set(),
    "files": set(),
    "tokenizer": set(),
    "sampling": set(),
    "kernel": {"state"},
    "scan": {"state"},
    "wkv": {"kernel", "scan", "state"},
    "gpt": {"sampling", "tokenizer"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every rwkv_ref module ``path`` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("rwkv_ref."):
                short = name.removeprefix("rwkv_ref.")
                while short and short not in known:
                    short = short.rpartition(".")[0]
                if short:
                    out.add(short)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) - {"__init__"}
    return {name: imports_of(path, known) - {name} for name, path in mods.items()
            if name != "__init__"}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    g = graph()
    g["state"] = g["state"] | {"model"}         # state -> model -> ... -> state
    assert find_cycle(g) is not None


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_bottom_floors_import_only_lower_ones(name):
    assert graph()[name] <= FLOORS[name], f"rwkv_ref.{name} imports {graph()[name]}"


@pytest.mark.parametrize("name, path", sorted(modules().items()))
def test_no_module_is_over_500_lines(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"rwkv_ref/{path.name} has {lines} lines"
