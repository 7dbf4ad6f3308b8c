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

from .backends import device_of, max_
from .typing import Array, Namespace

__all__ = ["abs_", "clamp", "clip_", "inside_clip", "row_norm_parts", "row_norms", "scalar"]


def scalar(xp: Namespace, value: float, like: Array) -> Array:
    """A 0-d array of ``like``'s dtype and device (no Python-scalar promotion surprises).

    A finite ``value`` beyond the dtype's range (``clip=(-1e300, 0)`` on float32) becomes the
    dtype's largest finite value of that sign, not an overflowing cast. Made by ``full``, a
    fill on the device: ``asarray`` of a number is a host-to-device copy, and on CUDA one
    waits for the kernels already queued.
    """
    value = clamp(value, float(xp.finfo(like.dtype).max))
    return xp.full((), value, dtype=like.dtype, device=device_of(like))


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


def row_norms(xp: Namespace, g: Array) -> tuple[Array, Array]:
    """``(‖g‖₂ per row, g / ‖g‖₂)`` over the last axis; a zero row has norm 0 and unit 0.

    Scaled by the row's largest magnitude ``a``: ``‖g‖ = a ‖g / a‖`` with ``‖g / a‖`` in
    ``[1, √D]``, so nothing overflows or underflows on the way. Zero rows take ``a = 1`` and
    ``sqrt(1)`` inside (the double ``where``): their norm is 0 with derivative 0 under any
    autodiff, never ``0 · inf``. The derivative through ``a`` itself is 0 (the norm is
    homogeneous), so autodiff sees ``g / ‖g‖``. A row holding NaN has norm NaN, one holding
    ±inf norm inf and unit NaN (no direction), without a floating-point warning on the way.
    """
    if g.shape[0] == 0:  # no rows (a static shape): Dask mishandles reducing empty chunks
        return xp.sum(g, axis=-1), g  # [0] and [0, D], still in autodiff's graph
    norm, scale, r = row_norm_parts(xp, g)
    h = g / xp.expand_dims(scale, axis=-1)
    one = xp.ones_like(r)
    finite = xp.expand_dims(xp.isfinite(r), axis=-1)
    safe_r = xp.expand_dims(xp.where(xp.isfinite(r), r, one), axis=-1)
    nan = xp.full((), xp.nan, dtype=g.dtype, device=device_of(g))
    return norm, xp.where(finite, h / safe_r, nan)


def row_norm_parts(xp: Namespace, g: Array) -> tuple[Array, Array, Array]:
    """``(‖g‖, a, r)`` per row of a non-empty ``g``, as :func:`row_norms` makes them: the
    row's scale ``a`` (its largest magnitude; 1 on a zero or non-finite row) and
    ``r = ‖g / a‖`` (1 on a zero row), so that the unit vector is ``(g / a) / r``."""
    a = max_(xp, abs_(xp, g), axis=-1)  # NaN stays NaN (XLA's own max drops it)
    nonzero = a != 0  # NaN counts as nonzero, so it propagates
    one = xp.ones_like(a)
    scale = xp.where(xp.logical_and(nonzero, xp.isfinite(a)), a, one)  # inf / inf: never
    h = g / xp.expand_dims(scale, axis=-1)
    r = xp.sqrt(xp.where(nonzero, xp.sum(h * h, axis=-1), one))
    norm = xp.where(nonzero, a * r, xp.zeros_like(a))
    return norm, scale, r
