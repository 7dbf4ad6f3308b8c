"""The z-loss of t5x and PaLM: the squared log-partition function per token."""

from __future__ import annotations

from .._core.distributions import OverClasses, axis_option, blockwise, log_normalize, valid_rows
from .._core.inputs import Batch
from .._core.typing import Array, Metrics

__all__ = ["ZLoss"]


class ZLoss(OverClasses, name="z_loss"):
    r"""Squared log-partition function of the scores, per token (t5x, PaLM).

    .. math::

        \log Z = \log \sum_v e^{z_v}, \qquad p = (\log Z)^2 \ge 0

    on the raw scores (no temperature, no normalization: it keeps the logits' normalizer
    near 0, so it means nothing on logprobs, whose :math:`\log Z` is 0). Its gradient is
    :math:`2 \log Z \cdot \operatorname{softmax}(z)`. Classes whose score is -inf contribute
    nothing; a token whose scores are all -inf is not counted. The usual weight is 1e-4.

    Metrics: ``z_loss_raw``, ``z_loss_mean``, ``z_loss_max``, and ``log_z_mean``: the mean
    :math:`\log Z` per counted token.

    Parameters
    ----------
    axis : int, default -1
        The class axis.
    reduce, mask, target, max_tokens
        As for every regularizer; ``mask`` has the shape without the class axis.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> value, metrics = rg.ZLoss()(xp.asarray([[0.0, 0.0], [1.0, -float("inf")]]))
    >>> round(float(value), 6)    # (log 2)² + 1²
    1.480453
    >>> round(rg.to_floats(metrics)["log_z_mean"], 6)
    0.846574
    """

    axis = axis_option()

    def valid_tokens(self, batch: Batch) -> Array:
        return valid_rows(batch, batch.values)

    def _run(self, batch: Batch, grad: bool) -> tuple[Array, Metrics, Array | None]:
        xp = batch.xp

        def rows(z: Array) -> tuple[list[Array], Array | None]:
            raw, lse = log_normalize(xp, z)
            log_z = xp.reshape(lse, (-1,))
            return [log_z * log_z, log_z], ((2.0 * lse) * xp.exp(raw) if grad else None)

        (p, log_z), g = blockwise(batch, rows, grad=grad)
        raw = batch.sum(p)
        metrics = batch.metrics("z_loss", p, total=raw)
        metrics["log_z_mean"] = batch.mean(log_z)
        return batch.aggregate(p, total=raw), metrics, g
