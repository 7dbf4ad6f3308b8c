"""Configs: regularizers and pipelines as JSON-serializable dicts, and back.

``{"regularizer": "l2_weight_decay", "options": {"center": "mean", "clip": [-100.0, 0.0]}}``
names a registered class by its ``name``; a pipeline is ``{"pipeline": {...}}``. Floats
survive a JSON round trip exactly (Python writes the shortest repr that reads back equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ._base import Regularizer
from ._options import Field
from .l1 import L1
from .l2 import L2
from .pipeline import Pipeline, Term

__all__ = ["from_config", "register", "to_config"]

R = TypeVar("R", bound=type[Regularizer])
_REGISTRY: dict[str, type[Regularizer]] = {}


def register(cls: R) -> R:
    """Make a regularizer class known to :func:`from_config` under its ``name``.

    Usable as a class decorator. Registering another class under a taken name is an error.
    """
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise TypeError(f"register needs a subclass of regularizers.Regularizer, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a class attribute name = '...' to register")
    known = _REGISTRY.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"the name {name!r} is already registered to {known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


register(L1)
register(L2)


def _encode(option: str, value: Any) -> Any:
    if isinstance(value, Field):
        return {"field": value.key}
    if isinstance(value, (tuple, list)):
        return [_encode(option, v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"option {option}={value!r} cannot go in a config (only None, numbers, strings, pairs "
        "and Field(key)); an array mask must be passed at call time or as a Field"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) == {"field"}:
        return Field(value["field"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def to_config(obj: Regularizer | Pipeline) -> dict[str, Any]:
    """A JSON-serializable dict from which :func:`from_config` rebuilds an equal object."""
    if isinstance(obj, Pipeline):
        terms = []
        for t in obj.terms:
            if not isinstance(t.regularizer, Regularizer):
                raise TypeError(
                    f"term {t.name!r} is a {type(t.regularizer).__name__}, not a registered "
                    "regularizer, so it cannot go in a config"
                )
            terms.append(
                {"regularizer": to_config(t.regularizer), "weight": t.weight, "name": t.name}
            )
        base = obj.base_loss
        if base is not None and not isinstance(base, Regularizer):
            raise TypeError(
                f"base_loss is a {type(base).__name__}, not a registered "
                "regularizer, so it cannot go in a config"
            )
        return {
            "pipeline": {
                "terms": terms,
                "base_loss": None if base is None else to_config(base),
                "track_grad_norms": obj.track_grad_norms,
                "metrics": obj.metrics,
            }
        }
    if isinstance(obj, Regularizer):
        if _REGISTRY.get(obj.name) is not type(obj):
            raise TypeError(
                f"{type(obj).__qualname__} is not registered; call "
                "regularizers.register on it first"
            )
        return {
            "regularizer": obj.name,
            "options": {k: _encode(k, v) for k, v in obj.options().items()},
        }
    raise TypeError(f"to_config takes a regularizer or a Pipeline, got {type(obj).__name__}")


def from_config(config: Mapping[str, Any]) -> Regularizer | Pipeline:
    """Rebuild a regularizer or a Pipeline from :func:`to_config`'s dict."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    if "pipeline" in config:
        p = config["pipeline"]
        terms = [
            Term(_regularizer(t["regularizer"]), t["weight"], t.get("name")) for t in p["terms"]
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
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"unknown regularizer {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(regularizers.register adds your own)"
        )
    options = {k: _decode(v) for k, v in config.get("options", {}).items()}
    return cls(**options)
