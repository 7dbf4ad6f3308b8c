"""rg.ZLoss (SPEC 9): (log Z)², its gradient 2·log Z·softmax, log_z_mean, the -inf rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given

import regularizers as rg

from ._distributions import MASKED_X, NEG, assert_nan_free, call, drop_masked, fd_grad, rows

Harness = Any


def lse(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[:, 0]


@given(x=rows(-30.0, 30.0))
def test_value_gradient_and_log_z(bk: Harness, x: np.ndarray) -> None:
    value, metrics, grad, auto = call(bk, rg.ZLoss(), x)
    z = lse(x)
    np.testing.assert_allclose(value, np.sum(z * z), rtol=1e-10, atol=1e-12)
    assert value >= 0.0
    np.testing.assert_allclose(metrics["log_z_mean"], z.mean(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(metrics["z_loss_max"], np.max(z * z), rtol=1e-10, atol=1e-12)
    p = np.exp(x - z[:, None])
    np.testing.assert_allclose(grad, (2 * z[:, None] * p).reshape(-1), rtol=1e-9, atol=1e-12)
    if auto is not None:
        np.testing.assert_allclose(auto, grad, rtol=1e-9, atol=1e-12)
    fd = fd_grad(rg.ZLoss(), x)
    np.testing.assert_allclose(grad, fd.reshape(-1), rtol=1e-5, atol=1e-6)


def test_logprobs_have_no_z_loss_and_a_shift_moves_log_z(bk: Harness) -> None:
    x = MASKED_X[[0, 2, 3]]
    logprobs = x - lse(x)[:, None]
    value, metrics, grad, _ = call(bk, rg.ZLoss(), logprobs)
    assert abs(value) < 1e-12
    assert abs(metrics["log_z_mean"]) < 1e-15
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)
    shifted = call(bk, rg.ZLoss(reduce="mean"), logprobs + 2.0)
    np.testing.assert_allclose(shifted[0], 4.0, rtol=1e-12)
    np.testing.assert_allclose(shifted[1]["log_z_mean"], 2.0, rtol=1e-12)


def test_neg_inf_is_a_masked_class(bk: Harness) -> None:
    reg = rg.ZLoss(reduce="mean")
    value, metrics, grad, auto = assert_nan_free(bk, reg, MASKED_X)
    assert np.isfinite(grad).all()
    assert auto is None or np.isfinite(auto).all()
    assert np.all(grad.reshape(MASKED_X.shape)[1] == 0)
    assert np.all(grad.reshape(MASKED_X.shape)[MASKED_X == NEG] == 0)
    drop_masked(reg, value, bk, MASKED_X, None)
    np.testing.assert_allclose(metrics["log_z_mean"], lse(MASKED_X[[0, 2, 3]]).mean(), rtol=1e-12)


def test_options() -> None:
    with pytest.raises(TypeError, match="temperature"):
        rg.ZLoss(temperature=2.0)  # no temperature: the raw scores' normalizer
    assert rg.ZLoss().name == "z_loss"
