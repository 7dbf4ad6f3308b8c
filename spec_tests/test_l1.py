"""rg.L1 beyond the invariants it shares with L2 (test_invariants.py): the triangle inequality
(SPEC invariant 6)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .test_invariants import run, tol

Harness = Any


@given(data=st.data(), reduce=st.sampled_from(["sum", "mean"]))
def test_inv06_l1_triangle_inequality(bk: Harness, data: st.DataObject, reduce: str) -> None:
    x = data.draw(S.arrays(lo=-100, hi=100), label="x")
    y = data.draw(
        S.arrays(str(x.dtype), lo=-100, hi=100).filter(lambda a: a.shape == x.shape)
        | st.just(np.ones_like(x)),
        label="y",
    )
    reg = rg.L1(reduce=reduce)
    both, _ = run(bk, reg, bk.asarray((x + y).astype(x.dtype)))
    sx, _ = run(bk, reg, bk.asarray(x))
    sy, _ = run(bk, reg, bk.asarray(y))
    rtol, atol = tol(str(x.dtype), x, y)
    assert both <= sx + sy + atol + rtol * (sx + sy), (both, sx, sy)
