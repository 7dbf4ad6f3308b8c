"""torch (eager) fast path for ``compute`` when no gradient is needed: fused reductions.

The generic path materializes ``|x|`` or ``x²`` and reduces it once per metric. Here each
quantity is one fused reduction kernel over the input, with no full-size temporary:
``vector_norm(x, 1)`` for Σ|x|, ``vector_norm(x, 2)²`` for Σx², ``aminmax`` for max x² (from the
extrema), ``var`` (Welford, one pass) for Σ(c - mean)². Half precision accumulates in
float32 through the kernels' ``dtype=`` argument, without a float32 copy of the input.

Taken only when autograd does not need the graph (no input requires grad, or grad mode is
off) and outside ``torch.compile`` tracing; otherwise the generic path runs, whose gradient
conventions torch autograd sees through.
"""

from __future__ import annotations

from typing import Any

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute(kind: str, reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    arrays = list(logprobs) if type(logprobs) in (list, tuple) else [logprobs]
    if not arrays or any(type(a) is not torch.Tensor or a.dtype not in _FLOATS for a in arrays):
        return None
    if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return None
    if torch.compiler.is_compiling():
        return None
    if len({a.device for a in arrays}) != 1:
        return None
    x = arrays[0].reshape(-1) if len(arrays) == 1 else torch.cat([a.reshape(-1) for a in arrays])
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    n = x.numel()
    if n == 0:
        zero = torch.zeros((), dtype=dtype, device=x.device)
        names = ("l1_raw", "l1_mean") if kind == "l1" else ("l2_raw", "l2_mean", "l2_max")
        return zero, {k: zero.clone() for k in names}
    if reg.target == "probs":
        x = torch.exp(x.to(dtype))
    if kind == "l1":
        raw = torch.linalg.vector_norm(x, 1, dtype=dtype)
        mean = raw / n
        return (raw if reg.reduce == "sum" else mean), {"l1_raw": raw, "l1_mean": mean}
    lo, hi = reg.clip if reg.clip is not None else (None, None)
    center = reg.center
    c = x if reg.clip is None else torch.clamp(x.to(dtype), lo, hi)
    if center == "mean":
        c = c.to(dtype)
        # One fused pass each: the (Welford, stable) variance, and both extrema.
        raw = torch.var(c, correction=0) * n
        m = c.mean()
        low, high = torch.aminmax(c)
        peak = torch.maximum((high - m) ** 2, (low - m) ** 2)
        # sum((c - m)²) is NaN as soon as c holds ±inf (inf - inf); var says so too
        peak = torch.where(torch.isfinite(m), peak, raw)
    else:
        if center is not None:
            c = c.to(dtype) - center
        raw = torch.linalg.vector_norm(c, 2, dtype=dtype) ** 2
        low, high = torch.aminmax(c)
        peak = torch.maximum(high.to(dtype) ** 2, low.to(dtype) ** 2)
    mean = raw / n
    metrics = {"l2_raw": raw, "l2_mean": mean, "l2_max": peak}
    return (raw if reg.reduce == "sum" else mean), metrics
