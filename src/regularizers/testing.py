"""A conformance kit: the generic properties every regularizer must have, yours included.

>>> import array_api_strict as xp
>>> import regularizers as rg
>>> from regularizers.testing import check_regularizer
>>> check_regularizer(rg.L2(center="mean"), xp)

:func:`check_regularizer` builds a few inputs in ``xp`` (one array, a batch of rows, a ragged
list; kinks at 0 included; a class axis or matrices where the regularizer's ``event_ndim``
asks for them) and checks, for each:

- ``compute`` returns a 0-d value of the input's namespace and device, finite on finite input;
- every metric is a 0-d array of that namespace and device;
- ``value_and_grad`` (if the regularizer has one) gives the value of ``compute`` and a gradient
  shaped like the input that equals **central finite differences in float64** (on every
  backend, NumPy, array-api-strict and Dask included) and the backend's autodiff through
  ``compute`` (torch, JAX), recorded on the generic path (see :func:`generic_path`);
- under JAX, ``compute`` traces with ``jax.jit`` and gives the eager result;
- the inputs are unchanged afterwards.

Once per call it also checks the declaration: the regularizer rebuilds equal from its
``options()``, pickles to an equal object, and (when registered with ``name=``) round-trips
through ``to_config`` / ``from_config``.

A regularizer that reads fields of ``data`` gets them from ``data=``: a mapping (or sequence
of datums) used as is, or a factory ``data(xp, logprobs) -> data`` called for each input, so
that the fields match its shape (``lambda xp, lp: {"ref": ...}``).

A broken property raises ``AssertionError`` naming the property, the regularizer and the
input. Only ``xp`` is imported (by you), plus ``jax`` when ``xp`` is JAX's namespace.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat
from array_api_compat import array_namespace

from ._core import registry
from ._core.backends import autodiff_grad, has_autodiff
from ._core.options import ByIdentity
from ._fastpath.dispatch import disabled
from .config import from_config

__all__ = ["check_regularizer", "generic_path"]


@contextlib.contextmanager
def generic_path() -> Iterator[None]:
    """Within this context (thread- and task-local), every regularizer runs its generic array
    API code: no native fast path, and torch autograd records ``evaluate`` instead of a
    built-in's closed form.

    Outside it, torch autograd through a built-in's value *is* its closed form; inside, it is
    an independent computation to check the closed form against (as the kit does)::

        with generic_path():
            value, _ = reg(x)  # x: a torch tensor that requires grad
        (auto,) = torch.autograd.grad(value, x)
    """
    with disabled():
        yield


_ELEMENTWISE: list[Any] = [
    [-2.5, -0.75, 0.0, -7.0, -0.125, 1.5],
    [[-1.0, -3.0, 0.0], [-0.5, -2.0, -12.0]],
    [[-1.0, -2.0, -0.25], [-4.0], [0.0, -0.5]],  # ragged: one array per datum
]
_ROWS: list[Any] = [  # a class axis last: [T, V], [B, T, V], a ragged list of [T_i, V]
    [[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]],
    [[[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], [[1.5, -0.5, 0.25], [-2.0, 1.0, 0.5]]],
    [[[0.5, -1.0, 2.0]], [[0.0, 0.25, -0.75], [1.0, -1.0, 0.5]]],
]
_MATRICES: list[Any] = [  # one matrix, a stack, a ragged list of stacks
    [[1.0, 0.5, -0.25], [0.0, 2.0, 1.0]],
    [[[1.0, 0.5], [0.25, -1.0]], [[0.5, 0.0], [1.0, 2.0]]],
    [[[[1.0, 0.5], [0.25, -1.0]]], [[[0.5, 0.0], [1.0, 2.0]], [[2.0, 1.0], [-1.0, 0.5]]]],
]


def _fail(prop: str, reg: Any, label: str, detail: str) -> AssertionError:
    return AssertionError(f"{prop}: {reg!r} on {label}: {detail}")


def _make(xp: Any, spec: Any, ragged: bool, dtype: Any = None) -> Any:
    if ragged:
        return [xp.asarray(row, dtype=dtype) for row in spec]
    return xp.asarray(spec, dtype=dtype)


def _arrays(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list) else [x]


def _close(cxp: Any, a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    diff = cxp.abs(a - b)
    return bool(cxp.all(diff <= atol + rtol * cxp.abs(b)))


def _inputs(reg: Any) -> list[Any]:
    k = int(getattr(reg, "event_ndim", 0))
    return {0: _ELEMENTWISE, 1: _ROWS, 2: _MATRICES}[k]


def _float64(xp: Any) -> Any:
    """float64 where the namespace really has it (JAX without x64 gives float32)."""
    try:
        probe = xp.asarray([1.0], dtype=xp.float64)
    except Exception:
        return xp.float32
    return probe.dtype


def check_regularizer(reg: Any, xp: Any, *, data: Any = None, fd_step: float | None = None) -> None:
    """Check the generic properties of ``reg`` on arrays of ``xp``; raise AssertionError.

    Parameters
    ----------
    reg : regularizer
        Anything with ``compute(data, logprobs) -> (value, metrics)``; ``value_and_grad`` is
        checked when present, the declaration when ``reg`` is a :class:`~regularizers.Regularizer`.
    xp : namespace
        The array library to test with (``numpy``, ``torch``, ``jax.numpy``,
        ``array_api_strict``, ``dask.array``...).
    data : None, mapping, sequence of datums, or callable ``(xp, logprobs) -> data``
        What the regularizer's fields are read from.
    fd_step : float, optional
        The finite-difference step (default 1e-6 in float64, 1e-3 in float32).
    """
    _check_declaration(reg)
    dtype = _float64(xp)
    for i, spec in enumerate(_inputs(reg)):
        ragged = i == 2
        x = _make(xp, spec, ragged, dtype)
        label = f"{getattr(xp, '__name__', xp)} input {i} ({'ragged list' if ragged else 'array'})"
        d = data(xp, x) if callable(data) else data
        _check_input(reg, x, d, label, fd_step)


def _check_input(reg: Any, x: Any, data: Any, label: str, fd_step: float | None) -> None:
    cxp = array_namespace(*_arrays(x))
    snapshot = [cxp.asarray(a, copy=True) for a in _arrays(x)]
    dev = array_api_compat.device(_arrays(x)[0])

    value, metrics = reg.compute(data, x)
    for what, a in [("value", value), *((f"metric {k!r}", m) for k, m in metrics.items())]:
        shape = getattr(a, "shape", None)
        if shape is None or tuple(shape) != ():
            raise _fail("0-d result", reg, label, f"{what} has shape {shape}")
        if array_namespace(a) is not cxp:
            raise _fail(
                "same namespace",
                reg,
                label,
                f"{what} is a {type(a).__name__}, not an array of {cxp.__name__}",
            )
        if array_api_compat.device(a) != dev:
            raise _fail("same device", reg, label, f"{what} is on {array_api_compat.device(a)}")
    if not bool(cxp.all(cxp.isfinite(value))):
        raise _fail("finite on finite input", reg, label, f"value {value!r}")

    vag = getattr(reg, "value_and_grad", None)
    if callable(vag) and getattr(reg, "has_closed_form_grad", True):
        v2, _, grad = vag(data, x)
        if not _close(cxp, v2, value):
            raise _fail("value_and_grad value", reg, label, f"{v2!r} != compute's {value!r}")
        grads = _arrays(grad)
        if isinstance(x, list) != isinstance(grad, list) or [tuple(g.shape) for g in grads] != [
            tuple(a.shape) for a in _arrays(x)
        ]:
            raise _fail(
                "gradient structure", reg, label, "the gradient is not shaped like the input"
            )
        _check_finite_differences(reg, x, data, grads, label, fd_step)
        if has_autodiff(cxp):
            with generic_path():
                auto = _arrays(autodiff_grad(cxp, lambda lp: reg.compute(data, lp)[0], x))
            for k, (g, a) in enumerate(zip(grads, auto, strict=True)):
                if not _close(cxp, g, a):
                    raise _fail(
                        "gradient equals autodiff",
                        reg,
                        label,
                        f"array {k}: value_and_grad {g!r} vs autodiff {a!r}",
                    )

    if array_api_compat.is_jax_namespace(cxp):
        import jax

        try:
            jitted, _ = jax.jit(lambda lp: reg.compute(data, lp))(x)
        except Exception as exc:
            raise _fail("traceable under jax.jit", reg, label, repr(exc)) from exc
        if not _close(cxp, jitted, value):
            raise _fail("traceable under jax.jit", reg, label, f"{jitted!r} vs {value!r}")

    for k, (a, s) in enumerate(zip(_arrays(x), snapshot, strict=True)):
        if not bool(cxp.all(a == s)):
            raise _fail("inputs not mutated", reg, label, f"array {k} changed")


def _to_float(a: Any) -> float:
    if hasattr(a, "detach"):
        a = a.detach()
    if hasattr(a, "compute"):
        a = a.compute()
    return float(a)


def _check_finite_differences(
    reg: Any, x: Any, data: Any, grads: list[Any], label: str, fd_step: float | None
) -> None:
    """Central differences, one element at a time, against the closed-form gradient."""
    arrays = _arrays(x)
    cxp = array_namespace(*arrays)
    wide = arrays[0].dtype == cxp.float64
    h = fd_step if fd_step is not None else (1e-6 if wide else 1e-3)
    rtol, atol = (1e-4, 1e-6) if wide else (2e-2, 2e-2)

    def value_at(k: int, j: int, delta: float) -> float:
        a = arrays[k]
        flat = cxp.reshape(a, (-1,))
        bump = cxp.asarray(
            [delta if i == j else 0.0 for i in range(flat.shape[0])],
            dtype=a.dtype,
            device=array_api_compat.device(a),
        )
        moved = cxp.reshape(flat + bump, tuple(a.shape))
        new = [moved if i == k else arrays[i] for i in range(len(arrays))]
        return _to_float(reg.compute(data, new if isinstance(x, list) else new[0])[0])

    base = _to_float(reg.compute(data, x)[0])
    for k, g in enumerate(grads):
        flat_g = cxp.reshape(g, (-1,))
        for j in range(flat_g.shape[0]):
            up, down = value_at(k, j, h), value_at(k, j, -h)
            fd = (up - down) / (2 * h)
            got = _to_float(flat_g[j])
            if abs(got - fd) <= atol + rtol * abs(fd):
                continue
            # At a kink (|x| at 0, a clip bound) the one-sided slopes differ, and the
            # convention picks a subgradient between them: accept any value in that interval.
            right, left = (up - base) / h, (base - down) / h
            lo, hi = min(left, right), max(left, right)
            slack = atol + rtol * max(abs(lo), abs(hi))
            kink = hi - lo > 10 * slack
            if not (kink and lo - slack <= got <= hi + slack):
                raise _fail(
                    "gradient equals finite differences",
                    reg,
                    label,
                    f"array {k} element {j}: value_and_grad {got!r} vs central difference "
                    f"{fd!r} (step {h})",
                )


def _check_declaration(reg: Any) -> None:
    """Rebuilt from its options, pickled, and (registered) through its config: equal."""
    options: Callable[[], dict[str, Any]] | None = getattr(reg, "options", None)
    if options is None:
        return  # duck-typed: nothing declared to check
    opts = options()
    declared = list(getattr(type(reg), "_options", opts))
    if list(opts) != declared:
        raise _fail("options declared", reg, "its declaration", f"{list(opts)} vs {declared}")
    rebuilt = type(reg)(**opts)
    if rebuilt != reg or hash(rebuilt) != hash(reg):
        raise _fail("rebuilt from options()", reg, "its declaration", f"got {rebuilt!r}")
    if repr(rebuilt) != repr(reg):
        raise _fail("repr follows the options", reg, "its declaration", repr(rebuilt))
    try:
        again = pickle.loads(pickle.dumps(reg))
    except Exception as exc:
        raise _fail("pickles", reg, "its declaration", repr(exc)) from exc
    # An array option compares by identity, which a pickle or a config cannot keep.
    holds_arrays = any(isinstance(v, ByIdentity) for v in getattr(reg, "_opts", {}).values())
    if holds_arrays:
        return
    if again != reg:
        raise _fail("pickles to an equal object", reg, "its declaration", repr(again))
    if registry.lookup(getattr(reg, "name", "")) is type(reg):
        back = from_config(reg.to_config())
        if back != reg:
            raise _fail("config round trip", reg, "its declaration", repr(back))
