"""L2 weight decay (ADR-002): ``Σ (clip(t) - center)²``, aggregated by ``reduce``."""

from __future__ import annotations

from typing import Any

from .. import checks
from .._core.backends import max_
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import clip_, inside_clip, scalar
from .._core.options import option
from .._core.typing import Array, Metrics

__all__ = ["L2", "deviation"]


def deviation(reg: Any, batch: Batch) -> Array:
    """``c(t) - center`` over the flat target: clip first, then center (shared by the
    penalties that take ``center`` and ``clip``)."""
    xp, t = batch.xp, batch.values
    c = t if reg.clip is None else clip_(xp, t, *reg.clip)
    center: Any = reg.center
    if center == "mean":
        return c - batch.local_mean(c)
    if center is not None:
        return c - scalar(xp, center, c)
    return c


def clip_grad(reg: Any, batch: Batch, g: Array) -> Array:
    """``g`` where the clip passes the gradient (bounds included), 0 strictly outside."""
    if reg.clip is None:
        return g
    xp = batch.xp
    return xp.where(inside_clip(xp, batch.values, *reg.clip), g, xp.zeros_like(g))


def center_grad(reg: Any, batch: Batch, g: Array) -> Array:
    """With ``center="mean"``, the mean is a function of the input: subtract its share."""
    if reg.center != "mean":
        return g
    return g - batch.local_mean(g)


class L2(Regularizer, name="l2_weight_decay"):
    r"""L2 penalty on logprobs, probabilities or a field of ``data``.

    .. math::

        u_i = c(t_i) - \mu, \qquad p_i = u_i^2, \qquad \mathrm{L2}(t) = \operatorname{reduce}(p)

    applied in this order: ``c`` clips to ``clip=(lo, hi)`` (either bound may be None), then
    :math:`\mu` is ``center`` (None: 0; ``"mean"``: the mean of the clipped target; or a
    number), then the square is aggregated. The gradient is :math:`2u` where
    ``lo <= t <= hi`` (bounds included) and 0 strictly outside; ``center="mean"`` is
    differentiated as a function of the input. Metrics: ``l2_raw`` = :math:`\sum p`,
    ``l2_mean`` = :math:`\sum p / N`, ``l2_max`` = :math:`\max p`.

    Parameters
    ----------
    target : {"logprobs", "probs"} or Field, default "logprobs"
    reduce : str, default "sum"
    center : None, "mean" or float, default None
    clip : None or (lo, hi), default None
        ``clip=(-100.0, 0.0)`` is the ADR's advice for logprobs: it turns ``-inf`` into -100.
    mask : None, array, list or Field, optional
        Only elements whose mask is nonzero count.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> l2 = rg.L2(center="mean", clip=(-100.0, 0.0))
    >>> l2
    L2(center='mean', clip=(-100.0, 0.0))
    >>> value, metrics = rg.L2(clip=(-100.0, 0.0))(xp.asarray([-1.0, -3.0, -float("inf")]))
    >>> float(value)
    10010.0
    >>> rg.to_floats(metrics)["l2_max"]
    10000.0
    """

    center = option(None, check=checks.center, doc="None, 'mean' or a number, after clipping")
    clip = option(None, check=checks.interval, doc="(lo, hi) applied first")

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._reduce(batch, deviation(self, batch))

    def _reduce(self, batch: Batch, d: Array) -> tuple[Array, Metrics]:
        p = d * d
        raw = batch.sum(p)
        metrics = batch.metrics("l2", p, total=raw, peak=False)
        metrics["l2_max"] = max_square(batch, d)
        return batch.aggregate(p, total=raw), metrics

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        d = deviation(self, batch)
        value, metrics = self._reduce(batch, d)
        g = center_grad(self, batch, batch.aggregate_grad(2.0 * d))
        return value, metrics, clip_grad(self, batch, g)


def max_square(batch: Batch, d: Array) -> Array:
    """max of ``d²`` over counted elements, as ``max(max(d)², min(d)²)``; 0 when none.

    Exact (squaring is monotone in |d|), and much cheaper under XLA than a max over the
    squares next to their sum; uncounted elements count as 0, which never wins.
    """
    xp = batch.xp
    if batch.size == 0:
        return batch.zero()
    d = batch.where_counted(d)
    top = max_(xp, d)  # NaN wherever some d is (XLA's own max and min drop it)
    bottom = xp.min(d)
    return xp.where(xp.isnan(top), top, xp.maximum(top * top, bottom * bottom))
