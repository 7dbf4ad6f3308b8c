"""A conformance kit: the generic properties every regularizer must have, yours included.

>>> import array_api_strict as xp
>>> import regularizers as rg
>>> from regularizers.testing import check_regularizer
>>> check_regularizer(rg.L2(center="mean"), xp)

:func:`check_regularizer` builds a few inputs in ``xp`` (one array, a 2-D array, a ragged list,
kinks at 0 included) and checks, for each:

- ``compute`` returns a 0-d value of the input's namespace and device, finite on finite input;
- every metric is a 0-d array of that namespace;
- ``value_and_grad`` (if the regularizer has one) gives the value of ``compute`` and a gradient
  shaped like the input that equals the backend's autodiff through ``compute`` (torch, JAX);
- under JAX, ``compute`` traces with ``jax.jit`` and gives the eager result;
- the inputs are unchanged afterwards.

A broken property raises ``AssertionError`` naming the property, the regularizer and the
input. Only ``xp`` is imported (by you), plus ``jax`` when ``xp`` is JAX's namespace.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
from array_api_compat import array_namespace

from ._core.autodiff import autodiff_grad, has_autodiff

__all__ = ["check_regularizer"]

_INPUTS: list[Any] = [
    [-2.5, -0.75, 0.0, -7.0, -0.125, 1.5],
    [[-1.0, -3.0, 0.0], [-0.5, -2.0, -12.0]],
    [[-1.0, -2.0, -0.25], [-4.0], [0.0, -0.5]],  # ragged: one array per datum
]


def _fail(prop: str, reg: Any, label: str, detail: str) -> AssertionError:
    return AssertionError(f"{prop}: {reg!r} on {label}: {detail}")


def _make(xp: Any, spec: Any, ragged: bool) -> Any:
    return [xp.asarray(row) for row in spec] if ragged else xp.asarray(spec)


def _arrays(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list) else [x]


def _close(cxp: Any, a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    diff = cxp.abs(a - b)
    return bool(cxp.all(diff <= atol + rtol * cxp.abs(b)))


def check_regularizer(reg: Any, xp: Any, *, data: Any = None) -> None:
    """Check the generic properties of ``reg`` on arrays of ``xp``; raise AssertionError.

    Parameters
    ----------
    reg : regularizer
        Anything with ``compute(data, logprobs) -> (value, metrics)``; ``value_and_grad`` is
        checked when present.
    xp : namespace
        The array library to test with (``numpy``, ``torch``, ``jax.numpy``,
        ``array_api_strict``, ...).
    data : optional
        Passed to every call, for regularizers that read fields.
    """
    for i, spec in enumerate(_INPUTS):
        ragged = i == 2
        x = _make(xp, spec, ragged)
        label = f"{getattr(xp, '__name__', xp)} input {i} ({'ragged list' if ragged else 'array'})"
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
            if has_autodiff(cxp):
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
