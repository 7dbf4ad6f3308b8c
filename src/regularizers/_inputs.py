"""Turning what a caller passes into one flat array of the caller's namespace.

This is the single place where inputs are validated and resolved: the namespace of
``logprobs`` (one array, or a list/tuple of arrays, one per datum), the dtype policy, the
target (``"logprobs"``, ``"probs"`` or a field of ``data``), the mask, and the way back from
a gradient over the flat target to the structure of ``logprobs``.

Only standard array API calls are made on the arrays, through the namespace that
``array_api_compat.array_namespace`` resolves, so the same code serves every backend and is
traceable by ``jax.jit`` and ``torch.compile`` (no Python branching on array values).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
from array_api_compat import array_namespace, is_array_api_obj

from ._options import Field, Target, _ByIdentity

__all__ = ["Batch", "prepare"]

Array = Any
Namespace = Any


def _library(x: object) -> str:
    """The top-level library an array comes from, for error messages."""
    top = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(top, top)


def _as_arrays(logprobs: object, what: str = "logprobs") -> list[Array]:
    """The arrays of ``logprobs``: one array, or a non-empty list/tuple of arrays."""
    if isinstance(logprobs, (list, tuple)):
        if not logprobs:
            raise ValueError(
                f"{what} is an empty {type(logprobs).__name__}; at least one array is needed"
            )
        for i, a in enumerate(logprobs):
            if not is_array_api_obj(a):
                raise TypeError(f"{what}[{i}] must be an array, got {type(a).__name__}")
        return list(logprobs)
    if not is_array_api_obj(logprobs):
        raise TypeError(
            f"{what} must be an array or a list/tuple of arrays, got {type(logprobs).__name__}"
        )
    return [logprobs]


def _namespace(arrays: list[Array], what: str = "logprobs") -> Namespace:
    try:
        return array_namespace(*arrays)
    except TypeError:
        libraries = sorted({_library(a) for a in arrays})
        raise TypeError(
            f"{what} mixes arrays of different libraries ({', '.join(libraries)}); pass arrays "
            "of one library per call"
        ) from None


def _is_low_precision(xp: Namespace, dtype: Any) -> bool:
    return bool(dtype != xp.float32 and dtype != xp.float64)


def _check_float(xp: Namespace, a: Array, what: str) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{what} must have a real floating dtype, got dtype {a.dtype}")


def _flatten(xp: Namespace, arrays: list[Array]) -> Array:
    flat = [xp.reshape(a, (-1,)) for a in arrays]
    return flat[0] if len(flat) == 1 else xp.concat(flat)


def _to_namespace(value: Any, xp: Namespace, like: Array, what: str) -> Array:
    """Bring a field value (array of any library, list of numbers, TensorData) into ``xp``."""
    if not is_array_api_obj(value):
        if array_api_compat.is_torch_namespace(xp) and hasattr(value, "to_torch"):
            value = value.to_torch()
        elif hasattr(value, "to_numpy"):
            value = value.to_numpy()
    dev = array_api_compat.device(like)
    try:
        if is_array_api_obj(value):
            if array_namespace(value) is xp:
                return value
            try:
                return xp.asarray(value, device=dev)
            except Exception:
                return xp.asarray(xp.from_dlpack(value), device=dev)
        if isinstance(value, (list, tuple)):  # numbers: read in the compute dtype
            dtype = xp.float32 if _is_low_precision(xp, like.dtype) else like.dtype
            return xp.asarray(value, dtype=dtype, device=dev)
    except (TypeError, ValueError, RuntimeError, BufferError) as exc:
        raise TypeError(
            f"{what} could not be converted to an array of {xp.__name__}: {exc}"
        ) from exc
    raise TypeError(
        f"{what} must be an array, a list of numbers or an object with to_numpy(), "
        f"got {type(value).__name__}"
    )


def _read_field(data: object, key: str, xp: Namespace, like: Array, role: str) -> list[Array]:
    """The arrays stored under ``key`` in ``data``, in datum order."""
    what = f"{role} Field({key!r})"
    if data is None:
        raise ValueError(f"{what} reads data, but data is None; pass the data that holds {key!r}")
    if isinstance(data, Mapping):
        if key not in data:
            raise KeyError(
                f"{what}: data has no key {key!r}; keys present: {sorted(map(str, data))}"
            )
        value = data[key]
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError(f"{what}: data[{key!r}] is empty; at least one array is needed")
        per_datum = isinstance(value, (list, tuple)) and not isinstance(value[0], numbers.Number)
        values = list(value) if per_datum else [value]
        if not values:
            raise ValueError(f"{what}: data[{key!r}] is empty; at least one array is needed")
        return [_to_namespace(v, xp, like, f"{what} data[{key!r}]") for v in values]
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if not data:
            raise ValueError(f"{what}: data is an empty sequence; at least one datum is needed")
        out = []
        for i, datum in enumerate(data):
            inputs = getattr(datum, "loss_fn_inputs", None)
            if not isinstance(inputs, Mapping):
                raise TypeError(
                    f"{what}: data[{i}] must have a loss_fn_inputs mapping (like Tinker's "
                    f"Datum), got {type(datum).__name__}"
                )
            if key not in inputs:
                raise KeyError(
                    f"{what}: data[{i}].loss_fn_inputs has no key {key!r}; keys "
                    f"present: {sorted(map(str, inputs))}"
                )
            out.append(
                _to_namespace(inputs[key], xp, like, f"{what} data[{i}].loss_fn_inputs[{key!r}]")
            )
        return out
    raise TypeError(
        f"data must be None, a mapping of arrays or a sequence of datums with loss_fn_inputs, "
        f"got {type(data).__name__}"
    )


def _shapes(arrays: list[Array]) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in arrays]


@dataclass(frozen=True)
class Batch:
    """The flat, validated view of one call's inputs.

    ``values`` is the 1-D target in the compute dtype (float32 for half-precision inputs),
    with masked-out elements replaced by 0 so that nothing they hold (NaN included) reaches
    a sum or a gradient. ``mask`` is a 1-D bool array or None; ``count`` the number of
    counted elements (a Python int without a mask, a 0-d array with one). ``size`` is the
    static number of elements.
    """

    xp: Namespace
    values: Array
    mask: Array | None
    count: Array | int
    size: int
    target: Target
    arrays: list[Array]  # the logprobs arrays as given
    is_list: bool

    # ---- reductions that honour the mask (shared by every penalty) -----------------------
    def zero(self) -> Array:
        return self.xp.zeros((), dtype=self.values.dtype, device=self.device)

    @property
    def device(self) -> Any:
        return array_api_compat.device(self.values)

    def sum(self, a: Array) -> Array:
        """Σ over counted elements of an elementwise function ``a`` of ``values``."""
        if self.mask is not None:
            a = self.xp.where(self.mask, a, self.zero())
        return self.xp.sum(a)

    def max_nonneg(self, a: Array) -> Array:
        """max over counted elements of a non-negative ``a``; 0 when nothing is counted."""
        if self.size == 0:
            return self.zero()
        if self.mask is not None:
            a = self.xp.where(self.mask, a, self.zero())
        return self.xp.max(a)

    def max_square(self, d: Array) -> Array:
        """max of ``d²`` over counted elements, as ``max(max(d)², min(d)²)``; 0 when none.

        Exact (squaring is monotone in |d|), and much cheaper under XLA than a max over the
        squares next to their sum; masked-out elements count as 0, which never wins.
        """
        if self.size == 0:
            return self.zero()
        d = self.where_counted(d)
        top, bottom = self.xp.max(d), self.xp.min(d)
        return self.xp.maximum(top * top, bottom * bottom)

    def per_element(self, total: Array) -> Array:
        """``total / count``, and 0 (not NaN) when nothing is counted."""
        if isinstance(self.count, int):
            return total / max(self.count, 1)
        return total / self.xp.maximum(self.count, self.xp.ones_like(self.count))

    def reduce(self, total: Array, how: str) -> Array:
        return total if how == "sum" else self.per_element(total)

    def grad_scale(self, how: str) -> float | Array:
        """d reduce(total) / d total: 1 for a sum, 1 / count for a mean."""
        if how == "sum":
            return 1.0
        if isinstance(self.count, int):
            return 1.0 / max(self.count, 1)
        return 1.0 / self.xp.maximum(self.count, self.xp.ones_like(self.count))

    def where_counted(self, a: Array) -> Array:
        return a if self.mask is None else self.xp.where(self.mask, a, self.zero())

    # ---- from d value / d values back to d value / d logprobs ---------------------------
    def pullback(self, g: Array) -> Array | list[Array]:
        """The gradient w.r.t. ``logprobs`` (same structure, dtypes and device)."""
        xp = self.xp
        if isinstance(self.target, Field):
            grads = [xp.zeros_like(a) for a in self.arrays]
            return grads if self.is_list else grads[0]
        g = self.where_counted(g)
        if self.target == "probs":
            g = g * self.values  # d exp(x) / dx = exp(x), with values = exp(x)
        grads = []
        start = 0
        for a in self.arrays:
            n = _size(a)
            piece = g if len(self.arrays) == 1 else g[start : start + n]
            start += n
            grads.append(xp.astype(xp.reshape(piece, tuple(a.shape)), a.dtype))
        return grads if self.is_list else grads[0]


def _size(a: Array) -> int:
    n = 1
    for d in a.shape:
        n *= int(d)
    return n


def prepare(data: object, logprobs: object, target: Target, mask: object) -> Batch:
    """Validate and flatten one call's inputs (SPEC section 4)."""
    arrays = _as_arrays(logprobs)
    xp = _namespace(arrays)
    for i, a in enumerate(arrays):
        _check_float(
            xp,
            a,
            "logprobs"
            if len(arrays) == 1 and not isinstance(logprobs, (list, tuple))
            else f"logprobs[{i}]",
        )
    like = arrays[0]

    if isinstance(target, Field):
        target_arrays = _read_field(data, target.key, xp, like, "target")
        for i, a in enumerate(target_arrays):
            _check_float(xp, a, f"target Field({target.key!r}) array {i}")
    else:
        target_arrays = arrays
    t = _flatten(xp, target_arrays)
    if _is_low_precision(xp, t.dtype):
        t = xp.astype(t, xp.float32)
    if target == "probs":
        t = xp.exp(t)
    size = int(t.shape[0])

    if isinstance(mask, _ByIdentity):
        mask = mask.value
    mask_flat = None
    count: Array | int = size
    if mask is not None:
        if isinstance(mask, Field):
            mask_arrays = _read_field(data, mask.key, xp, like, "mask")
        else:
            mask_arrays = _as_arrays(mask, "mask")
            mxp = _namespace(mask_arrays, "mask")
            if mxp is not xp:
                raise TypeError(
                    f"mask is an array of {_library(mask_arrays[0])} but logprobs are arrays "
                    f"of {_library(like)}; pass a mask of the same library"
                )
        target_shapes = _shapes(target_arrays)
        mask_shapes = _shapes(mask_arrays)
        if mask_shapes != target_shapes:
            raise ValueError(
                f"mask shape {_fmt_shapes(mask_shapes)} does not match the target's shape "
                f"{_fmt_shapes(target_shapes)}"
            )
        for i, m in enumerate(mask_arrays):
            if not xp.isdtype(m.dtype, ("bool", "integral", "real floating")):
                raise TypeError(
                    f"mask array {i} must be bool, integer or real, got dtype {m.dtype}"
                )
        mask_flat = _flatten(
            xp, [m if xp.isdtype(m.dtype, "bool") else m != 0 for m in mask_arrays]
        )
        count = xp.sum(xp.astype(mask_flat, t.dtype))
        t = xp.where(mask_flat, t, xp.zeros((), dtype=t.dtype, device=array_api_compat.device(t)))

    return Batch(
        xp=xp,
        values=t,
        mask=mask_flat,
        count=count,
        size=size,
        target=target,
        arrays=arrays,
        is_list=isinstance(logprobs, (list, tuple)),
    )


def _fmt_shapes(shapes: list[tuple[int, ...]]) -> str:
    return str(shapes[0]) if len(shapes) == 1 else "[" + ", ".join(map(str, shapes)) + "]"
