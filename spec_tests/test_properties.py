"""The properties every penalty has, run for every registered case on every backend.

A penalty brings one case strategy (``strategies.cases_for``) and one float64 reference
(``reference.reference_for``); this module proves, for each of them, on each backend
configuration:

- agreement with the reference for every ``reduce`` mode, masks and ragged lists (value,
  metrics, ``value_and_grad`` and the backend's autodiff);
- split invariance (SPEC 7.2): parts computed with the whole batch's ``counts`` add up;
- a stacked ``[B, T, ...]`` input equals the list of its rows, and for ``sum``/``mean`` a list
  equals its concatenation;
- masked positions are inert, even when they hold ±inf or NaN;
- config, pickle and copy round trips;
- half precision accumulates in float32, and the gradient keeps the input dtype.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .reference import reference

Harness = Any
CLASSES = sorted(S.CASES, key=lambda c: c.__name__)
IDS = [c.__name__ for c in CLASSES]


def per_class(test: Any) -> Any:
    """Parametrize over every registered penalty; a session may cap the examples per test
    (``REGULARIZERS_PROPERTY_EXAMPLES``: JAX compiles each drawn shape, twice under jit)."""
    cap = os.environ.get("REGULARIZERS_PROPERTY_EXAMPLES")
    if cap:
        test = settings(max_examples=int(cap))(test)
    return pytest.mark.parametrize("cls", CLASSES, ids=IDS)(test)


# ---- running a case on a backend ----------------------------------------------------------
def convert(bk: Harness, case: S.Case, dtype: str | None = None) -> tuple[Any, Any, Any]:
    x = bk.asarray(case.x, dtype)
    data = None if case.data is None else {k: bk.asarray(v, dtype) for k, v in case.data.items()}
    mask = None if case.mask is None else bk.asarray(case.mask)
    return x, data, mask


def kwargs(mask: Any) -> dict[str, Any]:
    return {} if mask is None else {"mask": mask}


def run(bk: Harness, case: S.Case, counts: Any = None, dtype: str | None = None) -> Any:
    """(value, metrics, grad by value_and_grad, grad by autodiff or None) as NumPy/floats."""
    reg = case.reg
    x, data, mask = convert(bk, case, dtype)

    def compute(lp: Any, d: Any, m: Any) -> Any:
        return reg.compute(d, lp, counts=counts, **kwargs(m))

    def vag(lp: Any, d: Any, m: Any) -> Any:
        return reg.value_and_grad(d, lp, counts=counts, **kwargs(m))

    value, metrics = bk.call(compute, x, data, mask)
    v2, m2, grad = bk.call(vag, x, data, mask)
    for what, a in [("value", value), *metrics.items(), ("value_and_grad", v2)]:
        assert tuple(a.shape) == (), f"{what} is not 0-d"
    auto = None
    as_np = bk.to_numpy
    if bk.backend.has_autodiff:
        auto = bk.autodiff(lambda lp: compute(lp, data, mask)[0], x)
    if bk.library == "torch" and reg.has_closed_form_grad:  # autograd through the closed form
        routed = flat64(as_np(bk.autodiff(lambda lp: compute(lp, data, mask)[0], x, generic=False)))
        closed = flat64(as_np(grad))  # (where the closed form is ill-conditioned, e.g. the
        # cosine of a near-zero row, it may differ from the generic path's autograd by more
        # than rounding; each is checked against the float64 reference elsewhere)
        np.testing.assert_allclose(
            routed, closed, rtol=1e-6, atol=1e-30, err_msg="autograd = closed form"
        )
    return (
        float(as_np(value)),
        {k: float(as_np(v)) for k, v in metrics.items()},
        flat64(as_np(grad)),
        None if auto is None else flat64(as_np(auto)),
        (float(as_np(v2)), {k: float(as_np(v)) for k, v in m2.items()}),
    )


def flat64(a: Any) -> np.ndarray:
    parts = a if isinstance(a, list) else [a]
    if not parts:
        return np.zeros(0)
    return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])


def close(actual: Any, desired: Any, what: str, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=what)


# ---- the properties ------------------------------------------------------------------------
@per_class
@given(data=st.data())
def test_matches_reference_every_reduce(bk: Harness, cls: type, data: st.DataObject) -> None:
    case = data.draw(S.cases(cls), label="case")
    value, metrics, grad, auto, (v2, m2) = run(bk, case)
    want_value, want_metrics, want_grad = reference(case.reg, case.x, case.mask, data=case.data)
    close(value, want_value, "value")
    assert set(metrics) == set(want_metrics), "metric names"
    for k, v in want_metrics.items():
        close(metrics[k], v, k)
    close(v2, want_value, "value_and_grad's value")
    assert set(m2) == set(want_metrics)
    atol = _grad_atol(case)
    close(grad, want_grad, "value_and_grad's gradient", atol=atol)
    if auto is not None:
        close(auto, want_grad, "autodiff's gradient", atol=atol)


def _grad_atol(case: S.Case) -> float:
    """The gradient's absolute tolerance: 1e-9, or for cosine consistency the rounding of
    cos (a few ulps) amplified by 1/‖x‖ of the shortest row, the scale of ∇cos (a row of
    norm 3e-16 equal to its pair has gradient 0, which the float64 reference computes as
    ±0.4 from the last bit of cos)."""
    reg = case.reg
    if not (isinstance(reg, rg.Consistency) and reg.metric == "cosine"):
        return 1e-9
    norms = [
        np.linalg.norm(np.where(np.isfinite(a), a, 0.0), axis=-1).reshape(-1)
        for a in (case.x if isinstance(case.x, list) else [case.x])
    ]
    positive = np.concatenate(norms)
    positive = positive[positive > 0]
    shortest = float(positive.min()) if positive.size else 1.0
    return 1e-9 + 64 * float(np.finfo(np.float64).eps) / min(shortest, 1.0)


def _split(case: S.Case, cuts: list[int]) -> list[S.Case]:
    """The case cut into parts by sequences (datums of a list, rows of a stacked array)."""
    bounds = [0, *cuts, len(case.x)]
    parts = []
    for a, b in itertools.pairwise(bounds):
        data = None if case.data is None else {k: v[a:b] for k, v in case.data.items()}
        mask = None if case.mask is None else case.mask[a:b]
        parts.append(S.Case(case.reg, case.x[a:b], data, mask))
    return parts


@per_class
@given(data=st.data())
def test_split_invariance_with_global_counts(bk: Harness, cls: type, data: st.DataObject) -> None:
    case = data.draw(S.cases(cls, splittable=True, min_sequences=2), label="case")
    n = len(case.x)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=1), label="cuts"))
    x, d, m = convert(bk, case)
    counts = bk.call(lambda lp, dd, mm: case.reg.counts(dd, lp, **kwargs(mm)), x, d, m)
    counts = {k: int(bk.to_numpy(v)) for k, v in counts.items()}
    whole_value, whole_metrics, whole_grad, _, _ = run(bk, case, counts=counts)
    total, metrics, grads = 0.0, dict.fromkeys(whole_metrics, 0.0), []
    for part in _split(case, cuts):
        value, part_metrics, grad, auto, _ = run(bk, part, counts=counts)
        total += value
        for k in metrics:
            metrics[k] += part_metrics[k]
        grads.append(grad)
        if auto is not None:
            close(auto, grad, "autodiff = value_and_grad on a part", atol=_grad_atol(part))
    close(total, whole_value, "the parts' values add up to the whole's")
    for k, v in whole_metrics.items():
        if k.endswith(("_raw", "_mean")):
            close(metrics[k], v, f"the parts' {k} add up")
    atol = _grad_atol(case)
    close(np.concatenate(grads), whole_grad, "the parts' gradients are the whole's", atol=atol)


@per_class
@given(data=st.data())
def test_a_list_of_datums_with_no_token_is_zero(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    """Every datum of a list empty (a part of a split batch can be): value and metrics 0, the
    reference's, and an empty gradient, under every reduce, with a mask or none. (Dask once
    failed here: its graphs over several chunks of no element came apart.)"""
    case = data.draw(S.cases(cls, layout="list", min_sequences=2, no_tokens=True), label="case")
    value, metrics, grad, auto, (v2, m2) = run(bk, case)
    want_value, want_metrics, _ = reference(case.reg, case.x, case.mask, data=case.data)
    assert value == v2 == want_value == 0.0
    assert metrics == m2 == want_metrics
    assert all(v == 0.0 for v in metrics.values()), metrics
    assert grad.size == 0
    assert auto is None or auto.size == 0


@per_class
@given(data=st.data())
def test_stacked_equals_list_of_rows(bk: Harness, cls: type, data: st.DataObject) -> None:
    case = data.draw(S.cases(cls, layout="stacked"), label="case")
    rows = S.Case(
        case.reg,
        list(case.x),
        None if case.data is None else {k: list(v) for k, v in case.data.items()},
        None if case.mask is None else list(case.mask),
    )
    stacked, listed = run(bk, case), run(bk, rows)
    close(stacked[0], listed[0], "value")
    for k, v in listed[1].items():
        close(stacked[1][k], v, k)
    close(stacked[2], listed[2], "gradient", atol=_grad_atol(case))


@per_class
@given(data=st.data())
def test_sum_and_mean_of_a_list_equal_its_concatenation(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    reduce = data.draw(st.sampled_from(["sum", "mean"]), label="reduce")
    case = data.draw(S.cases(cls, layout="list", reduce=reduce), label="case")
    cat = S.Case(
        case.reg,
        np.concatenate(case.x),
        None if case.data is None else {k: np.concatenate(v) for k, v in case.data.items()},
        None if case.mask is None else np.concatenate(case.mask),
    )
    listed, joined = run(bk, case), run(bk, cat)
    close(listed[0], joined[0], "value")
    for k, v in joined[1].items():
        close(listed[1][k], v, k)
    close(listed[2], joined[2], "gradient", atol=_grad_atol(case))


def _poison(a: np.ndarray, mask: np.ndarray, bad: float) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
    return np.where(m, a, bad)


@per_class
@given(data=st.data())
def test_masked_positions_are_inert_under_inf_and_nan(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    case = data.draw(S.cases(cls, masked=True), label="case")
    bad = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]), label="bad")

    def poison(v: Any, mask: Any) -> Any:
        if isinstance(v, list):
            return [_poison(a, np.asarray(mm), bad) for a, mm in zip(v, mask, strict=True)]
        return _poison(v, np.asarray(mask), bad)

    poisoned = S.Case(
        case.reg,
        poison(case.x, case.mask),
        None if case.data is None else {k: poison(v, case.mask) for k, v in case.data.items()},
        case.mask,
    )
    clean, dirty = run(bk, case), run(bk, poisoned)
    assert dirty[0] == clean[0] or np.isclose(dirty[0], clean[0], rtol=1e-12), "value"
    for k, v in clean[1].items():
        assert np.isclose(dirty[1][k], v, rtol=1e-12, atol=0, equal_nan=True), k
    for g in (dirty[2], dirty[3]):
        if g is None:
            continue
        m = flat64(
            [
                np.broadcast_to(
                    np.asarray(mm).reshape(np.shape(mm) + (1,) * (np.ndim(a) - np.ndim(mm))),
                    np.shape(a),
                )
                for a, mm in zip(
                    case.x if case.is_list else [case.x],
                    case.mask if case.is_list else [case.mask],
                    strict=True,
                )
            ]
        )
        assert np.all(g[m == 0] == 0), "the gradient at masked positions is 0 (not NaN)"
        close(g[m != 0], clean[2][m != 0], "the gradient elsewhere is unchanged")


@per_class
@given(data=st.data())
def test_config_pickle_and_copy_round_trips(cls: type, data: st.DataObject) -> None:
    reg = data.draw(S.cases(cls), label="case").reg
    config = reg.to_config()
    assert json.loads(json.dumps(config)) == config
    again = rg.from_config(json.loads(json.dumps(config)))
    assert again == reg
    assert hash(again) == hash(reg)
    assert repr(again) == repr(reg)
    assert rg.from_config({**config, "regularizer": cls.__name__}) == reg  # the class name too
    assert pickle.loads(pickle.dumps(reg)) == reg
    assert copy.copy(reg) == reg
    assert copy.deepcopy(reg) == reg


@pytest.mark.backends("numpy", "torch", "jax", "dask")
@per_class
@given(data=st.data())
def test_half_precision_accumulates_in_float32(bk: Harness, cls: type, data: st.DataObject) -> None:
    case = data.draw(S.cases(cls), label="case")
    x, d, m = convert(bk, case, "float16")
    # (a float32 gradient beyond float16's range is ±inf in float16, as it should be: NumPy
    # warns of the cast, e.g. SampledKL's off-policy ratio exp(lp - behavior) = e^9)
    with np.errstate(over="ignore"):
        value, metrics = bk.call(lambda lp, dd, mm: case.reg.compute(dd, lp, **kwargs(mm)), x, d, m)
        _, _, grad = bk.call(
            lambda lp, dd, mm: case.reg.value_and_grad(dd, lp, **kwargs(mm)), x, d, m
        )
    assert value.dtype == bk.dtype("float32")
    assert all(v.dtype == bk.dtype("float32") for v in metrics.values())
    grads = grad if isinstance(grad, list) else [grad]
    assert all(g.dtype == bk.dtype("float16") for g in grads)
    # the same numbers (rounded to float16 first) in float32 give the same result
    rounded = S.Case(
        case.reg,
        [np.asarray(a, np.float16) for a in case.x]
        if case.is_list
        else np.asarray(case.x, np.float16),
        None
        if case.data is None
        else {
            k: [np.asarray(a, np.float16) for a in v]
            if isinstance(v, list)
            else np.asarray(v, np.float16)
            for k, v in case.data.items()
        },
        case.mask,
    )
    want = run(bk, rounded, dtype="float32")
    got = float(bk.to_numpy(value))
    if np.isfinite(want[0]):
        assert np.isfinite(got), "no float16 overflow where the float32 result is finite"
        close(got, want[0], "value", rtol=1e-5, atol=1e-5)
