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
from .common import chan_merge, reduced

BLOCK = 1 << 16  # elements: 256 KiB of float32 (512 KiB of float64), inside a 1 MiB L2 cache
_FLOATS = (np.float16, np.float32, np.float64)


def _arrays(logprobs: Any) -> list[np.ndarray] | None:
    arrays = list(logprobs) if type(logprobs) in (list, tuple) else [logprobs]
    if not arrays or any(type(a) is not np.ndarray or a.dtype.type not in _FLOATS for a in arrays):
        return None  # the generic path validates and raises the proper errors
    return arrays


def _blocks(arrays: list[np.ndarray]) -> Any:
    for a in arrays:
        flat = a.reshape(-1)
        for i in range(0, flat.shape[0], BLOCK):
            yield flat[i : i + BLOCK]


def _prepared(reg: Any, logprobs: Any) -> Any:
    """``("small", x)`` for an input that fits one block, ``("blocks", arrays, dtype, n)``
    otherwise, or None where the generic path must run (it validates and raises)."""
    if (
        type(logprobs) is np.ndarray
        and logprobs.size <= BLOCK
        and logprobs.dtype.type in _SMALL
        and reg.target == "logprobs"
    ):
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
    got = _prepared(reg, logprobs)
    if got is None:
        return None
    if got[0] == "small":
        return _small_l1(reg, got[1])
    _, arrays, dtype, n = got
    buf = np.empty(min(n, BLOCK), dtype=dtype)
    probs = reg.target == "probs"
    raw = 0.0
    for block in _blocks(arrays):
        b = buf[: block.shape[0]]
        if probs:
            np.exp(block, out=b, dtype=dtype)  # not the float16 loop
        else:
            np.abs(block, out=b)
        raw += float(b.sum())
    return _out(reg, {"l1_raw": raw, "l1_mean": raw / max(n, 1)}, dtype)


def l2(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L2's value and metrics: clip, center and square block by block (Chan's merge for
    ``center="mean"``)."""
    got = _prepared(reg, logprobs)
    if got is None:
        return None
    if got[0] == "small":
        return _small_l2(reg, got[1])
    _, arrays, dtype, n = got
    buf = np.empty(min(n, BLOCK), dtype=dtype)
    probs = reg.target == "probs"

    lo, hi = (_finite(b, dtype) for b in reg.clip) if reg.clip is not None else (None, None)
    center = _finite(reg.center, dtype) if isinstance(reg.center, float) else reg.center
    shifted = center is not None  # the block is modified in place: work on a copy

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
        count, mean, m2 = 0, 0.0, 0.0
        cmin, cmax = float("inf"), float("-inf")
        for block in _blocks(arrays):
            b = prepare(block)
            k = b.shape[0]
            bmean = float(b.sum()) / k
            cmin = _nan_min(cmin, float(b.min()))
            cmax = _nan_max(cmax, float(b.max()))
            b -= bmean
            count, mean, m2 = chan_merge(count, mean, m2, k, bmean, float(np.dot(b, b)))
        raw = m2
        peak = (
            0.0
            if n == 0
            else _nan_max((cmax - mean) * (cmax - mean), (cmin - mean) * (cmin - mean))
        )
        if not np.isfinite(mean):  # an infinity survived: the generic path gives NaN there
            raw = peak = float("nan") if n else 0.0
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


def _finite(value: float | None, dtype: Any) -> float | None:
    """A bound or center clamped to the dtype's finite range, as ``ops.scalar`` does."""
    return None if value is None else clamp(value, float(np.finfo(dtype).max))


def _small_l1(reg: Any, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """One array that fits a block: the whole-array form, with as few calls as possible."""
    n = x.size
    raw = np.abs(x).sum()
    mean = raw / n if n else raw
    return np.asarray(reduced(reg, raw, mean)), {
        "l1_raw": np.asarray(raw),
        "l1_mean": np.asarray(mean),
    }


def _small_l2(reg: Any, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """One array that fits a block: the whole-array form, with as few calls as possible."""
    n = x.size
    if reg.clip is None:
        c = x
    else:
        lo, hi = (_finite(b, x.dtype) for b in reg.clip)
        c = np.clip(x, lo, hi)
    if reg.center is not None:
        center = _finite(reg.center, x.dtype) if reg.center != "mean" else None
        c = c - (c.mean() if center is None and n else center if n else 0.0)
        c = c.astype(x.dtype, copy=False)
    c = c.reshape(-1)
    raw = np.dot(c, c)
    peak = max(c.max() ** 2, c.min() ** 2) if n else raw
    if peak != peak or raw != raw:  # NaN: as np.maximum and the generic path
        peak = raw = x.dtype.type("nan")
    mean = raw / n if n else raw
    return np.asarray(reduced(reg, raw, mean)), {
        "l2_raw": np.asarray(raw),
        "l2_mean": np.asarray(mean),
        "l2_max": np.asarray(peak),
    }


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
