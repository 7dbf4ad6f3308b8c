"""torch (eager) fast path for ``compute`` when no gradient is needed: fused reductions.

The generic path materializes ``|x|`` or ``x²`` and reduces it once per metric. Here each
quantity is one fused reduction kernel over the input, with no full-size temporary:
``vector_norm(x, 1)`` for Σ|x|, ``vector_norm(x, 2)²`` for Σx², ``aminmax`` for max x² (from
the extrema). Where the input must be transformed first (``exp``, clipping, a center), it is
done block by block (``BLOCK`` elements), so no full-size temporary exists; ``center="mean"``
combines per-block means and squared deviations with Chan's parallel formula: one read
of memory, numerically stable (torch's own ``var_mean`` is several times slower on CPU).
On the CPU a block's squared deviations are ``Σb² - s²/k`` where that cancels little
(:func:`_deviations`), else the shifted block's dot.
Half precision accumulates in float32.

Taken only when autograd does not need the graph (no input requires grad, or grad mode is
off) and outside ``torch.compile`` tracing; otherwise the generic path runs, whose gradient
conventions torch autograd sees through.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import array_api_compat.torch as xp
import torch

from .._core.backends import count_true, exact_counts, from_host, torch_cat
from .._core.ops import clamp
from .common import huber_form_fits, reduced
from .torch_const import const
from .torch_distributions import GRAD as _CLASS_AXIS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
BLOCK = 1 << 20  # elements per block where the input is transformed (4 MiB of float32)
SMALL = 1 << 12  # up to here, the fewest kernel calls win (one slow kernel beats two fast)


def zero_uncounted(a: Any, mask: Any, fresh: bool = False, keep: Any = None) -> Any:
    """``where(mask, a, 0)`` (``mask`` over ``a``'s first axis), for eager calls that record
    nothing; ``fresh``: ``a`` is the caller's own scratch, which may be overwritten;
    ``keep``: the mask as ``a``'s floats where ``prepare`` made them (``Batch._keep``).

    On the CPU, ``a`` times the mask (its bytes as floats), which equals the ``where``
    wherever it is finite: a counted entry is multiplied by 1 (inf and NaN included), an
    uncounted finite one by 0. Its sum, read on the host (no device to sync with on the
    CPU), is finite exactly when every entry is, so an inf or NaN under the mask (0 * inf =
    NaN) is seen and set to 0 by the ``where`` after all. Inside a training step over 35K
    float32 elements on this machine's CPU, the ``where`` took ~25 us and the product and
    its check ~20 us, in place on an array of the call's own (no allocation; see
    ``benchmarks/profile_training.py``); on other devices, and up to ``SMALL`` elements,
    the ``where``."""
    return _zeroed(a, mask, fresh, keep)[0]


def zero_uncounted_sum(a: Any, mask: Any, fresh: bool = False, keep: Any = None) -> tuple[Any, Any]:
    """``zero_uncounted(a, mask, fresh, keep)`` (``a`` itself where ``mask`` is None) and the
    sum of its result, a 0-d tensor: where the product's finiteness check has summed it
    already, that sum (the same reduction of the same array), not a second pass."""
    if mask is None:
        return a, a.sum()
    z, total, _ = _zeroed(a, mask, fresh, keep)
    return z, (z.sum() if total is None else total)


def zero_and_count(a: Any, mask: Any, fresh: bool = False) -> tuple[Any, Any, Any]:
    """``zero_uncounted(a, mask, fresh)``, ``count_true(mask)`` in ``a``'s dtype and the
    mask as ``a``'s floats (None where the product is not taken), as ``prepare`` needs them
    (its ``zero.counted``; it keeps the floats as ``Batch._keep``): where the product is
    taken, the count is the sum of the mask's bytes as the floats it multiplies by, made
    once (a second conversion of a 35K mask costs ~10 us inside a training step)."""
    z, _, keep = _zeroed(a, mask, fresh)
    return z, _count(a, mask, keep), keep


def count_and_keep(a: Any, mask: Any, fresh: bool = False) -> tuple[Any, Any, Any]:
    """``zero_and_count`` for a kernel that zeroes what it derives from the values itself
    (``MASKS_ITS_OWN``): ``a`` as it is, the count, and the mask as ``a``'s floats where
    the kernel's product will take them, made once here (the count their sum, as above)."""
    keep = _keep(a, mask)
    return a, _count(a, mask, keep), keep


def _count(a: Any, mask: Any, keep: Any) -> Any:
    if keep is not None and mask.numel() <= exact_counts(xp, a.dtype):
        return keep.sum()
    return count_true(xp, mask, a.dtype)


zero_uncounted.counted = zero_and_count  # type: ignore[attr-defined]


def _keep(a: Any, mask: Any) -> Any:
    """The ``[n]`` bool ``mask`` as ``a``'s floats, where the product zeroes ``a`` (on the
    CPU, beyond ``SMALL`` elements); else None (the ``where``)."""
    product = a.device.type == "cpu" and mask.dtype == torch.bool and a.is_floating_point()
    if not product or a.numel() <= SMALL:  # (small: one kernel, 4 us at 1e3 against 13)
        return None
    return mask.view(torch.uint8).to(a.dtype)  # (then a same-dtype product: ~2x faster)


def _zeroed(a: Any, mask: Any, fresh: bool, keep: Any = None) -> tuple[Any, Any, Any]:
    """``zero_uncounted``'s result, its sum where the check made it, and the mask as ``a``'s
    floats where the product made them or ``keep`` gave them (else None for either)."""
    if keep is None or keep.dtype != a.dtype:
        keep = _keep(a, mask)
    elif a.device.type != "cpu" or a.numel() <= SMALL:
        keep = None
    m = mask if a.ndim == 1 else mask.reshape((-1,) + (1,) * (a.ndim - 1))
    if keep is None:
        return torch.where(m, a, const(0.0, a)), None, None
    k = keep if a.ndim == 1 else keep.reshape(m.shape)
    z = a.mul_(k) if fresh else a * k
    total = z.sum()
    if math.isfinite(total.item()):
        return z, total, keep
    return torch.where(m, z, z.new_zeros(())), None, keep  # (counted entries of z: a's own)


def all_valid(valid: Any) -> bool:
    """Whether a ``[n]`` bool tensor on the CPU is all True (read on the host, which costs
    less than the mask's ``where``s it saves: ~4 us at 1e3 against ~40); False elsewhere
    (no device sync). The least of its bytes, not ``all()``: at 35K elements 3.5 us against
    17.5 (torch's boolean reduction is not vectorized on this CPU)."""
    if valid.device.type != "cpu" or valid.dtype != torch.bool:
        return False
    return not valid.numel() or bool(valid.view(torch.uint8).min())


def _flat(logprobs: Any) -> Any:
    """The input as one flat tensor, or None where the generic path must run."""
    # (dispatch has already stepped aside under torch.compile tracing.) Under the torch.func
    # transforms (vmap...) the generic path runs: the blocks are written in place.
    if _functorch_active():
        return None
    if type(logprobs) is torch.Tensor:  # the common case, with the fewest checks
        if logprobs.dtype not in _FLOATS or (logprobs.requires_grad and torch.is_grad_enabled()):
            return None
        return logprobs if logprobs.ndim == 1 else logprobs.reshape(-1)  # (a view: ~0.7 us)
    arrays = list(logprobs)
    if arrays and getattr(arrays[0], "requires_grad", False) and torch.is_grad_enabled():
        return None  # (the training path's call: no walk over the list)
    if not arrays or any(type(a) is not torch.Tensor or a.dtype not in _FLOATS for a in arrays):
        return None
    if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return None
    if len({a.device for a in arrays}) != 1:
        return None
    return torch_cat([a.reshape(-1) for a in arrays])


def _dtype(x: Any) -> Any:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _zeros(x: Any, names: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    zero = torch.zeros((), dtype=_dtype(x), device=x.device)
    return zero, {k: zero.clone() for k in names}


def _blocks(x: Any, dtype: Any, probs: bool, lo: float | None, hi: float | None) -> Any:
    """The input block by block, transformed (exp, clip) into one reused buffer of the
    compute dtype: each block is read from memory once, and no full-size temporary exists
    (a fresh full-size tensor costs more in page faults than the arithmetic)."""
    n = x.numel()
    buf = torch.empty(min(n, BLOCK), dtype=dtype, device=x.device)
    clipping = lo is not None or hi is not None
    direct = clipping and not probs and x.dtype == dtype
    for i in range(0, n, BLOCK):
        c = x[i : i + BLOCK]
        b = buf[: c.numel()]
        if direct:
            torch.clamp(c, lo, hi, out=b)
        else:
            b.copy_(c)
            if probs:
                b.exp_()
            if clipping:
                b.clamp_(lo, hi)
        yield b


def _total(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def l1(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L1's value and metrics: Σ|x| (or Σ exp(x)) by two cheap kernels, block by block above
    ``BLOCK`` elements (``vector_norm(x, 1)``, the one-kernel form, is several times slower
    but for small inputs, where the fewest calls win); of logprobs (every element <= 0, on
    the CPU) and above ``BLOCK``, as ``0 - Σx`` (:func:`_negated_sum`: no ``|x|`` written
    out; at 1e4 and 1e5 elements its max and host read cost more than they save)."""
    x = _flat(logprobs)
    if x is None:
        return None
    n = x.numel()
    if n == 0:
        return _zeros(x, ("l1_raw", "l1_mean"))
    dtype = _dtype(x)
    probs = reg._opts["target"] == "probs"
    if n <= SMALL and not probs:
        # one kernel: fewest calls (dtype= only where it differs: the argument costs 0.2 us)
        raw = torch.linalg.vector_norm(x, 1, dtype=None if x.dtype == dtype else dtype)
    elif probs:  # Σ exp(x) >= 0
        raw = _total([b.sum() for b in _blocks(x, dtype, True, None, None)])
    elif n <= BLOCK:  # (one block: |x| and its sum cost less than the max, read, and sum)
        raw = x.abs().sum(dtype=dtype)
    elif (raw := _negated_sum(x, dtype)) is not None:
        pass
    else:
        buf = torch.empty(BLOCK, dtype=x.dtype, device=x.device)
        parts = []
        for i in range(0, n, BLOCK):
            c = x[i : i + BLOCK]
            b = buf[: c.numel()]
            torch.abs(c, out=b)
            parts.append(b.sum(dtype=dtype))
        raw = _total(parts)
    mean = raw / n
    return reduced(reg, raw, mean), {"l1_raw": raw, "l1_mean": mean}


def _negated_sum(x: Any, dtype: Any) -> Any:
    """Σ|x| of a CPU input of logprobs (every element <= 0) as ``0 - Σx``, else None: the
    max and the sum of each block of ``x`` itself, read-only passes (no ``|x|`` written
    out), the second over a block the first has just brought into the cache. Exactly Σ|x|:
    negating every addend negates every partial sum (rounding is symmetric), and ``0 - s``
    is +0 where ``s`` is ±0. A NaN (its max is NaN), or any element > 0, says None, and
    the caller takes ``|x|`` (where the first block has one, after that block's max only).
    At 1e7 float32, timed alternately in one process: 1.45-1.48 ms against 1.54-1.57 for
    ``|x|`` block by block and its sum on two threads (one ``sum(x)``: 0.59-0.62), 2.11
    against 2.48 on one (1.10)."""
    if x.device.type != "cpu":
        return None
    tops, sums = [], []
    for i in range(0, x.numel(), BLOCK):
        c = x[i : i + BLOCK]
        tops.append(c.amax())
        if not i and not tops[0].item() <= 0.0:  # (not logprobs: told by the first block)
            return None
        sums.append(c.sum(dtype=dtype))
    top = tops[0] if len(tops) == 1 else torch.stack(tops).amax()
    if len(tops) > 1 and not top.item() <= 0.0:
        return None
    total = _total(sums)
    return const(0.0, total) - total


def l2(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """L2's value and metrics: fused dot and extrema; transformed inputs by blocks."""
    x = _flat(logprobs)
    if x is None:
        return None
    n = x.numel()
    if n == 0:
        return _zeros(x, ("l2_raw", "l2_mean", "l2_max"))
    dtype = _dtype(x)
    o = reg._opts  # (read directly: the per-call cost is the point at small sizes)
    top = _TOP[dtype]  # bounds and center clamped as ops.scalar does
    lo, hi = _bounds(o["clip"], dtype)
    probs = o["target"] == "probs"
    center = o["center"]

    if not probs and o["clip"] is None and center is None:
        if x.dtype == dtype:
            raw = torch.dot(x, x)  # one fused pass (BLAS)
        else:
            raw = torch.linalg.vector_norm(x, 2, dtype=dtype) ** 2
        low, high = torch.aminmax(x)  # one pass for both (1.4x one amax at 1e7, not 2x)
        if x.dtype != dtype:
            low, high = low.to(dtype), high.to(dtype)
        return _l2_out(reg, raw, torch.maximum(high * high, low * low), n)

    # Anything that transforms the input (exp, clip, shift) runs block by block in one
    # buffer (see _blocks); per-block totals are combined once, at the end.
    if center == "mean" and n <= min(SMALL, BLOCK):  # one small block: fewest kernel calls
        b = next(_blocks(x, dtype, probs, lo, hi))
        mean = b.mean()
        b.sub_(mean)
        raw = torch.dot(b, b)
        top_dev = torch.linalg.vector_norm(b, float("inf"))
        return _l2_out(reg, raw, top_dev * top_dev, n)
    if center == "mean":
        sums, m2s, lows, highs, sizes = [], [], [], [], []
        host = x.device.type == "cpu"  # (a block's totals read on the host: no device sync)
        for b in _blocks(x, dtype, probs, lo, hi):
            k = b.numel()
            s = b.sum()
            low, high = torch.aminmax(b)
            sums.append(s)
            m2 = _deviations(b, s, k) if host else None
            if m2 is None:
                b.sub_(s / k)  # the block is in cache: this pass costs little
                m2 = torch.dot(b, b)
            m2s.append(m2)
            lows.append(low)
            highs.append(high)
            sizes.append(k)
        if len(sums) == 1:
            mean, raw, cmin, cmax = sums[0] / n, m2s[0], lows[0], highs[0]
        else:  # Chan et al.'s combination of the blocks' means and squared deviations
            total, k_b = torch.stack(sums), from_host(xp, sizes, dtype, x.device)
            mean = total.sum() / n
            raw = torch.stack(m2s).sum() + (k_b * (total / k_b - mean) ** 2).sum()
            cmin, cmax = torch.stack(lows).min(), torch.stack(highs).max()
        high, low = (cmax - mean) ** 2, (cmin - mean) ** 2
        peak = torch.maximum(high, low)
        if len(sums) > 1:
            # a mean that is not finite: Σ(c - m)² is inf where every c is finite (the sum
            # overflowed: each c - m is ∓inf) and NaN where c holds ±inf (inf - inf) or the
            # mean is NaN, as the extrema say (the blocks' combination would give NaN)
            raw = torch.where(torch.isfinite(mean), raw, high + low)
        return _l2_out(reg, raw, peak, n)
    shift = None if center is None else clamp(center, top)
    squares, lows, highs = [], [], []
    for b in _blocks(x, dtype, probs, lo, hi):
        if shift is not None:
            b.sub_(shift)
        squares.append(torch.dot(b, b))
        low, high = torch.aminmax(b)
        lows.append(low)
        highs.append(high)
    raw = _total(squares)
    low = lows[0] if len(lows) == 1 else torch.stack(lows).min()
    high = highs[0] if len(highs) == 1 else torch.stack(highs).max()
    return _l2_out(reg, raw, torch.maximum(low * low, high * high), n)


_TOP = {t: float(torch.finfo(t).max) for t in (torch.float32, torch.float64)}
# tiny / eps: a row of D squares underflows where Σ g² is within D times this of 0
_UNDERFLOW = {t: torch.finfo(t).tiny / torch.finfo(t).eps for t in (torch.float32, torch.float64)}


def _deviations(b: Any, s: Any, k: int) -> Any:
    """``Σ (b - mean)²`` of a block on the CPU from its ``Σ b²`` (one dot, no shifted pass),
    ``Σ b`` being ``s``: ``Σ b² - s²/k``, computed on the host in float64, where that
    cancels at most half of ``Σ b²`` (one bit), as for logprobs, whose spread is as large
    as their mean; else None (not finite, or a mean that dominates the spread: the caller
    shifts the block). ``numpy_blocked._deviations`` is the NumPy path's counterpart."""
    sq, total = torch.dot(b, b).item(), s.item()
    dev = total * (total / k)
    if sq - sq == 0 and dev <= 0.5 * sq:  # (finite, and little cancelled)
        return torch.full((), sq - dev, dtype=b.dtype)
    return None


@lru_cache(maxsize=256)
def _bounds(clip: Any, dtype: Any) -> tuple[float | None, float | None]:
    """``clip`` in the compute dtype's finite range, as ``ops.scalar`` clamps it."""
    if clip is None:
        return None, None
    top = _TOP[dtype]
    return tuple(None if b is None else clamp(b, top) for b in clip)  # type: ignore[return-value]


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


def _scaled(w: Any, raw: Any, k: float = 1.0) -> Any:
    """``k · w · raw``: ``w`` is ``reduce``'s one weight (a float, or a 0-d tensor), ``k`` a
    power of two (or its negative: the product rounds as ``k · (w · raw)`` does)."""
    if isinstance(w, float):
        f = k * w
        return raw if f == 1.0 else raw * const(f, raw)
    return raw * w if k == 1.0 else (raw * w) * const(k, raw)


def _sign(v: Any) -> Any:
    """sign(v) with NaN at NaN, as the array API (and the generic path) has it, where
    ``torch.sign`` gives 0: ``clip(v · 2^e · 2^e, -1, 1)`` with ``2^e`` the dtype's largest
    power of two makes every nonzero ``v`` (subnormals too) at least 1 in magnitude, keeps
    ±0 and NaN, and takes three cheap kernels where a NaN fix-up takes two slow ones."""
    big = const(2.0**1023 if v.dtype == torch.float64 else 2.0**127, v)
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
        return _scaled(w, raw), {"l1_raw": raw, "l1_mean": batch.per_token(raw)}, (w, raw)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, raw = state
        v, s = batch.values, _scaled(w, scale.to(batch.dtype))
        # Σ|v| is finite exactly when no v is NaN (or inf), where torch.sign is exact and one
        # kernel (read on the host: on the CPU, no device to sync with)
        if v.device.type == "cpu" and math.isfinite(raw.item()):
            return torch.sign(v).mul_(s)
        return _sign(v).mul_(s)


def _outside(v: Any, lo: float | None, hi: float | None) -> Any:
    """``v < lo or v > hi`` (NaN is inside, as the generic path's where-clipping has it)."""
    if lo is None:
        return v > hi
    if hi is None:
        return v < lo
    # |clip(v) - v| > 0: one comparison where two need an "or" besides (NaN > 0 is false)
    return torch.clamp(v, lo, hi).sub_(v).abs_() > const(0.0, v)


def _zero_outside_(g: Any, v: Any, lo: float | None, hi: float | None) -> Any:
    """``g`` set to 0 where ``v`` is outside ``[lo, hi]``, in place. On the CPU by a multiply
    with the float indicator ``1 - sign(|clip(v) - v|)`` (1 inside, at the bounds and at NaN;
    0 outside, ±inf included), exact wherever ``g`` is finite, which its sum tells (as
    :func:`zero_uncounted`); the boolean comparison and ``masked_fill`` it replaces cost ~10x
    more on this machine's CPU at 35K elements; up to ``SMALL``, the ``masked_fill`` (in a
    training step at 1e3, fewer calls: ~5 us less)."""
    if g.device.type != "cpu" or g.numel() <= SMALL:
        return g.masked_fill_(_outside(v, lo, hi), 0.0)
    keep = torch.clamp(v, lo, hi).sub_(v).abs_().nan_to_num_(nan=0.0)  # 0 inside, > 0 out
    keep = keep.sign_().neg_().add_(const(1.0, keep))
    g.mul_(keep)
    if not math.isfinite(g.sum().item()):  # an inf or NaN outside: 0 there after all
        g.masked_fill_(keep == 0, 0.0)  # (inside, g is its own: multiplied by 1)
    return g


def _squares(batch: Any, d: Any) -> tuple[Any, Any]:
    """``Σ d²`` by one dot and ``max d²`` from the extrema of ``d`` (NaN if any ``d`` is):
    no ``d²`` temporary, and one pass fewer than its sum and max."""
    raw = torch.dot(d, d)
    if not batch.size:
        return raw, batch.zero()
    if batch.size <= SMALL:  # (2.3 us at 1e3, 2.9 at 4096: max |d| by vector_norm 5.6 and 14)
        return raw, (d * d).max()
    low, high = torch.aminmax(d)  # both extrema in one pass (max |d| is a slow kernel)
    return raw, torch.maximum(low * low, high * high)


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
        lo, hi = _bounds(o["clip"], v.dtype)
        d, own = v, False
        if lo is not None or hi is not None:
            d, own = torch.clamp(v, lo, hi), True
            if mask is not None and ((lo is not None and lo > 0) or (hi is not None and hi < 0)):
                d = zero_uncounted(
                    d, mask, True, batch._keep
                )  # an uncounted 0 clipped to a bound: back to 0
        if center is not None:
            if center != "mean":
                mu = batch.constant(float(center))
            elif mask is None and batch.size:
                mu = d.mean()
            else:  # uncounted tokens hold 0: the sum is over counted ones
                mu = batch._divide(d.sum(), batch._local)
            d = d.sub_(mu) if own else d - mu
            if mask is not None:
                d = zero_uncounted(d, mask, True, batch._keep)
        raw, peak = _squares(batch, d)
        metrics = {"l2_raw": raw, "l2_mean": batch.per_token(raw), "l2_max": peak}
        return _scaled(w, raw), metrics, (d, w, lo, hi)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        d, w, lo, hi = state
        two_s = _scaled(w, scale.to(batch.dtype), 2.0)
        if reg._opts["center"] != "mean":
            g = d * two_s
        else:  # the mean's share: mean d (0 but for rounding, NaN where the mean is)
            shift = batch._divide(d.sum(), batch._local)
            g = torch.sub(d, shift).mul_(two_s)
            if batch.mask is not None:
                g = zero_uncounted(g, batch.mask, True, batch._keep)
        if lo is not None or hi is not None:
            g = _zero_outside_(g, batch.values, lo, hi)
        return g


class SampledKLGrad:
    """SampledKL with estimator k1, k2 or k3 (no behavior, no log-ratio clip, the estimator's
    gradient): ``d = lp - r``
    once (uncounted tokens 0, whatever the reference held there), ``k3 = expm1(-d) + d`` with
    its slope ``-expm1(-d)`` from the same ``expm1``, and no mask ``where`` per metric: at an
    uncounted token d = 0, so k = 0 and its slope is 0 (for k1, whose slope is 1, the
    gradient is masked). The max is over all tokens for k2 and k3 (k >= 0, so an uncounted 0
    never wins).

    ``MASKS_ITS_OWN``: the values are read only through ``d``, which is zeroed at uncounted
    tokens here, so the training path hands them over unmasked (no masked copy: a cast, a
    product and a host read less per call) and masks them itself where this declines."""

    MASKS_ITS_OWN = True

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        o = reg._opts
        est = o["estimator"]
        if est not in ("k1", "k2", "k3") or o["behavior"] is not None:
            return None
        if o["gradient"] == "unbiased":  # (its value is k·rho, NaN where lp is not finite)
            return None
        w = _weight(batch)
        if w is None or o["log_ratio_clip"] is not None or batch.values.ndim != 1:
            return None
        r = batch.field(reg.reference, role="reference", counted=False)
        e = None
        if est == "k3":  # with -d = r - lp: k = expm1(-d) - (-d), written over -d
            # (0 at uncounted tokens, whatever the reference holds there)
            d, total = zero_uncounted_sum(r - batch.values, batch.mask, True, batch._keep)
            total = -total
            e = torch.expm1(d)
            k = torch.sub(e, d, out=d)
        else:
            d, total = zero_uncounted_sum(batch.values - r, batch.mask, True, batch._keep)
            k = d * d * const(0.5, d) if est == "k2" else d
        raw = total if est == "k1" else k.sum()
        peak = batch.max(k) if est == "k1" else (k.amax() if batch.size else batch.zero())
        metrics = {
            "sampled_kl_raw": raw,
            "sampled_kl_mean": batch.per_token(raw),
            "sampled_kl_max": peak,
            "log_ratio_mean": batch._divide(total, batch.count),
        }
        return _scaled(w, raw), metrics, (None if est == "k3" else d, e, w)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        d, e, w = state
        estimator = reg._opts["estimator"]
        if estimator == "k3":
            return e * _scaled(w, scale.to(batch.dtype), -1.0)
        s = _scaled(w, scale.to(batch.dtype))
        if estimator == "k2":
            return d * s
        g = torch.full_like(d, 1.0).mul_(s)
        return g if batch.mask is None else zero_uncounted(g, batch.mask, True, batch._keep)


def _plain_terms(reg: Any, batch: Any) -> Any:
    """The aggregation weight of a term with no center and no clip (its values are the
    deviations themselves), or None."""
    o = reg._opts
    if o["center"] is not None or o["clip"] is not None:
        return None
    return _weight(batch)


class HuberGrad:
    """Huber (no center, no clip): ``p = q (|v| - q/2)`` with ``q = min(|v|, δ)``, which is
    ½v² inside (``|v| - |v|/2`` is exact) and ``δ (|v| - δ/2)`` outside, with no ``where``;
    its gradient ``clip(v, -δ, δ)``. Uncounted tokens hold 0, so p and the slope are 0 there
    and the sums and the max (p >= 0) need no mask."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        w = _plain_terms(reg, batch)
        v = batch.values
        delta = float(reg._opts["delta"])
        if w is None or not huber_form_fits(delta, _TOP[batch.dtype]):
            return None
        a = v.abs()
        q = torch.clamp(a, max=delta)
        p = q.mul_(a.sub_(q, alpha=0.5))
        raw = p.sum()
        peak = p.amax() if batch.size else batch.zero()
        metrics = {"huber_raw": raw, "huber_mean": batch.per_token(raw), "huber_max": peak}
        return _scaled(w, raw), metrics, (w, delta)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, delta = state
        g = torch.clamp(batch.values, -delta, delta)
        return g.mul_(_scaled(w, scale.to(batch.dtype)))


class ElasticNetGrad:
    """ElasticNet (no center, no clip): Σp = a Σ|v| + (1 - a) Σv² from two reductions and no
    full-size p (all terms >= 0: no cancellation); the gradient a sign(v) + (2 - 2a) v."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        w = _plain_terms(reg, batch)
        if w is None:
            return None
        a, v = float(reg._opts["l1_ratio"]), batch.values
        flat = v.reshape(-1)
        l1 = v.abs().sum()
        l2 = torch.dot(flat, flat)
        raw = l1 if a == 1.0 else l2 if a == 0.0 else l1 * const(a, l1) + l2 * const(1.0 - a, l2)
        metrics = {
            "elastic_net_raw": raw,
            "elastic_net_mean": batch.per_token(raw),
            "l1_raw": l1,
            "l2_raw": l2,
        }
        return _scaled(w, raw), metrics, (w, a)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, a = state
        v, s = batch.values, _scaled(w, scale.to(batch.dtype))
        if a == 0.0:
            return v * (s * const(2.0, s))
        g = _sign(v).mul_(s * const(a, s))
        return g if a == 1.0 else g.addcmul_(v, s * const(2.0 - 2.0 * a, s))


class SampledEntropyGrad:
    """SampledEntropy on-policy (no behavior): rho = exp(lp - sg(lp)) is 1, at a non-finite lp
    too (``importance_ratio``), so rho·lp is ``lp`` exactly, without ``exp``; the slope
    rho·(lp + 1) is ``lp + 1``, and 0 at uncounted tokens."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        o = reg._opts
        w = _weight(batch)
        if w is None or o["behavior"] is not None:
            return None
        v = batch.values
        total = v.sum()  # Σ rho·lp
        p = torch.add(v, const(1.0, v))  # rho·(lp + 1), for the backward (a copy: v may change)
        raw = total if o["mode"] == "maximize" else -total
        metrics = {
            "sampled_entropy_raw": raw,
            "sampled_entropy_mean": batch.per_token(raw),
            "entropy_mean": batch.per_token(-total),
        }
        return _scaled(w, raw), metrics, (w, p)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, p = state
        s = _scaled(w, scale.to(batch.dtype))
        g = p.mul(s if reg._opts["mode"] == "maximize" else -s)
        return g if batch.mask is None else zero_uncounted(g, batch.mask, True, batch._keep)


class ConsistencyGrad:
    """Consistency, metric "mse" or "l1": ``d = x - y`` once, 0 at uncounted tokens (an
    element -inf in both arrays is one: its ``-inf - -inf`` is set to 0 with the rest), then
    ``d²`` or ``|d|`` and the slope ``2d`` or ``sign(d)``.

    ``MASKS_ITS_OWN``: the values are read only through ``d`` (and ``valid_tokens``, whose
    verdict on an uncounted token the mask overrides), so they come unmasked, as
    SampledKL's do.

    ``VALID_IF_FINITE``: a counted token that ``valid_tokens`` rejects (-inf in both
    arrays) makes its ``d`` NaN, and so the value; a finite value means that every counted
    token is valid, and the restriction would change nothing. The training path runs this
    kernel before ``valid_tokens``, which runs only where the value is not finite (two
    passes and a host read less per call, ~30 us on the Tinker batch)."""

    MASKS_ITS_OWN = True
    VALID_IF_FINITE = True

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        how = reg._opts["metric"]
        w = _weight(batch)
        if w is None or how not in ("mse", "l1") or batch.values.ndim != 1:
            return None
        y = batch.field(reg._opts["paired"], role="paired", counted=False)
        d = batch.values - y
        if batch.mask is not None:
            d = zero_uncounted(d, batch.mask, True, batch._keep)
        if how == "mse":
            raw, peak = _squares(batch, d)
        else:
            p = d.abs()
            raw = p.sum()
            peak = p.amax() if batch.size else batch.zero()  # (p >= 0, 0 where uncounted)
        metrics = {
            "consistency_raw": raw,
            "consistency_mean": batch.per_token(raw),
            "consistency_max": peak,
        }
        return _scaled(w, raw), metrics, (w, d)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, d = state
        if reg._opts["metric"] == "mse":
            return d * _scaled(w, scale.to(batch.dtype), 2.0)
        return _sign(d).mul_(_scaled(w, scale.to(batch.dtype)))


class GradientPenaltyGrad:
    """GradientPenalty: the row norms by one fused reduction (no squared ``[n, D]``
    temporary), ``p = (‖g‖ - c)²`` per row, and the slope ``2 (‖g‖ - c) g / ‖g‖`` (0 on a
    zero row). A norm that is not finite (a row holding inf or NaN, or one beyond the
    dtype's range unscaled), or a counted row whose squares underflow (``Σ g²`` within
    ``D · tiny / eps`` of 0, a zero row included), hands the call to the generic kernel,
    whose scaled norms and conventions cover it: their sum and least, read on the host (no
    device sync on the CPU), tell.

    ``ROWS``: it reads the values as ``[n, D]`` rows and a per-row mask, and its penalty has
    no ``valid_tokens``, so a call on one tensor needs no Batch (``torch_autograd._Flat``)."""

    ROWS = True

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        w, v = _weight(batch), batch.values
        if w is None or v.ndim != 2 or v.device.type != "cpu" or not batch.size:
            return None
        norm = torch.linalg.vector_norm(v, dim=-1)  # (unscaled: Σ g² may under/overflow)
        total = norm.sum()
        counted = norm if batch.mask is None else norm.masked_fill(~batch.mask, math.inf)
        top, low = torch.stack([total, counted.amin()]).tolist()  # (one read on the host)
        if not (math.isfinite(top) and low > math.sqrt(v.shape[1] * _UNDERFLOW[v.dtype])):
            return None
        d = norm - const(float(reg._opts["target_norm"]), norm)
        # (an uncounted row's p is c²: zeroed)
        p, raw = zero_uncounted_sum(d * d, batch.mask, True, batch._keep)
        metrics = {
            "gradient_penalty_raw": raw,
            "gradient_penalty_mean": batch.per_token(raw),
            "gradient_penalty_max": p.amax(),  # (p >= 0, 0 where uncounted)
            "grad_norm_mean": batch._divide(total, batch.count),
        }
        return _scaled(w, raw), metrics, (w, norm, d)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, norm, d = state
        if batch.mask is None:  # every row counts, and every norm is > 0 (the forward's check)
            inv = norm.reciprocal()
        else:  # (an uncounted row's norm is 0)
            zero = const(0.0, norm)
            inv = torch.where(norm > zero, norm.reciprocal(), zero)
        factor = (d * inv).mul_(_scaled(w, scale.to(batch.dtype), 2.0))
        return batch.values * factor[:, None]  # (an uncounted row holds 0: so is its slope)


class OrthogonalityGrad:
    """Orthogonality, kind "cosine": the Gram matrices of the unit rows by one batched
    matmul, |cos| clipped to 1 with the diagonal set to 0 in place (a NaN there makes the
    matrix's penalty NaN either way), and the generic path's closed form for the gradient,
    with one fewer ``[N, r, r]`` temporary and no ``where`` over it."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        o, v, w = reg._opts, batch.values, _weight(batch)
        if w is None or o["kind"] != "cosine" or v.ndim != 3 or not batch.size:
            return None
        a = v if o["mode"] == "rows" else v.transpose(1, 2)
        r = a.shape[1]
        if r < 2:
            return None
        sq = (a * a).sum(-1)
        zero = const(0.0, sq)
        inv = torch.where(sq != zero, torch.reciprocal(sq.sqrt()), zero)  # [N, r]
        c = torch.matmul(a, a.transpose(1, 2)).mul_(inv[:, :, None]).mul_(inv[:, None, :])
        absc = c.abs().clamp_(max=1.0)
        absc.diagonal(dim1=-2, dim2=-1).zero_()
        pairs = float(r * (r - 1))
        p = absc.sum((-2, -1)).div_(const(pairs, absc))
        raw = p.sum()
        metrics = {
            "orthogonality_raw": raw,
            "orthogonality_mean": batch.per_token(raw),
            "orthogonality_max": p.amax(),  # (p >= 0, 0 for an uncounted matrix: zeros)
        }
        return _scaled(w, raw), metrics, (w, a, c, inv, pairs)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        w, a, c, inv, pairs = state
        # d p / d c = sign(c) / pairs off the diagonal, 0 where |c| > 1 (the clip holds it)
        # (the generic closed form's operations in its order: a gradient that is 0 but for
        # rounding rounds the same way)
        sgn = _sign(c)
        one = const(1.0, c)
        sgn.mul_(torch.clamp(c.abs().sub_(one), min=0.0).sign_().neg_().add_(one))
        sgn.diagonal(dim1=-2, dim2=-1).zero_()
        sgn.div_(const(pairs, sgn))
        col = inv[:, :, None]
        u = a * col
        along = (sgn * c).sum(-1, keepdim=True)
        g = (col * const(2.0, col)) * torch.matmul(sgn, u).sub_(along * u)
        g.mul_(_scaled(w, scale.to(batch.dtype)))
        return g if reg._opts["mode"] == "rows" else g.transpose(1, 2)


GRAD: dict[str, Any] = {
    "l1_sparsity": L1Grad,
    "l2_weight_decay": L2Grad,
    "sampled_kl": SampledKLGrad,
    "huber": HuberGrad,
    "elastic_net": ElasticNetGrad,
    "sampled_entropy": SampledEntropyGrad,
    "consistency": ConsistencyGrad,
    "gradient_penalty": GradientPenaltyGrad,
    "orthogonality": OrthogonalityGrad,
    **_CLASS_AXIS,  # entropy, kl, jsd, z_loss (torch_distributions)
}
PLAIN = ("l1_sparsity", "l2_weight_decay", "huber", "elastic_net", "sampled_entropy")
# (the kernels that read nothing but the values and the options: the Batch-free call)
