"""Nothing a caller passes in is changed: bit for bit, on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S

Harness = Any
REGS = [
    rg.L1(),
    rg.L1(target="probs", reduce="mean"),
    rg.L2(center="mean", clip=(-100.0, 0.0)),
    rg.L2(center=-1.0, reduce="mean"),
]


PIPE = rg.Pipeline(
    [rg.Term(r, 0.5, name=f"t{i}") for i, r in enumerate(REGS)]
    + [rg.Term(rg.L1(mask=rg.Field("weights")), 1.0, name="masked")],
    track_grad_norms=True,
    metrics="array",
)


def bits(a: np.ndarray) -> bytes:
    """The exact bytes (NaN payloads and signed zeros included)."""
    return np.ascontiguousarray(a).tobytes() + str((a.dtype, a.shape)).encode()


@st.composite
def with_specials(draw: st.DrawFn) -> np.ndarray:
    x = draw(S.arrays(max_dims=1))
    specials = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, -0.0]), max_size=3))
    return np.concatenate([x, np.asarray(specials, dtype=x.dtype)])


@given(x=with_specials(), data=st.data())
def test_inputs_are_bit_identical_afterwards(
    bk: Harness, x: np.ndarray, data: st.DataObject
) -> None:
    mask = data.draw(S.masks_for(x), label="mask")
    weights = data.draw(S.masks_for([x, x]), label="weights")
    lp, m = bk.asarray(x), bk.asarray(mask)
    lps = bk.asarray([x, x])
    fields = {"weights": bk.asarray(weights)}
    before = [bits(bk.to_numpy(a)) for a in (lp, m, *lps, *fields["weights"])]
    for reg in REGS:
        bk.call(lambda a, b, r=reg: r.compute(None, a, mask=b), lp, m)
        bk.call(lambda a, b, r=reg: r.value_and_grad(None, a, mask=b), lp, m)
        with bk.flags():
            type(reg)(**{**reg.options(), "mask": rg.Field("weights")}).value_and_grad(fields, lps)
    bk.call(lambda f, a: PIPE(f, a), fields, lps)
    after = [bits(bk.to_numpy(a)) for a in (lp, m, *lps, *fields["weights"])]
    assert before == after


@pytest.mark.backends("numpy")
def test_read_only_numpy_arrays_work(bk: Harness) -> None:
    x = np.array([-3.0, -0.5, 0.0, -np.inf])
    mask = np.array([1, 1, 0, 1])
    for a in (x, mask):
        a.flags.writeable = False
    for reg in REGS:
        value, metrics, grad = reg.value_and_grad(None, [x, x], mask=[mask, mask])
        want, want_metrics, want_grad = reg.value_and_grad(
            None, [x.copy(), x.copy()], mask=[mask.copy(), mask.copy()]
        )
        np.testing.assert_array_equal(value, want)
        assert rg.to_floats(metrics) == pytest.approx(rg.to_floats(want_metrics), nan_ok=True)
        for g, w in zip(grad, want_grad, strict=True):
            np.testing.assert_array_equal(g, w)
            assert g.flags.writeable  # ours to hand back, not a view of x
    assert not x.flags.writeable
    assert not mask.flags.writeable


@pytest.mark.backends("torch")
def test_torch_requires_grad_and_grad_untouched(bk: Harness) -> None:
    import torch

    fresh = torch.tensor([-2.0, 0.0, -150.0], requires_grad=True)
    used = torch.tensor([[-1.0, -4.0]], requires_grad=True)
    used.grad = torch.tensor([[7.0, 8.0]])
    frozen = torch.tensor([-1.0, -2.0])
    for reg in REGS:
        reg.compute(None, [fresh, used])
        reg.value_and_grad(None, [fresh, used])
        reg.compute(None, frozen)
    tracked = rg.Pipeline(
        [rg.Term(r, 1.0, name=f"t{i}") for i, r in enumerate(REGS)]
        + [rg.Term(lambda d, lp: sum((a**2).sum() for a in lp), 1.0, name="sq")],
        track_grad_norms=True,
    )
    tracked(None, [fresh, used])  # grad norms by closed form and by torch autograd
    assert fresh.requires_grad
    assert used.requires_grad
    assert not frozen.requires_grad
    assert fresh.grad is None
    assert used.grad.tolist() == [[7.0, 8.0]]
    assert fresh.tolist() == [-2.0, 0.0, -150.0]
    assert used.tolist() == [[-1.0, -4.0]]
