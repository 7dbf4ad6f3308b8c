"""Fuzzing: arbitrary options and arguments give a correct result or a typed, named error.

Every outcome is either a result that agrees with the float64 reference, or a ValueError,
TypeError or KeyError whose message names the offending argument. Any other exception type
fails the test (Hypothesis reports it), and so does an accepted option that would mislead
(a bool where a number is meant, a non-finite bound, a misspelled reduction).

The number of distinct cases tried is recorded in ``FUZZED`` and printed at the end of the
run (see ``pytest_terminal_summary`` in conftest).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regularizers as rg

from .reference import reference

Harness = Any
FUZZED: dict[str, set[str]] = {"constructor": set(), "call": set()}
TYPED = (ValueError, TypeError, KeyError)

# ---- arbitrary values ----------------------------------------------------------------------
non_array_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.sampled_from(["sum", "mean", "Sum", "mean ", "max", "logprobs", "probs", "field", "w"]),
    st.booleans().map(np.bool_),
    st.integers(-5, 5).map(np.int64),
    st.builds(rg.Field, st.text(min_size=1, max_size=3)),
)
# NumPy float scalars and 0-d arrays are valid 0-d logprobs (array-api-compat counts NumPy
# scalars as arrays), so they are values but never "non-arrays".
atoms = (
    non_array_atoms
    | st.floats(allow_nan=True).map(np.asarray)
    | st.floats(width=32).map(np.float32)
)


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(inner),
            st.tuples(inner, inner),
            st.tuples(inner, inner, inner),
            st.lists(inner, max_size=3),
            st.tuples(st.just("field"), inner),
        ),
        max_leaves=5,
    )


values = nested(atoms)
non_arrays = nested(non_array_atoms)  # never a valid logprobs argument

OPTIONS = {
    rg.L1: ("target", "reduce", "mask"),
    rg.L2: ("target", "reduce", "center", "clip", "mask"),
}


def _contains_bool(v: object) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return True
    return isinstance(v, (tuple, list)) and any(_contains_bool(x) for x in v)


def _check_sane(reg: rg.Regularizer) -> None:
    """An accepted regularizer holds only meaningful options."""
    assert reg.reduce in ("sum", "mean")
    assert reg.target in ("logprobs", "probs") or isinstance(reg.target, rg.Field)
    center = getattr(reg, "center", None)
    assert center is None or center == "mean" or (type(center) is float and math.isfinite(center))
    clip = getattr(reg, "clip", None)
    if clip is not None:
        assert isinstance(clip, tuple)
        assert len(clip) == 2
        assert clip != (None, None)
        assert all(b is None or (type(b) is float and math.isfinite(b)) for b in clip)
        if None not in clip:
            assert clip[0] <= clip[1]  # type: ignore[operator]
    assert reg == reg
    assert hash(reg) == hash(reg)
    assert repr(reg).startswith(type(reg).__name__)


@pytest.mark.backends("numpy")  # construction touches no array library: once is enough
@settings(max_examples=400)
@given(cls=st.sampled_from([rg.L1, rg.L2]), data=st.data())
def test_fuzz_constructor(bk: Harness, cls: type[rg.Regularizer], data: st.DataObject) -> None:
    names = data.draw(
        st.lists(st.sampled_from([*OPTIONS[cls], "scale", "weight"]), max_size=3, unique=True),
        label="options",
    )
    kwargs = {n: data.draw(values, label=n) for n in names}
    FUZZED["constructor"].add(f"{cls.__name__}{kwargs!r}")
    try:
        reg = cls(**kwargs)
    except TYPED as exc:
        assert any(n in str(exc) for n in names), (
            f"{type(exc).__name__}: {exc} names none of {names}"
        )
        return
    _check_sane(reg)
    # Nothing that would mislead got through.
    for n in ("center", "clip", "reduce"):
        if n in kwargs:
            assert not _contains_bool(kwargs[n]), f"{n}={kwargs[n]!r} (a bool) was accepted"
    if "reduce" in kwargs:
        assert kwargs["reduce"] in ("sum", "mean")


# ---- arbitrary arguments ----------------------------------------------------------------------
@st.composite
def call_cases(draw: st.DrawFn, bk: Harness) -> tuple[str, Any, Any, Any, str | None]:
    """(description, logprobs, data, mask, the argument an error must name or None)."""
    kind = draw(
        st.sampled_from(
            [
                "float",
                "float_list",
                "zero_d",
                "int",
                "bool",
                "complex",
                "empty_list",
                "non_array",
                "list_with_non_array",
                "mixed_libraries",
                "mask_wrong_shape",
                "mask_complex",
                "mask_other_library",
                "field_missing",
                "field_no_data",
                "datum_missing_field",
                "data_wrong_type",
            ]
        )
    )
    x = draw(
        hnp.arrays(
            draw(st.sampled_from(["float32", "float64"])),
            hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
            elements=st.floats(-300, 10, width=32),
        )
    )
    lp: Any = bk.asarray(x)
    data: Any = None
    mask: Any = None
    expect: str | None = None
    if kind == "float_list":
        lp = bk.asarray([x.reshape(-1), x.reshape(-1)[:2]])
    elif kind == "zero_d":
        lp = bk.asarray(np.asarray(x.reshape(-1)[0]) if x.size else np.asarray(-1.0))
    elif kind in ("int", "bool", "complex"):
        dtype = {"int": "int32", "bool": "bool", "complex": "complex64"}[kind]
        if kind == "complex" and not hasattr(bk.xp, "complex64"):
            dtype = "int64"
        lp = bk.asarray(x.astype(dtype))
        expect = "logprobs"
    elif kind == "empty_list":
        lp = draw(st.sampled_from([[], ()]))
        expect = "logprobs"
    elif kind == "non_array":
        lp = draw(non_arrays)
        expect = "logprobs"
    elif kind == "list_with_non_array":
        lp = [bk.asarray(x), draw(non_arrays)]
        # np.int64(3) is a NumPy array to array-api-compat: next to torch that is a mix
        expect = "logprobs[1]" if bk.library == "numpy" else "logprobs"
    elif kind == "mixed_libraries":
        lp = [bk.asarray(x), x] if bk.library != "numpy" else [x, _foreign(x)]
        expect = "logprobs"
        if lp[1] is None:  # no second library installed next to numpy
            lp, expect = bk.asarray(x), None
    elif kind == "mask_wrong_shape":
        mask = bk.asarray(np.ones(x.size + 1))
        expect = "mask"
    elif kind == "mask_complex":
        has_complex = hasattr(bk.xp, "complex64")
        mask = bk.asarray(np.ones(x.shape, dtype="complex64" if has_complex else "float32"))
        expect = "mask" if has_complex else None
    elif kind == "mask_other_library":
        # One rule for masks: a direct mask of another library is converted, as a Field's is.
        mask = np.ones(x.shape) if bk.library != "numpy" else _foreign(np.ones(x.shape))
        expect = None
    elif kind == "field_missing":
        data, mask, expect = {"advantages": x}, rg.Field("weights"), "weights"
    elif kind == "field_no_data":
        mask, expect = rg.Field("weights"), "weights"
    elif kind == "datum_missing_field":
        lp = bk.asarray([x.reshape(-1), x.reshape(-1)])
        data = [
            SimpleNamespace(loss_fn_inputs={"weights": np.ones(x.size)}),
            SimpleNamespace(loss_fn_inputs={"advantages": np.ones(x.size)}),
        ]
        mask, expect = rg.Field("weights"), "weights"
    elif kind == "data_wrong_type":
        data, mask, expect = draw(st.sampled_from([3.0, "weights", b"w"])), rg.Field("w"), "data"
    return kind, lp, data, mask, expect


def _foreign(a: np.ndarray) -> Any:
    """The same values in another installed array library, or None."""
    for name in ("array_api_strict", "torch"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        return mod.asarray(a)
    return None


@settings(max_examples=150)
@given(
    data=st.data(),
    reg=st.sampled_from(
        [
            rg.L1(),
            rg.L2(center="mean", clip=(-100.0, 0.0)),
            rg.L2(reduce="mean"),
            rg.L1(target="probs"),
        ]
    ),
)
def test_fuzz_call(bk: Harness, data: st.DataObject, reg: rg.Regularizer) -> None:
    kind, lp, d, mask, expect = data.draw(call_cases(bk), label="case")
    method = data.draw(st.sampled_from(["compute", "value_and_grad"]), label="method")
    FUZZED["call"].add(f"{bk.name}:{kind}:{method}:{reg!r}:{_shape_of(lp)}:{type(d).__name__}")
    try:
        with bk.flags():
            out = getattr(reg, method)(d, lp, mask=mask)
    except TYPED as exc:
        assert expect is not None, f"{kind}: unexpected {type(exc).__name__}: {exc}"
        assert expect in str(exc), f"{kind}: {type(exc).__name__} does not name {expect!r}: {exc}"
        return
    assert expect is None, f"{kind}: accepted, but {expect!r} was wrong"
    value = out[0]
    want, _, _ = reference(reg, bk.to_numpy(lp))
    np.testing.assert_allclose(bk.float(value), want, rtol=1e-4, atol=1e-6)


def _shape_of(lp: Any) -> str:
    if isinstance(lp, (list, tuple)):
        return "[" + ",".join(_shape_of(a) for a in lp) + "]"
    shape = getattr(lp, "shape", None)
    return str(tuple(shape)) if shape is not None else type(lp).__name__


@pytest.mark.backends("numpy")
def test_fuzz_tried_many_distinct_cases(bk: Harness) -> None:
    """Runs after the fuzzers above (file order): the report is not vacuous."""
    assert len(FUZZED["constructor"]) >= 200, len(FUZZED["constructor"])
    assert len(FUZZED["call"]) >= 50, len(FUZZED["call"])
