"""The one place that hands ``compute`` to a backend's native fast path.

Fast paths are keyed by class: a native module (``numpy_blocked``, ``torch_fused``) lists the
built-in classes it has a path for, by their registered name, in its ``FAST`` table, and a
path is taken only for exactly that registered built-in class (not a subclass, which may
change the maths). A class without an entry takes the generic path: nothing falls through
into another penalty's code.

A fast path serves value and metrics only (``compute``), with no mask, no ``counts``,
``reduce`` "sum" or "mean", and a ``"logprobs"`` or ``"probs"`` target, when the arrays are
plain NumPy arrays or torch tensors that need no gradient. Everything else, errors included,
takes the generic array API path. The spec suite (``test_fastpaths.py``) proves each fast
path equal to the generic path on Hypothesis-drawn inputs, kinks and non-finite values
included.

:func:`try_autograd` is the training path's counterpart: on torch tensors that require grad,
a built-in over a class axis or matrices with a closed form is recorded by autograd as one node
whose backward is that closed form (``torch_autograd``).

The JAX counterpart, :func:`try_jax`: on JAX arrays and tracers, the elementwise built-ins
with a closed form evaluate through a ``jax.custom_jvp`` whose JVP is that closed form, with
reductions formulated for XLA's CPU backend (``jax_closed_form``).

``disabled()`` turns fast paths off in the current context (thread- and task-local), which is
how the tests and benchmarks reach the generic path.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .._core import registry

__all__ = ["disabled", "try_autograd", "try_compute", "try_jax"]

ENABLED: ContextVar[bool] = ContextVar("regularizers_fastpath", default=True)
_PACKAGE = __name__.rsplit(".", 2)[0]  # "regularizers", or the vendored copy's name


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    token = ENABLED.set(False)
    try:
        yield
    finally:
        ENABLED.reset(token)


def _torch_compiling() -> bool:
    torch = sys.modules.get("torch")  # no import: a torch-free program never pays for it
    return torch is not None and bool(torch.compiler.is_compiling())


def try_compute(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` by a native path, or None where none applies."""
    if _torch_compiling():  # before anything Dynamo cannot trace (ContextVar.get)
        return None
    cls = type(reg)
    if cls not in _BUILTIN and (cls in _OTHER or not _is_builtin(cls)):
        return None
    if reg.mask is not None or reg.reduce not in ("sum", "mean") or not ENABLED.get():
        return None
    if reg.target != "logprobs" and reg.target != "probs":  # a Field reads data: generic
        return None
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    native = _NATIVE.get(type(first).__module__)
    if native is None:
        native = _load(type(first).__module__)
        if native is None:
            return None
    fast = native.get(reg.name)
    return None if fast is None else fast(reg, logprobs)


def try_autograd(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
    """``(value, metrics, g)`` with autograd through ``reg``'s closed form (``g`` its
    gradient w.r.t. ``batch.values``), or None: record the generic path."""
    if type(batch.values).__module__ != "torch" or _torch_compiling():
        return None
    if batch.event_ndim == 0:  # elementwise: autograd's few nodes measured faster than a node
        return None  # whose forward computes the gradient (fused kernels are to come)
    cls = type(reg)
    if cls not in _BUILTIN and (cls in _OTHER or not _is_builtin(cls)):
        return None
    if not reg.has_closed_form_grad or not ENABLED.get():
        return None
    from .torch_autograd import value_metrics_and_grad

    return value_metrics_and_grad(reg, batch)


def try_jax(reg: Any, batch: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` of a built-in on JAX arrays whose ``jax.grad`` is its closed
    form (``jax_closed_form``), or None: the generic path."""
    if getattr(batch.xp, "__name__", "") != "jax.numpy":
        return None
    cls = type(reg)
    if cls not in _BUILTIN and (cls in _OTHER or not _is_builtin(cls)):
        return None
    if not ENABLED.get():
        return None
    from .jax_closed_form import ROUTED, value_and_metrics

    return value_and_metrics(reg, batch) if reg.name in ROUTED else None


_BUILTIN: set[type] = set()
_OTHER: set[type] = set()


def _is_builtin(cls: type) -> bool:
    """A class of this package's own penalties, registered under its name (cached)."""
    ours = (
        cls.__module__.startswith(f"{_PACKAGE}.penalties.")
        and registry.lookup(getattr(cls, "name", "")) is cls
    )
    (_BUILTIN if ours else _OTHER).add(cls)
    return ours


_NATIVE: dict[str, dict[str, Any]] = {}


def _load(module: str) -> dict[str, Any] | None:
    """The fast-path table for arrays of ``module`` (imported once), or None."""
    if module == "numpy":
        from .numpy_blocked import FAST
    elif module == "torch":
        from .torch_fused import FAST
    else:
        return None
    _NATIVE[module] = FAST
    return FAST
