"""torch autograd through the built-ins' closed forms (``_fastpath/torch_autograd.py``).

Every property of ``test_properties.py`` already checks, on every drawn case, that the routed
gradient equals the closed form's. Here: that the route is taken for every built-in with a
closed form (one ``ClosedForm`` node; a ``Field`` target has its own gradient and is
recorded as written), that second derivatives
(``create_graph=True``) equal the generic path's, and what stays on the generic path (a
differentiable reference, a user's class)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg
from regularizers.testing import generic_path

from . import strategies as S
from .test_properties import CLASSES, convert, flat64, kwargs

pytestmark = pytest.mark.backends("torch")
Harness = Any
CLOSED = [c for c in CLASSES if c.evaluate_with_grad is not rg.Regularizer.evaluate_with_grad]


def _leaves(torch: Any, x: Any) -> Any:
    if isinstance(x, list):
        return [a.detach().clone().requires_grad_(True) for a in x]
    return x.detach().clone().requires_grad_(True)


def _flat(torch: Any, grads: Any) -> np.ndarray:
    parts = grads if isinstance(grads, (list, tuple)) else [grads]
    return flat64([p.detach().cpu().numpy() for p in parts])


@pytest.mark.parametrize("cls", CLOSED, ids=[c.__name__ for c in CLOSED])
@given(data=st.data())
def test_the_route_is_taken_and_second_derivatives_are_exact(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    import torch

    case = data.draw(S.cases(cls), label="case")
    x, d, m = convert(bk, case, "float64")
    leaves = _leaves(torch, x)
    inputs = leaves if isinstance(leaves, list) else [leaves]
    value, _ = case.reg.compute(d, leaves, **kwargs(m))
    assert value.grad_fn is not None
    routed = value.grad_fn.name() == "ClosedFormBackward"
    field_target = isinstance(getattr(case.reg, "target", None), rg.Field)
    assert routed == (not field_target), "one closed-form node, but for a Field target"

    def second(routed: bool) -> np.ndarray:
        with generic_path() if not routed else contextlib.nullcontext():
            v, _ = case.reg.compute(d, leaves, **kwargs(m))
            g = torch.autograd.grad(v, inputs, create_graph=True, allow_unused=True)
        s = sum(gi.sum() for gi in g if gi is not None and gi.requires_grad)
        if not isinstance(s, torch.Tensor):  # a gradient constant in the input
            return np.zeros(sum(a.numel() for a in inputs))
        h = torch.autograd.grad(s, inputs, allow_unused=True)
        return _flat(
            torch,
            [torch.zeros_like(a) if hi is None else hi for a, hi in zip(inputs, h, strict=True)],
        )

    np.testing.assert_allclose(second(True), second(False), rtol=1e-9, atol=1e-12)


def test_a_reference_that_requires_grad_gets_its_gradient(bk: Harness) -> None:
    """Distillation with a trainable teacher, or a consistency between two trained views: the
    closed form is w.r.t. logprobs only, so autograd records the generic path."""
    import torch

    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    for reg in (rg.KL(rg.Field("r")), rg.Consistency(rg.Field("r"), metric="kl")):
        value, _ = reg.compute({"r": r}, z)
        assert value.grad_fn.name() != "ClosedFormBackward"
        gz, gr = torch.autograd.grad(value, [z, r])
        with generic_path():
            want = torch.autograd.grad(reg.compute({"r": r}, z)[0], [z, r])
        torch.testing.assert_close(gz, want[0])
        torch.testing.assert_close(gr, want[1])
        assert float(gr.abs().sum()) > 0


def test_a_users_class_is_recorded_as_written(bk: Harness) -> None:
    """The kit checks a user's evaluate_with_grad against autograd: autograd must not use it."""
    import torch

    class Doubled(rg.Entropy):  # a subclass may change the maths: never routed
        pass

    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert rg.Entropy().compute(None, x)[0].grad_fn.name() == "ClosedFormBackward"
    value, _ = Doubled().compute(None, x)
    assert value.grad_fn.name() != "ClosedFormBackward"


def test_no_grad_and_inputs_without_grad_record_nothing(bk: Harness) -> None:
    import torch

    x = torch.randn(5, 7, requires_grad=True)
    with torch.no_grad():
        value, _ = rg.Entropy().compute(None, x)
    assert value.grad_fn is None
    assert not value.requires_grad
    value, _ = rg.Entropy().compute(None, x.detach())
    assert value.grad_fn is None


def test_torch_func_transforms_record_the_generic_path(bk: Harness) -> None:
    """torch.func.grad, vmap and jacrev work as before the route (they cannot see through a
    Function that computes outside autograd), and give the closed form's numbers."""
    import torch

    x = torch.randn(6, 5, dtype=torch.float64)
    for reg in (rg.L2(center="mean"), rg.Entropy(), rg.Huber()):
        want = reg.value_and_grad(None, x)[2]
        got = torch.func.grad(lambda a, reg=reg: reg(a)[0])(x)
        torch.testing.assert_close(got, want)
        if isinstance(reg, rg.L2):  # (vmap cannot batch the boolean-mask indexing of others)
            rows = torch.func.vmap(lambda a, reg=reg: reg(a)[0])(x)
            torch.testing.assert_close(rows, torch.stack([reg(r)[0] for r in x]))
        jac = torch.func.jacrev(lambda a, reg=reg: reg(a)[0])(x)
        torch.testing.assert_close(jac, want)
