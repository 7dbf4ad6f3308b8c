"""SPEC section 9, ``rg.GradientPenalty``: what is exact about it, on every backend.

At g = 0 the value is c² and the gradient exactly 0 (no NaN), by ``value_and_grad`` and by
torch and JAX autodiff through ``compute``; the value is 0 where ‖g‖ = c; gradients equal
central finite differences in float64 away from 0; the ``axis`` option; norms that neither
overflow nor underflow; NaN and ±inf. (Agreement with the float64 reference for every
reduce, masks and lists is in ``test_properties``.)
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S

Harness = Any
TARGETS = (0.0, 1.0, 2.5)


def run(
    bk: Harness, reg: rg.GradientPenalty, g: np.ndarray, dtype: str = "float64"
) -> tuple[float, dict[str, float], np.ndarray]:
    x = bk.asarray(np.asarray(g, dtype=dtype))
    value, metrics, grad = bk.call(lambda a: reg.value_and_grad(None, a), x)
    return (
        bk.float(value),
        {k: bk.float(v) for k, v in metrics.items()},
        np.asarray(bk.to_numpy(grad), dtype=np.float64),
    )


def value_of(bk: Harness, reg: rg.GradientPenalty, g: np.ndarray) -> float:
    """The value of ``reg.compute`` (not jitted: finite differences call it many times)."""
    with bk.flags():
        value, _ = reg.compute(None, bk.asarray(np.asarray(g, dtype=np.float64)))
    return bk.float(value)


def autodiff(
    bk: Harness, reg: rg.GradientPenalty, g: np.ndarray, dtype: str = "float64"
) -> np.ndarray:
    x = bk.asarray(np.asarray(g, dtype=dtype))
    grad = bk.autodiff(lambda a: reg.compute(None, a)[0], x)
    return np.asarray(bk.to_numpy(grad), dtype=np.float64)


# ---- g = 0 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("c", TARGETS)
def test_zero_rows_cost_c_squared_with_gradient_exactly_zero(bk: Harness, c: float) -> None:
    reg = rg.GradientPenalty(target_norm=c)
    g = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0], [0.0, 0.0, 0.0]])
    value, metrics, grad = run(bk, reg, g)
    assert value == 2 * c**2 + (5.0 - c) ** 2
    assert math.isclose(metrics["grad_norm_mean"], 5.0 / 3.0, rel_tol=1e-15)  # XLA: x · (1/3)
    assert metrics["gradient_penalty_max"] == max(c**2, (5.0 - c) ** 2)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[[0, 2]] == 0.0), "the gradient of ‖g‖ is 0 at g = 0"
    np.testing.assert_allclose(grad[1], 2.0 * (5.0 - c) * np.array([0.6, 0.0, -0.8]), rtol=1e-15)
    value, _, grad = run(bk, reg, np.zeros((2, 4)))
    assert value == 2 * c**2
    assert np.all(grad == 0.0)
    if bk.backend.has_autodiff:
        for x in (g, np.zeros((2, 4))):
            auto = autodiff(bk, reg, x)
            assert np.all(np.isfinite(auto)), "no NaN from sqrt at 0 under autodiff"
            np.testing.assert_allclose(auto, run(bk, reg, x)[2], rtol=1e-15, atol=0)


@pytest.mark.backends("torch", "jax")
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_autodiff_at_zero_is_exactly_zero_in_every_dtype(bk: Harness, dtype: str) -> None:
    reg = rg.GradientPenalty(reduce="mean")
    auto = autodiff(bk, reg, np.zeros((3, 5)), dtype)
    assert np.all(auto == 0.0)


# ---- ‖g‖ = c -------------------------------------------------------------------------------
@given(
    c=st.floats(0.125, 10.0),
    directions=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 4)),
        elements=st.floats(-1, 1, allow_subnormal=False),
    ),
)
def test_zero_where_the_norm_is_the_target(bk: Harness, c: float, directions: np.ndarray) -> None:
    norms = np.linalg.norm(directions, axis=-1, keepdims=True)
    directions = np.where(norms > 1e-3, directions, 1.0)
    g = c * directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    value, metrics, grad = run(bk, rg.GradientPenalty(target_norm=c), g)
    assert 0.0 <= value < 1e-24 * len(g) * c**2 + 1e-28
    np.testing.assert_allclose(metrics["grad_norm_mean"], c, rtol=1e-14)
    np.testing.assert_allclose(grad, 0.0, atol=1e-13 * c)


# ---- gradients away from 0 -----------------------------------------------------------------
def finite_differences(
    bk: Harness, reg: rg.GradientPenalty, g: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    out = np.zeros_like(g)
    for idx in np.ndindex(g.shape):
        up, down = g.copy(), g.copy()
        up[idx] += h
        down[idx] -= h
        out[idx] = (value_of(bk, reg, up) - value_of(bk, reg, down)) / (2.0 * h)
    return out


@pytest.mark.parametrize("c", TARGETS)
@pytest.mark.parametrize("reduce", ["sum", "seq-mean-token-mean"])
def test_gradient_matches_finite_differences_and_autodiff(
    bk: Harness, c: float, reduce: str
) -> None:
    g = np.random.default_rng(int(c * 10)).standard_normal((2, 3, 4)) * 2.0
    reg = rg.GradientPenalty(target_norm=c, reduce=reduce)
    _, _, grad = run(bk, reg, g)
    np.testing.assert_allclose(grad, finite_differences(bk, reg, g), rtol=1e-6, atol=1e-8)
    if bk.backend.has_autodiff:
        np.testing.assert_allclose(autodiff(bk, reg, g), grad, rtol=1e-12, atol=1e-14)


# ---- the axis option -----------------------------------------------------------------------
@given(
    g=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
        elements=S.reals(-5, 5),
    )
)
def test_axis_names_the_vector_axis(bk: Harness, g: np.ndarray) -> None:
    last = run(bk, rg.GradientPenalty(reduce="mean"), g)
    for axis, moved in [
        (1, np.swapaxes(g, 1, 2)),
        (-2, np.swapaxes(g, 1, 2)),
        (0, np.moveaxis(g, 2, 0)),
    ]:
        got = run(bk, rg.GradientPenalty(reduce="mean", axis=axis), moved)
        np.testing.assert_allclose(got[0], last[0], rtol=1e-13, atol=1e-15)
        for k, v in last[1].items():
            np.testing.assert_allclose(got[1][k], v, rtol=1e-13, atol=1e-15)
        back = np.swapaxes(got[2], 1, 2) if axis != 0 else np.moveaxis(got[2], 0, 2)
        np.testing.assert_allclose(back, last[2], rtol=1e-13, atol=1e-15)


# ---- range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_norms_neither_overflow_nor_underflow(bk: Harness, dtype: str) -> None:
    # powers of two: the squares are out of the dtype's range, the norms are not
    k = 120 if dtype == "float32" else 1000
    for s in (2.0**k, 2.0**-k):
        g = np.array([[3.0 * s, -4.0 * s]])
        value, metrics, grad = run(bk, rg.GradientPenalty(target_norm=5.0 * s), g, dtype)
        assert metrics["grad_norm_mean"] == 5.0 * s
        assert value == 0.0
        np.testing.assert_allclose(grad, 0.0, atol=1e-6 * s)
    # a tiny gradient still has its direction: 2 (‖g‖ - 1) g / ‖g‖, not 0
    tiny = np.array([[3.0 * 2.0**-k, -4.0 * 2.0**-k]])
    value, _, grad = run(bk, rg.GradientPenalty(), tiny, dtype)
    assert value == 1.0
    np.testing.assert_allclose(grad, [[-1.2, 1.6]], rtol=1e-6)


def test_nan_propagates_and_inf_has_an_infinite_norm(bk: Harness) -> None:
    reg = rg.GradientPenalty()
    value, metrics = bk.call(reg, bk.asarray(np.array([[np.nan, 0.0], [1.0, 0.0]])))
    assert np.isnan(bk.float(value))
    assert np.isnan(bk.float(metrics["grad_norm_mean"]))
    value, metrics = bk.call(reg, bk.asarray(np.array([[-np.inf, 1.0], [1.0, 0.0]])))
    assert bk.float(value) == np.inf
    assert bk.float(metrics["grad_norm_mean"]) == np.inf


# ---- options -------------------------------------------------------------------------------
def test_options_are_checked(bk: Harness) -> None:
    with pytest.raises(ValueError, match="target_norm"):
        rg.GradientPenalty(target_norm=-1.0)
    with pytest.raises(ValueError, match="target_norm"):
        rg.GradientPenalty(target_norm=float("inf"))
    with pytest.raises(TypeError, match="axis"):
        rg.GradientPenalty(axis=1.5)
    with pytest.raises(TypeError, match="axis"):
        rg.GradientPenalty(axis=True)
    assert rg.GradientPenalty(axis=np.int64(0)).axis == 0
    assert repr(rg.GradientPenalty(target_norm=0.0)) == "GradientPenalty(target_norm=0.0)"
    with pytest.raises(ValueError, match="axis=2"):
        rg.GradientPenalty(axis=2)(bk.asarray(np.ones((2, 3))))
