"""Every built-in, every path, on special values: each backend agrees with NumPy's closed form.

Small inputs drawn with ±inf, NaN, 0, subnormals and large magnitudes among ordinary values
(in the input and in the array it is compared with), float64. On each backend, ``compute``,
``value_and_grad`` and (torch, JAX) autodiff as users get it (torch's autograd route, JAX's
``jax.grad``) must give NumPy's ``value_and_grad``: the same NaN and ±inf, element by element,
and the same finite numbers to rounding; on NumPy, the generic path (``generic_path()``) must
give its fast paths' results too. Such a run found three disagreements that the suite's finite
inputs could not show (a NaN beside a KL's support gap, ZLoss at +inf through torch's
``logsumexp``, SampledEntropy's ``jax.grad`` at a non-finite logprob). The same again for
ragged lists under a drawn mask, the training call's shape, where what an uncounted token
holds must change nothing; it found SampledEntropy's ``jax.grad`` with a mask traced under
``jit`` taking the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import regularizers as rg
from regularizers.testing import generic_path

Harness = Any
F = rg.Field("other")

# (no ±1e30: beside terms of order 1 any order of summation is right only to an ulp of 1e30)
SPECIAL = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e4, -1e4, 1e-310]

FLAT = [
    rg.L1(),
    rg.L1(target="probs", reduce="mean"),
    rg.L2(),
    rg.L2(center="mean", reduce="mean"),
    rg.L2(clip=(-2.0, 0.0)),
    rg.L2(clip=(-2.0, 0.0), center="mean"),
    rg.ElasticNet(),
    rg.Huber(),
    rg.SampledEntropy(),
    rg.SampledEntropy(mode="minimize", behavior=F),
    rg.SampledKL(F),
    rg.SampledKL(F, estimator="k1"),
    rg.SampledKL(F, estimator="k2", reduce="mean"),
    rg.Consistency(F),
    rg.Consistency(F, metric="l1"),
]
ROWS = [
    rg.KL(F),
    rg.KL(F, direction="forward"),
    rg.KL(F, direction="symmetric", temperature=0.5),
    rg.JSD(F),
    rg.JSD(F, beta=0.2),
    rg.Entropy(),
    rg.Entropy(mode="maximize", normalize=True),
    rg.Entropy(threshold=0.5),
    rg.ZLoss(),
    rg.Consistency(F, metric="cosine"),
    rg.Consistency(F, metric="kl"),
    rg.GradientPenalty(),
]
MATRICES = [rg.Orthogonality(), rg.Orthogonality(kind="frobenius", mode="columns")]
CASES = [(r, (6,)) for r in FLAT] + [(r, (4, 3)) for r in ROWS] + [(r, (3, 4)) for r in MATRICES]


def _arrays(shape: tuple[int, ...], subnormal: bool) -> st.SearchStrategy[np.ndarray]:
    special = SPECIAL if subnormal else [v for v in SPECIAL if v == 0 or abs(v) >= 1e-300]
    values = st.one_of(st.floats(-5.0, 5.0, allow_subnormal=subnormal), st.sampled_from(special))
    return hnp.arrays(np.float64, shape, elements=values)


def _same(got: Any, want: Any, what: str, scale: float = 1.0) -> None:
    """NaN where NaN, ±inf where ±inf, finite values to rounding (relative to the largest,
    or to ``scale`` where that is larger)."""
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(a[np.isinf(b)], b[np.isinf(b)], err_msg=f"{what}: inf")
    both = np.isfinite(a) & np.isfinite(b)
    np.testing.assert_array_equal(both, np.isfinite(b), err_msg=f"{what}: finite")
    scale = max(1.0, scale, float(np.max(np.abs(b[both]), initial=0.0)))
    np.testing.assert_allclose(a[both], b[both], rtol=1e-6, atol=1e-9 * scale, err_msg=what)


def _grad_scale(reg: rg.Regularizer, x: np.ndarray) -> float:
    """What a gradient's rounding is relative to: 1, or for a cosine (blind to each row's
    length, so that its gradient grows as 1 / the row's norm) 1 / the smallest nonzero
    finite row norm. (Rows of 1e-60, all parallel, have gradient 0 exactly; computed, it is
    rounding times 1e60.)"""
    if getattr(reg, "kind", None) != "cosine" and getattr(reg, "metric", None) != "cosine":
        return 1.0
    rows = x if getattr(reg, "mode", "rows") == "rows" else np.swapaxes(x, -1, -2)
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.sum(rows * rows, axis=-1))
    norms = norms[np.isfinite(norms) & (norms > 0)]
    return float(1.0 / norms.min()) if norms.size else 1.0


def _compare(
    got: Any, want: tuple[Any, dict[str, Any], Any], what: str, bk: Any, grad_scale: float = 1.0
) -> None:
    value, metrics, grad = got
    _same(bk.float(value), want[0], f"{what} value")
    floats = rg.to_floats(metrics)
    for k, v in want[1].items():
        _same(floats[k], v, f"{what} {k}")
    if grad is not None:
        _same(bk.to_numpy(grad), want[2], f"{what} gradient", grad_scale)


_CALLS: dict[int, tuple[Callable[..., Any], ...]] = {}


def _calls(reg: rg.Regularizer) -> tuple[Callable[..., Any], ...]:
    """The same functions for every example of ``reg`` (JAX traces each once per shape), of
    the values, the other view and (masked cases) the mask."""
    if id(reg) not in _CALLS:
        _CALLS[id(reg)] = (
            lambda lp, other, m=None: reg.compute(_fields(other, m), lp),
            lambda lp, other, m=None: reg.value_and_grad(_fields(other, m), lp),
        )
    return _CALLS[id(reg)]


def _fields(other: Any, m: Any = None) -> dict[str, Any]:
    return {"other": other} if m is None else {"other": other, "m": m}


# (at least 20 examples, where a session caps its properties lower: the shapes are fixed and
# each configuration's functions are made once, so JAX traces each only once)
@pytest.mark.parametrize(("reg", "shape"), CASES, ids=[repr(r) for r, _ in CASES])
@settings(max_examples=max(20, settings().max_examples))
@given(data=st.data())
# inf - inf and 0 · inf are the point (NumPy warns of them; Dask computes in threads that
# np.errstate cannot reach)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_every_path_agrees_with_numpys_closed_form(
    bk: Harness, reg: rg.Regularizer, shape: tuple[int, ...], data: st.DataObject
) -> None:
    # (XLA's CPU backend flushes subnormals to zero, inputs included: sign(1e-310) is 0)
    subnormal = bk.library != "jax"
    x = data.draw(_arrays(shape, subnormal), label="logprobs")
    other = data.draw(_arrays(shape, subnormal), label="other")
    gs = _grad_scale(reg, x)
    with np.errstate(all="ignore"):
        value, metrics, grad = reg.value_and_grad({"other": other}, x)
        base = (float(value), rg.to_floats(metrics), np.asarray(grad))
        if bk.library == "numpy":
            with generic_path():
                got = reg.value_and_grad({"other": other}, x)
            _compare(got, base, "generic path", bk, gs)
        compute, vag = _calls(reg)
        lp, ref = bk.asarray(x), bk.asarray(other)
        _compare((*bk.call(compute, lp, ref), None), base, "compute", bk)
        _compare(bk.call(vag, lp, ref), base, "value_and_grad", bk, gs)
        if bk.backend.has_autodiff:
            g = bk.autodiff(lambda a: reg.compute({"other": ref}, a)[0], lp, generic=False)
            _same(bk.to_numpy(g), base[2], "autodiff gradient", gs)


# ---- masked ragged lists: the Tinker shape -------------------------------------------------------
# Per-datum arrays of fixed lengths (one datum empty) under a drawn mask, each configuration
# with one of the reduces: the paths that concatenate a list, mask by a product or by the
# kernel itself (``MASKS_ITS_OWN``), skip a Batch (NumPy's ``numpy_direct``) or shortcut the
# valid-token check. What an uncounted token holds (NaN, ±inf) must change nothing.
LENGTHS = (3, 0, 2)
REDUCES = ("mean", "sum", "seq-mean-token-mean", "token-mean")
M = rg.Field("m")
MASKED = [
    type(r)(**{**r.options(), "mask": M, "reduce": REDUCES[i % len(REDUCES)]})
    for i, r in enumerate(FLAT + ROWS)
]
MASKED_CASES = [(r, ()) for r in MASKED[: len(FLAT)]] + [(r, (3,)) for r in MASKED[len(FLAT) :]]


def _datums(
    data: st.DataObject, tail: tuple[int, ...], subnormal: bool, label: str
) -> list[np.ndarray]:
    return [
        data.draw(_arrays((n, *tail), subnormal), label=f"{label}[{i}]")
        for i, n in enumerate(LENGTHS)
    ]


def _flat(arrays: Any) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


@pytest.mark.parametrize(("reg", "tail"), MASKED_CASES, ids=[repr(r) for r, _ in MASKED_CASES])
@settings(max_examples=max(20, settings().max_examples))
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_masked_ragged_lists_agree_with_numpys_closed_form(
    bk: Harness, reg: rg.Regularizer, tail: tuple[int, ...], data: st.DataObject
) -> None:
    subnormal = bk.library != "jax"
    x = _datums(data, tail, subnormal, "logprobs")
    other = _datums(data, tail, subnormal, "other")
    kind = data.draw(st.sampled_from([np.bool_, np.float64]), label="mask dtype")
    m = [
        data.draw(hnp.arrays(np.bool_, (n,)), label=f"m[{i}]").astype(kind)
        for i, n in enumerate(LENGTHS)
    ]
    gs = _grad_scale(reg, np.concatenate([a.reshape(-1, *tail) for a in x]))
    # the same call with every uncounted token's entries (values and reference) set to 0
    cleared = [
        [
            np.where(w.reshape(-1, *[1] * len(tail)) != 0, a, 0.0)
            for a, w in zip(arrays, m, strict=True)
        ]
        for arrays in (x, other)
    ]
    with np.errstate(all="ignore"):
        value, metrics, grad = reg.value_and_grad({"other": other, "m": m}, x)
        base = (float(value), rg.to_floats(metrics), _flat(grad))
        if bk.library == "numpy":
            _compare(
                (*reg.value_and_grad({"other": cleared[1], "m": m}, cleared[0])[:2], None),
                base,
                "uncounted tokens cleared",
                bk,
            )
            for w, g in zip(m, grad, strict=True):  # uncounted tokens: gradient exactly 0
                assert (np.asarray(g)[w == 0] == 0).all(), g
            with generic_path():
                got = reg.value_and_grad({"other": other, "m": m}, x)
            _compare((*got[:2], _flat(got[2])), base, "generic path", bk, gs)
        lp, ref, mask = bk.asarray(x), bk.asarray(other), bk.asarray(m)
        compute, vag = _calls(reg)
        # on torch, also with the forms its kernels take above ``SMALL`` elements (the mask
        # applied by a product checked for finiteness, where small inputs take a ``where``)
        for form in ("small", "large") if bk.library == "torch" else ("small",):
            with pytest.MonkeyPatch.context() as mp:
                if form == "large":
                    from regularizers._fastpath import torch_fused

                    mp.setattr(torch_fused, "SMALL", 1)
                what = f"{form} form: " if bk.library == "torch" else ""
                _compare((*bk.call(compute, lp, ref, mask), None), base, f"{what}compute", bk)
                v, mt, g = bk.call(vag, lp, ref, mask)
                _compare((v, mt, None), base, f"{what}value_and_grad", bk)
                _same(_flat(bk.to_numpy(g)), base[2], f"{what}value_and_grad gradient", gs)
                if bk.backend.has_autodiff:
                    g = bk.autodiff(
                        lambda a: reg.compute({"other": ref, "m": mask}, a)[0], lp, generic=False
                    )
                    _same(_flat(bk.to_numpy(g)), base[2], f"{what}autodiff gradient", gs)
