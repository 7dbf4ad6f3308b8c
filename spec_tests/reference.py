"""A float64 NumPy reference of SPEC section 3, written as plainly as possible."""

from __future__ import annotations

from typing import Any

import numpy as np

import regularizers as rg


def flat(arrays: Any) -> np.ndarray:
    arrays = arrays if isinstance(arrays, list) else [arrays]
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def reference(
    reg: rg.Regularizer, x: Any, mask: Any = None
) -> tuple[float, dict[str, float], np.ndarray]:
    """Value, metrics and d value / d flat(x) in float64, for a logprobs/probs target."""
    lp = flat(x)
    t = np.exp(lp) if reg.target == "probs" else lp
    m = np.ones(t.shape, dtype=bool) if mask is None else flat(mask) != 0
    n = int(m.sum())
    scale = 1.0 if reg.reduce == "sum" else 1.0 / max(n, 1)
    with np.errstate(all="ignore"):
        if isinstance(reg, rg.L1):
            raw = float(np.abs(t[m]).sum())
            metrics = {"l1_raw": raw, "l1_mean": raw / max(n, 1)}
            g = np.sign(t) * scale
        else:
            lo, hi = reg.clip if reg.clip is not None else (None, None)
            c = np.clip(t, -np.inf if lo is None else lo, np.inf if hi is None else hi)
            center = reg.center
            mu = (c[m].sum() / max(n, 1)) if center == "mean" else (center or 0.0)
            d = c - mu
            s = d * d
            raw = float(s[m].sum())
            metrics = {
                "l2_raw": raw,
                "l2_mean": raw / max(n, 1),
                "l2_max": float(s[m].max()) if n else 0.0,
            }
            inside = ~((t < (-np.inf if lo is None else lo)) | (t > (np.inf if hi is None else hi)))
            g = np.where(inside, 2.0 * d * scale, 0.0)
        g = np.where(m, g, 0.0)
        if reg.target == "probs":
            g = g * t
    value = raw if reg.reduce == "sum" else raw / max(n, 1)
    return value, metrics, g
