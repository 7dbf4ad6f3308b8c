"""NumPy ``value_and_grad`` of a whole call without a :class:`~regularizers.Batch`.

For the common training calls (NumPy arrays or a ragged list of them, ``data`` a dict whose
fields are arrays or lists of arrays, a mask that is ``None``, a ``Field`` or arrays,
``reduce`` "sum" or "mean", the ``"logprobs"`` target), the per-call cost of preparing a
Batch (validation, namespace lookups, copies that zero uncounted tokens, the pullback) is
what separates the library from hand-written NumPy, at 1e3 elements most of all. Here each
kernel reads the flat input once into the compute dtype (float32 for float16), with the mask
as a boolean array (uncounted tokens hold 0, as in a Batch), and writes value, metrics and
the gradient in whole-array NumPy calls, with the same maths as the penalty's
``evaluate_with_grad``.

Anything unusual returns None, and the general path runs (and validates, and raises the
named errors): an input or field of another kind, dtype or shape, options a kernel does not
cover, and, for the kernels over a class axis, any non-finite value met on the way (-inf
classes, all -inf rows, NaN: the generic closed form has the conventions for them). A kernel
that declines after reading its input has only cost time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.options import ByIdentity, Field
from .common import Bounded, huber_form_fits
from .numpy_blocked import squares

__all__ = ["KERNELS", "value_and_grad"]

_FLOATS = (np.float16, np.float32, np.float64)
_F32 = np.dtype(np.float32)
_TOPS: dict[Any, float] = {}  # the largest finite value of each dtype (np.finfo is slow)
_WEIGHTS = Bounded(256)  # reduce's 1/N per (dtype, N) (_Call.weight)
_SCALARS = Bounded(256)  # options in the compute dtype (_finite)
_TINY: dict[Any, float] = {}  # tiny / eps of each dtype (GradientPenalty's underflow bound)
_ROWS = 1 << 16  # elements of [rows, V] per block of a class-axis kernel (inside the L2 cache)


class _Call:
    """One call's flat input: ``x`` (compute dtype, 0 at uncounted tokens), ``m`` (bool, or
    None when every token counts), ``count`` (N) and the way back to the input's shapes."""

    __slots__ = ("arrays", "count", "data", "dtype", "event", "flat", "is_list", "m", "n", "x")

    arrays: list[np.ndarray]
    count: int
    data: Any
    dtype: Any
    event: int
    flat: np.ndarray  # the input's flat values before masking (shared by a Pipeline's terms)
    is_list: bool
    m: np.ndarray | None
    n: int
    x: np.ndarray

    def tokens(self, a: np.ndarray) -> tuple[int, ...]:
        return a.shape[: a.ndim - self.event]

    def _values(self, value: Any) -> list[np.ndarray] | None:
        """A field's arrays (from ``data`` or an option), shaped per array of the input."""
        if isinstance(value, ByIdentity):
            value = value.value
        elif isinstance(value, Field):
            data = self.data
            if data is None:
                return None
            value = data.get(value.key)
        if type(value) is np.ndarray:
            return [value]
        if type(value) in (list, tuple) and value and all([type(v) is np.ndarray for v in value]):  # noqa: C419
            return list(value)
        return None

    def field(self, option: Any) -> np.ndarray | None:
        """A float field shaped like the input, flat in the compute dtype, 0 where uncounted."""
        got = self._values(option)
        if got is None or len(got) != len(self.arrays):
            return None
        for f, a in zip(got, self.arrays, strict=True):
            if f.shape != a.shape or f.dtype.type not in _FLOATS:
                return None
        flat = self._flat(got)
        if flat.dtype != self.dtype:
            flat = flat.astype(self.dtype)
        if self.m is not None:
            flat = np.where(self._mask_like(flat), flat, 0)
        return flat

    def _mask_like(self, a: np.ndarray) -> np.ndarray:
        m = self.m
        assert m is not None
        return m if a.ndim == 1 else m.reshape((-1,) + (1,) * (a.ndim - 1))

    def _flat(self, arrays: list[np.ndarray]) -> np.ndarray:
        if self.event:
            tail = self.arrays[0].shape[-self.event :]
            rows = [a if a.ndim == self.event + 1 else a.reshape(-1, *tail) for a in arrays]
            return rows[0] if len(rows) == 1 else np.concatenate(rows)
        return arrays[0].reshape(-1) if len(arrays) == 1 else np.concatenate(arrays, axis=None)

    def read_mask(self, option: Any) -> bool:
        """Sets ``m`` and ``count``; False where the general path must run."""
        if option is None:
            self.m, self.count = None, self.n
            return True
        got = self._values(option)
        if got is None or len(got) != len(self.arrays):
            return False
        kind = got[0].dtype
        for f, a in zip(got, self.arrays, strict=True):
            if f.dtype != kind or f.shape != self.tokens(a):
                return False
        if kind.kind not in "biuf":
            return False
        m = got[0].reshape(-1) if len(got) == 1 else np.concatenate(got, axis=None)
        if m.dtype != np.bool_:
            m = m.astype(np.bool_)  # as m != 0 (NaN counts), in one cheap pass
        count = int(np.count_nonzero(m))
        self.count = count
        self.m = None if count == m.shape[0] else m
        return True

    def weight(self, how: str) -> Any:
        """The one weight of ``reduce``: None for "sum", 1/N in the compute dtype for "mean"
        (made once per dtype and N: a NumPy scalar's division costs ~0.3 us a call)."""
        if how == "sum":
            return None
        key = (self.dtype, self.count)
        w = _WEIGHTS.get(key)
        if w is None:
            w = _WEIGHTS.put(key, self.dtype.type(1.0) / max(self.count, 1))
        return w

    def mean(self, total: Any) -> Any:
        return total / max(self.count, 1)

    def peak(self, p: np.ndarray, nonnegative: bool = False) -> Any:
        """max of ``p`` over counted tokens, 0 when none counts (as ``Batch.max``)."""
        if p.shape[0] == 0:
            return self.dtype.type(0.0)
        if self.m is None or nonnegative:  # (uncounted tokens hold p = 0 <= max)
            return np.maximum.reduce(p, axis=None)
        if self.count == 0:  # (not top == -inf: counted tokens whose p are all -inf have it)
            return self.dtype.type(0.0)
        return np.max(p, where=self.m, initial=-np.inf)

    def total(self, p: np.ndarray) -> Any:
        """Σ of ``p`` over counted tokens (``p`` is anything at uncounted ones)."""
        if self.m is None:
            return np.add.reduce(p, axis=None)
        return np.sum(p, where=self.m)

    def zero_uncounted(self, g: np.ndarray) -> None:
        if self.m is not None:
            np.copyto(g, 0.0, where=~self._mask_like(g))

    def grads(self, g: np.ndarray) -> Any:
        """``g`` over the flat input back to the structure of ``logprobs``."""
        arrays = self.arrays
        if not self.is_list:  # one array: g in its shape and dtype, no walk
            a = arrays[0]
            if g.shape != a.shape:
                g = g.reshape(a.shape)
            return g if g.dtype == a.dtype else g.astype(a.dtype)
        out = []
        start = 0
        for a in arrays:
            k = a.size // math.prod(a.shape[-self.event :]) if self.event else a.size
            piece = g if len(arrays) == 1 else g[start : start + k]
            start += k
            if piece.shape != a.shape:
                piece = piece.reshape(a.shape)
            if piece.dtype != a.dtype:
                piece = piece.astype(a.dtype)
            out.append(piece)
        return out


_A = np.asarray  # metrics are 0-d arrays, written as dict literals: ~0.4 us a call less
# than a helper taking keywords


def _value(total: Any, w: Any) -> np.ndarray:
    return _A(total if w is None else total * w)


def _scaled(g: np.ndarray, w: Any) -> np.ndarray:
    if w is not None:
        g *= w
    return g


# ---- elementwise penalties ---------------------------------------------------------------------
Result = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]


def _finite(value: float, c: _Call) -> Any:
    """A bound, center or δ in the compute dtype, clamped to its finite range (``scalar``),
    made once per value and dtype."""
    key = (value, c.dtype)
    got = _SCALARS.get(key)
    if got is None:
        top = _TOPS.get(c.dtype)
        if top is None:
            top = _TOPS[c.dtype] = float(np.finfo(c.dtype).max)
        got = _SCALARS.put(key, c.dtype.type(min(max(float(value), -top), top)))
    return got


def _clipped(u: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """``clip(u, lo, hi)`` (a bound None: none on that side), a new array: ``np.clip``, one
    pass, beyond 2048 elements; below, ``np.minimum``/``np.maximum``, whose calls cost less
    (float32, timed: at 35K elements 6 us against 27, at 8K 3.6 against 7.4, at 2K the
    same, at 1K 2.8 against 2.0)."""
    if u.size > _CLIP and (lo is not None or hi is not None):
        return np.clip(u, lo, hi)  # type: ignore[no-any-return]
    if hi is not None:
        u = np.minimum(u, hi)
    if lo is not None:
        u = np.maximum(u, lo)
    return u


def _deviation(reg: Any, c: _Call) -> np.ndarray:
    """``u = clip(t) - center`` (``deviation`` of the L2 family), 0 at uncounted tokens (where
    every penalty of the family is 0 with slope 0)."""
    o = reg._opts
    clip, center = o["clip"], o["center"]
    u = c.x
    if clip is not None:
        lo, hi = (None if b is None else _finite(b, c) for b in clip)
        u = _clipped(u, lo, hi)
    if center == "mean":
        total = c.total(u)
        u = u - total / max(c.count, 1)  # the local mean (no counts= on this path)
    elif center is not None:
        u = u - _finite(center, c)
    if c.m is not None and u is not c.x:
        c.zero_uncounted(u)
    return u


def _deviation_grad(reg: Any, c: _Call, g: np.ndarray) -> np.ndarray:
    """``center_grad`` and ``clip_grad`` of the L2 family on ``g`` = w · dp/du (in place)."""
    o = reg._opts
    if o["center"] == "mean":
        g -= np.add.reduce(g, axis=None) / max(c.count, 1)  # uncounted tokens hold 0
        c.zero_uncounted(g)
    clip = o["clip"]
    if clip is not None:
        lo, hi = (None if b is None else _finite(b, c) for b in clip)
        x = c.x
        if lo is not None:
            np.copyto(g, 0.0, where=x < lo)
        if hi is not None:
            np.copyto(g, 0.0, where=x > hi)
    return g


def _plain(reg: Any) -> bool:
    o = reg._opts
    return o["clip"] is None and o["center"] is None


def l1(reg: Any, c: _Call, w: Any) -> Result | None:
    x = c.x
    raw = np.add.reduce(np.abs(x), axis=None)
    g = _scaled(np.sign(x), w)  # 0 at uncounted tokens (they hold 0)
    return _value(raw, w), {"l1_raw": _A(raw), "l1_mean": _A(c.mean(raw))}, g


def l2(reg: Any, c: _Call, w: Any) -> Result | None:
    x = _deviation(reg, c)
    raw, peak = squares(x)
    g = x * c.dtype.type(2.0 if w is None else 2.0 * w)
    if not _plain(reg):
        g = _deviation_grad(reg, c, g)
    return _value(raw, w), {"l2_raw": _A(raw), "l2_mean": _A(c.mean(raw)), "l2_max": _A(peak)}, g


def huber(reg: Any, c: _Call, w: Any) -> Result | None:
    d = _finite(reg._opts["delta"], c)
    if not huber_form_fits(float(d), _TOPS[c.dtype]):  # (_finite has cached the dtype's max)
        return None
    x = _deviation(reg, c)
    a = np.abs(x)
    q = np.minimum(a, d)  # p = q (|u| - q / 2): ½u² where |u| <= δ, δ(|u| - ½δ) beyond
    t = np.multiply(q, 0.5)
    np.subtract(a, t, out=t)
    raw = np.dot(q, t)  # Σ q·t without the array p
    # max p: p at max |u| (p's rounding is monotone in |u|: q, |u| - q/2 and their product
    # each are), the same scalar arithmetic as the arrays' in the compute dtype
    if a.shape[0]:
        top = np.maximum.reduce(a)
        qt = np.minimum(top, d)
        peak = qt * (top - qt * c.dtype.type(0.5))
    else:
        peak = c.dtype.type(0.0)
    # the slope clip(u, -δ, δ), exactly: min(|u|, δ) with u's sign (NaN stays NaN) in one
    # call, not the two of a clip (1 us against 2 at 1e3)
    g = np.copysign(q, x)
    if w is not None:
        g *= w
    if not _plain(reg):
        g = _deviation_grad(reg, c, g)
    metrics = {"huber_raw": _A(raw), "huber_mean": _A(c.mean(raw)), "huber_max": _A(peak)}
    return _value(raw, w), metrics, g


def elastic_net(reg: Any, c: _Call, w: Any) -> Result | None:
    x = _deviation(reg, c)
    alpha = float(reg._opts["l1_ratio"])
    # Σp from the two sums the metrics report (Σ|u| and Σu² by a dot), no p array: the
    # same value up to the order of the additions
    l1_raw, l2_raw = np.add.reduce(np.abs(x), axis=None), np.dot(x, x)
    if alpha == 1.0:
        raw = l1_raw
    elif alpha == 0.0:
        raw = l2_raw
    else:
        raw = alpha * l1_raw + (1.0 - alpha) * l2_raw
    one = 1.0 if w is None else w  # reduce's weight folded into the slope's coefficients
    if alpha == 1.0:
        g = np.sign(x)
        if w is not None:
            g *= w
    elif alpha == 0.0:
        g = x * c.dtype.type(2.0 * one)
    else:
        g = np.sign(x)
        g *= alpha * one
        g += x * ((2.0 - 2.0 * alpha) * one)
    if not _plain(reg):
        g = _deviation_grad(reg, c, g)
    metrics = {
        "elastic_net_raw": _A(raw),
        "elastic_net_mean": _A(c.mean(raw)),
        "l1_raw": _A(l1_raw),
        "l2_raw": _A(l2_raw),
    }
    return _value(raw, w), metrics, g


def sampled_kl(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    if o["behavior"] is not None or o["log_ratio_clip"] is not None:
        return None
    r = c.field(o["reference"])
    if r is None:
        return None
    estimator = o["estimator"]
    d = c.x - r
    if estimator == "k3":
        e = np.expm1(np.negative(d))
        p = e + d
        dk = np.negative(e, out=e)  # 1 - e^{-d}
    elif estimator == "k2":
        p, dk = 0.5 * (d * d), d
    elif estimator == "abs":
        p, dk = np.abs(d), np.sign(d)
    else:  # k1
        p, dk = d, np.ones_like(d)
    g = dk + p if o["gradient"] == "unbiased" else dk if dk is not d else dk.copy()
    c.zero_uncounted(g)
    raw = np.add.reduce(p, axis=None)  # uncounted tokens: d = 0, p = 0
    metrics = {
        "sampled_kl_raw": _A(raw),
        "sampled_kl_mean": _A(c.mean(raw)),
        "sampled_kl_max": _A(c.peak(p)),
        "log_ratio_mean": _A(c.mean(np.add.reduce(d, axis=None))),
    }
    return _value(raw, w), metrics, _scaled(g, w)


def sampled_entropy(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    if o["behavior"] is not None:
        return None
    x = c.x
    total = np.add.reduce(x, axis=None)  # Σ rho·lp, rho = 1 (its value) where lp is finite
    if not math.isfinite(total):  # (a NumPy scalar: cheaper than np.isfinite, no warning)
        return None  # ±inf or NaN somewhere: rho = exp(lp - lp) is NaN there
    g = x + 1.0  # rho·(lp + 1)
    if o["mode"] == "maximize":
        raw = total
        if w is not None:
            g *= w
    else:
        raw = -total
        g *= -1.0 if w is None else -w
    c.zero_uncounted(g)
    metrics = {
        "sampled_entropy_raw": _A(raw),
        "sampled_entropy_mean": _A(c.mean(raw)),
        "entropy_mean": _A(c.mean(-total)),
    }
    return _value(raw, w), metrics, g


def consistency(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    how = o["metric"]
    if how != "mse" and how != "l1":
        return None
    y = c.field(o["paired"])
    if y is None:
        return None
    d = c.x - y
    if how == "mse":
        p = d * d
        g = d * c.dtype.type(2.0 if w is None else 2.0 * w)
    else:
        p = np.abs(d)
        g = _scaled(np.sign(d), w)
    raw = np.add.reduce(p, axis=None)
    if raw != raw:  # NaN: maybe -inf in both arrays (not counted there): the general path
        return None
    metrics = {
        "consistency_raw": _A(raw),
        "consistency_mean": _A(c.mean(raw)),
        "consistency_max": _A(c.peak(p, True)),
    }
    return _value(raw, w), metrics, g


# ---- penalties over a class axis (rows [n, V], the axis last) ----------------------------------
def _blocks(n: int, v: int) -> Sequence[slice]:
    step = max(1, _ROWS // max(v, 1))
    if n <= step:  # one block (every call at small sizes): no list to build
        return _WHOLE
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


_WHOLE = (slice(None),)


def _exp_shifted(z: np.ndarray, out: np.ndarray | None = None) -> tuple[Any, Any, Any]:
    """``(top, e, s)`` of rows ``z``: the row max, ``exp(z - top)`` (into ``out`` where
    given) and its row sum (so that softmax is ``e / s`` and logsumexp ``top + log s``)."""
    top = np.maximum.reduce(z, axis=-1, keepdims=True)
    e = np.subtract(z, top) if out is None else np.subtract(z, top, out=out)
    np.exp(e, out=e)
    return top, e, np.add.reduce(e, axis=-1, keepdims=True)


def _shifted(z: np.ndarray, out: np.ndarray | None = None) -> tuple[Any, Any, Any]:
    """``(z - top, e, s)`` of rows ``z``: as :func:`_exp_shifted`, with the shifted rows
    kept (a new array; ``e``, their exp, into ``out`` where given) for a caller that reads
    them again (``log p = (z - top) - log s``), instead of subtracting twice."""
    zt = z - np.maximum.reduce(z, axis=-1, keepdims=True)
    e = np.exp(zt) if out is None else np.exp(zt, out=out)
    return zt, e, np.add.reduce(e, axis=-1, keepdims=True)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ a·b per row (one temporary; einsum's call costs more on small blocks)."""
    out: np.ndarray = np.add.reduce(a * b, axis=-1)
    return out


def _rows_finish(
    c: _Call,
    w: Any,
    prefix: str,
    p: np.ndarray,
    g: np.ndarray,
    raw: Any = None,
    weighted: bool = False,
    **totals: Any,
) -> Result:
    """Value and metrics of the per-token ``p`` (``raw``: its total over counted tokens,
    where the kernel has summed it already), the mean of each further metric from its
    total in ``totals``, and the gradient with uncounted tokens zeroed and ``reduce``'s
    weight (``weighted``: the kernel has applied it, on the way)."""
    if raw is None:
        raw = c.total(p)
    c.zero_uncounted(g)
    metrics = {
        f"{prefix}_raw": _A(raw),
        f"{prefix}_mean": _A(c.mean(raw)),
        f"{prefix}_max": _A(c.peak(p)),
    }
    for k, total in totals.items():
        metrics[k] = _A(c.mean(total))
    return _value(raw, w), metrics, g if weighted else _scaled(g, w)


def _axis_last(reg: Any, c: _Call) -> bool:
    axis = reg._opts["axis"]
    return axis == -1 or all([axis == a.ndim - 1 for a in c.arrays])  # noqa: C419


def entropy(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    if o["mode"] != "minimize" or o["normalize"] or o["threshold"] is not None:
        return None
    if o["temperature"] != 1.0 or not _axis_last(reg, c):
        return None
    x = c.x
    n, v = x.shape
    h = np.empty(n, dtype=c.dtype)
    g = np.empty_like(x)
    for sl in _blocks(n, v):
        z = x[sl]
        logp, e, s = _shifted(z, g[sl])
        logp -= np.log(s)  # (z - top) - log s, as log_normalize has it
        e /= s  # p
        minus = _rowdot(e, logp)  # -H
        np.negative(minus, out=h[sl])
        np.subtract(minus[:, None], logp, out=logp)  # -(log p + H)
        e *= logp
    total = c.total(h)
    if not math.isfinite(total):
        return None  # -inf classes, all -inf rows, NaN or +inf: the general path
    return _rows_finish(c, w, "entropy", h, g, raw=total)


def kl(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    if o["direction"] != "reverse" or o["temperature"] != 1.0 or not _axis_last(reg, c):
        return None
    r = c.field(o["reference"])
    if r is None:
        return None
    x = c.x
    n, v = x.shape
    k = np.empty(n, dtype=c.dtype)
    g = np.empty_like(x)
    for sl in _blocks(n, v):
        z, y = x[sl], r[sl]
        diff, e, s = _shifted(z, g[sl])  # (diff: z - top, where log p - log q starts)
        e /= s  # p
        ytop = np.maximum.reduce(y, axis=-1, keepdims=True)
        yd = y - ytop
        q = np.exp(yd)
        # log p - log q = (z - top) - (y - ytop) - (log s - log s_q), as log_normalize's
        # raw logs: neither lse is rounded to a unit of its max, nor z - y to one of its own
        shift = np.log(s)
        shift -= np.log(np.add.reduce(q, axis=-1, keepdims=True))
        diff -= yd
        diff -= shift
        kb = np.add.reduce(e * diff, axis=-1, out=k[sl])  # Σ p (log p - log q) per row
        diff -= kb[:, None]
        e *= diff  # p (log p - log q - KL)
    total = c.total(k)
    if not math.isfinite(total):
        return None
    return _rows_finish(c, w, "kl", k, g, raw=total)


def _log_softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log p, p)`` of rows ``z`` (finite rows: the caller checks the result)."""
    logp, e, s = _shifted(z)
    e /= s
    logp -= np.log(s, out=s)  # (z - top) - log s, as log_normalize has it
    return logp, e


def jsd(reg: Any, c: _Call, w: Any) -> Result | None:
    o = reg._opts
    if o["temperature"] != 1.0 or not _axis_last(reg, c):
        return None
    r = c.field(o["reference"])
    if r is None:
        return None
    beta = float(o["beta"])
    log_b, log_1b = math.log(beta), math.log1p(-beta)
    x = c.x
    n, v = x.shape
    k = np.empty(n, dtype=c.dtype)
    g = np.empty_like(x)
    one_b = c.dtype.type((1.0 - beta) if w is None else (1.0 - beta) * w)  # (with reduce's weight)
    for sl in _blocks(n, v):
        logp, p = _log_softmax(x[sl])
        logq, q = _log_softmax(r[sl])
        logm = np.logaddexp(logq + log_b, logp + log_1b)
        np.subtract(logq, logm, out=logq)
        kl_q = _rowdot(q, logq)
        np.subtract(logp, logm, out=logp)
        kl_p = _rowdot(p, logp)
        kb = k[sl]
        np.multiply(kl_q, beta, out=kb)
        kb += (1.0 - beta) * kl_p
        logp -= kl_p[:, None]
        logp *= p
        np.multiply(logp, one_b, out=g[sl])  # (1 - β) p (log p - log m - KL(p‖m))
    total = c.total(k)
    if not math.isfinite(total):
        return None  # -inf classes (0 · -inf), rows of all -inf, NaN or +inf: general path
    return _rows_finish(c, w, "jsd", k, g, raw=total, weighted=True)


def z_loss(reg: Any, c: _Call, w: Any) -> Result | None:
    if not _axis_last(reg, c):
        return None
    x = c.x
    n, v = x.shape
    lz = np.empty(n, dtype=c.dtype)
    g = np.empty_like(x)
    two = c.dtype.type(2.0 if w is None else 2.0 * w)  # (reduce's weight, on [n] not [n, V])
    for sl in _blocks(n, v):
        z = x[sl]
        top, e, s = _exp_shifted(z, g[sl])
        lse = top + np.log(s)
        lz[sl] = lse[:, 0]
        e *= (two * lse) / s  # 2 log Z · softmax(z)
    total = c.total(lz)
    if not math.isfinite(total):
        return None
    return _rows_finish(c, w, "z_loss", lz * lz, g, weighted=True, log_z_mean=total)


def gradient_penalty(reg: Any, c: _Call, w: Any) -> Result | None:
    if not _axis_last(reg, c):
        return None
    x = c.x
    v = x.shape[1]
    sq = _rowdot(x, x)
    tiny = _TINY.get(c.dtype)
    if tiny is None:
        info = np.finfo(c.dtype)
        tiny = _TINY[c.dtype] = float(info.tiny) / float(info.eps)
    # no square overflowed, and none that underflowed matters (no counted row is 0 or tiny):
    # else the general path, which scales each row by its largest |g| first
    if c.m is not None:
        low = np.min(sq, where=c.m, initial=np.inf)
    else:
        low = np.minimum.reduce(sq, initial=np.inf)
    if not (math.isfinite(c.total(sq)) and low > v * tiny):
        return None
    norm = np.sqrt(sq)
    d = norm - c.dtype.type(reg._opts["target_norm"])
    p = d * d
    raw = np.dot(d, d) if c.m is None else None  # (Σ p, where every row counts)
    slope = d * c.dtype.type(2.0 if w is None else 2.0 * w)  # (reduce's weight, per row)
    slope /= norm
    g = x * slope[:, None]
    return _rows_finish(
        c, w, "gradient_penalty", p, g, raw=raw, weighted=True, grad_norm_mean=c.total(norm)
    )


def orthogonality(reg: Any, c: _Call, w: Any) -> Result | None:
    """Mean |cos| between the rows (or columns) of each matrix; matrices ``[N, r, k]``."""
    o = reg._opts
    if o["kind"] != "cosine" or c.m is not None:
        return None
    x = c.x
    a = x if o["mode"] == "rows" else x.transpose(0, 2, 1)
    r = a.shape[1]
    if r < 2:
        return None
    sq = np.add.reduce(a * a, axis=-1)  # [N, r]
    total = np.add.reduce(sq, axis=None)
    if not math.isfinite(total) or (sq.size and not sq.min() > 0):
        return None  # a zero row, or ±inf or NaN: the general path (its double where)
    inv = 1.0 / np.sqrt(sq)
    col, row = inv[:, :, None], inv[:, None, :]
    cos = np.matmul(a, a.transpose(0, 2, 1))
    cos *= col
    cos *= row
    mag = np.abs(cos)
    pairs = float(r * (r - 1))  # ordered pairs: each distinct pair counted twice
    diag = np.arange(r)
    over = bool(
        np.maximum.reduce(mag, axis=None, initial=0.0) > 1.0
    )  # (rounding: |c| <= 1 exactly)
    clipped = np.minimum(mag, 1.0) if over else mag
    clipped[:, diag, diag] = 0.0
    p = np.add.reduce(clipped, axis=(-2, -1)) / pairs
    sgn = np.sign(cos)
    if over:
        np.copyto(sgn, 0.0, where=mag > 1.0)  # the clip holds |c| at 1: slope 0
    sgn[:, diag, diag] = 0.0
    sgn /= pairs
    u = a * col
    along = np.add.reduce(sgn * cos, axis=-1)[:, :, None]
    g = np.matmul(sgn, u)
    g -= along * u
    g *= 2.0 * col
    if o["mode"] != "rows":
        g = np.ascontiguousarray(g.transpose(0, 2, 1))
    return _rows_finish(c, w, "orthogonality", p, g)


KERNELS: dict[str, tuple[int, Any]] = {
    "l1_sparsity": (0, l1),
    "l2_weight_decay": (0, l2),
    "huber": (0, huber),
    "elastic_net": (0, elastic_net),
    "sampled_kl": (0, sampled_kl),
    "sampled_entropy": (0, sampled_entropy),
    "consistency": (0, consistency),
    "entropy": (1, entropy),
    "kl": (1, kl),
    "jsd": (1, jsd),
    "z_loss": (1, z_loss),
    "gradient_penalty": (1, gradient_penalty),
    "orthogonality": (2, orthogonality),
}


def _parse(data: Any, logprobs: Any) -> tuple[list[np.ndarray], bool] | None:
    """The arrays of ``logprobs`` (NumPy floats of one dtype) and whether it is a list."""
    if data is not None and type(data) is not dict:
        return None
    if type(logprobs) is np.ndarray:
        arrays, is_list = [logprobs], False
    elif type(logprobs) in (list, tuple) and logprobs:
        arrays, is_list = list(logprobs), True
        if not all([type(a) is np.ndarray for a in arrays]):  # noqa: C419
            return None
    else:
        return None
    dtype = arrays[0].dtype
    if dtype.type not in _FLOATS:
        return None
    if is_list and not all([a.dtype == dtype for a in arrays]):  # noqa: C419
        return None
    return arrays, is_list


def _call(reg: Any, event: int, parsed: tuple[list[np.ndarray], bool], data: Any, x: Any) -> Any:
    """The :class:`_Call` of ``reg`` over the parsed input (``x``: its flat values in the
    compute dtype, if already made), or None where the general path must run."""
    arrays, is_list = parsed
    c = _Call()
    c.arrays, c.is_list, c.data, c.event = arrays, is_list, data, event
    if event:  # no class axis, an empty one, or different sizes: the general path
        first = arrays[0]
        if first.ndim < event:
            return None
        tail = first.shape[-event:]
        if not math.prod(tail):
            return None
        if is_list and any(a.ndim < event or a.shape[-event:] != tail for a in arrays[1:]):
            return None
    dtype = arrays[0].dtype
    c.dtype = _F32 if dtype.type is np.float16 else dtype
    if x is None:
        x = c._flat(arrays)
        if x.dtype != c.dtype:
            x = x.astype(c.dtype)
    c.n, c.flat = x.shape[0], x
    if not c.read_mask(reg._opts["mask"]):
        return None
    if c.m is not None:
        x = _zeroed(x, c._mask_like(x))
    c.x = x
    return c


def _zeroed(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x`` with 0 where the bool ``m`` is False: the product ``x · m`` where it is exact,
    which its sum tells (finite: no inf or NaN met a 0, and the counted entries are ``x``'s
    own), else ``where`` (NaN or inf in ``x``, or a sum beyond the dtype's range). Timed on
    float32: at 35K elements 8 + 5 us against 30 for ``where``, at 16K 7.8 against 14.3,
    at 4K 3.4 against 4.5; at 1K 2.2 against 2.0 (so ``where`` up to :data:`_PRODUCT`)."""
    if x.size > _PRODUCT:
        with np.errstate(invalid="ignore", over="ignore"):  # (0 · inf: told by the sum)
            z: np.ndarray = x * m
            total = np.add.reduce(z, axis=None)
        if math.isfinite(total):
            return z
    return np.where(m, x, 0)


_PRODUCT = 2048  # elements beyond which the mask's product (and its check) beats ``where``
_CLIP = 2048  # elements beyond which ``np.clip`` beats ``np.minimum`` and ``np.maximum``


def terms(
    group: list[tuple[str, Any, float]], data: Any, logprobs: Any
) -> tuple[dict[str, tuple[Any, dict[str, Any]]], list[np.ndarray]] | None:
    """A Pipeline's elementwise terms over one NumPy input (no ``counts=``): each term's
    ``(value, metrics)`` and the gradient of Σ weight · value as one array per array of
    ``logprobs``, from one flat copy of the input; None unless every term has a kernel
    here that takes it."""
    parsed = _parse(data, logprobs)
    if parsed is None:
        return None
    results: dict[str, tuple[Any, dict[str, Any]]] = {}
    out: Any = None
    x: Any = None
    c: Any = None
    for name, reg, weight in group:
        entry = KERNELS.get(reg.name)
        o = reg._opts
        how = o["reduce"]
        if entry is None or entry[0] or (how != "sum" and how != "mean"):
            return None
        if o["target"] != "logprobs":
            return None
        c = _call(reg, 0, parsed, data, x)
        if c is None:
            return None
        x = c.flat  # the unmasked flat input, shared by the terms (no kernel writes to it)
        got = entry[1](reg, c, c.weight(how))
        if got is None:
            return None
        value, metrics, g = got
        results[name] = (value, metrics)
        if out is None:
            out = g
            if weight != 1.0:
                out *= weight
        else:
            out += g * weight
    if c is None:
        return None
    grads = c.grads(out)
    return results, grads if c.is_list else [grads]


def value_and_grad(reg: Any, data: Any, logprobs: Any) -> Result | None:
    """``(value, metrics, g)`` of ``reg.value_and_grad(data, logprobs)`` (no ``mask=`` or
    ``counts=`` given to the call), or None: the general path."""
    entry = KERNELS.get(reg.name)
    if entry is None:
        return None
    o = reg._opts
    how = o["reduce"]
    if (how != "sum" and how != "mean") or o["target"] != "logprobs":
        return None
    parsed = _parse(data, logprobs)
    if parsed is None:
        return None
    event, kernel = entry
    c = _call(reg, event, parsed, data, None)
    if c is None:
        return None
    w = c.weight(how)
    if event or kernel is consistency:  # may meet -inf - -inf before declining: no warning
        with np.errstate(all="ignore"):
            got = kernel(reg, c, w)
    else:
        got = kernel(reg, c, w)
    if got is None:
        return None
    value, metrics, g = got
    return value, metrics, c.grads(g)
