"""SPEC 8.3 ``SampledKL``: the gradient identities, by exact enumeration, and its own properties.

The identities are checked on a small categorical: π = softmax(θ) over K outcomes, q a
reference and μ a behaviour distribution. The sampled-token input is one token per outcome,
lp_i = log π_i (r_i = log q_i, b_i = log μ_i); l_i is outcome i's penalty and, by the chain
rule d lp_i/dθ = e_i - π, ∇_θ l_i = (∂l_i/∂lp_i)(e_i - π). The expectations Σ_i π_i l_i and
Σ_i π_i ∇l_i are then exact sums (no Monte Carlo), compared in float64 with closed forms of
KL(π‖q), ∇KL(π‖q) = π⊙(log π - log q - KL) and ∇KL(q‖π) = π - q. ∂l_i/∂lp_i comes from
``value_and_grad`` on every backend and from the backend's own autodiff (torch autograd,
``jax.grad``) through ``compute`` where there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S

Harness = Any
REF, BEH = rg.Field("ref_logprobs"), rg.Field("behavior_logprobs")


# ---- the categorical, and what the library says about each of its outcomes ------------------
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


@st.composite
def categoricals(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(π, q, μ): three distributions over K in 2..6 outcomes, from drawn logits."""
    k = draw(st.integers(2, 6))
    logits = st.lists(st.floats(-4.0, 4.0), min_size=k, max_size=k).map(np.array)
    return softmax(draw(logits)), softmax(draw(logits)), softmax(draw(logits))


def per_outcome(
    bk: Harness, reg: Any, lp: np.ndarray, data: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(l, [dl_i/dlp_i by value_and_grad, and by autodiff where the backend has it]).

    l_i is the value with ``reduce="sum"`` and only token i counted (mask e_i); the
    derivatives come from one call over all K tokens (each l_i depends on lp_i only).
    """
    k = lp.shape[0]
    x = bk.asarray(lp)
    d = {key: bk.asarray(v) for key, v in data.items()}
    masks = [bk.asarray(row) for row in np.eye(k, dtype=bool)]
    ells, value, g = bk.call(traced(reg, "outcomes"), x, d, masks)
    ell = np.array([bk.float(v) for v in ells])
    np.testing.assert_allclose(bk.float(value), ell.sum(), rtol=1e-12, atol=1e-12)
    grads = [np.asarray(bk.to_numpy(g), dtype=np.float64)]
    if bk.backend.has_autodiff:
        auto = bk.autodiff(lambda x_: reg.compute(d, x_)[0], x)
        grads.append(np.asarray(bk.to_numpy(auto), dtype=np.float64))
    return ell, grads


_TRACED: dict[tuple[Any, str], Callable[..., Any]] = {}


def traced(reg: Any, what: str) -> Callable[..., Any]:
    """``reg``'s call as one function object per regularizer (so ``jax.jit`` traces it once
    per shape, not once per example): ``"vag"`` (x, data) -> value_and_grad, ``"compute"``
    (x, data) -> (value, metrics), ``"masked"`` (x, data, mask) -> value, and ``"outcomes"``
    (x, data, masks) -> ([value with each mask], value_and_grad's value, its gradient)."""
    key = (reg, what)
    if key not in _TRACED:

        def vag(x: Any, d: Any) -> Any:
            return reg.value_and_grad(d, x)

        def compute(x: Any, d: Any) -> Any:
            return reg.compute(d, x)

        def masked(x: Any, d: Any, m: Any) -> Any:
            return reg.compute(d, x, mask=m)[0]

        def outcomes(x: Any, d: Any, masks: list[Any]) -> Any:
            value, _, g = reg.value_and_grad(d, x)
            return [masked(x, d, m) for m in masks], value, g

        _TRACED[key] = {"vag": vag, "compute": compute, "masked": masked, "outcomes": outcomes}[
            what
        ]
    return _TRACED[key]


def expected_gradient(w: np.ndarray, pi: np.ndarray, dl: np.ndarray) -> np.ndarray:
    """Σ_i w_i ∇_θ l_i = Σ_i w_i (∂l_i/∂lp_i)(e_i - π)."""
    wg = w * dl
    return wg - pi * wg.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def grad_reverse_kl(pi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """∇_θ KL(π‖q)."""
    return pi * (np.log(pi) - np.log(q) - kl(pi, q))


def grad_forward_kl(pi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """∇_θ KL(q‖π)."""
    return pi - q


def close(actual: Any, desired: Any, what: str) -> None:
    np.testing.assert_allclose(actual, desired, rtol=1e-8, atol=1e-10, err_msg=what)


def kl_data(pi: np.ndarray, q: np.ndarray, mu: np.ndarray | None = None) -> dict[str, Any]:
    data = {"ref_logprobs": np.log(q)}
    if mu is not None:
        data["behavior_logprobs"] = np.log(mu)
    return data


# ---- the identities of SPEC 8.3 --------------------------------------------------------------
ON_POLICY: dict[tuple[str, str], Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    ("k1", "estimator"): lambda pi, q: np.zeros_like(pi),  # zero in expectation
    ("k2", "estimator"): grad_reverse_kl,
    ("k3", "estimator"): grad_forward_kl,  # the forward KL!
    ("k1", "unbiased"): grad_reverse_kl,
    ("k3", "unbiased"): grad_reverse_kl,
}


@pytest.mark.parametrize(
    ("estimator", "gradient"), list(ON_POLICY), ids=[f"{e}-{g}" for e, g in ON_POLICY]
)
@given(dist=categoricals())
def test_on_policy_expected_gradient(
    bk: Harness, estimator: str, gradient: str, dist: tuple[np.ndarray, ...]
) -> None:
    pi, q, _ = dist
    reg = rg.SampledKL(REF, estimator=estimator, gradient=gradient)
    ell, grads = per_outcome(bk, reg, np.log(pi), kl_data(pi, q))
    want = ON_POLICY[estimator, gradient](pi, q)
    for dl in grads:
        close(expected_gradient(pi, pi, dl), want, f"Σ π_i ∇l_i for {estimator}, {gradient}")
    if estimator in ("k1", "k3"):
        close(float(pi @ ell), kl(pi, q), "Σ π_i l_i = KL(π‖q)")


@pytest.mark.parametrize("gradient", ["estimator", "unbiased"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@given(dist=categoricals())
def test_off_policy_with_behavior(
    bk: Harness, estimator: str, gradient: str, dist: tuple[np.ndarray, ...]
) -> None:
    pi, q, mu = dist
    reg = rg.SampledKL(REF, estimator=estimator, gradient=gradient, behavior=BEH)
    ell, grads = per_outcome(bk, reg, np.log(pi), kl_data(pi, q, mu))
    close(float(mu @ ell), kl(pi, q), "Σ μ_i l_i = KL(π‖q)")
    for dl in grads:
        close(expected_gradient(mu, pi, dl), grad_reverse_kl(pi, q), "Σ μ_i ∇l_i = ∇KL(π‖q)")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@given(dist=categoricals())
def test_unbiased_changes_nothing_with_behavior(
    bk: Harness, estimator: str, dist: tuple[np.ndarray, ...]
) -> None:
    pi, q, mu = dist
    data = kl_data(pi, q, mu)
    plain = per_outcome(bk, rg.SampledKL(REF, estimator=estimator, behavior=BEH), np.log(pi), data)
    unbiased = rg.SampledKL(REF, estimator=estimator, behavior=BEH, gradient="unbiased")
    ell, grads = per_outcome(bk, unbiased, np.log(pi), data)
    np.testing.assert_array_equal(ell, plain[0])
    for g, h in zip(grads, plain[1], strict=True):
        np.testing.assert_array_equal(g, h)


@pytest.mark.parametrize("estimator", ["k2", "abs"])
def test_unbiased_gradient_is_for_k1_and_k3_only(estimator: str) -> None:
    with pytest.raises(ValueError, match=r"'k1' or 'k3' only.*unbiased for KL"):
        rg.SampledKL(REF, estimator=estimator, gradient="unbiased")


# ---- the class's own properties ----------------------------------------------------------
def test_reference_is_required_and_may_come_first() -> None:
    with pytest.raises(TypeError, match=r"SampledKL needs reference="):
        rg.SampledKL()
    with pytest.raises(TypeError, match=r"SampledKL needs reference="):
        rg.SampledKL(estimator="k1")
    assert rg.SampledKL(REF) == rg.SampledKL(reference=REF)
    assert rg.SampledKL(("field", "ref_logprobs")) == rg.SampledKL(REF)
    with pytest.raises(TypeError, match="twice"):
        rg.SampledKL(REF, reference=REF)
    with pytest.raises(TypeError, match="reference"):
        rg.SampledKL(3.0)
    with pytest.raises(ValueError, match="estimator"):
        rg.SampledKL(REF, estimator="low_var_kl")


ESTIMATORS = ["k1", "abs", "k2", "k3"]
logprobs = st.lists(S.reals(-30.0, 0.0), min_size=1, max_size=8)


@pytest.mark.parametrize("behavior", [False, True], ids=["on-policy", "behavior"])
@pytest.mark.parametrize("estimator", ["abs", "k2", "k3"])
@given(data=st.data())
def test_k2_k3_and_abs_are_nonnegative(
    bk: Harness, estimator: str, behavior: bool, data: st.DataObject
) -> None:
    lp = np.array(data.draw(logprobs, label="lp"))
    n = lp.shape[0]
    draw = st.lists(S.reals(-30.0, 0.0), min_size=n, max_size=n).map(np.array)
    fields = {"ref_logprobs": data.draw(draw, label="ref")}
    if behavior:
        fields["behavior_logprobs"] = lp - data.draw(
            st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n).map(np.array), label="b"
        )
    reg = rg.SampledKL(REF, estimator=estimator, behavior=BEH if behavior else None)
    x, d = bk.asarray(lp), {k: bk.asarray(v) for k, v in fields.items()}
    for row in np.eye(n, dtype=bool):  # every token alone, then all together
        assert bk.float(bk.call(traced(reg, "masked"), x, d, bk.asarray(row))) >= 0.0
    value, metrics = bk.call(traced(reg, "compute"), x, d)
    assert bk.float(value) >= 0.0
    for key in ("sampled_kl_raw", "sampled_kl_mean", "sampled_kl_max"):
        assert bk.float(metrics[key]) >= 0.0, key


@pytest.mark.parametrize("behavior", [False, True], ids=["on-policy", "behavior"])
@pytest.mark.parametrize(
    ("estimator", "gradient"),
    [(e, "estimator") for e in ESTIMATORS] + [("k1", "unbiased"), ("k3", "unbiased")],
)
@given(lp=logprobs.map(np.array))
def test_zero_when_logprobs_equal_the_reference(
    bk: Harness, estimator: str, gradient: str, behavior: bool, lp: np.ndarray
) -> None:
    reg = rg.SampledKL(
        REF, estimator=estimator, gradient=gradient, behavior=BEH if behavior else None
    )
    fields = {"ref_logprobs": lp.copy()}
    if behavior:
        fields["behavior_logprobs"] = lp - 0.5  # rho = e^{0.5}
    value, metrics, grad = bk.call(
        traced(reg, "vag"),
        bk.asarray(lp),
        {k: bk.asarray(v) for k, v in fields.items()},
    )
    assert bk.float(value) == 0.0
    assert all(v == 0.0 for v in rg.to_floats(metrics).values()), metrics
    # ∂p/∂lp = rho·k'(0) + (∂rho/∂lp)·k(0) = rho·k'(0): k'(0) is 1 for k1 and 0 for the others
    rho = np.exp(0.5) if behavior else 1.0
    want = np.full_like(lp, rho if estimator == "k1" else 0.0)
    np.testing.assert_allclose(bk.to_numpy(grad), want, rtol=1e-12)


@pytest.mark.parametrize("gradient", ["estimator", "unbiased"])
def test_log_ratio_clip_passes_the_gradient_at_the_bounds_only(bk: Harness, gradient: str) -> None:
    lp = np.array([-1.0, -2.0, -3.0, -4.0, -0.5])
    ref = np.zeros(5)  # d = lp
    reg = rg.SampledKL(REF, estimator="k1", gradient=gradient, log_ratio_clip=(-3.0, -1.0))
    d = {"ref_logprobs": bk.asarray(ref)}
    value, metrics, grad = bk.call(traced(reg, "vag"), bk.asarray(lp), d)
    clipped = np.array([-1.0, -2.0, -3.0, -3.0, -1.0])
    assert bk.float(value) == clipped.sum()
    assert bk.float(metrics["log_ratio_mean"]) == clipped.mean()
    # k1: k' = 1 on [lo, hi] (bounds included), 0 strictly outside; "unbiased" adds k
    inside = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    want = inside + (clipped if gradient == "unbiased" else 0.0)
    np.testing.assert_array_equal(bk.to_numpy(grad), want)
    if bk.backend.has_autodiff:
        auto = bk.autodiff(lambda x: reg.compute(d, x)[0], bk.asarray(lp))
        np.testing.assert_array_equal(bk.to_numpy(auto), want)


def test_abs_has_slope_zero_at_zero(bk: Harness) -> None:
    reg = rg.SampledKL(REF, estimator="abs")
    lp, ref = np.array([-1.0, -2.0, -3.0]), np.array([-1.0, -1.0, -4.0])
    d = {"ref_logprobs": bk.asarray(ref)}
    _, _, grad = bk.call(traced(reg, "vag"), bk.asarray(lp), d)
    np.testing.assert_array_equal(bk.to_numpy(grad), [0.0, -1.0, 1.0])
    if bk.backend.has_autodiff:
        auto = bk.autodiff(lambda x: reg.compute(d, x)[0], bk.asarray(lp))
        np.testing.assert_array_equal(bk.to_numpy(auto), [0.0, -1.0, 1.0])


def test_k3_is_exact_near_zero(bk: Harness) -> None:
    """expm1(-d) + d: e^{-d} - 1 + d computed naively loses every digit of d²/2 here."""
    d = np.array([1e-8, -1e-8, 3e-6, -2e-5])
    reg = rg.SampledKL(REF, reduce="sum")
    for di in d:
        value, _ = bk.call(
            traced(reg, "compute"),
            bk.asarray(np.array([-1.0 + di])),
            {"ref_logprobs": bk.asarray(np.array([-1.0]))},
        )
        dd = (-1.0 + di) - (-1.0)  # the d the library sees, after float64 rounding
        np.testing.assert_allclose(bk.float(value), dd * dd / 2 - dd**3 / 6, rtol=1e-6)


@pytest.mark.backends("numpy", "torch", "jax", "dask")
def test_k3_of_float16_does_not_overflow(bk: Harness) -> None:
    # d = -15: k3 = e^15 - 16 ≈ 3.3e6, beyond float16's 65504 but finite in float32
    lp = np.array([-15.0, -12.0, -0.25], dtype=np.float16)
    ref = np.zeros(3, dtype=np.float16)
    reg = rg.SampledKL(REF, estimator="k3", gradient="unbiased")
    x, d = bk.asarray(lp), {"ref_logprobs": bk.asarray(ref)}
    value, metrics, grad = bk.call(traced(reg, "vag"), x, d)
    assert value.dtype == bk.dtype("float32")
    want = float(np.sum(np.expm1(-lp.astype(np.float64)) + lp))
    np.testing.assert_allclose(bk.float(value), want, rtol=1e-6)
    np.testing.assert_allclose(bk.float(metrics["sampled_kl_max"]), np.expm1(15.0) - 15, rtol=1e-6)
    assert bk.to_numpy(grad).dtype == np.float16  # d ∂p/∂lp = d: representable in float16
    np.testing.assert_allclose(bk.to_numpy(grad), lp)


def test_unmasked_overflow_is_honest_and_masked_is_inert(bk: Harness) -> None:
    lp = np.array([-1000.0, -1.0])
    d = {"ref_logprobs": bk.asarray(np.zeros(2))}
    reg = rg.SampledKL(REF)
    with np.errstate(over="ignore"):
        value, _ = bk.call(lambda x, dd: reg.compute(dd, x), bk.asarray(lp), d)
        assert bk.float(value) == np.inf  # e^{1000}: the honest value of that token
    value, _, grad = bk.call(
        lambda x, dd, m: reg.value_and_grad(dd, x, mask=m),
        bk.asarray(lp),
        d,
        bk.asarray(np.array([False, True])),
    )
    np.testing.assert_allclose(bk.float(value), np.expm1(1.0) - 1.0, rtol=1e-12)
    assert bk.to_numpy(grad).tolist()[0] == 0.0


@given(lp=logprobs.map(np.array), data=st.data())
def test_unbiased_k3_has_k2s_gradient_per_token(
    bk: Harness, lp: np.ndarray, data: st.DataObject
) -> None:
    """k3' + k3 = (1 - e^{-d}) + (e^{-d} - 1 + d) = d: verl's "k3+" (k3's value, k2's gradient)."""
    n = lp.shape[0]
    ref = data.draw(st.lists(S.reals(-30.0, 0.0), min_size=n, max_size=n), label="r")
    x, d = bk.asarray(lp), {"ref_logprobs": bk.asarray(np.array(ref))}
    k3 = rg.SampledKL(REF, estimator="k3", gradient="unbiased")
    k2 = rg.SampledKL(REF, estimator="k2")
    _, _, g3 = bk.call(traced(k3, "vag"), x, d)
    _, _, g2 = bk.call(traced(k2, "vag"), x, d)
    scale = np.exp(np.abs(lp - np.array(ref)))  # k3 and k3' are this large before cancelling
    diff = np.abs(np.asarray(bk.to_numpy(g3)) - np.asarray(bk.to_numpy(g2)))
    assert np.all(diff <= 4e-16 * scale + 1e-300), (diff, scale)


@pytest.mark.parametrize(("estimator", "bad"), [("k1", -np.inf), ("k1", np.inf), ("k3", np.inf)])
def test_unbiased_value_at_a_non_finite_logprob_is_the_estimators(
    bk: Harness, estimator: str, bad: float
) -> None:
    """rho = exp(lp - sg(lp)) is 1 at lp = ±inf too, so the value there is k's (±inf
    propagates), by ``compute`` and by ``value_and_grad`` alike (``lp - lp`` would be NaN)."""
    lp, ref = np.array([bad, -1.0]), np.array([-2.0, -2.0])
    reg = rg.SampledKL(REF, estimator=estimator, gradient="unbiased")
    x, d = bk.asarray(lp), {"ref_logprobs": bk.asarray(ref)}
    with np.errstate(all="ignore"):
        value, _ = bk.call(traced(reg, "compute"), x, d)
        value2, _, _ = bk.call(traced(reg, "vag"), x, d)
    assert bk.float(value) == bad  # k1: d = ±inf; k3 at d = +inf: e^-inf - 1 + inf
    assert bk.float(value2) == bad
