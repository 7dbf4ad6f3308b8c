"""SPEC section 5: bad input fails early, with a typed error that names what was wrong."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import regularizers as rg

Harness = Any


def raises(exc: type[Exception], *words: str) -> Any:
    """pytest.raises that also checks the message names each of ``words``."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


# ---- construction ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "exc", "words"),
    [
        (lambda: rg.L1(reduce="max"), ValueError, ["reduce", "'max'", "'sum'", "'mean'"]),
        (lambda: rg.L2(reduce="Sum"), ValueError, ["reduce", "'Sum'", "'sum'"]),
        (lambda: rg.L1(reduce=None), TypeError, ["reduce", "None"]),
        (lambda: rg.L2(clip=(0.0, -1.0)), ValueError, ["clip", "0.0", "-1.0", "lo <= hi"]),
        (lambda: rg.L2(clip=(0.0,)), TypeError, ["clip", "pair"]),
        (lambda: rg.L2(clip=-100.0), TypeError, ["clip", "-100.0", "pair"]),
        (lambda: rg.L2(clip=(float("nan"), 0.0)), ValueError, ["clip lo", "finite", "nan"]),
        (lambda: rg.L2(clip=(-100.0, float("inf"))), ValueError, ["clip hi", "finite", "inf"]),
        (lambda: rg.L2(clip=(True, 0.0)), TypeError, ["clip lo", "bool"]),
        (lambda: rg.L2(clip=(None, None)), ValueError, ["clip", "None", "clip=None"]),
        (lambda: rg.L2(center="median"), ValueError, ["center", "'median'", "'mean'"]),
        (lambda: rg.L2(center=True), TypeError, ["center", "bool"]),
        (lambda: rg.L2(center=float("nan")), ValueError, ["center", "finite"]),
        (lambda: rg.L2(center=[1.0]), TypeError, ["center", "list"]),
        (lambda: rg.L1(target="logits"), ValueError, ["target", "'logits'", "'probs'"]),
        (lambda: rg.L1(target=3), TypeError, ["target", "int"]),
        (lambda: rg.L1(target=("field", "")), TypeError, ["target", "key"]),
        (lambda: rg.Field(""), ValueError, ["Field", "non-empty"]),
        (lambda: rg.Field(3), TypeError, ["Field", "str", "int"]),
        (lambda: rg.L1(mask="weights"), TypeError, ["mask", "'weights'", "Field"]),
        (lambda: rg.L1(scale=2.0), TypeError, ["scale"]),
        (lambda: rg.L1("sum"), TypeError, ["positional"]),
    ],
)
def test_bad_option_is_rejected_at_construction(
    make: Any, exc: type[Exception], words: list[str]
) -> None:
    with raises(exc, *words):
        make()


def test_numpy_scalars_are_accepted_as_numbers() -> None:
    reg = rg.L2(center=np.float32(-1.5), clip=(np.float64(-100.0), np.int64(0)))
    assert reg == rg.L2(center=-1.5, clip=(-100.0, 0.0))
    assert type(reg.center) is float
    assert all(type(b) is float for b in reg.clip or ())


# ---- inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, "logprobs", None, {"x": 1}])
def test_non_array_input_is_a_type_error(bad: Any) -> None:
    with raises(
        TypeError, "logprobs", type(bad).__name__ if not isinstance(bad, list) else "float"
    ):
        rg.L1()(bad)


def test_non_float_dtypes_are_type_errors(bk: Harness) -> None:
    xp = bk.xp
    bad = [
        bk.call(lambda: xp.asarray([1, 2], dtype=xp.int32)),
        bk.call(lambda: xp.asarray([True, False])),
    ]
    if hasattr(xp, "complex64"):
        bad.append(bk.call(lambda: xp.asarray([1.0, 2.0], dtype=xp.complex64)))
    for x in bad:
        for reg in (rg.L1(), rg.L2()):
            with raises(TypeError, "logprobs", "dtype", str(x.dtype)):
                bk.call(lambda a, r=reg: r.compute(None, a), x)
            with raises(TypeError, "logprobs[1]", "dtype"):
                bk.call(
                    lambda a, b, r=reg: r.value_and_grad(None, [a, b]), bk.asarray(np.zeros(2)), x
                )


@pytest.mark.backends("torch", "jax", "array_api_strict", "dask")
def test_arrays_of_two_libraries_name_both(bk: Harness) -> None:
    x = bk.asarray(np.zeros(3))
    with raises(TypeError, "numpy", bk.library.split("_")[0]):
        rg.L1()([np.zeros(3), x])


def test_empty_list_needs_an_array(bk: Harness) -> None:
    with raises(ValueError, "at least one array"):
        rg.L1()([])
    with raises(ValueError, "at least one array"):
        rg.L2().value_and_grad(None, ())


def test_field_without_data_or_key(bk: Harness) -> None:
    x = bk.asarray(np.zeros(3))
    with raises(ValueError, "'weights'", "data is None"):
        rg.L1(target=rg.Field("weights"))(x)
    with raises(KeyError, "'weights'", "'advantages'", "'target_tokens'"):
        rg.L1(target=("field", "weights")).compute(
            {"advantages": np.zeros(3), "target_tokens": np.zeros(3)}, x
        )
    datums = [
        SimpleNamespace(loss_fn_inputs={"weights": np.ones(3)}),
        SimpleNamespace(loss_fn_inputs={"target_tokens": np.ones(3)}),
    ]
    with raises(KeyError, "data[1]", "'weights'", "'target_tokens'"):
        rg.L2(mask=rg.Field("weights")).compute(datums, [x, x])
    with raises(TypeError, "data[0]", "loss_fn_inputs"):
        rg.L1(target=rg.Field("weights")).compute([{"weights": np.ones(3)}], x)


def test_mask_of_the_wrong_shape(bk: Harness) -> None:
    x = bk.asarray(np.zeros((2, 3)))
    with raises(ValueError, "mask", "(3, 2)", "(2, 3)"):
        rg.L1()(x, mask=bk.asarray(np.ones((3, 2))))
    with raises(ValueError, "mask", "[(2,), (3,)]", "[(3,), (2,)]"):
        rg.L2()(bk.asarray([np.zeros(3), np.zeros(2)]), mask=bk.asarray([np.ones(2), np.ones(3)]))


def test_errors_are_never_bare_backend_errors(bk: Harness) -> None:
    """The mistakes above surface as our typed errors, not AttributeError/IndexError."""
    for bad in (object(), [object()], [bk.asarray(np.zeros(2)), 1.0]):
        with pytest.raises(TypeError) as info:
            rg.L2().value_and_grad(None, bad)
        assert "logprobs" in str(info.value)
