"""torch autograd through a built-in's closed form.

When a built-in over a class axis or matrices (``event_ndim`` 1 or 2) with a closed-form
gradient (``evaluate_with_grad``) is called on torch tensors that require grad (``compute``,
``reg(...)``, ``value_and_grad``, a Pipeline's terms), :func:`value_metrics_and_grad` computes
value, metrics and the gradient with respect to ``batch.values`` once, without recording
anything, and returns the value as the output of one :class:`ClosedForm` node.
``loss.backward()`` then multiplies the saved gradient by the incoming one: autograd keeps one
gradient-sized array instead of every temporary of the generic path (for a ``[T, V]`` penalty
over distributions, several ``[T, V]`` arrays), and the backward pass is the closed form, with
the documented conventions at the kinks.

What stays on the generic path (autograd records ``evaluate``):

- elementwise penalties (L1, L2, Huber, the sampled KL and entropy...): their generic
  recording is a few nodes over ``[n]`` arrays, which measured faster than this node on a
  Tinker-shaped batch (the node's forward computes the gradient even when no backward
  follows); fused kernels are the way to speed them up;
- another array the penalty reads (a ``Field`` reference, a second view) that itself
  requires grad: the closed form is a gradient with respect to ``logprobs`` only;
- ``torch.compile`` (Dynamo traces the generic path, ``fullgraph=True`` included) and the
  ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``);
- a subclass or a user's class (its ``evaluate_with_grad`` is checked against autograd by
  the conformance kit, which needs autograd to be independent of it);
- :func:`regularizers.testing.generic_path` (how the kit and the spec suite check the closed
  forms against an independent autograd).

Double backward works: with ``create_graph=True`` the backward differentiates the generic
path (recorded then, from the saved input), so second derivatives are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._core.typing import Array, Metrics

__all__ = ["ClosedForm", "value_metrics_and_grad"]


class ClosedForm(torch.autograd.Function):
    """``value`` as a function of ``values`` whose gradient is the saved ``g``."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        value: torch.Tensor,
        g: torch.Tensor,
        generic: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        ctx.save_for_backward(values, g)
        ctx.generic = generic
        return value.clone()  # (a 0-d copy: the output is this node's own tensor)

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        values, g = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable first derivative
            with torch.enable_grad():
                (dv,) = torch.autograd.grad(ctx.generic(values), values, go, create_graph=True)
            return dv, None, None, None
        return g * go.to(g.dtype), None, None, None


def _functorch_active() -> bool:
    """Inside ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``...), which record the
    generic path: this Function computes outside autograd, which they cannot see through."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _zero_uncounted(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``g`` with the rows of uncounted tokens set to 0: in place where ``g`` is a fresh
    array of its own (no second gradient-sized array), else by ``where``. Never ``g * mask``:
    what an uncounted token holds may be inf or NaN."""
    keep = mask.reshape((-1,) + (1,) * (g.ndim - 1))
    if g._base is None and g.is_contiguous() and g.ndim >= 1 and g.shape[0] == mask.shape[0]:
        return g.masked_fill_(~keep, 0)
    return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))


def value_metrics_and_grad(reg: Any, batch: Any) -> tuple[Array, Metrics, Array] | None:
    """``(value, metrics, g)`` whose value backpropagates through ``reg``'s closed form, with
    ``g`` = d value / d ``batch.values`` (a constant, uncounted tokens 0), or None where the
    generic path must be recorded (see the module docstring)."""
    values = batch.values
    if not (values.requires_grad and torch.is_grad_enabled()) or _functorch_active():
        return None
    watch: list[str] = []
    constant = batch.constant_values(values.detach(), watch)
    with torch.no_grad():
        value, metrics, g = reg.evaluate_with_grad(constant)
        if batch.mask is not None:  # tokens a penalty's valid_tokens excluded keep values
            g = _zero_uncounted(g, batch.mask)
    if watch:  # a Field it reads needs a gradient too
        return None

    def generic(v: torch.Tensor) -> torch.Tensor:
        return reg.evaluate(batch.constant_values(v, []))[0]  # type: ignore[no-any-return]

    out = ClosedForm.apply(values, value, g, generic)  # type: ignore[no-untyped-call]
    return out, metrics, g
