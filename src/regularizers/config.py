"""Configs: regularizers and pipelines as JSON-serializable dicts, and back.

``{"regularizer": "l2_weight_decay", "options": {"center": "mean", "clip": [-100.0, 0.0]}}``
names a registered class by its registered name (or its class name); a pipeline is
``{"pipeline": {...}}``. Floats survive a JSON round trip exactly (Python writes the shortest
repr that reads back equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ._core import registry
from ._core.base import Regularizer
from ._core.options import decode
from .pipeline import Pipeline, Term

__all__ = ["from_config", "register", "to_config"]

R = TypeVar("R", bound=type[Regularizer])


def register(cls: R) -> R:
    """Register a class under its ``name`` attribute (usable as a decorator).

    Classes declared with ``class C(rg.Regularizer, name="...")`` are registered already;
    this is for classes that set ``name = "..."`` in their body instead.
    """
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise TypeError(f"register needs a subclass of regularizers.Regularizer, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a class attribute name = '...' to register")
    registry.register(cls, name)
    return cls


def to_config(obj: Regularizer | Pipeline) -> dict[str, Any]:
    """A JSON-serializable dict from which :func:`from_config` rebuilds an equal object."""
    if isinstance(obj, (Regularizer, Pipeline)):
        return obj.to_config()
    raise TypeError(f"to_config takes a regularizer or a Pipeline, got {type(obj).__name__}")


def from_config(config: Mapping[str, Any]) -> Regularizer | Pipeline:
    """Rebuild a regularizer or a Pipeline from :func:`to_config`'s dict."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    if "pipeline" in config:
        p = config["pipeline"]
        terms = [
            Term(
                _regularizer(t["regularizer"]),
                t["weight"],
                name=t.get("name"),
                enabled=t.get("enabled", True),
                input=t.get("input", "logprobs"),
            )
            for t in p["terms"]
        ]
        base = p.get("base_loss")
        return Pipeline(
            terms,
            base_loss=None if base is None else _regularizer(base),
            track_grad_norms=p.get("track_grad_norms", False),
            metrics=p.get("metrics", "float"),
        )
    return _regularizer(config)


def _regularizer(config: Mapping[str, Any]) -> Regularizer:
    if not isinstance(config, Mapping) or "regularizer" not in config:
        raise ValueError(f"a regularizer config needs a 'regularizer' key, got {config!r}")
    name = config["regularizer"]
    cls = registry.lookup(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown regularizer {name!r}; known: {', '.join(sorted(registry.registered()))} "
            "(declare yours with class C(rg.Regularizer, name='...'))"
        )
    options = {k: decode(v) for k, v in config.get("options", {}).items()}
    return cls(**options)  # type: ignore[no-any-return]
