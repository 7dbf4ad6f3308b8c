"""Generalized Jensen-Shannon divergence along the class axis (TRL GKD's β)."""

from __future__ import annotations

from .. import checks
from .._core.distributions import (
    OverClasses,
    axis_option,
    blockwise,
    operand_option,
    require,
    temperature_option,
    valid_rows,
)
from .._core.inputs import Batch
from .._core.options import option
from .._core.rows import jsd_rows
from .._core.typing import Array, Metrics

__all__ = ["JSD"]


class JSD(OverClasses, name="jsd"):
    r"""Generalized Jensen-Shannon divergence between the model and a reference, per token.

    With :math:`p = \operatorname{softmax}(z/T)` (the model), :math:`q =
    \operatorname{softmax}(r/T)` (the ``reference``) and the mixture
    :math:`m = \beta q + (1-\beta) p` (computed in log space, by log-sum-exp):

    .. math::

        \mathrm{JSD}_\beta(p, q) = \beta\,\mathrm{KL}(q\|m) + (1-\beta)\,\mathrm{KL}(p\|m)

    This is TRL's ``GKDTrainer.generalized_jsd_loss`` convention: **β weighs the reference**
    (the teacher) in the mixture and in its own KL term. For small β it behaves like
    β·KL(q‖p) (forward KL: TRL's β = 0), near 1 like (1 - β)·KL(p‖q) (reverse KL: TRL's
    β = 1); β = ½ is the symmetric JSD. Swapping p and q equals β → 1 - β. Bounds:
    :math:`0 \le \mathrm{JSD}_\beta \le -\beta\ln\beta - (1-\beta)\ln(1-\beta)` (ln 2 at
    β = ½), so it is finite even where the supports differ. The gradient w.r.t. the scores
    is :math:`(1-\beta)\, p \odot (\log p - \log m - \mathrm{KL}(p\|m)) / T`.

    **-inf is a masked class** (0·log 0 = 0, finite gradients); a token whose model or
    reference scores are all -inf is not counted. Metrics: ``jsd_raw``, ``jsd_mean``,
    ``jsd_max``.

    Parameters
    ----------
    reference : Field or array or list of arrays
        The reference scores, shaped like the input; also accepted first by position.
    beta : float, default 0.5
        In (0, 1), ends excluded.
    temperature : float, default 1.0
    axis : int, default -1
    reduce, mask, target, max_tokens
        As for every regularizer; ``mask`` has the shape without the class axis.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> z = xp.asarray([[0.0, -float("inf")]])      # p = (1, 0)
    >>> r = xp.asarray([[-float("inf"), 0.0]])      # q = (0, 1): disjoint supports
    >>> value, _ = rg.JSD(r)(z)
    >>> round(float(value), 6)                      # the bound, ln 2
    0.693147
    """

    reference = operand_option("the reference scores (a Field or arrays)")
    beta = option(0.5, check=checks.open_unit_interval, doc="the reference's weight in m")
    temperature = temperature_option()
    axis = axis_option()

    def check_options(self) -> None:
        super().check_options()
        require(self, "reference")

    def _reference(self, batch: Batch) -> Array:
        return batch.field(self.reference, role="reference", counted=False)

    def valid_tokens(self, batch: Batch) -> Array:
        return valid_rows(batch, batch.values, self._reference(batch))

    def _run(self, batch: Batch, grad: bool) -> tuple[Array, Metrics, Array | None]:
        xp = batch.xp

        def rows(z: Array, r: Array) -> tuple[list[Array], Array | None]:
            value, g = jsd_rows(xp, z, r, self.beta, self.temperature, grad)
            return [value], g

        # (a row dropped for its reference's all -inf keeps scores that may be +inf or NaN:
        # zeroed, as the reference's row is, so that autodiff has no NaN slope there)
        (p,), g = blockwise(batch, rows, [self._reference(batch)], grad=grad, zero_values=True)
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("jsd", p, total=raw), g
