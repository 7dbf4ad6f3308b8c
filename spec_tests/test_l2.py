"""rg.L2 beyond the invariants it shares with L1 (test_invariants.py): zero on its own center,
fixed or the mean (SPEC invariant 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .test_invariants import run, tol

Harness = Any


@given(
    c=S.reals(-100, 10),
    n=st.integers(0, 20),
    dtype=st.sampled_from(S.FLOATS),
    reduce=st.sampled_from(["sum", "mean"]),
)
def test_inv03_l2_zero_on_its_center(
    bk: Harness, c: float, n: int, dtype: str, reduce: str
) -> None:
    x = np.full(n, c, dtype=dtype)
    value, metrics = run(bk, rg.L2(center=c, reduce=reduce), bk.asarray(x))
    assert value == 0.0, value  # c - c is exactly 0
    assert all(v == 0.0 for v in metrics.values()), metrics
    # The mean of a constant is c up to rounding of the sum, so "mean" is zero up to that.
    value, metrics = run(bk, rg.L2(center="mean", reduce=reduce), bk.asarray(x))
    _, atol = tol(dtype, x)
    assert 0.0 <= value <= atol, value
