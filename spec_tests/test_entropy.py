"""rg.Entropy (SPEC 9): bounds, modes, normalize, the hinge, entropy_mean, the -inf rule;
and a Pipeline with a term on logits beside terms on logprobs."""

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
    NEG,
    assert_nan_free,
    call,
    drop_masked,
    entropy_of,
    fd_grad,
    log_softmax,
    rows,
)

Harness = Any


@given(x=rows(-30.0, 30.0), t=st.sampled_from([1.0, 0.5, 4.0]))
def test_entropy_is_between_0_and_log_v(bk: Harness, x: np.ndarray, t: float) -> None:
    n, v = x.shape
    value, metrics, _, _ = call(bk, rg.Entropy(temperature=t), x)
    h = entropy_of(log_softmax(x, t))
    np.testing.assert_allclose(value, h.sum(), rtol=1e-9, atol=1e-12)
    assert -1e-12 <= metrics["entropy_max"] <= math.log(v) + 1e-12
    np.testing.assert_allclose(metrics["entropy_mean"], h.mean(), rtol=1e-9, atol=1e-12)
    uniform = call(bk, rg.Entropy(), np.zeros((n, v)) + 3.0)[0]
    np.testing.assert_allclose(uniform, n * math.log(v), rtol=1e-12, atol=1e-15)


def test_one_hot_is_0_and_a_masked_vocabulary_keeps_v(bk: Harness) -> None:
    x = np.array([[NEG, 2.0, NEG, NEG], [0.0, 0.0, NEG, NEG]])
    value, _metrics, grad, _ = assert_nan_free(bk, rg.Entropy(), x)
    np.testing.assert_allclose(value, math.log(2), rtol=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)  # both are stationary points
    # maximize: log V - H with V = 4 (the class axis), not the 1 or 2 unmasked classes
    up = call(bk, rg.Entropy(mode="maximize"), x)[0]
    np.testing.assert_allclose(up, 2 * math.log(4) - math.log(2), rtol=1e-12)
    norm = call(bk, rg.Entropy(normalize=True), x)[0]
    np.testing.assert_allclose(norm, 0.5, rtol=1e-12)


def test_maximize_near_uniform_keeps_its_slope(bk: Harness) -> None:
    """log V - H of a near-uniform row rounds to 0 or below; the value is kept at >= 0, but the
    gradient is still -dH (a rounding guard, not a kink). Found by the CI profile."""
    x = np.array([[0.0, -5.96046448e-08, -5.96046448e-08, -5.96046448e-08, -5.96046448e-08]])
    value, _, grad, auto = call(bk, rg.Entropy(mode="maximize"), x)
    base = call(bk, rg.Entropy(), x)[2]
    assert value >= 0.0
    np.testing.assert_allclose(grad, -base, rtol=1e-9, atol=1e-15)
    assert np.any(grad != 0.0)
    if auto is not None:
        np.testing.assert_allclose(auto, -base, rtol=1e-6, atol=1e-15)


@given(x=rows(-10.0, 10.0, v=(2, 5)), data=st.data())
def test_modes_normalize_and_hinge(bk: Harness, x: np.ndarray, data: st.DataObject) -> None:
    n, v = x.shape
    h = entropy_of(log_softmax(x))
    log_v = math.log(v)
    normalize = data.draw(st.booleans())
    s = 1 / log_v if normalize else 1.0
    tau = data.draw(st.floats(0.0, 1.0, width=32))
    cases = {
        ("minimize", None): h * s,
        ("maximize", None): (log_v - h) * s,
        ("minimize", tau): np.maximum(h * s - tau, 0),
        ("maximize", tau): np.maximum(tau - h * s, 0),
    }
    base_grad = call(bk, rg.Entropy(), x)[2]
    for (mode, th), want in cases.items():
        reg = rg.Entropy(mode=mode, normalize=normalize, threshold=th)
        value, metrics, grad, auto = call(bk, reg, x)
        np.testing.assert_allclose(value, want.sum(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(metrics["entropy_raw"], want.sum(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(metrics["entropy_max"], want.max(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(metrics["entropy_mean"], h.mean(), rtol=1e-9, atol=1e-12)
        assert value >= 0.0
        slope = np.full(n, s if mode == "minimize" else -s)
        if th is not None:
            active = (h * s > th) if mode == "minimize" else (th > h * s)
            slope = np.where(active, slope, 0.0)
        want_grad = (base_grad.reshape(n, v) * slope[:, None]).reshape(-1)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
        if auto is not None:
            np.testing.assert_allclose(auto, grad, rtol=1e-9, atol=1e-12)


@given(x=rows(-10.0, 10.0), t=st.sampled_from([1.0, 0.6]))
def test_gradient_is_minus_p_times_log_p_plus_h(bk: Harness, x: np.ndarray, t: float) -> None:
    lp = log_softmax(x, t)
    p, h = np.exp(lp), entropy_of(lp)
    reg = rg.Entropy(temperature=t)
    _, _, grad, _ = call(bk, reg, x)
    np.testing.assert_allclose(
        grad, (-p * (lp + h[:, None]) / t).reshape(-1), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(grad, fd_grad(reg, x).reshape(-1), rtol=1e-5, atol=1e-7)
    same = call(bk, reg, lp * t - 5.0)  # logprobs (at T) give the logits' result
    np.testing.assert_allclose(same[2], grad, rtol=1e-8, atol=1e-12)


def test_one_class_is_defined_without_nan(bk: Harness) -> None:
    x = np.array([[3.0], [NEG], [0.0]])
    for mode in ("minimize", "maximize"):
        for th in (None, 0.5):
            reg = rg.Entropy(mode=mode, normalize=True, threshold=th)
            value, metrics, _, _ = assert_nan_free(bk, reg, x)
            assert value == (0.0 if th is None or mode == "minimize" else 2 * 0.5)
            assert metrics["entropy_mean"] == 0.0


@pytest.mark.parametrize("mode", ["minimize", "maximize"])
def test_neg_inf_is_a_masked_class(bk: Harness, mode: str) -> None:
    reg = rg.Entropy(mode=mode, reduce="mean")
    value, metrics, grad, auto = assert_nan_free(bk, reg, MASKED_X)
    assert np.isfinite(grad).all()
    assert auto is None or np.isfinite(auto).all()
    assert np.all(grad.reshape(MASKED_X.shape)[1] == 0)
    assert np.all(grad.reshape(MASKED_X.shape)[MASKED_X == NEG] == 0)
    if mode == "minimize":  # (maximize depends on V, which dropping a class changes)
        drop_masked(reg, value, bk, MASKED_X, None)
    np.testing.assert_allclose(
        metrics["entropy_mean"], entropy_of(log_softmax(MASKED_X[[0, 2, 3]])).mean(), rtol=1e-12
    )


def test_pipeline_with_a_term_on_logits(bk: Harness) -> None:
    """Named inputs: a term on logits beside terms on logprobs; a gradient per input."""
    z = MASKED_X[[0, 2, 3]]
    lp = np.array([-0.5, -1.25, -3.0])
    pipe = rg.Pipeline(
        [
            rg.Term(rg.Entropy(), 0.01, input="logits"),
            rg.Term(rg.ZLoss(), 1e-4, input="logits"),
            (rg.L2(), 0.1),
        ],
        metrics="array",
    )

    def go(lp_: Any, z_: Any) -> Any:
        return pipe.value_and_grad(None, {"logprobs": lp_, "logits": z_})

    loss, metrics, grads = bk.call(go, bk.asarray(lp), bk.asarray(z))
    assert set(grads) == {"logprobs", "logits"}
    h = call(bk, rg.Entropy(), z)
    zl = call(bk, rg.ZLoss(), z)
    l2 = call(bk, rg.L2(), lp)
    want = 0.01 * h[0] + 1e-4 * zl[0] + 0.1 * l2[0]
    np.testing.assert_allclose(bk.float(loss), want, rtol=1e-12)
    np.testing.assert_allclose(
        bk.to_numpy(grads["logits"]).reshape(-1), 0.01 * h[2] + 1e-4 * zl[2], rtol=1e-12
    )
    np.testing.assert_allclose(bk.to_numpy(grads["logprobs"]), 0.1 * l2[2], rtol=1e-12)
    np.testing.assert_allclose(bk.float(metrics["entropy/entropy_mean"]), h[1]["entropy_mean"])


def test_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        rg.Entropy(mode="max")
    with pytest.raises(ValueError, match="threshold"):
        rg.Entropy(threshold=-1.0)
    with pytest.raises(TypeError, match="normalize"):
        rg.Entropy(normalize=1)
    with pytest.raises(TypeError, match="axis"):
        rg.Entropy(axis=1.0)
    assert rg.Entropy().name == "entropy"
