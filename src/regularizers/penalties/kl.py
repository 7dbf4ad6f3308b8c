"""Exact KL divergence along the class axis, between the model and a reference."""

from __future__ import annotations

from .. import checks
from .._core.distributions import (
    OverClasses,
    axis_option,
    blockwise,
    kl_rows,
    operand_option,
    require,
    temperature_option,
    valid_rows,
)
from .._core.inputs import Batch
from .._core.options import option
from .._core.typing import Array, Metrics

__all__ = ["KL"]


class KL(OverClasses, name="kl"):
    r"""KL divergence between the model's distribution and a reference, per token.

    With :math:`p = \operatorname{softmax}(z/T)` (the model: the input, logits or
    logprobs) and :math:`q = \operatorname{softmax}(r/T)` (the ``reference``, normalized the
    same way, the same temperature dividing it, as in TRL's GKD):

    .. math::

        \mathrm{KL}(p\|q) = \sum_v p_v(\log p_v - \log q_v)

    ``direction="reverse"`` is KL(p‖q) (mode-seeking), ``"forward"`` KL(q‖p) (mass-covering),
    ``"symmetric"`` their mean. Per-token values are aggregated over tokens by ``reduce``.
    The gradient w.r.t. the scores is :math:`p\odot(\log p - \log q - \mathrm{KL})/T`
    (reverse) and :math:`(p - q)/T` (forward); the reference is a constant.

    **-inf is a masked class**: a class whose score is -inf has probability 0 and
    contributes 0 (0·log 0 = 0), with finite gradients; a token whose model or reference
    scores are all -inf is not counted (not in the value, the gradient, ``N`` or ``S``).
    Where the first distribution is > 0 and the second is 0 (a score finite in one and -inf
    in the other) the token's KL is +inf, as it should be; its gradient is then 0, never NaN.
    A NaN among the token's scores or reference scores makes its KL and gradient NaN, gap or
    not (NaN + inf is NaN).

    Metrics: ``kl_raw`` (Σ over tokens), ``kl_mean`` (per counted token), ``kl_max``.

    Parameters
    ----------
    reference : Field or array or list of arrays
        The reference scores (logits or logprobs), shaped like the input; also accepted
        first by position. Never differentiated by ``value_and_grad``.
    direction : {"reverse", "forward", "symmetric"}, default "reverse"
    temperature : float, default 1.0
        ``> 0``; divides the scores of both distributions.
    axis : int, default -1
        The class axis.
    reduce, mask, target, max_tokens
        As for every regularizer; ``mask`` has the shape without the class axis.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> z = xp.asarray([[0.0, 0.0], [0.0, -float("inf")]])
    >>> r = xp.asarray([[0.0, 0.0], [0.0, 0.0]])
    >>> value, metrics = rg.KL(r)(z)       # KL(p||q): log 2 for the second token
    >>> round(float(value), 6)
    0.693147
    >>> float(rg.KL(r, direction="forward")(z)[0])   # q > 0 where p = 0
    inf
    """

    reference = operand_option("the reference scores (a Field or arrays)")
    direction = option(
        "reverse",
        check=checks.one_of("reverse", "forward", "symmetric"),
        doc="reverse KL(p||q), forward KL(q||p), or their mean",
    )
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
        xp, how, t = batch.xp, self.direction, self.temperature

        def rows(z: Array, r: Array) -> tuple[list[Array], Array | None]:
            value, g = kl_rows(xp, z, r, how, t, grad)
            return [value], g

        # (a row dropped for its reference's all -inf keeps scores that may be +inf or NaN:
        # zeroed, as the reference's row is, so that autodiff has no NaN slope there)
        (p,), g = blockwise(batch, rows, [self._reference(batch)], grad=grad, zero_values=True)
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("kl", p, total=raw), g
