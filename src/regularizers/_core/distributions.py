r"""What the penalties over distributions along a class axis share.

Everything here works on rows ``[c, V]`` (the class axis last, as :class:`Batch` gives it)
with standard array API calls only, and is **NaN-free under -inf classes** on every backend,
for the value and for any autodiff through it:

- :func:`log_softmax` returns ``log p`` as **0** (not -inf) at -inf classes, so that every
  ``p · log p`` there is ``0 · 0`` (the convention 0·log 0 = 0), and its ``max`` shift is a
  constant for autodiff; a row of all -inf gives ``p = 0`` and ``lse = 0``, not NaN (such rows
  are masked anyway: :func:`valid_rows`).
- Every ``where`` that drops an infinite or undefined branch has its inputs sanitized first
  (the *double where*): autodiff multiplies the unselected branch's local derivative by 0,
  and ``0 · inf`` would be NaN, so no local derivative here is ever infinite.
- A divergence that is truly +inf (x·log(x/0) with x > 0) is a ``where`` selecting the
  constant +inf; its gradient for that token is 0 (the value already says it all), in the
  closed form and under autodiff alike, and never NaN.

Memory: :func:`blockwise` runs a row function over blocks of at most :data:`BLOCK` elements
and concatenates the per-token results (and, for ``value_and_grad``, the gradient), so that
the temporaries of the maths (``p``, ``log p``, ``log q``, ...) exist for one block at a time:
beyond the input and its gradient, one ``[n, V]`` array at most is alive (the gradient's
blocks before they are joined). Autodiff through ``compute`` records the blocks' temporaries
for its backward pass (torch keeps ``p`` and ``log p`` and their sanitized copies of every
block, about 3 to 4 arrays ``[n, V]``); the closed form (``value_and_grad``) keeps none.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

from .. import checks
from .backends import not_all_neg_inf
from .base import Regularizer
from .inputs import Batch
from .options import option
from .rows import const, kl_rows, log_normalize, log_softmax
from .typing import Array, Metrics

__all__ = [
    "BLOCK",
    "OverClasses",
    "axis_option",
    "blockwise",
    "check_scores_target",
    "const",
    "kl_rows",
    "log_normalize",
    "log_softmax",
    "operand_option",
    "require",
    "temperature_option",
    "valid_rows",
]

BLOCK = 1 << 20
"""Elements (rows x classes) per block of :func:`blockwise`: 4 MiB of float32."""


# ---- options -------------------------------------------------------------------------------
def _axis(option_name: str, value: object) -> int:
    """An integer (not bool): the class axis."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{option_name} must be an int (the class axis), got {type(value).__name__} {value!r}"
        )
    return int(value)


def axis_option() -> Any:
    return option(-1, check=_axis, doc="the class axis (moved last)")


def temperature_option() -> Any:
    return option(1.0, check=checks.positive, doc="scores are divided by it before log-softmax")


def operand_option(what: str) -> Any:
    """The array a penalty compares with (``reference``, ``paired``): a Field, or an array /
    list of arrays; required (checked by :func:`require`), and also accepted by position."""
    return option(None, check=checks.optional(checks.operand), doc=what, positional=True)


def require(reg: Regularizer, name: str) -> None:
    """A TypeError if the required operand ``name`` was not given."""
    if reg.options()[name] is None:
        kind = type(reg).__name__
        raise TypeError(
            f"{kind} needs {name}=: a Field(key) of data, or an array (or list of arrays) "
            f"shaped like the input, e.g. {kind}(rg.Field({name!r}))"
        )


def check_scores_target(reg: Regularizer) -> None:
    """``target="probs"`` (exp of the input) has no meaning for scores along a class axis."""
    if reg.target == "probs":
        raise ValueError(
            f"{type(reg).__name__} takes target='logprobs' (logits or logprobs along the class "
            "axis) or a Field; target='probs' has no meaning here: pass logits or logprobs, "
            "which are normalized with log-softmax"
        )


class OverClasses(Regularizer):
    """The shape of a penalty over a class axis: ``evaluate`` and ``evaluate_with_grad``
    both come from one ``_run(batch, grad) -> (value, metrics, g or None)``, and the input is
    scores (``target="probs"`` is refused)."""

    event_ndim = 1

    def check_options(self) -> None:
        super().check_options()
        check_scores_target(self)

    def _run(self, batch: Batch, grad: bool) -> tuple[Array, Metrics, Array | None]:
        raise NotImplementedError

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        value, metrics, _ = self._run(batch, False)
        return value, metrics

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        value, metrics, g = self._run(batch, True)
        assert g is not None
        return value, metrics, g


# ---- arrays ---------------------------------------------------------------------------------
def valid_rows(batch: Batch, *rows: Array) -> Array:
    """``[n]`` bool: tokens none of whose ``rows`` (``[n, V]`` arrays) are all -inf.

    One pass per array (``max != -inf``; NaN counts as valid, so that it propagates, also
    where XLA's own max drops it: :func:`~.backends.not_all_neg_inf`).
    An empty class axis has no distribution: a ValueError.
    """
    xp = batch.xp
    if batch.values.ndim > 1 and batch.values.shape[-1] == 0:
        raise ValueError("the class axis has size 0: there is no distribution to penalize")
    if batch.size == 0:  # (Dask cannot take a max over no rows)
        return xp.ones((0,), dtype=xp.bool, device=batch.device)
    ok = None
    for r in rows:
        here = not_all_neg_inf(xp, r)
        ok = here if ok is None else xp.logical_and(ok, here)
    assert ok is not None
    return ok


# ---- blocks of rows -------------------------------------------------------------------------
RowFn = Callable[..., tuple[Sequence[Array], Array | None]]


def blockwise(
    batch: Batch,
    fn: RowFn,
    operands: Sequence[Array] = (),
    *,
    grad: bool = False,
    zero_values: bool = False,
) -> tuple[list[Array], Array | None]:
    """Run ``fn(values_block, *operand_blocks)`` over blocks of tokens and join the results.

    ``fn`` returns ``(outs, dp)``: per-token ``[c]`` arrays (the first is the penalty ``p``)
    and, when ``grad``, ``dp`` = d p_i / d values_i (shaped like the block). The operands
    (other ``[n, ...]`` arrays, read with ``batch.field(..., counted=False)``) get their
    uncounted tokens zeroed here, block by block. ``batch.values`` is 0 at the tokens the
    caller's mask drops, and holds what it held at those :meth:`Batch.restrict` drops (rows
    of all -inf, which the maths here handles); ``zero_values=True`` zeroes those too (one
    more pass, for maths that cannot take them).

    Returns the joined ``outs`` and, when ``grad``, the gradient of ``batch.aggregate(p)``
    w.r.t. ``batch.values`` (``reduce`` and ``counts`` honoured; uncounted tokens are zeroed
    by the pullback). Where the namespace's arrays are writable (all but JAX's) the gradient
    is written block by block into one array; otherwise its blocks are concatenated, which
    holds them twice for a moment.
    """
    xp, values = batch.xp, batch.values
    n = batch.size
    width = math.prod([int(d) for d in values.shape[1:]])
    step = max(1, BLOCK // max(width, 1))
    w = batch.token_weights() if grad else None
    if n == 0:  # no tokens: the outputs of one zero row, cut to none (no max over nothing)
        zero_row = xp.zeros((1, *values.shape[1:]), dtype=values.dtype, device=batch.device)
        got, _ = fn(zero_row, *[zero_row for _ in operands])
        return [o[0:0] for o in got], (xp.zeros_like(values) if grad else None)
    blocks = [None] if n <= step else [slice(i, min(i + step, n)) for i in range(0, n, step)]
    out = None
    if grad and len(blocks) > 1:
        out = xp.empty(values.shape, dtype=values.dtype, device=batch.device)
        out = out if array_api_compat.is_writeable_array(out) else None
    outs: list[list[Array]] = []
    grads: list[Array] = []
    for sl in blocks:
        z = values if sl is None else values[sl, ...]
        z = _counted(batch, z, sl) if zero_values else z
        ops = [_counted(batch, o if sl is None else o[sl, ...], sl) for o in operands]
        got, dp = fn(z, *ops)
        outs.append(list(got))
        if grad:
            assert dp is not None
            piece = _weighted(batch, dp, w, sl)
            if out is not None:
                out[sl, ...] = piece
            else:
                grads.append(piece)
    joined = [
        outs[0][k] if len(outs) == 1 else xp.concat([o[k] for o in outs], axis=0)
        for k in range(len(outs[0]))
    ]
    if not grad:
        return joined, None
    if out is not None:
        return joined, out
    return joined, grads[0] if len(grads) == 1 else xp.concat(grads, axis=0)


def _counted(batch: Batch, a: Array, sl: slice | None) -> Array:
    """A block of an operand with its uncounted tokens set to 0."""
    if batch.mask is None:
        return a
    xp = batch.xp
    m = batch.mask if sl is None else batch.mask[sl]
    m = xp.reshape(m, (-1,) + (1,) * (a.ndim - 1))
    return xp.where(m, a, const(xp, 0.0, a))


def _weighted(batch: Batch, dp: Array, w: Any, sl: slice | None) -> Array:
    """``dp`` times the token weights of ``reduce`` (a number, 0-d or per-token array)."""
    if isinstance(w, float):
        return dp if w == 1.0 else dp * w
    if w.ndim == 0:
        return dp * w
    xp = batch.xp
    piece = w if sl is None else w[sl]
    return dp * xp.reshape(piece, (-1,) + (1,) * (dp.ndim - 1))
