"""What the array API standard does not cover: autodiff, and cutting a value out of a graph.

The only module of the shared machinery that knows backends by name. Backends are imported
lazily, inside the functions, so ``import regularizers`` imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat

from .typing import Array, Namespace

__all__ = ["autodiff_grad", "has_autodiff", "stop_gradient"]


def has_autodiff(xp: Namespace) -> bool:
    return bool(array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp))


def autodiff_grad(xp: Namespace, fn: Callable[[Any], Array], logprobs: Any) -> Any:
    """The gradient of the scalar ``fn(logprobs)`` w.r.t. ``logprobs`` (array or list).

    On torch the function is re-run on detached leaves, so the caller's graph and ``.grad``
    are never touched; on JAX ``jax.grad`` is functional (and works under ``jit``).
    """
    if array_api_compat.is_torch_namespace(xp):
        import torch

        arrays = logprobs if isinstance(logprobs, (list, tuple)) else [logprobs]
        leaves = [a.detach().requires_grad_(True) for a in arrays]
        with torch.enable_grad():
            value = fn(leaves if isinstance(logprobs, (list, tuple)) else leaves[0])
            grads: Any = (
                [None] * len(leaves)  # a constant of the input: its gradient is 0
                if not value.requires_grad
                else torch.autograd.grad(value, leaves, allow_unused=True)
            )
        out = [
            torch.zeros_like(leaf) if g is None else g
            for leaf, g in zip(leaves, grads, strict=True)
        ]
        return out if isinstance(logprobs, (list, tuple)) else out[0]
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if isinstance(logprobs, tuple):
            logprobs = list(logprobs)
        return jax.grad(fn)(logprobs)
    raise TypeError(f"{xp.__name__} has no autodiff")


def stop_gradient(xp: Namespace, a: Array) -> Array:
    """``a`` as a constant for autodiff (metrics must not keep the caller's graph alive)."""
    if array_api_compat.is_torch_namespace(xp):
        return a.detach()
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(a)
    return a
