"""Turning what a caller passes into one flat view of the caller's arrays: :class:`Batch`.

This is the single place where inputs are validated and resolved: the namespace of
``logprobs`` (one array, or a list/tuple of arrays, one per datum), the dtype policy, the
target (``"logprobs"``, ``"probs"`` or a field of ``data``), the class axis of penalties over
distributions, the mask, the sequences and the counts that ``reduce`` divides by, other
fields of ``data`` (``Batch.field``), and the way back from a gradient over the flat target
to the structure of ``logprobs``.

Only standard array API calls are made on the arrays, through the namespace that
``array_api_compat.array_namespace`` resolves, so the same code serves every backend and is
traceable by ``jax.jit`` and ``torch.compile`` (no Python branching on array values).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from typing import Any

import array_api_compat
from array_api_compat import array_namespace, is_array_api_obj

from .backends import (
    clip_below,
    concat,
    count_true,
    device_of,
    from_host,
    isdtype,
    max_,
    reciprocal,
    reshape,
)
from .options import ByIdentity, Field
from .typing import Array, Metrics, Namespace

__all__ = ["Batch", "check_counts", "prepare"]


def _library(x: object) -> str:
    """The top-level library an array comes from, for error messages."""
    top = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(top, top)


def _is_datums(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) > 0
        # the first element alone rules out a list of arrays (without an attribute lookup,
        # which fails slowly, on each of them)
        and isinstance(getattr(value[0], "loss_fn_inputs", None), Mapping)
        # a list, not a generator: torch.compile's Dynamo cannot trace generators here
        and all([isinstance(getattr(d, "loss_fn_inputs", None), Mapping) for d in value])  # noqa: C419
    )


def _looks_like_arrays(value: object) -> bool:
    if is_array_api_obj(value):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and is_array_api_obj(value[0])


def check_data(data: object, logprobs: object, call: str = "compute(data, logprobs)") -> bool:
    """``data`` is None, a mapping or a sequence of datums (True), or a TypeError that names
    what came; swapped arguments get a message that names the call's order."""
    if isinstance(logprobs, Mapping) or _is_datums(logprobs):
        raise TypeError(
            f"logprobs is a {type(logprobs).__name__}, which looks like data: the call is "
            f"{call}; were the arguments swapped?"
        )
    if data is None or isinstance(data, Mapping) or _is_datums(data):
        return True
    if _looks_like_arrays(data):
        raise TypeError(
            f"data is {'an array' if is_array_api_obj(data) else 'a list of arrays'} "
            f"({_library(data if is_array_api_obj(data) else data[0])}); the call is {call}: "  # type: ignore[index]
            "were the arguments swapped? data must be None, a mapping or a sequence of datums"
        )
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        for i, datum in enumerate(data):
            if not isinstance(getattr(datum, "loss_fn_inputs", None), Mapping):
                raise TypeError(
                    f"data[{i}] must have a loss_fn_inputs mapping (like Tinker's Datum), got "
                    f"{type(datum).__name__}; data must be None, a mapping of arrays or a "
                    "sequence of datums"
                )
        raise ValueError("data is an empty sequence; pass None or at least one datum")
    raise TypeError(
        "data must be None, a mapping of arrays or a sequence of datums with loss_fn_inputs, "
        f"got {type(data).__name__}"
    )


def as_arrays(logprobs: object, what: str = "logprobs") -> list[Array]:
    """The arrays of ``logprobs``: one array, or a non-empty list/tuple of arrays."""
    if isinstance(logprobs, (list, tuple)):
        if not logprobs:
            raise ValueError(
                f"{what} is an empty {type(logprobs).__name__}; at least one array is needed"
            )
        kind = type(logprobs[0])
        if all([type(a) is kind for a in logprobs]) and is_array_api_obj(logprobs[0]):  # noqa: C419
            return list(logprobs)  # one array type: one check (a batch of 64 datums)
        for i, a in enumerate(logprobs):
            if not is_array_api_obj(a):
                raise TypeError(f"{what}[{i}] must be an array, got {type(a).__name__}")
        return list(logprobs)
    if not is_array_api_obj(logprobs):
        raise TypeError(
            f"{what} must be an array or a list/tuple of arrays, got {type(logprobs).__name__}"
        )
    return [logprobs]


# the namespace of the array types whose namespace depends on nothing but the type (resolving
# it costs ~10 us a call, as much as a kernel on a small array)
_NAMESPACES: dict[type, Namespace] = {}
_BY_TYPE = (("torch", "Tensor"), ("numpy", "ndarray"))


def namespace_of(arrays: list[Array], what: str = "logprobs") -> Namespace:
    kind = type(arrays[0])
    if len(arrays) > 1 and all([type(a) is kind for a in arrays]):  # noqa: C419
        arrays = arrays[:1]  # one array type is one library: resolve it once
    if len(arrays) == 1:
        xp = _NAMESPACES.get(kind)
        if xp is not None:
            return xp
        if (kind.__module__, kind.__name__) in _BY_TYPE:
            xp = _NAMESPACES[kind] = array_namespace(arrays[0])
            return xp
    try:
        return array_namespace(*arrays)
    except TypeError:
        libraries = sorted({_library(a) for a in arrays})
        raise TypeError(
            f"{what} mixes arrays of different libraries ({', '.join(libraries)}); pass arrays "
            "of one library per call"
        ) from None


def is_low_precision(xp: Namespace, dtype: Any) -> bool:
    return bool(dtype != xp.float32 and dtype != xp.float64)


def _check_float(xp: Namespace, a: Array, what: str) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{what} must have a real floating dtype, got dtype {a.dtype}")


def _check_floats(xp: Namespace, arrays: list[Array], what: Any) -> None:
    """:func:`_check_float` of each array, one check per distinct dtype; ``what(i)`` names
    array ``i`` in the error."""
    dtypes = {a.dtype for a in arrays}
    if all([isdtype(xp, d, "real floating") for d in dtypes]):  # noqa: C419
        return
    for i, a in enumerate(arrays):
        _check_float(xp, a, what(i))


def _to_namespace(value: Any, xp: Namespace, like: Array, what: str) -> Array:
    """Bring a value (array of any library, list of numbers, TensorData) into ``xp``."""
    if type(value) is type(like):  # an array of the caller's own kind (the common case)
        return value
    if not is_array_api_obj(value):
        if array_api_compat.is_torch_namespace(xp) and hasattr(value, "to_torch"):
            value = value.to_torch()
        elif hasattr(value, "to_numpy"):
            value = value.to_numpy()
    dev = device_of(like)
    try:
        if is_array_api_obj(value):
            if array_namespace(value) is xp:  # (TensorData's tensors live on the host)
                return _on(dev, value)
            try:
                return xp.asarray(value, device=dev)
            except Exception:
                return xp.asarray(xp.from_dlpack(value), device=dev)
        if isinstance(value, (list, tuple)):  # numbers: read in the compute dtype
            dtype = xp.float32 if is_low_precision(xp, like.dtype) else like.dtype
            return xp.asarray(value, dtype=dtype, device=dev)
    except (TypeError, ValueError, RuntimeError, BufferError) as exc:
        raise TypeError(
            f"{what} could not be converted to an array of {xp.__name__}: {exc}"
        ) from exc
    raise TypeError(
        f"{what} must be an array, a list of numbers or an object with to_numpy(), "
        f"got {type(value).__name__}"
    )


def _joined_on(device: Any, join: Any, arrays: list[Array]) -> Array:
    """``join(arrays)`` (their concatenation) on ``device``: one check of the result where
    the arrays share a device (the common case), else each is brought over first (a join
    across devices raises; any other error is raised again by the second join)."""
    try:
        out = join(arrays)
    except (RuntimeError, ValueError):
        if device is None:
            raise
        out = join([_on(device, a) for a in arrays])
    return _on(device, out)


def _on(device: Any, a: Array) -> Array:
    """``a`` on ``device`` (the logprobs'): a field of the caller's own library kept on
    another device is brought over, as a field from ``data`` always is. ``device`` is None
    where there is none to bring it to (traced under ``jax.jit``, or sharded over several
    devices: :func:`~regularizers._core.backends.device_of`)."""
    if device is None or device_of(a) == device:
        return a
    return array_api_compat.to_device(a, device)


def _values_of(value: Any, xp: Namespace, like: Array, what: str) -> list[Array]:
    """One value or a list of per-datum values (arrays of any library, lists of numbers)."""
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{what} is empty; at least one array is needed")
    per_datum = isinstance(value, (list, tuple)) and not isinstance(value[0], numbers.Number)
    values = list(value) if per_datum else [value]
    kind = type(like)
    if all([type(v) is kind for v in values]):  # noqa: C419
        return values  # arrays of the caller's own kind (what _to_namespace keeps as they are)
    return [
        _to_namespace(v, xp, like, f"{what}[{i}]" if per_datum else what)
        for i, v in enumerate(values)
    ]


def read_field(data: object, key: str, xp: Namespace, like: Array, role: str) -> list[Array]:
    """The arrays stored under ``key`` in ``data``, in datum order, in ``xp``."""
    what = f"{role} Field({key!r})"
    if data is None:
        raise ValueError(f"{what} reads data, but data is None; pass the data that holds {key!r}")
    if isinstance(data, Mapping):
        if key not in data:
            raise KeyError(
                f"{what}: data has no key {key!r}; keys present: {sorted(map(str, data))}"
            )
        return _values_of(data[key], xp, like, f"{what} data[{key!r}]")
    assert isinstance(data, Sequence)  # check_data ran first
    out = []
    for i, datum in enumerate(data):
        inputs = datum.loss_fn_inputs
        if key not in inputs:
            raise KeyError(
                f"{what}: data[{i}].loss_fn_inputs has no key {key!r}; keys "
                f"present: {sorted(map(str, inputs))}"
            )
        out.append(
            _to_namespace(inputs[key], xp, like, f"{what} data[{i}].loss_fn_inputs[{key!r}]")
        )
    return out


def _size(shape: tuple[int, ...]) -> int:
    if len(shape) == 1:
        return int(shape[0])
    return math.prod([int(d) for d in shape])


def _fmt_shapes(shapes: Sequence[Sequence[int]]) -> str:
    """``(2,)``, or ``[(2,), (3,)]`` for a list (shapes printed as tuples: a torch.Size too)."""
    out = [str(tuple(s)) for s in shapes]
    return out[0] if len(out) == 1 else "[" + ", ".join(out) + "]"


def check_counts(counts: object) -> dict[str, Any] | None:
    """``None`` or a mapping with ``"tokens"`` and/or ``"sequences"`` (numbers or 0-d arrays)."""
    if counts is None:
        return None
    if not isinstance(counts, Mapping):
        raise TypeError(
            "counts must be None or a mapping {'tokens': N, 'sequences': S} (what "
            f"reg.counts(...) returns, summed over parts), got {type(counts).__name__}"
        )
    unknown = sorted(set(map(str, counts)) - {"tokens", "sequences"})
    if unknown:
        raise ValueError(f"counts has unknown keys {unknown}; allowed: 'tokens', 'sequences'")
    out = {}
    for key, v in counts.items():
        if isinstance(v, bool) or not (
            isinstance(v, numbers.Real) or (is_array_api_obj(v) and tuple(v.shape) == ())
        ):
            raise TypeError(f"counts[{key!r}] must be a number or a 0-d array, got {v!r}")
        out[key] = v
    return out


class Batch:
    r"""The prepared view of one call: what a penalty's ``evaluate`` works on.

    The aggregation (``reduce``, ``counts``) is done by :meth:`aggregate`; every penalty
    gets every mode of the table in the concepts page for free.

    Attributes
    ----------
    xp : namespace
        The caller's array namespace.
    values : array
        The selected target in the compute dtype (float32 for half-precision inputs), one
        row per **token**: shape ``[n]`` for elementwise penalties, ``[n, V]`` for penalties
        over a class axis (``event_ndim = 1``; the class axis moved last), ``[n, m, k]`` for
        matrices (``event_ndim = 2``). Tokens whose mask is 0 hold 0, so nothing they held
        (±inf, NaN) reaches a sum or a gradient.
    mask : array or None
        ``[n]`` bool: which tokens count.
    size : int
        ``n``, the static number of tokens.
    dtype, device
        The compute dtype and the device of the input.
    """

    __slots__ = (
        "_arrays",
        "_count",
        "_counts",
        "_data",
        "_den",
        "_fields",
        "_is_list",
        "_keep",
        "_local",
        "_moved",
        "_one_d",
        "_per_seq",
        "_seq_count",
        "_target_arrays",
        "_token_shapes",
        "_watch",
        "_zero",
        "counts_given",
        "device",
        "dtype",
        "event_ndim",
        "lengths",
        "mask",
        "max_tokens",
        "reduce",
        "size",
        "target",
        "values",
        "xp",
    )
    # (declared for type checkers: the slots are set by prepare() and restrict())
    xp: Namespace
    values: Array
    mask: Array | None
    size: int
    dtype: Any
    device: Any
    target: Any
    event_ndim: int
    lengths: tuple[int, ...]
    reduce: str
    max_tokens: float | None
    counts_given: bool
    _arrays: list[Array]
    _target_arrays: list[Array]
    _token_shapes: list[tuple[int, ...]]
    _is_list: bool
    _moved: int | None
    _one_d: bool  # one value per element and every array 1-D: flattening joins them as they are
    _data: Any
    _count: Any
    _counts: Mapping[str, Any] | None
    _local: Any
    _seq_count: Any
    _per_seq: Any
    _den: Any
    _fields: dict[str, tuple[Array, bool]]
    _watch: list[str] | None
    _zero: Any
    _keep: Any  # the mask as the values' floats, where zero's counted made them (else None)

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            object.__setattr__(self, k, v)
        self._per_seq = None
        self._den = None
        if "_keep" not in kw:
            self._keep = None
        if "_watch" not in kw:
            self._watch = None
        if "_zero" not in kw:
            self._zero = None
        if "_fields" not in kw:  # (shared with restrict's and constant_values' copies:
            self._fields = {}  # the same data, read into the same layout)

    def constant_values(self, values: Array, watch: list[str]) -> Batch:
        """This Batch with ``values`` replaced (e.g. by a copy cut out of an autodiff graph);
        :meth:`field` then appends to ``watch`` the name of every array it reads that is
        itself differentiable (a torch tensor that requires grad)."""
        out = Batch(**{k: getattr(self, k) for k in self.__slots__})
        object.__setattr__(out, "values", values)
        object.__setattr__(out, "_watch", watch)
        return out

    def __repr__(self) -> str:
        return (
            f"Batch(xp={self.xp.__name__}, values shape={tuple(self.values.shape)}, "
            f"sequences={len(self.lengths)}, masked={self.mask is not None})"
        )

    # ---- small helpers --------------------------------------------------------------------
    def zero(self) -> Array:
        """A 0-d zero of the compute dtype, on the input's device."""
        return self.xp.zeros((), dtype=self.dtype, device=self.device)

    def constant(self, value: float) -> Array:
        """A 0-d array of the compute dtype (values beyond its range clamped to its max)."""
        top = float(self.xp.finfo(self.dtype).max)
        value = min(max(value, -top), top)
        return self.xp.full((), value, dtype=self.dtype, device=self.device)

    def _expand(self, a: Array) -> Array:
        """A per-token ``[n]`` array broadcastable against ``values``."""
        return self.xp.reshape(a, (-1,) + (1,) * self.event_ndim) if self.event_ndim else a

    def where_counted(self, a: Array) -> Array:
        """``a`` (per token, or shaped like ``values``) with uncounted tokens set to 0."""
        if self.mask is None:
            return a
        if self._zero is not None:  # a native path's exact equivalent (see prepare's zero)
            return self._zero(a, self.mask)
        m = self.mask if a.ndim <= 1 else self._expand(self.mask)
        return self.xp.where(m, a, self.xp.zeros((), dtype=a.dtype, device=self.device))

    # ---- other fields of data --------------------------------------------------------------
    def field(self, ref: Any, *, role: str = "field", counted: bool = True) -> Array:
        """Another array of the call, read and flattened exactly as the target.

        ``ref`` is a key of ``data`` (str or :class:`~regularizers.Field`), or an array /
        list of arrays given directly (e.g. an option's value). The result is aligned with
        :attr:`values` (same shape, compute dtype, device), with uncounted tokens set to 0.
        It is a constant for :meth:`~regularizers.Regularizer.value_and_grad`.

        ``counted=False`` skips the zeroing of uncounted tokens (a ``where`` that copies the
        whole array): for a penalty that zeroes them itself, block by block, to keep the
        memory of a large ``[n, V]`` field to one copy at most (often none: a flat view).
        """
        xp = self.xp
        like = self._arrays[0]
        if isinstance(ref, ByIdentity):
            ref = ref.value
        if isinstance(ref, str):
            ref = Field(ref)
        if isinstance(ref, Field) and ref.key in self._fields:  # read before in this call
            flat, differentiable = self._fields[ref.key]
            if differentiable and self._watch is not None:
                self._watch.append(f"{role} Field({ref.key!r})")
            return self.where_counted(flat) if counted else flat
        if isinstance(ref, Field):
            arrays = read_field(self._data, ref.key, xp, like, role)
            what = f"{role} Field({ref.key!r})"
        else:
            what = role
            arrays = _values_of(ref, xp, like, role)
        if not self.event_ndim and self._moved is None:  # the target's shapes, as recorded
            want = self._token_shapes
        else:
            want = [a.shape for a in self._target_arrays]
        got = [a.shape for a in arrays]
        if got != want:  # (a shape is a tuple: torch.Size is one too)
            raise ValueError(
                f"{what} shape {_fmt_shapes(got)} does not match the target's shape "
                f"{_fmt_shapes(want)}"
            )
        _check_floats(xp, arrays, lambda i: f"{what} array {i}")
        differentiable = any(getattr(a, "requires_grad", False) for a in arrays)
        if differentiable and self._watch is not None:
            self._watch.append(what)
        flat = self._flatten_field(arrays)
        if flat.dtype != self.dtype:
            flat = xp.astype(flat, self.dtype)
        if isinstance(ref, Field):  # (a penalty may read it twice: valid_tokens, then _run)
            self._fields[ref.key] = (flat, differentiable)
        return self.where_counted(flat) if counted else flat

    # ---- restricting the tokens that count ------------------------------------------------
    def restrict(self, valid: Array) -> Batch:
        """A Batch in which only the tokens that counted **and** are ``valid`` count.

        ``valid`` is ``[n]`` bool (e.g. "this row of scores is not all -inf"). The mask
        becomes ``mask & valid``, and everything that follows the mask follows it: every
        sum, aggregate and metric, ``N`` and ``S`` (and so :meth:`local_counts`, i.e.
        ``reg.counts``), :meth:`field` reads and the pullback of the gradient. Counts given
        by the caller (``counts=``) still win, as everywhere.

        ``values`` is **not** copied: a token that ``valid`` newly excludes keeps what it
        held (zeroing would copy a whole ``[n, V]`` array). A penalty that restricts tokens
        must therefore compute NaN-free, finite-gradient results on them (it knows what
        they hold: that is why it excludes them); their per-token results are dropped by
        ``where``, never multiplied by 0.
        """
        xp = self.xp
        mask = valid if self.mask is None else xp.logical_and(self.mask, valid)
        kept = {k: getattr(self, k) for k in self.__slots__}
        out = Batch(**kept)
        local = count_true(xp, mask, self.dtype)
        given = self._counts or {}
        object.__setattr__(out, "mask", mask)
        object.__setattr__(out, "_keep", None)  # (of the mask before)
        object.__setattr__(out, "_local", local)
        object.__setattr__(out, "_count", self._count if "tokens" in given else local)
        object.__setattr__(out, "_seq_count", self._seq_count if "sequences" in given else None)
        object.__setattr__(out, "_per_seq", None)
        return out

    def _flatten_field(self, arrays: list[Array]) -> Array:
        """:meth:`_flatten` of another array of the call (a field, a reference), on the
        logprobs' device (see :func:`_joined_on`)."""
        return _joined_on(self.device, self._flatten, arrays)

    def _flatten(self, arrays: list[Array]) -> Array:
        xp, k = self.xp, self.event_ndim
        if not k and self._moved is None:  # per-token values: 1-D arrays as they are
            # (arrays of the target's shapes, checked: their sizes are the lengths)
            if self._one_d:  # (1-D: no pass over them)
                return concat(xp, arrays, sizes=self.lengths)
            rows = [a if a.ndim == 1 else reshape(xp, a, (-1,)) for a in arrays]
            return concat(xp, rows, sizes=self.lengths)
        rows = []
        for a in arrays:
            if self._moved is not None:
                a = xp.moveaxis(a, self._moved, -1)
            if a.ndim == k + 1:
                rows.append(a)  # already [n, *event] (or flat): no reshape (nor, on torch, a
                continue  # view to record)
            rows.append(reshape(xp, a, (-1, *a.shape[a.ndim - k :]) if k else (-1,)))
        return concat(xp, rows)

    # ---- counts ------------------------------------------------------------------------
    def _sequence_counts(self) -> Array:
        """``N_s`` for each sequence, as a compute-dtype array (cached)."""
        xp = self.xp
        if self._per_seq is not None:
            return self._per_seq
        lengths = self.lengths
        if self.mask is None:
            out = from_host(xp, [float(n) for n in lengths], self.dtype, self.device)
        else:
            m = xp.astype(self.mask, self.dtype)
            if set(lengths) == {0}:  # (no token: nothing to reshape, which Dask refuses)
                out = xp.zeros((len(lengths),), dtype=self.dtype, device=self.device)
            elif len(set(lengths)) == 1:  # rows of one length: one reshape
                out = xp.sum(xp.reshape(m, (len(lengths), lengths[0])), axis=1)
            else:
                out = xp.stack([xp.sum(piece) for piece in self._split(m)])
        object.__setattr__(self, "_per_seq", out)
        return out

    def _split(self, a: Array) -> list[Array]:
        out, start = [], 0
        for n in self.lengths:
            out.append(a[start : start + n])
            start += n
        return out

    @property
    def count(self) -> Array | int:
        """``N``: the number of counted tokens (``counts["tokens"]`` when given)."""
        return self._count

    @property
    def sequences(self) -> Array | int:
        """``S``: the number of sequences with a counted token (``counts["sequences"]``)."""
        if self._seq_count is None:
            if self.mask is None:
                value: Array | int = len([n for n in self.lengths if n > 0])
            else:
                per = self._sequence_counts()
                value = self.xp.sum(self.xp.astype(per > 0, self.dtype))
            object.__setattr__(self, "_seq_count", value)
        return self._seq_count

    def local_counts(self) -> dict[str, Array]:
        """The counts of this call alone, as 0-d integer arrays (``reg.counts``)."""
        xp = self.xp
        # the namespace's default integer (int32 for JAX without x64, which warns on int64)
        dt = xp.asarray(0).dtype
        n = self.size if self.mask is None else xp.sum(xp.astype(self.mask, dt))
        if self.mask is None:
            s: Any = len([n_s for n_s in self.lengths if n_s > 0])
        else:
            s = xp.sum(xp.astype(self._sequence_counts() > 0, dt))

        def as_int(v: Any) -> Array:
            if is_array_api_obj(v):
                return v
            return xp.full((), v, dtype=dt, device=self.device)

        return {"tokens": as_int(n), "sequences": as_int(s)}

    def _divide(self, total: Array, by: Array | int) -> Array:
        """``total / by``, and 0 (not NaN) when ``by`` is 0."""
        if isinstance(by, (int, float)):
            if by is self._count and self._den is not None:  # (a native path's 0-d count)
                return total / self._den
            return total / max(by, 1)
        return total / self._clamped(by)

    def _clamped(self, by: Array) -> Array:
        """``max(by, 1)``; for the count, what every ``*_mean`` divides by, once per call.
        (``clip`` with a number: one call, where ``maximum`` needs a second array.)"""
        if by is not self._count:
            return clip_below(self.xp, by, 1.0)
        if self._den is None:
            object.__setattr__(self, "_den", clip_below(self.xp, by, 1.0))
        return self._den

    # ---- reductions over counted tokens ------------------------------------------------------
    def sum(self, p: Array) -> Array:
        """Σ of a per-token ``p`` over counted tokens."""
        return self.xp.sum(self.where_counted(p))

    def mean(self, p: Array) -> Array:
        """Σ p / N (0 when nothing is counted)."""
        return self._divide(self.sum(p), self.count)

    def local_mean(self, a: Array) -> Array:
        """Σ a / (this call's own count), whatever ``counts`` says: a statistic of the part
        (``center="mean"``), not a share of the whole."""
        return self._divide(self.sum(a), self._local)

    def per_token(self, total: Array) -> Array:
        """``total / N`` (0 when nothing is counted): how every ``*_mean`` metric is made."""
        return self._divide(total, self.count)

    def max(self, p: Array) -> Array:
        """max of a per-token ``p`` over counted tokens; 0 when none is counted."""
        xp = self.xp
        if self.size == 0:
            return self.zero()
        if self.mask is None:
            return max_(xp, p)
        low = xp.full((), -xp.inf, dtype=p.dtype, device=self.device)
        top = max_(xp, xp.where(self.mask, p, low))
        # 0 where no token counts; where some do, their max, -inf too (all of them -inf).
        # (With a mask, this call's own count is a 0-d array: count_true's, or restrict's.)
        return xp.where(self._local > 0, top, xp.zeros_like(top))

    def metrics(
        self, prefix: str, p: Array, *, total: Array | None = None, peak: bool = True
    ) -> Metrics:
        """``{prefix}_raw`` = Σ p, ``{prefix}_mean`` = Σ p / N and (``peak``) ``{prefix}_max``."""
        raw = self.sum(p) if total is None else total
        out = {f"{prefix}_raw": raw, f"{prefix}_mean": self.per_token(raw)}
        if peak:
            out[f"{prefix}_max"] = self.max(p)
        return out

    # ---- aggregation (reduce) -------------------------------------------------------------------
    def token_weights(self) -> Array | float:
        r"""``w`` with ``aggregate(p) = Σ_counted w·p``: a number, or a per-token ``[n]`` array.

        ``sum``: 1; ``mean``: 1/N; ``seq-mean-token-mean``: 1/(S·N_s) for a token of sequence
        ``s``; ``seq-mean-token-sum``: 1/S; ``seq-mean-token-sum-norm``: 1/(S·max_tokens).
        """
        how = self.reduce
        if how == "sum":
            return 1.0
        if how == "mean":  # (a number, or 1 / the clamped count: no 0-d constant to make)
            n = self.count
            return 1.0 / max(n, 1) if isinstance(n, int) else reciprocal(self.xp, self._clamped(n))
        s = self.sequences
        if how == "seq-mean-token-sum":
            return self._divide(self.constant(1.0), s)
        if how == "seq-mean-token-sum-norm":
            assert self.max_tokens is not None  # (check_options requires it)
            return self._divide(self.constant(1.0 / float(self.max_tokens)), s)
        # seq-mean-token-mean: 1 / (S · N_s), per token
        xp = self.xp
        if self.mask is None and len(set(self.lengths)) == 1:
            return self._divide(self.constant(1.0 / max(self.lengths[0], 1)), s)
        if set(self.lengths) == {0}:  # (as in _sequence_counts)
            return xp.zeros((0,), dtype=self.dtype, device=self.device)
        per = self._divide(self.constant(1.0), s) / xp.maximum(
            self._sequence_counts(), xp.ones((), dtype=self.dtype, device=self.device)
        )
        if len(set(self.lengths)) == 1:
            return xp.reshape(
                xp.broadcast_to(xp.reshape(per, (-1, 1)), (len(self.lengths), self.lengths[0])),
                (-1,),
            )
        ids = _sequence_ids(self.lengths)
        if not ids:  # no sequence, no token (a [0, T] stack): no weights
            return xp.zeros((0,), dtype=self.dtype, device=self.device)
        if len(ids) == 1:  # Dask (2026.8) gives take(per, [0]) the shape of per, not (1,)
            return per[ids[0] : ids[0] + 1]
        return xp.take(per, from_host(xp, ids, None, self.device), axis=0)

    def aggregate(self, p: Array, *, total: Array | None = None) -> Array:
        """The value of a per-token penalty ``p`` under ``reduce`` (honouring ``counts``).

        ``total`` (= ``sum(p)``, if already computed) saves a pass for the modes that need
        only the sum.
        """
        w = self.token_weights()
        if isinstance(w, float) or w.ndim == 0:
            t = self.sum(p) if total is None else total
            return t if isinstance(w, float) and w == 1.0 else t * w
        return self.xp.sum(self.where_counted(p) * w)

    def aggregate_grad(self, dp: Array) -> Array:
        """d aggregate(p) / d values, given ``dp`` = d p_i / d values_i (shaped like values)."""
        w = self.token_weights()
        if isinstance(w, float):
            return dp if w == 1.0 else dp * w
        return dp * (self._expand(w) if getattr(w, "ndim", 0) else w)

    # ---- from d value / d values back to d value / d logprobs ----------------------------
    def pullback(self, g: Array) -> Array | list[Array]:
        """The gradient w.r.t. ``logprobs`` (same structure, dtypes and device)."""
        xp = self.xp
        if isinstance(self.target, Field):
            grads = [xp.zeros_like(a) for a in self._arrays]
            return grads if self._is_list else grads[0]
        g = self.where_counted(g)
        if self.target == "probs":
            g = g * self.values  # d exp(x) / dx = exp(x), with values = exp(x)
        grads = []
        start = 0
        sizes = self.lengths if self._is_list else [self.size]
        for a, n in zip(self._arrays, sizes, strict=True):
            piece = g if len(self._arrays) == 1 else g[start : start + n, ...]
            start += n
            shape = tuple(a.shape)
            if self._moved is not None:
                moved = [d for i, d in enumerate(shape) if i != self._moved % a.ndim]
                piece = xp.moveaxis(
                    xp.reshape(piece, (*moved, shape[self._moved])), -1, self._moved
                )
            elif tuple(piece.shape) != shape or array_api_compat.is_jax_namespace(xp):
                piece = reshape(xp, piece, shape, like=a)  # with a's sharding (JAX)
            if piece.dtype != a.dtype:
                piece = xp.astype(piece, a.dtype, copy=False)  # no copy of a same-dtype [n, V]
            grads.append(piece)
        return grads if self._is_list else grads[0]

    def finish(self, value: Array, metrics: Metrics) -> tuple[Array, Metrics]:
        """``(value, metrics)`` as 0-d arrays of the caller's namespace.

        With no token at all, a penalty's value may be a constant 0 cut off from the input;
        adding the (exactly 0) sum of the empty values keeps it in the caller's autodiff
        graph, so that ``loss.backward()`` on an empty micro-batch works like on any other.
        """
        if self.size == 0:
            value = value + self.xp.astype(self.xp.sum(self.values), value.dtype)
        return as_0d(self.xp, value), {k: as_0d(self.xp, v) for k, v in metrics.items()}


@lru_cache(maxsize=256)
def _sequence_ids(lengths: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for s, n in enumerate(lengths):
        out.extend([s] * n)
    return out


def as_0d(xp: Namespace, value: Any) -> Array:
    # NumPy reductions return NumPy scalars; the contract is a 0-d array of the namespace.
    if array_api_compat.is_numpy_namespace(xp):
        return xp.asarray(value)
    return value


def prepare(
    data: object,
    logprobs: object,
    *,
    target: Any,
    mask: Any,
    reduce: str = "sum",
    max_tokens: float | None = None,
    counts: Mapping[str, Any] | None = None,
    event_ndim: int = 0,
    axis: int = -1,
    call: str = "compute(data, logprobs)",
    zero: Any = None,
    known: Namespace | None = None,
    flat: Array | None = None,
) -> Batch:
    """Validate and flatten one call's inputs.

    ``zero(a, mask, fresh=False)``, where given, replaces :meth:`Batch.where_counted`'s
    ``where`` (``a`` with the rows of uncounted tokens set to 0) by a native path's exact
    equivalent, which may write into ``a`` where ``fresh`` says it is this call's own array:
    the torch training path passes one that is cheaper on the CPU
    (``torch_fused.zero_uncounted``); its attribute ``counted``, where it has one, returns
    that result, the mask's count (:func:`count_true`) and the mask as the values' floats
    (or None), from one conversion of the mask; the floats are kept as ``Batch._keep``, for
    the native kernels that zero by their product. ``known``, where given, is the namespace of
    ``logprobs`` as its caller has already checked it: one array or a non-empty list of
    arrays of that namespace, all of a real floating dtype (the torch training path reads
    their types and dtypes once for its own conditions; a batch of 64 tensors is not walked
    again). ``flat``, where given, is the concatenation of ``logprobs`` (per-token values,
    ``event_ndim`` 0), made by the caller for another term of the same call: it is read,
    not concatenated again, and not written to.
    """
    check_data(data, logprobs, call)
    is_list = isinstance(logprobs, (list, tuple))
    arrays: list[Array]
    if known is not None:
        arrays, xp = list(logprobs) if is_list else [logprobs], known  # type: ignore[call-overload]
    else:
        arrays = as_arrays(logprobs)
        xp = namespace_of(arrays)
        _check_floats(xp, arrays, lambda i: f"logprobs[{i}]" if is_list else "logprobs")
    like = arrays[0]

    if isinstance(target, Field):
        target_arrays = read_field(data, target.key, xp, like, "target")
        _check_floats(xp, target_arrays, lambda i: f"target Field({target.key!r}) array {i}")
    else:
        target_arrays = arrays

    moved = None
    if event_ndim:
        for i, a in enumerate(target_arrays):
            if a.ndim < event_ndim:
                raise ValueError(
                    f"logprobs{f'[{i}]' if is_list else ''} has shape {tuple(a.shape)}; this "
                    f"penalty needs at least {event_ndim} dimension(s) "
                    + ("(a class axis)" if event_ndim == 1 else "(a matrix)")
                )
        if event_ndim == 1 and axis not in (-1,):
            ndim = target_arrays[0].ndim
            if not -ndim <= axis < ndim:
                raise ValueError(f"axis={axis} is out of range for shape {tuple(like.shape)}")
            if axis % ndim != ndim - 1:
                moved = axis % ndim
        events = {tuple(_moved_shape(a, moved)[a.ndim - event_ndim :]) for a in target_arrays}
        if len(events) > 1:
            raise ValueError(
                f"the arrays of logprobs have different class sizes {sorted(events)}; every "
                "array needs the same"
            )
    if moved is None and not event_ndim:  # (the common case, one comprehension per datum)
        token_shapes = [a.shape for a in target_arrays]  # (tuples: torch.Size is one)
    else:
        token_shapes = [tuple(_moved_shape(a, moved)[: a.ndim - event_ndim]) for a in target_arrays]

    one_d = not event_ndim and moved is None
    if is_list:
        # one pass over the datums' shapes (a second costs ~3 us for 64 of them): -1 marks a
        # datum that is not 1-D
        sizes = [s[0] if len(s) == 1 else -1 for s in token_shapes]
        if -1 in sizes:
            one_d, sizes = False, [_size(s) for s in token_shapes]
        size = sum(sizes)
        if type(size) is not int:  # sizes of another type (NumPy integers, NaN): ints
            sizes = [_size(s) for s in token_shapes]
            size = sum(sizes)
        lengths = tuple(sizes)
    elif len(token_shapes[0]) >= 2:
        one_d, lengths = False, (_size(token_shapes[0][1:]),) * int(token_shapes[0][0])
        size = sum(lengths)
    else:
        one_d, lengths = one_d and len(token_shapes[0]) == 1, (_size(token_shapes[0]),)
        size = lengths[0]

    batch = Batch(
        xp=xp,
        values=None,
        mask=None,
        size=size,
        dtype=None,
        device=device_of(like),
        target=target,
        event_ndim=event_ndim,
        lengths=lengths,
        reduce=reduce,
        max_tokens=max_tokens,
        counts_given=counts is not None,
        _arrays=arrays,
        _target_arrays=target_arrays,
        _token_shapes=token_shapes,
        _is_list=is_list,
        _moved=moved,
        _one_d=one_d,
        _data=data,
        _count=None,
        _counts=counts,
        _local=None,
        _seq_count=None,
        _zero=zero,
    )
    flatten = batch._flatten if target_arrays is arrays else batch._flatten_field
    if flat is not None and target_arrays is arrays and not event_ndim:
        t, fresh = flat, False  # (the caller's concatenation, shared with another term)
    else:
        t = flatten(target_arrays)
        fresh = len(target_arrays) > 1  # a new array of this call's own (a concatenation)
    if is_low_precision(xp, t.dtype):
        t, fresh = xp.astype(t, xp.float32), True
    object.__setattr__(batch, "dtype", t.dtype)

    if isinstance(mask, ByIdentity):
        mask = mask.value
    count: Any = batch.size
    if mask is not None:
        if isinstance(mask, Field):
            mask_arrays = read_field(data, mask.key, xp, like, "mask")
            what = f"mask Field({mask.key!r})"
        else:
            mask_arrays = _values_of(mask, xp, like, "mask")
            what = "mask"
        mask_shapes = [m.shape for m in mask_arrays]
        if mask_shapes != token_shapes:
            per = " (one value per token: the shape without the class axis)" if event_ndim else ""
            raise ValueError(
                f"{what} shape {_fmt_shapes(mask_shapes)} does not match the target's shape "
                f"{_fmt_shapes(token_shapes)}{per}"
            )
        kinds = {m.dtype for m in mask_arrays}
        for d in kinds:
            if not isdtype(xp, d, ("bool", "integral", "real floating")):
                i = next(i for i, m in enumerate(mask_arrays) if m.dtype == d)
                raise TypeError(f"{what} array {i} must be bool, integer or real, got dtype {d}")
        if len(kinds) == 1:  # one dtype: one concatenation, then one comparison
            if one_d:
                flat = mask_arrays
            else:
                flat = [m if m.ndim == 1 else reshape(xp, m, (-1,)) for m in mask_arrays]
            (kind,) = kinds
            join = partial(concat, xp, sizes=lengths, dtype=kind)
            mask_flat = _joined_on(batch.device, join, flat)
            if not isdtype(xp, mask_flat.dtype, "bool"):  # nonzero (NaN too) is counted
                mask_flat = xp.astype(mask_flat, xp.bool)  # (several times cheaper than != 0)
        else:
            flat = [
                reshape(xp, m if xp.isdtype(m.dtype, "bool") else xp.astype(m, xp.bool), (-1,))
                for m in mask_arrays
            ]
            mask_flat = _joined_on(batch.device, partial(concat, xp), flat)
        object.__setattr__(batch, "mask", mask_flat)
        # before any transform: exp(NaN) would otherwise reach the gradient as 0 · NaN
        counted = getattr(zero, "counted", None)  # (zero's work and the count, in one)
        if counted is not None:
            t, count, keep = counted(t, mask_flat, fresh)
            object.__setattr__(batch, "_keep", keep)
        else:
            count = count_true(xp, mask_flat, t.dtype)
            t = batch.where_counted(t) if zero is None else zero(t, mask_flat, fresh)
    if target == "probs":
        t = xp.exp(t)
        if batch.mask is not None:
            t = batch.where_counted(t) if zero is None else zero(t, batch.mask, True)
    object.__setattr__(batch, "values", t)

    object.__setattr__(batch, "_local", count)
    if counts is not None:
        if "tokens" in counts:
            count = _as_count(xp, counts["tokens"], t.dtype, batch.device)
        if "sequences" in counts:
            object.__setattr__(
                batch, "_seq_count", _as_count(xp, counts["sequences"], t.dtype, batch.device)
            )
    object.__setattr__(batch, "_count", count)
    return batch


def _moved_shape(a: Array, moved: int | None) -> tuple[int, ...]:
    shape = tuple(a.shape)
    if moved is None:
        return shape
    return (*shape[:moved], *shape[moved + 1 :], shape[moved])


def _as_count(xp: Namespace, v: Any, dtype: Any, device: Any) -> Array:
    if is_array_api_obj(v):
        if array_namespace(v) is not xp:
            raise TypeError(
                f"counts hold an array of {_library(v)} but logprobs are arrays of "
                f"{xp.__name__}; pass numbers or arrays of the same library"
            )
        return xp.astype(v, dtype)
    return xp.full((), float(v), dtype=dtype, device=device)
