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
SMALL = 1 << 12  # up to here, the fewest kernel calls win (one slow kernel beats two fast)


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


# ---- the training path: kernels of the closed form (see ``torch_autograd``) -------------------
# Each works on a prepared Batch (the flat target, uncounted tokens holding 0, and the counts)
# when the aggregation weight is one number (every ``reduce`` mode but the per-token
# ``seq-mean-token-mean``); the generic kernel (``evaluate_with_grad``) serves the rest.
# ``forward`` computes value and metrics with fused reductions and keeps what ``grad``
# needs; ``grad`` is the closed form times ``scale`` (autograd's incoming gradient), a new
# tensor with 0 at uncounted tokens.


def _weight(batch: Any) -> Any:
    """The one aggregation weight of ``reduce`` (a float or a 0-d tensor), or None."""
    w = batch.token_weights()
    return w if isinstance(w, float) or w.ndim == 0 else None


def _scaled(w: Any, raw: Any) -> Any:
    return raw if isinstance(w, float) and w == 1.0 else raw * w


def _sign(v: Any) -> Any:
    """sign(v) with NaN at NaN, as the array API (and the generic path) has it, where
    ``torch.sign`` gives 0: ``clip(v · 2^e · 2^e, -1, 1)`` with ``2^e`` the dtype's largest
    power of two makes every nonzero ``v`` (subnormals too) at least 1 in magnitude, keeps
    ±0 and NaN, and takes three cheap kernels where a NaN fix-up takes two slow ones."""
    big = 2.0**1023 if v.dtype == torch.float64 else 2.0**127
    return (v * big).mul_(big).clamp_(-1.0, 1.0)


class L1Grad:
    """L1: Σ|v| by one reduction; the gradient sign(v) (0 at 0, so at uncounted tokens,
    which hold 0) is computed in the backward pass only."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        w = _weight(batch)
        if w is None:
            return None
        v = batch.values
        raw = v.sum() if batch.target == "probs" else v.abs().sum()  # exp(x) >= 0
        return _scaled(w, raw), {"l1_raw": raw, "l1_mean": batch.per_token(raw)}, w

    @staticmethod
    def grad(reg: Any, batch: Any, w: Any, scale: Any) -> Any:
        return _sign(batch.values).mul_(_scaled(w, scale.to(batch.dtype)))


def _outside(v: Any, lo: float | None, hi: float | None) -> Any:
    """``v < lo or v > hi`` (NaN is inside, as the generic path's where-clipping has it)."""
    if lo is None:
        return v > hi
    if hi is None:
        return v < lo
    # |clip(v) - v| > 0: one comparison where two need an "or" besides (NaN > 0 is false)
    return torch.clamp(v, lo, hi).sub_(v).abs_() > 0


class L2Grad:
    """L2: the deviation ``d = c(v) - center`` once (kept for the gradient), Σd² by one dot
    and max d² from the extrema; the gradient is 2(d - mean d) for ``center="mean"`` (the
    mean is a function of the input; its share is mean d, 0 but for rounding, as on the
    generic path), else 2d, and 0 strictly outside the clip range and at uncounted tokens."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        w = _weight(batch)
        if w is None or batch.values.ndim != 1:
            return None
        o = reg._opts
        v, mask, center = batch.values, batch.mask, o["center"]
        top = float(torch.finfo(v.dtype).max)
        lo, hi = (None, None)
        if o["clip"] is not None:
            lo, hi = (None if b is None else clamp(b, top) for b in o["clip"])
        d, own = v, False
        if lo is not None or hi is not None:
            d, own = torch.clamp(v, lo, hi), True
            if mask is not None and ((lo is not None and lo > 0) or (hi is not None and hi < 0)):
                d.masked_fill_(~mask, 0.0)  # an uncounted 0 clipped to a bound: back to 0
        if center is not None:
            if center != "mean":
                mu = batch.constant(float(center))
            elif mask is None and batch.size:
                mu = d.mean()
            else:  # uncounted tokens hold 0: the sum is over counted ones
                mu = batch._divide(d.sum(), batch._local)
            d = d.sub_(mu) if own else d - mu
            if mask is not None:
                d.masked_fill_(~mask, 0.0)
        raw = torch.dot(d, d)
        if not batch.size:
            peak = batch.zero()
        elif batch.size <= SMALL:  # one kernel: max |d| (NaN if any is)
            top = torch.linalg.vector_norm(d, float("inf"))
            peak = top * top
        else:  # amax and amin: two fast kernels, where aminmax or max |d| is one slow one
            low, high = d.amin(), d.amax()
            peak = torch.maximum(low * low, high * high)
        metrics = {"l2_raw": raw, "l2_mean": batch.per_token(raw), "l2_max": peak}
        return _scaled(w, raw), metrics, (d, w, lo, hi)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        d, w, lo, hi = state
        two_s = 2.0 * _scaled(w, scale.to(batch.dtype))
        if reg._opts["center"] != "mean":
            g = d * two_s
        else:  # the mean's share: mean d (0 but for rounding, NaN where the mean is)
            shift = batch._divide(d.sum(), batch._local)
            g = torch.sub(d, shift).mul_(two_s)
            if batch.mask is not None:
                g.masked_fill_(~batch.mask, 0.0)
        if lo is not None or hi is not None:
            g.masked_fill_(_outside(batch.values, lo, hi), 0.0)
        return g


GRAD: dict[str, Any] = {"l1_sparsity": L1Grad, "l2_weight_decay": L2Grad}
