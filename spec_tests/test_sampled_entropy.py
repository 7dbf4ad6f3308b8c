"""SPEC 8.4 ``SampledEntropy``: the identities by exact enumeration, and its own properties.

On the categorical of ``test_sampled_kl`` (π = softmax(θ), one token per outcome, lp_i =
log π_i): Σ_i π_i l_i = ∓H(π) and Σ_i π_i ∇_θ l_i = ∓∇_θ H(π) = ±π⊙(log π + H), and the same
with Σ_i μ_i under a behaviour policy μ. Plain -lp (an L1 on logprobs, which are ≤ 0) has the
same expected value H(π) but expected gradient 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from .test_sampled_kl import BEH, categoricals, close, expected_gradient, per_outcome, traced

Harness = Any
SIGN = {"maximize": 1.0, "minimize": -1.0}


def entropy(pi: np.ndarray) -> float:
    return float(-np.sum(pi * np.log(pi)))


def grad_entropy(pi: np.ndarray) -> np.ndarray:
    """∇_θ H(π) = -π⊙(log π + H)."""
    return -pi * (np.log(pi) + entropy(pi))


@pytest.mark.parametrize("behavior", [False, True], ids=["on-policy", "behavior"])
@pytest.mark.parametrize("mode", ["maximize", "minimize"])
@given(dist=categoricals())
def test_expected_value_and_gradient_are_the_entropys(
    bk: Harness, mode: str, behavior: bool, dist: tuple[np.ndarray, ...]
) -> None:
    pi, _, mu = dist
    reg = rg.SampledEntropy(mode=mode, behavior=BEH if behavior else None)
    data = {"behavior_logprobs": np.log(mu)} if behavior else {}
    w = mu if behavior else pi  # the distribution the tokens were sampled from
    ell, grads = per_outcome(bk, reg, np.log(pi), data)
    s = SIGN[mode]
    close(float(w @ ell), -s * entropy(pi), "Σ w_i l_i = ∓H(π)")
    for dl in grads:
        close(expected_gradient(w, pi, dl), -s * grad_entropy(pi), "Σ w_i ∇l_i = ∓∇H(π)")


@given(dist=categoricals())
def test_plain_minus_logprob_has_zero_expected_gradient(
    bk: Harness, dist: tuple[np.ndarray, ...]
) -> None:
    """L1 on sampled logprobs is Σ -lp: its mean estimates H(π), its gradient does not move it.

    ∂|lp_i|/∂lp_i = -1 for every outcome, and Σ_i π_i (-1)(e_i - π) = -π + π = 0.
    """
    pi, _, _ = dist
    ell, grads = per_outcome(bk, rg.L1(), np.log(pi), {})
    close(float(pi @ ell), entropy(pi), "Σ π_i |lp_i| = H(π)")
    for dl in grads:
        close(dl, -np.ones_like(pi), "∂|lp|/∂lp = -1")
        close(expected_gradient(pi, pi, dl), np.zeros_like(pi), "Σ π_i ∇l_i = 0")


logprobs = st.lists(st.floats(-30.0, 0.0, width=32), min_size=1, max_size=8).map(np.array)


@given(lp=logprobs)
def test_modes_are_opposite_and_entropy_mean_is_positive(bk: Harness, lp: np.ndarray) -> None:
    x = bk.asarray(lp)
    out = {mode: bk.call(traced(rg.SampledEntropy(mode=mode), "vag"), x, None) for mode in SIGN}
    (v_max, m_max, g_max), (v_min, m_min, g_min) = out["maximize"], out["minimize"]
    # on-policy: rho = 1, so p = ±lp and ∂p/∂lp = ±(lp + 1)
    close(bk.float(v_max), lp.sum(), "maximize: Σ lp")
    close(bk.float(v_min), -lp.sum(), "minimize: -Σ lp")
    close(bk.to_numpy(g_max), lp + 1.0, "maximize: lp + 1")
    close(bk.to_numpy(g_min), -(lp + 1.0), "minimize: -(lp + 1)")
    for metrics in (m_max, m_min):
        floats = rg.to_floats(metrics)
        close(floats["entropy_mean"], -lp.mean(), "entropy_mean = mean(-lp)")
        assert floats["entropy_mean"] >= 0.0
    close(rg.to_floats(m_min)["sampled_entropy_raw"], -lp.sum(), "raw of the penalty")


@given(lp=logprobs)
def test_behavior_equal_to_the_policy_is_on_policy(bk: Harness, lp: np.ndarray) -> None:
    on = rg.SampledEntropy()
    off = rg.SampledEntropy(behavior=BEH)
    x, data = bk.asarray(lp), {"behavior_logprobs": bk.asarray(lp.copy())}
    v1, _, g1 = bk.call(traced(on, "vag"), x, None)
    v2, _, g2 = bk.call(traced(off, "vag"), x, data)
    close(bk.float(v2), bk.float(v1), "value")
    close(bk.to_numpy(g2), bk.to_numpy(g1), "gradient")
    if bk.backend.has_autodiff:
        auto = bk.autodiff(lambda a: off.compute(data, a)[0], x)
        close(bk.to_numpy(auto), bk.to_numpy(g1), "autodiff")


def test_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        rg.SampledEntropy(mode="max")
    with pytest.raises(TypeError, match="behavior"):
        rg.SampledEntropy(behavior=1.0)
    assert repr(rg.SampledEntropy(mode="minimize")) == "SampledEntropy(mode='minimize')"


@pytest.mark.parametrize("mode", ["maximize", "minimize"])
def test_on_policy_value_at_a_logprob_of_minus_inf_is_infinite(bk: Harness, mode: str) -> None:
    """On-policy rho = exp(lp - sg(lp)) is 1 at lp = -inf too: p = ∓lp = ∓inf there, by
    ``compute`` and by ``value_and_grad`` alike (``lp - lp`` would make it NaN)."""
    reg = rg.SampledEntropy(mode=mode)
    x = bk.asarray(np.array([-np.inf, -1.0]))
    with np.errstate(all="ignore"):
        value, _ = bk.call(traced(reg, "compute"), x, None)
        value2, _, _ = bk.call(traced(reg, "vag"), x, None)
    want = -np.inf if mode == "maximize" else np.inf
    assert bk.float(value) == want
    assert bk.float(value2) == want
    if bk.library == "torch":  # the training route: autograd's closed-form node
        leaf = x.detach().clone().requires_grad_(True)
        with np.errstate(all="ignore"):
            value3, _ = reg.compute(None, leaf)
        assert value3.grad_fn is not None
        assert bk.float(value3.detach()) == want


@pytest.mark.parametrize("mode", ["maximize", "minimize"])
def test_on_policy_gradient_at_a_non_finite_logprob_is_the_closed_forms(
    bk: Harness, mode: str
) -> None:
    """The gradient ±(lp + 1) holds at lp = ±inf and NaN too (±inf propagates, and so does
    NaN), by ``value_and_grad`` and by the backend's autodiff as users get it: the generic
    path's ratio is a constant there (its derivative would be ±1), so JAX takes the closed
    form as torch's route does."""
    reg = rg.SampledEntropy(mode=mode)
    lp = np.array([-np.inf, np.inf, np.nan, -0.5])
    want = SIGN[mode] * (lp + 1.0)
    x = bk.asarray(lp)
    with np.errstate(all="ignore"):
        _, _, grad = bk.call(traced(reg, "vag"), x, None)
        grads = [bk.to_numpy(grad)]
        if bk.backend.has_autodiff:
            grads.append(
                bk.to_numpy(bk.autodiff(lambda a: reg.compute(None, a)[0], x, generic=False))
            )
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g, dtype=np.float64), want)
