"""Validators for declared options: ``check(option_name, value) -> normalized value``.

Each check returns the value the regularizer stores (normalized, so that equal options compare
and hash equal) or raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
wrong value) whose message names the option, the value received and what is allowed. Checks
run at construction only; none touches an array of a backend.

Use them in :func:`regularizers.option` declarations, or write your own with the same
signature::

    class Cubic(rg.Regularizer, name="cubic"):
        scale = rg.option(1.0, check=rg.checks.positive)

Examples
--------
>>> import regularizers as rg
>>> rg.checks.positive("scale", 2)
2.0
>>> rg.checks.one_of("sum", "mean")("reduce", "mean")
'mean'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, TypeAlias

from ._core.options import by_identity, field_of

__all__ = [
    "Check",
    "axis",
    "boolean",
    "center",
    "interval",
    "mask",
    "nonnegative",
    "one_of",
    "open_unit_interval",
    "operand",
    "optional",
    "positive",
    "positive_int",
    "real",
    "reduce",
    "target",
    "unit_interval",
]

Check: TypeAlias = Callable[[str, Any], Any]
"""``(option name, value) -> normalized value``; raises TypeError / ValueError."""

REDUCTIONS = (
    "sum",
    "mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
ALIASES = {"token-mean": "mean"}


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def real(option: str, value: object) -> float:
    """A finite real number (Python or NumPy scalar, not bool), as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # np.bool_ is not numbers.Real, so it lands here too.
        raise TypeError(f"{option} must be a real number, got {_describe(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float range: as meaningless as inf
        raise ValueError(
            f"{option} must be finite, got {str(value)[:40]}... (beyond float range)"
        ) from None
    if not math.isfinite(result):
        raise ValueError(f"{option} must be finite, got {result!r}")
    return result


def positive(option: str, value: object) -> float:
    """A finite real number > 0."""
    v = real(option, value)
    if v <= 0:
        raise ValueError(f"{option} must be > 0, got {v!r}")
    return v


def nonnegative(option: str, value: object) -> float:
    """A finite real number >= 0."""
    v = real(option, value)
    if v < 0:
        raise ValueError(f"{option} must be >= 0, got {v!r}")
    return v


def unit_interval(option: str, value: object) -> float:
    """A real number in [0, 1]."""
    v = real(option, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{option} must be in [0, 1], got {v!r}")
    return v


def open_unit_interval(option: str, value: object) -> float:
    """A real number in (0, 1), ends excluded."""
    v = real(option, value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{option} must be in (0, 1), ends excluded, got {v!r}")
    return v


def positive_int(option: str, value: object) -> int:
    """An integer >= 1 (not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{option} must be an integer >= 1, got {_describe(value)}")
    if int(value) < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {int(value)!r}")
    return int(value)


def axis(option: str, value: object) -> int:
    """An integer axis (not bool), negative counting from the end; its range is checked
    against each call's input."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{option} must be an integer axis, got {_describe(value)}")
    return int(value)


def boolean(option: str, value: object) -> bool:
    """``True`` or ``False`` (not 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{option} must be True or False, got {_describe(value)}")
    return value


def one_of(*choices: str) -> Check:
    """A check accepting exactly one of the given strings."""
    allowed = ", ".join(map(repr, choices))

    def check(option: str, value: object) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{option} must be one of {allowed}, got {_describe(value)}")
        if value not in choices:
            raise ValueError(f"{option}={value!r} is not known; allowed: {allowed}")
        return value

    check.__doc__ = f"One of {allowed}."
    return check


def optional(inner: Check) -> Check:
    """``None``, or what ``inner`` accepts."""

    def check(option: str, value: object) -> Any:
        return None if value is None else inner(option, value)

    check.__doc__ = f"None, or: {inner.__doc__ or inner.__name__}"
    return check


def reduce(option: str, value: object) -> str:
    """One of the aggregation modes (``"token-mean"`` is stored as ``"mean"``)."""
    allowed = ", ".join(map(repr, (*REDUCTIONS, *ALIASES)))
    if not isinstance(value, str):
        raise TypeError(f"{option} must be one of {allowed}, got {_describe(value)}")
    value = ALIASES.get(value, value)
    if value not in REDUCTIONS:
        raise ValueError(f"{option}={value!r} is not a known reduction; allowed: {allowed}")
    return value


def target(option: str, value: object) -> Any:
    """``"logprobs"``, ``"probs"``, ``Field(key)`` or ``("field", key)``."""
    allowed = "'logprobs', 'probs', Field(key) or ('field', key)"
    field = field_of(option, value)
    if field is not None:
        return field
    if isinstance(value, str):
        if value in ("logprobs", "probs"):
            return value
        raise ValueError(f"{option}={value!r} is not a known target; allowed: {allowed}")
    raise TypeError(f"{option} must be {allowed}, got {_describe(value)}")


def center(option: str, value: object) -> Any:
    """``None``, ``"mean"`` or a finite real number."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "mean":
            return "mean"
        raise ValueError(
            f"{option}={value!r} is not known; allowed: None, 'mean' or a finite number"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{option} must be None, 'mean' or a finite real number, got {_describe(value)}"
        )
    return real(option, value)


def interval(option: str, value: object) -> tuple[float | None, float | None] | None:
    """``None`` or a pair ``(lo, hi)`` of finite numbers or None, with ``lo <= hi``."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            f"{option} must be None or a pair (lo, hi) of finite numbers (either may be None), "
            f"got {_describe(value)}"
        )
    lo, hi = (
        None if b is None else real(f"{option} {name}", b)
        for name, b in zip(("lo", "hi"), value, strict=True)
    )
    if lo is None and hi is None:
        raise ValueError(f"{option}=(None, None) clips nothing; pass {option}=None instead")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{option}=({lo!r}, {hi!r}) has lo > hi; {option} needs lo <= hi")
    return (lo, hi)


def mask(option: str, value: object) -> Any:
    """``None``, ``Field(key)`` / ``("field", key)``, or an array / list (kept by identity)."""
    if value is None:
        return None
    return operand(option, value)


def operand(option: str, value: object) -> Any:
    """``Field(key)`` / ``("field", key)`` read from ``data``, or an array or list of arrays
    (kept by identity: the regularizer compares and hashes it by ``id``)."""
    field = field_of(option, value)
    if field is not None:
        return field
    if value is None or isinstance(value, (str, bytes, numbers.Number, dict)):
        raise TypeError(
            f"{option} must be Field(key), ('field', key), an array or a list of arrays, "
            f"got {_describe(value)}"
        )
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{option} is an empty {type(value).__name__}; pass arrays or a Field")
    return by_identity(value)
