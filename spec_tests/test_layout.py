"""The architecture, checked: no import cycles, and every penalty complete.

- The package's module graph (every relative import, function-level ones included) has no
  cycle.
- Every regularizer that ``regularizers`` exports is registered, has a float64 reference
  (``reference.REFERENCES``), a case strategy (``strategies.CASES``) and a docs entry
  (``rg.<Class>`` in a page of ``docs/``); a new penalty that misses one fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import regularizers as rg
from regularizers._core import registry

from . import strategies as S
from .reference import REFERENCES

PACKAGE = Path(rg.__file__).parent
DOCS = Path(__file__).parent.parent / "docs"
SPEC_TESTS = Path(__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import y`` resolves to ``.x.y``
    when that is a module, as Python does)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                graph[name].add(sub if sub in modules else target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_module_graph_has_no_cycle() -> None:
    graph = import_graph()
    # the package's own __init__ imports everything; nothing inside may import it back
    package = PACKAGE.name
    back = sorted(m for m, deps in graph.items() if package in deps and m != package)
    assert not back, f"modules importing the package root (a cycle through __init__): {back}"
    cycle = find_cycle({m: d for m, d in graph.items() if m != package})
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def exported_regularizers() -> list[type]:
    return [
        obj
        for name in rg.__all__
        if isinstance(obj := getattr(rg, name), type)
        and issubclass(obj, rg.Regularizer)
        and obj is not rg.Regularizer
    ]


def documented() -> str:
    return "\n".join(p.read_text() for p in DOCS.rglob("*.md"))


def missing_pieces(cls: type, docs: str) -> list[str]:
    missing = []
    if registry.lookup(cls.name) is not cls:
        missing.append("the registry (declare it with name=...)")
    if cls not in REFERENCES:
        missing.append("spec_tests/reference.py (@reference_for)")
    if cls not in S.CASES:
        missing.append("spec_tests/strategies.py (@cases_for)")
    if f"rg.{cls.__name__}" not in docs:
        missing.append(f"docs/ (no page mentions rg.{cls.__name__})")
    tests = SPEC_TESTS / f"test_{cls.__module__.rsplit('.', 1)[-1]}.py"
    if not tests.is_file():
        missing.append(f"spec_tests/{tests.name} (its own test module)")
    return missing


@pytest.mark.parametrize("cls", exported_regularizers(), ids=lambda c: c.__name__)
def test_every_exported_regularizer_is_complete(cls: type) -> None:
    missing = missing_pieces(cls, documented())
    assert not missing, f"{cls.__name__} is missing from: {', '.join(missing)}"


def test_the_completeness_check_notices_a_missing_piece() -> None:
    class Unfinished(rg.Regularizer, name="test_unfinished"):
        pass

    missing = missing_pieces(Unfinished, documented())
    assert len(missing) == 4  # registered, but no reference, strategy, docs or test module
    assert "L1" in [c.__name__ for c in exported_regularizers()]


def test_the_layout_shows_the_architecture() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {"penalties", "_core", "_fastpath", "integrations"} <= folders
    for cls in exported_regularizers():
        assert cls.__module__.startswith(f"{PACKAGE.name}.penalties."), cls
    # one typing module: no other module defines Array
    defining = [
        p.name
        for p in PACKAGE.rglob("*.py")
        if any(
            line.startswith(("Array = ", "Array: TypeAlias")) for line in p.read_text().splitlines()
        )
    ]
    assert defining == ["typing.py"], defining
