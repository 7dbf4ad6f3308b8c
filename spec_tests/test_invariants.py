"""SPEC section 6: every invariant as a named Hypothesis property, on every backend.

Each test takes ``bk`` (see conftest): its id names the backend configuration, so
``test_inv04_homogeneity[torch]`` is invariant 4 on PyTorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from array_api_extra.testing import assert_close as assert_close_xp
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .reference import flat, reference

Harness = Any


# ---- helpers ---------------------------------------------------------------------------
def run(
    bk: Harness, reg: rg.Regularizer, x: Any, mask: Any = None
) -> tuple[float, dict[str, float]]:
    """Value and metrics of ``reg`` on the backend array(s) ``x``, as Python floats."""
    if mask is None:
        value, metrics = bk.call(lambda lp: reg.compute(None, lp), x)
    else:
        value, metrics = bk.call(lambda lp, m: reg.compute(None, lp, mask=m), x, mask)
    check_outputs(bk, value, metrics)
    return bk.float(value), {k: bk.float(v) for k, v in metrics.items()}


def check_outputs(bk: Harness, value: Any, metrics: dict[str, Any]) -> None:
    """The contract's shape of a result: 0-d arrays of the caller's namespace."""
    for what, a in [("value", value), *metrics.items()]:
        assert tuple(a.shape) == (), f"{what} is not 0-d: shape {a.shape}"
        if not bk.jit:
            assert (
                type(a).__module__.split(".")[0]
                == type(bk.asarray(np.zeros(1))).__module__.split(".")[0]
            ), f"{what} is a {type(a)}, not an array of {bk.library}"


def grads(bk: Harness, reg: rg.Regularizer, x: Any, mask: Any = None) -> list[tuple[str, Any]]:
    """The gradient by value_and_grad and, where the backend has one, by autodiff."""
    if mask is None:
        out = [("value_and_grad", bk.call(lambda lp: reg.value_and_grad(None, lp)[2], x))]
    else:
        out = [
            (
                "value_and_grad",
                bk.call(lambda lp, m: reg.value_and_grad(None, lp, mask=m)[2], x, mask),
            )
        ]
    if bk.backend.has_autodiff:
        out.append(("autodiff", bk.autodiff(lambda lp: reg.compute(None, lp, mask=mask)[0], x)))
    return out


def tol(dtype: str, *arrays: Any, center: Any = None) -> tuple[float, float]:
    """(rtol, atol) for comparing a reduction over ``arrays`` in ``dtype``."""
    x = flat(list(arrays))
    finite = x[np.isfinite(x)]
    big = (
        (float(np.abs(finite).max()) if finite.size else 0.0)
        + abs(center if isinstance(center, float) else 0.0)
        + 1.0
    )
    rtol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 2e-5, "float64": 1e-10}[dtype]
    return rtol, rtol * max(x.size, 1) * big * big


def assert_close(actual: float, desired: float, rtol: float, atol: float, what: str) -> None:
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=what)


def dtype_of(x: Any) -> str:
    return str((x[0] if isinstance(x, list) else x).dtype)


# ---- 1. non-negativity ------------------------------------------------------------------
@given(reg=S.regularizers(), x=S.arrays())
def test_inv01_nonnegative(bk: Harness, reg: rg.Regularizer, x: np.ndarray) -> None:
    value, metrics = run(bk, reg, bk.asarray(x))
    assert value >= 0, value
    assert all(v >= 0 for v in metrics.values()), metrics


# ---- 2. agreement with the float64 reference ---------------------------------------------
@given(reg=S.regularizers(probs=True), x=S.arrays(hi=5.0), data=st.data())
def test_inv02_matches_float64_reference(
    bk: Harness, reg: rg.Regularizer, x: np.ndarray, data: st.DataObject
) -> None:
    mask = data.draw(st.none() | S.masks_for(x), label="mask")
    bmask = None if mask is None else bk.asarray(mask)
    value, metrics = bk.call(lambda lp, m: reg.compute(None, lp, mask=m), bk.asarray(x), bmask)
    ref_value, ref_metrics, _ = reference(reg, x, mask)
    t = np.exp(flat(x)) if reg.target == "probs" else x
    rtol, atol = tol(str(x.dtype), t, center=getattr(reg, "center", None))
    # xpx.testing.assert_close also checks namespace, dtype (the input's), 0-d shape and device.
    want = lambda v: bk.asarray(np.asarray(v, dtype=x.dtype))  # noqa: E731
    assert_close_xp(value, want(ref_value), rtol=rtol, atol=atol, err_msg="value")
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert_close_xp(metrics[k], want(ref_metrics[k]), rtol=rtol, atol=atol, err_msg=k)


# ---- 3. zero on zero input; L2 with center=c is zero on constant c ---------------------------
@given(
    reg=S.regularizers(clip=False, center=False, probs=False),
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    dtype=st.sampled_from(S.FLOATS),
)
def test_inv03_zero_on_zero_input(
    bk: Harness, reg: rg.Regularizer, shape: list[int], dtype: str
) -> None:
    value, metrics = run(bk, reg, bk.asarray(np.zeros(shape, dtype=dtype)))
    assert value == 0.0
    assert all(v == 0.0 for v in metrics.values()), metrics


# ---- 4. homogeneity -------------------------------------------------------------------------
@given(
    reg=S.regularizers(clip=False, center=False),
    x=S.arrays(lo=-100, hi=100),
    a=st.sampled_from([-4.0, -2.0, -1.0, -0.5, 0.0, 0.25, 3.0]),
)
def test_inv04_homogeneity(bk: Harness, reg: rg.Regularizer, x: np.ndarray, a: float) -> None:
    scaled = (x * a).astype(x.dtype)  # powers of two and small integers: exact or nearly
    value, _ = run(bk, reg, bk.asarray(x))
    value_a, _ = run(bk, reg, bk.asarray(scaled))
    factor = abs(a) if isinstance(reg, rg.L1) else a * a
    rtol, atol = tol(str(x.dtype), x * max(abs(a), 1.0))
    assert_close(value_a, factor * value, rtol, atol, f"R({a}·x) vs {factor}·R(x)")


# ---- 5. sign symmetry ---------------------------------------------------------------------
@given(reg=S.regularizers(clip=False, center=False), x=S.arrays(), mean_center=st.booleans())
def test_inv05_sign_symmetry(
    bk: Harness, reg: rg.Regularizer, x: np.ndarray, mean_center: bool
) -> None:
    if mean_center and isinstance(reg, rg.L2):
        reg = rg.L2(reduce=reg.reduce, center="mean")
    value, metrics = run(bk, reg, bk.asarray(x))
    value_neg, metrics_neg = run(bk, reg, bk.asarray(-x))
    rtol, atol = tol(str(x.dtype), x)
    assert_close(value_neg, value, rtol, atol, "R(-x) vs R(x)")
    for k in metrics:
        assert_close(metrics_neg[k], metrics[k], rtol, atol, k)


# ---- 7. additivity across a split ----------------------------------------------------------
@given(reg=S.regularizers(center=False), a=S.arrays(max_dims=1), data=st.data())
def test_inv07_additive_across_split(
    bk: Harness, reg: rg.Regularizer, a: np.ndarray, data: st.DataObject
) -> None:
    b = data.draw(S.arrays(str(a.dtype), max_dims=1), label="b")
    reg = type(reg)(**{**reg.options(), "reduce": "sum"})
    whole, m_whole = run(bk, reg, bk.asarray([a, b]))
    va, ma = run(bk, reg, bk.asarray(a))
    vb, mb = run(bk, reg, bk.asarray(b))
    rtol, atol = tol(str(a.dtype), a, b)
    assert_close(whole, va + vb, rtol, atol, "R([a, b]) vs R(a) + R(b)")
    if "l2_max" in m_whole:
        assert_close(m_whole["l2_max"], max(ma["l2_max"], mb["l2_max"]), rtol, atol, "l2_max")


# ---- 8. mean is sum / n ---------------------------------------------------------------------
@given(reg=S.regularizers(), x=S.arrays(), data=st.data())
def test_inv08_mean_is_sum_over_n(
    bk: Harness, reg: rg.Regularizer, x: np.ndarray, data: st.DataObject
) -> None:
    mask = data.draw(st.none() | S.masks_for(x), label="mask")
    n = x.size if mask is None else int(np.count_nonzero(mask))
    bmask = None if mask is None else bk.asarray(mask)
    v_sum, m_sum = run(bk, type(reg)(**{**reg.options(), "reduce": "sum"}), bk.asarray(x), bmask)
    v_mean, m_mean = run(bk, type(reg)(**{**reg.options(), "reduce": "mean"}), bk.asarray(x), bmask)
    rtol, atol = tol(str(x.dtype), x, center=getattr(reg, "center", None))
    assert_close(v_mean, v_sum / max(n, 1), rtol, atol / max(n, 1), "mean vs sum / n")
    prefix = "l1" if isinstance(reg, rg.L1) else "l2"
    for m in (m_sum, m_mean):
        assert_close(
            m[f"{prefix}_mean"],
            m[f"{prefix}_raw"] / max(n, 1),
            rtol,
            atol / max(n, 1),
            "*_mean vs *_raw / n",
        )
        if prefix == "l2":
            assert m["l2_max"] <= m["l2_raw"] * (1 + rtol) + atol
    assert m_sum == m_mean, "metrics do not depend on reduce"


# ---- 9. gradients ---------------------------------------------------------------------------
def check_grads(
    bk: Harness, reg: rg.Regularizer, x: Any, mask: Any = None, *, reads: Any = None
) -> None:
    """The gradients of ``grads`` against the reference's at ``x`` (or at ``reads``: ``x``
    as the backend's arithmetic reads it)."""
    _, _, want = reference(reg, x if reads is None else reads, mask)
    bx = bk.asarray(x)
    bmask = None if mask is None else bk.asarray(mask)
    t = np.exp(flat(x)) if reg.target == "probs" else flat(x)
    rtol, atol = tol(dtype_of(x), t, center=getattr(reg, "center", None))
    atol = 4 * atol / max(t.size, 1)  # a gradient element is one term, not a sum of n
    for how, g in grads(bk, reg, bx, bmask):
        # The gradient has the structure, dtypes, namespace and device of the input.
        if isinstance(x, list):
            assert isinstance(g, list), how
            assert len(g) == len(x), how
            start = 0
            for gi, xi in zip(g, x, strict=True):
                piece = want[start : start + xi.size].reshape(xi.shape).astype(xi.dtype)
                start += xi.size
                assert_close_xp(gi, bk.asarray(piece), rtol=rtol, atol=atol, err_msg=how)
        else:
            desired = bk.asarray(want.reshape(x.shape).astype(x.dtype))
            assert_close_xp(g, desired, rtol=rtol, atol=atol, err_msg=how)


@given(reg=S.regularizers(probs=True), x=S.arrays(hi=5.0) | S.ragged(hi=5.0), data=st.data())
def test_inv09_gradients_at_random_points(
    bk: Harness, reg: rg.Regularizer, x: Any, data: st.DataObject
) -> None:
    mask = data.draw(st.none() | S.masks_for(x), label="mask")
    check_grads(bk, reg, x, mask)


@given(reg=S.regularizers(), dtype=st.sampled_from(S.FLOATS), data=st.data())
def test_inv09_gradients_at_kinks(
    bk: Harness, reg: rg.Regularizer, dtype: str, data: st.DataObject
) -> None:
    points = [0.0, -0.0, 1.0, -1.0, -100.0, -101.0, -50.0]
    clip = getattr(reg, "clip", None)
    if clip is not None:
        for b in clip:
            if b is not None:
                points += [b, b - 1.0, b + 1.0, b - 2.0**-10, b + 2.0**-10]
    x = np.asarray(data.draw(st.permutations(points), label="x"), dtype=dtype)
    check_grads(bk, reg, x)


def reads_subnormals_as_zero(bk: Harness) -> bool:
    """Whether the backend's arithmetic reads subnormal floats as 0 (XLA on the CPU does:
    denormals-are-zero), asked of the backend itself."""
    tiny = bk.asarray(np.array([1e-45], dtype=np.float32))
    return bool(bk.to_numpy(bk.xp.sign(tiny))[0] == 0)


@pytest.mark.parametrize("dtype", S.FLOATS)
@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(),
        rg.ElasticNet(l1_ratio=0.5),
        rg.L2(clip=(0.0, 3.0), center=1.0),
        rg.L2(clip=(-100.0, 0.0)),
        rg.Huber(delta=1.0, clip=(0.0, 3.0), center=1.0),
    ],
    ids=repr,
)
def test_inv09_subnormals_as_the_backend_reads_them(
    bk: Harness, reg: rg.Regularizer, dtype: str
) -> None:
    """Subnormal values beside the kinks at 0 (``sign``, a clip bound of 0). Where the
    backend's arithmetic keeps them, their gradient is the reference's (``sign`` ±1, outside
    a bound of 0); where it reads them as 0 (XLA's CPU backend), the reference's at 0. The
    properties draw no subnormals (``strategies.reals``): this test is where they are."""
    tiny = {
        "float32": [1e-45, -1e-45, 1e-40, -3e-39],
        "float64": [5e-324, -5e-324, 1e-310, -2e-308],
    }
    x = np.asarray([*tiny[dtype], 0.0, 1.0, -2.0, 2.0], dtype=dtype)
    assert np.all((x[:4] != 0) & (np.abs(x[:4]) < np.finfo(x.dtype).smallest_normal))
    flushed = np.where(np.abs(x) < np.finfo(x.dtype).smallest_normal, 0.0, x).astype(dtype)
    check_grads(bk, reg, x, reads=flushed if reads_subnormals_as_zero(bk) else x)
    if isinstance(reg, rg.L1) and not reads_subnormals_as_zero(bk):  # (the test tells them apart)
        assert list(reference(reg, x)[2][:4]) == [1.0, -1.0, 1.0, -1.0]


def test_inv09_acceptance_kinks(bk: Harness) -> None:
    """The issue's examples: ∇L1 at zeros is 0; ∇L2(clip=(-100, 0)) at the kinks."""
    zeros = bk.asarray(np.zeros(5))
    x = bk.asarray(np.array([-101.0, -100.0, -50.0, 0.0, 1.0]))
    for how, g in grads(bk, rg.L1(), zeros):
        np.testing.assert_array_equal(bk.to_numpy(g), np.zeros(5), err_msg=how)
    for how, g in grads(bk, rg.L2(clip=(-100.0, 0.0)), x):
        np.testing.assert_array_equal(bk.to_numpy(g), [0.0, -200.0, -100.0, 0.0, 0.0], err_msg=how)


# ---- 10. clipping tames infinities -------------------------------------------------------------
@given(
    lo_hi=st.tuples(S.reals(-150, 20), S.reals(-150, 20)).map(sorted),
    center=st.sampled_from([None, "mean", -3.0]),
    x=S.arrays().flatmap(
        lambda a: st.lists(st.sampled_from([np.inf, -np.inf]), max_size=3).map(
            lambda infs: np.concatenate([a.reshape(-1), np.asarray(infs, dtype=a.dtype)])
        )
    ),
)
def test_inv10_clip_tames_infinities(
    bk: Harness, lo_hi: list[float], center: Any, x: np.ndarray
) -> None:
    lo, hi = lo_hi
    reg = rg.L2(clip=(lo, hi), center=center)
    value, metrics = run(bk, reg, bk.asarray(x))
    assert np.isfinite(value)
    assert all(np.isfinite(v) for v in metrics.values())
    clipped, _ = run(bk, rg.L2(center=center), bk.asarray(np.clip(x, lo, hi).astype(x.dtype)))
    rtol, atol = tol(str(x.dtype), np.clip(x, lo, hi), center=center)
    assert_close(value, clipped, rtol, atol, "L2(clip) vs L2 of the clipped input")
    if center is None:
        assert value <= x.size * max(lo * lo, hi * hi) * (1 + rtol)


# ---- 11. a ragged list is its concatenation ------------------------------------------------
@given(reg=S.regularizers(probs=True), x=S.ragged(hi=5.0), data=st.data())
def test_inv11_ragged_list_is_its_concatenation(
    bk: Harness, reg: rg.Regularizer, x: list[np.ndarray], data: st.DataObject
) -> None:
    mask = data.draw(st.none() | S.masks_for(x), label="mask")
    cat = np.concatenate(x)
    cat_mask = None if mask is None else bk.asarray(np.concatenate(mask))
    lmask = None if mask is None else bk.asarray(mask)
    v_list, m_list = run(bk, reg, bk.asarray(x), lmask)
    v_cat, m_cat = run(bk, reg, bk.asarray(cat), cat_mask)
    rtol, atol = tol(
        str(cat.dtype),
        np.exp(cat) if reg.target == "probs" else cat,
        center=getattr(reg, "center", None),
    )
    assert_close(v_list, v_cat, rtol, atol, "value")
    for k in m_cat:
        assert_close(m_list[k], m_cat[k], rtol, atol, k)
    g_list = dict(grads(bk, reg, bk.asarray(x), lmask))
    g_cat = dict(grads(bk, reg, bk.asarray(cat), cat_mask))
    for how in g_cat:
        got = bk.to_numpy(g_list[how])
        assert [a.shape for a in got] == [a.shape for a in x], how
        np.testing.assert_allclose(
            flat(got),
            bk.to_numpy(g_cat[how]),
            rtol=rtol,
            atol=4 * atol / max(cat.size, 1),
            err_msg=how,
        )


# ---- 12. dtype rules ----------------------------------------------------------------------------
def half_dtypes(bk: Harness) -> list[str]:
    """The half-precision dtypes this backend has (array-api-strict has none)."""
    return [d for d in ("float16", "bfloat16") if hasattr(bk.xp, d)]


@given(reg=S.regularizers(), x=S.arrays(lo=-60, hi=60, max_dims=1))
def test_inv12_dtype_rules(bk: Harness, reg: rg.Regularizer, x: np.ndarray) -> None:
    for dtype in ["float32", "float64", *half_dtypes(bk)]:
        bx = bk.xp.astype(bk.asarray(x.astype("float32")), getattr(bk.xp, dtype))
        value, metrics = bk.call(lambda lp: reg.compute(None, lp), bx)
        want = bk.dtype("float64" if dtype == "float64" else "float32")
        assert value.dtype == want, (dtype, value.dtype)
        assert all(m.dtype == want for m in metrics.values()), dtype
        _, _, g = bk.call(lambda lp: reg.value_and_grad(None, lp), bx)
        assert g.dtype == bx.dtype, (dtype, g.dtype)
        if bk.backend.has_autodiff:
            assert bk.autodiff(lambda lp: reg.compute(None, lp)[0], bx).dtype == bx.dtype


@pytest.mark.parametrize("n", [10_000])
def test_inv12_float16_does_not_overflow(bk: Harness, n: int) -> None:
    """10,000 float16 elements equal to 300 (300² overflows float16) give L2 = 9e8 in float32."""
    if not half_dtypes(bk):
        assert not hasattr(bk.xp, "float16")  # array-api-strict: the standard has no float16
        return
    x = bk.asarray(np.full(n, 300.0, dtype=np.float16))
    value, metrics = bk.call(lambda lp: rg.L2().compute(None, lp), x)
    assert value.dtype == bk.xp.float32
    np.testing.assert_allclose(bk.float(value), 9e8, rtol=1e-6)
    np.testing.assert_allclose(bk.float(metrics["l2_max"]), 90000.0)


# ---- 13. every backend gives the same result -----------------------------------------------------
@given(reg=S.regularizers(probs=True), x=S.arrays(hi=5.0) | S.ragged(hi=5.0))
def test_inv13_same_result_as_numpy(bk: Harness, reg: rg.Regularizer, x: Any) -> None:
    value, metrics = run(bk, reg, bk.asarray(x))
    np_value, np_metrics = reg.compute(None, x)
    t = np.exp(flat(x)) if reg.target == "probs" else flat(x)
    rtol, atol = tol(dtype_of(x), t, center=getattr(reg, "center", None))
    assert_close(value, float(np_value), rtol, atol, "value vs numpy")
    for k in metrics:
        assert_close(metrics[k], float(np_metrics[k]), rtol, atol, k)
