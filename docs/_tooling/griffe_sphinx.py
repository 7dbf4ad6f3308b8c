"""A griffe extension: the package's docstrings, as a docs site renders them.

The docstrings are numpydoc with a few reStructuredText constructs that read well in
``help()`` and in an editor, but that Markdown does not know. Before mkdocstrings parses
them, this rewrites (in memory only; the sources are untouched):

- ``.. math::`` blocks into ``$$ ... $$`` and ``:math:`x``` into ``$x$`` (arithmatex);
- ``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:mod:`` roles into cross-references to the
  API reference (resolved against the object's class and module, then the package; a name
  the site does not render stays plain code);
- ``:doc:`page``` into a link to that page's first heading (``{ #page }``);
- a paragraph ending in ``::`` followed by an indented block into a fenced Python block;
- an unknown numpydoc section (``Shared options``) of ``name : type`` entries into a list.

It also gives the classes whose signature is built at run time (every ``Regularizer``
subclass sets ``__signature__`` from its declared options) that signature, so the reference
shows ``L2(*, target='logprobs', reduce='sum', center=None, clip=None, ...)`` instead of
``L2(*args, **kwargs)``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?P<role>func|class|meth|attr|mod|obj|data|exc):`(?P<tilde>~?)(?P<target>[^`]+)`"
)
MATH = re.compile(r":math:`(?P<tex>[^`]+)`")
DOC = re.compile(r":doc:`(?P<page>[^`<]+?)(?:\s*<(?P<target>[^>]+)>)?`")
SECTION = re.compile(r"^(?P<indent>\s*)(?P<title>[A-Z][A-Za-z ]+)\n(?P=indent)-{3,}\s*$", re.M)
KNOWN_SECTIONS = {
    "Parameters", "Other Parameters", "Returns", "Yields", "Receives", "Raises", "Warns",
    "Warnings", "See Also", "Notes", "References", "Examples", "Attributes", "Methods",
    "Functions", "Classes", "Modules", "Deprecated",
}  # fmt: skip


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(text: str) -> str:
    """``.. math::`` and ``::`` literal blocks into Markdown blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        math = stripped == ".. math::"
        literal = not math and stripped.endswith("::") and not stripped.startswith("..")
        if not (math or literal):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        body: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
            j -= 1
        content = [b for b in body if b.strip()]
        if not content:
            out.append(line)
            i += 1
            continue
        inner = min(_indent(b) for b in content)
        code = [b[inner:] if b.strip() else "" for b in body]
        while code and not code[0]:
            code.pop(0)
        pad = " " * base
        if math:
            out += [f"{pad}$$", *(pad + c if c else "" for c in code), f"{pad}$$"]
        else:
            head = line.rstrip()[:-2].rstrip()
            if head:  # "write this::" -> "write this:"
                out += [line.rstrip()[:-1], ""]
            out += [f"{pad}```python", *(pad + c if c else "" for c in code), f"{pad}```"]
        i = j
    return "\n".join(out)


def _unknown_sections(text: str) -> str:
    """``name : type`` entries of a section numpydoc does not know into a Markdown list."""
    parts = list(SECTION.finditer(text))
    for m in reversed(parts):
        if m.group("title") in KNOWN_SECTIONS:
            continue
        start, end = m.end(), len(text)
        nxt = SECTION.search(text, m.end())
        if nxt:
            end = nxt.start()
        items: list[str] = []
        for line in text[start:end].strip("\n").split("\n"):
            entry = re.match(r"^(\w+) : (.*)$", line.strip())
            if entry and _indent(line) == len(m.group("indent")):
                items.append(f"- `{entry[1]}` ({entry[2]})")
            elif line.strip() and items:
                items[-1] += (": " if items[-1].endswith(")") else " ") + line.strip()
        body = "\n".join(items)
        text = text[: m.start()] + f"**{m.group('title')}**\n\n{body}\n\n" + text[end:]
    return text


class SphinxRoles(griffe.Extension):
    """Rewrites the docstrings of the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.pkg = pkg
        self.public = self._public_paths(pkg)
        for obj in self._walk(pkg):
            self._signature(obj)
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj.docstring.value, obj)

    # -- walking and resolving -------------------------------------------------------------

    def _walk(self, obj: griffe.Object) -> list[griffe.Object]:
        found = [obj]
        for member in obj.members.values():
            if member.is_alias:
                continue
            found += self._walk(member)  # type: ignore[arg-type]
        return found

    def _public_paths(self, pkg: griffe.Module) -> dict[str, str]:
        """canonical path -> the path under which the reference renders it."""
        out: dict[str, str] = {}
        for name, member in pkg.members.items():
            if name.startswith("_"):
                continue
            try:
                out[member.canonical_path] = f"{pkg.path}.{name}"
            except griffe.AliasResolutionError:
                continue
        return out

    def _public(self, path: str) -> str:
        for canonical, public in sorted(self.public.items(), key=lambda kv: -len(kv[0])):
            if path == canonical or path.startswith(canonical + "."):
                return public + path[len(canonical) :]
        return path

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        scopes: list[griffe.Object] = []
        scope: griffe.Object | None = obj
        while scope is not None:
            scopes.append(scope)
            scope = scope.parent  # type: ignore[assignment]
        candidates = [target] + [f"{s.path}.{target}" for s in scopes]
        candidates.append(f"{self.pkg.path}.{target}")
        for path in candidates:
            head, _, rest = path.partition(".")
            if head != self.pkg.path:
                continue
            try:
                found = self.pkg[rest] if rest else self.pkg
            except (KeyError, griffe.AliasResolutionError):
                continue
            try:
                return self._public(found.canonical_path)
            except griffe.AliasResolutionError:
                continue
        return None

    # -- rewriting ---------------------------------------------------------------------------

    def rewrite(self, text: str, obj: griffe.Object) -> str:
        text = _unknown_sections(_blocks(text))
        text = MATH.sub(lambda m: f"${m['tex'].strip()}$", text)

        def page(m: re.Match[str]) -> str:
            title, target = m["page"].strip(), (m["target"] or m["page"]).strip()
            return f"[{title}][{target.rsplit('/', 1)[-1]}]"

        text = DOC.sub(page, text)

        def role(m: re.Match[str]) -> str:
            target = m["target"].strip()
            shown = target.rsplit(".", 1)[-1] if m["tilde"] else target
            if m["role"] in ("func", "meth"):
                shown += "()"
            path = self._resolve(target, obj)
            if path is None:
                return f"`{shown}`"
            return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

        return ROLE.sub(role, text)

    # -- signatures built at run time ----------------------------------------------------

    def _signature(self, obj: griffe.Object) -> None:
        if not obj.is_class or "__signature__" in obj.members:
            return
        try:
            module = importlib.import_module(obj.module.path)
            runtime = getattr(module, obj.name)
        except (ImportError, AttributeError):
            return
        if "__signature__" not in vars(runtime):
            return
        sig = inspect.signature(runtime)
        kinds = {
            inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
            inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
            inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
            inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
            inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
        }
        params = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
        for p in sig.parameters.values():
            default = None if p.default is p.empty else repr(p.default)
            params.append(griffe.Parameter(p.name, kind=kinds[p.kind], default=default))
        init = griffe.Function("__init__", parameters=griffe.Parameters(*params))
        init.parent = obj  # type: ignore[assignment]
        obj.set_member("__init__", init)  # type: ignore[attr-defined]
