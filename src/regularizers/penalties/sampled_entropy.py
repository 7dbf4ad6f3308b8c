"""Entropy bonus or penalty from the logprobs of sampled tokens only (Tinker's shape)."""

from __future__ import annotations

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.options import option
from .._core.typing import Array, Metrics
from .sampled_kl import importance_ratio

__all__ = ["SampledEntropy"]


class SampledEntropy(Regularizer, name="sampled_entropy"):
    r"""Entropy of the policy estimated from the logprobs of the sampled tokens.

    With :math:`\rho = e^{lp - \mathrm{sg}(b)}`, where ``b`` is the ``behavior`` logprobs (the
    policy that sampled) or ``lp`` itself (then :math:`\rho` has value 1 and gradient
    :math:`\rho\,\partial lp`), the per-token penalty is

    .. math::

        p = \rho\, lp \quad (\text{"maximize"}), \qquad p = -\rho\, lp \quad (\text{"minimize"}),

    so that :math:`E_\pi[p] = \mp H(\pi)` **and** :math:`E_\pi[\nabla p] = \mp\nabla H(\pi)`:
    minimizing it with ``mode="maximize"`` raises the entropy. (Plain ``-lp``, whose mean is
    the same estimate, has expected gradient 0; the ratio is what gives the right one.) The
    closed-form gradient is :math:`\partial p/\partial lp = \pm\rho\,(lp + 1)`.

    Metrics: ``entropy_mean`` = :math:`\sum -\rho\, lp / N`, the entropy estimate in nats
    (positive whatever the mode), ``sampled_entropy_raw`` = :math:`\sum p` and
    ``sampled_entropy_mean`` = :math:`\sum p / N`.

    Parameters
    ----------
    mode : {"maximize", "minimize"}, default "maximize"
        ``"maximize"``: a bonus (minimizing the penalty raises the entropy).
    behavior : None, Field, ("field", key), array or list of arrays, default None
        Logprobs of the sampling policy, for off-policy tokens (never differentiated).
    target, reduce, max_tokens, mask
        As for every regularizer.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.SampledEntropy()(xp.asarray([-0.5, -1.5]))
    >>> float(value)
    -2.0
    >>> rg.to_floats(metrics)["entropy_mean"]
    1.0
    """

    mode = option("maximize", check=checks.one_of("maximize", "minimize"), doc="bonus or penalty")
    behavior = option(None, check=checks.optional(checks.operand), doc="sampling logprobs")

    def _terms(self, batch: Batch) -> tuple[Array, Array]:
        """(rho, rho·lp)."""
        rho = importance_ratio(batch, self.behavior, through_lp=True)
        assert rho is not None
        return rho, rho * batch.values

    def _finish(self, batch: Batch, rho_lp: Array) -> tuple[Array, Metrics]:
        total = batch.sum(rho_lp)  # = -(entropy estimate), summed
        raw = total if self.mode == "maximize" else -total
        p = rho_lp if self.mode == "maximize" else -rho_lp
        metrics = batch.metrics("sampled_entropy", p, total=raw, peak=False)
        metrics["entropy_mean"] = batch.per_token(-total)
        return batch.aggregate(p, total=raw), metrics

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._finish(batch, self._terms(batch)[1])

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        rho, rho_lp = self._terms(batch)
        value, metrics = self._finish(batch, rho_lp)
        dp = rho_lp + rho  # rho·(lp + 1)
        return value, metrics, batch.aggregate_grad(dp if self.mode == "maximize" else -dp)
