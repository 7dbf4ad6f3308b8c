"""Issue 5, point 1: fuzzed options and inputs fail early, typed, and name what to fix.

Hypothesis throws arbitrary option values at the constructors and arbitrary argument types
at the calls. Every outcome must be a correct result (checked against the float64 NumPy
reference) or a ``ValueError`` / ``TypeError`` / ``KeyError`` whose message names the
offending argument: never another exception type, a warning, or a silently meaningless
result. Constructor fuzzing is backend-independent and runs in the numpy session only; call
fuzzing runs on NumPy and torch, whose arrays are mixed with each other in lists.

Each test counts the distinct cases it tried, asserts a minimum (so the figure is not
vacuous) and records it for the end-of-run summary (``spec_tests/_results.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regularizers as rg

from ._results import RESULTS
from .reference import reference

Harness = Any
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
MIN_DISTINCT = 150  # per test: a minimum that a broken strategy would not reach
ALLOWED = (ValueError, TypeError, KeyError)


def _record(name: str, seen: set[str]) -> None:
    assert len(seen) >= MIN_DISTINCT, f"{name} tried only {len(seen)} distinct cases"
    RESULTS[f"fuzz cases: {name}"] = len(seen)
    RESULTS["fuzz cases: total"] = sum(
        v for k, v in RESULTS.items() if k.startswith("fuzz cases: ") and k != "fuzz cases: total"
    )


# ---- arbitrary values ------------------------------------------------------------------
def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**400), 10**400),
        st.floats(),
        st.complex_numbers(allow_nan=True),
        st.text(max_size=6),
        st.sampled_from(
            [
                "sum",
                "mean",
                "Sum",
                "mean ",
                "max",
                "logprobs",
                "probs",
                "field",
                "median",
                "",
                "none",
            ]
        ),
        st.sampled_from(
            [
                np.float32(1.5),
                np.float64(np.nan),
                np.float16(-np.inf),
                np.int64(3),
                np.bool_(True),
                np.complex64(1j),
                np.array(0.5),
                np.array([1.0, 2.0]),
                np.array(True),
            ]
        ),
        st.builds(rg.Field, st.text(min_size=1, max_size=4)),
        st.just(object()),
        st.just(b"sum"),
        st.just({"a": 1}),
        st.just(Ellipsis),
        st.just(10**400),
        st.just(-(2**1100)),
        st.just(1e300),
    )


def _values() -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars(),
        lambda inner: st.one_of(
            st.tuples(inner, inner),
            st.lists(inner, max_size=3).map(tuple),
            st.lists(inner, max_size=3),
            st.tuples(st.just("field"), inner),
        ),
        max_leaves=4,
    )


def _option_dicts(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), _values(), max_size=len(names))


# What a *valid* option is, independently of the library: the oracle of the fuzz.
def _real(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _valid(name: str, v: Any) -> bool:
    if name == "reduce":
        return isinstance(v, str) and v in ("sum", "mean")
    if name == "target":
        return (
            (isinstance(v, str) and v in ("logprobs", "probs"))
            or isinstance(v, rg.Field)
            or (
                isinstance(v, tuple)
                and len(v) == 2
                and isinstance(v[0], str)
                and v[0] == "field"
                and isinstance(v[1], str)
                and v[1] != ""
            )
        )
    if name == "center":
        return v is None or (isinstance(v, str) and v == "mean") or _real(v)
    if name == "clip":
        if v is None:
            return True
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            return False
        lo, hi = v
        if not all(b is None or _real(b) for b in (lo, hi)) or (lo is None and hi is None):
            return False
        return lo is None or hi is None or float(lo) <= float(hi)
    raise AssertionError(name)


def _check_message(exc: BaseException, options: dict[str, Any]) -> None:
    msg = str(exc)
    bad = [n for n, v in options.items() if not _valid(n, v)]
    assert any(n in msg for n in bad), f"message {msg!r} names none of the bad options {bad}"


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("cls", [rg.L1, rg.L2])
def test_fuzz_constructor_options(bk: Harness, cls: type[rg.Regularizer]) -> None:
    names = ("target", "reduce") + (("center", "clip") if cls is rg.L2 else ())
    seen: set[str] = set()

    @FUZZ
    @given(options=_option_dicts(names))
    def case(options: dict[str, Any]) -> None:
        seen.add(repr(sorted(options.items(), key=lambda kv: kv[0])))
        valid = all(_valid(n, v) for n, v in options.items())
        try:
            reg = cls(**options)
        except ALLOWED as exc:
            # The outcome is a result *or* an error, so pytest.raises does not fit here.
            assert not valid, f"{cls.__name__}(**{options!r}) rejected: {exc!r}"  # noqa: PT017
            _check_message(exc, options)
            return
        assert valid, f"{cls.__name__}(**{options!r}) accepted an invalid option"
        # Accepted options are normalized: equal to, and hashing like, a rebuilt copy.
        again = cls(**reg.options())
        assert again == reg
        assert hash(again) == hash(reg)
        assert repr(again) == repr(reg)

    case()
    _record(f"{cls.__name__} constructor", seen)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"reduce": True}, "reduce"),
        ({"reduce": "Sum"}, "reduce"),
        ({"reduce": "avg"}, "reduce"),
        ({"center": True}, "center"),
        ({"center": np.bool_(False)}, "center"),
        ({"center": float("nan")}, "center"),
        ({"center": -math.inf}, "center"),
        ({"center": 10**400}, "center"),
        ({"center": np.array(1.0)}, "center"),
        ({"center": "median"}, "center"),
        ({"clip": (0.0, float("nan"))}, "clip"),
        ({"clip": (-math.inf, 0.0)}, "clip"),
        ({"clip": (False, 1.0)}, "clip"),
        ({"clip": 5.0}, "clip"),
        ({"clip": (1.0,)}, "clip"),
        ({"clip": (0.0, 1.0, 2.0)}, "clip"),
        ({"clip": (0.0, -1.0)}, "clip"),
        ({"clip": (10**400, None)}, "clip"),
        ({"clip": "(0, 1)"}, "clip"),
        ({"target": "logprob"}, "target"),
        ({"target": ("field", "")}, "target"),
        ({"target": ("field", 3)}, "target"),
        ({"target": ["field", "w"]}, "target"),
        ({"mask": True}, "mask"),
        ({"mask": "w"}, "mask"),
        # found by the fuzz: a tuple whose first item is an array compared it to "field"
        ({"target": (np.array([1.0, 2.0]), None)}, "target"),
        ({"target": (np.array(["field", "x"]), "w")}, "target"),
    ],
)
def test_misleading_options_rejected(bk: Harness, options: dict[str, Any], named: str) -> None:
    """Options that would silently mislead fail at construction, naming the option."""
    with pytest.raises((ValueError, TypeError)) as info:
        rg.L2(**options)
    assert named in str(info.value)


@pytest.mark.backends("numpy")
def test_tuple_of_mask_arrays_is_a_mask_not_a_field(bk: Harness) -> None:
    """A pair (array, array) is a mask for a two-datum batch, never mistaken for a Field."""
    m = (np.array([1.0, 0.0]), np.array([1.0]))
    value, _ = rg.L1(mask=m)([np.array([-2.0, -5.0]), np.array([-1.0])])
    assert float(value) == 3.0
    with pytest.raises(TypeError, match=r"mask\[1\] must be an array"):
        rg.L1(mask=(np.array([1.0]), "w"))(np.array([-1.0]))


# ---- calls -----------------------------------------------------------------------------
class Datum:
    def __init__(self, inputs: Any) -> None:
        self.loss_fn_inputs = inputs


def _arrays(bk: Harness) -> st.SearchStrategy[Any]:
    """Arrays of every dtype kind, 0-d included, of this backend and of NumPy."""

    def build(shape: tuple[int, ...], kind: str, lib: str) -> Any:
        base = np.linspace(-3.0, 2.0, int(np.prod(shape))).reshape(shape)
        a = {
            "f64": base,
            "f32": base.astype(np.float32),
            "f16": base.astype(np.float16),
            "int": base.astype(np.int64),
            "bool": base > 0,
            "complex": base + 1j,
        }[kind]
        return a if lib == "numpy" else bk.asarray(a)

    return st.builds(
        build,
        st.sampled_from([(), (0,), (3,), (2, 2), (1, 3)]),
        st.sampled_from(["f64", "f32", "f16", "int", "bool", "complex"]),
        st.sampled_from(["numpy", "own"]),
    )


def _things(bk: Harness) -> st.SearchStrategy[Any]:
    arrays = _arrays(bk)
    leaf = st.one_of(
        arrays,
        _scalars(),
        st.just([]),
        st.just(()),
        # within float32's range: a list field is read in the compute dtype
        st.lists(
            st.one_of(st.floats(-1e30, 1e30), st.sampled_from([np.nan, np.inf, -np.inf, 65520.0])),
            max_size=3,
        ),
    )
    return st.one_of(
        leaf,
        st.lists(st.one_of(arrays, leaf), max_size=3),
        st.lists(arrays, min_size=1, max_size=3).map(tuple),
    )


def _data(bk: Harness) -> st.SearchStrategy[Any]:
    things = _things(bk)
    mapping = st.dictionaries(
        st.sampled_from(["weights", "w", "target_tokens"]), things, max_size=2
    )
    return st.one_of(
        st.none(),
        mapping,
        st.lists(mapping.map(Datum), max_size=3),
        st.lists(st.one_of(st.just(object()), st.just({"w": 1})), min_size=1, max_size=2),
        things,
    )


def _regs() -> st.SearchStrategy[rg.Regularizer]:
    target = st.sampled_from(["logprobs", "probs", rg.Field("weights"), ("field", "w")])
    reduce = st.sampled_from(["sum", "mean"])
    return st.one_of(
        st.builds(rg.L1, target=target, reduce=reduce),
        st.builds(
            rg.L2,
            target=target,
            reduce=reduce,
            center=st.sampled_from([None, "mean", 0.5, -100.0]),
            clip=st.sampled_from([None, (-100.0, 0.0), (None, 1.0), (-1e300, 1e300)]),
        ),
    )


def _float(a: Any) -> float:
    return float(a.detach()) if hasattr(a, "detach") else float(a)


def _is_float_array(a: Any) -> bool:
    dt = str(getattr(a, "dtype", ""))
    return hasattr(a, "shape") and "float" in dt and "complex" not in dt


def _flat64(bk: Harness, x: Any) -> np.ndarray:
    parts = x if isinstance(x, (list, tuple)) else [x]
    return np.concatenate([_host64(p).reshape(-1) for p in parts])


def _host64(a: Any) -> np.ndarray:
    """A float64 NumPy copy (a tensor on a GPU is copied to the host first)."""
    return np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)


def _expected_ok(
    bk: Harness, reg: rg.Regularizer, data: Any, logprobs: Any, mask: Any
) -> np.ndarray | None:
    """The flat float64 target of a well-formed call, or None if the call is ill-formed."""
    arrays = list(logprobs) if isinstance(logprobs, (list, tuple)) else [logprobs]
    if not arrays or not all(_is_float_array(a) for a in arrays):
        return None
    if len({type(a) for a in arrays}) != 1:
        return None
    well_formed_data = (
        data is None
        or isinstance(data, dict)
        or (isinstance(data, list) and data and all(isinstance(d, Datum) for d in data))
    )
    if not well_formed_data:  # data of the wrong kind is a TypeError, whatever reads it
        return None
    if isinstance(reg.target, rg.Field) or mask is not None:
        return None  # field and mask reads are checked by the typed-error property only
    return _flat64(bk, logprobs)


@pytest.mark.backends("numpy", "torch")
def test_fuzz_calls(bk: Harness) -> None:
    """Arbitrary data, logprobs and masks: a correct result or a typed, named error."""
    seen: set[str] = set()
    names = (
        "logprobs",
        "data",
        "mask",
        "Field",
        "target",
        "dtype",
        "library",
        "array",
        "empty",
        "shape",
        "key",
        "datum",
        "loss_fn_inputs",
    )

    @FUZZ
    @given(
        reg=_regs(),
        data=_data(bk),
        logprobs=_things(bk),
        mask=st.one_of(st.none(), st.none(), _things(bk), st.just(rg.Field("w"))),
        how=st.sampled_from(["compute", "value_and_grad"]),
    )
    def case(reg: rg.Regularizer, data: Any, logprobs: Any, mask: Any, how: str) -> None:
        seen.add(repr((reg, data, logprobs, mask, how)))
        kwargs = {} if mask is None else {"mask": mask}
        try:
            out = (
                reg.compute(data, logprobs, **kwargs)
                if how == "compute"
                else reg.value_and_grad(data, logprobs, **kwargs)
            )
        except ALLOWED as exc:
            msg = str(exc)
            assert any(n in msg for n in names), f"unhelpful message {msg!r}"
            well_formed = _expected_ok(bk, reg, data, logprobs, mask) is not None
            assert not well_formed, f"a well-formed call raised {msg!r}"
            return
        value, metrics = out[0], out[1]
        assert tuple(value.shape) == ()
        assert all(tuple(m.shape) == () for m in metrics.values())
        flat = _expected_ok(bk, reg, data, logprobs, mask)
        if flat is None:
            return  # accepted field/mask calls: typed outputs checked above
        # Inputs accepted: they must have been real floating arrays of one library.
        want_value, want_metrics, _ = reference(reg, flat)
        got = _float(value)
        rtol = (
            1e-2
            if any(
                "16" in str(a.dtype) or "32" in str(a.dtype)
                for a in (logprobs if isinstance(logprobs, (list, tuple)) else [logprobs])
            )
            else 1e-9
        )
        np.testing.assert_allclose(got, want_value, rtol=rtol, atol=1e-3)
        for k, v in want_metrics.items():
            np.testing.assert_allclose(_float(metrics[k]), v, rtol=rtol, atol=1e-3)

    case()
    _record(f"calls [{bk.name}]", seen)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize(
    ("call", "exc", "named"),
    [
        (lambda: rg.L1()(np.array([1, 2])), TypeError, "dtype"),
        (lambda: rg.L1()(np.array([1j])), TypeError, "dtype"),
        (lambda: rg.L1()(np.array([True])), TypeError, "dtype"),
        (lambda: rg.L1()(np.array(["a"])), TypeError, "dtype"),
        (lambda: rg.L1()(1.0), TypeError, "logprobs"),
        (lambda: rg.L1()(None), TypeError, "logprobs"),
        (lambda: rg.L1()("abc"), TypeError, "logprobs"),
        (lambda: rg.L1()([]), ValueError, "at least one array"),
        (lambda: rg.L1()([[np.zeros(2)]]), TypeError, "logprobs[0]"),
        (lambda: rg.L1()(np.zeros(2), mask=np.array(["a", "b"])), TypeError, "mask"),
        (lambda: rg.L1()(np.zeros(2), mask=np.array([1.0, None], dtype=object)), TypeError, "mask"),
        (lambda: rg.L1()(np.zeros(2), mask=np.ones(3)), ValueError, "mask shape"),
        (lambda: rg.L1()(np.zeros(2), mask=np.ones((2, 1))), ValueError, "mask shape"),
        (lambda: rg.L1(target=rg.Field("w"))(np.zeros(2)), ValueError, "'w'"),
        (
            lambda: rg.L1(target=rg.Field("w"))(np.zeros(2), data={"x": np.zeros(2)}),
            KeyError,
            "'w'",
        ),
        (lambda: rg.L1(target=rg.Field("w"))(np.zeros(2), data={"w": []}), ValueError, "'w'"),
        (lambda: rg.L1(target=rg.Field("w"))(np.zeros(2), data=[Datum({"x": 1})]), KeyError, "'w'"),
        (
            lambda: rg.L1(target=rg.Field("w"))(np.zeros(2), data=[object()]),
            TypeError,
            "loss_fn_inputs",
        ),
        (lambda: rg.L1(target=rg.Field("w"))(np.zeros(2), data=5), TypeError, "data"),
        (lambda: rg.L1(mask=rg.Field("w"))(np.zeros(2), data={"w": "ab"}), TypeError, "'w'"),
    ],
)
def test_call_errors_named(bk: Harness, call: Any, exc: type[Exception], named: str) -> None:
    """Regressions the fuzz found or guards: each a typed error naming the argument."""
    with pytest.raises(exc) as info:
        call()
    assert named in str(info.value)


@pytest.mark.backends("numpy")
def test_list_field_read_in_compute_dtype(bk: Harness) -> None:
    """Found by the fuzz: a list field beside float16 logprobs was cast to float16 (65520
    became inf, with an overflow warning); it is read in the float32 compute dtype."""
    value, _ = rg.L1(target=rg.Field("w")).compute(
        {"w": [65520.0, -1.0]}, np.zeros(2, dtype=np.float16)
    )
    assert value.dtype == np.float32
    assert float(value) == 65521.0


@pytest.mark.backends("numpy")
def test_out_of_range_bounds_no_overflowing_cast(bk: Harness) -> None:
    """A finite clip bound or center beyond float32's range is not an overflowing cast
    (a RuntimeWarning, hence an error under this suite's filterwarnings)."""
    x = np.array([-np.inf, -1.0, 2.0], dtype=np.float32)
    with np.errstate(over="ignore"):  # the square of -3.4e38 overflows: the data's doing
        value, _ = rg.L2(clip=(-1e300, 1e300))(x)
    assert value.dtype == np.float32
    assert np.isposinf(value)  # clip to the largest float32, then the square overflows
    with np.errstate(over="ignore"):
        value, _ = rg.L2(center=1e300)(np.array([1.0], dtype=np.float32))
    assert np.isposinf(value)
    value, _ = rg.L2(clip=(-1e300, 0.0))(np.array([-1.0, 0.5], dtype=np.float32))
    assert float(value) == 1.0
