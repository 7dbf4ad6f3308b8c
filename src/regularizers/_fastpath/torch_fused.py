"""torch (eager) fast path for ``compute`` when no gradient is needed: fused reductions.

The generic path materializes ``|x|`` or ``x²`` and reduces it once per metric. Here each
quantity is one fused reduction kernel over the input, with no full-size temporary:
``vector_norm(x, 1)`` for Σ|x|, ``vector_norm(x, 2)²`` for Σx², ``aminmax`` for max x² (from
the extrema). Where the input must be transformed first (``exp``, clipping, a center), it is
done block by block (``BLOCK`` elements), so no full-size temporary exists; ``center="mean"``
combines per-block means and squared deviations with Chan's parallel formula: one read
of memory, numerically stable (torch's own ``var_mean`` is several times slower on CPU).
Half precision accumulates in float32.

Taken only when autograd does not need the graph (no input requires grad, or grad mode is
off) and outside ``torch.compile`` tracing; otherwise the generic path runs, whose gradient
conventions torch autograd sees through.
"""

from __future__ import annotations

from typing import Any

import torch

from .._core.ops import clamp
from .common import chan_merge, reduced

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCK = 1 << 18  # elements per block where the input is transformed (1 MiB of float32)


def _flat(logprobs: Any) -> Any:
    """The input as one flat tensor, or None where the generic path must run."""
    # (dispatch has already stepped aside under torch.compile tracing.)
    if type(logprobs) is torch.Tensor:  # the common case, with the fewest checks
        if logprobs.dtype not in _FLOATS or (logprobs.requires_grad and torch.is_grad_enabled()):
            return None
        return logprobs.reshape(-1)
    arrays = list(logprobs)
    if not arrays or any(type(a) is not torch.Tensor or a.dtype not in _FLOATS for a in arrays):
        return None
    if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return None
    if len({a.device for a in arrays}) != 1:
        return None
    return torch.cat([a.reshape(-1) for a in arrays])


def _dtype(x: Any) -> Any:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _zeros(x: Any, names: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    zero = torch.zeros((), dtype=_dtype(x), device=x.device)
    return zero, {k: zero.clone() for k in names}


def _blocks(x: Any, dtype: Any, probs: bool, lo: float | None, hi: float | None) -> Any:
    """The input block by block, transformed (exp, clip) in cache: no full-size temporary."""
    clipping = lo is not None or hi is not None
    for i in range(0, x.numel(), BLOCK):
        c = x[i : i + BLOCK].to(dtype)
        if probs:
            c = torch.exp(c)
        if clipping:
            c = torch.clamp(c, lo, hi)
        yield c


def l1(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L1's value and metrics: one fused ``vector_norm(x, 1)``, or Σ exp(x) by blocks."""
    x = _flat(logprobs)
    if x is None:
        return None
    n = x.numel()
    if n == 0:
        return _zeros(x, ("l1_raw", "l1_mean"))
    dtype = _dtype(x)
    if reg.target == "probs":  # Σ exp(x) >= 0
        raw = torch.zeros((), dtype=dtype, device=x.device)
        for c in _blocks(x, dtype, True, None, None):
            raw = raw + c.sum()
    else:
        raw = torch.linalg.vector_norm(x, 1, dtype=dtype)  # one fused pass, no temporary
    mean = raw / n
    return reduced(reg, raw, mean), {"l1_raw": raw, "l1_mean": mean}


def l2(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L2's value and metrics: fused dot and extrema; transformed inputs by blocks."""
    x = _flat(logprobs)
    if x is None:
        return None
    n = x.numel()
    if n == 0:
        return _zeros(x, ("l2_raw", "l2_mean", "l2_max"))
    dtype = _dtype(x)
    top = float(torch.finfo(dtype).max)  # bounds and center clamped as ops.scalar does
    lo, hi = (
        (None if b is None else clamp(b, top) for b in reg.clip)
        if reg.clip is not None
        else (None, None)
    )
    probs = reg.target == "probs"
    center = reg.center

    if not probs and reg.clip is None and center is None:
        if x.dtype == dtype:
            raw = torch.dot(x, x)  # one fused pass (BLAS)
        else:
            raw = torch.linalg.vector_norm(x, 2, dtype=dtype) ** 2
        low, high = torch.aminmax(x)
        low, high = low.to(dtype), high.to(dtype)
        return _l2_out(reg, raw, torch.maximum(high * high, low * low), n)

    # Anything that transforms the input (exp, clip, shift) runs block by block, so that no
    # full-size temporary exists: each block's transform stays small and in cache.
    zero = torch.zeros((), dtype=dtype, device=x.device)
    if center == "mean" and n <= BLOCK:  # one block: the direct form, fewest kernels
        c = next(_blocks(x, dtype, probs, lo, hi))
        m = c.sum() / n
        dev = c - m
        raw = torch.dot(dev, dev)
        low, high = torch.aminmax(c)
        # An infinity makes m ±inf or NaN, and then dot and maximum say NaN, as they should.
        return _l2_out(reg, raw, torch.maximum((high - m) ** 2, (low - m) ** 2), n)
    if center == "mean":
        # Chan's parallel combination of per-block (Welford) variances: one pass, stable.
        count, mean, m2 = 0, zero, zero
        cmin = torch.full((), float("inf"), dtype=dtype, device=x.device)
        cmax = -cmin
        for c in _blocks(x, dtype, probs, lo, hi):
            k = c.numel()
            bmean = c.sum() / k
            low, high = torch.aminmax(c)
            cmin, cmax = torch.minimum(cmin, low), torch.maximum(cmax, high)
            dev = c - bmean  # the block is in cache: this pass costs little
            count, mean, m2 = chan_merge(count, mean, m2, k, bmean, torch.dot(dev, dev))
        raw = m2
        peak = torch.maximum((cmax - mean) ** 2, (cmin - mean) ** 2)
        # sum((c - m)²) is NaN as soon as c holds ±inf (inf - inf); the extrema would not say
        peak = torch.where(torch.isfinite(mean), peak, mean - mean)
        raw = torch.where(torch.isfinite(mean), raw, mean - mean)
        return _l2_out(reg, raw, peak, n)
    raw, peak = zero, zero
    shift = None if center is None else clamp(center, top)
    for c in _blocks(x, dtype, probs, lo, hi):
        if shift is not None:
            c = c - shift
        raw = raw + torch.linalg.vector_norm(c, 2) ** 2
        low, high = torch.aminmax(c)
        peak = torch.maximum(peak, torch.maximum(low * low, high * high))
    return _l2_out(reg, raw, peak, n)


def _l2_out(reg: Any, raw: Any, peak: Any, n: int) -> tuple[Any, dict[str, Any]]:
    mean = raw / n
    return reduced(reg, raw, mean), {"l2_raw": raw, "l2_mean": mean, "l2_max": peak}


FAST = {"l1_sparsity": l1, "l2_weight_decay": l2}
