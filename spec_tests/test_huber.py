"""Huber (SPEC 8.2): the class-specific properties, on every backend.

p = ½u² for |u| <= δ and δ(|u| - ½δ) beyond, u = clip(t) - center; the gradient is
clip(u, -δ, δ). Element by element: 0 <= p <= ½u², p <= δ|u|, |∇p| <= δ; Huber is ½·L2 when
δ >= max|u|; and at the kinks u = ±δ the gradient is exactly ±δ for value_and_grad and for
torch / JAX autodiff through ``compute`` alike.
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
from regularizers.testing import generic_path

from . import strategies as S
from .test_elastic_net import evaluate

Harness = Any


def deviation(x: np.ndarray, clip: Any, center: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(u, inside) in float64: clip, then a numeric center."""
    lo, hi = (None, None) if clip is None else clip
    lo_, hi_ = -np.inf if lo is None else lo, np.inf if hi is None else hi
    return np.clip(x, lo_, hi_) - (center or 0.0), (lo_ <= x) & (x <= hi_)


def deltas() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([1.0, 0.5, 2.0]), S.reals(0.015625, 30.0))


@given(
    x=hnp.arrays(
        np.float64,
        st.integers(1, 8),
        elements=st.one_of(S.reals(-60.0, 10.0), st.sampled_from([0.0, 1.0, -1.0])),
    ),
    delta=deltas(),
    clip=S.clips(),
    center=st.none() | S.reals(-5.0, 1.0),
    data=st.data(),
)
def test_elementwise_bounds(
    bk: Harness, x: np.ndarray, delta: float, clip: Any, center: Any, data: st.DataObject
) -> None:
    """0 <= p <= ½u², p <= δ|u|, ∇p = clip(u, -δ, δ) inside the clip (0 outside), |∇p| <= δ."""
    kinks = S.kinks_of(center, clip, 0.0, delta, -delta)
    x = S.with_kinks(data.draw, [x], kinks)[0]
    reg = rg.Huber(delta=delta, clip=clip, center=center)
    u, inside = deviation(x, clip, center)

    def per_element(lp: Any) -> Any:
        return bk.xp.stack([reg(lp[i : i + 1])[0] for i in range(x.shape[0])])

    p = np.asarray(bk.to_numpy(bk.call(per_element, bk.asarray(x))), dtype=np.float64)
    tol = 1e-12 * np.maximum(1.0, 0.5 * u * u)
    assert np.all(p >= 0.0), "p >= 0"
    assert np.all(p <= 0.5 * u * u + tol), "p <= ½u²"
    assert np.all(p <= delta * np.abs(u) + tol), "p <= δ|u|"
    got = evaluate(bk, reg, x)
    want = np.where(inside, np.clip(u, -delta, delta), 0.0)
    np.testing.assert_array_equal(got["grad"], want, "value_and_grad = clip(u, -δ, δ)")
    assert np.all(np.abs(got["grad"]) <= delta), "|∇p| <= δ"
    if got["auto"] is not None:
        np.testing.assert_array_equal(got["auto"], want, "autodiff = clip(u, -δ, δ)")


@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
        elements=S.reals(-60.0, 10.0),
    ),
    reduce=st.sampled_from(["sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    clip=S.clips(),
    center=S.centers(),
    slack=st.sampled_from([1.0, 1.0, 1.5, 100.0]),
)
def test_half_of_l2_when_delta_covers_every_u(
    bk: Harness, x: np.ndarray, reduce: str, clip: Any, center: Any, slack: float
) -> None:
    u, _ = deviation(x, clip, None)
    if center == "mean":
        u = u - u.mean()
    elif center is not None:
        u = u - center
    delta = max(float(np.max(np.abs(u))), 1e-3) * slack  # δ = max|u| exactly, or more
    opts = {"reduce": reduce, "clip": clip, "center": center}
    h = evaluate(bk, rg.Huber(delta=delta, **opts), x)
    l2 = evaluate(bk, rg.L2(**opts), x)

    def close(a: Any, b: Any, what: str) -> None:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=what)

    close(h["value"], 0.5 * l2["value"], "value")
    for k in ("raw", "mean", "max"):
        close(h["metrics"][f"huber_{k}"], 0.5 * l2["metrics"][f"l2_{k}"], f"huber_{k}")
    close(h["grad"], 0.5 * l2["grad"], "value_and_grad")
    if h["auto"] is not None:
        close(h["auto"], 0.5 * l2["auto"], "autodiff")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("center", [None, -1.5])
def test_gradient_at_the_kinks_is_exact(bk: Harness, dtype: str, center: float | None) -> None:
    d, c = 0.75, center or 0.0
    offsets = np.array([-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]) * d
    x = (c + offsets).astype(dtype)
    # clip: lo at u = -3δ (passes), hi at u = +δ (the kink, passes); u = -4δ, +2δ outside
    clip = (c - 3 * d, c + d)
    got = evaluate(bk, rg.Huber(delta=d, center=center, clip=clip), x)
    u = np.clip(offsets, -3 * d, d)
    inside = (offsets >= -3 * d) & (offsets <= d)
    want = np.where(inside, np.clip(u, -d, d), 0.0)
    np.testing.assert_array_equal(got["grad"], want, "value_and_grad")
    if got["auto"] is not None:
        np.testing.assert_array_equal(got["auto"], want, "autodiff")
    p = np.where(np.abs(u) <= d, 0.5 * u * u, d * (np.abs(u) - 0.5 * d))
    assert got["value"] == float(np.sum(p))
    # without clip, at u = ±δ exactly and on both sides of it
    x = (c + np.array([-1.5, -1.0, -0.5, 0.5, 1.0, 1.5]) * d).astype(dtype)
    got = evaluate(bk, rg.Huber(delta=d, center=center), x)
    want = np.array([-1.0, -1.0, -0.5, 0.5, 1.0, 1.0]) * d
    np.testing.assert_array_equal(got["grad"], want, "value_and_grad at u = ±δ")
    if got["auto"] is not None:
        np.testing.assert_array_equal(got["auto"], want, "autodiff at u = ±δ")


def test_infinite_input_gives_inf_and_slope_delta(bk: Harness) -> None:
    got = evaluate(bk, rg.Huber(delta=2.0), np.array([-np.inf, np.inf, 0.5]))
    assert got["value"] == np.inf
    assert got["metrics"]["huber_max"] == np.inf
    np.testing.assert_array_equal(got["grad"], [-2.0, 2.0, 0.5])
    if got["auto"] is not None:  # the double where: no 0 · inf from the quadratic branch
        np.testing.assert_array_equal(got["auto"], [-2.0, 2.0, 0.5])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("above", [False, True])
def test_squares_past_the_largest_float_agree_on_every_path(
    bk: Harness, dtype: str, above: bool
) -> None:
    """Where ``u²`` overflows the dtype but ``½u²`` would not (``sqrt(max) < |u| <=
    sqrt(2 max)``, ``|u| <= δ``), ``p = ½u²`` is inf, as the generic path computes it: every
    entry point (``compute``, ``value_and_grad`` with and without ``counts``, a Pipeline,
    and autodiff through ``compute``) equals the generic path exactly, value, metrics and
    gradient, on each side of ``δ = sqrt(max)``. (The native kernels write ½u² as
    ``|u|·(|u| - |u|/2)``, finite there: they decline where ``δ² > max``; NumPy's gave a
    finite value from ``value_and_grad`` where ``compute`` gave inf.)"""
    top = float(np.finfo(dtype).max)
    root = math.sqrt(top)
    delta, u = (1.2 * root, 1.1 * root) if above else (0.9 * root, 0.8 * root)
    reg = rg.Huber(delta=delta, reduce="mean")
    pipe = rg.Pipeline([(reg, 1.0)], metrics="array")
    x = bk.asarray(np.array([u, -1.5, 0.25, -u / 2], dtype=dtype))

    def every_path() -> dict[str, list[np.ndarray]]:
        got = {
            "compute": bk.call(lambda a: reg.compute(None, a), x),
            "value_and_grad": bk.call(lambda a: reg.value_and_grad(None, a), x),
            "with counts": bk.call(lambda a: reg.value_and_grad(None, a, counts={"tokens": 4}), x),
            "Pipeline": bk.call(lambda a: pipe.value_and_grad(None, a), x),
        }
        if bk.backend.has_autodiff:
            grad = bk.autodiff(lambda a: reg.compute(None, a)[0], x, generic=False)
            got["autodiff"] = grad
        return {k: _leaves(bk, v) for k, v in got.items()}

    with np.errstate(all="ignore"):
        got = every_path()
        with generic_path():
            want = every_path()
    assert math.isinf(float(got["compute"][0])) is above  # (½u² past the largest float)
    for path, leaves in got.items():
        assert len(leaves) == len(want[path]), path
        for a, b in zip(leaves, want[path], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{path} on {bk.name}")


def _leaves(bk: Harness, out: Any) -> list[np.ndarray]:
    """The arrays of a result (value, metrics by name, gradient) as NumPy, in order."""
    if isinstance(out, dict):
        return [a for k in sorted(out) for a in _leaves(bk, out[k])]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in _leaves(bk, v)]
    if isinstance(out, (int, float)):  # (a Pipeline's term weights)
        return [np.asarray(out)]
    return [np.asarray(bk.to_numpy(out))]


def test_options_are_checked() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="delta"):
            rg.Huber(delta=bad)
    with pytest.raises(TypeError, match="delta"):
        rg.Huber(delta="1")
    with pytest.raises(ValueError, match="clip"):
        rg.Huber(clip=(1.0, 0.0))
    assert repr(rg.Huber(delta=2, center="mean")) == "Huber(delta=2.0, center='mean')"
    assert rg.Huber.name == "huber"
    assert rg.from_config(rg.Huber(delta=0.5).to_config()) == rg.Huber(delta=0.5)
