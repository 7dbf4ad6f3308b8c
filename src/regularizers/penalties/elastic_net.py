"""Elastic net: ``a·|u| + (1 - a)·u²`` with ``u = clip(t) - center``, aggregated by ``reduce``."""

from __future__ import annotations

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_
from .._core.options import option
from .._core.typing import Array, Metrics
from .l2 import center_grad, clip_grad, deviation

__all__ = ["ElasticNet"]


class ElasticNet(Regularizer, name="elastic_net"):
    r"""A mix of L1 and L2 on the deviation of the target from a center.

    .. math::

        u_i = c(t_i) - \mu, \qquad p_i = \alpha\,|u_i| + (1 - \alpha)\,u_i^2,
        \qquad \mathrm{EN}(t) = \operatorname{reduce}(p)

    with :math:`\alpha` = ``l1_ratio`` in [0, 1], and ``c`` (``clip``) and :math:`\mu`
    (``center``) exactly as in :class:`~regularizers.L2`: clip first, then center. The
    gradient is :math:`\alpha\,\operatorname{sign}(u) + 2(1 - \alpha)\,u` with
    :math:`\operatorname{sign}(0) = 0`, where ``lo <= t <= hi`` (bounds included), and 0
    strictly outside. ``l1_ratio=1`` is :class:`~regularizers.L1` of ``u`` and
    ``l1_ratio=0`` is :class:`~regularizers.L2` (a term whose weight is exactly 0 is left
    out, so ``±inf`` gives ``inf``, not ``0 · inf``).

    Metrics: ``elastic_net_raw`` = :math:`\sum p`, ``elastic_net_mean`` = :math:`\sum p / N`,
    and the unweighted parts ``l1_raw`` = :math:`\sum |u|`, ``l2_raw`` = :math:`\sum u^2`.

    Parameters
    ----------
    l1_ratio : float in [0, 1], default 0.5
        :math:`\alpha`, the weight of the L1 part.
    center : None, "mean" or float, default None
    clip : None or (lo, hi), default None
    target : {"logprobs", "probs"} or Field, default "logprobs"
    reduce : str, default "sum"
    mask : None, array, list or Field, optional
        Only elements whose mask is nonzero count.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.ElasticNet(l1_ratio=0.25)(xp.asarray([-2.0, 0.0, 1.0]))
    >>> float(value)  # 0.25 * 3 + 0.75 * 5
    4.5
    >>> rg.to_floats(metrics)
    {'elastic_net_raw': 4.5, 'elastic_net_mean': 1.5, 'l1_raw': 3.0, 'l2_raw': 5.0}
    """

    l1_ratio = option(0.5, check=checks.unit_interval, doc="the weight of |u|, in [0, 1]")
    center = option(None, check=checks.center, doc="None, 'mean' or a number, after clipping")
    clip = option(None, check=checks.interval, doc="(lo, hi) applied first")

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._reduce(batch, deviation(self, batch))

    def _reduce(self, batch: Batch, u: Array) -> tuple[Array, Metrics]:
        a = self.l1_ratio
        l1, l2 = abs_(batch.xp, u), u * u
        p = l1 if a == 1.0 else l2 if a == 0.0 else a * l1 + (1.0 - a) * l2
        raw = batch.sum(p)
        metrics = batch.metrics("elastic_net", p, total=raw, peak=False)
        metrics["l1_raw"] = batch.sum(l1)
        metrics["l2_raw"] = batch.sum(l2)
        return batch.aggregate(p, total=raw), metrics

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        u = deviation(self, batch)
        value, metrics = self._reduce(batch, u)
        a, sign = self.l1_ratio, batch.xp.sign(u)
        dp = sign if a == 1.0 else 2.0 * u if a == 0.0 else a * sign + (2.0 - 2.0 * a) * u
        g = center_grad(self, batch, batch.aggregate_grad(dp))
        return value, metrics, clip_grad(self, batch, g)
