"""SPEC section 3 on non-finite data: NaN propagates; ±inf propagates unless clipped away."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import regularizers as rg

Harness = Any
nan, inf = math.nan, math.inf


def run(
    bk: Harness, reg: rg.Regularizer, x: list[float], mask: list[float] | None = None
) -> tuple[float, dict[str, float], np.ndarray]:
    a = bk.asarray(np.asarray(x))
    if mask is None:
        v, m, g = bk.call(lambda lp: reg.value_and_grad(None, lp), a)
    else:
        v, m, g = bk.call(
            lambda lp, w: reg.value_and_grad(None, lp, mask=w), a, bk.asarray(np.asarray(mask))
        )
    return bk.float(v), rg.to_floats(m), bk.to_numpy(g)


@pytest.mark.parametrize(
    "reg",
    [rg.L1(), rg.L2(), rg.L2(center="mean"), rg.L2(clip=(-100.0, 0.0)), rg.L1(target="probs")],
)
def test_nan_propagates(bk: Harness, reg: rg.Regularizer) -> None:
    value, metrics, grad = run(bk, reg, [-1.0, nan, -2.0])
    assert math.isnan(value)
    assert all(math.isnan(v) for v in metrics.values()), metrics
    assert math.isnan(grad[1])


def test_masked_out_nan_does_not_leak(bk: Harness) -> None:
    for reg in (rg.L1(), rg.L2(center="mean"), rg.L2(clip=(-100.0, 0.0), reduce="mean")):
        value, metrics, grad = run(bk, reg, [-1.0, nan, -inf, -2.0], mask=[1, 0, 0, 1])
        assert math.isfinite(value)
        assert all(math.isfinite(v) for v in metrics.values())
        assert grad[1] == 0.0
        assert grad[2] == 0.0
        assert np.isfinite(grad).all()


def test_infinities_propagate_without_clip(bk: Harness) -> None:
    value, metrics, grad = run(bk, rg.L1(), [-inf, 1.0, inf])
    assert value == inf
    assert metrics["l1_raw"] == inf
    assert grad.tolist() == [-1.0, 1.0, 1.0]
    value, metrics, _ = run(bk, rg.L2(), [-inf, 1.0])
    assert value == inf
    assert metrics["l2_max"] == inf


def test_clip_tames_infinities(bk: Harness) -> None:
    value, metrics, grad = run(bk, rg.L2(clip=(-100.0, 0.0)), [-inf, -1.0, inf])
    assert value == 10001.0
    assert metrics["l2_max"] == 10000.0
    assert grad.tolist() == [0.0, -2.0, 0.0]  # strictly outside the bounds: no gradient
    value, _, grad = run(bk, rg.L2(clip=(-100.0, 0.0), center="mean"), [-inf, -100.0, inf])
    assert math.isfinite(value)
    assert np.isfinite(grad).all()
    value, _, _ = run(bk, rg.L2(clip=(None, 0.0)), [-inf, -1.0])
    assert value == inf  # one-sided clip leaves the other infinity alone
