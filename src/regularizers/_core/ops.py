"""Elementwise operations with the library's gradient conventions (the docs' contract page).

Backends disagree on derivatives at kinks (JAX's ``abs`` has slope 1 at 0; ``clip`` has slope
1 at the bounds in torch and 0.5 in JAX). These helpers are built from standard operations
whose derivatives every autodiff system agrees on, so that ``compute`` differentiated by torch
or JAX, and the closed form of ``value_and_grad``, give one answer everywhere:

- ``abs_(x) = x * sign(x)``: d/dx = sign(x) + x * 0 = sign(x), hence 0 at x = 0. The value is
  exactly ``|x|`` (multiplying by -1, 0 or 1 is exact), ``+inf`` at ``-inf``, NaN at NaN.
- ``clip_(x)`` selects with ``where``: the gradient flows to ``x`` wherever ``x`` itself is
  selected (``lo <= x <= hi``, bounds included, and NaN) and is 0 strictly outside.
"""

from __future__ import annotations

import array_api_compat

from .typing import Array, Namespace

__all__ = ["abs_", "clamp", "clip_", "inside_clip", "scalar"]


def scalar(xp: Namespace, value: float, like: Array) -> Array:
    """A 0-d array of ``like``'s dtype and device (no Python-scalar promotion surprises).

    A finite ``value`` beyond the dtype's range (``clip=(-1e300, 0)`` on float32) becomes the
    dtype's largest finite value of that sign, not an overflowing cast.
    """
    value = clamp(value, float(xp.finfo(like.dtype).max))
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))


def clamp(value: float, top: float) -> float:
    """``value`` limited to ``[-top, top]`` (a bound beyond a dtype's range, as its max)."""
    return min(max(value, -top), top)


def abs_(xp: Namespace, x: Array) -> Array:
    """``|x|`` whose derivative is ``sign(x)``, 0 at 0, under any autodiff."""
    return x * xp.sign(x)


def clip_(xp: Namespace, x: Array, lo: float | None, hi: float | None) -> Array:
    """Clip ``x`` to ``[lo, hi]``; slope 1 for ``lo <= x <= hi``, 0 strictly outside."""
    if hi is not None:
        h = scalar(xp, hi, x)
        x = xp.where(x > h, h, x)
    if lo is not None:
        lo_ = scalar(xp, lo, x)
        x = xp.where(x < lo_, lo_, x)
    return x


def inside_clip(xp: Namespace, x: Array, lo: float | None, hi: float | None) -> Array | None:
    """Where ``clip_`` passes the gradient (NaN counts as inside); None for everywhere."""
    outside = None
    if lo is not None:
        outside = x < scalar(xp, lo, x)
    if hi is not None:
        above = x > scalar(xp, hi, x)
        outside = above if outside is None else xp.logical_or(outside, above)
    return None if outside is None else xp.logical_not(outside)
