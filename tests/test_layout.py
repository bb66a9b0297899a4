"""The house has no circles: none between modules, none between sibling subpackages, and the
three parts depend one way (runtime on snapshots and agents, snapshots on agents, agents on
neither). Read from the installed package's import statements by grimp (import-linter's
graph builder), imports under ``if TYPE_CHECKING`` aside."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with the dev extra: pip install -e '.[dev]'")

PARTS = ("threadbound.runtime", "threadbound.agents", "threadbound.snapshots", "threadbound.client")
SUBPACKAGES = ("threadbound.runtime.supervisor", "threadbound.runtime.cli", "threadbound.runtime.gateway",
               "threadbound.runtime.metrics", "threadbound.agents.models", "threadbound.agents.sandbox")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PARTS, exclude_type_checking_imports=True, cache_dir=None)


def edges(graph, room) -> set[tuple[str, str]]:
    """The imports between rooms, where ``room`` names the room of a module (None: not counted)."""
    out = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = room(module), room(imported)
            if a and b and a != b:
                out.add((a, b))
    return out


def circles(pairs) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    succ: dict[str, list[str]] = {}
    for a, b in pairs:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert circles({("a", "b"), ("b", "c")}) == []


def test_no_module_imports_itself_through_others(graph):
    found = circles(edges(graph, lambda m: m))
    assert not found, f"import circles between modules: {found}"


def test_sibling_subpackages_import_each_other_one_way_only(graph):
    def room(module: str) -> str | None:
        for sub in SUBPACKAGES:
            if module == sub or module.startswith(sub + "."):
                return sub
        return None  # a part's own top-level modules are the parent room, not a sibling

    found = circles(edges(graph, room))
    assert not found, f"import circles between subpackages: {found}"


def test_the_three_parts_depend_one_way(graph):
    part = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    between = edges(graph, part)
    assert not circles(between)
    assert not {b for a, b in between if a == "threadbound.agents"}, "agents/ imports another part"
    assert ("threadbound.snapshots", "threadbound.runtime") not in between
