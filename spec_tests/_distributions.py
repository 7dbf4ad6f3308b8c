"""Helpers of the test modules of the penalties over distributions (SPEC 9).

Not a test module: ``test_kl``, ``test_jsd``, ``test_entropy``, ``test_z_loss`` and
``test_consistency`` share these few functions (run a call on a backend, a float64 NumPy
softmax, finite differences, the NaN-free check under -inf).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .test_properties import run

Harness = Any
NEG = -np.inf


def call(bk: Harness, reg: Any, x: Any, data: Any = None, mask: Any = None) -> Any:
    """(value, metrics, value_and_grad's gradient, autodiff's or None) as float64 NumPy."""
    value, metrics, grad, auto, _ = run(bk, S.Case(reg, x, data, mask))
    return value, metrics, grad, auto


def log_softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    """float64 log-softmax along the last axis (-inf classes stay -inf)."""
    z = np.asarray(z, dtype=np.float64) / t
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def fd_grad(reg: Any, x: np.ndarray, data: Any = None, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``reg``'s value on NumPy, float64, over finite elements
    (-inf stays -inf: its derivative is the one-sided limit 0, given as 0)."""
    out = np.zeros_like(x, dtype=np.float64)
    flat = out.reshape(-1)
    base = np.asarray(x, dtype=np.float64)
    for i in range(base.size):
        if not np.isfinite(base.reshape(-1)[i]):
            continue
        up, down = base.copy(), base.copy()
        up.reshape(-1)[i] += h
        down.reshape(-1)[i] -= h
        hi = float(reg.compute(data, up)[0])
        lo = float(reg.compute(data, down)[0])
        flat[i] = (hi - lo) / (2 * h)
    return out


def rows(
    lo: float = -8.0, hi: float = 8.0, n: tuple[int, int] = (1, 4), v: tuple[int, int] = (1, 5)
) -> Any:
    """A strategy of float64 ``[n, V]`` scores (exact in float32), finite."""
    return st.tuples(st.integers(*n), st.integers(*v)).flatmap(
        lambda s: st.lists(
            st.floats(lo, hi, width=32), min_size=s[0] * s[1], max_size=s[0] * s[1]
        ).map(lambda xs, s=s: np.asarray(xs, dtype=np.float64).reshape(s))
    )


def assert_nan_free(
    bk: Harness, reg: Any, x: np.ndarray, data: dict[str, Any] | None = None
) -> Any:
    """Value and gradients (closed form and autodiff) have no NaN; returns ``call``'s result."""
    value, metrics, grad, auto = call(bk, reg, x, data)
    assert not np.isnan(value), f"{reg}: value is NaN"
    assert not any(np.isnan(v) for v in metrics.values()), f"{reg}: a metric is NaN"
    assert not np.isnan(grad).any(), f"{reg}: value_and_grad's gradient has NaN"
    if auto is not None:
        assert not np.isnan(auto).any(), f"{reg}: autodiff's gradient has NaN"
    return value, metrics, grad, auto


# A batch with -inf classes (shared by the two arrays) and a row of all -inf in each.
MASKED_X = np.array(
    [
        [0.5, NEG, -1.0, 2.0, NEG],
        [NEG, NEG, NEG, NEG, NEG],  # a fully masked token
        [3.0, 1.0, NEG, NEG, NEG],
        [-120.0, 0.0, 1.0, 0.25, NEG],  # a probability that underflows in float32
    ]
)
MASKED_Y = np.array(
    [
        [1.5, NEG, 0.0, -2.0, NEG],
        [0.0, 1.0, 2.0, 3.0, NEG],
        [1.0, 2.0, NEG, NEG, NEG],
        [0.0, 1.0, -3.0, 0.5, NEG],
    ]
)
"""The two arrays share their -inf classes, so every divergence between them is finite."""


def drop_masked(reg: Any, value: float, bk: Harness, x: np.ndarray, data: Any) -> None:
    """The -inf rule as an identity: the same call without the fully -inf row and without
    the class that is -inf in every row gives the same value (reduce="mean": N drops too)."""
    keep_rows = ~np.all(x == NEG, axis=-1)
    for arr in (data or {}).values():
        keep_rows &= ~np.all(arr == NEG, axis=-1)
    keep_cols = ~np.all(x[keep_rows] == NEG, axis=0)
    small = x[keep_rows][:, keep_cols]
    small_data = None if data is None else {k: a[keep_rows][:, keep_cols] for k, a in data.items()}
    got = call(bk, reg, small, small_data)[0]
    np.testing.assert_allclose(value, got, rtol=1e-12, atol=1e-12)


def entropy_of(lp: np.ndarray) -> np.ndarray:
    p = np.exp(lp)
    return -np.sum(p * np.where(p > 0, lp, 0.0), axis=-1)


__all__ = [
    "MASKED_X",
    "MASKED_Y",
    "NEG",
    "assert_nan_free",
    "call",
    "drop_masked",
    "entropy_of",
    "fd_grad",
    "log_softmax",
    "rg",
    "rows",
]
