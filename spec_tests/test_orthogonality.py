"""SPEC section 9, ``rg.Orthogonality``: what is exact about it, on every backend.

Zero on orthonormal rows (a QR factor, permutation matrices), nonnegativity, the cosine kind
in [0, 1] and invariant to scaling rows, closed forms on small matrices, rows/columns as
transposes, zero rows and single rows without NaN, and gradients equal to central finite
differences in float64 and to the backend's autodiff, kinks included. (Agreement with the
float64 reference for every reduce, masks and lists is in ``test_properties``; with Keras 3
in ``test_keras_agreement``.)
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

Harness = Any
KINDS = ("cosine", "frobenius")
MODES = ("rows", "columns")


def run(bk: Harness, reg: rg.Orthogonality, w: np.ndarray) -> tuple[float, dict[str, float], Any]:
    """(value, metrics, gradient by value_and_grad) of ``w`` in float64 on ``bk``."""
    x = bk.asarray(np.asarray(w, dtype=np.float64))
    value, metrics, grad = bk.call(lambda a: reg.value_and_grad(None, a), x)
    return (
        bk.float(value),
        {k: bk.float(v) for k, v in metrics.items()},
        np.asarray(bk.to_numpy(grad), dtype=np.float64),
    )


def value_of(bk: Harness, reg: rg.Orthogonality, w: np.ndarray) -> float:
    """The value of ``reg.compute`` (not jitted: finite differences call it many times)."""
    x = bk.asarray(np.asarray(w, dtype=np.float64))
    with bk.flags():
        value, _ = reg.compute(None, x)
    return bk.float(value)


def autodiff(bk: Harness, reg: rg.Orthogonality, w: np.ndarray) -> np.ndarray:
    x = bk.asarray(np.asarray(w, dtype=np.float64))
    g = bk.autodiff(lambda a: reg.compute(None, a)[0], x)
    return np.asarray(bk.to_numpy(g), dtype=np.float64)


def orthonormal_rows(seed: int, m: int, n: int) -> np.ndarray:
    """``[m, n]`` (m <= n) with orthonormal rows: the Q factor of a random ``[n, m]``."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, m)))
    return q.T


def pairwise_mean_abs_cosine(w: np.ndarray) -> float:
    """The definition, spelled out pair by pair (no zero rows here)."""
    pairs = [(i, j) for i in range(len(w)) for j in range(i + 1, len(w))]
    cos = [abs(w[i] @ w[j]) / (np.linalg.norm(w[i]) * np.linalg.norm(w[j])) for i, j in pairs]
    return float(np.mean(cos)) if pairs else 0.0


def matrices(min_side: int = 1) -> st.SearchStrategy[np.ndarray]:
    values = st.floats(-4.0, 4.0, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0**-10)
    return hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=min_side, max_side=5),
        elements=values,
    )


# ---- zero exactly where the rows are orthonormal ----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 5), extra=st.integers(0, 3))
def test_zero_for_orthonormal_rows_from_qr(
    bk: Harness, kind: str, seed: int, m: int, extra: int
) -> None:
    w = orthonormal_rows(seed, m, m + extra)
    stack = np.stack([w, orthonormal_rows(seed + 1, m, m + extra)])
    for mode, x in [
        ("rows", w),
        ("columns", w.T),
        ("rows", stack),
        ("columns", np.swapaxes(stack, 1, 2)),
    ]:
        value, metrics, _ = run(bk, rg.Orthogonality(mode=mode, kind=kind), x)
        assert 0.0 <= value < 1e-12, (mode, value)
        assert metrics["orthogonality_max"] < 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@given(perm=st.permutations(range(4)))
def test_permutation_matrices_give_exactly_zero_and_zero_gradient(
    bk: Harness, kind: str, mode: str, perm: list[int]
) -> None:
    w = np.eye(4)[perm]
    value, metrics, grad = run(bk, rg.Orthogonality(mode=mode, kind=kind), w)
    assert value == 0.0
    assert metrics == {
        "orthogonality_raw": 0.0,
        "orthogonality_mean": 0.0,
        "orthogonality_max": 0.0,
    }
    assert np.all(grad == 0.0)
    if kind == "cosine":  # scaled rows (columns) are still orthogonal, with cosine exactly 0
        d = np.array([2.0, -0.5, 3.0, 1.0])
        scaled = d[:, None] * w if mode == "rows" else w * d[None, :]
        value, _, grad = run(bk, rg.Orthogonality(mode=mode), scaled)
        assert value == 0.0
        assert np.all(grad == 0.0)


# ---- ranges and invariances ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@given(w=matrices(), parallel=st.booleans())
def test_nonnegative_and_cosine_at_most_one(
    bk: Harness, mode: str, w: np.ndarray, parallel: bool
) -> None:
    if parallel:  # every row a multiple of the first one: |cos| = 1 up to rounding
        rows = w if mode == "rows" else np.swapaxes(w, -1, -2)
        rows = rows[..., :1, :] * np.linspace(-2.0, 3.0, rows.shape[-2])[:, None]
        w = rows if mode == "rows" else np.swapaxes(rows, -1, -2)
    for kind in KINDS:
        value, metrics, grad = run(bk, rg.Orthogonality(mode=mode, kind=kind), w)
        assert value >= 0.0
        assert all(v >= 0.0 for v in metrics.values())
        assert np.all(np.isfinite(grad))
        if kind == "cosine":
            assert metrics["orthogonality_max"] <= 1.0  # exactly: the clip holds rounding at 1


@pytest.mark.parametrize("mode", MODES)
@given(
    w=matrices(min_side=2),
    scales=st.lists(
        st.floats(0.125, 8.0, width=32).flatmap(lambda s: st.sampled_from([s, -s])),
        min_size=5,
        max_size=5,
    ),
)
def test_cosine_is_invariant_to_scaling_rows(
    bk: Harness, mode: str, w: np.ndarray, scales: list[float]
) -> None:
    reg = rg.Orthogonality(mode=mode)
    if mode == "rows":
        scaled = w * np.asarray(scales[: w.shape[-2]])[:, None]
    else:
        scaled = w * np.asarray(scales[: w.shape[-1]])[None, :]
    np.testing.assert_allclose(run(bk, reg, scaled)[0], run(bk, reg, w)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@given(w=matrices())
def test_columns_are_the_rows_of_the_transpose(bk: Harness, kind: str, w: np.ndarray) -> None:
    v1, m1, g1 = run(bk, rg.Orthogonality(mode="columns", kind=kind), w)
    v2, m2, g2 = run(bk, rg.Orthogonality(mode="rows", kind=kind), np.swapaxes(w, -1, -2))
    np.testing.assert_allclose(v1, v2, rtol=1e-13, atol=1e-15)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g1, np.swapaxes(g2, -1, -2), rtol=1e-12, atol=1e-14)


# ---- closed forms --------------------------------------------------------------------------
def test_closed_forms_on_a_small_matrix(bk: Harness) -> None:
    w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # pairs of rows: (0, 1) cos 0, (0, 2) and (1, 2) cos 1/√2
    assert math.isclose(run(bk, rg.Orthogonality(), w)[0], math.sqrt(2.0) / 3.0, rel_tol=1e-15)
    assert math.isclose(pairwise_mean_abs_cosine(w), math.sqrt(2.0) / 3.0, rel_tol=1e-15)
    # columns: one pair, cos = 1/√(2·5)
    assert math.isclose(
        run(bk, rg.Orthogonality(mode="columns"), w)[0], 1.0 / math.sqrt(10.0), rel_tol=1e-15
    )
    # W Wᵀ - I = [[0, 0, 1], [0, 3, 2], [1, 2, 1]]; Wᵀ W - I = [[1, 1], [1, 4]]
    assert run(bk, rg.Orthogonality(kind="frobenius"), w)[0] == 20.0
    assert run(bk, rg.Orthogonality(kind="frobenius", mode="columns"), w)[0] == 19.0
    # its gradient, 4 (W Wᵀ - I) W, by hand
    _, _, grad = run(bk, rg.Orthogonality(kind="frobenius"), w)
    np.testing.assert_array_equal(grad, 4.0 * np.array([[1.0, 1.0], [2.0, 8.0], [2.0, 5.0]]))


@given(w=matrices(min_side=2))
def test_cosine_matches_the_pairwise_definition(bk: Harness, w: np.ndarray) -> None:
    stack = w.reshape((-1, *w.shape[-2:]))
    want = [pairwise_mean_abs_cosine(m) for m in stack if np.all(np.any(m != 0, axis=-1))]
    got = [run(bk, rg.Orthogonality(), m)[0] for m in stack if np.all(np.any(m != 0, axis=-1))]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_a_single_vector_has_no_pairs(bk: Harness, mode: str) -> None:
    w = np.array([[3.0, -4.0]]) if mode == "rows" else np.array([[3.0], [-4.0]])
    value, metrics, grad = run(bk, rg.Orthogonality(mode=mode), w)
    assert value == 0.0
    assert metrics["orthogonality_max"] == 0.0
    assert np.all(grad == 0.0)
    # frobenius: (‖w‖² - 1)², gradient 4 (‖w‖² - 1) w
    value, _, grad = run(bk, rg.Orthogonality(mode=mode, kind="frobenius"), w)
    assert value == 24.0**2
    np.testing.assert_array_equal(grad, 4.0 * 24.0 * w)


def test_zero_rows_have_cosine_zero_and_gradient_zero(bk: Harness) -> None:
    w = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    value, _, grad = run(bk, rg.Orthogonality(), w)
    # pairs: (0, 1) 0 (a zero row), (0, 2) 1/√2, (1, 2) 0
    assert math.isclose(value, 1.0 / (3.0 * math.sqrt(2.0)), rel_tol=1e-15)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[1] == 0.0)
    value, _, grad = run(bk, rg.Orthogonality(), np.zeros((3, 4)))
    assert value == 0.0
    assert np.all(grad == 0.0)
    if bk.backend.has_autodiff:
        for x in (w, np.zeros((3, 4))):
            auto = autodiff(bk, rg.Orthogonality(), x)
            assert np.all(np.isfinite(auto))
            np.testing.assert_allclose(auto, run(bk, rg.Orthogonality(), x)[2], atol=1e-15)


# ---- gradients -----------------------------------------------------------------------------
def finite_differences(
    bk: Harness, reg: rg.Orthogonality, w: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    out = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        up, down = w.copy(), w.copy()
        up[idx] += h
        down[idx] -= h
        out[idx] = (value_of(bk, reg, up) - value_of(bk, reg, down)) / (2.0 * h)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_matches_finite_differences_and_autodiff(
    bk: Harness, kind: str, mode: str, seed: int
) -> None:
    # a generic stack, away from the kinks (no cosine is 0 or ±1, no zero row)
    w = np.random.default_rng(seed).standard_normal((2, 3, 4))
    reg = rg.Orthogonality(mode=mode, kind=kind, reduce="mean")
    _, _, grad = run(bk, reg, w)
    np.testing.assert_allclose(grad, finite_differences(bk, reg, w), rtol=1e-6, atol=1e-8)
    if bk.backend.has_autodiff:
        np.testing.assert_allclose(autodiff(bk, reg, w), grad, rtol=1e-12, atol=1e-14)


@pytest.mark.backends("torch", "jax")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_autodiff_equals_the_closed_form_at_the_kinks(bk: Harness, kind: str, mode: str) -> None:
    kinks = [
        np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]),  # cos 0; a zero row
        np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [-1.0, -2.0, 0.0]]),  # |cos| = 1
        np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]),  # cos 0 and zero rows
    ]
    reg = rg.Orthogonality(mode=mode, kind=kind)
    for w in kinks:
        x = w if mode == "rows" else w.T
        _, _, grad = run(bk, reg, x)
        auto = autodiff(bk, reg, x)
        assert np.all(np.isfinite(auto))
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(auto, grad, rtol=1e-12, atol=1e-14)


# ---- options and inputs --------------------------------------------------------------------
def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        rg.Orthogonality(mode="diagonal")
    with pytest.raises(ValueError, match="kind"):
        rg.Orthogonality(kind="spectral")
    with pytest.raises(TypeError, match="kind"):
        rg.Orthogonality(kind=2)
    assert rg.Orthogonality().event_ndim == 2
    assert repr(rg.Orthogonality(mode="columns")) == "Orthogonality(mode='columns')"


def test_a_vector_is_not_a_matrix(bk: Harness) -> None:
    with pytest.raises(ValueError, match="matrix"):
        rg.Orthogonality()(bk.asarray(np.ones(3)))


def test_mask_selects_matrices(bk: Harness) -> None:
    good, bad = np.eye(3), np.full((3, 3), np.nan)
    x = np.stack([good, bad, 2.0 * good])
    mask = np.array([True, False, True])
    reg = rg.Orthogonality(kind="frobenius", reduce="mean")
    value, metrics = bk.call(
        lambda a, m: reg.compute(None, a, mask=m), bk.asarray(x), bk.asarray(mask)
    )
    # ‖I - I‖² = 0 and ‖4I - I‖² = 27, over 2 counted matrices
    assert bk.float(value) == 13.5
    assert bk.float(metrics["orthogonality_max"]) == 27.0
