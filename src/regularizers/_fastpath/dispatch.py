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

:func:`try_route` is the training path's counterpart: on torch tensors that require grad, a
built-in with a closed form is recorded by autograd as one node whose backward is that closed
form (``torch_autograd``), with fused kernels where ``torch_fused.GRAD`` has one;
:func:`try_autograd` serves ``value_and_grad`` on torch tensors by the same kernels (run
forward, then backward with a scale of 1; recorded as that node where they require grad),
and :func:`try_jax` gives JAX the closed form as a ``jax.custom_jvp`` (``jax_closed_form``).
On NumPy, ``value_and_grad`` takes :func:`try_small_value_and_grad` before any Batch is
made (``numpy_direct``: the whole call in whole-array NumPy, fields of ``data`` and a Field
mask included), then :func:`try_value_and_grad` (``numpy_blocked``'s kernels on a prepared
Batch); a Pipeline's terms take :func:`try_terms_value_and_grad`.

``disabled()`` turns fast paths off in the current context (thread- and task-local), which is
how the tests and benchmarks reach the generic path.
"""

from __future__ import annotations

import sys
from typing import Any

from .._core import registry
from .common import ENABLED, disabled

__all__ = [
    "disabled",
    "prepare_options",
    "try_autograd",
    "try_compute",
    "try_jax",
    "try_route",
    "try_route_terms",
    "try_small_value_and_grad",
    "try_terms_value_and_grad",
    "try_value_and_grad",
]

_PACKAGE = __name__.rsplit(".", 2)[0]  # "regularizers", or the vendored copy's name


def _torch_compiling() -> bool:
    torch = sys.modules.get("torch")  # no import: a torch-free program never pays for it
    return torch is not None and bool(torch.compiler.is_compiling())


def try_compute(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` by a native path, or None where none applies.

    Which path applies to arrays of a module depends only on ``reg``'s class and options:
    found once per module and kept on ``reg`` (``_fast``, a cache of an immutable object),
    so that a call on a small array pays a dict lookup, not the checks (L1 on 1e3 NumPy
    elements: 3.5 us a call against 3.2, the native code's 1.9)."""
    if _torch_compiling():  # before anything Dynamo cannot trace (ContextVar.get)
        return None
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    module = type(first).__module__
    cache = getattr(reg, "_fast", None)  # (None: a subclass that did not run __init__)
    fast: Any = _UNKNOWN if cache is None else cache.get(module, _UNKNOWN)
    if fast is _UNKNOWN:
        fast = _fast_for(reg, module)
        if cache is not None:
            cache[module] = fast
    if fast is None or not ENABLED.get():
        return None
    return fast(reg, logprobs)  # type: ignore[no-any-return]


_UNKNOWN = object()


def _fast_for(reg: Any, module: str) -> Any:
    """The fast path of ``reg`` for arrays of ``module``, or None (see :func:`try_compute`)."""
    if not _builtin(reg):
        return None
    o = reg._opts
    if o["mask"] is not None or o["reduce"] not in ("sum", "mean"):
        return None
    if o["target"] != "logprobs" and o["target"] != "probs":  # a Field reads data: generic
        return None
    native = _NATIVE.get(module)
    if native is None:
        native = _load(module)
    return None if native is None else native.get(reg.name)


# torch.Tensor and nn.Parameter (weights regularized as they are): the route's tensor types
_TORCH_MODULES = ("torch", "torch.nn.parameter")


def _routable(reg: Any) -> bool:
    if not _builtin(reg):
        return False
    return bool(reg.has_closed_form_grad) and ENABLED.get()


def try_route(
    reg: Any, data: object, logprobs: Any, mask: Any, counts: Any, call: str
) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` of a call on torch tensors by ``reg``'s kernels, recorded as one
    node whose backward is ``reg``'s closed form where a tensor needs a gradient
    (``torch_autograd``), or None: the generic path."""
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    if type(first).__module__ not in _TORCH_MODULES or _torch_compiling() or not _routable(reg):
        return None
    autograd, fused = _TORCH or _torch_modules()
    kernels = fused.GRAD
    if logprobs is first and counts is None and (data is None or type(data) is dict):
        # one tensor, no counts: the call that needs no Batch, where it applies
        plain = autograd.compute_flat([(reg, mask)], first, kernels, data)
        if plain is not None:
            return plain[0]  # type: ignore[no-any-return]
    got = autograd.compute([(reg, mask)], data, logprobs, counts, call, kernels)
    return None if got is None else got[0]


# [torch_autograd, torch_fused], imported on first use (they import torch); a function-level
# import costs ~1.7 us a call, as much as a small kernel
_TORCH: list[Any] = []


def _torch_modules() -> list[Any]:
    from . import torch_autograd, torch_fused

    _TORCH[:] = [torch_autograd, torch_fused]
    return _TORCH


def try_route_terms(
    terms: list[tuple[Any, Any]], data: object, logprobs: Any, counts: Any
) -> list[tuple[Any, dict[str, Any]]] | None:
    """:func:`try_route` for several elementwise terms over one input (a Pipeline's): one
    node for all of them, whose backward sums their closed forms and splits the gradient
    back per tensor once. None where any of them needs the generic path."""
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    if type(first).__module__ not in _TORCH_MODULES or _torch_compiling():
        return None
    if not all([_routable(reg) and reg.event_ndim == 0 for reg, _ in terms]):  # noqa: C419
        return None
    autograd, fused = _TORCH or _torch_modules()
    got: list[tuple[Any, dict[str, Any]]] | None = None
    if logprobs is first and counts is None and (data is None or type(data) is dict):
        got = autograd.compute_flat(terms, first, fused.GRAD, data)  # (no Batch: try_route)
    if got is None:
        got = autograd.compute(terms, data, logprobs, counts, "compute(data, logprobs)", fused.GRAD)
    return got


def prepare_options(reg: Any, logprobs: Any) -> dict[str, Any]:
    """What a native path adds to ``prepare`` for ``value_and_grad`` on ``logprobs``: on
    eager torch tensors of a built-in with a kernel, ``_whole`` (``torch_fused.all_valid``),
    as the training path's own ``prepare`` has it, so that both give the same numbers."""
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    if type(first).__module__ not in _TORCH_MODULES or _torch_compiling() or not _routable(reg):
        return {}
    autograd, fused = _TORCH or _torch_modules()
    return {} if autograd._functorch_active() else {"_whole": fused.all_valid}


def try_autograd(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
    """``(value, metrics, g)`` for ``value_and_grad`` on torch tensors by ``reg``'s kernel
    (``g`` its gradient w.r.t. ``batch.values``), the value differentiable through the
    closed form where the tensors require grad; or None: the generic path."""
    if type(batch.values).__module__ != "torch" or _torch_compiling() or not _routable(reg):
        return None
    got: tuple[Any, dict[str, Any], Any] | None
    got = (_TORCH or _torch_modules())[0].value_metrics_and_grad(reg, batch)
    return got


def try_jax(reg: Any, batch: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` of a built-in on JAX arrays whose ``jax.grad`` is its closed
    form (``jax_closed_form``), or None: the generic path."""
    if getattr(batch.xp, "__name__", "") != "jax.numpy":
        return None
    if not _builtin(reg):
        return None
    if not ENABLED.get():
        return None
    if not _JAX:
        from . import jax_closed_form

        _JAX.append(jax_closed_form)
    closed = _JAX[0]
    return closed.value_and_metrics(reg, batch) if closed.routed(reg) else None


_JAX: list[Any] = []  # [jax_closed_form], imported on first use (it imports JAX)


def try_value_and_grad(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
    """``(value, metrics, g)`` by a native blocked kernel (``g`` = d value / d
    ``batch.values``), or None: the penalty's own ``evaluate_with_grad`` runs.

    NumPy arrays only, for exactly a registered built-in with a kernel in
    ``numpy_blocked.GRAD``, on its ``"logprobs"`` or ``"probs"`` target, when ``reduce``
    aggregates with one weight (a kernel returns None otherwise)."""
    if type(batch.values) is not np_ndarray() or batch.event_ndim:
        return None
    if not _builtin(reg):
        return None
    target = reg._opts["target"]
    if (target != "logprobs" and target != "probs") or not ENABLED.get():
        return None
    got: tuple[Any, dict[str, Any], Any] | None
    got = (_NUMPY or _numpy_modules())[0].value_and_grad(reg, batch)
    return got


def try_small_value_and_grad(
    reg: Any, data: object, logprobs: Any
) -> tuple[Any, dict[str, Any], Any] | None:
    """``value_and_grad`` of NumPy arrays before any Batch is made (the call has no ``mask=``
    or ``counts=``; ``data`` may hold the fields the penalty reads): the whole call in
    whole-array NumPy (``numpy_direct``), or, for one small array without ``data``, L1 and
    L2 with any option (``numpy_blocked``). At small sizes the per-call overhead is the
    cost; on a ragged batch, the Batch's copies are."""
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    if type(first) is not np_ndarray():
        return None
    if not _builtin(reg):
        return None
    if not ENABLED.get():
        return None
    modules = _NUMPY or _numpy_modules()
    got: tuple[Any, dict[str, Any], Any] | None = None
    if data is None and logprobs is first and reg.name in _SMALL:  # the fewest calls
        got = modules[0].small_value_and_grad(reg, logprobs)
    return got or modules[1].value_and_grad(reg, data, logprobs)


_NUMPY: list[Any] = []
_SMALL = ("l1_sparsity", "l2_weight_decay")  # numpy_blocked.small_value_and_grad's


def _numpy_modules() -> list[Any]:
    """``[numpy_blocked, numpy_direct]``, imported on first use (they import NumPy)."""
    from . import numpy_blocked, numpy_direct

    _NUMPY[:] = [numpy_blocked, numpy_direct]
    return _NUMPY


def try_terms_value_and_grad(
    parts: list[tuple[str, Any, Any, str]], data: object, inputs: dict[str, Any], counts: Any
) -> tuple[dict[str, tuple[Any, dict[str, Any]]], dict[str, list[Any]]]:
    """A Pipeline's built-in terms over NumPy inputs by the blocked kernels, per input:
    ``(value, metrics)`` by term name and the gradient of their weighted sum per input (a
    list of arrays). Terms left out run as usual; so does everything on any error (the
    generic path then raises the named one)."""
    results: dict[str, tuple[Any, dict[str, Any]]] = {}
    grads: dict[str, list[Any]] = {}
    if not ENABLED.get():
        return results, grads
    ndarray = np_ndarray()
    groups: dict[str, list[tuple[str, Any, float]]] = {}
    for name, obj, weight, inp in parts:
        if weight is None:  # the base loss
            continue
        lp = inputs[inp]
        first = lp[0] if type(lp) in (list, tuple) and lp else lp
        if type(first) is not ndarray:
            continue
        if not _builtin(obj):
            continue
        if obj._opts["target"] != "logprobs":
            continue
        if type(weight) is ndarray and weight.ndim == 0:
            weight = float(weight)
        if not isinstance(weight, float):
            continue
        if obj.name in (_NUMPY or _numpy_modules())[0].GRAD:
            groups.setdefault(inp, []).append((name, obj, weight))
    for inp, group in groups.items():
        blocked, direct_ = _NUMPY or _numpy_modules()
        try:
            direct = None if counts is not None else direct_.terms(group, data, inputs[inp])
        except Exception:
            direct = None
        if direct is not None:  # the whole group from one flat copy, without a Batch
            results.update(direct[0])
            grads[inp] = direct[1]
            continue
        try:
            got = blocked.terms_value_and_grad(group, data, inputs[inp], counts)
        except Exception:
            continue
        if got is not None:
            results.update(got[0])
            grads[inp] = got[1]
    return results, grads


def np_ndarray() -> type:
    """``numpy.ndarray`` where NumPy is imported (it is, for a NumPy batch), else a type no
    array has."""
    numpy = sys.modules.get("numpy")
    return numpy.ndarray if numpy is not None else _Never


class _Never:
    pass


def np_scalar_types() -> frozenset[type]:
    """NumPy's array and float scalar types (NumPy is imported: the caller has its arrays)."""
    if not _NP_TYPES:
        import numpy

        _NP_TYPES.append(frozenset([numpy.ndarray, numpy.float16, numpy.float32, numpy.float64]))
    return _NP_TYPES[0]


def as_numpy_0d(v: Any) -> Any:
    """A NumPy float scalar or 0-d array as a 0-d array (``numpy.asarray``: no copy)."""
    return sys.modules["numpy"].asarray(v)


_NP_TYPES: list[frozenset[type]] = []


_BUILTIN: set[type] = set()
_OTHER: set[type] = set()


def _builtin(reg: Any) -> bool:
    """Exactly one of this package's registered built-in classes (not a subclass, which may
    change the maths); a set lookup after the first call per class."""
    cls = type(reg)
    return cls in _BUILTIN or (cls not in _OTHER and _is_builtin(cls))


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
