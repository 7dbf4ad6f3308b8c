"""rg.JSD (SPEC 9): bounds, the β ↔ 1 - β symmetry, TRL's convention, the -inf rule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from ._distributions import (
    MASKED_X,
    MASKED_Y,
    NEG,
    assert_nan_free,
    call,
    drop_masked,
    fd_grad,
    log_softmax,
    rows,
)

Harness = Any
BETAS = st.one_of(st.sampled_from([0.5, 0.1, 0.9]), st.floats(0.015625, 0.984375, width=32))


def jsd(beta: float = 0.5, **kw: Any) -> rg.JSD:
    return rg.JSD(rg.Field("r"), beta=beta, **kw)


def bound(beta: float) -> float:
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


def pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    x = draw(rows(lo=-30.0, hi=30.0))
    y = draw(rows(-30.0, 30.0, n=(x.shape[0], x.shape[0]), v=(x.shape[1], x.shape[1])))
    return x, y


@given(data=st.data())
def test_bounds_and_the_swap_symmetry(bk: Harness, data: st.DataObject) -> None:
    x, y = pair(data.draw)
    beta = data.draw(BETAS)
    value, metrics, _, _ = call(bk, jsd(beta), x, {"r": y})
    assert -1e-12 <= metrics["jsd_max"] <= bound(beta) + 1e-12
    assert -1e-12 <= value <= x.shape[0] * bound(beta) + 1e-12
    swapped = call(bk, jsd(1.0 - beta), y, {"r": x})[0]  # JSD_β(p, q) = JSD_{1-β}(q, p)
    np.testing.assert_allclose(swapped, value, rtol=1e-9, atol=1e-12)
    assert abs(call(bk, jsd(beta), x, {"r": x + 4.0})[0]) < 1e-12  # p = q: 0


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_disjoint_supports_reach_the_bound(bk: Harness, beta: float) -> None:
    x = np.array([[0.0, 1.0, NEG, NEG]])
    y = np.array([[NEG, NEG, 3.0, -1.0]])
    value, _, grad, auto = assert_nan_free(bk, jsd(beta), x, {"r": y})
    np.testing.assert_allclose(value, bound(beta), rtol=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)  # flat at the bound
    if auto is not None:
        np.testing.assert_allclose(auto, 0.0, atol=1e-12)


@given(data=st.data())
def test_trl_convention_and_gradient(bk: Harness, data: st.DataObject) -> None:
    """β weighs the reference (TRL GKD): m = βq + (1-β)p, β·KL(q‖m) + (1-β)·KL(p‖m)."""
    x, y = pair(data.draw)
    beta = data.draw(BETAS)
    t = data.draw(st.sampled_from([1.0, 2.0]))
    lp, lq = log_softmax(x, t), log_softmax(y, t)
    lm = np.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
    p, q = np.exp(lp), np.exp(lq)
    want = beta * np.sum(q * (lq - lm)) + (1 - beta) * np.sum(p * (lp - lm))
    reg = jsd(beta, temperature=t)
    value, _, grad, auto = call(bk, reg, x, {"r": y})
    np.testing.assert_allclose(value, want, rtol=1e-9, atol=1e-12)
    kl_pm = np.sum(p * (lp - lm), axis=-1, keepdims=True)
    closed = (1 - beta) * p * (lp - lm - kl_pm) / t
    np.testing.assert_allclose(grad, closed.reshape(-1), rtol=1e-8, atol=1e-12)
    if auto is not None:
        np.testing.assert_allclose(auto, grad, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(grad, fd_grad(reg, x, {"r": y}).reshape(-1), rtol=1e-5, atol=1e-7)


def test_logits_and_logprobs_and_the_neg_inf_rule(bk: Harness) -> None:
    reg = jsd(0.3, reduce="mean")
    value, _, grad, _ = assert_nan_free(bk, reg, MASKED_X, {"r": MASKED_Y})
    assert np.all(grad.reshape(MASKED_X.shape)[1] == 0)
    assert np.all(grad.reshape(MASKED_X.shape)[MASKED_X == NEG] == 0)
    drop_masked(reg, value, bk, MASKED_X, {"r": MASKED_Y})
    ok = [0, 2, 3]
    a = call(bk, reg, MASKED_X[ok], {"r": MASKED_Y[ok]})
    b = call(bk, reg, log_softmax(MASKED_X[ok]), {"r": log_softmax(MASKED_Y[ok]) - 1.0})
    np.testing.assert_allclose(a[0], b[0], rtol=1e-10)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-8, atol=1e-14)
    # one-sided -inf: finite (the mixture covers both supports), still no NaN
    y = np.where(MASKED_Y == NEG, 0.0, MASKED_Y)
    v2 = assert_nan_free(bk, reg, MASKED_X, {"r": y})[0]
    assert np.isfinite(v2)


def test_options() -> None:
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="beta"):
            rg.JSD(rg.Field("r"), beta=bad)
    with pytest.raises(TypeError, match="reference"):
        rg.JSD()
    assert rg.JSD(rg.Field("r")).name == "jsd"
