"""JAX: the built-ins' closed form through ``jax.custom_jvp``, and reductions XLA fuses.

``compute`` on JAX arrays (and tracers: ``jit``, ``grad``, ``vmap``) prepares the Batch as the
generic path does (JAX differentiates that part: the concatenation, the mask, the dtype,
``exp`` for probabilities), then :func:`value_and_metrics` evaluates the penalty on
``batch.values`` through a ``jax.custom_jvp`` function:

- its primal is the value and metrics, by a formulation chosen for speed (``PRIMAL``, keyed
  by registered name) or the penalty's own ``evaluate``. The primal needs no care for the
  gradient conventions (``abs``, clipping by ``maximum``), since
- its JVP is the closed form: the tangent of the value is ``Σ g · dv`` with ``g`` =
  d value / d values (``GRAD``, or the penalty's ``evaluate_with_grad``), so ``jax.grad``
  gets exactly the documented conventions (sign 0 at 0, clip bounds inclusive). A JVP rather
  than a VJP: reverse mode transposes it (``Σ g · dv`` is linear in ``dv``), ``jax.jvp``
  keeps working, and second derivatives are JAX's derivative of the closed form ``g``,
  which is exact wherever ``g`` is differentiable (everywhere but the kinks, where the
  generic path's second derivative is a convention too).

Metrics are constants for autodiff on this path (zero tangents), as on the torch route: they
are for logging. Concrete arrays outside any transformation skip the custom_jvp machinery
(nothing will differentiate them, and it costs more than the maths when JAX runs eagerly).
A mask or ``counts`` passed into ``jit`` as arguments, so traced, are arguments of the
custom_jvp too: one cannot close over a tracer (under ``jax.grad(jax.jit(f))`` it fails with
"No constant handler").

The formulations (measured on XLA's CPU backend, where a reduction fuses elementwise
``abs``, ``max``, add and multiply into its loop, but ``clamp`` and ``select`` much less
well, and where any full-size intermediate is written to memory at several times the cost of
a read): each reduction reads the input once with its elementwise work fused in, and every
elementwise operation in it adds measurably to its time. Clipping is ``min(max(v, lo), hi)``
on bounds read at run time (:func:`clip`): exact, and not rewritten into a ``clamp``
(``jnp.clip``, or constant bounds, would be), which is not fused into reductions.
``l2_max`` comes from ``max |d|`` or from the extrema of the input, never from a squared
array; a pass centred on a mean known only at run time clips in the shifted frame
(:func:`_shifted_clip`), so that no clipped array is shared by two reductions. XLA's CPU
backend drops NaN from a max or min in a vectorized loop, a clip fused into a sum
included: a NaN is carried by a sum that keeps it (``Σd²``), or by the one max that keeps
it (:func:`~.._core.backends.max_`), into the value and metrics.

ZLoss, KL, JSD, Entropy, GradientPenalty and Consistency, traced, take a closed form per
token (``ROWS``, below), with the mask, ``reduce`` and ``counts`` outside the custom_jvp: they
may be traced. A reference or paired array is an argument of the custom_jvp too. On up to
:data:`ONE_PASS` tokens, under ``"sum"`` or ``"mean"``, their value and metrics come from one
variadic reduce (:func:`summary`): at that size every separate reduction is a step of XLA's
runtime that costs more than its arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._core.backends import clip_below, nan_among, reciprocal
from .._core.ops import clamp, row_norm_parts
from .._core.rows import (
    cosine_rows,
    elementwise,
    entropy_rows,
    exp_normalize,
    jsd_rows,
    kl_rows,
    log_normalize,
)

__all__ = ["GRAD", "PRIMAL", "ROUTED", "routed", "value_and_metrics"]

Out = tuple[Any, dict[str, Any]]


def value_and_metrics(reg: Any, batch: Any) -> Out | None:
    """``(value, metrics)`` whose derivative is the closed form, or None: the generic path."""
    per_row = ROWS.get(reg.name)
    if per_row is not None:  # traced only: eagerly, the generic path's blocks bound memory
        traced = isinstance(batch.values, jax.core.Tracer) and batch.size > 0
        return per_row(reg, batch) if traced else None
    primal = PRIMAL.get(reg.name)

    def forward(b: Any) -> Out:
        got = None if primal is None else primal(reg, b)
        value, metrics = reg.evaluate(b) if got is None else got
        return value, dict(metrics)

    if not isinstance(batch.values, jax.core.Tracer):
        return forward(batch)
    held = _traced(batch)

    @jax.custom_jvp
    def penalty(values: Any, held: dict[str, Any]) -> Out:
        return forward(_with_values(batch, values, held))

    def penalty_jvp(primals: Any, tangents: Any) -> Any:
        (values, held), (dv, dheld) = primals, tangents
        b = _with_values(batch, values, held)
        value, metrics = penalty(values, held)  # its own derivatives are the closed form again
        dvalue = jnp.zeros_like(value)
        if not _symbolic_zero(dv):
            closed = GRAD.get(reg.name)
            g = reg.evaluate_with_grad(b)[2] if closed is None else closed(reg, b)
            g = b.where_counted(g)  # no NaN · 0 from uncounted tokens
            dvalue = jnp.sum(g * dv).astype(value.dtype)
        # counts being differentiated too (rare): JAX's derivative of the primal in them
        leaves, tree = jax.tree_util.tree_flatten(held)
        dleaves = jax.tree_util.tree_leaves(dheld, is_leaf=_symbolic_zero)
        live = [i for i, t in enumerate(dleaves) if not _symbolic_zero(t)]
        if live:

            def of_live(*xs: Any) -> Any:
                given = list(leaves)
                for i, x in zip(live, xs, strict=True):
                    given[i] = x
                rebuilt = jax.tree_util.tree_unflatten(tree, given)
                return forward(_with_values(batch, values, rebuilt))[0]

            _, extra = jax.jvp(of_live, [leaves[i] for i in live], [dleaves[i] for i in live])
            dvalue = dvalue + extra.astype(value.dtype)
        return (value, metrics), (dvalue, {k: jnp.zeros_like(v) for k, v in metrics.items()})

    penalty.defjvp(penalty_jvp, symbolic_zeros=True)
    out: Out = penalty(batch.values, held)
    return out


# what a Batch holds besides its values that a call may pass in traced (a mask or counts
# given to ``jit`` as arguments), and the caches derived from them
_HELD = ("mask", "_count", "_local", "_seq_count")
_DERIVED = ("_den", "_per_seq")


def _traced(batch: Any) -> dict[str, Any]:
    """The traced arrays the Batch holds besides its values: arguments of the custom_jvp (one
    that closes over a tracer fails under ``jax.grad(jax.jit(f))`` with "No constant
    handler"), with the given ``counts`` under ``"counts"``. Concrete ones stay as they are
    (a count that is a Python int keeps its exact arithmetic)."""
    out: dict[str, Any] = {
        n: v for n in _HELD if isinstance(v := getattr(batch, n), jax.core.Tracer)
    }
    given = batch._counts or {}
    counts = {k: v for k, v in given.items() if isinstance(v, jax.core.Tracer)}
    if counts:
        out["counts"] = counts
    return out


def _with_values(batch: Any, values: Any, held: dict[str, Any]) -> Any:
    """A copy of ``batch`` over other (traced) values and the arrays of ``held``
    (:func:`_traced`'s, as the custom_jvp's arguments), the rest shared; caches derived from
    the held arrays are made again."""
    out = object.__new__(type(batch))
    for name in type(batch).__slots__:
        if hasattr(batch, name):
            object.__setattr__(out, name, getattr(batch, name))
    object.__setattr__(out, "values", values)
    for name, v in held.items():
        if name == "counts":
            object.__setattr__(out, "_counts", {**batch._counts, **v})
        else:
            object.__setattr__(out, name, v)
    if held:
        for name in _DERIVED:
            object.__setattr__(out, name, None)
    return out


# ---- formulations ------------------------------------------------------------------------------
def _weight(batch: Any) -> Any:
    """The one aggregation weight of ``reduce`` (a float or a 0-d array), or None."""
    w = batch.token_weights()
    return w if isinstance(w, float) or jnp.ndim(w) == 0 else None


def _scaled(w: Any, raw: Any) -> Any:
    return raw if isinstance(w, float) and w == 1.0 else raw * w


def _counted(batch: Any, a: Any) -> Any:
    """``a`` times the mask (0/1) where there is one: uncounted tokens to 0 by arithmetic
    (fused into the reduction; their values are finite where this is used)."""
    return a if batch.mask is None else a * batch.mask.astype(a.dtype)


def clip(v: Any, lo: float | None, hi: float | None) -> Any:
    """``v`` clipped to ``[lo, hi]`` (NaN stays NaN), in a form XLA fuses into reductions:
    ``maximum`` and ``minimum``, one operation per bound. With both bounds the pair reads
    them as run-time values (``optimization_barrier``): bounds XLA sees as constants turn
    the pair into a ``clamp``, which its CPU backend does not fuse into a reduction."""
    if lo is not None and hi is not None:
        bounds = (jnp.asarray(lo, v.dtype), jnp.asarray(hi, v.dtype))
        low, high = jax.lax.optimization_barrier(bounds)  # type: ignore[no-untyped-call]
        return jnp.minimum(jnp.maximum(v, low), high)
    if lo is not None:
        return jnp.maximum(v, jnp.asarray(lo, v.dtype))
    if hi is not None:
        return jnp.minimum(v, jnp.asarray(hi, v.dtype))
    return v


def l1(reg: Any, batch: Any) -> Out | None:
    w = _weight(batch)
    if w is None:
        return None
    raw = jnp.sum(jnp.abs(batch.values))  # uncounted tokens hold 0
    return _scaled(w, raw), {"l1_raw": raw, "l1_mean": batch.per_token(raw)}


def l2(reg: Any, batch: Any) -> Out | None:
    w = _weight(batch)
    if w is None:
        return None
    v = batch.values
    top = float(jnp.finfo(v.dtype).max)  # type: ignore[no-untyped-call]
    lo, hi = (None, None) if reg.clip is None else reg.clip
    lo = None if lo is None else clamp(lo, top)
    hi = None if hi is None else clamp(hi, top)
    center = reg.center
    if batch.mask is None and v.ndim == 1 and batch.size:
        raw, peak = _l2_unmasked(v, lo, hi, center, top)
    else:
        c = v if reg.clip is None else _counted(batch, clip(v, lo, hi))
        if center == "mean":
            mu = batch._divide(jnp.sum(c), batch._local)
            d = c - mu
            if batch.mask is not None:  # the mean is finite here, or every sum is NaN anyway
                d = _counted(batch, d)
        elif center is not None:
            d = c - jnp.asarray(clamp(center, top), v.dtype)
            if batch.mask is not None:
                d = _counted(batch, d)
        else:
            d = c
        raw = jnp.sum(d * d)  # NaN exactly where some counted d is: it stands for the max's
        peak = jnp.max(jnp.abs(d)) if batch.size else jnp.zeros((), v.dtype)
        peak = jnp.where(jnp.isnan(raw), raw, peak)
    metrics = {"l2_raw": raw, "l2_mean": batch.per_token(raw), "l2_max": peak * peak}
    return _scaled(w, raw), metrics


def _l2_unmasked(v: Any, lo: Any, hi: Any, center: Any, top: float) -> tuple[Any, Any]:
    """Σd² and max |d| with d = clip(v) - center, every reduction reading ``v`` once with its
    elementwise work fused in. A value used by two reductions is what XLA would write out in
    full: so the extrema come from those of ``v`` (clipping and shifting are monotone, and so
    is rounding), and the centred pass clips in the shifted frame (:func:`_shifted_clip`), an
    expression XLA does not share with the first pass's ``clip``.

    NaN: XLA's CPU backend drops it from a max or min, and from one fused into a sum (a NaN
    clipped to a bound). ``Σd²`` unclipped is NaN exactly where some ``v`` is (squares are
    never negative), and stands for it; with a clip, ``v``'s sum and extrema do
    (:func:`_has_nan`)."""
    return _with_nan(*_l2_unmasked_parts(v, lo, hi, center, top))


def _l2_unmasked_parts(v: Any, lo: Any, hi: Any, center: Any, top: float) -> tuple[Any, Any, Any]:
    clipped = lo is not None or hi is not None
    # with a clip, Σv too, in the pass of the extrema (see _l2_unmasked)
    extrema = (*_EXTREMA, (_same, jnp.sum)) if clipped else _EXTREMA
    if center == "mean":
        total, high, low, *sums = _rows(v, (lambda u: clip(u, lo, hi), jnp.sum), *extrema)
        bad = _has_nan(v, high, low, sums[0]) if clipped else None
        mu = total / v.shape[0]
        (raw,) = _rows(v, (lambda u: jnp.square(_shifted_clip(u, lo, hi, mu)), jnp.sum))
        high, low = clip(high, lo, hi) - mu, clip(low, lo, hi) - mu
        # a mean that is not finite (an infinity survived the clip, or the sum overflowed):
        # Σ(c - mu)² is inf, or NaN where some c - mu is inf - inf, which only the extreme
        # c can be; u - mu in the shifted frame may be NaN where c - mu is not
        raw = jnp.where(jnp.isfinite(mu), raw, high * high + low * low)
        # (unclipped, mu = Σv / n is NaN where some v is)
        return raw, jnp.maximum(jnp.abs(high), jnp.abs(low)), _nan_if(bad, mu)
    k = None if center is None else jnp.asarray(clamp(center, top), v.dtype)

    def deviation(u: Any) -> Any:
        c = clip(u, lo, hi)
        return c if k is None else c - k

    if not clipped and k is None:
        raw, peak = _rows(v, (lambda u: u * u, jnp.sum), (jnp.abs, jnp.max))
        return raw, peak, raw
    raw, high, low, *sums = _rows(v, (lambda u: jnp.square(deviation(u)), jnp.sum), *extrema)
    bad = _has_nan(v, high, low, sums[0]) if clipped else None
    high, low = deviation(high), deviation(low)
    return raw, jnp.maximum(jnp.abs(high), jnp.abs(low)), _nan_if(bad, raw)


def _with_nan(raw: Any, peak: Any, witness: Any) -> tuple[Any, Any]:
    """``raw`` and ``peak`` NaN where ``witness`` (NaN exactly where some input is) is."""
    nan = jnp.isnan(witness)
    return jnp.where(nan, witness, raw), jnp.where(nan, witness, peak)


@jax.jit  # eagerly, compiled once per shape (lax.cond traces its branches at each call)
def _has_nan(v: Any, high: Any, low: Any, total: Any) -> Any:
    """Whether some ``v`` is NaN, from its max and min and its sum (``nan_among``)."""
    return nan_among(v, total, high, low)


def _nan_if(bad: Any, otherwise: Any) -> Any:
    """NaN where ``bad`` (:func:`_has_nan`, with a clip; else None) says so, else
    ``otherwise``."""
    if bad is None:
        return otherwise
    return jnp.where(bad, jnp.asarray(jnp.nan, otherwise.dtype), otherwise)


def _shifted_clip(u: Any, lo: Any, hi: Any, mu: Any) -> Any:
    """``clip(u, lo, hi) - mu`` as ``clip(u - mu, lo - mu, hi - mu)``: bit-identical for a
    finite ``mu`` (``fl(u - mu)`` is monotone in ``u``, so a clipped ``u`` lands on
    ``fl(lo - mu)`` or ``fl(hi - mu)`` either way; NaN stays NaN)."""
    d = u - mu
    if lo is not None:
        d = jnp.maximum(d, jnp.asarray(lo, u.dtype) - mu)
    if hi is not None:
        d = jnp.minimum(d, jnp.asarray(hi, u.dtype) - mu)
    return d


def _same(u: Any) -> Any:
    return u


_EXTREMA = ((_same, jnp.max), (_same, jnp.min))


def _row_length(n: int) -> int | None:
    """A divisor of ``n`` in [256, 4096], nearest 1024 (None: there is none). The rows must
    tile ``v`` exactly: a slice of ``v`` before the reshape is copied out in full by XLA."""
    for k in sorted(range(256, 4097), key=lambda k: abs(k - 1024)):
        if n % k == 0:
            return k
    return None


def _rows(v: Any, *reductions: tuple[Callable[[Any], Any], Callable[..., Any]]) -> tuple[Any, ...]:
    """``reduce(f(v))`` for each ``(f, reduce)`` (an elementwise map, and ``jnp.sum``,
    ``jnp.max`` or ``jnp.min``). Where ``v``'s length has a divisor near 1024, in two stages:
    over the rows of ``v`` viewed as ``[n // k, k]``, then over the per-row results. Measured
    on XLA's CPU backend, sibling row reductions of one input run in about one pass over
    memory, where flat reductions take one pass each."""
    k = _row_length(v.shape[0])
    if k is None:
        return tuple(reduce(f(v)) for f, reduce in reductions)
    b = jnp.reshape(v, (v.shape[0] // k, k))
    return tuple(reduce(reduce(f(b), axis=-1)) for f, reduce in reductions)


PRIMAL: dict[str, Callable[[Any, Any], Out | None]] = {"l1_sparsity": l1, "l2_weight_decay": l2}


# ---- gradients alone -----------------------------------------------------------------------------
# The closed form without the value and metrics that ``evaluate_with_grad`` also computes
# (the primal gives those): the same functions, so the same gradient, and fewer operations
# where JAX runs eagerly (under ``jit`` XLA drops the unused ones either way).
def _l1_grad(reg: Any, b: Any) -> Any:
    return b.aggregate_grad(b.xp.sign(b.values))


def _l2_grad(reg: Any, b: Any) -> Any:
    # (the whole closed form: this package's fast paths import no penalty module, which
    # imports the machinery that dispatches here; eagerly it also computes the metrics)
    return reg.evaluate_with_grad(b)[2]


GRAD: dict[str, Callable[[Any, Any], Any]] = {"l1_sparsity": _l1_grad, "l2_weight_decay": _l2_grad}


# ---- penalties over rows: a closed form per token ---------------------------------------------
# ZLoss, KL, JSD, Entropy, GradientPenalty and Consistency, traced: the per-token penalty of
# every row (or element) is a ``jax.custom_jvp`` of the rows (and of the reference or paired
# array, an argument like the values, so nothing traced is closed over), whose JVP is the
# penalty's own per-row closed form (``d p_i = Σ_v g_iv dz_iv``), and everything after it
# (the mask, ``reduce``, ``counts``, the metrics) is the Batch's code, which JAX
# differentiates as usual, or on up to ONE_PASS tokens its one-pass equivalent
# (:func:`summary`). Under ``jit``
# this is one program over the whole ``[n, V]`` input: no blocks (the generic path's
# :func:`blockwise` slices the input and pads the gradient of every block back to full
# size, which XLA runs as copies), and a backward pass that is one product per element.
# The rows' conventions are the generic path's own functions (``log_normalize``,
# ``kl_rows``, ``row_norms``): -inf classes and all -inf rows stay NaN-free, and a row the
# mask drops gets a cotangent 0 times a finite slope.
def _symbolic_zero(t: Any) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _tangent(t: Any, like: Any) -> Any:
    return jnp.zeros_like(like) if _symbolic_zero(t) else t


# ---- the value and metrics of a per-token penalty ----------------------------------------------
# Up to this many tokens, a traced call reduces the per-token penalty in one pass: a variadic
# reduce gives Σ p, max p, whether a counted p is NaN, the count and the metrics' other sums
# together. At 1e3 elements each separate reduction costs XLA's CPU runtime about as much as
# a whole hand-written training step's arithmetic (a Consistency step, 1e3 elements:
# ~25 µs with the count apart, ~18 with it in the one pass, 16 hand-written without a
# count); beyond a few thousand the variadic loop, which XLA does not vectorize, costs more
# than the separate vectorized reductions.
ONE_PASS = 2048


def summary(batch: Any, name: str, p: Any, **means: Any) -> Out:
    """The value (``reduce``) and metrics of the per-token penalty ``p``: ``{name}_raw``,
    ``{name}_mean``, ``{name}_max``, and for each of ``means`` its mean over the counted
    tokens, as the Batch's own ``aggregate``, ``metrics`` and ``mean`` make them (and
    differentiate them: see :func:`_totals`). Traced, under ``"sum"`` or ``"mean"``, on up
    to :data:`ONE_PASS` tokens, in one pass."""
    one_pass = (
        batch.reduce in ("sum", "mean")
        and p.ndim == 1
        and 0 < p.shape[0] <= ONE_PASS
        and isinstance(p, jax.core.Tracer)
    )
    if not one_pass:
        raw = batch.sum(p)
        metrics = batch.metrics(name, p, total=raw)
        for k, a in means.items():
            metrics[k] = batch.mean(a)
        return batch.aggregate(p, total=raw), metrics
    raw, top, local, sums = _totals(p, batch.mask, tuple(means.values()))
    if batch.mask is None or "tokens" in (batch._counts or {}):
        per, w = batch.per_token, batch.token_weights()  # (no count of the mask to make)
    else:  # this call's count, from the one pass, as the Batch divides by its own
        den = clip_below(jnp, local, 1.0)
        per, w = (lambda total: total / den), 1.0 if batch.reduce == "sum" else reciprocal(jnp, den)
    metrics = {f"{name}_raw": raw, f"{name}_mean": per(raw), f"{name}_max": top}
    for k, total in zip(means, sums, strict=True):
        metrics[k] = per(total)
    return raw if isinstance(w, float) and w == 1.0 else raw * w, metrics


def _reduced(p: Any, keep: Any, extras: tuple[Any, ...]) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """``(Σ p, max p, N, (Σ e for e in extras))`` over the tokens ``keep`` counts (all
    where it is None; ``N`` then None) by one variadic reduce. ``max`` is NaN where a
    counted ``p`` is, 0 where no token counts (the Batch's conventions)."""
    dt = p.dtype
    zero, low = jnp.zeros((), dt), jnp.full((), -jnp.inf, dt)
    bad = jnp.isnan(p)
    if keep is None:
        operands = [p, p, bad, *extras]
    else:
        operands = [
            jnp.where(keep, p, zero),
            jnp.where(keep, p, low),
            jnp.logical_and(bad, keep),
            keep.astype(jnp.int32),
            *(jnp.where(keep, e, zero) for e in extras),
        ]
    inits = [zero, low, jnp.asarray(False)]
    if keep is not None:
        inits.append(jnp.asarray(0, jnp.int32))
    inits.extend(jnp.zeros((), e.dtype) for e in extras)
    counted = keep is not None

    def combine(a: Any, b: Any) -> Any:
        out = [a[0] + b[0], jnp.maximum(a[1], b[1]), jnp.logical_or(a[2], b[2])]
        out.extend(x + y for x, y in zip(a[3:], b[3:], strict=True))
        return tuple(out)

    got = jax.lax.reduce(tuple(operands), tuple(inits), combine, (0,))
    raw, top, nan = got[0], got[1], got[2]
    top = jnp.where(nan, jnp.full((), jnp.nan, dt), top)
    local = None
    if counted:
        local = got[3].astype(dt)
        top = jnp.where(got[3] > 0, top, zero)
    return raw, top, local, tuple(got[3 + counted :])


@jax.custom_jvp
def _totals(p: Any, keep: Any, extras: tuple[Any, ...]) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """:func:`_reduced`, whose derivatives are those of the Batch's separate reductions:
    the sums' tangents the sums of the counted tangents, the max's JAX's own (the mean of
    the tangents at its ties), the count's 0."""
    return _reduced(p, keep, extras)


@_totals.defjvp
def _totals_jvp(primals: Any, tangents: Any) -> Any:
    (p, keep, extras), (dp, _, dextras) = primals, tangents
    out = _totals(p, keep, extras)
    top, local = out[1], out[2]
    zero = jnp.zeros((), p.dtype)

    def counted_sum(a: Any) -> Any:
        return jnp.sum(a if keep is None else jnp.where(keep, a, zero))

    ties = p == top if keep is None else jnp.logical_and(keep, p == top)
    n_ties = jnp.maximum(jnp.sum(ties.astype(p.dtype)), jnp.ones((), p.dtype))
    dtop = jnp.sum(jnp.where(ties, dp, zero)) / n_ties
    dlocal = None if local is None else jnp.zeros_like(local)
    dsums = tuple(counted_sum(d) for d in dextras)
    return out, (counted_sum(dp), dtop, dlocal, dsums)


@jax.custom_jvp
def _z_loss_rows(z: Any) -> tuple[Any, Any]:
    """``(log Z², log Z)`` per row."""
    _, lse = log_normalize(jnp, z)
    log_z = jnp.reshape(lse, (-1,))
    return log_z * log_z, log_z


@_z_loss_rows.defjvp
def _z_loss_rows_jvp(primals: Any, tangents: Any) -> Any:
    (z,), (dz,) = primals, tangents
    _, e, s, m = exp_normalize(jnp, z)  # (one exp per element, for the sum and the softmax)
    log_z = jnp.reshape(m + jnp.log(s), (-1,))
    d_log_z = jnp.sum(e * dz, axis=-1) / jnp.reshape(s, (-1,))  # softmax · dz
    return (log_z * log_z, log_z), ((2.0 * log_z) * d_log_z, d_log_z)


def z_loss(reg: Any, batch: Any) -> Out:
    p, log_z = _z_loss_rows(batch.values)
    return summary(batch, "z_loss", p, log_z_mean=log_z)


def _against_reference(
    closed: Callable[[Any, Any, bool], tuple[Any, Any]], event_ndim: int = 1
) -> Callable[[Any, Any, Any], Any]:
    """The per-token penalty of ``(z, r)`` that ``closed(z, r, grad)`` computes (``kl_rows``,
    ``jsd_rows``, Consistency's comparisons): its JVP in ``z`` is the closed form; a
    reference being differentiated too (rare) gets JAX's derivative of the same maths.
    ``event_ndim`` is 1 for rows of scores (the slope summed along the class axis), 0 for
    elementwise penalties.

    ``keep`` (``[n]`` bool, or None) is the Batch's mask, an argument (a custom_jvp closed
    over a traced mask fails under ``jax.grad(jax.jit(f))``): the slope is 0 at the tokens
    it drops. The tokens :meth:`Batch.restrict` drops keep their values, and a row of ``z``
    holding +inf or NaN beside a reference row of all -inf has a NaN slope, which the
    cotangent 0 of a dropped token would otherwise carry back as NaN (``0 · NaN``); where
    the reference is differentiated, both arrays are 0 at the dropped tokens first, as the
    generic path's blocks have them."""

    def plain(z: Any, r: Any) -> Any:
        return closed(z, r, False)[0]

    def kept(keep: Any, a: Any) -> Any:
        if keep is None:
            return a
        return jnp.where(jnp.reshape(keep, (-1,) + (1,) * event_ndim), a, jnp.zeros((), a.dtype))

    @jax.custom_jvp
    def rows(z: Any, r: Any, keep: Any) -> Any:
        return plain(z, r)

    def jvp(primals: Any, tangents: Any) -> Any:
        (z, r, keep), (dz, dr, _) = primals, tangents
        if not _symbolic_zero(dr):
            z, r = kept(keep, z), kept(keep, r)
            return jax.jvp(plain, (z, r), (_tangent(dz, z), dr))
        value, g = closed(z, r, True)
        if _symbolic_zero(dz):
            return value, jnp.zeros_like(value)
        slope = kept(keep, g) * dz
        return value, jnp.sum(slope, axis=-1) if event_ndim else slope

    rows.defjvp(jvp, symbolic_zeros=True)
    return rows


def _reference_penalty(
    name: str, closed: Callable[[Any, Any, Any, bool], tuple[Any, Any]]
) -> Callable[[Any, Any], Out]:
    """The ``ROWS`` entry of a penalty of the scores against a reference field, whose rows
    ``closed(reg, z, r, grad)`` computes."""

    def penalty(reg: Any, batch: Any) -> Out:
        ref = batch.field(reg.reference, role="reference", counted=False)
        rows = _against_reference(lambda z, r, grad: closed(reg, z, r, grad))
        return summary(batch, name, rows(batch.values, ref, batch.mask))

    return penalty


kl = _reference_penalty(
    "kl", lambda reg, z, r, grad: kl_rows(jnp, z, r, reg.direction, reg.temperature, grad)
)
jsd = _reference_penalty(
    "jsd", lambda reg, z, r, grad: jsd_rows(jnp, z, r, reg.beta, reg.temperature, grad)
)


def consistency(reg: Any, batch: Any) -> Out:
    """Consistency of the input with its paired array (an argument of the custom_jvp, as a
    reference is): per element (``"mse"``, ``"l1"``) or per row (``"cosine"``, ``"kl"``)."""
    how, t = reg.metric, reg.temperature
    closed: Callable[[Any, Any, bool], tuple[Any, Any]]
    if how == "kl":
        closed = lambda z, r, grad: kl_rows(jnp, z, r, "symmetric", t, grad)  # noqa: E731
    elif how == "cosine":
        closed = lambda z, r, grad: cosine_rows(jnp, z, r, grad)  # noqa: E731
    else:
        closed = lambda z, r, grad: elementwise(jnp, z, r, how, grad)  # noqa: E731
    paired = batch.field(reg.paired, role="paired", counted=False)
    p = _against_reference(closed, batch.event_ndim)(batch.values, paired, batch.mask)
    return summary(batch, "consistency", p)


def _entropy_rows(t: float) -> Callable[[Any], Any]:
    """The per-row entropy ``H`` of the scores: its JVP is ``entropy_rows``'s closed form."""

    @jax.custom_jvp
    def rows(z: Any) -> Any:
        return entropy_rows(jnp, z, t, False)[0]

    def jvp(primals: Any, tangents: Any) -> Any:
        (z,), (dz,) = primals, tangents
        h, dh = entropy_rows(jnp, z, t, True)
        assert dh is not None
        return h, jnp.sum(dh(1.0) * dz, axis=-1)

    rows.defjvp(jvp)
    return rows


def entropy(reg: Any, batch: Any) -> Out:
    """``H`` per row through its closed form; the penalty of ``H`` (normalization, mode, the
    hinge) is the penalty's own maths, which JAX differentiates (0 on the hinge's flat side
    and at its kink, as the closed form says)."""
    h = _entropy_rows(reg.temperature)(batch.values)
    p, _ = reg._penalty(jnp, h, int(batch.values.shape[-1]))
    return summary(batch, "entropy", p, entropy_mean=h)


def _sum_squares(g: Any) -> tuple[Any, Any]:
    """``Σ g²`` per row, and whether every row's is finite and far enough above the
    underflow range that ``sqrt`` of it is the norm to rounding (no row is 0, ±inf or NaN:
    those and extreme magnitudes take ``row_norms``'s scaled form)."""
    s = jnp.sum(g * g, axis=-1)
    info = jnp.finfo(g.dtype)  # type: ignore[no-untyped-call]
    low = float(info.tiny) / float(info.eps) ** 2  # terms lost to underflow: < eps² of Σ
    return s, jnp.all(jnp.logical_and(jnp.isfinite(s), s >= low))


def _norm_factors(g: Any) -> tuple[Any, Any, Any]:
    """``(‖g‖, a, b)`` per row with ``g / ‖g‖ = (g / a) · b``: ``sqrt(Σ g²)`` (one pass)
    where that is the norm to rounding for every row, else ``row_norms``'s scaled pieces
    (no overflow or underflow; the unit is 0 on a zero row and NaN on an infinite one)."""
    s, plain = _sum_squares(g)

    def quick() -> tuple[Any, Any, Any]:
        norm = jnp.sqrt(s)
        return norm, norm, jnp.ones_like(norm)

    def careful() -> tuple[Any, Any, Any]:
        norm, scale, r = row_norm_parts(jnp, g)  # r >= 1 where finite
        finite = jnp.isfinite(r)
        return norm, scale, jnp.where(finite, 1.0 / jnp.where(finite, r, 1.0), jnp.nan)

    return jax.lax.cond(plain, quick, careful)  # type: ignore[no-any-return]


@jax.custom_jvp
def _norms(g: Any) -> Any:
    """The Euclidean norm of each row, as ``row_norms`` (see :func:`_norm_factors`)."""
    return _norm_factors(g)[0]


@_norms.defjvp
def _norms_jvp(primals: Any, tangents: Any) -> Any:
    (g,), (dg,) = primals, tangents
    norm, a, b = _norm_factors(g)  # (no branch in the tangent: one product per element)
    return norm, jnp.sum((g / a[:, None]) * dg, axis=-1) * b


def gradient_penalty(reg: Any, batch: Any) -> Out:
    norm = _norms(batch.values)
    d = norm - reg.target_norm  # (the penalty's own _finish, through summary's one pass)
    return summary(batch, "gradient_penalty", d * d, grad_norm_mean=norm)


ROWS: dict[str, Callable[[Any, Any], Out]] = {
    "z_loss": z_loss,
    "kl": kl,
    "jsd": jsd,
    "entropy": entropy,
    "gradient_penalty": gradient_penalty,
    "consistency": consistency,
}

# The built-ins routed here: elementwise, with a closed form, reading no array of ``data``
# but their target (a penalty that reads a reference could be differentiated with respect to
# it, which a custom_jvp closed over it cannot do), and those of ``ROWS``, whose custom_jvp
# takes the reference as an argument.
ROUTED = frozenset({"l1_sparsity", "l2_weight_decay", "huber", "elastic_net", *ROWS})


def routed(reg: Any) -> bool:
    """Whether ``reg`` takes this closed form: a built-in of :data:`ROUTED`, or SampledEntropy
    without ``behavior`` (then it reads nothing but its target). The generic path's ratio
    ``exp(lp - stop_gradient(lp))`` is a constant at a non-finite ``lp`` (where ``lp - lp``
    would make the value NaN), so JAX's own derivative there is ``±1`` where the closed form
    ``±(lp + 1)`` is ±inf, or NaN at a NaN, as on every other path."""
    if reg.name == "sampled_entropy":
        return reg._opts["behavior"] is None
    return reg.name in ROUTED
