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

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCK = 1 << 18  # elements per block where the input is transformed (1 MiB of float32)


def compute(kind: str, reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    # (_fastpath has already stepped aside under torch.compile tracing.)
    if type(logprobs) is torch.Tensor:  # the common case, with the fewest checks
        if logprobs.dtype not in _FLOATS or (logprobs.requires_grad and torch.is_grad_enabled()):
            return None
        x = logprobs.reshape(-1)
    else:
        arrays = list(logprobs)
        if not arrays or any(type(a) is not torch.Tensor or a.dtype not in _FLOATS for a in arrays):
            return None
        if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
            return None
        if len({a.device for a in arrays}) != 1:
            return None
        x = torch.cat([a.reshape(-1) for a in arrays])
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    n = x.numel()
    if n == 0:
        zero = torch.zeros((), dtype=dtype, device=x.device)
        names = ("l1_raw", "l1_mean") if kind == "l1" else ("l2_raw", "l2_mean", "l2_max")
        return zero, {k: zero.clone() for k in names}
    clipping = kind == "l2" and reg.clip is not None
    top = float(torch.finfo(dtype).max)  # bounds and center clamped as _ops.scalar does
    lo, hi = (
        (None if b is None else min(max(b, -top), top) for b in reg.clip)
        if clipping
        else (None, None)
    )
    probs = reg.target == "probs"
    center = None if kind == "l1" else reg.center

    if kind == "l1" and not probs:
        raw = torch.linalg.vector_norm(x, 1, dtype=dtype)  # one fused pass, no temporary
        mean = raw / n
        return (raw if reg.reduce == "sum" else mean), {"l1_raw": raw, "l1_mean": mean}
    if kind == "l2" and not probs and not clipping and center is None:
        if x.dtype == dtype:
            raw = torch.dot(x, x)  # one fused pass (BLAS)
        else:
            raw = torch.linalg.vector_norm(x, 2, dtype=dtype) ** 2
        low, high = torch.aminmax(x)
        low, high = low.to(dtype), high.to(dtype)
        return _l2_out(reg, raw, torch.maximum(high * high, low * low), n)

    # Anything that transforms the input (exp, clip, shift) runs block by block, so that no
    # full-size temporary exists: each block's transform stays small and in cache.
    def blocks() -> Any:
        for i in range(0, n, BLOCK):
            c = x[i : i + BLOCK].to(dtype)
            if probs:
                c = torch.exp(c)
            if clipping:
                c = torch.clamp(c, lo, hi)
            yield c

    zero = torch.zeros((), dtype=dtype, device=x.device)
    if kind == "l1":  # probs: Σ exp(x) >= 0
        raw = zero
        for c in blocks():
            raw = raw + c.sum()
        mean = raw / n
        return (raw if reg.reduce == "sum" else mean), {"l1_raw": raw, "l1_mean": mean}
    if center == "mean" and n <= BLOCK:  # one block: the direct form, fewest kernels
        c = next(blocks())
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
        for c in blocks():
            k = c.numel()
            bmean = c.sum() / k
            low, high = torch.aminmax(c)
            cmin, cmax = torch.minimum(cmin, low), torch.maximum(cmax, high)
            dev = c - bmean  # the block is in cache: this pass costs little
            bm2 = torch.dot(dev, dev)
            total = count + k
            delta = bmean - mean
            mean = mean + delta * (k / total)
            m2 = m2 + bm2 + delta * delta * (count * k / total)
            count = total
        raw = m2
        peak = torch.maximum((cmax - mean) ** 2, (cmin - mean) ** 2)
        # sum((c - m)²) is NaN as soon as c holds ±inf (inf - inf); the extrema would not say
        peak = torch.where(torch.isfinite(mean), peak, mean - mean)
        raw = torch.where(torch.isfinite(mean), raw, mean - mean)
        return _l2_out(reg, raw, peak, n)
    raw, peak = zero, zero
    for c in blocks():
        if center is not None:
            c = c - min(max(center, -top), top)
        raw = raw + torch.linalg.vector_norm(c, 2) ** 2
        low, high = torch.aminmax(c)
        peak = torch.maximum(peak, torch.maximum(low * low, high * high))
    return _l2_out(reg, raw, peak, n)


def _l2_out(reg: Any, raw: Any, peak: Any, n: int) -> tuple[Any, dict[str, Any]]:
    mean = raw / n
    return (raw if reg.reduce == "sum" else mean), {"l2_raw": raw, "l2_mean": mean, "l2_max": peak}
