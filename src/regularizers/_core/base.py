"""The shape every regularizer shares: declared options, identity, and the call protocol.

A penalty subclasses :class:`Regularizer`, declares its options with
:func:`~regularizers.option`, and writes ``evaluate(batch) -> (value, metrics)`` over a
:class:`~regularizers.Batch` (and, optionally, the closed form
``evaluate_with_grad(batch) -> (value, metrics, d value / d batch.values)``). Everything else
(construction, validation, equality, hashing, ``repr``, config, pickling, copying, namespaces,
lists, fields, masks, half precision, aggregation and counts, the way back to the structure of
``logprobs``) follows from the declaration and lives here and in ``inputs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import array_api_compat

from .. import checks
from .._fastpath.dispatch import (
    prepare_options,
    try_autograd,
    try_compute,
    try_jax,
    try_route,
    try_small_value_and_grad,
    try_value_and_grad,
)
from . import registry
from .backends import autodiff_grad, compute_lazy, has_autodiff
from .inputs import Batch, check_counts, check_data, prepare
from .options import Option, encode, option, unwrap
from .typing import Array, Metrics

__all__ = ["Regularizer", "to_floats"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()
_TRAILING = ("max_tokens", "mask")  # the shared options that read last in a signature


class Regularizer:
    """Base class of every regularizer: immutable, hashable, equal by its declared options.

    Subclass it, declare options with :func:`~regularizers.option`, and write
    :meth:`evaluate` (and optionally :meth:`evaluate_with_grad`)::

        class Cubic(rg.Regularizer, name="cubic"):
            scale = rg.option(1.0, check=rg.checks.positive)

            def evaluate(self, batch):
                p = self.scale * batch.xp.abs(batch.values) ** 3
                return batch.aggregate(p), batch.metrics("cubic", p)

    ``name="cubic"`` registers the class for :func:`~regularizers.from_config`. Construction
    is keyword-only (one option may be declared ``positional=True``); an ``__init__`` that
    takes an option the class did not declare is a ``TypeError`` when the class is created.

    Shared options
    --------------
    target : {"logprobs", "probs"} or Field, default "logprobs"
        What is penalized; ``("field", key)`` is accepted for ``Field(key)``.
    reduce : str, default "sum"
        ``"sum"``, ``"mean"`` (alias ``"token-mean"``), ``"seq-mean-token-mean"``,
        ``"seq-mean-token-sum"`` or ``"seq-mean-token-sum-norm"`` (needs ``max_tokens``).
    max_tokens : float, optional
        The constant length of ``"seq-mean-token-sum-norm"`` (Dr. GRPO).
    mask : None, array, list or Field, optional
        Only tokens whose mask is nonzero count.
    """

    name: ClassVar[str] = "regularizer"
    event_ndim: int = 0
    """0: a penalty per element; 1: per row of a class axis (``axis``); 2: per matrix.

    A class attribute, or a property where an option decides it."""
    __slots__ = ("__weakref__", "_fast", "_opts")
    _opts: dict[str, Any]
    _fast: dict[str, Any]  # the native fast path per array module, found on first use
    _options: ClassVar[dict[str, Option]] = {}
    _positional: ClassVar[str | None] = None

    target = option("logprobs", check=checks.target, doc="what is penalized")
    reduce = option("sum", check=checks.reduce, doc="how per-token penalties are aggregated")
    max_tokens = option(None, check=checks.optional(checks.positive), doc="Dr. GRPO's length")
    mask = option(None, check=checks.mask, doc="which tokens count")

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if isinstance(value, Option):
                    found.pop(key, None)
                    found[key] = value
        for value in vars(cls).values():
            if isinstance(value, Option):
                value.declare(cls)
        ordered = {k: v for k, v in found.items() if k not in _TRAILING}
        ordered.update({k: found[k] for k in _TRAILING if k in found})
        positional = [k for k, v in ordered.items() if v.positional]
        if len(positional) > 1:
            raise TypeError(
                f"{cls.__name__} declares {positional} positional; at most one option may be"
            )
        init = cls.__dict__.get("__init__")
        if init is not None:
            for p in list(inspect.signature(init).parameters.values())[1:]:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.name not in ordered:
                    raise TypeError(
                        f"{cls.__name__}.__init__ takes {p.name!r}, which is not a declared "
                        f"option; declare it in the class body: {p.name} = rg.option(default, "
                        "check=...) (options drive equality, hashing, repr, config and "
                        "pickling, so every one must be declared)"
                    )
        cls._options = ordered
        cls._positional = positional[0] if positional else None
        cls.__signature__ = _signature(ordered)  # type: ignore[attr-defined]
        if name is not None:
            cls.name = name
            registry.register(cls, name)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        options = cls._options
        if args:
            if cls._positional is None or len(args) > 1:
                raise TypeError(
                    f"{cls.__name__} takes its options by keyword only"
                    + (f" (except {cls._positional})" if cls._positional else "")
                    + f", got {len(args)} positional argument(s)"
                )
            if cls._positional in kwargs:
                raise TypeError(f"{cls.__name__} got {cls._positional!r} twice")
            kwargs[cls._positional] = args[0]
        unknown = [k for k in kwargs if k not in options]
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no option {unknown[0]!r}; its options: {', '.join(options)}"
            )
        stored = {
            n: o.validate(kwargs[n]) if n in kwargs else o.default for n, o in options.items()
        }
        object.__setattr__(self, "_opts", stored)
        object.__setattr__(self, "_fast", {})  # (a cache of what the options decide)
        self.check_options()

    def check_options(self) -> None:
        """Checks that involve several options (runs after each option's own check).

        Override to add your own; call ``super().check_options()``.
        """
        how, max_tokens = self._opts.get("reduce"), self._opts.get("max_tokens")
        if how == "seq-mean-token-sum-norm" and max_tokens is None:
            raise ValueError(
                "reduce='seq-mean-token-sum-norm' needs max_tokens= (> 0), the constant length "
                "that every sequence's sum is divided by"
            )
        if max_tokens is not None and how != "seq-mean-token-sum-norm":
            raise ValueError(
                f"max_tokens={max_tokens!r} is used by reduce='seq-mean-token-sum-norm' only, "
                f"and reduce={how!r}; drop max_tokens or change reduce"
            )

    # ---- identity ----------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The options, by name, in declaration order (arrays as given)."""
        return {n: unwrap(v) for n, v in self._opts.items()}

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable; build a new one with the options you want "
            f"(cannot set {name!r})"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name!r})")

    def _key(self) -> tuple[Any, ...]:
        return tuple(self._opts.values())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Regularizer)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._key()))

    def __repr__(self) -> str:
        options = type(self)._options
        shown = [f"{n}={v!r}" for n, v in self._opts.items() if v != options[n].default]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Immutable objects still pickle and copy (for multiprocessing and deepcopy).
        return (_rebuild, (type(self), self.options()))

    def __copy__(self) -> Regularizer:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Regularizer:
        return self  # immutable; array options are shared, as they compare by identity

    def to_config(self) -> dict[str, Any]:
        """A JSON-serializable dict; :func:`regularizers.from_config` rebuilds an equal object.

        Raises TypeError for an unregistered class (declare it with ``name=``) or an option
        holding an array.
        """
        if registry.lookup(self.name) is not type(self):
            raise TypeError(
                f"{type(self).__qualname__} is not registered; declare it with "
                f"class {type(self).__name__}(rg.Regularizer, name='...') to use configs"
            )
        return {
            "regularizer": self.name,
            "options": {k: encode(k, v) for k, v in self._opts.items()},
        }

    # ---- the call protocol -------------------------------------------------------------
    def prepare(
        self,
        data: object,
        logprobs: object,
        *,
        mask: object = UNSET,
        counts: Mapping[str, Any] | None = None,
        call: str = "compute(data, logprobs)",
        _zero: Any = None,
        _known: Any = None,
        _whole: Any = None,
        _validate: bool = True,
        _flat: Any = None,
    ) -> Batch:
        """The :class:`~regularizers.Batch` of one call (validated, flattened, masked).

        ``_zero``, ``_known`` and ``_whole`` are internal: a native path's exact replacement
        for the ``where`` that sets uncounted tokens to 0, the namespace of ``logprobs``
        where the caller has checked them already (see ``_core.inputs.prepare``), and its
        check, where reading a value on the host costs nothing (the CPU), that every token
        is valid (``valid_tokens``): then the Batch is not restricted, and counts and
        reductions stay those of the unmasked call (the same numbers, without the mask's
        ``where``s). ``_validate=False`` leaves :meth:`valid_tokens` to a later
        :meth:`_validated` (for a native kernel whose own result tells that every token is
        valid); ``_flat`` is the list's concatenation where the caller has made it already."""
        m = self._opts["mask"] if mask is UNSET else checks.mask("mask", mask)
        batch = prepare(
            data,
            logprobs,
            target=self.target,
            mask=m,
            reduce=self.reduce,
            max_tokens=self.max_tokens,
            counts=check_counts(counts),
            event_ndim=self.event_ndim,
            axis=getattr(self, "axis", -1),
            call=call,
            zero=_zero,
            known=_known,
            flat=_flat,
        )
        return self._validated(batch, _whole) if _validate else batch

    def _validated(self, batch: Batch, _whole: Any = None) -> Batch:
        """``batch`` restricted to the tokens :meth:`valid_tokens` accepts (``prepare``'s last
        step); ``batch`` itself where every one is (and ``_whole`` can tell)."""
        valid = self.valid_tokens(batch)
        if valid is None or (batch.mask is None and _whole is not None and _whole(valid)):
            return batch
        return batch.restrict(valid)

    def compute(
        self,
        data: object,
        logprobs: object,
        *,
        mask: object = UNSET,
        counts: Mapping[str, Any] | None = None,
    ) -> tuple[Array, Metrics]:
        """The penalty of ``logprobs`` (and ``data``) and its metrics.

        Parameters
        ----------
        data : None, mapping or sequence of datums
            Where ``Field`` targets, masks and references are read from.
        logprobs : array or list/tuple of arrays
            One array of any shape, or one array per datum (ragged lengths allowed).
        mask : None, array, list or Field, optional
            Overrides the mask given at construction for this call.
        counts : mapping, optional
            ``{"tokens": N, "sequences": S}`` of the whole batch (see :meth:`counts`); they
            replace this call's own counts in every denominator, so that the parts of a
            batch split by sequences add up to the whole.

        Returns
        -------
        value : array
            0-d array of the caller's namespace and device; differentiable.
        metrics : dict[str, array]
            0-d arrays; nothing here syncs the host (see :func:`to_floats`).
        """
        if mask is UNSET and counts is None and (data is None or check_data(data, logprobs)):
            fast = try_compute(self, logprobs)
            if fast is not None:
                return fast
        call = "compute(data, logprobs)"
        routed = try_route(self, data, logprobs, mask, counts, call)
        if routed is not None:
            return routed
        batch = self.prepare(data, logprobs, mask=mask, counts=counts, call=call)
        return batch.finish(*self._evaluate_recorded(batch))

    def __call__(
        self,
        logprobs: object,
        *,
        data: object = None,
        mask: object = UNSET,
        counts: Mapping[str, Any] | None = None,
    ) -> tuple[Array, Metrics]:
        """Same as ``compute(data, logprobs)``; ``data`` defaults to None."""
        if mask is UNSET and counts is None and data is None:
            fast = try_compute(self, logprobs)
            if fast is not None:
                return fast
        call = "reg(logprobs, data=...)"
        routed = try_route(self, data, logprobs, mask, counts, call)
        if routed is not None:
            return routed
        batch = self.prepare(data, logprobs, mask=mask, counts=counts, call=call)
        return batch.finish(*self._evaluate_recorded(batch))

    def counts(self, data: object, logprobs: object, *, mask: object = UNSET) -> dict[str, Array]:
        """``{"tokens": N, "sequences": S}`` of this call, as 0-d integer arrays.

        Sum them over micro-batches or ranks (``torch.distributed.all_reduce``,
        ``jax.lax.psum``) and pass the totals back as ``counts=``.
        """
        return self.prepare(data, logprobs, mask=mask, call="counts(data, logprobs)").local_counts()

    def value_and_grad(
        self,
        data: object,
        logprobs: object,
        *,
        mask: object = UNSET,
        counts: Mapping[str, Any] | None = None,
    ) -> tuple[Array, Metrics, Array | list[Array]]:
        """Value, metrics and the closed-form gradient w.r.t. ``logprobs``, on any backend.

        The gradient has the structure of ``logprobs`` (an array, or a list for a list
        input), with each array's dtype and device, and follows the same conventions that
        autodiff through :meth:`compute` sees. A class without :meth:`evaluate_with_grad`
        uses the backend's autodiff (torch, JAX) and raises TypeError on one without.
        """
        if not self.has_closed_form_grad:
            return self._value_and_autodiff_grad(data, logprobs, mask, counts)
        if mask is UNSET and counts is None:
            small = try_small_value_and_grad(self, data, logprobs)
            if small is not None:
                return small
        batch = self.prepare(
            data,
            logprobs,
            mask=mask,
            counts=counts,
            call="value_and_grad(data, logprobs)",
            **prepare_options(self, logprobs),
        )
        value, metrics, g = (
            try_autograd(self, batch)
            or try_value_and_grad(self, batch)
            or self.evaluate_with_grad(batch)
        )
        value, metrics = batch.finish(value, metrics)
        return value, metrics, batch.pullback(g)

    def _evaluate_recorded(self, batch: Batch) -> tuple[Array, Metrics]:
        """``evaluate`` as autodiff records it: on JAX a built-in's closed form as its
        ``jax.custom_jvp`` (``_fastpath/jax_closed_form.py``; on torch tensors that need a
        gradient, a built-in has taken ``try_route`` before: ``_fastpath/torch_autograd.py``)."""
        on_jax = try_jax(self, batch)
        return self.evaluate(batch) if on_jax is None else on_jax

    @property
    def has_closed_form_grad(self) -> bool:
        """Whether the class writes ``evaluate_with_grad``."""
        return type(self).evaluate_with_grad is not Regularizer.evaluate_with_grad

    def _value_and_autodiff_grad(
        self, data: object, logprobs: object, mask: object, counts: Any
    ) -> tuple[Array, Metrics, Array | list[Array]]:
        value, metrics = self.compute(data, logprobs, mask=mask, counts=counts)
        xp = array_api_compat.array_namespace(value)
        if not has_autodiff(xp):
            raise TypeError(
                f"{type(self).__name__} has no closed-form gradient (evaluate_with_grad) and "
                f"{xp.__name__} has no autodiff; use torch or JAX, or write evaluate_with_grad"
            )
        grad = autodiff_grad(
            xp, lambda lp: self.compute(data, lp, mask=mask, counts=counts)[0], logprobs
        )
        return value, metrics, grad

    # ---- what a penalty writes ---------------------------------------------------------
    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        """``(value, metrics)`` of one prepared call; differentiable by any autodiff."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(batch)")

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        """``(value, metrics, g)`` with ``g`` = d value / d ``batch.values`` (optional)."""
        raise NotImplementedError

    def valid_tokens(self, batch: Batch) -> Array | None:
        """Which tokens this penalty can score at all (``[n]`` bool), or None: every one.

        Optional. :meth:`prepare` folds it into the mask (:meth:`Batch.restrict`), so the
        tokens it rejects are uncounted everywhere: value, metrics, gradient, ``N`` and
        ``S``, and :meth:`counts` (which keeps split invariance). The penalties over
        distributions reject rows whose scores are all -inf. ``batch.values`` still holds
        such tokens as they were: the penalty's maths must stay NaN-free on them.
        """
        return None


def _signature(options: dict[str, Option]) -> inspect.Signature:
    params = [
        inspect.Parameter(
            n,
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if o.positional
            else inspect.Parameter.KEYWORD_ONLY,
            default=o.default,
        )
        for n, o in sorted(options.items(), key=lambda kv: not kv[1].positional)
    ]
    return inspect.Signature(params)


def _rebuild(cls: type[Regularizer], options: dict[str, Any]) -> Regularizer:
    return cls(**options)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as Python floats, for logging. This syncs the host.

    Dask metrics are computed together, in one ``dask.compute`` (one graph). On a
    ``dask.distributed`` cluster, compute whatever else you need from the same call (the
    value, the gradient) in that one call too: ``rg.to_floats({"value": value, **metrics})``
    or ``dask.compute(value, metrics, grad)``; graphs computed one after another that share
    keys make the scheduler warn "Detected different run_spec" (dask/dask#9888). Under
    ``jax.jit`` there are no values to read: keep the arrays there
    (``Pipeline(..., metrics="array")``).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.L1()(xp.asarray([-1.0, 0.5]))
    >>> rg.to_floats(metrics)
    {'l1_raw': 1.5, 'l1_mean': 0.75}
    """
    return floats_and_values(metrics)[0]


def floats_and_values(
    metrics: Mapping[str, Any], *arrays: Any
) -> tuple[dict[str, float], tuple[Any, ...]]:
    """``to_floats(metrics)``, and ``arrays`` with the Dask ones computed in the same graph
    (as NumPy arrays); the others are returned as they are."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"to_floats needs a mapping of metrics, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    lazy: dict[str, Any] = {}
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
        if "Tracer" in type(v).__name__:
            raise TypeError(
                f"metric {key!r} is traced by jax.jit, which has no value to convert to a "
                "float; keep metrics as arrays under jit (Pipeline(..., metrics='array')) and "
                "call to_floats outside"
            )
        if array_api_compat.is_dask_array(v):
            lazy[key] = v
            continue
        if hasattr(v, "detach"):
            v = v.detach()
        out[key] = float(v)
    extra = [i for i, a in enumerate(arrays) if array_api_compat.is_dask_array(a)]
    values = list(arrays)
    if lazy or extra:
        computed = compute_lazy(*lazy.values(), *(arrays[i] for i in extra))
        out.update({k: float(c) for k, c in zip(lazy, computed[: len(lazy)], strict=True)})
        out = {k: out[k] for k in metrics}
        for i, c in zip(extra, computed[len(lazy) :], strict=True):
            values[i] = c
    return out, tuple(values)
