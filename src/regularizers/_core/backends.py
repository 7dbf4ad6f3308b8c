"""What the array API standard does not cover: autodiff, cutting a value out of a graph,
reshaping a JAX array sharded over explicit mesh axes, and a max or min that keeps NaN on
XLA's CPU backend.

The only module of the shared machinery that knows backends by name. Backends are imported
lazily, inside the functions, so ``import regularizers`` imports none of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

from .typing import Array, Namespace

__all__ = [
    "autodiff_grad",
    "clip_below",
    "compute_lazy",
    "concat",
    "count_true",
    "device_of",
    "exact_counts",
    "from_host",
    "has_autodiff",
    "isdtype",
    "max_",
    "nan_among",
    "not_all_neg_inf",
    "reciprocal",
    "reshape",
    "stop_gradient",
    "torch_cat",
]


def device_of(x: Array) -> Any:
    """The device to make ``x``'s new arrays on (constants, host lists, fields brought
    over): ``array_api_compat.device(x)``, or None where ``x`` spans several devices (a JAX
    array sharded over a mesh, whose "device" is its sharding: a 0-d constant cannot take
    it, and an uncommitted one is placed by JAX next to the sharded operands)."""
    own = _OWN_DEVICE.get(type(x))
    if own is None:
        own = _OWN_DEVICE[type(x)] = bool(array_api_compat.is_torch_array(x))
    if own:
        return x.device
    dev = array_api_compat.device(x)
    devices = getattr(dev, "device_set", None)
    return None if devices is not None and len(devices) > 1 else dev


# per array type: whether its own ``.device`` is array-api-compat's answer (torch's tensors,
# where ``device()`` costs ~1 us a call against 0.1 for the attribute)
_OWN_DEVICE: dict[type, bool] = {}


def has_autodiff(xp: Namespace) -> bool:
    return bool(array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp))


_KINDS: dict[tuple[Namespace, Any, Any], bool] = {}


def isdtype(xp: Namespace, dtype: Any, kind: Any) -> bool:
    """``xp.isdtype(dtype, kind)``, remembered per namespace, dtype and kind: array-api-compat's
    answer for a tuple of kinds walks them in a generator (~1 us, and several times that
    inside a training step), and a call checks the dtypes of each of its arrays."""
    key = (xp, dtype, kind)
    try:
        return _KINDS[key]
    except KeyError:
        out = _KINDS[key] = bool(xp.isdtype(dtype, kind))
        return out
    except TypeError:  # a dtype that cannot be a key
        return bool(xp.isdtype(dtype, kind))


def clip_below(xp: Namespace, a: Array, low: float) -> Array:
    """``xp.clip(a, min=low)``: on torch ``clamp_min`` (array-api-compat's ``clip`` checks
    its arguments in Python, several us for a 0-d count divided by on every call)."""
    if array_api_compat.is_torch_namespace(xp):
        return a.clamp_min(low)
    return xp.clip(a, min=low)


def reciprocal(xp: Namespace, a: Array) -> Array:
    """``1.0 / a``: on torch ``reciprocal`` (a Python number over a tensor goes through
    ``Tensor.__rdiv__``, ~4 us against 1 for a 0-d count)."""
    if array_api_compat.is_torch_namespace(xp):
        return a.reciprocal()
    return 1.0 / a


def exact_counts(xp: Namespace, dtype: Any) -> int:
    """Up to how many elements a sum of 0s and 1s in the real floating ``dtype`` is the exact
    count, whatever the order of its additions (every partial sum is an integer of the
    dtype): 2^24 in float32, 2^53 in float64, 0 otherwise."""
    return 1 << 24 if dtype == xp.float32 else 1 << 53 if dtype == xp.float64 else 0


def count_true(xp: Namespace, mask: Array, dtype: Any) -> Array:
    """The number of True in the bool ``mask``, as a 0-d array of the real floating ``dtype``:
    ``count_nonzero`` where the namespace has it (2024.12; no float copy of the mask), else a
    sum of the mask cast.

    torch's reductions of a bool tensor (``count_nonzero``, ``sum``) are not vectorized on
    the CPU: its bytes summed in ``dtype`` are (9 us against 15 at 65K elements, the same at
    1e3), and exact while the count is an integer of ``dtype`` (up to 2^24 in float32)."""
    torch_cpu = array_api_compat.is_torch_namespace(xp) and mask.device.type == "cpu"
    if torch_cpu and mask.dtype == xp.bool and mask.numel() <= exact_counts(xp, dtype):
        return mask.view(xp.uint8).sum(dtype=dtype)
    if getattr(xp, "__array_api_version__", "2023.12") >= "2024.12":
        return xp.astype(xp.count_nonzero(mask), dtype)
    return xp.sum(xp.astype(mask, dtype))


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


def from_host(xp: Namespace, values: list[Any], dtype: Any, device: Any) -> Array:
    """A 1-D array of host numbers (sequence lengths, ids) on ``device``, without waiting.

    ``xp.asarray`` of a list is a copy from pageable host memory, and on CUDA such a copy
    first waits for every kernel already queued: one stall of the training step per call.
    torch on an accelerator gets a pinned buffer and a non-blocking copy instead (torch's
    host allocator keeps the buffer until the copy is done); everything else ``asarray``.
    Constants are made with ``xp.full`` instead, which fills on the device.
    """
    if array_api_compat.is_torch_namespace(xp) and device is not None:
        import torch

        if torch.device(device).type != "cpu":
            host = torch.tensor(values, dtype=dtype, pin_memory=True)
            return host.to(device, non_blocking=True)
    return xp.asarray(values, dtype=dtype, device=device)


def compute_lazy(*arrays: Any) -> tuple[Any, ...]:
    """Dask arrays computed together, in one ``dask.compute`` (one pass over shared inputs)."""
    import dask

    return tuple(dask.compute(*arrays))  # type: ignore[attr-defined,no-untyped-call]


def stop_gradient(xp: Namespace, a: Array) -> Array:
    """``a`` as a constant for autodiff (metrics must not keep the caller's graph alive)."""
    if array_api_compat.is_torch_namespace(xp):
        return a.detach()
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(a)
    return a


def max_(xp: Namespace, a: Array, axis: int | None = None) -> Array:
    """``xp.max`` that is NaN wherever a reduced element is NaN, on every backend.

    XLA's CPU backend computes max and min with its "fast" semantics: its vectorized loops
    (a reduction over 4096 elements or more, or a max fused into one) drop NaN, and
    ``jnp.max`` of ``[NaN, 1.0, ...]`` is 1.0 there. On JAX this is ``jnp.max`` (its value
    where no NaN is reduced, and its derivative everywhere), made NaN by the sum of the same
    elements, which keeps NaN and which XLA computes in the max's pass: a NaN sum means a
    NaN, or +inf beside -inf, where the max is +inf. Only where it is +inf beside a NaN sum
    does ``any(isnan)`` decide (under ``lax.cond``, so not run otherwise; a reduction XLA
    partitions over sharded arrays, as it does not one with a comparison of its own).
    Elsewhere ``xp.max``."""
    if not array_api_compat.is_jax_namespace(xp):
        return xp.max(a, axis=axis)
    return _jax_max()(a, axis)


@functools.cache
def _jax_max() -> Callable[..., Any]:
    """:func:`max_` on JAX, jitted and made on first use: a call on concrete arrays compiles
    once per shape, not once per call (``lax.cond`` traces its branches at each call);
    under a trace it is inlined."""
    import jax
    import jax.numpy as jnp

    def max_of(a: Any, axis: int | None) -> Any:
        top = jnp.max(a, axis=axis)
        total = jnp.sum(jax.lax.stop_gradient(a), axis=axis)
        return jnp.where(nan_among(a, total, top, axis=axis), total, top)

    return jax.jit(max_of, static_argnums=1)


DIRECT_NAN = 2048  # elements up to which nan_among reads every element (no lax.cond)


def nan_among(
    a: Array, total: Array, top: Array, bottom: Array | None = None, axis: int | None = None
) -> Array:
    """On JAX (inside a trace, or jitted by its caller): whether some element of ``a`` (along
    ``axis``) is NaN, from ``total``, ``top`` and ``bottom``, the sum, max and min of the
    same elements, which the caller's pass has (XLA's max and min drop NaN, but are exact
    where no NaN is reduced).

    A NaN sum means a NaN, or +inf beside -inf, which are then the max and the min. Only
    where the sum is NaN beside a max of +inf (and a min of -inf, where ``bottom`` is given)
    does ``any(isnan(a))`` decide, under ``lax.cond``: not run otherwise. Up to
    ``DIRECT_NAN`` elements, ``any(isnan(a))`` itself: there the conditional costs more than
    the pass it saves (it is a control-flow step of its own, and its result fuses with
    nothing: a jitted step at 1e3 elements, loss and gradient, took ~8 us less without it,
    ZLoss 57 to 49 us, Consistency 55 to 46), and at 10^4 elements the pass ~16 us more."""
    import jax
    import jax.numpy as jnp

    if a.size <= DIRECT_NAN:
        return jnp.any(jnp.isnan(jax.lax.stop_gradient(a)), axis=axis)
    nan = jnp.isnan(total)
    unsure = jnp.logical_and(nan, top == math.inf)
    if bottom is not None:
        unsure = jnp.logical_and(unsure, bottom == -math.inf)

    def decided() -> Any:
        return jnp.any(jnp.isnan(jax.lax.stop_gradient(a)), axis=axis)

    return jax.lax.cond(jnp.any(unsure), decided, lambda: nan)


def not_all_neg_inf(xp: Namespace, rows: Array) -> Array:
    """Per row of ``rows`` (along the last axis): some element is not -inf (NaN counts).

    ``max != -inf``; on JAX, ``or`` the row's sum is NaN. XLA's max drops NaN (see
    :func:`max_`), but not from a row without one, where it is exact; a row holding NaN sums
    to NaN (so does one holding +inf and -inf, whose max is +inf). Both reductions read the
    row in one pass, and the max is the one a log-softmax of the same rows takes, so under
    ``jit`` XLA computes it once; a constant for autodiff."""
    if not array_api_compat.is_jax_namespace(xp):
        return xp.max(rows, axis=-1) != -xp.inf
    import jax

    r = jax.lax.stop_gradient(rows)
    return xp.logical_or(xp.max(r, axis=-1) != -xp.inf, xp.isnan(xp.sum(r, axis=-1)))


def concat(
    xp: Namespace,
    arrays: list[Array],
    axis: int = 0,
    sizes: Sequence[int] | None = None,
    dtype: Any = None,
) -> Array:
    """``xp.concat(arrays, axis=axis)`` (the one array itself when there is one). On Dask,
    arrays of no element join into one fresh chunk: Dask's graphs over several chunks of no
    element come apart (a ``where`` against a broadcast mask asks for a chunk that does not
    exist, and a reshape of them raises), and an empty array carries nothing to keep. On
    torch, :func:`torch_cat` (``sizes``: the lengths of ``arrays``, where they are 1-D and
    known; ``dtype``: the dtype they all have, where known)."""
    if len(arrays) == 1:
        out = arrays[0]
    elif axis == 0 and array_api_compat.is_torch_namespace(xp):
        out = torch_cat(arrays, sizes, dtype)
    else:
        out = xp.concat(arrays, axis=axis)
        if array_api_compat.is_jax_namespace(xp):
            out = _jax_joined(out)
    return _fresh_empty(xp, out, tuple(out.shape)) if _dask_empty(xp, out) else out


def _jax_joined(out: Array) -> Array:
    """A traced concatenation behind ``optimization_barrier``: without it XLA may rewrite a
    reduction of the concatenation into one reduction per joined array, each a step of its
    CPU runtime (the Tinker batch's Pipeline of L1 and L2, jitted with its gradient: 621
    operations, 257 of them fusions, and 1.5x the hand-written step; with it, 240 and
    0.9x). Eager arrays stay as they are (nothing to rewrite, and a barrier is a call)."""
    import jax

    if isinstance(out, jax.core.Tracer):
        return jax.lax.optimization_barrier(out)  # type: ignore[no-untyped-call]
    return out


_GRAIN = 32768  # at::internal::GRAIN_SIZE: torch's CPU kernels split work above it
_CHUNKED = 1 << 17  # up to here (in elements), the concatenation by groups measured faster


def torch_cat(arrays: list[Array], sizes: Sequence[int] | None = None, dtype: Any = None) -> Array:
    """``torch.cat(arrays)``, as fast as this CPU allows it for 1-D tensors of the known
    lengths ``sizes`` (and, where given, the one ``dtype`` they all have).

    On the CPU with more than one thread, ``torch.cat`` of tensors of different lengths
    whose result reaches ``_GRAIN`` elements copies them one by one, each copy a kernel
    call of its own; below ``_GRAIN`` it runs one serial loop over them all. For a ragged
    batch of 64 tensors of 64-1024 tokens (35K elements) the first takes ~45 us, the second
    ~11 us. So the result is allocated once and filled by consecutive groups of tensors,
    each under ``_GRAIN`` elements (~18 us; reading the lengths or the dtypes of 64 tensors
    costs ~5 us more each, hence ``sizes`` and ``dtype``). ``torch.cat`` itself where that does
    not pay (another device, one thread, few or equal lengths, which torch copies in one
    go, more than ``_CHUNKED`` elements), where dtypes differ (its promotion), and where
    autograd records (a result written with ``out=`` has no graph)."""
    import torch

    first = arrays[0]
    if sizes is None or len(arrays) < 3 or torch.get_num_threads() == 1:
        return torch.cat(arrays)
    if torch.is_grad_enabled() or first.device.type != "cpu":
        return torch.cat(arrays)
    n = sum(sizes)
    if n < _GRAIN or n > _CHUNKED or min(sizes) == max(sizes):
        return torch.cat(arrays)
    if dtype is None:
        dtype = first.dtype
        if any([a.dtype != dtype for a in arrays]):  # noqa: C419
            return torch.cat(arrays)
    out = torch.empty((n,), dtype=dtype, device=first.device)
    start = done = size = 0
    try:
        for k, m in enumerate(sizes):
            if size + m >= _GRAIN and k > start:  # (a group of one may reach it)
                torch.cat(arrays[start:k], out=out[done : done + size])
                start, done, size = k, done + size, 0
            size += m
        torch.cat(arrays[start:], out=out[done:])
    except (RuntimeError, ValueError, TypeError):  # not 1-D of these lengths: torch's way
        return torch.cat(arrays)
    return out


def _dask_empty(xp: Namespace, a: Array) -> bool:
    """A Dask array of no element whose shape is known (chunks of unknown size are not)."""
    if not array_api_compat.is_dask_namespace(xp):
        return False
    dims = tuple(a.shape)
    return all(isinstance(d, int) for d in dims) and math.prod(dims) == 0


def _fresh_empty(xp: Namespace, a: Array, shape: tuple[int, ...]) -> Array:
    return xp.zeros(shape, dtype=a.dtype)


def _resolved(shape: tuple[int, ...], of: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with its -1 (if any) worked out for an array of shape ``of``."""
    if -1 not in shape:
        return shape
    known = math.prod(d for d in shape if d != -1)
    return tuple(math.prod(of) // max(known, 1) if d == -1 else d for d in shape)


def reshape(xp: Namespace, a: Array, shape: tuple[int, ...], *, like: Array | None = None) -> Array:
    """``xp.reshape(a, shape)``, also for a JAX array sharded over explicit mesh axes, and for
    a Dask array of no element (a fresh one of the new shape: Dask raises on some).

    JAX's explicit sharding (``jax.make_mesh``'s default axes) does not guess the sharding of
    a reshape that is not local to each device (flattening rows sharded along the token axis):
    it raises. Here the result is sharded over the same mesh axes, merged on the leading
    dimension (trailing dimensions kept, as ``Batch`` flattens ``[..., V]`` to ``[n, V]``),
    or, with ``like``, exactly as ``like`` is: the way back to the input's own sharding. Auto
    axes (and every other backend) reshape as usual.
    """
    if _dask_empty(xp, a):
        return _fresh_empty(xp, a, _resolved(shape, a.shape))
    if not array_api_compat.is_jax_namespace(xp):
        return xp.reshape(a, shape)
    import jax

    typeof = getattr(jax, "typeof", None)  # explicit sharding came with it
    spec = _explicit_spec(typeof, a if like is None else like)
    if spec is None:
        return xp.reshape(a, shape)
    shape = _resolved(shape, tuple(a.shape))
    if like is not None:
        out = typeof(like).sharding  # type: ignore[misc]
    else:
        mesh = typeof(a).sharding.mesh  # type: ignore[misc]
        keep = len(shape) - 1
        merged = [
            axis
            for entry in spec[: len(spec) - keep]
            for axis in ((entry,) if isinstance(entry, str) else entry or ())
        ]
        leading = None if not merged else merged[0] if len(merged) == 1 else tuple(merged)
        trailing = tuple(spec[len(spec) - keep :]) if keep else ()
        spec_out = jax.sharding.PartitionSpec(leading, *trailing)  # type: ignore[no-untyped-call]
        out = jax.sharding.NamedSharding(mesh, spec_out)
    return jax.lax.reshape(a, shape, out_sharding=out)


def _explicit_spec(typeof: Any, a: Array) -> tuple[Any, ...] | None:
    """The partition spec of a JAX array's type (sharded over explicit axes), else None."""
    if typeof is None:
        return None
    spec = getattr(getattr(typeof(a), "sharding", None), "spec", None)
    if spec is None:
        return None
    entries = tuple(spec) + (None,) * (a.ndim - len(spec))
    return None if all(e is None for e in entries) else entries
