"""L1 sparsity (ADR-001): ``Σ|t|``, aggregated by ``reduce``."""

from __future__ import annotations

from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_
from .._core.typing import Array, Metrics

__all__ = ["L1"]


class L1(Regularizer, name="l1_sparsity"):
    r"""L1 penalty on logprobs, probabilities or a field of ``data``.

    .. math::

        p_i = |t_i|, \qquad \mathrm{L1}(t) = \operatorname{reduce}(p)

    (``reduce="sum"``: :math:`\sum_i |t_i|`; ``"mean"``: divided by the number of counted
    elements; the per-sequence modes are in :doc:`concepts`), with the subgradient
    :math:`\partial|x|/\partial x = \operatorname{sign}(x)`, **0 at 0**, on every backend.
    Metrics: ``l1_raw`` = :math:`\sum|t|` (whatever ``reduce``) and ``l1_mean`` =
    :math:`\sum|t| / N`.

    Parameters
    ----------
    target : {"logprobs", "probs"} or Field, default "logprobs"
        What is penalized; ``("field", key)`` is accepted for ``Field(key)``.
    reduce : str, default "sum"
        ``"sum"``, ``"mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
        ``"seq-mean-token-sum-norm"`` (with ``max_tokens``).
    mask : None, array, list or Field, optional
        Only elements whose mask is nonzero count.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.L1()(xp.asarray([-2.0, 0.0, 1.0]))
    >>> value
    Array(3., dtype=array_api_strict.float64)
    >>> rg.to_floats(metrics)
    {'l1_raw': 3.0, 'l1_mean': 1.0}
    """

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        p = abs_(batch.xp, batch.values)
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("l1", p, total=raw, peak=False)

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        value, metrics = self.evaluate(batch)
        return value, metrics, batch.aggregate_grad(batch.xp.sign(batch.values))
