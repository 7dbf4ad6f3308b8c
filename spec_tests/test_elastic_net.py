"""ElasticNet (SPEC 8.1): the class-specific properties, on every backend.

p = a|u| + (1 - a)u², u = clip(t) - center, a = l1_ratio. It is L1 of u at a = 1 and L2 at
a = 0 (values and gradients), the a-mix of those two everywhere (so it lies between them), and
follows the gradient conventions of SPEC section 3 at the kinks: sign 0 at u = 0, the clip
bounds pass the gradient, 0 strictly outside; for value_and_grad and torch / JAX autodiff alike.
"""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S

Harness = Any


def _flat(a: Any) -> np.ndarray:
    parts = a if isinstance(a, list) else [a]
    return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])


def evaluate(bk: Harness, reg: Any, x: np.ndarray, mask: Any = None) -> dict[str, Any]:
    """Value, metrics, value_and_grad's gradient and (torch, JAX) autodiff's, as NumPy."""
    kw = {} if mask is None else {"mask": bk.asarray(mask)}
    lp = bk.asarray(x)
    value, metrics = bk.call(lambda a: reg.compute(None, a, **kw), lp)
    _, _, grad = bk.call(lambda a: reg.value_and_grad(None, a, **kw), lp)
    out = {
        "value": bk.float(value),
        "metrics": {k: bk.float(v) for k, v in metrics.items()},
        "grad": _flat(bk.to_numpy(grad)),
        "auto": None,
    }
    if bk.backend.has_autodiff:
        out["auto"] = _flat(bk.to_numpy(bk.autodiff(lambda a: reg.compute(None, a, **kw)[0], lp)))
    return out


def close(actual: Any, desired: Any, what: str) -> None:
    np.testing.assert_allclose(actual, desired, rtol=1e-10, atol=1e-12, err_msg=what)


def inputs() -> st.SearchStrategy[np.ndarray]:
    kinks = st.sampled_from([0.0, -1.0, 1.0, -100.0, -3.0])
    values = st.one_of(S.reals(-60.0, 10.0), kinks)
    return hnp.arrays(
        np.float64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), elements=values
    )


REDUCES = st.sampled_from(["sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum"])


@given(x=inputs(), reduce=REDUCES, clip=S.clips(), center=S.centers(), data=st.data())
def test_equals_l2_at_zero(
    bk: Harness, x: np.ndarray, reduce: str, clip: Any, center: Any, data: st.DataObject
) -> None:
    mask = data.draw(st.none() | hnp.arrays(np.bool_, x.shape), label="mask")
    opts = {"reduce": reduce, "clip": clip, "center": center}
    en = evaluate(bk, rg.ElasticNet(l1_ratio=0.0, **opts), x, mask)
    l2 = evaluate(bk, rg.L2(**opts), x, mask)
    close(en["value"], l2["value"], "value")
    close(en["metrics"]["elastic_net_raw"], l2["metrics"]["l2_raw"], "elastic_net_raw")
    close(en["metrics"]["l2_raw"], l2["metrics"]["l2_raw"], "l2_raw")
    close(en["metrics"]["elastic_net_mean"], l2["metrics"]["l2_mean"], "elastic_net_mean")
    close(en["grad"], l2["grad"], "value_and_grad")
    if en["auto"] is not None:
        close(en["auto"], l2["auto"], "autodiff")
        close(en["auto"], en["grad"], "autodiff = value_and_grad")


@given(x=inputs(), reduce=REDUCES, target=st.sampled_from(["logprobs", "probs"]), data=st.data())
def test_equals_l1_at_one(
    bk: Harness, x: np.ndarray, reduce: str, target: str, data: st.DataObject
) -> None:
    mask = data.draw(st.none() | hnp.arrays(np.bool_, x.shape), label="mask")
    opts = {"reduce": reduce, "target": target}
    en = evaluate(bk, rg.ElasticNet(l1_ratio=1.0, **opts), x, mask)
    l1 = evaluate(bk, rg.L1(**opts), x, mask)
    close(en["value"], l1["value"], "value")
    close(en["metrics"]["elastic_net_raw"], l1["metrics"]["l1_raw"], "elastic_net_raw")
    close(en["metrics"]["l1_raw"], l1["metrics"]["l1_raw"], "l1_raw")
    close(en["grad"], l1["grad"], "value_and_grad")
    if en["auto"] is not None:
        close(en["auto"], l1["auto"], "autodiff")


@given(x=inputs(), clip=S.clips(), center=S.reals(-5.0, 1.0))
def test_at_one_is_l1_of_u(bk: Harness, x: np.ndarray, clip: Any, center: float) -> None:
    """With clip and a numeric center, l1_ratio = 1 is L1 of u = clip(t) - center."""
    lo, hi = (None, None) if clip is None else clip
    lo_, hi_ = -np.inf if lo is None else lo, np.inf if hi is None else hi
    u = np.clip(x, lo_, hi_) - center
    inside = (lo_ <= x) & (x <= hi_)
    en = evaluate(bk, rg.ElasticNet(l1_ratio=1.0, clip=clip, center=center), x)
    l1 = evaluate(bk, rg.L1(), u)
    close(en["value"], l1["value"], "value")
    want = np.where(inside, np.sign(u), 0.0).reshape(-1)
    np.testing.assert_array_equal(en["grad"], want, "sign(u), 0 at u = 0 and outside the clip")
    if en["auto"] is not None:
        np.testing.assert_array_equal(en["auto"], want, "autodiff")


@given(
    x=inputs(),
    alpha=st.floats(0.0, 1.0),
    reduce=REDUCES,
    clip=S.clips(),
    center=S.centers(),
)
def test_is_the_mix_of_l1_and_l2_of_u(
    bk: Harness, x: np.ndarray, alpha: float, reduce: str, clip: Any, center: Any
) -> None:
    """EN = a·L1(u) + (1 - a)·L2(u), hence min(L1, L2) <= EN <= max(L1, L2)."""
    opts = {"reduce": reduce, "clip": clip, "center": center}
    en = evaluate(bk, rg.ElasticNet(l1_ratio=alpha, **opts), x)
    l1 = evaluate(bk, rg.ElasticNet(l1_ratio=1.0, **opts), x)
    l2 = evaluate(bk, rg.ElasticNet(l1_ratio=0.0, **opts), x)
    close(en["value"], alpha * l1["value"] + (1 - alpha) * l2["value"], "value")
    close(en["grad"], alpha * l1["grad"] + (1 - alpha) * l2["grad"], "gradient")
    close(en["metrics"]["l1_raw"], l1["metrics"]["elastic_net_raw"], "l1_raw = Σ|u|")
    close(en["metrics"]["l2_raw"], l2["metrics"]["elastic_net_raw"], "l2_raw = Σu²")
    lo, hi = sorted([l1["value"], l2["value"]])
    slack = 1e-12 * max(1.0, abs(hi))
    assert lo - slack <= en["value"] <= hi + slack, "between L1(u) and L2(u)"


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_conventions_at_the_kinks(bk: Harness, alpha: float, dtype: str) -> None:
    # clip (-3, 1), center -1: outside, at lo, u = 0, inside, at hi, outside
    x = np.array([-4.0, -3.0, -1.0, 0.0, 1.0, 2.0], dtype)
    reg = rg.ElasticNet(l1_ratio=alpha, clip=(-3.0, 1.0), center=-1.0)
    u = np.array([-2.0, -2.0, 0.0, 1.0, 2.0, 2.0])
    dp = alpha * np.sign(u) + 2 * (1 - alpha) * u
    want = np.where([False, True, True, True, True, False], dp, 0.0)
    got = evaluate(bk, reg, x)
    assert got["value"] == float(np.sum(alpha * np.abs(u) + (1 - alpha) * u * u))
    np.testing.assert_array_equal(got["grad"], want, "value_and_grad")
    if got["auto"] is not None:
        np.testing.assert_array_equal(got["auto"], want, "autodiff")
    # u = 0 everywhere (center="mean" of a constant): the gradient is exactly 0
    flat = evaluate(bk, rg.ElasticNet(l1_ratio=alpha, center="mean"), np.full(4, -2.5, dtype))
    assert flat["value"] == 0.0
    np.testing.assert_array_equal(flat["grad"], np.zeros(4), "sign 0 at u = 0")
    if flat["auto"] is not None:
        np.testing.assert_array_equal(flat["auto"], np.zeros(4), "autodiff: sign 0 at u = 0")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_infinite_input_gives_inf_not_nan(bk: Harness, alpha: float) -> None:
    got = evaluate(bk, rg.ElasticNet(l1_ratio=alpha), np.array([-np.inf, 1.0]))
    assert got["value"] == np.inf
    assert got["metrics"]["elastic_net_raw"] == np.inf
    want = -1.0 if alpha == 1.0 else -np.inf
    assert got["grad"][0] == want
    assert got["grad"][1] == alpha + 2 * (1 - alpha)
    if got["auto"] is not None:
        np.testing.assert_array_equal(got["auto"], got["grad"], "autodiff")


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="l1_ratio"):
        rg.ElasticNet(l1_ratio=1.5)
    with pytest.raises(ValueError, match="l1_ratio"):
        rg.ElasticNet(l1_ratio=float("nan"))
    with pytest.raises(TypeError, match="l1_ratio"):
        rg.ElasticNet(l1_ratio=True)
    with pytest.raises(ValueError, match="center"):
        rg.ElasticNet(center="median")
    assert repr(rg.ElasticNet(l1_ratio=0.25, clip=(-100, 0))) == (
        "ElasticNet(l1_ratio=0.25, clip=(-100.0, 0.0))"
    )
    assert rg.ElasticNet.name == "elastic_net"
    assert rg.from_config({"regularizer": "elastic_net", "options": {}}) == rg.ElasticNet()
