"""rg.KL (SPEC 9): exact KL along the class axis; the -inf rule; the closed-form gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg
from regularizers._core import distributions

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
from .reference import reference

Harness = Any
DIRECTIONS = ("reverse", "forward", "symmetric")


def kl(reference: Any = None, **kw: Any) -> rg.KL:
    return rg.KL(rg.Field("r") if reference is None else reference, **kw)


def pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    x = draw(rows())
    y = draw(rows(n=(x.shape[0], x.shape[0]), v=(x.shape[1], x.shape[1])))
    return x, y


@given(data=st.data())
def test_nonnegative_and_zero_iff_same_distribution(bk: Harness, data: st.DataObject) -> None:
    x, y = pair(data.draw)
    how = data.draw(st.sampled_from(DIRECTIONS))
    t = data.draw(st.sampled_from([1.0, 0.5, 3.0]))
    value, metrics, _grad, _ = call(bk, kl(direction=how, temperature=t), x, {"r": y})
    assert value >= -1e-12
    assert metrics["kl_max"] >= -1e-12
    lp, lq = log_softmax(x, t), log_softmax(y, t)
    if np.allclose(lp, lq, atol=1e-6):
        assert value < 1e-9
    else:
        assert value > 0.0
    # p = q exactly (the same scores shifted per row): 0, and a zero gradient
    same, _, g0, _ = call(bk, kl(direction=how, temperature=t), x, {"r": x - 2.5})
    assert abs(same) < 1e-12
    np.testing.assert_allclose(g0, 0.0, atol=1e-12)


@given(data=st.data())
def test_logits_and_their_logprobs_give_the_same_result(bk: Harness, data: st.DataObject) -> None:
    x, y = pair(data.draw)
    reg = kl(direction=data.draw(st.sampled_from(DIRECTIONS)))
    a = call(bk, reg, x, {"r": y})
    b = call(bk, reg, log_softmax(x), {"r": log_softmax(y) + 7.0})
    np.testing.assert_allclose(a[0], b[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-8, atol=1e-12)


@given(data=st.data())
def test_gradient_is_the_closed_form_and_the_finite_difference(
    bk: Harness, data: st.DataObject
) -> None:
    x, y = pair(data.draw)
    t = data.draw(st.sampled_from([1.0, 0.7, 2.0]))
    lp, lq = log_softmax(x, t), log_softmax(y, t)
    p, q = np.exp(lp), np.exp(lq)
    rev = np.sum(p * (lp - lq), axis=-1, keepdims=True)
    want = {"reverse": p * (lp - lq - rev) / t, "forward": (p - q) / t}
    want["symmetric"] = 0.5 * (want["reverse"] + want["forward"])
    for how in DIRECTIONS:
        reg = kl(direction=how, temperature=t)
        _, _, grad, auto = call(bk, reg, x, {"r": y})
        np.testing.assert_allclose(grad, want[how].reshape(-1), rtol=1e-9, atol=1e-12)
        if auto is not None:
            np.testing.assert_allclose(auto, grad, rtol=1e-9, atol=1e-12)
        fd = fd_grad(reg, x, {"r": y})
        np.testing.assert_allclose(grad, fd.reshape(-1), rtol=1e-5, atol=1e-7)


def test_symmetric_is_the_mean_and_forward_is_reverse_swapped(bk: Harness) -> None:
    x, y = MASKED_X[[0, 2, 3]], MASKED_Y[[0, 2, 3]]
    rev = call(bk, kl(), x, {"r": y})[0]
    fwd = call(bk, kl(direction="forward"), x, {"r": y})[0]
    sym = call(bk, kl(direction="symmetric"), x, {"r": y})[0]
    swapped = call(bk, kl(), y, {"r": x})[0]
    np.testing.assert_allclose(fwd, swapped, rtol=1e-12)
    np.testing.assert_allclose(sym, 0.5 * (rev + fwd), rtol=1e-12)


@pytest.mark.parametrize("how", DIRECTIONS)
def test_neg_inf_is_a_masked_class(bk: Harness, how: str) -> None:
    """-inf classes and a fully -inf row: finite value, no NaN in any gradient, and the same
    value as the call without the masked row and class (the row does not count in N)."""
    reg = kl(direction=how, reduce="mean")
    value, _metrics, grad, auto = assert_nan_free(bk, reg, MASKED_X, {"r": MASKED_Y})
    assert np.isfinite(value)
    assert np.isfinite(grad).all()
    assert auto is None or np.isfinite(auto).all()
    assert np.all(grad.reshape(MASKED_X.shape)[1] == 0), "the masked row has no gradient"
    assert np.all(grad.reshape(MASKED_X.shape)[MASKED_X == NEG] == 0)
    drop_masked(reg, value, bk, MASKED_X, {"r": MASKED_Y})
    # counts: the fully -inf row is not a token
    x, d = bk.asarray(MASKED_X), {"r": bk.asarray(MASKED_Y)}
    counts = bk.call(lambda lp, dd: reg.counts(dd, lp), x, d)
    assert int(bk.to_numpy(counts["tokens"])) == 3


@pytest.mark.parametrize("how", DIRECTIONS)
def test_kl_is_inf_where_one_distribution_is_zero_and_the_other_not(bk: Harness, how: str) -> None:
    x = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    y = np.array([[0.0, NEG, 2.0], [0.5, 1.0, 2.0]])  # q = 0 where p > 0, in token 0
    value, metrics, grad, auto = call(bk, kl(direction=how), x, {"r": y})
    if how == "forward":  # KL(q||p): q = 0 there is fine; finite
        assert np.isfinite(value)
        _, _, grad2, _ = call(bk, kl(direction=how), y, {"r": x})  # now p = 0 where q > 0
        value2 = call(bk, kl(direction=how), y, {"r": x})[0]
        assert value2 == np.inf
        assert not np.isnan(grad2).any()
    else:
        assert value == np.inf
        assert metrics["kl_max"] == np.inf
    for g in (grad, auto):
        if g is not None:
            assert not np.isnan(g).any(), "never NaN"
            assert np.isfinite(g.reshape(2, 3)[1]).all(), "finite where the value is"


def test_temperature_divides_both_distributions(bk: Harness) -> None:
    x, y = MASKED_X[[0, 2, 3]], MASKED_Y[[0, 2, 3]]
    for how in DIRECTIONS:
        a = call(bk, kl(direction=how, temperature=2.5), x, {"r": y})
        b = call(bk, kl(direction=how), x / 2.5, {"r": y / 2.5})
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
        np.testing.assert_allclose(a[2], b[2] / 2.5, rtol=1e-10, atol=1e-15)


def test_the_class_axis_may_be_elsewhere(bk: Harness) -> None:
    x = np.stack([MASKED_X, MASKED_X[::-1]])  # [B, T, V]
    y = np.stack([MASKED_Y, MASKED_Y[::-1]])
    mask = np.array([[True, True, False, True], [True, True, True, False]])
    base = call(bk, kl(direction="symmetric", reduce="seq-mean-token-mean"), x, {"r": y}, mask)
    moved = call(
        bk,
        kl(direction="symmetric", reduce="seq-mean-token-mean", axis=1),
        np.moveaxis(x, -1, 1),
        {"r": np.moveaxis(y, -1, 1)},
        mask,
    )
    np.testing.assert_allclose(moved[0], base[0], rtol=1e-12)
    g = np.moveaxis(moved[2].reshape(2, 5, 4), 1, -1).reshape(-1)
    np.testing.assert_allclose(g, base[2], rtol=1e-12, atol=1e-15)


def test_blocks_of_tokens_give_the_unblocked_result(bk: Harness, monkeypatch: Any) -> None:
    """The memory bound's chunking over tokens changes nothing (every reduce, a mask)."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((3, 7, 5)) < 0.2, NEG, rng.normal(size=(3, 7, 5)) * 3)
    y = np.where(x == NEG, NEG, rng.normal(size=(3, 7, 5)))
    mask = rng.random((3, 7)) < 0.8
    reg = kl(direction="symmetric", reduce="seq-mean-token-mean")
    whole = call(bk, reg, x, {"r": y}, mask)
    monkeypatch.setattr(distributions, "BLOCK", 10)  # two rows per block
    blocked = call(bk, reg, x, {"r": y}, mask)
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-12)
    np.testing.assert_allclose(blocked[2], whole[2], rtol=1e-12, atol=1e-15)
    for k, v in whole[1].items():
        np.testing.assert_allclose(blocked[1][k], v, rtol=1e-12, err_msg=k)


def test_reference_is_required_and_positional() -> None:
    with pytest.raises(TypeError, match="reference"):
        rg.KL()
    with pytest.raises(ValueError, match="direction"):
        rg.KL(rg.Field("r"), direction="backward")
    with pytest.raises(ValueError, match="temperature"):
        rg.KL(rg.Field("r"), temperature=0.0)
    with pytest.raises(ValueError, match="probs"):
        rg.KL(rg.Field("r"), target="probs")
    assert rg.KL(rg.Field("r")) == rg.KL(reference=rg.Field("r"))
    assert rg.KL(rg.Field("r")).name == "kl"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "reg",
    [
        rg.Entropy(),
        rg.Entropy(normalize=True, mode="maximize"),
        kl(),
        kl(direction="forward"),
        kl(direction="symmetric"),
        rg.JSD(rg.Field("r")),
        rg.ZLoss(),
        rg.Consistency(rg.Field("r"), metric="kl"),
    ],
    ids=repr,
)
def test_class_axis_log_softmax_keeps_log_s_beside_a_large_max(
    bk: Harness, reg: Any, dtype: str
) -> None:
    """Scores far from 0 whose top classes tie: ``log p = (z - m) - log s``, not ``z -
    (m + log s)``, whose ``m + log s`` rounds to ``m`` here (``log 2`` and ``log 3`` are
    below half a unit of ``m``): every tied class would get ``p = 1``, the entropy 0 and
    ``Σ p`` 2 or 3. Every path (``compute``, ``value_and_grad``, autodiff; on torch each form
    of the kernels: fused softmax or the steps, arrays kept or recomputed by blocks) equals
    the float64 reference. (At realistic scores the same rounding costs float32 logits
    near 40 an error of ~2e-6 in ``Σ p``, against ~2e-7.)"""
    s = 2.0**30 if dtype == "float32" else 2.0**60  # a unit of s: 128, or 256
    u = float(np.spacing(np.asarray(s, dtype=dtype)))
    x = s + u * np.array([[0.0, 0.0, -1.0, -2.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, -3.0, 0.0]])
    y = 0.75 * s + u * np.array(
        [[0.0, -1.0, 0.0, -1.0], [0.0, 0.0, 0.0, -2.0], [-2.0, 0.0, 0.0, -1.0]]
    )
    x, y = x.astype(dtype), y.astype(dtype)
    want_value, want_metrics, want_grad = reference(reg, x, data={"r": y})
    rtol = 1e-5 if dtype == "float32" else 1e-10
    gtol = rtol * max(1.0, float(np.max(np.abs(want_grad))))
    for form in _kernel_forms(bk):
        with form:
            value, metrics, grad, auto = call(bk, reg, x, {"r": y})
        np.testing.assert_allclose(value, want_value, rtol=rtol, err_msg=f"value {form}")
        for k, w in want_metrics.items():
            np.testing.assert_allclose(metrics[k], w, rtol=rtol, atol=rtol, err_msg=f"{k} {form}")
        np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=gtol, err_msg=f"grad {form}")
        if auto is not None:
            np.testing.assert_allclose(
                auto, want_grad, rtol=rtol, atol=gtol, err_msg=f"auto {form}"
            )


def _kernel_forms(bk: Harness) -> list[Any]:
    """Contexts that run each form of torch's class-axis kernels (elsewhere, one run)."""
    if bk.library != "torch":
        return [contextlib.nullcontext()]

    @contextlib.contextmanager
    def form(fused: bool | None, blocked: bool) -> Iterator[None]:
        from regularizers._fastpath import torch_distributions

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch_distributions, "SOFTMAX", fused)
            if blocked:  # nothing kept: the backward recomputes by blocks of one row
                mp.setattr(torch_distributions, "KEEP", 0)
                for name in ("BLOCK", "DEVICE_BLOCK"):
                    mp.setattr(torch_distributions, name, 4)
            yield

    return [form(f, b) for f in (True, False, None) for b in (False, True)]
