"""NumPy fast path for ``compute``: blocked evaluation, one read of the input from memory.

The generic path builds full-size temporaries (``|x|``, ``x²``, the clipped copy) and reads
them again for each metric. Here the input is walked in blocks that fit the CPU cache: each
block is read from memory once, and every further operation (abs, clip, square, the sums and
the extrema) runs on a block already in cache, into one reused buffer. Block results are
accumulated in float64 and cast to the compute dtype at the end. ``L2`` with
``center="mean"`` combines per-block means and squared deviations with Chan's parallel
formula, so it needs no second pass over memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._core.ops import clamp
from .common import chan_merge, huber_form_fits, reduced

BLOCK = 1 << 16  # elements: 256 KiB of float32 (512 KiB of float64), inside a 1 MiB L2 cache
STREAM = 1 << 18  # elements per block of compute's walk over a large input (see _blocks)
_FLOATS = (np.float16, np.float32, np.float64)


def _arrays(logprobs: Any) -> list[np.ndarray] | None:
    arrays = list(logprobs) if type(logprobs) in (list, tuple) else [logprobs]
    if not arrays or any(type(a) is not np.ndarray or a.dtype.type not in _FLOATS for a in arrays):
        return None  # the generic path validates and raises the proper errors
    return arrays


def _blocks(arrays: list[np.ndarray]) -> Any:
    """Views of ``STREAM`` elements. Measured at 1e7 float32 on a 1 MiB L2 cache: L1's
    abs-then-sum walk takes 2.5 ms in blocks of 2^18 against 3.5 in blocks of 2^16 (which
    fit the cache): ``np.abs`` from memory into the buffer runs faster on the longer runs."""
    step = STREAM
    for a in arrays:
        flat = a.reshape(-1)
        for i in range(0, flat.shape[0], step):
            yield flat[i : i + step]


_ROW = 1024
_ONES: dict[Any, np.ndarray] = {}  # per (dtype, row): ones, read-only (shared by threads)


def _sum(b: np.ndarray) -> float:
    """``Σ b`` of a 1-D block, as a float: row sums of ``_ROW`` elements by a BLAS
    matrix-vector product, then NumPy's pairwise sum of those. On a cached block of 2^18
    float32 it is about twice as fast as ``b.sum()`` and as accurate (mean relative error
    4.4e-8 against 4.9e-8; one BLAS dot with a vector of ones: 1.1e-7)."""
    row = _ROW
    m = b.shape[0] - b.shape[0] % row
    ones = _ONES.get((b.dtype, row))
    if ones is None:
        ones = np.ones(row, dtype=b.dtype)
        ones.flags.writeable = False
        ones = _ONES.setdefault((b.dtype, row), ones)
    head = float(np.add.reduce(np.dot(b[:m].reshape(-1, row), ones))) if m else 0.0
    return head + float(np.add.reduce(b[m:]))


def _one_block(reg: Any, logprobs: Any) -> bool:
    """One NumPy array of float32 or float64 logprobs that fits a block: the whole-array
    form (``_small_l1``, ``_small_l2``)."""
    return (
        type(logprobs) is np.ndarray
        and logprobs.size <= BLOCK
        and logprobs.dtype.type in _SMALL
        and reg._opts["target"] == "logprobs"
    )


def _prepared(reg: Any, logprobs: Any) -> Any:
    """``("small", x)`` for an input that fits one block, ``("blocks", arrays, dtype, n)``
    otherwise, or None where the generic path must run (it validates and raises)."""
    if _one_block(reg, logprobs):
        return ("small", logprobs)
    arrays = _arrays(logprobs)
    if arrays is None:
        return None
    if len(arrays) > 1 and all(a.size < BLOCK for a in arrays):
        # A ragged batch of short datums: one concatenation, not a Python loop per datum.
        flat = np.concatenate([a.reshape(-1) for a in arrays])
        if flat.dtype.type in _SMALL and flat.size <= BLOCK and reg.target == "logprobs":
            return ("small", flat)
        arrays = [flat]
    dtype = np.result_type(*arrays)
    if dtype == np.float16:
        dtype = np.dtype(np.float32)
    return ("blocks", arrays, dtype, sum(a.size for a in arrays))


def l1(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L1's value and metrics: Σ|x| (or Σ exp(x)) block by block."""
    if _one_block(reg, logprobs):  # (_prepared's first case, without building its tuple)
        return _small_l1(reg, logprobs)
    got = _prepared(reg, logprobs)
    if got is None:
        return None
    if got[0] == "small":
        return _small_l1(reg, got[1])
    _, arrays, dtype, n = got
    buf = np.empty(min(n, STREAM), dtype=dtype)
    probs = reg.target == "probs"
    raw = 0.0
    for block in _blocks(arrays):
        b = buf[: block.shape[0]]
        if probs:
            np.exp(block, out=b, dtype=dtype)  # not the float16 loop
        else:
            np.abs(block, out=b)
        raw += _sum(b)
    return _out(reg, {"l1_raw": raw, "l1_mean": raw / max(n, 1)}, dtype)


def l2(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L2's value and metrics: clip, center and square block by block (Chan's merge for
    ``center="mean"``)."""
    if _one_block(reg, logprobs):  # (_prepared's first case, without building its tuple)
        return _small_l2(reg, logprobs)
    got = _prepared(reg, logprobs)
    if got is None:
        return None
    if got[0] == "small":
        return _small_l2(reg, got[1])
    _, arrays, dtype, n = got
    buf = np.empty(min(n, STREAM), dtype=dtype)
    probs = reg.target == "probs"

    lo, hi = (_finite(b, dtype) for b in reg.clip) if reg.clip is not None else (None, None)
    center = _finite(reg.center, dtype) if isinstance(reg.center, float) else reg.center
    shifted = center is not None and center != "mean"  # shifted in place: work on a copy

    def prepare(block: np.ndarray) -> np.ndarray:
        b = buf[: block.shape[0]]
        if probs:
            np.exp(block, out=b, dtype=dtype)  # not the float16 loop
            if lo is not None or hi is not None:
                np.clip(b, lo, hi, out=b)
        elif lo is not None or hi is not None:
            np.clip(block, lo, hi, out=b, dtype=dtype)  # bounds in the compute dtype
        elif block.dtype == dtype and not shifted:
            return block  # read-only use: no copy
        else:
            b[...] = block
        return b

    if center == "mean":
        count, mean, m2, total = 0, 0.0, 0.0, 0.0
        cmin, cmax = float("inf"), float("-inf")
        for block in _blocks(arrays):
            b = prepare(block)
            k = b.shape[0]
            bsum = _sum(b)
            total += bsum
            bmean = bsum / k
            cmin = _nan_min(cmin, float(b.min()))
            cmax = _nan_max(cmax, float(b.max()))
            count, mean, m2 = chan_merge(count, mean, m2, k, bmean, _deviations(b, bmean, buf))
        if n and not np.isfinite(mean):
            # the mean of the blocks' sums (Chan's combination of infinite means is NaN):
            # Σ(c - m)² is then inf where every c is finite (a sum beyond the dtype's range:
            # each c - m is ∓inf) and NaN where c holds ±inf (inf - inf) or the mean is NaN,
            # as the extrema say
            mean = total / n
        high, low = (cmax - mean) * (cmax - mean), (cmin - mean) * (cmin - mean)
        peak = 0.0 if n == 0 else _nan_max(high, low)
        raw = m2 if np.isfinite(mean) else high + low
    else:
        shift = 0.0 if center is None else float(center)
        raw, peak = 0.0, 0.0
        for block in _blocks(arrays):
            b = prepare(block)
            if shift:
                b -= shift
            raw += float(np.dot(b, b))
            top, bottom = float(b.max()), float(b.min())
            peak = _nan_max(peak, _nan_max(top * top, bottom * bottom))
    return _out(reg, {"l2_raw": raw, "l2_mean": raw / max(n, 1), "l2_max": peak}, dtype)


_SMALL = (np.float32, np.float64)


def _deviations(b: np.ndarray, mean: float, buf: np.ndarray) -> float:
    """``Σ (b - mean)²`` of a block, ``mean`` its own mean (a float64): ``Σ b² - k·mean²``
    (one BLAS dot of the block in cache, no shifted copy) where the subtraction cancels at
    most half of ``Σ b²`` (one bit), as for logprobs, whose spread is as large as their
    mean; else the shifted block's dot (written into ``buf``; ``b`` may be the caller's).
    At 1e7 float32, L2(clip, center="mean") took 4.5 ms this way against 5.0. On blocks of
    2^18 float32 logprobs (k·mean² a sixth and a third of Σ b²) the relative error against
    float64 was 6e-8 and 6e-7, where the shifted dot's was 2e-5 and 5e-6 (its mean is
    rounded to float32 before the shift)."""
    sq = float(np.dot(b, b))
    k = int(b.shape[0])
    dev = k * mean * mean
    if sq - sq == 0 and dev <= 0.5 * sq:  # (finite, and little cancelled)
        return sq - dev
    d = np.subtract(b, mean, out=buf[:k])
    return float(np.dot(d, d))


def _finite(value: float | None, dtype: Any) -> float | None:
    """A bound or center clamped to the dtype's finite range, as ``ops.scalar`` does."""
    if value is None:
        return None
    top = _TOPS.get(dtype)
    if top is None:
        top = _TOPS[np.dtype(dtype)] = float(np.finfo(dtype).max)
    return clamp(value, top)


_TOPS: dict[Any, float] = {}  # the largest finite value of each dtype (np.finfo is slow)


def _small_l1(reg: Any, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """One array that fits a block: the whole-array form, with as few calls as possible."""
    n = x.size
    raw = np.add.reduce(np.abs(x), axis=None)
    mean = raw / n if n else raw
    return np.asarray(raw if reg._opts["reduce"] == "sum" else mean), {
        "l1_raw": np.asarray(raw),
        "l1_mean": np.asarray(mean),
    }


def _small_l2(reg: Any, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """One array that fits a block: the whole-array form, with as few calls as possible."""
    n = x.size
    o = reg._opts
    clip, center_opt = o["clip"], o["center"]
    if clip is None:
        c = x
    else:
        lo, hi = (_finite(b, x.dtype) for b in clip)
        c = np.clip(x, lo, hi)
    if center_opt is not None:
        center = _finite(center_opt, x.dtype) if center_opt != "mean" else None
        c = c - (c.mean() if center is None and n else center if n else 0.0)
        c = c.astype(x.dtype, copy=False)
    raw, peak = squares(c if c.ndim == 1 else c.reshape(-1))
    mean = raw / n if n else raw
    return np.asarray(raw if o["reduce"] == "sum" else mean), {
        "l2_raw": np.asarray(raw),
        "l2_mean": np.asarray(mean),
        "l2_max": np.asarray(peak),
    }


def squares(d: np.ndarray) -> tuple[Any, Any]:
    """``(Σ d², max d²)`` of a 1-D array, as scalars of its dtype, in two calls: the sum by
    a dot, the max as (max |d|)² (exactly: the squares of equal magnitudes are equal), one
    reduction where the extrema take two (at 1e3 float32: 1.4 us against 2.0); 0 for an
    empty array, and NaN for both where either is (as ``np.maximum`` and the generic path:
    a NaN in ``d``)."""
    raw = np.dot(d, d)
    if not d.shape[0]:
        return raw, d.dtype.type(0.0)
    top = np.maximum.reduce(np.abs(d))
    peak = top * top
    if peak != peak or raw != raw:
        return d.dtype.type("nan"), d.dtype.type("nan")
    return raw, peak


def _nan_max(a: float, b: float) -> float:
    return a if a != a or a >= b else b  # NaN wins, as in np.maximum


def _nan_min(a: float, b: float) -> float:
    return a if a != a or a <= b else b


def _out(reg: Any, metrics: dict[str, float], dtype: Any) -> tuple[Any, dict[str, Any]]:
    """Value and metrics as 0-d arrays of the compute dtype, from the float64 totals."""
    prefix = next(iter(metrics)).rsplit("_", 1)[0]
    value = reduced(reg, metrics[f"{prefix}_raw"], metrics[f"{prefix}_mean"])
    with np.errstate(over="ignore"):  # a float64 total beyond float32 is inf, as generic
        return np.asarray(value, dtype=dtype), {
            k: np.asarray(v, dtype=dtype) for k, v in metrics.items()
        }


FAST = {"l1_sparsity": l1, "l2_weight_decay": l2}


# ---- value_and_grad: value, metrics and the closed-form gradient in blocked passes ----------
# A kernel works on a prepared Batch (flat target in the compute dtype, uncounted tokens
# holding 0, the mask, the counts) when ``reduce`` aggregates with one weight (a number or a
# 0-d array: every mode but seq-mean-token-mean over ragged or masked sequences). It walks
# ``batch.values`` in blocks: each block is read from memory once per pass and its share of
# the gradient is written once, into the one preallocated output (``out``), with every other
# operation on a block-sized buffer already in cache. Totals accumulate in float64 across
# blocks. The gradient is d value / d ``batch.values`` times ``scale``, 0 at uncounted tokens,
# with the conventions of the generic closed forms (sign 0 at 0, the clip passes the gradient
# at its bounds, center="mean" differentiated).
#
# ``kernel(reg, batch, scale, out, add) -> (value, metrics) | None``: ``add`` adds the scaled
# gradient into ``out`` (a Pipeline's terms over one input) instead of writing it.


def _weight(batch: Any) -> float | None:
    """The one aggregation weight of ``reduce`` as a float, or None (a weight per token)."""
    w = batch.token_weights()
    if isinstance(w, float):
        return w
    return float(w) if np.ndim(w) == 0 else None


def _ranges(n: int) -> list[tuple[int, int]]:
    step = BLOCK
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _as(value: float, dtype: Any) -> Any:
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, as generic
        return np.asarray(value, dtype=dtype)


def _float(x: Any) -> float:
    return x if isinstance(x, (int, float)) else float(x)


def _results(
    batch: Any, w: float, prefix: str, raw: float, extra: dict[str, float], dtype: Any
) -> tuple[Any, dict[str, Any]]:
    count = max(_float(batch.count), 1.0)
    raw_a = _as(raw, dtype)
    value = raw_a if w == 1.0 else _as(raw * w, dtype)
    metrics = {f"{prefix}_raw": raw_a, f"{prefix}_mean": _as(raw / count, dtype)}
    metrics.update({k: _as(v, dtype) for k, v in extra.items()})
    return value, metrics


def l1_grad(
    reg: Any, batch: Any, scale: float, out: np.ndarray, add: bool
) -> tuple[Any, dict[str, Any]] | None:
    """L1: Σ|v| and scale · w · sign(v) block by block (uncounted tokens hold 0: sign 0)."""
    w = _weight(batch)
    if w is None:
        return None
    v = batch.values
    s = scale * w
    n = v.shape[0]
    tmp = np.empty(min(n, BLOCK), dtype=v.dtype)
    raw = 0.0
    for i, j in _ranges(n):
        vb, b = v[i:j], tmp[: j - i]
        np.abs(vb, out=b)
        raw += float(b.sum())
        if add:
            np.sign(vb, out=b)
            if s != 1.0:
                b *= s
            out[i:j] += b
        else:
            gb = out[i:j]
            np.sign(vb, out=gb)
            if s != 1.0:
                gb *= s
    return _results(batch, w, "l1", raw, {}, v.dtype)


class _Deviation:
    """What a penalty of ``u = clip(t) - center`` adds to the shared blocked passes."""

    prefix = ""
    zero_mean_grad = False  # Σ dp / N is 0 (but for rounding) when center="mean"

    def __init__(self, reg: Any, dtype: Any) -> None:
        self.reg, self.dtype = reg, dtype

    def stats(self, d: np.ndarray, tmp: np.ndarray, acc: list[float]) -> None:
        raise NotImplementedError

    def grad(self, d: np.ndarray, tmp: np.ndarray) -> None:
        """``d`` (a block of u, in place) to d p / d u."""
        raise NotImplementedError

    def metrics(self, acc: list[float], n: int) -> tuple[float, dict[str, float]]:
        raise NotImplementedError


def _peak(low: float, high: float) -> float:
    if low != low or high != high:
        return float("nan")
    return max(low * low, high * high)


class _L2(_Deviation):
    prefix = "l2"
    zero_mean_grad = True

    def stats(self, d: np.ndarray, tmp: np.ndarray, acc: list[float]) -> None:
        acc[0] += float(np.dot(d, d))
        if d.shape[0]:
            acc[1] = _nan_min(acc[1], float(d.min()))
            acc[2] = _nan_max(acc[2], float(d.max()))

    def grad(self, d: np.ndarray, tmp: np.ndarray) -> None:
        d *= 2.0

    def metrics(self, acc: list[float], n: int) -> tuple[float, dict[str, float]]:
        return acc[0], {"l2_max": _peak(acc[1], acc[2]) if n else 0.0}


class _Huber(_Deviation):
    prefix = "huber"

    def __init__(self, reg: Any, dtype: Any) -> None:
        super().__init__(reg, dtype)
        self.delta = float(np.asarray(_finite(reg.delta, dtype), dtype=dtype))

    def stats(self, d: np.ndarray, tmp: np.ndarray, acc: list[float]) -> None:
        if not d.shape[0]:
            return
        k = d.shape[0]
        a, m = tmp[:k], tmp[k : 2 * k]
        np.abs(d, out=a)
        np.minimum(a, self.delta, out=m)  # p = m (|u| - m / 2): ½u² near, δ(|u| - ½δ) far
        acc[1] = _nan_max(acc[1], float(a.max()))  # p grows with |u|: max p from max |u|
        m *= 0.5
        a -= m
        m *= 2.0
        acc[0] += float(np.dot(a, m))

    def grad(self, d: np.ndarray, tmp: np.ndarray) -> None:
        np.clip(d, -self.delta, self.delta, out=d)

    def metrics(self, acc: list[float], n: int) -> tuple[float, dict[str, float]]:
        a, delta = acc[1], self.delta
        peak = (
            0.0
            if not n
            else a
            if a != a
            else 0.5 * a * a
            if a <= delta
            else delta * (a - 0.5 * delta)
        )
        return acc[0], {"huber_max": peak}


class _ElasticNet(_Deviation):
    prefix = "elastic_net"

    def __init__(self, reg: Any, dtype: Any) -> None:
        super().__init__(reg, dtype)
        self.alpha = float(reg.l1_ratio)
        self.zero_mean_grad = self.alpha == 0.0

    def stats(self, d: np.ndarray, tmp: np.ndarray, acc: list[float]) -> None:
        a = tmp[: d.shape[0]]
        np.abs(d, out=a)
        acc[1] += float(a.sum())
        acc[2] += float(np.dot(d, d))

    def grad(self, d: np.ndarray, tmp: np.ndarray) -> None:
        alpha = self.alpha
        if alpha == 0.0:
            d *= 2.0
            return
        if alpha == 1.0:
            np.sign(d, out=d)
            return
        sign = tmp[: d.shape[0]]
        np.sign(d, out=sign)
        d *= 2.0 - 2.0 * alpha
        sign *= alpha
        d += sign

    def metrics(self, acc: list[float], n: int) -> tuple[float, dict[str, float]]:
        alpha, l1, l2 = self.alpha, acc[1], acc[2]
        raw = l1 if alpha == 1.0 else l2 if alpha == 0.0 else alpha * l1 + (1.0 - alpha) * l2
        return raw, {"l1_raw": l1, "l2_raw": l2}


_START = {"l2": [0.0, float("inf"), float("-inf")], "huber": [0.0, 0.0], "elastic_net": [0.0] * 3}


def _deviation_grad(
    kind: type[_Deviation], reg: Any, batch: Any, scale: float, out: np.ndarray, add: bool
) -> tuple[Any, dict[str, Any]] | None:
    """The passes shared by L2, Huber and ElasticNet: u = clip(v) - center, its statistics
    and scale · w · dp/du, 0 strictly outside the clip range and at uncounted tokens.

    ``center="mean"`` takes one pass more (for the mean, before any u exists), and, for a
    penalty whose dp/du does not average to 0, a last pass that subtracts its mean (what
    differentiating the mean gives) before the clip's zeros."""
    w = _weight(batch)
    if w is None:
        return None
    v, mask = batch.values, batch.mask
    dtype = v.dtype
    n = v.shape[0]
    spec = kind(reg, dtype)
    clip, center = reg.clip, reg.center
    lo, hi = (_finite(b, dtype) for b in clip) if clip is not None else (None, None)
    clipped = lo is not None or hi is not None
    s = scale * w
    ranges = _ranges(n)
    width = min(n, BLOCK)
    tmp = np.empty(2 * width, dtype=dtype)  # scratch of the penalty's own block operations
    dev = np.empty(width, dtype=dtype) if add or center == "mean" else None

    def counted(b: np.ndarray, i: int, j: int) -> None:
        if mask is not None:
            np.copyto(b, 0.0, where=~mask[i:j])

    def clip_into(b: np.ndarray, i: int, j: int) -> np.ndarray:
        vb = v[i:j]
        if clipped:
            np.clip(vb, lo, hi, out=b)
        else:
            b[...] = vb
        return b

    def outside(b: np.ndarray, i: int, j: int) -> None:
        vb = v[i:j]
        if lo is not None:
            np.copyto(b, 0.0, where=vb < lo)
        if hi is not None:
            np.copyto(b, 0.0, where=vb > hi)

    mu: Any = None
    if center == "mean":
        total = 0.0
        for i, j in ranges:
            b = clip_into(dev[: j - i], i, j)  # type: ignore[index]
            counted(b, i, j)
            total += float(b.sum())
        local = max(_float(batch._local), 1.0)
        with np.errstate(invalid="ignore"):
            mu = dtype.type(total / local)
    elif center is not None:
        mu = dtype.type(_finite(center, dtype))
    shift_pass = center == "mean" and not spec.zero_mean_grad
    # with a last pass, the unclipped gradient is kept whole until the mean of dp is known
    whole = out if not (add and shift_pass) else np.empty_like(v)
    acc = list(_START[spec.prefix])
    dsum = 0.0
    plain = not clipped and mu is None and mask is None
    for i, j in ranges:
        if plain and not add:  # u = v: statistics on the input, dp written into the output
            vb = v[i:j]
            spec.stats(vb, tmp, acc)
            gb = whole[i:j]
            gb[...] = vb
        else:
            gb = whole[i:j] if not add or shift_pass else dev[: j - i]  # type: ignore[index]
            clip_into(gb, i, j)
            if mu is not None:
                gb -= mu
            counted(gb, i, j)
            spec.stats(gb, tmp, acc)
        spec.grad(gb, tmp)
        if s != 1.0:
            gb *= s
        if center == "mean":
            dsum += float(gb.sum())  # uncounted tokens hold 0 here
        if not shift_pass:
            if clipped:
                outside(gb, i, j)
            if add:
                out[i:j] += gb
    raw, extra = spec.metrics(acc, n)
    if center == "mean":
        shift = dsum / max(_float(batch._local), 1.0)
        if shift_pass or shift != shift or abs(shift) == float("inf"):
            fix = dtype.type(shift)
            for i, j in ranges:
                if shift_pass:
                    gb = whole[i:j]
                    gb -= fix
                    counted(gb, i, j)
                    if clipped:
                        outside(gb, i, j)
                    if add:
                        out[i:j] += gb
                else:  # L2 whose mean is not finite: NaN wherever the gradient flows
                    keep = np.ones(j - i, dtype=bool) if mask is None else mask[i:j].copy()
                    if lo is not None:
                        keep &= ~(v[i:j] < lo)
                    if hi is not None:
                        keep &= ~(v[i:j] > hi)
                    np.subtract(out[i:j], fix, out=out[i:j], where=keep)
    return _results(batch, w, spec.prefix, raw, extra, dtype)


def l2_grad(
    reg: Any, batch: Any, scale: float, out: np.ndarray, add: bool
) -> tuple[Any, dict[str, Any]] | None:
    return _deviation_grad(_L2, reg, batch, scale, out, add)


def huber_grad(
    reg: Any, batch: Any, scale: float, out: np.ndarray, add: bool
) -> tuple[Any, dict[str, Any]] | None:
    delta = _finite(reg.delta, batch.values.dtype)
    if delta is None or not huber_form_fits(delta, _TOPS[np.dtype(batch.values.dtype)]):
        return None  # (_finite has cached the dtype's max)
    return _deviation_grad(_Huber, reg, batch, scale, out, add)


def elastic_net_grad(
    reg: Any, batch: Any, scale: float, out: np.ndarray, add: bool
) -> tuple[Any, dict[str, Any]] | None:
    return _deviation_grad(_ElasticNet, reg, batch, scale, out, add)


GRAD: dict[str, Any] = {
    "l1_sparsity": l1_grad,
    "l2_weight_decay": l2_grad,
    "huber": huber_grad,
    "elastic_net": elastic_net_grad,
}


def value_and_grad(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
    """``(value, metrics, g)`` with ``g`` = d value / d ``batch.values``, or None."""
    kernel = GRAD.get(reg.name)
    if kernel is None:
        return None
    g = np.empty_like(batch.values)
    got = kernel(reg, batch, 1.0, g, False)
    return None if got is None else (got[0], got[1], g)


def small_value_and_grad(reg: Any, x: Any) -> tuple[Any, dict[str, Any], Any] | None:
    """``value_and_grad`` of one float32/float64 array that fits a block, for L1 and L2 with
    no mask, no counts, ``reduce`` "sum" or "mean" and the ``"logprobs"`` target: the
    whole-array closed form in a few NumPy calls, without a Batch (at this size the cost is
    the per-call overhead). None: the general path."""
    if type(x) is not np.ndarray or x.dtype.type not in _SMALL or x.size > BLOCK:
        return None
    o = reg._opts
    how = o["reduce"]
    if o["mask"] is not None or o["target"] != "logprobs" or (how != "sum" and how != "mean"):
        return None
    name = reg.name
    n = x.size
    scale = 1.0 if how == "sum" or n == 0 else 1.0 / n
    dtype = x.dtype.type
    if name == "l1_sparsity":
        raw = np.add.reduce(np.abs(x), axis=None)
        g = np.sign(x)
        if scale != 1.0:
            g *= dtype(scale)
        mean = raw / n if n else raw
        return (
            np.asarray(raw if how == "sum" else mean),
            {"l1_raw": np.asarray(raw), "l1_mean": np.asarray(mean)},
            g,
        )
    if name != "l2_weight_decay":
        return None
    clip, center = o["clip"], o["center"]
    lo, hi = (_finite(b, x.dtype) for b in clip) if clip is not None else (None, None)
    d = x if clip is None else np.clip(x, lo, hi)
    if center is not None:
        if center == "mean":  # (np.mean's wrapper costs more than the sum at this size)
            mu = np.add.reduce(d, axis=None) / n if n else dtype(0.0)
        else:
            mu = _finite(center, x.dtype)
        d = d - dtype(mu)
    flat = d if d.ndim == 1 else d.reshape(-1)
    raw, peak = squares(flat)
    if center == "mean" and n:  # 2(d - mean(d)), as the generic path (exactly 0 on constants)
        shift = np.add.reduce(flat) / n
        g = d - shift if shift else d.copy()
        g *= dtype(2.0 * scale)
    else:
        g = d * dtype(2.0 * scale)
    if lo is not None:
        np.copyto(g, 0.0, where=x < lo)
    if hi is not None:
        np.copyto(g, 0.0, where=x > hi)
    mean = raw / n if n else raw
    metrics = {"l2_raw": np.asarray(raw), "l2_mean": np.asarray(mean), "l2_max": np.asarray(peak)}
    return np.asarray(raw if how == "sum" else mean), metrics, g


def terms_value_and_grad(
    group: list[tuple[str, Any, float]], data: object, logprobs: Any, counts: Any
) -> tuple[dict[str, tuple[Any, dict[str, Any]]], list[np.ndarray]] | None:
    """A Pipeline's terms over one NumPy input: each term's ``(value, metrics)`` and the
    gradient of Σ weight · value as one array per array of ``logprobs``.

    Every kernel adds its scaled gradient into one flat output, split back per datum once
    (not once per term, nor a product and a sum per datum per term). A term that reads no
    sequence structure (no mask, ``reduce`` "sum" or "mean") is prepared on one
    concatenation of a ragged list, shared by such terms. Terms whose kernel declines (a
    weight per token) are not in the result: the caller runs them as usual."""
    is_list = type(logprobs) in (list, tuple)
    arrays = list(logprobs) if is_list else [logprobs]
    if not arrays or any(type(a) is not np.ndarray for a in arrays):
        return None
    flat: Any = None
    out: Any = None
    results: dict[str, tuple[Any, dict[str, Any]]] = {}
    for name, reg, weight in group:
        o = reg._opts
        lp = logprobs
        if is_list and len(arrays) > 1 and o["mask"] is None and o["reduce"] in ("sum", "mean"):
            if flat is None:
                flat = np.concatenate(arrays, axis=None)
            lp = flat
        batch = reg.prepare(data, lp, counts=counts, call="pipe(data, logprobs)")
        if out is None:
            out = np.zeros(batch.size, dtype=batch.dtype)
        elif batch.dtype != out.dtype:
            return None
        got = GRAD[reg.name](reg, batch, weight, out, True)
        if got is not None:
            results[name] = batch.finish(*got)
    if not results:
        return None
    grads, start = [], 0
    for a in arrays:
        n = a.size
        piece = out if len(arrays) == 1 else out[start : start + n]
        start += n
        if piece.shape != a.shape:
            piece = piece.reshape(a.shape)
        grads.append(piece if piece.dtype == a.dtype else piece.astype(a.dtype))
    return results, grads
