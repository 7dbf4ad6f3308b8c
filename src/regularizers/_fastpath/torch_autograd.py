"""torch autograd through a built-in's closed form: one node per call.

When a built-in with a closed-form gradient is called (``compute``, ``reg(...)``, a
Pipeline's terms) on torch tensors of which one requires grad, :func:`compute` prepares the
call's :class:`~regularizers.Batch` with nothing recorded (validation, flattening, the mask,
a ragged list's one ``cat``), computes value and metrics by a *kernel*, and returns the value
as the output of one :class:`ClosedForm` node whose inputs are the caller's own tensors.
``loss.backward()`` then runs the closed form once and hands each tensor its piece of one
flat gradient: the graph holds one node instead of every temporary of the generic path (for a
ragged batch of 64 datums: 64 reshapes, a ``cat``, the mask's ``where``, then the maths; for
a ``[T, V]`` penalty over distributions, several ``[T, V]`` arrays), and the backward pass has
the documented conventions at the kinks.

A call on one tensor of per-token values with ``reduce`` "sum" or "mean" and no counts,
whose mask and other fields are tensors of its shape in a ``dict`` of data (verl's padded
``[B, T]`` layout, or one sequence), prepares no Batch: its kernel reads a :class:`_Flat`,
which makes the mask and the counts as ``prepare`` does, and which declines (a Batch is
then prepared, and validates) wherever what it reads is of another kind.

Where nothing is to be recorded (grad mode off, or no tensor that requires grad), the same
kernels give value and metrics, with no node: ``compute`` gives the same numbers whether or
not a gradient is wanted (before, such a call took the generic path; L1 and L2 have fused
reductions of their own, ``torch_fused.FAST``, tried first). A kernel that declines leaves
the call to the generic ``evaluate`` then, which computes no gradient.

Kernels (``torch_fused.GRAD``, keyed by registered name) have two static methods::

    forward(reg, batch) -> (value, metrics, state) | None   # None: the generic kernel
    grad(reg, batch, state, scale) -> g                     # scale · d value / d values

A specialized kernel (L1, L2) computes value and metrics with fused reductions and keeps what
its gradient needs; the gradient is computed in the backward pass only. Every other built-in
uses :class:`Generic`: ``evaluate_with_grad`` once in the forward pass, its gradient kept.
``g`` is a new tensor shaped like ``batch.values``, 0 at uncounted tokens.

What stays on the generic path (autograd records ``evaluate``):

- another array the penalty reads (a ``Field`` reference, a second view, a target field)
  that itself requires grad: the closed form is a gradient with respect to ``logprobs`` only;
- ``torch.compile`` (Dynamo traces the generic path, ``fullgraph=True`` included) and the
  ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``);
- a subclass or a user's class (its ``evaluate_with_grad`` is checked against autograd by
  the conformance kit, which needs autograd to be independent of it);
- :func:`regularizers.testing.generic_path` (how the kit and the spec suite check the closed
  forms against an independent autograd).

Double backward works: with ``create_graph=True`` the backward differentiates the generic
path (recorded then, from the caller's tensors), so second derivatives are exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from array_api_compat import array_namespace

from .._core.backends import torch_cat
from .._core.inputs import Batch, check_data
from .._core.options import ByIdentity, Field
from .._core.typing import Array, Metrics
from .common import disabled
from .torch_const import const
from .torch_fused import (
    GRAD,
    PLAIN,
    all_valid,
    count_and_keep,
    zero_and_count,
    zero_uncounted,
)

__all__ = ["ClosedForm", "Generic", "compute", "value_metrics_and_grad"]


class Generic:
    """The closed form of any built-in: ``evaluate_with_grad`` once, its gradient kept."""

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, Metrics, Any]:
        value, metrics, g = reg.evaluate_with_grad(batch)
        if batch.mask is not None:  # tokens a penalty's valid_tokens excluded keep values
            g = zero_uncounted(g, batch.mask, False, batch._keep)
        return value, metrics, g

    @staticmethod
    def grad(reg: Any, batch: Any, g: Any, scale: Any) -> Any:
        return g * scale.to(g.dtype)


# (torch.set_grad_enabled(mode), called, sets the mode too: the fallback, ~1 us slower)
_set_grad_enabled = getattr(torch._C, "_set_grad_enabled", None) or torch.set_grad_enabled


class _NoGrad:
    """``torch.no_grad()`` for this module's eager calls (never traced: see
    :func:`~regularizers._fastpath.dispatch.try_route`), without its Python layers: grad mode
    off, then back as it was (0.4 us a call on this machine's CPU, against 1.6)."""

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        _set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        _set_grad_enabled(self.prev)


class _Run:
    """One term of a call: its regularizer, Batch, kernel and what the kernel kept."""

    __slots__ = ("batch", "kernel", "reg", "state")

    def __init__(self, reg: Any, batch: Any, kernel: Any, state: Any) -> None:
        self.reg, self.batch, self.kernel, self.state = reg, batch, kernel, state


class _Call:
    """What the forward leaves for the backward: the terms over one input, the Batch whose
    structure the gradient is split by, and the generic path (for double backward). Kept
    by reference, not saved: packing a ragged batch of 64 tensors costs more than the maths."""

    __slots__ = ("arrays", "direct", "generic", "runs", "shape", "versions")

    def __init__(self, runs: list[_Run], shape: Any, generic: Any, direct: bool = False) -> None:
        self.runs, self.shape, self.generic = runs, shape, generic
        self.direct = direct  # 1-D tensors of the compute dtype: the split views are the grads
        self.arrays: tuple[Any, ...] = ()
        self.versions: list[int] = []


class ClosedForm(torch.autograd.Function):
    """The values of k terms as functions of the caller's tensors; the backward is the sum
    of their closed forms, split back per tensor once."""

    @staticmethod
    def forward(ctx: Any, call: _Call, values: Any, *arrays: Any) -> Any:
        ctx.call = call
        call.arrays = arrays
        call.versions = [a._version for a in arrays]  # (what save_for_backward would check)
        ctx.set_materialize_grads(False)
        return tuple(values)  # (each the call's own: see _own)

    @staticmethod
    def backward(ctx: Any, *gos: Any) -> tuple[Any, ...]:
        call: _Call = ctx.call
        arrays = call.arrays
        if all(go is None for go in gos):
            return (None, None) + (None,) * len(arrays)
        if [a._version for a in arrays] != call.versions:
            raise RuntimeError(
                "a tensor a regularizer was computed from was modified in place before "
                "backward(); its closed-form gradient reads the values of the forward pass "
                "(as autograd's saved tensors would, it refuses; clone the tensor first)"
            )
        if torch.is_grad_enabled():  # create_graph=True: a differentiable first derivative
            return (None, None, *_generic_grads(call, gos))
        total = None
        for run, go in zip(call.runs, gos, strict=True):
            if go is not None:
                g = run.kernel.grad(run.reg, run.batch, run.state, go)
                if run.batch.target == "probs":  # d exp(x) / dx = exp(x), values = exp(x)
                    g = g * run.batch.values
                total = g if total is None else total.add_(g)
        assert total is not None  # (some go is not None)
        if call.direct:  # (a gradient for a tensor that needs none is dropped by autograd)
            return (None, None, *total.split_with_sizes(call.shape.lengths))
        return (None, None, *_pieces(call.shape, total, ctx.needs_input_grad[2:]))


def _base_apply() -> Any:
    """``ClosedForm.apply`` without its Python prologue (which unwraps functorch's dead
    wrappers argument by argument: ~10 us for a 64-tensor batch), where torch's class layout
    allows; the route is never taken under the ``torch.func`` transforms, which that prologue
    is for (see :func:`_functorch_active`)."""
    single = getattr(torch.autograd.function, "_SingleLevelFunction", None)
    base = getattr(torch._C, "_FunctionBase", None)
    if single is None or base is None or not issubclass(ClosedForm, base):
        return ClosedForm.apply
    if getattr(ClosedForm, "setup_context", None) is not getattr(single, "setup_context", None):
        return ClosedForm.apply
    return super(single, ClosedForm).apply


_apply = _base_apply()


def _generic_grads(call: _Call, gos: tuple[Any, ...]) -> list[Any]:
    """The gradient through the generic path, with its graph (for double backward)."""
    arrays = call.arrays
    wanted = [i for i, a in enumerate(arrays) if a.requires_grad]
    out: list[Any] = [None] * len(arrays)
    with torch.enable_grad():
        values = call.generic(arrays)
        pairs = [(v, go) for v, go in zip(values, gos, strict=True) if go is not None]
        if not wanted or not any(v.requires_grad for v, _ in pairs):
            return out
        total = sum((v * go for v, go in pairs if v.requires_grad), torch.zeros(()))
        grads = torch.autograd.grad(
            total, [arrays[i] for i in wanted], create_graph=True, allow_unused=True
        )
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g
    return out


def _own(value: Any, metrics: Metrics) -> Any:
    """``value`` as an output of the node: a copy where it is also a metric (which stays a
    constant; with ``reduce="sum"`` the value is often ``*_raw`` itself) or a view, else
    ``value`` itself, a 0-d tensor the kernel made for this call (a copy costs ~1.5 us)."""
    if value._base is not None or any([value is m for m in metrics.values()]):  # noqa: C419
        return value.clone()
    return value


def _pieces(batch: Any, g: Any, needed: tuple[bool, ...]) -> list[Any]:
    """``g`` (w.r.t. the flat values, 0 at uncounted tokens) as one gradient per tensor of
    the call: views of one flat gradient where the shapes allow, in each tensor's dtype."""
    arrays = batch._arrays
    if batch._moved is not None:  # a class axis moved last: the generic way back
        grads = batch.pullback(g)
        return grads if batch._is_list else [grads]
    if len(arrays) == 1:  # (a reshape to the same shape costs ~2 us: not made)
        a = arrays[0]
        if g.shape != a.shape:
            g = g.reshape(a.shape)
        return [g if g.dtype == a.dtype else g.to(a.dtype)]
    out: list[Any] = []
    for p, a, need in zip(g.split_with_sizes(list(batch.lengths)), arrays, needed, strict=True):
        if not need:
            out.append(None)
            continue
        if p.shape != a.shape:
            p = p.reshape(a.shape)
        out.append(p if p.dtype == a.dtype else p.to(a.dtype))
    return out


def _functorch_active() -> bool:
    """Inside ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``...), which record the
    generic path: this Function computes outside autograd, which they cannot see through."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _plain(reg: Any, mask: Any) -> bool:
    """A term that reads no sequence structure of a list (no mask, "sum" or "mean", one
    value per element, no other array of the call): it may be prepared on the list's
    concatenation, made once."""
    m = reg._opts["mask"] if type(mask).__name__ == "_Unset" else mask
    if m is not None or reg.event_ndim != 0 or reg._opts["reduce"] not in ("sum", "mean"):
        return False
    return all([_scalar_option(v) for v in reg._opts.values()])  # noqa: C419


def _shapes(batch: Any, arrays: list[Any]) -> list[tuple[int, ...]]:
    """The shapes of the input's tensors: the Batch's own record where it is the list's
    (reading ``a.shape`` of 64 tensors again costs as much as a small kernel)."""
    if batch._is_list and batch._target_arrays is batch._arrays:
        return batch._token_shapes  # type: ignore[no-any-return]
    return [a.shape for a in arrays]


def _scalar_option(v: Any) -> bool:
    """An option that reads no data (not a Field, nor arrays given per datum)."""
    if v is None or isinstance(v, (str, int, float)):
        return True
    return isinstance(v, tuple) and all([x is None or isinstance(x, (int, float)) for x in v])  # noqa: C419


def compute(
    terms: list[tuple[Any, Any]],
    data: object,
    logprobs: Any,
    counts: Any,
    call: str,
    kernels: dict[str, Any],
) -> list[tuple[Array, Metrics]] | None:
    """``(value, metrics)`` of each ``(regularizer, mask)`` term over one input, the values
    recorded as the outputs of one :class:`ClosedForm` node (where nothing is to be recorded,
    grad mode off or no tensor requiring grad, the kernels' numbers with no node), or None
    where the generic path must run (see the module docstring). Terms over a class axis go
    one per call."""
    is_list = type(logprobs) in (list, tuple)
    arrays = list(logprobs) if is_list else [logprobs]
    if _functorch_active():
        return None
    kinds = {type(a) for a in arrays}
    if not kinds <= _TENSORS:
        return None
    # (nothing to record: the kernels' value and metrics, the same numbers, with no node)
    record = torch.is_grad_enabled() and any(a.requires_grad for a in arrays)
    dtypes = {a.dtype for a in arrays}
    floats = dtypes <= _FLOAT_SET  # (else prepare names the datum that is not)
    watch: list[str] = []
    runs: list[_Run] = []
    results: list[tuple[Any, Metrics]] = []
    flat = None
    shapes: list[Any] | None = None
    with _NoGrad():
        if is_list and floats and any([_plain(r, m) for r, m in terms[1:]]):  # noqa: C419
            # a later term will be prepared on the concatenation (below): made first, so
            # that a term before it reads it too (a Pipeline's L1(mask), then its L2)
            shapes, flat = _concatenation(arrays)
        for reg, mask in terms:
            lp = logprobs
            # a term that reads nothing but the values is prepared on the concatenation
            # (one array to validate, not 64), and so is any later one that reads no sequence
            # structure, without walking the list again
            if is_list and _plain(reg, mask) and (runs or (floats and reg.name in PLAIN)):
                if flat is None:
                    shapes, flat = _concatenation(arrays)
                lp = flat  # the same values, without walking the list again
                kernel = kernels.get(reg.name) if reg.name in PLAIN else None
                if kernel is not None and counts is None and reg._opts["target"] == "logprobs":
                    if data is not None:  # (what prepare would check first)
                        check_data(data, logprobs, call)
                    run = _flat_run(reg, flat, kernel, results)
                    if run is not None:
                        runs.append(run)
                        continue
            kernel = kernels.get(reg.name)
            # a kernel that zeroes what it derives from the values at uncounted tokens (see
            # MASKS_ITS_OWN) is handed them unmasked: no masked copy is made unless it declines
            own = getattr(kernel, "MASKS_ITS_OWN", False) and reg._opts["target"] == "logprobs"
            # a kernel whose value is finite only where every token it counts is valid (see
            # VALID_IF_FINITE; for some, only on some of their paths: their vouches) runs
            # before valid_tokens, which runs only where it is not: read on the host, so on
            # the CPU only
            defer = getattr(kernel, "VALID_IF_FINITE", False) and arrays[0].device.type == "cpu"
            batch = reg.prepare(
                data,
                lp,
                mask=mask,
                counts=counts,
                call=call,
                _zero=_as_they_are if own else zero_uncounted,
                _known=_XP if floats else None,  # (types and dtypes read above)
                _whole=all_valid,
                _validate=not defer,
                _flat=flat,  # (read, not written: MASKS_ITS_OWN or a masked copy)
            )
            if batch._target_arrays is not batch._arrays:  # a Field target: its own gradient
                return None
            object.__setattr__(batch, "_watch", watch)
            if type(batch._count) is int:  # the count divided by as a 0-d tensor (see const)
                object.__setattr__(batch, "_den", const(float(max(batch._count, 1)), batch.values))
            if own:
                object.__setattr__(batch, "_zero", zero_uncounted)  # (for fields it reads)
            vouches = getattr(kernel, "vouches", None)
            if defer and vouches is not None and not vouches(reg, batch):
                batch, defer = reg._validated(batch, all_valid), False  # (as prepare would)
            got = None if kernel is None else kernel.forward(reg, batch)
            if defer and (got is None or not math.isfinite(got[0].item())):
                batch = reg._validated(batch, all_valid)  # (a token may be invalid: as prepare)
                got = None if kernel is None else kernel.forward(reg, batch)
            if got is None:
                if not record:  # (evaluate, not evaluate_with_grad: no gradient is wanted)
                    return None
                if own and batch.mask is not None:  # the values as prepare would leave them
                    object.__setattr__(batch, "values", zero_uncounted(batch.values, batch.mask))
                kernel = Generic
                got = Generic.forward(reg, batch)
            value, metrics, state = got
            results.append(batch.finish(value, metrics))
            runs.append(_Run(reg, batch, kernel, state))
    if watch:  # a Field it reads needs a gradient too
        return None
    if not record:
        return [(_own(v, m), m) for v, m in results]

    def generic(arrays: tuple[Any, ...]) -> list[Any]:
        lp = list(arrays) if is_list else arrays[0]
        with disabled():
            return [reg.compute(data, lp, mask=mask, counts=counts)[0] for reg, mask in terms]

    first = runs[0].batch
    direct = (
        is_list
        and first._moved is None
        and first.event_ndim == 0
        and dtypes == {first.dtype}
        and all([len(s) == 1 for s in shapes or _shapes(first, arrays)])  # noqa: C419
    )
    shape = _Split(arrays, shapes) if is_list and not first._is_list else first
    node = _Call(runs, shape, generic, direct)
    values = _apply(node, [_own(v, m) for v, m in results], *arrays)
    return [(v, metrics) for v, (_, metrics) in zip(values, results, strict=True)]


def _concatenation(arrays: list[Any]) -> tuple[list[Any], Any]:
    """The shapes of a list's tensors (read once: for the split too) and their flat
    concatenation."""
    shapes = [a.shape for a in arrays]
    rows = [a if len(s) == 1 else a.reshape(-1) for a, s in zip(arrays, shapes, strict=True)]
    if torch.get_num_threads() == 1:  # (torch_cat's groups are for several threads)
        return shapes, torch.cat(rows)
    return shapes, torch_cat(rows, [math.prod(s) for s in shapes])


def _as_they_are(a: Any, mask: Any, fresh: bool = False) -> Any:
    """``prepare``'s masking for a kernel that masks what it derives (``MASKS_ITS_OWN``):
    none; the values keep what the caller's tensors hold at uncounted tokens (its
    ``counted``: the count, and the mask as floats for the kernel's own product)."""
    return a


_as_they_are.counted = count_and_keep  # type: ignore[attr-defined]


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(_FLOATS)
_XP = array_namespace(torch.empty(0))  # the namespace of every tensor of _TENSORS
_TENSORS = frozenset([torch.Tensor, torch.nn.Parameter])


class _Split:
    """The structure of a list input prepared on its concatenation: what :func:`_pieces`
    reads of a Batch to split the gradient back per tensor."""

    __slots__ = ("_arrays", "_is_list", "_moved", "lengths")

    def __init__(self, arrays: list[Any], shapes: list[Any] | None) -> None:
        self._arrays, self._is_list, self._moved = arrays, True, None
        if shapes is None:
            self.lengths = tuple([a.numel() for a in arrays])
        else:
            self.lengths = tuple([s[0] if len(s) == 1 else math.prod(s) for s in shapes])


class _Decline(Exception):
    """What the Batch-free call reads is not the plain case it handles (see :class:`_Flat`):
    a Batch is prepared instead, whose validation names anything that is wrong."""


class _Flat:
    """What the kernels read of a Batch, for one tensor with ``reduce`` "sum" or "mean" and
    no counts: the common call, without ``prepare``'s generality. Its mask and the fields its
    kernel reads (a reference, a paired view) are tensors of the input's shape and device,
    found in a ``dict`` of data (a ``Field``) or given themselves, none of which requires
    grad; anything else is :class:`_Decline` (then :func:`compute` prepares a Batch). The
    mask is made as ``prepare`` makes it (nonzero, NaN too, is counted; ``zero_and_count``,
    or ``count_and_keep`` for a kernel that masks its own), so are the counts and the
    divisions by them, so the kernels compute the same numbers."""

    __slots__ = (
        "_arrays",
        "_count",
        "_data",
        "_den",
        "_is_list",
        "_keep",
        "_local",
        "_moved",
        "device",
        "dtype",
        "event_ndim",
        "lengths",
        "mask",
        "reduce",
        "size",
        "target",
        "values",
        "xp",
    )

    def __init__(self, x: Any, reduce: str, data: Any = None, rows: bool = False) -> None:
        if rows:  # a vector per token along the last axis: [n, D] (``event_ndim`` 1)
            v = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        else:
            v = x if x.ndim == 1 else x.reshape(-1)
        if v.dtype != torch.float32 and v.dtype != torch.float64:
            v = v.to(torch.float32)  # half precision computes in float32
        self.values, self.dtype, self._arrays = v, v.dtype, [x]
        self.size = self._local = self._count = v.shape[0] if rows else v.numel()
        self.lengths = (self.size,)
        self.mask, self._keep, self.reduce, self.target = None, None, reduce, "logprobs"
        self._is_list, self._moved, self.event_ndim = False, None, 1 if rows else 0
        self._data, self._den, self.xp, self.device = data, None, _XP, x.device

    @property
    def count(self) -> Any:
        return self._count

    def token_weights(self) -> Any:
        if self.reduce == "sum":
            return 1.0
        return 1.0 / max(self.size, 1) if self._den is None else self._den.reciprocal()

    def per_token(self, total: Any) -> Any:
        if self._den is not None:  # (the mask's count, at least 1)
            return total / self._den
        return total / const(float(max(self.size, 1)), total)

    def _divide(self, total: Any, by: Any) -> Any:
        if by is self._count:
            return self.per_token(total)
        return total / const(float(max(by, 1)), total)

    def zero(self) -> Any:
        return torch.zeros((), dtype=self.dtype, device=self.values.device)

    def constant(self, value: float) -> Any:
        top = float(torch.finfo(self.dtype).max)
        value = min(max(value, -top), top)
        return torch.full((), value, dtype=self.dtype, device=self.values.device)

    def max(self, p: Any) -> Any:
        return Batch.max(self, p)  # type: ignore[arg-type]  # (what it reads, this has)

    def _read(self, ref: Any, token: bool = False) -> Any:
        """The tensor ``ref`` is or names (a ``Field`` of ``data``, ``ByIdentity``), of the
        input's shape (``token``: one value per token, a mask's), shaped as the values (as
        the tokens)."""
        if isinstance(ref, ByIdentity):
            ref = ref.value
        if isinstance(ref, Field):
            if type(self._data) is not dict or ref.key not in self._data:
                raise _Decline
            ref = self._data[ref.key]
        x = self._arrays[0]
        rows = token and self.event_ndim
        if type(ref) not in _TENSORS or ref.shape != (x.shape[:-1] if rows else x.shape):
            raise _Decline
        if ref.device != x.device or ref.requires_grad:  # (a gradient of its own: generic)
            raise _Decline
        if token or not self.event_ndim:
            return ref if ref.ndim == 1 else ref.reshape(-1)
        return ref if ref.ndim == 2 else ref.reshape(self.values.shape)

    def field(self, ref: Any, *, role: str = "field", counted: bool = True) -> Any:
        a = self._read(Field(ref) if isinstance(ref, str) else ref)
        if a.dtype not in _FLOAT_SET:
            raise _Decline
        if a.dtype != self.dtype:
            a = a.to(self.dtype)
        if counted and self.mask is not None:
            a = zero_uncounted(a, self.mask, False, self._keep)
        return a

    def masked(self, mask: Any, own: bool) -> None:
        """Count and mask by ``mask`` (a mask option's value, or the call's)."""
        m = self._read(mask, token=True)
        if m.dtype.is_complex:
            raise _Decline
        if m.dtype != torch.bool:
            m = m.to(torch.bool)  # (nonzero is counted, NaN too)
        fresh = self.values.dtype != self._arrays[0].dtype  # (a float32 copy of half precision)
        counted = count_and_keep if own else zero_and_count
        self.values, count, self._keep = counted(self.values, m, fresh)
        self.mask, self._count = m, count
        self._local = count
        self._den = count.clamp_min(1.0)  # (Batch._clamped: what per_token divides by)


def _flat_run(
    reg: Any,
    x: Any,
    kernel: Any,
    results: list[Any],
    data: Any = None,
    mask: Any = None,
    rows: bool = False,
) -> _Run | None:
    """A term by its fused kernel over one tensor ``x`` (the caller's, or a list's
    concatenation), without a Batch: a plain term (see :func:`_plain`), or one whose mask
    and fields :class:`_Flat` reads (``mask``: the call's, or the regularizer's option). Its
    ``(value, metrics)`` is appended to ``results``; None where the kernel declines (then a
    Batch is prepared); :class:`_Decline` where :class:`_Flat` does. ``rows``: a vector per
    token along the last axis (a kernel ``ROWS``)."""
    batch = _Flat(x, reg._opts["reduce"], data, rows)
    if mask is not None:
        batch.masked(mask, getattr(kernel, "MASKS_ITS_OWN", False))
    got = kernel.forward(reg, batch)
    if got is None:
        return None
    value, metrics, state = got
    # (a kernel whose value is finite only where every token is valid: where it is not, a
    # Batch, whose valid_tokens runs)
    if getattr(kernel, "VALID_IF_FINITE", False) and not math.isfinite(value.item()):
        raise _Decline
    results.append((value, metrics))
    return _Run(reg, batch, kernel, state)


def compute_flat(
    terms: list[tuple[Any, Any]], x: Any, kernels: dict[str, Any], data: Any = None
) -> list[tuple[Array, Metrics]] | None:
    """:func:`compute` of ``(regularizer, mask)`` terms over one float tensor, with no
    counts, each of per-token values (``event_ndim`` 0, or 1 for a kernel ``ROWS``),
    ``reduce`` "sum" or "mean" and a fused kernel: the call without a Batch (see
    :class:`_Flat`), one node for every term where ``x`` requires grad (else, nothing to
    record, the kernels' numbers with no node). A term's ``mask`` is the call's
    (``base.UNSET`` where it gave none). None where a Batch must be prepared."""
    if x.dtype not in _FLOATS or _functorch_active():
        return None
    picked = []
    for reg, mask in terms:
        o, kernel = reg._opts, kernels.get(reg.name)
        if kernel is None or o["target"] != "logprobs":
            return None
        # (a kernel ROWS reads a vector per token, along the last axis, and no valid_tokens)
        rows = reg.event_ndim == 1 and getattr(kernel, "ROWS", False) and x.ndim >= 1
        if rows and (o.get("axis", -1) not in (-1, x.ndim - 1) or not x.shape[-1]):
            return None
        if reg.event_ndim != 0 and not rows:
            return None
        if o["reduce"] != "sum" and o["reduce"] != "mean":
            return None
        # (of the per-token built-ins, those with valid_tokens have kernels VALID_IF_FINITE,
        # read on the host: on the CPU only)
        if getattr(kernel, "VALID_IF_FINITE", False) and x.device.type != "cpu":
            return None
        m = o["mask"] if type(mask).__name__ == "_Unset" else mask
        picked.append((reg, kernel, m, rows))
    results: list[tuple[Any, Metrics]] = []
    runs: list[_Run] = []
    with _NoGrad():
        try:
            for reg, kernel, m, rows in picked:
                run = _flat_run(reg, x, kernel, results, data, m, rows)
                if run is None:
                    return None
                runs.append(run)
        except _Decline:
            return None
    if not (x.requires_grad and torch.is_grad_enabled()):  # (nothing to record: no node)
        return [(_own(v, m), m) for v, m in results]

    def generic(arrays: tuple[Any, ...]) -> list[Any]:
        with disabled():
            return [reg.compute(data, arrays[0], mask=mask)[0] for reg, mask in terms]

    node = _Call(runs, runs[0].batch, generic)
    values = _apply(node, [_own(v, m) for v, m in results], x)
    return [(v, metrics) for v, (_, metrics) in zip(values, results, strict=True)]


def value_metrics_and_grad(reg: Any, batch: Any) -> tuple[Array, Metrics, Array] | None:
    """``(value, metrics, g)`` for ``value_and_grad`` on torch tensors: ``g`` = d value /
    d ``batch.values`` by the closed form (``reg``'s kernel in ``torch_fused.GRAD`` where it
    has one, run forward then backward at once; else ``evaluate_with_grad``); where the
    tensors require grad, the value is differentiable through it. None where the generic
    path must be recorded (a field it reads requires grad, or ``torch.func``)."""
    values = batch.values
    recorded = values.requires_grad and torch.is_grad_enabled()
    if _functorch_active():
        return None
    watch: list[str] = []
    constant = batch.constant_values(values.detach() if recorded else values, watch)
    with _NoGrad():
        value, metrics, g = _closed_form(reg, constant)
    if watch:
        return None
    if not recorded:
        return value, metrics, g

    def generic(arrays: tuple[Any, ...]) -> list[Any]:
        return [reg.evaluate(batch.constant_values(arrays[0], []))[0]]

    node = _Call([_Run(reg, _Values(values), _Saved, g)], _Values(values), generic)
    (out,) = _apply(node, [_own(value, metrics)], values)
    return out, metrics, g


def _closed_form(reg: Any, batch: Any) -> tuple[Any, Metrics, Any]:
    """Value, metrics and gradient w.r.t. ``batch.values`` (which ``Batch.pullback`` takes to
    ``logprobs``): the kernel's forward and its backward with a scale of 1, as
    ``loss.backward()`` runs them; else :class:`Generic`."""
    kernel = GRAD.get(reg.name)
    got = None if kernel is None else kernel.forward(reg, batch)
    if kernel is None or got is None:
        return Generic.forward(reg, batch)
    value, metrics, state = got
    one = torch.ones((), dtype=value.dtype, device=value.device)
    return value, metrics, kernel.grad(reg, batch, state, one)


class _Values:
    """A stand-in Batch whose one tensor is ``batch.values`` itself."""

    __slots__ = ("_arrays", "_is_list", "_moved", "target", "values")

    def __init__(self, values: Any) -> None:
        self._arrays, self._is_list, self._moved = [values], False, None
        self.target, self.values = "logprobs", values


class _Saved:
    """The kernel of :func:`value_metrics_and_grad`: the gradient was computed already."""

    @staticmethod
    def grad(reg: Any, batch: Any, g: Any, scale: Any) -> Any:
        return g * scale.to(g.dtype)
