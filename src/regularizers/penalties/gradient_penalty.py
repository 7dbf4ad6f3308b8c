"""WGAN-GP's gradient penalty: ``(‖g‖₂ - c)²`` per row of a gradient the caller computed."""

from __future__ import annotations

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import row_norms
from .._core.options import option
from .._core.typing import Array, Metrics

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
