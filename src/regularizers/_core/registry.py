"""The one registry of regularizer classes: registered name -> class.

A class is registered where it is defined (``class Cubic(rg.Regularizer, name="cubic")``);
:func:`lookup` accepts the registered name or the class name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["lookup", "register", "registered"]

_BY_NAME: dict[str, type] = {}


def register(cls: type, name: str) -> None:
    """Record ``cls`` under ``name``; another class under a taken name is a ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}: name= must be a non-empty str, got {name!r}")
    known = _BY_NAME.get(name)
    if known is not None and known is not cls and not _same_class(known, cls):
        raise ValueError(
            f"the name {name!r} is already registered to {known.__module__}.{known.__qualname__}"
        )
    _BY_NAME[name] = cls


def _same_class(a: type, b: type) -> bool:
    # A module re-executed (importlib.reload, a notebook cell run twice) redefines the class.
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def lookup(name: str) -> Any:
    """The class registered under ``name``, or whose class name is ``name``; None if none."""
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls
    matches = [c for c in _BY_NAME.values() if c.__name__ == name]
    return matches[0] if len(matches) == 1 else None


def registered() -> dict[str, type]:
    """A copy of the registry: registered name -> class."""
    return dict(_BY_NAME)
