"""WGAN-GP's gradient penalty: ``(‖g‖₂ - c)²`` per row of a gradient the caller computed."""

from __future__ import annotations

from array_api_compat import device

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_
from .._core.options import option
from .._core.typing import Array, Metrics, Namespace

__all__ = ["GradientPenalty", "row_norms"]


class GradientPenalty(Regularizer, name="gradient_penalty"):
    r"""Squared distance of each row's Euclidean norm from ``target_norm`` (WGAN-GP).

    The input is a gradient the caller computed (for WGAN-GP, of the critic w.r.t. its
    interpolated inputs), with the vector axis ``axis`` (default last): ``[T, D]``,
    ``[B, T, D]`` or a list of ``[T_i, D]``. Per row :math:`g`,

    .. math::

        p(g) = (\lVert g\rVert_2 - c)^2, \qquad
        \nabla_g\, p = 2 (\lVert g\rVert_2 - c)\, \frac{g}{\lVert g\rVert_2},

    aggregated over rows with ``reduce`` (mask: one value per row). The gradient of
    :math:`\lVert g\rVert` is :math:`g/\lVert g\rVert` and, by convention, **0 at g = 0**
    (where the norm has no derivative), so a zero row has value :math:`c^2` and gradient
    exactly 0, not NaN, for ``value_and_grad`` and for torch and JAX autodiff through
    ``compute`` alike. The norm is computed as :math:`a \lVert g / a\rVert` with
    :math:`a = \max_k |g_k|`, so it neither overflows nor underflows where the norm itself
    is representable; NaN propagates and ±inf gives an infinite norm.

    Metrics: ``gradient_penalty_raw`` = :math:`\sum p`, ``gradient_penalty_mean`` =
    :math:`\sum p / N`, ``gradient_penalty_max`` = :math:`\max p`, and ``grad_norm_mean``
    = the mean :math:`\lVert g\rVert` over the counted rows.

    Parameters
    ----------
    target_norm : float, default 1.0
        ``c >= 0``: the norm each row is pulled towards (1 in WGAN-GP; 0 gives the squared
        norm, R1-style).
    axis : int, default -1
        The axis of the gradient vectors.
    target : {"logprobs", "probs"} or Field, default "logprobs"
        What is penalized (``"logprobs"``: the array passed, here the gradient).
    reduce : str, default "sum"
        How the per-row penalties are aggregated (``"mean"`` is WGAN-GP's batch mean).
    mask : None, array, list or Field, optional
        Only rows whose mask is nonzero count.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> g = xp.asarray([[3.0, 4.0], [0.0, 0.0]])
    >>> value, metrics, grad = rg.GradientPenalty(reduce="mean").value_and_grad(None, g)
    >>> float(value)  # ((5 - 1)² + (0 - 1)²) / 2
    8.5
    >>> rg.to_floats(metrics)["grad_norm_mean"]
    2.5
    >>> grad[0, :]  # (5 - 1) · (3, 4) / 5
    Array([2.4, 3.2], dtype=array_api_strict.float64)
    >>> bool(xp.all(grad[1, :] == 0.0))  # 0 at g = 0
    True
    """

    event_ndim = 1

    target_norm = option(1.0, check=checks.nonnegative, doc="c: the norm rows are pulled to")
    axis = option(-1, check=checks.axis, doc="the axis of the gradient vectors")

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        norm, _ = row_norms(batch.xp, batch.values)
        return self._finish(batch, norm)

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        norm, unit = row_norms(batch.xp, batch.values)
        value, metrics = self._finish(batch, norm)
        slope = 2.0 * (norm - self.target_norm)
        return value, metrics, batch.aggregate_grad(batch.xp.expand_dims(slope, axis=-1) * unit)

    def _finish(self, batch: Batch, norm: Array) -> tuple[Array, Metrics]:
        d = norm - self.target_norm
        p = d * d
        raw = batch.sum(p)
        metrics = batch.metrics("gradient_penalty", p, total=raw)
        metrics["grad_norm_mean"] = batch.mean(norm)
        return batch.aggregate(p, total=raw), metrics


def row_norms(xp: Namespace, g: Array) -> tuple[Array, Array]:
    """``(‖g‖₂ per row, g / ‖g‖₂)`` over the last axis; a zero row has norm 0 and unit 0.

    Scaled by the row's largest magnitude ``a``: ``‖g‖ = a ‖g / a‖`` with ``‖g / a‖`` in
    ``[1, √D]``, so nothing overflows or underflows on the way. Zero rows take ``a = 1`` and
    ``sqrt(1)`` inside (the double ``where``): their norm is 0 with derivative 0 under any
    autodiff, never ``0 · inf``. The derivative through ``a`` itself is 0 (the norm is
    homogeneous), so autodiff sees ``g / ‖g‖``. A row holding NaN has norm NaN, one holding
    ±inf norm inf and unit NaN (no direction), without a floating-point warning on the way.
    """
    if g.shape[0] == 0:  # no rows (a static shape): Dask mishandles reducing empty chunks
        return xp.sum(g, axis=-1), g  # [0] and [0, D], still in autodiff's graph
    a = xp.max(abs_(xp, g), axis=-1)
    nonzero = a != 0  # NaN counts as nonzero, so it propagates
    one = xp.ones_like(a)
    scale = xp.where(xp.logical_and(nonzero, xp.isfinite(a)), a, one)  # inf / inf: never
    h = g / xp.expand_dims(scale, axis=-1)
    r = xp.sqrt(xp.where(nonzero, xp.sum(h * h, axis=-1), one))
    norm = xp.where(nonzero, a * r, xp.zeros_like(a))
    finite = xp.expand_dims(xp.isfinite(r), axis=-1)
    safe_r = xp.expand_dims(xp.where(xp.isfinite(r), r, one), axis=-1)
    nan = xp.asarray(xp.nan, dtype=g.dtype, device=device(g))
    return norm, xp.where(finite, h / safe_r, nan)
