"""L1 sparsity (ADR-001): ``Σ|t|``, or its mean over the counted elements."""

from __future__ import annotations

from typing import ClassVar

from ._base import Metrics, Regularizer
from ._fastpath import KINDS
from ._inputs import Array, Batch
from ._ops import abs_

__all__ = ["L1"]


class L1(Regularizer):
    r"""L1 penalty on logprobs, probabilities or a field of ``data``.

    .. math::

        \mathrm{L1}(t) = \sum_i |t_i| \quad (\texttt{reduce="sum"}), \qquad
        \frac{1}{n}\sum_i |t_i| \quad (\texttt{reduce="mean"})

    with the subgradient :math:`\partial|x|/\partial x = \operatorname{sign}(x)`, 0 at 0, on
    every backend. Metrics: ``l1_raw`` = :math:`\sum|t|` (whatever ``reduce``) and
    ``l1_mean`` = :math:`\sum|t| / n`.

    Parameters
    ----------
    target : {"logprobs", "probs"} or Field, default "logprobs"
        What is penalized; ``("field", key)`` is accepted for ``Field(key)``.
    reduce : {"sum", "mean"}, default "sum"
    mask : None, array or Field, optional
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

    name: ClassVar[str] = "l1_sparsity"

    def _evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        raw = batch.sum(abs_(batch.xp, batch.values))
        mean = batch.per_element(raw)
        value = raw if self.reduce == "sum" else mean
        return value, {"l1_raw": raw, "l1_mean": mean}

    def _evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        value, metrics = self._evaluate(batch)
        grad = batch.xp.sign(batch.values) * batch.grad_scale(self.reduce)
        return value, metrics, grad


KINDS[L1] = "l1"  # the exact class has native fast paths (_fastpath.py)
