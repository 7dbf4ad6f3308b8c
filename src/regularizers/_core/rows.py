"""The maths of rows of scores along the last axis, NaN-free under -inf classes.

:func:`log_normalize`, :func:`log_softmax`, :func:`entropy_rows`, :func:`kl_rows` and
:func:`jsd_rows` with the conventions that
``distributions`` documents (the double ``where``, ``log p = 0`` at -inf classes, +inf with
gradient 0 for a support gap), and Consistency's comparisons (:func:`elementwise`,
:func:`cosine_rows`). Here, apart from the penalties' machinery, so that the JAX closed form
(``_fastpath``) can use the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .backends import device_of, stop_gradient
from .ops import abs_
from .typing import Array, Namespace

__all__ = [
    "const",
    "cosine_rows",
    "elementwise",
    "entropy_rows",
    "exp_normalize",
    "jsd_rows",
    "kl_rows",
    "log_normalize",
    "log_softmax",
]


def const(xp: Namespace, value: float, like: Array) -> Array:
    """A 0-d array of ``like``'s dtype and device (``inf`` allowed)."""
    return xp.full((), value, dtype=like.dtype, device=device_of(like))


def log_normalize(xp: Namespace, z: Array) -> tuple[Array, Array]:
    """``(z - lse, lse)`` of rows ``z`` along the last axis: the raw log-softmax (-inf at
    -inf classes) and the log-sum-exp, shaped ``[..., 1]`` (0 for a row of all -inf), NaN-free.

    The raw log-softmax is ``(z - m) - log s`` with ``m`` the row's max and ``s = Σ exp(z -
    m)``, not ``z - (m + log s)``: ``m + log s`` rounds to a unit of ``m``, which is large
    beside ``log s`` for logits far from 0 (float32 logits near 40: a unit of 4e-6, and
    ``Σ p`` off 1 by 2e-6 against 2e-7; near 2^30, ``log 2`` is lost whole, and two tied
    classes both get ``p = 1``). The shift by the row's max is a constant for autodiff (the
    value does not depend on it), so no gradient flows through ``max``.
    """
    shifted, _, s, m = exp_normalize(xp, z)
    log_s = xp.log(s)
    return shifted - log_s, m + log_s


def exp_normalize(xp: Namespace, z: Array) -> tuple[Array, Array, Array, Array]:
    """``(z - m, e, s, m)`` of rows ``z`` along the last axis, as :func:`log_normalize`
    makes them: ``m`` the row's max (0 for a row of all -inf; a constant for autodiff),
    ``e = exp(z - m)`` and ``s = Σ e`` (1 for a row of all -inf), shaped ``[..., 1]``; so
    the softmax is ``e / s`` and the log-sum-exp ``m + log s``."""
    zero, one = const(xp, 0.0, z), const(xp, 1.0, z)
    m = stop_gradient(xp, xp.max(z, axis=-1, keepdims=True))
    m = xp.where(m == -xp.inf, zero, m)  # a row of all -inf: no shift (and no -inf - -inf)
    shifted = z - m
    e = xp.exp(shifted)  # exp(-inf) = 0, derivative 0
    s = xp.sum(e, axis=-1, keepdims=True)
    s = xp.where(s == zero, one, s)  # only a row of all -inf sums to 0
    return shifted, e, s, m


def log_softmax(
    xp: Namespace, z: Array, *, probs: bool = True
) -> tuple[Array, Array | None, Array, Array]:
    """``(log p, p, lse, keep)`` of rows ``z`` along the last axis, NaN-free.

    ``keep = z != -inf`` (NaN is kept, and propagates); ``log p`` is **0** where not
    ``keep``, so that ``p · log p`` is 0 · 0 there; ``p`` (None unless ``probs``) is
    ``exp(log p)``, exactly 0 at -inf classes (so autodiff keeps ``p`` once, not
    ``exp(z - max)`` besides); ``lse`` as :func:`log_normalize`.
    """
    raw, lse = log_normalize(xp, z)
    keep = z != -xp.inf
    logp = xp.where(keep, raw, const(xp, 0.0, z))
    return logp, (xp.exp(raw) if probs else None), lse, keep


def entropy_rows(
    xp: Namespace, z: Array, temperature: float, grad: bool
) -> tuple[Array, Callable[[Any], Array] | None]:
    """Per-row entropy ``H = -Σ p log p`` of ``p = softmax(z/T)``, NaN-free under -inf
    (0 · log 0 = 0), and (``grad``) ``dh(s)``: ``s`` times its gradient w.r.t. ``z``,
    ``-s · p ⊙ (log p + H) / T``, with ``s`` (a number or one per row, e.g. a penalty's
    slope in ``H``) folded into the same pass."""
    t = temperature
    logp, p, _, _ = log_softmax(xp, z / t if t != 1.0 else z)
    assert p is not None
    h = -xp.sum(p * logp, axis=-1)
    if not grad:
        return h, None

    def dh(s: Any) -> Array:
        factor = -s / t if isinstance(s, (int, float)) else xp.reshape(s, (-1, 1)) / -t
        return (logp + xp.reshape(h, (-1, 1))) * p * factor

    return h, dh


def _gaps(xp: Namespace, here: Array, there: Array, finite: Array) -> Array:
    """``[c]``: the rows whose KL is +inf: some class is kept in ``here`` but -inf in
    ``there`` (a support gap), and the row's KL with safe logs, ``finite``, is not NaN.

    A NaN among the scores (or +inf, whose softmax is NaN) makes the whole row's KL NaN, gap
    or not, as IEEE arithmetic has it (NaN + inf is NaN): NaN propagates, and a row that
    holds one is not reported as a support gap."""
    gap = xp.any(xp.logical_and(here, xp.logical_not(there)), axis=-1)
    return xp.logical_and(gap, xp.logical_not(xp.isnan(finite)))


def kl_rows(
    xp: Namespace, z: Array, r: Array, direction: str, temperature: float, grad: bool
) -> tuple[Array, Array | None]:
    """Per-row KL between ``p = softmax(z/T)`` (the model) and ``q = softmax(r/T)``.

    ``"reverse"``: KL(p‖q); ``"forward"``: KL(q‖p); ``"symmetric"``: their mean. Returns the
    ``[c]`` values and (``grad``) d value / d ``z``: reverse ``p ⊙ (log p - log q - KL)/T``,
    forward ``(p - q)/T``. A row with a support gap (the first distribution > 0 where the
    second is 0) is +inf, with gradient 0, unless the row holds a NaN: then its KL is NaN,
    and so is its gradient (:func:`_gaps`).
    """
    logp, p, _, kp = log_softmax(xp, z / temperature if temperature != 1.0 else z)
    rt = r / temperature if temperature != 1.0 else r
    logq, q, _, kq = log_softmax(xp, rt, probs=direction != "reverse")  # (q: forward only)
    assert p is not None
    inf, zero = const(xp, math.inf, z), const(xp, 0.0, z)
    values: list[Array] = []
    grads: list[Array] = []
    if direction in ("reverse", "symmetric"):
        diff = logp - logq  # safe logs: 0 · finite where p = 0, finite where p > 0 off a gap
        finite = xp.sum(p * diff, axis=-1)
        gap = _gaps(xp, kp, kq, finite)
        values.append(xp.where(gap, inf, finite))
        if grad:
            g = p * (diff - xp.reshape(finite, (-1, 1)))
            grads.append(xp.where(xp.reshape(gap, (-1, 1)), zero, g))
    if direction in ("forward", "symmetric"):
        assert q is not None
        finite = xp.sum(q * (logq - logp), axis=-1)
        gap = _gaps(xp, kq, kp, finite)
        values.append(xp.where(gap, inf, finite))
        if grad:
            grads.append(xp.where(xp.reshape(gap, (-1, 1)), zero, p - q))
    if len(values) == 2:
        value = 0.5 * (values[0] + values[1])
        g_all = 0.5 * (grads[0] + grads[1]) if grad else None
    else:
        value, g_all = values[0], (grads[0] if grad else None)
    if g_all is not None and temperature != 1.0:
        g_all = g_all / temperature
    return value, g_all


def jsd_rows(
    xp: Namespace, z: Array, r: Array, beta: float, temperature: float, grad: bool
) -> tuple[Array, Array | None]:
    """Per-row JSD_β and (``grad``) its gradient w.r.t. ``z``; NaN-free under -inf."""
    t = temperature
    logp, p, _, kp = log_softmax(xp, z / t if t != 1.0 else z)
    logq, q, _, kq = log_softmax(xp, r / t if t != 1.0 else r)
    assert p is not None
    assert q is not None
    ninf, zero, one = const(xp, -math.inf, z), const(xp, 0.0, z), const(xp, 1.0, z)
    a = xp.where(kq, logq + math.log(beta), ninf)  # log(β q), -inf where q = 0
    b = xp.where(kp, logp + math.log1p(-beta), ninf)  # log((1 - β) p)
    either = xp.logical_or(kp, kq)
    top = stop_gradient(xp, xp.maximum(a, b))
    top = xp.where(either, top, zero)  # a class masked in both: no -inf - -inf
    u = xp.exp(a - top) + xp.exp(b - top)
    logm = top + xp.log(xp.where(either, u, one))  # log m; 0 where both are masked
    kl_q = xp.sum(q * (logq - logm), axis=-1)  # q = 0 wherever logq is the safe 0
    kl_p = xp.sum(p * (logp - logm), axis=-1)
    value = beta * kl_q + (1.0 - beta) * kl_p
    if not grad:
        return value, None
    g = p * (logp - logm - xp.reshape(kl_p, (-1, 1)))
    return value, g * ((1.0 - beta) / t)


# ---- Consistency's comparisons of the input with its paired array -------------------------------
def elementwise(
    xp: Namespace, x: Array, y: Array, how: str, grad: bool
) -> tuple[Array, Array | None]:
    """``(x - y)²`` or ``|x - y|`` and the gradient w.r.t. ``x``; 0 where both are -inf."""
    both = xp.logical_and(x == -xp.inf, y == -xp.inf)
    d = xp.where(both, const(xp, 0.0, x), x - y)
    if how == "mse":
        return d * d, (2.0 * d if grad else None)
    return abs_(xp, d), (xp.sign(d) if grad else None)


def cosine_rows(xp: Namespace, x: Array, y: Array, grad: bool) -> tuple[Array, Array | None]:
    r"""``1 - cos(x, y)`` per row as ½‖x̂ - ŷ‖², and the gradient w.r.t. ``x``.

    Classes that are -inf in either row are left out; each row is scaled by its largest
    ``|value|`` first (a constant for autodiff: the cosine does not depend on it), so that no
    square overflows or underflows. A pair of zero rows gives 0, one zero row 1, and the
    gradient at a zero row is 0. A row holding NaN or +inf has no direction (its scaled norm
    is NaN): the pair is NaN, value and gradient, even beside a zero row.
    """
    zero, one = const(xp, 0.0, x), const(xp, 1.0, x)
    drop = xp.logical_or(x == -xp.inf, y == -xp.inf)
    x = xp.where(drop, zero, x)
    y = xp.where(drop, zero, y)
    xs, nx, sx = _unit(xp, x)
    ys, ny, _ = _unit(xp, y)
    x0, y0 = nx == zero, ny == zero  # zero rows (NaN is neither: it propagates)
    # the zero-row conventions hold beside a row with a direction: NaN or +inf (a NaN
    # norm) makes the pair NaN through the formula, under autodiff too (no where of it)
    pos = xp.logical_or(
        xp.logical_not(xp.logical_or(x0, y0)), xp.logical_or(xp.isnan(nx), xp.isnan(ny))
    )
    nx_, ny_ = xp.where(x0, one, nx), xp.where(y0, one, ny)
    xh, yh = xs / nx_, ys / ny_
    diff = xh - yh
    half = 0.5 * xp.sum(diff * diff, axis=-1, keepdims=True)
    value = xp.where(pos, half, xp.where(xp.logical_and(x0, y0), zero, one))
    value = xp.reshape(value, (-1,))
    if not grad:
        return value, None
    # d ½‖x̂ - ŷ‖² / dx = (I - x̂x̂ᵀ)(x̂ - ŷ) / ‖x‖, with ‖x‖ = sx · nx
    along = xp.sum(xh * diff, axis=-1, keepdims=True)
    g = (diff - xh * along) / (nx_ * sx)
    g = xp.where(xp.logical_and(pos, xp.logical_not(drop)), g, zero)
    return value, g


def _unit(xp: Namespace, x: Array) -> tuple[Array, Array, Array]:
    """(x / s, ‖x / s‖, s) with s the row's largest |x| (1 for a zero row), kept [c, 1]."""
    zero, one = const(xp, 0.0, x), const(xp, 1.0, x)
    s = stop_gradient(xp, xp.max(xp.abs(x), axis=-1, keepdims=True))
    s = xp.where(s == zero, one, s)
    xs = x / s
    n2 = xp.sum(xs * xs, axis=-1, keepdims=True)
    n = xp.sqrt(xp.where(n2 == zero, one, n2))  # no sqrt'(0) = inf, even unselected
    return xs, xp.where(n2 == zero, zero, n), s
