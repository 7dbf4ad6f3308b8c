"""SPEC section 9: ``rg.Orthogonality`` is Keras 3's ``OrthogonalRegularizer`` up to its factor.

Runs in the ``tests-keras`` session only (``--keras``, with ``KERAS_BACKEND=torch``), where
keras is installed: ``factor * Orthogonality(mode=mode)(W)`` equals
``keras.regularizers.OrthogonalRegularizer(factor, mode)(W)`` on the same 2-D ``W`` with at
least two rows (columns), zero rows included, given to Keras as a backend tensor (and, for
rows, as a NumPy array).
"""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

Harness = Any


@st.composite
def matrices(draw: st.DrawFn, mode: str) -> np.ndarray:
    """A 2-D matrix with >= 2 rows (columns); entries 0 or of magnitude >= 2⁻¹⁰, so every
    nonzero row is far longer than Keras's epsilon of 1e-7."""
    vectors, size = draw(st.integers(2, 6)), draw(st.integers(1, 6))
    values = st.floats(-4.0, 4.0, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0**-10)
    w = draw(hnp.arrays(np.float64, (vectors, size), elements=values))
    w[draw(st.lists(st.integers(0, vectors - 1), max_size=2))] = 0.0  # zero rows too
    return w if mode == "rows" else w.T


def keras_value(reg: Any, w: Any) -> float:
    # float() of the backend's 0-d tensor (keras.ops.convert_to_numpy warns under NumPy 2)
    return float(reg(w))


@pytest.mark.backends("torch")
@pytest.mark.parametrize("mode", ["rows", "columns"])
@given(data=st.data(), factor=st.sampled_from([0.01, 1.0, 0.3]))
def test_orthogonality_equals_keras_orthogonal_regularizer_over_its_factor(
    bk: Harness, mode: str, data: st.DataObject, factor: float
) -> None:
    w = data.draw(matrices(mode), label="w")
    ours = bk.float(rg.Orthogonality(mode=mode)(bk.asarray(w))[0])
    theirs = keras.regularizers.OrthogonalRegularizer(factor=factor, mode=mode)
    # Keras's own NumPy-input path normalizes along axis -1 when asked for axis 0 (its
    # ``normalize`` does ``axis = axis or -1``), so columns are compared on a tensor only.
    inputs = [keras.ops.convert_to_tensor(w)] + ([w] if mode == "rows" else [])
    for given_to_keras in inputs:
        # Keras rounds parts of its computation to float32 (its factor is a float32 tensor):
        # cosines of about 1e-7 each, in absolute terms, per unit of factor
        np.testing.assert_allclose(
            factor * ours, keras_value(theirs, given_to_keras), rtol=1e-6, atol=1e-6 * factor
        )


@pytest.mark.backends("torch")
def test_the_docstring_example(bk: Harness) -> None:
    w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    theirs = keras_value(keras.regularizers.OrthogonalRegularizer(factor=0.01), w)
    ours = bk.float(rg.Orthogonality()(bk.asarray(w))[0])
    np.testing.assert_allclose(0.01 * ours, theirs, rtol=1e-6)  # Keras holds factor in float32
    np.testing.assert_allclose(ours, np.sqrt(2.0) / 3.0, rtol=1e-12)
