"""Configs: JSON-serializable, exact round trips, a registry for users' regularizers."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S

exact_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def any_regularizer(draw: st.DrawFn) -> rg.Regularizer:
    target = draw(st.sampled_from(["logprobs", "probs", rg.Field("advantages")]))
    mask = draw(st.sampled_from([None, rg.Field("weights")]))
    reduce = draw(st.sampled_from(["sum", "mean"]))
    if draw(st.booleans()):
        return rg.L1(target=target, reduce=reduce, mask=mask)
    center = draw(st.none() | st.just("mean") | exact_floats)
    clip = draw(
        st.none()
        | st.tuples(exact_floats, exact_floats).map(sorted).map(tuple)
        | st.tuples(st.none(), exact_floats)
        | S.clips()
    )
    return rg.L2(target=target, reduce=reduce, center=center, clip=clip, mask=mask)


def round_trip(obj: Any) -> Any:
    return rg.from_config(json.loads(json.dumps(obj.to_config())))


@pytest.mark.backends("numpy")  # pure Python: once is enough
@given(reg=any_regularizer())
def test_regularizer_round_trip_is_exact(bk: Any, reg: rg.Regularizer) -> None:
    back = round_trip(reg)
    assert back == reg
    assert type(back) is type(reg)
    assert repr(back) == repr(reg)
    for k, v in reg.options().items():  # floats bit for bit, not just close
        assert repr(getattr(back, k)) == repr(v), k


@pytest.mark.backends("numpy")
@given(
    regs=st.lists(any_regularizer(), min_size=1, max_size=3),
    weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=3, max_size=3),
    track=st.booleans(),
    metrics=st.sampled_from(["float", "array"]),
    base=st.none() | any_regularizer(),
)
def test_pipeline_round_trip_is_exact(
    bk: Any, regs: list[rg.Regularizer], weights: list[float], track: bool, metrics: Any, base: Any
) -> None:
    pipe = rg.Pipeline(
        [
            rg.Term(r, w, name=f"term_{i}")
            for i, (r, w) in enumerate(zip(regs, weights, strict=False))
        ],
        base_loss=base,
        track_grad_norms=track,
        metrics=metrics,
    )
    assert round_trip(pipe) == pipe


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'no_such_penalty'.*l1_sparsity.*l2_weight_decay.*name="):
        rg.from_config({"regularizer": "no_such_penalty", "options": {}})
    with pytest.raises(ValueError, match="'regularizer' key"):
        rg.from_config({"options": {}})
    with pytest.raises(TypeError, match="mapping"):
        rg.from_config("l1_sparsity")  # type: ignore[arg-type]


def test_what_cannot_go_in_a_config_says_so() -> None:
    with pytest.raises(TypeError, match="mask"):
        rg.L1(mask=np.ones(3)).to_config()
    with pytest.raises(TypeError, match="'mine'"):
        rg.Pipeline([rg.Term(lambda d, lp: lp, 1.0, name="mine")]).to_config()


def test_register_a_users_regularizer() -> None:
    class MaxAbs(rg.Regularizer):
        name: ClassVar[str] = "test_max_abs"

        def evaluate(self, batch: Any) -> Any:
            m = batch.max(batch.xp.abs(batch.values))
            return m, {"max_abs": m}

    with pytest.raises(TypeError, match="register"):
        MaxAbs().to_config()
    assert rg.register(MaxAbs) is MaxAbs
    reg = MaxAbs(reduce="mean", mask=rg.Field("weights"))
    assert round_trip(reg) == reg
    assert round_trip(rg.Pipeline([(reg, 0.5), (rg.L1(), 1.0)])).terms[0].regularizer == reg

    class Impostor(rg.Regularizer):
        name: ClassVar[str] = "test_max_abs"

    with pytest.raises(ValueError, match="already registered"):
        rg.register(Impostor)
    with pytest.raises(TypeError, match="subclass"):
        rg.register(dict)  # type: ignore[arg-type]
