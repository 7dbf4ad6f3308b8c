"""Hypothesis strategies: NumPy arrays (converted per backend by the harness) and options."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

import regularizers as rg

FLOATS = ("float32", "float64")


def elements(lo: float = -200.0, hi: float = 50.0) -> st.SearchStrategy[float]:
    # width=32: every drawn value is exact in float32 too, so dtypes see the same input.
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def arrays(
    draw: st.DrawFn,
    dtype: str | None = None,
    lo: float = -200.0,
    hi: float = 50.0,
    min_side: int = 0,
    max_dims: int = 2,
) -> np.ndarray:
    dt = dtype or draw(st.sampled_from(FLOATS))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=min_side, max_side=10))
    # Sprinkle the kinks: exact zeros, and values on and around the ADR's clip bounds.
    kinks = st.sampled_from([0.0, -0.0, -100.0, 0.0, 1.0, -1.0])
    return draw(hnp.arrays(dt, shape, elements=st.one_of(elements(lo, hi), kinks)))


@st.composite
def ragged(
    draw: st.DrawFn, dtype: str | None = None, lo: float = -200.0, hi: float = 50.0
) -> list[np.ndarray]:
    dt = dtype or draw(st.sampled_from(FLOATS))
    n = draw(st.integers(1, 4))
    return [draw(arrays(dt, lo, hi, max_dims=1)) for _ in range(n)]


def clips() -> st.SearchStrategy[Any]:
    bound = st.floats(-150.0, 20.0, width=32)
    return st.one_of(
        st.none(),
        st.just((-100.0, 0.0)),
        st.tuples(bound, bound).map(lambda p: (min(p), max(p))),
        st.tuples(st.none(), bound),
        st.tuples(bound, st.none()),
    )


def centers() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.just("mean"), st.floats(-50.0, 10.0, width=32))


@st.composite
def regularizers(
    draw: st.DrawFn,
    *,
    clip: bool = True,
    center: bool = True,
    probs: bool = False,
    kinds: tuple[str, ...] = ("l1", "l2"),
) -> rg.Regularizer:
    kind = draw(st.sampled_from(kinds))
    opts: dict[str, Any] = {"reduce": draw(st.sampled_from(["sum", "mean"]))}
    if probs:
        opts["target"] = draw(st.sampled_from(["logprobs", "probs"]))
    if kind == "l1":
        return rg.L1(**opts)
    if clip:
        opts["clip"] = draw(clips())
    if center:
        opts["center"] = draw(centers())
    return rg.L2(**opts)


def masks_for(x: Any) -> st.SearchStrategy[Any]:
    """A mask shaped like ``x`` (an array or a list of arrays): bool, 0/1 ints or floats."""
    if isinstance(x, list):
        return st.tuples(*[masks_for(a) for a in x]).map(list)
    return st.one_of(
        hnp.arrays(np.bool_, x.shape),
        hnp.arrays(np.float32, x.shape, elements=st.sampled_from([0.0, 1.0, 0.5])),
    )
