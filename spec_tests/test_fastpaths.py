"""Every native fast path equals the generic array API path (issue: performance).

Hypothesis draws the regularizer's options and the input: shapes, ragged lists, dtypes
(half precision included), the kinks (0, the clip bounds), ±inf and NaN, empty arrays. The
fast result must equal the generic one (``_fastpath.disabled()``) to the dtype's tolerance,
NaN where it is NaN, and the fast path must really have been taken.
"""

from __future__ import annotations

import warnings
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg
from regularizers._fastpath import dispatch as _fastpath
from regularizers._fastpath import numpy_blocked as _native_numpy

try:
    from regularizers._fastpath import torch_fused as _native_torch
except ImportError:  # the numpy session has no torch; only the numpy fast path runs there
    _native_torch = None  # type: ignore[assignment]

from . import strategies as S

Harness = Any
pytestmark = pytest.mark.backends("numpy", "torch")

SPECIALS = [0.0, -0.0, -100.0, -100.5, 0.5, np.inf, -np.inf, np.nan, 1e4, -3e4]


@st.composite
def inputs(draw: st.DrawFn, dtypes: tuple[str, ...]) -> Any:
    dtype = draw(st.sampled_from(dtypes))
    elements = st.one_of(S.elements(-300.0, 10.0), st.sampled_from(SPECIALS))
    size = st.integers(0, 3000) if draw(st.integers(0, 9)) == 0 else st.integers(0, 40)
    arrays = [
        draw(hnp.arrays("float64", draw(size), elements=elements))
        for _ in range(draw(st.integers(1, 4)))
    ]
    specials_only = draw(st.booleans())
    if not specials_only:
        arrays = [np.where(np.isfinite(a), a, -7.0) for a in arrays]
    as_list = draw(st.booleans())
    return [a.astype(dtype) for a in arrays] if as_list else arrays[0].astype(dtype)


def dtypes_for(bk: Harness) -> tuple[str, ...]:
    return ("float16", "float32", "float64") + (("bfloat16",) if bk.library == "torch" else ())


def to_backend(bk: Harness, x: Any, dtype_name: str | None = None) -> Any:
    if bk.library == "torch":
        import torch

        def one(a: np.ndarray) -> Any:
            return torch.asarray(a.astype("float32") if a.dtype == np.float16 else a)

        return [one(a) for a in x] if isinstance(x, list) else one(x)
    return x


@given(reg=S.regularizers(probs=True), data=st.data())
def test_fast_path_equals_generic_path(
    bk: Harness, reg: rg.Regularizer, data: st.DataObject
) -> None:
    x = data.draw(inputs(("float16", "float32", "float64")), label="x")
    xs = to_backend(bk, x)
    if bk.library == "torch":
        import torch

        half = data.draw(st.sampled_from([None, torch.float16, torch.bfloat16]), label="half")
        if half is not None:
            xs = [a.to(half) for a in xs] if isinstance(xs, list) else xs.to(half)
    # Small blocks too, so that combining blocks (Chan's formula, running extrema) is tested.
    block = data.draw(st.sampled_from([None, 1, 7, 64]), label="block")
    native = _native_torch if bk.library == "torch" else _native_numpy
    # (NumPy walks a large input by STREAM elements, the blocks it prepares by BLOCK)
    names = [n for n in ("BLOCK", "STREAM") if hasattr(native, n)]
    # and sums a block by BLAS in rows of _ROW: short rows, so that blocks of 64 have them
    row = data.draw(st.sampled_from([None, 4, 5]), label="row") if bk.library == "numpy" else None
    names += ["_ROW"] if row else []
    saved = {n: getattr(native, n) for n in names}
    # exp(1e4) overflows to inf on both paths alike: NumPy's warning is not the question here.
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            for n in names:
                setattr(native, n, row if n == "_ROW" else block or saved[n])
            assert _fastpath.try_compute(reg, xs) is not None, "the fast path was not taken"
            fast_value, fast_metrics = reg.compute(None, xs)
        finally:
            for n in names:
                setattr(native, n, saved[n])
        with _fastpath.disabled():
            assert _fastpath.try_compute(reg, xs) is None
            value, metrics = reg.compute(None, xs)
    assert fast_value.dtype == value.dtype
    assert tuple(fast_value.shape) == ()
    flat = np.concatenate(
        [
            np.asarray(bk.to_numpy(a), dtype=np.float64).reshape(-1)
            for a in (xs if isinstance(xs, list) else [xs])
        ]
    )
    with np.errstate(over="ignore"):
        t = np.exp(flat) if reg.target == "probs" else flat
    finite = t[np.isfinite(t)]
    big = (
        (np.abs(finite).max() if finite.size else 0.0)
        + 1.0
        + abs(reg.center if isinstance(getattr(reg, "center", None), float) else 0.0)
    )
    rtol = {"float64": 1e-9}.get(str(value.dtype).replace("torch.", ""), 2e-5)
    atol = rtol * max(t.size, 1) * big * big
    for name, a, b in [
        ("value", fast_value, value),
        *((k, fast_metrics[k], metrics[k]) for k in metrics),
    ]:
        np.testing.assert_allclose(
            bk.to_numpy(a), bk.to_numpy(b), rtol=rtol, atol=atol, equal_nan=True, err_msg=name
        )
    assert fast_metrics.keys() == metrics.keys()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("block", [None, 7])
@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(),
        rg.L1(target="probs", reduce="mean"),
        rg.L2(),
        rg.L2(center=-1.0, reduce="mean"),
        rg.L2(clip=(-3.0, 0.5)),
        rg.L2(center="mean", clip=(-100.0, 0.0)),
        rg.L2(target="probs", clip=(0.0, 0.5)),
    ],
    ids=repr,
)
def test_fast_path_by_blocks_on_logprobs(bk: Harness, reg: Any, block: Any, dtype: str) -> None:
    """Each fast value+metrics path on a ragged batch of logprob-like values (the extreme
    on the negative side, as logprobs have it: a peak taken from the top alone is wrong;
    the largest value positive), in one piece and (``block``) by small blocks: equal to the
    generic path. The property above draws these too, but not in every run."""
    import contextlib

    native = _native_torch if bk.library == "torch" else _native_numpy
    names = [n for n in ("BLOCK", "STREAM") if hasattr(native, n)]
    rng = np.random.default_rng(5)
    arrays = [-rng.gamma(0.6, 1.8, size=k) for k in (150, 61)]
    arrays[0][[3, 40]] = [-140.0, 0.25]
    x = [a.astype(dtype) for a in arrays]
    if bk.library == "torch":
        import torch

        x = [torch.asarray(a) for a in x]
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        stack.enter_context(np.errstate(over="ignore"))
        for n in names if block else ():
            mp.setattr(native, n, block)
        assert _fastpath.try_compute(reg, x) is not None, "the fast path was not taken"
        value, metrics = reg.compute(None, x)
    with _fastpath.disabled():
        want, want_metrics = reg.compute(None, x)
    rtol = {"float16": 2e-3, "float32": 2e-5}.get(dtype, 1e-9)
    assert value.dtype == want.dtype
    assert metrics.keys() == want_metrics.keys()
    for name, a, b in [
        ("value", value, want),
        *((k, metrics[k], want_metrics[k]) for k in metrics),
    ]:
        np.testing.assert_allclose(
            np.asarray(bk.to_numpy(a), dtype=np.float64),
            np.asarray(bk.to_numpy(b), dtype=np.float64),
            rtol=rtol,
            atol=0,
            err_msg=name,
        )


@pytest.mark.parametrize("clip", [None, (-3e38, 3e38)])
@pytest.mark.parametrize("case", ["overflow", "-overflow", "inf", "-inf", "both inf", "nan"])
def test_centred_fast_path_by_blocks_beyond_the_range(bk: Harness, case: str, clip: Any) -> None:
    """``L2(center="mean")`` by several blocks where the mean is not finite: the sum beyond
    float32's range with every value finite (each deviation is then ∓inf: inf, as the
    generic path has it), or an infinity or NaN among the values (NaN; clipped: inf), equal
    to the generic path. Combining the blocks' means and deviations gives NaN for all."""
    native = _native_torch if bk.library == "torch" else _native_numpy
    names = [n for n in ("BLOCK", "STREAM") if hasattr(native, n)]
    x = np.full(5000, 1.0, dtype=np.float32)
    if "overflow" in case:
        x[:] = -3e38 if case.startswith("-") else 3e38
    else:
        special = {"inf": [np.inf], "-inf": [-np.inf], "both inf": [np.inf, -np.inf]}
        tail = special.get(case, [np.nan])
        x[-len(tail) :] = tail
    xs = to_backend(bk, x)
    reg = rg.L2(center="mean", clip=clip)
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        for n in names:
            mp.setattr(native, n, 1000)
        assert _fastpath.try_compute(reg, xs) is not None, "the fast path was not taken"
        value, metrics = reg.compute(None, xs)
        with _fastpath.disabled():
            want, want_metrics = reg.compute(None, xs)
    for name, a, b in [
        ("value", value, want),
        *((k, metrics[k], want_metrics[k]) for k in metrics),
    ]:
        np.testing.assert_allclose(
            bk.to_numpy(a), bk.to_numpy(b), rtol=1e-6, atol=0, equal_nan=True, err_msg=name
        )


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_sum_by_blas_rows(n: int, dtype: str) -> None:
    """``_sum`` (a block's total by BLAS row sums, then the rest) is the block's sum: to
    float64 rounding, inf and NaN where ``np.sum`` has them."""
    rng = np.random.default_rng(n)
    b = rng.normal(0.0, 30.0, size=n).astype(dtype)
    expected = float(np.sum(b.astype(np.float64)))
    eps = float(np.finfo(dtype).eps)
    assert abs(_native_numpy._sum(b) - expected) <= 4 * eps * float(np.abs(b).sum()) + 1e-300
    with np.errstate(invalid="ignore"):  # (inf - inf: NaN, as np.sum)
        for special in (np.inf, -np.inf, np.nan):
            if n:
                c = b.copy()
                c[n // 2] = special
                expected = float(np.sum(c.astype(np.float64)))
                np.testing.assert_equal(_native_numpy._sum(c), expected)
        if n > 1:
            c = b.copy()
            c[0], c[-1] = np.inf, -np.inf
            assert np.isnan(_native_numpy._sum(c))


def _deviation_block(loc: float, dtype: str) -> tuple[np.ndarray, float, float, bool]:
    """A block of 3000 values around ``loc``, its float64 mean and squared deviations, and
    whether ``Σb² - k·mean²`` cancels at most half of ``Σb²`` (so for ``loc`` 0 and -1, not
    for -30 and 1e3: both ways are taken by the tests below)."""
    rng = np.random.default_rng(7)
    b = (rng.normal(0.0, 2.0, size=3000) + loc).astype(dtype)
    exact = b.astype(np.float64)
    mean = float(exact.mean())
    expected = float(((exact - mean) ** 2).sum())
    fast = 3000 * mean * mean <= 0.5 * float((exact * exact).sum())
    assert fast == (loc in (0.0, -1.0))
    return b, mean, expected, fast


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("loc", [0.0, -1.0, -30.0, 1e3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_block_deviations_both_ways(loc: float, dtype: str) -> None:
    """``_deviations`` (a block's Σ(b - mean)², by Σb² - k·mean² where that cancels little,
    else by the shifted block) is the float64 sum of squared deviations from the mean,
    taken either way; with an inf or NaN it is NaN or inf as the shifted dot has it."""
    b, mean, expected, _ = _deviation_block(loc, dtype)
    buf = np.empty_like(b)
    got = _native_numpy._deviations(b, mean, buf)
    eps = float(np.finfo(dtype).eps)
    # relative to the result either way (taken fast, Σb² is at most twice the result)
    assert abs(got - expected) <= 128 * eps * expected
    before = b.copy()
    _native_numpy._deviations(b, mean, buf)
    np.testing.assert_array_equal(b, before)  # the block is read, not shifted in place
    with np.errstate(invalid="ignore", over="ignore"):
        for special in (np.inf, np.nan):
            c = b.copy()
            c[5] = special
            m = float(np.mean(c.astype(np.float64)))
            shifted = c.astype(np.float64) - m
            np.testing.assert_equal(
                _native_numpy._deviations(c, m, buf), float(np.dot(shifted, shifted))
            )


@pytest.mark.backends("torch")
@pytest.mark.parametrize("loc", [0.0, -1.0, -30.0, 1e3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_block_deviations_both_ways(bk: Harness, loc: float, dtype: str) -> None:
    """torch's ``_deviations`` (a CPU block's Σ(b - mean)² by Σb² - s²/k where that cancels
    little, else None: the caller shifts the block) is the float64 sum of squared deviations
    where it answers, answers exactly where the cancellation is small, reads the block
    without writing it, and leaves an inf or NaN to the shifted path."""
    import torch

    b, _, expected, fast = _deviation_block(loc, dtype)
    t = torch.from_numpy(b.copy())
    got = _native_torch._deviations(t, t.sum(), 3000)
    np.testing.assert_array_equal(t.numpy(), b)  # read, not shifted in place
    if not fast:
        assert got is None
        return
    assert got.dtype == t.dtype
    assert got.shape == ()
    eps = float(np.finfo(dtype).eps)
    # relative to the result (taken, Σb² is at most twice the result); the float32 dot and
    # sum of 3000 elements each carry a few eps of Σb²
    assert abs(float(got) - expected) <= 128 * eps * expected
    for special in (np.inf, np.nan):
        c = t.clone()
        c[5] = special
        assert _native_torch._deviations(c, c.sum(), 3000) is None


def test_fast_path_steps_aside(bk: Harness) -> None:
    """Masks, subclasses, autograd, foreign dtypes: the generic path (and its errors) runs."""
    x = bk.asarray(np.array([-1.0, 0.0, 2.0]))

    class MyL1(rg.L1):
        pass

    assert _fastpath.try_compute(rg.L1(), x) is not None
    assert _fastpath.try_compute(rg.L1(mask=np.ones(3)), x) is None
    assert _fastpath.try_compute(MyL1(), x) is None
    assert _fastpath.try_compute(rg.L2(target=rg.Field("adv")), x) is None
    assert _fastpath.try_compute(rg.L1(), bk.asarray(np.array([1, 2], dtype=np.int32))) is None
    if bk.library == "torch":
        import torch

        leaf = torch.tensor([-1.0, 0.0], requires_grad=True)
        assert _fastpath.try_compute(rg.L2(), leaf) is None
        with torch.no_grad():
            assert _fastpath.try_compute(rg.L2(), leaf) is not None
        value, _ = rg.L1().compute(None, leaf)
        value.backward()
        assert leaf.grad.tolist() == [-1.0, 0.0]  # the generic path's convention at 0


def test_the_path_found_is_remembered_per_array_module(bk: Harness) -> None:
    """``try_compute`` keeps on each regularizer the path it found for each array module
    (the class and the options decide it): the same answer on every call, for each module
    apart (NumPy's after torch's and back), and the switch still read on each call."""
    x = bk.asarray(np.array([-1.0, 0.0, 2.0]))
    arrays = [np.array([-1.0, 0.0, 2.0]), x]  # (both NumPy in the numpy session)
    plain, masked, field = rg.L1(), rg.L1(mask=np.ones(3)), rg.L2(target=rg.Field("adv"))
    for _ in range(2):
        for a in arrays:
            got = _fastpath.try_compute(plain, a)
            assert got is not None
            assert type(got[0]) is type(a)  # (the path of a's own module)
            assert float(got[0]) == 3.0
            assert _fastpath.try_compute(masked, a) is None
            assert _fastpath.try_compute(field, a) is None
            with _fastpath.disabled():
                assert _fastpath.try_compute(plain, a) is None
    assert set(plain._fast) == {type(a).__module__ for a in arrays}


@pytest.mark.parametrize("bounds", [(-1e300, 0.0), (None, 1e300), (-1e39, -1.0)])
def test_bounds_beyond_the_dtype_agree_with_the_generic_path(bk: Harness, bounds: Any) -> None:
    """float32 input, float64-sized bounds and center: clamped to float32's range on both."""
    x = bk.asarray(np.array([-3.0, 0.5, -200.0, 0.0], dtype=np.float32))
    for reg in (rg.L2(clip=bounds), rg.L2(clip=bounds, center=-1e300), rg.L2(center=1e39)):
        # (3.4e38)² is inf on both paths; NumPy's dot warns regardless of np.errstate
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert _fastpath.try_compute(reg, x) is not None
            fast_value, fast_metrics = reg.compute(None, x)
            with _fastpath.disabled():
                value, metrics = reg.compute(None, x)
        np.testing.assert_allclose(bk.to_numpy(fast_value), bk.to_numpy(value), rtol=1e-6)
        for k in metrics:
            np.testing.assert_allclose(
                bk.to_numpy(fast_metrics[k]), bk.to_numpy(metrics[k]), rtol=1e-6
            )
