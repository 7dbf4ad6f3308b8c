"""Validation of the options every regularizer shares.

Each validator takes the user's value and returns the normalized value that the regularizer
stores (so that equal options compare and hash equal), or raises a ``TypeError`` /
``ValueError`` whose message names the option, the value received and what is allowed.
Nothing here touches arrays of a backend: it runs at construction time only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

__all__ = [
    "Field",
    "Target",
    "check_center",
    "check_clip",
    "check_mask_option",
    "check_real",
    "check_reduce",
    "check_target",
]

REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class Field:
    """Select an array stored in ``data`` under ``key`` (a target or a mask).

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


Target: TypeAlias = "Literal['logprobs', 'probs'] | Field"


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_field(option: str, value: object) -> Field | None:
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
                f"{option}=('field', key) needs a non-empty str key, got {_describe(key)}"
            )
        return Field(key)
    return None


def check_target(value: object) -> Target:
    """``"logprobs"``, ``"probs"``, ``Field(key)`` or ``("field", key)``."""
    allowed = "'logprobs', 'probs', Field(key) or ('field', key)"
    field = _as_field("target", value)
    if field is not None:
        return field
    if isinstance(value, str):
        if value in ("logprobs", "probs"):
            return value  # type: ignore[return-value]
        raise ValueError(f"target={value!r} is not a known target; allowed: {allowed}")
    raise TypeError(f"target must be {allowed}, got {_describe(value)}")


def check_reduce(value: object) -> Literal["sum", "mean"]:
    """``"sum"`` or ``"mean"``."""
    if not isinstance(value, str):
        raise TypeError(f"reduce must be 'sum' or 'mean', got {_describe(value)}")
    if value not in REDUCTIONS:
        raise ValueError(f"reduce={value!r} is not a known reduction; allowed: 'sum', 'mean'")
    return value  # type: ignore[return-value]


def check_real(option: str, value: object, *, finite: bool = True) -> float:
    """A real number (Python or NumPy scalar, not bool) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # np.bool_ is not numbers.Real, so it lands here too.
        raise TypeError(f"{option} must be a real number, got {_describe(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float range: as meaningless as inf
        raise ValueError(
            f"{option} must be finite, got {str(value)[:40]}... (beyond float range)"
        ) from None
    if finite and not math.isfinite(result):
        raise ValueError(f"{option} must be finite, got {result!r}")
    return result


def check_center(value: object) -> Literal["mean"] | float | None:
    """``None``, ``"mean"`` or a finite real number."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "mean":
            return "mean"
        raise ValueError(
            f"center={value!r} is not a known center; allowed: None, 'mean' or a finite number"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"center must be None, 'mean' or a finite real number, got {_describe(value)}"
        )
    return check_real("center", value)


def check_clip(value: object) -> tuple[float | None, float | None] | None:
    """``None`` or a pair ``(lo, hi)`` of finite numbers or None, with ``lo <= hi``."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            "clip must be None or a pair (lo, hi) of finite numbers (either may be None), "
            f"got {_describe(value)}"
        )
    lo, hi = (
        None if b is None else check_real(f"clip {name}", b)
        for name, b in zip(("lo", "hi"), value, strict=True)
    )
    if lo is None and hi is None:
        raise ValueError("clip=(None, None) clips nothing; pass clip=None instead")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clip=({lo!r}, {hi!r}) has lo > hi; clip needs lo <= hi")
    return (lo, hi)


def check_mask_option(value: object) -> Hashable:
    """``None``, ``Field(key)`` / ``("field", key)``, or an array (kept by reference)."""
    if value is None:
        return None
    field = _as_field("mask", value)
    if field is not None:
        return field
    if isinstance(value, (str, bytes, numbers.Number, dict)):
        raise TypeError(
            "mask must be None, Field(key), ('field', key), an array or a list of arrays, "
            f"got {_describe(value)}"
        )
    return _ByIdentity(value)


class _ByIdentity:
    """Wraps an array option so the regularizer hashes and compares it by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        shape = getattr(self.value, "shape", None)
        kind = type(self.value).__name__
        return f"<{kind} shape={tuple(shape)}>" if shape is not None else f"<{kind}>"
