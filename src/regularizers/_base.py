"""The shape every regularizer shares: options, identity, and the call protocol.

A penalty subclasses :class:`Regularizer` and writes two short methods over a
:class:`~regularizers._inputs.Batch` (the flat, masked, dtype-resolved target):

- ``_evaluate(batch) -> (value, metrics)``, differentiable by any autodiff system;
- ``_evaluate_with_grad(batch) -> (value, metrics, d value / d batch.values)``, closed form.

Everything else (validation, namespaces, lists, fields, masks, half precision, the way back
to the structure of ``logprobs``, immutability, equality, hashing and ``repr``) lives here and
in ``_inputs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import array_api_compat

from ._fastpath import try_compute
from ._inputs import Array, Batch, Namespace, prepare
from ._options import Target, _ByIdentity, check_mask_option, check_reduce, check_target

__all__ = ["Regularizer", "to_floats"]

Metrics = dict[str, Array]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class Regularizer:
    """Base class of every regularizer: immutable, hashable, equal by its options.

    Subclasses set ``name`` and ``_option_names`` (in signature order), validate their own
    options in ``__init__`` and store them with ``_set``.
    """

    name: ClassVar[str] = "regularizer"
    _option_names: ClassVar[tuple[str, ...]] = ("target", "reduce", "mask")
    __slots__ = ("__weakref__", "_opts")
    _opts: dict[str, Any]

    def __init__(
        self,
        *,
        target: Target | tuple[str, str] = "logprobs",
        reduce: str = "sum",
        mask: object = None,
    ) -> None:
        object.__setattr__(self, "_opts", {})
        self._set("target", check_target(target))
        self._set("reduce", check_reduce(reduce))
        self._set("mask", check_mask_option(mask))

    # ---- options -----------------------------------------------------------------------
    def _set(self, option: str, value: object) -> None:
        self._opts[option] = value

    @property
    def target(self) -> Target:
        """What is penalized: ``"logprobs"``, ``"probs"`` or a ``Field`` of ``data``."""
        return self._opts["target"]  # type: ignore[no-any-return]

    @property
    def reduce(self) -> str:
        """``"sum"`` or ``"mean"`` (over the counted elements)."""
        return self._opts["reduce"]  # type: ignore[no-any-return]

    @property
    def mask(self) -> Any:
        """``None``, a ``Field`` or the mask array given at construction."""
        m = self._opts["mask"]
        return m.value if isinstance(m, _ByIdentity) else m

    def options(self) -> dict[str, Any]:
        """The options, by name, in signature order (arrays as given)."""
        return {n: getattr(self, n) for n in self._option_names}

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable; build a new one with the options you want "
            f"(cannot set {name!r})"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name!r})")

    def _key(self) -> tuple[Any, ...]:
        return tuple(self._opts[n] for n in self._option_names)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Regularizer)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._key()))

    def __repr__(self) -> str:
        defaults = _defaults(type(self))
        shown = [
            f"{n}={self._opts[n]!r}"
            for n in self._option_names
            if n not in defaults or self._opts[n] != defaults[n]
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Immutable objects still pickle and copy (for multiprocessing and deepcopy).
        return (_rebuild, (type(self), self.options()))

    def to_config(self) -> dict[str, Any]:
        """A JSON-serializable dict; ``regularizers.from_config`` rebuilds an equal object."""
        from ._config import to_config

        return to_config(self)

    # ---- the call protocol -------------------------------------------------------------
    def _prepare(self, data: object, logprobs: object, mask: object) -> Batch:
        mask = self._opts["mask"] if mask is _UNSET else check_mask_option(mask)
        return prepare(data, logprobs, self.target, mask)

    def compute(
        self, data: object, logprobs: object, *, mask: object = _UNSET
    ) -> tuple[Array, Metrics]:
        """The penalty of ``logprobs`` (and ``data``) and its metrics.

        Parameters
        ----------
        data : None, mapping or sequence of datums
            Where ``Field`` targets and masks are read from; may be None otherwise.
        logprobs : array or list/tuple of arrays
            One array of any shape, or one array per datum (ragged lengths allowed).
        mask : None, array, list of arrays or Field, optional
            Overrides the mask given at construction for this call.

        Returns
        -------
        value : array
            0-d array of the caller's namespace and device; differentiable.
        metrics : dict[str, array]
            0-d arrays; nothing here syncs the host (see :func:`to_floats`).
        """
        if mask is _UNSET:
            fast = try_compute(self, logprobs)
            if fast is not None:
                return fast
        batch = self._prepare(data, logprobs, mask)
        value, metrics = self._evaluate(batch)
        return as_0d(batch.xp, value), {k: as_0d(batch.xp, v) for k, v in metrics.items()}

    def __call__(
        self, logprobs: object, *, data: object = None, mask: object = _UNSET
    ) -> tuple[Array, Metrics]:
        """Same as ``compute(data, logprobs)``; ``data`` defaults to None."""
        return self.compute(data, logprobs, mask=mask)

    def value_and_grad(
        self, data: object, logprobs: object, *, mask: object = _UNSET
    ) -> tuple[Array, Metrics, Array | list[Array]]:
        """Value, metrics and the closed-form gradient w.r.t. ``logprobs``, on any backend.

        The gradient has the structure of ``logprobs`` (an array, or a list for a list
        input), with each array's dtype and device. It follows the conventions of SPEC
        section 3, exactly as autodiff through :meth:`compute` does.
        """
        if not self.has_closed_form_grad:
            return self._value_and_autodiff_grad(data, logprobs, mask)
        batch = self._prepare(data, logprobs, mask)
        value, metrics, g = self._evaluate_with_grad(batch)
        xp = batch.xp
        return as_0d(xp, value), {k: as_0d(xp, v) for k, v in metrics.items()}, batch.pullback(g)

    @property
    def has_closed_form_grad(self) -> bool:
        """Whether this class writes ``_evaluate_with_grad`` (else ``value_and_grad`` uses the
        backend's autodiff, and raises TypeError on a backend without one)."""
        return type(self)._evaluate_with_grad is not Regularizer._evaluate_with_grad

    def _value_and_autodiff_grad(
        self, data: object, logprobs: object, mask: object
    ) -> tuple[Array, Metrics, Array | list[Array]]:
        from ._backends import autodiff_grad, has_autodiff

        value, metrics = self.compute(data, logprobs, mask=mask)
        xp = array_api_compat.array_namespace(value)
        if not has_autodiff(xp):
            raise TypeError(
                f"{type(self).__name__} has no closed-form gradient (_evaluate_with_grad) and "
                f"{xp.__name__} has no autodiff; use torch or JAX, or write _evaluate_with_grad"
            )
        grad = autodiff_grad(xp, lambda lp: self.compute(data, lp, mask=mask)[0], logprobs)
        return value, metrics, grad

    # ---- what a penalty writes ---------------------------------------------------------
    def _evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        raise NotImplementedError

    def _evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        raise NotImplementedError


def as_0d(xp: Namespace, value: Array) -> Array:
    # NumPy reductions return NumPy scalars; the contract is a 0-d array of the namespace.
    if array_api_compat.is_numpy_namespace(xp):
        return xp.asarray(value)
    return value


def _defaults(cls: type[Regularizer]) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__`` (what ``repr`` leaves out)."""
    found = _DEFAULTS.get(cls)
    if found is None:
        params = inspect.signature(cls.__init__).parameters.values()
        found = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        _DEFAULTS[cls] = found
    return found


_DEFAULTS: dict[type[Regularizer], dict[str, Any]] = {}


def _rebuild(cls: type[Regularizer], options: dict[str, Any]) -> Regularizer:
    return cls(**options)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as Python floats, for logging. This syncs the host (it computes Dask graphs).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.L1()(xp.asarray([-1.0, 0.5]))
    >>> rg.to_floats(metrics)
    {'l1_raw': 1.5, 'l1_mean': 0.75}
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"to_floats needs a mapping of metrics, got {type(metrics).__name__}")
    out = {}
    for key, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
            continue
        shape = getattr(v, "shape", None)
        if shape is None or tuple(shape) != ():
            raise TypeError(
                f"metric {key!r} must be a number or a 0-d array, got {type(v).__name__}"
                + (f" of shape {tuple(shape)}" if shape is not None else "")
            )
        if hasattr(v, "detach"):
            v = v.detach()
        out[key] = float(v)
    return out
