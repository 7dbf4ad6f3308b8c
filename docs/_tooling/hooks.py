"""MkDocs hooks: the API reference pages, generated from what ``regularizers`` exports, and
every page in the navigation.

A page of ``docs/`` that ``mkdocs.yml``'s ``nav`` does not list is added to it (a
``penalties-*.md`` page under "Penalties", any other under "Guides"), so that a page a penalty
family adds is never built but unreachable.

Every name of ``regularizers.__all__`` gets an entry, so a penalty that lands in the package
is in the reference without anyone editing a page: regularizer classes on the Penalties page
(grouped by the module family they come from), the extension API on "Writing regularizers",
the functions on "Utilities", and any other class (pipelines, controllers) on "Pipelines and
training". The pages themselves are rendered by mkdocstrings from the docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from mkdocs.structure.files import File, Files

EXTENDING = ["Regularizer", "Batch", "option", "Field", "register", "checks"]
UTILITIES = ["to_floats", "to_config", "from_config"]
MODULES = {  # documented modules beside the top-level names
    "regularizers.testing": "Utilities",
    "regularizers.integrations.tinker": "Utilities",
}
# Penalty families, by source module; a module not listed here goes to "Other penalties".
FAMILIES = {
    "Elementwise: L1 and L2": ["l1", "l2"],
    "Per-token penalties": ["elastic_net", "huber", "sampled_kl", "sampled_entropy"],
    "Penalties over distributions": ["kl", "jsd", "entropy", "z_loss", "consistency"],
    "Weights and gradients": ["orthogonality", "gradient_penalty"],
}
PAGES = {
    "reference/penalties.md": "Penalties",
    "reference/pipeline.md": "Pipelines and training",
    "reference/extending.md": "Writing regularizers",
    "reference/utilities.md": "Utilities",
}
INTRO = {
    "Penalties": (
        "Every built-in penalty, generated from its docstring. Each takes its own options and "
        "the shared ones (`target`, `reduce`, `max_tokens`, `mask`; see "
        "[Regularizer][regularizers.Regularizer]); all have `compute`, `__call__`, "
        "`value_and_grad`, `counts` and `to_config`, documented once on the base class. "
        "What the options mean in general (targets, masks, `reduce` modes, `counts`, gradient "
        "conventions) is on the [contract][concepts] page."
    ),
    "Pipelines and training": (
        "Weighted terms summed into one differentiable loss, and the tools a training loop "
        "uses with them. Gradient norms in a Pipeline's metrics are taken **with respect to "
        "each term's input** (the logprobs or logits you pass), not the model's parameters."
    ),
    "Writing regularizers": (
        "The public machinery every built-in penalty is written with; a guide with a worked "
        "example is [Writing your own regularizer](../custom-regularizers.md)."
    ),
    "Utilities": "Metrics as floats, configs, the conformance kit and the Tinker integration.",
}


def _classify() -> dict[str, list[tuple[str, str]]]:
    """page title -> [(section title or "", mkdocstrings identifier)]."""
    import regularizers as rg

    pages: dict[str, list[tuple[str, str]]] = {title: [] for title in INTRO}
    penalties: dict[str, list[str]] = {family: [] for family in FAMILIES}
    for name in rg.__all__:
        obj = getattr(rg, name)
        ident = f"regularizers.{name}"
        if name in EXTENDING:
            continue
        if name in UTILITIES or not inspect.isclass(obj):
            if name not in UTILITIES and inspect.ismodule(obj):
                pages["Writing regularizers"].append(("", ident))
            else:
                pages["Utilities"].append(("", ident))
        elif issubclass(obj, rg.Regularizer):
            module = obj.__module__.rsplit(".", 1)[-1]
            family = next((f for f, ms in FAMILIES.items() if module in ms), "Other penalties")
            penalties.setdefault(family, []).append(ident)
        else:
            pages["Pipelines and training"].append(("", ident))
    order = {m: i for ms in FAMILIES.values() for i, m in enumerate(ms)}
    for family, idents in penalties.items():
        idents.sort(key=lambda i: order.get(getattr(rg, i.rsplit(".", 1)[1]).__module__, 99))
        pages["Penalties"] += [(family, ident) for ident in idents]
    pages["Writing regularizers"] = [
        ("", f"regularizers.{n}") for n in EXTENDING if n in rg.__all__
    ] + [entry for entry in pages["Writing regularizers"] if entry[1] != "regularizers.checks"]
    pages["Utilities"] = [("", f"regularizers.{n}") for n in UTILITIES if n in rg.__all__] + [
        entry for entry in pages["Utilities"] if entry[1].rsplit(".", 1)[1] not in UTILITIES
    ]
    for module, title in MODULES.items():
        pages[title].append(("", module))
    return pages


def _page(title: str, entries: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", "", INTRO[title], ""]
    section = None
    for heading, ident in entries:
        if heading and heading != section:
            lines += [f"## {heading}", ""]
            section = heading
        level = 3 if heading else 2
        lines += [f"::: {ident}", "    options:", f"      heading_level: {level}", ""]
    return "\n".join(lines)


def _plain(text: str) -> str:
    """A docstring's first paragraph as one table cell (roles as code, no math)."""
    text = re.sub(r":math:`([^`]+)`", r"`\1`", text)
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", text)
    return text.replace("\n", " ").replace("|", "\\|")


def _index(pages: dict[str, list[tuple[str, str]]]) -> str:
    import regularizers as rg

    lines = [
        "# API reference",
        "",
        "Everything `import regularizers as rg` exports, generated from the docstrings. "
        "Conventions shared by every penalty (inputs, masks, `reduce`, `counts`, gradients "
        "at kinks, dtypes, errors) are on the [contract][concepts] page.",
        "",
    ]
    for path, title in PAGES.items():
        lines += [f"## {title}", "", "| name | |", "|---|---|"]
        for _, ident in pages[title]:
            obj: Any
            name = ident.rsplit(".", 1)[1]
            if ident in MODULES:
                obj, shown = importlib.import_module(ident), ident
            else:
                obj, shown = getattr(rg, name), f"rg.{name}"
            summary = _plain((inspect.getdoc(obj) or "").split("\n\n")[0])
            lines.append(f"| [`{shown}`][{ident}] | {summary} |")
        lines.append("")
        del path
    return "\n".join(lines)


def _listed(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(_listed(item) for item in nav)) if nav else set()
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    return set()


def _section(nav: list[Any], title: str) -> list[Any]:
    for item in nav:
        if isinstance(item, dict) and title in item:
            return item[title]  # type: ignore[no-any-return]
    section: list[Any] = []
    nav.append({title: section})
    return section


def on_files(files: Files, config: Any) -> Files:
    nav = config["nav"]
    listed = _listed(nav)
    for page in sorted(files.documentation_pages(), key=lambda f: f.src_uri):
        uri = page.src_uri
        if uri in listed or uri.startswith("reference/"):
            continue
        title = "Penalties" if uri.startswith("penalties") else "Guides"
        _section(nav, title).append(uri)

    pages = _classify()
    for path, title in PAGES.items():
        files.append(File.generated(config, path, content=_page(title, pages[title])))
    files.append(File.generated(config, "reference/index.md", content=_index(pages)))
    return files
