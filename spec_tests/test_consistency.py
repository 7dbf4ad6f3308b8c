"""rg.Consistency (SPEC 9): ≥ 0, 0 on equal inputs, symmetric; per element for mse/l1,
per row for cosine/kl; the cosine's zero rows; the -inf rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from ._distributions import MASKED_X, MASKED_Y, NEG, assert_nan_free, call, fd_grad, rows

Harness = Any
METRICS = ("mse", "l1", "cosine", "kl")


def cons(metric: str, **kw: Any) -> rg.Consistency:
    return rg.Consistency(rg.Field("y"), metric=metric, **kw)


@given(data=st.data())
def test_nonnegative_zero_on_equal_and_symmetric(bk: Harness, data: st.DataObject) -> None:
    x = data.draw(rows(-10.0, 10.0))
    y = data.draw(rows(-10.0, 10.0, n=(x.shape[0],) * 2, v=(x.shape[1],) * 2))
    metric = data.draw(st.sampled_from(METRICS))
    value = call(bk, cons(metric), x, {"y": y})[0]
    assert value >= 0.0
    swapped = call(bk, cons(metric), y, {"y": x})[0]
    np.testing.assert_allclose(swapped, value, rtol=1e-12, atol=1e-15)
    same, _, grad, _ = call(bk, cons(metric), x, {"y": x})
    if metric in ("mse", "l1"):
        assert same == 0.0  # x - x is exactly 0
    else:  # 1 - cos and the symmetric KL are 0 up to rounding (XLA reassociates under jit)
        assert abs(same) <= 1e-12
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


@given(data=st.data())
def test_closed_forms_and_gradients(bk: Harness, data: st.DataObject) -> None:
    x = data.draw(rows(-10.0, 10.0))
    y = data.draw(rows(-10.0, 10.0, n=(x.shape[0],) * 2, v=(x.shape[1],) * 2))
    d = x - y
    nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
    cos = np.sum(x * y, axis=-1) / np.where(nx * ny > 0, nx * ny, 1)
    cos_value = np.where((nx > 0) & (ny > 0), 1 - cos, np.where((nx == 0) & (ny == 0), 0, 1))
    lp = x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
    lq = y - np.log(np.sum(np.exp(y), axis=-1, keepdims=True))
    p, q = np.exp(lp), np.exp(lq)
    sym = 0.5 * (np.sum(p * (lp - lq)) + np.sum(q * (lq - lp)))
    want = {"mse": np.sum(d * d), "l1": np.sum(np.abs(d)), "cosine": cos_value.sum(), "kl": sym}
    for metric in METRICS:
        reg = cons(metric)
        value, _, grad, auto = call(bk, reg, x, {"y": y})
        np.testing.assert_allclose(value, want[metric], rtol=1e-9, atol=1e-12, err_msg=metric)
        if auto is not None:  # (rounding relative to the largest component: a cosine row
            # of norm 1.7e-7 orthogonal to its pair has [0, 0, -5.9e6], the zeros as ±7e-10)
            scale = max(1.0, float(np.max(np.abs(grad), initial=0.0)))
            if metric == "cosine":  # and to the terms before they cancel: y/(|x||y|) and
                # cos x/|x|², each up to 1/|x| (a row of norm 1.4e-12 gave -16457.5186 and
                # -16457.5188, terms of 6.9e11 apart by a few of their ulps)
                scale = max([scale] + [1.0 / float(n) for n in nx if n > 0])
            np.testing.assert_allclose(auto, grad, rtol=1e-9, atol=1e-12 * scale, err_msg=metric)
        kinked = metric == "l1" or (metric == "cosine" and np.any(nx < 1e-3))
        if not kinked:  # (l1's kinks and the cosine's jump at 0 defeat finite differences)
            fd = fd_grad(reg, x, {"y": y}, h=1e-7)
            np.testing.assert_allclose(grad, fd.reshape(-1), rtol=1e-4, atol=1e-5, err_msg=metric)
    np.testing.assert_allclose(call(bk, cons("l1"), x, {"y": y})[2], np.sign(d).reshape(-1))
    kl = call(bk, rg.KL(rg.Field("y"), direction="symmetric"), x, {"y": y})
    got = call(bk, cons("kl"), x, {"y": y})
    np.testing.assert_allclose(got[0], kl[0], rtol=1e-12)
    np.testing.assert_allclose(got[2], kl[2], rtol=1e-12, atol=1e-15)


def test_cosine_zero_rows_and_scale(bk: Harness) -> None:
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1e-30, 2e-30, -1e-30]])
    y = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2e30, 4e30, -2e30]])
    value, _, grad, _auto = assert_nan_free(bk, cons("cosine", reduce="sum"), x, {"y": y})
    np.testing.assert_allclose(value, 0.0 + 1.0 + 1.0 + 0.0, atol=1e-12)  # scale-free
    np.testing.assert_allclose(grad[:9], 0.0)  # finite (0) at zero rows
    # scale invariance: cos(a x, b y) = cos(x, y) for a, b > 0, and the gradient scales as 1/a
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    a = call(bk, cons("cosine"), x, {"y": y})
    b = call(bk, cons("cosine"), 3.0 * x, {"y": 0.25 * y})
    np.testing.assert_allclose(b[0], a[0], rtol=1e-12)
    np.testing.assert_allclose(b[2], a[2] / 3.0, rtol=1e-10)


def test_elementwise_on_tinker_shaped_logprobs_with_a_mask(bk: Harness) -> None:
    """mse/l1: per element of the arrays as given (a ragged list of 1-D sampled logprobs),
    mask and reduce per element, as for L2."""
    x = [np.array([-0.5, -1.0, -2.0]), np.array([-0.25])]
    y = [np.array([-0.75, -1.0, -1.0]), np.array([-1.25])]
    mask = [np.array([1.0, 1.0, 0.0]), np.array([1.0])]
    value, _metrics, grad, _ = call(bk, cons("mse", reduce="mean"), x, {"y": y}, mask)
    np.testing.assert_allclose(value, (0.0625 + 0.0 + 1.0) / 3, rtol=1e-12)
    np.testing.assert_allclose(grad, [2 * 0.25 / 3, 0.0, 0.0, 2 * 1.0 / 3], rtol=1e-12)
    l2 = call(
        bk,
        rg.L2(center=None, reduce="mean"),
        [a - b for a, b in zip(x, y, strict=True)],
        None,
        mask,
    )
    np.testing.assert_allclose(value, l2[0], rtol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_neg_inf_is_a_masked_class(bk: Harness, metric: str) -> None:
    reg = cons(metric, reduce="mean")
    value, _, grad, auto = assert_nan_free(bk, reg, MASKED_X, {"y": MASKED_Y})
    if metric in ("mse", "l1"):  # one-sided -inf elements: +inf, as for L2; never NaN
        ok = ~((MASKED_X == NEG) ^ (MASKED_Y == NEG))
        finite = call(bk, reg, np.where(ok, MASKED_X, 0.0), {"y": np.where(ok, MASKED_Y, 0.0)})
        assert value == np.inf
        assert np.isfinite(finite[0])
        return
    assert np.isfinite(value)
    assert np.isfinite(grad).all()
    assert auto is None or np.isfinite(auto).all()
    assert np.all(grad.reshape(MASKED_X.shape)[1] == 0)
    assert np.all(grad.reshape(MASKED_X.shape)[MASKED_X == NEG] == 0)
    # the masked row does not count: the same as without it
    ok = [0, 2, 3]
    np.testing.assert_allclose(
        value, call(bk, reg, MASKED_X[ok], {"y": MASKED_Y[ok]})[0], rtol=1e-12
    )


def test_both_neg_inf_elements_do_not_count(bk: Harness) -> None:
    x, y = np.array([-1.0, NEG, -2.0]), np.array([-1.5, NEG, -2.0])
    value, _metrics, grad, _auto = assert_nan_free(bk, cons("mse", reduce="mean"), x, {"y": y})
    np.testing.assert_allclose(value, 0.25 / 2, rtol=1e-12)  # N = 2
    np.testing.assert_allclose(grad, [2 * 0.5 / 2, 0.0, 0.0], rtol=1e-12)


def test_event_ndim_and_options() -> None:
    assert cons("mse").event_ndim == 0
    assert cons("l1").event_ndim == 0
    assert cons("cosine").event_ndim == 1
    assert cons("kl").event_ndim == 1
    with pytest.raises(ValueError, match="temperature"):
        cons("mse", temperature=2.0)
    assert cons("kl", temperature=2.0).temperature == 2.0
    with pytest.raises(TypeError, match="paired"):
        rg.Consistency()
    with pytest.raises(ValueError, match="metric"):
        cons("cos")
    assert cons("mse").name == "consistency"
