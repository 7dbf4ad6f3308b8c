"""Huber: ``½u²`` for ``|u| <= δ``, ``δ(|u| - ½δ)`` beyond, with ``u = clip(t) - center``."""

from __future__ import annotations

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_, clip_, scalar
from .._core.options import option
from .._core.typing import Array, Metrics
from .l2 import center_grad, clip_grad, deviation

__all__ = ["Huber"]


class Huber(Regularizer, name="huber"):
    r"""Huber loss of the deviation of the target from a center: L2 near it, L1 far away.

    .. math::

        u_i = c(t_i) - \mu, \qquad
        p_i = \begin{cases} \tfrac12 u_i^2 & |u_i| \le \delta \\
                            \delta\,(|u_i| - \tfrac12\delta) & |u_i| > \delta \end{cases},
        \qquad \mathrm{H}(t) = \operatorname{reduce}(p)

    with ``c`` (``clip``) and :math:`\mu` (``center``) exactly as in :class:`~regularizers.L2`:
    clip first, then center. The gradient is :math:`\operatorname{clip}(u, -\delta, \delta)`
    (so :math:`\pm\delta` at the kinks :math:`u = \pm\delta`, from either side and under any
    autodiff) where ``lo <= t <= hi`` (bounds included), and 0 strictly outside. Hence
    :math:`0 \le p \le \tfrac12 u^2`, :math:`p \le \delta|u|`, :math:`|\nabla p| \le \delta`,
    and Huber is half of :class:`~regularizers.L2` when :math:`\delta \ge \max|u|`.

    Metrics: ``huber_raw`` = :math:`\sum p`, ``huber_mean`` = :math:`\sum p / N`, ``huber_max``
    = :math:`\max p`.

    Parameters
    ----------
    delta : float > 0, default 1.0
        :math:`\delta`, where the quadratic turns linear.
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
    >>> value, metrics = rg.Huber(delta=1.0)(xp.asarray([-3.0, 0.5, 1.0]))
    >>> float(value)  # 1 * (3 - 0.5) + 0.5 * 0.25 + 0.5 * 1
    3.125
    >>> rg.to_floats(metrics)["huber_max"]
    2.5
    """

    delta = option(1.0, check=checks.positive, doc="δ > 0, where the quadratic turns linear")
    center = option(None, check=checks.center, doc="None, 'mean' or a number, after clipping")
    clip = option(None, check=checks.interval, doc="(lo, hi) applied first")

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._reduce(batch, deviation(self, batch))

    def _reduce(self, batch: Batch, u: Array) -> tuple[Array, Metrics]:
        xp = batch.xp
        d = scalar(xp, self.delta, u)
        a = abs_(xp, u)
        near = a <= d
        # Double where: the square sees 0 where it is not selected, so an infinite u sends
        # no 0 · inf into autodiff. |u| = δ selects ½u², whose slope there is ±δ = clip(u):
        # autodiff on every backend and the closed form agree at the kinks.
        q = xp.where(near, u, xp.zeros_like(u))
        p = xp.where(near, 0.5 * (q * q), d * (a - 0.5 * d))
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("huber", p, total=raw)

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        u = deviation(self, batch)
        value, metrics = self._reduce(batch, u)
        dp = clip_(batch.xp, u, -self.delta, self.delta)
        g = center_grad(self, batch, batch.aggregate_grad(dp))
        return value, metrics, clip_grad(self, batch, g)
