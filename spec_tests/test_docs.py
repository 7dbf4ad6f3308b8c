"""Every Python code block of README.md and docs/ runs, in order, page by page.

Blocks on one page share a namespace (a page reads top to bottom). A block preceded by the
line ``<!-- fragment -->`` is an excerpt that cannot run alone (e.g. it needs a Tinker
training client) and is skipped; few are. Collected with ``--docs`` (the ``tests-docs``
session installs every backend the pages use).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every runnable Python block of a page."""
    out = []
    for m in BLOCK.finditer(text):
        if m.group("before").strip() == "<!-- fragment -->":
            continue
        out.append((text[: m.start("code")].count("\n") + 1, m.group("code")))
    return out


def run_page(path: Path) -> int:
    # A real module, so that classes a page defines pickle (the conformance kit checks it).
    name = "docs_" + re.sub(r"\W", "_", path.stem)
    module = types.ModuleType(name)
    sys.modules[name] = module
    found = blocks(path.read_text())
    try:
        for line, code in found:
            try:
                exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), module.__dict__)
            except Exception as exc:
                raise AssertionError(
                    f"{path.relative_to(ROOT)}, the block at line {line} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    finally:
        del sys.modules[name]
    return len(found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_page(page)


def test_a_broken_block_fails(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("# A page\n\n```python\nx = 1\n```\n\n```python\nx = undefined_name\n```\n")
    with pytest.raises(AssertionError, match=r"broken.md.*line 8.*NameError"):
        run_page_at(page)


def test_fragments_are_few() -> None:
    marked = sum(p.read_text().count("<!-- fragment -->") for p in PAGES)
    total = sum(p.read_text().count("```python") for p in PAGES)
    assert marked <= max(3, total // 8), f"{marked} of {total} blocks are fragments"


# What a user of the package or a reader of the site does not have: the contract's source
# file and its section numbers (the docs' contract page says it in its own words instead).
NOT_THEIRS = re.compile(r"\bSPEC\b|SPEC\.md|shared/SPEC|seeds/ADR")


def test_no_doc_or_docstring_points_at_files_users_do_not_have() -> None:
    sources = [*PAGES, *sorted((ROOT / "src").rglob("*.py"))]
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NOT_THEIRS.search(line)
    ]
    assert not found, "link to the contract page instead:\n" + "\n".join(found)


def test_every_built_in_penalty_has_a_figure() -> None:
    """Each exported regularizer is drawn, with its gradient, by a script of docs/plots/
    (run by ``nox -s docs`` before every build)."""
    import regularizers as rg

    scripts = "\n".join(p.read_text() for p in (ROOT / "docs" / "plots").glob("*.py"))
    exported = [
        name
        for name in rg.__all__
        if isinstance(obj := getattr(rg, name), type)
        and issubclass(obj, rg.Regularizer)
        and obj is not rg.Regularizer
    ]
    undrawn = [name for name in exported if not re.search(rf"\brg\.{name}\b", scripts)]
    assert not undrawn, f"no script of docs/plots/ draws {undrawn}"


def run_page_at(path: Path) -> int:
    """run_page for a page outside the repository (the self-test above)."""
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return run_page(path)
    finally:
        ROOT = saved
