"""Declared options: the one declaration from which a regularizer's construction, validation,
equality, hashing, ``repr``, config, pickling and copying follow.

``option(default, check=...)`` in a class body declares an option (see
:class:`regularizers.Regularizer`); :class:`Field` names an array of ``data``. Nothing here
touches arrays of a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "Option", "by_identity", "decode", "encode", "field_of", "option"]


@dataclass(frozen=True)
class Field:
    """Select an array stored in ``data`` under ``key`` (a target, a mask, a reference...).

    ``data`` may be a mapping ``{key: array or list of arrays}`` or a sequence of datum-like
    objects with a ``loss_fn_inputs`` mapping (Tinker's ``Datum``); the field is read from
    every datum, in order.

    Examples
    --------
    >>> import regularizers as rg
    >>> rg.Field("weights")
    Field('weights')
    """

    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise TypeError(f"Field key must be a str, got {type(self.key).__name__} {self.key!r}")
        if not self.key:
            raise ValueError("Field key must be a non-empty str, got ''")

    def __repr__(self) -> str:
        return f"Field({self.key!r})"


def field_of(option: str, value: object) -> Field | None:
    """``Field(k)`` or ``("field", k)`` as a Field; None for anything else."""
    if isinstance(value, Field):
        return value
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and (value[0] == "field")
    ):  # (an array of a pair of masks must never be compared with "field")
        key = value[1]
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"{option}=('field', key) needs a non-empty str key, got "
                f"{type(key).__name__} {key!r}"
            )
        return Field(key)
    return None


class ByIdentity:
    """An array option: the regularizer compares and hashes it by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByIdentity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        if isinstance(self.value, (list, tuple)):
            return f"<{type(self.value).__name__} of {len(self.value)} arrays>"
        shape = getattr(self.value, "shape", None)
        kind = type(self.value).__name__
        return f"<{kind} shape={tuple(shape)}>" if shape is not None else f"<{kind}>"


def by_identity(value: Any) -> ByIdentity:
    return value if isinstance(value, ByIdentity) else ByIdentity(value)


def unwrap(value: Any) -> Any:
    return value.value if isinstance(value, ByIdentity) else value


class Option:
    """One declared option of a regularizer class (made by :func:`option`).

    As a class attribute it reads the instance's stored value; it cannot be set (regularizers
    are immutable: build a new one with the options you want).
    """

    __slots__ = ("check", "default", "doc", "name", "positional")

    def __init__(
        self,
        default: Any,
        *,
        check: Callable[[str, Any], Any] | None = None,
        doc: str = "",
        positional: bool = False,
    ) -> None:
        self.default = default
        self.check = check
        self.doc = doc
        self.positional = positional
        self.name = "<unnamed>"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def declare(self, owner: type) -> None:
        """Validate the default once, when the class is created (a default that its own
        check rejects is a bug of the class: say so now, not at the first call)."""
        try:
            self.default = self.validate(self.default)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{owner.__name__}.{self.name}: the default {self.default!r} fails its own "
                f"check: {exc}"
            ) from exc

    def validate(self, value: Any) -> Any:
        """The normalized value to store, or TypeError / ValueError naming the option."""
        return value if self.check is None else self.check(self.name, value)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return unwrap(obj._opts[self.name])

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(
            f"{type(obj).__name__} is immutable; build a new one with the options you want "
            f"(cannot set {self.name!r})"
        )

    def __repr__(self) -> str:
        return f"option({self.default!r}, check={getattr(self.check, '__name__', None)})"


def option(
    default: Any,
    *,
    check: Callable[[str, Any], Any] | None = None,
    doc: str = "",
    positional: bool = False,
) -> Any:
    """Declare an option of a :class:`~regularizers.Regularizer` subclass.

    Parameters
    ----------
    default : object
        The value when the option is not given (validated by ``check`` when the class is
        created).
    check : callable ``(name, value) -> value``, optional
        Validates and normalizes a value; see :mod:`regularizers.checks`.
    doc : str, optional
        One line for the generated signature's documentation.
    positional : bool, default False
        At most one option per class (the array a penalty compares with, e.g. ``reference``)
        may also be given first by position; every other option is keyword-only.

    Examples
    --------
    >>> import regularizers as rg
    >>> class Cubic(rg.Regularizer):
    ...     scale = rg.option(1.0, check=rg.checks.positive)
    >>> Cubic(scale=2).scale
    2.0
    """
    return Option(default, check=check, doc=doc, positional=positional)


def encode(option: str, value: Any) -> Any:
    """An option value as JSON (Field -> {"field": key}, tuples -> lists)."""
    if isinstance(value, Field):
        return {"field": value.key}
    if isinstance(value, (tuple, list)):
        return [encode(option, v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"option {option}={unwrap(value)!r} cannot go in a config (only None, numbers, strings, "
        "pairs and Field(key)); pass arrays at call time or as a Field"
    )


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, Mapping) and set(value) == {"field"}:
        return Field(value["field"])
    if isinstance(value, list):
        return tuple(decode(v) for v in value)
    return value
