"""KL to a reference policy from the logprobs of sampled tokens only (Tinker's shape)."""

from __future__ import annotations

from typing import Any

from .. import checks
from .._core.backends import stop_gradient
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_, clip_, inside_clip
from .._core.options import option
from .._core.typing import Array, Metrics, Namespace

__all__ = ["SampledKL", "importance_ratio"]

ESTIMATORS = ("k1", "abs", "k2", "k3")
UNBIASED_OK = ("k1", "k3")


def importance_ratio(batch: Batch, behavior: Any, *, through_lp: bool) -> Array | None:
    """rho = exp(lp - b) per token, or None where rho = 1 and is not differentiated.

    ``behavior`` given: b is read from it and rho is differentiated through lp. Without it,
    ``through_lp`` makes rho = exp(lp - stop_gradient(lp)): value 1, gradient rho·∂lp.
    Its value is 1 at a non-finite lp too (where ``lp - lp`` is NaN), so that the penalty
    there is its k or lp, as the closed form and every fast path give (±inf propagates):
    the ratio is taken of lp with its non-finite entries set to 0 (derivative 0 there).
    Shared by :class:`SampledKL` and ``SampledEntropy``.
    """
    xp, lp = batch.xp, batch.values
    if behavior is not None:
        return xp.exp(lp - batch.field(behavior, role="behavior"))
    if through_lp:
        finite = xp.where(xp.isfinite(lp), lp, xp.zeros_like(lp))
        return xp.exp(finite - stop_gradient(xp, finite))
    return None


def _estimate(xp: Namespace, estimator: str, d: Array) -> Array:
    """The per-token estimator k(d)."""
    if estimator == "k1":
        return d
    if estimator == "abs":
        return abs_(xp, d)
    if estimator == "k2":
        return 0.5 * (d * d)
    return xp.expm1(-d) + d  # k3 = e^{-d} - 1 + d, exact near d = 0


def _slope(xp: Namespace, estimator: str, d: Array) -> Array:
    """dk/dd of :func:`_estimate` (sign 0 at 0 for ``abs``)."""
    if estimator == "k1":
        return xp.ones_like(d)
    if estimator == "abs":
        return xp.sign(d)
    if estimator == "k2":
        return d
    return -xp.expm1(-d)  # 1 - e^{-d}


class SampledKL(Regularizer, name="sampled_kl"):
    r"""KL to a reference policy estimated from the logprobs of the sampled tokens.

    For one-dimensional per-token logprobs ``lp`` of the tokens that were sampled (no
    vocabulary axis: what Tinker's ``forward_backward_custom`` hands a loss) and the reference
    policy's logprobs ``r`` of the same tokens, with :math:`d = \mathrm{clip}(lp - r)`
    (``log_ratio_clip``), the per-token penalty is :math:`p = \rho\, k(d)` with

    ========== ================================ =========================================
    estimator  :math:`k(d)`                     expected gradient (on-policy, :math:`\rho=1`)
    ========== ================================ =========================================
    ``"k1"``   :math:`d`                        0 (value unbiased for KL(π‖ref))
    ``"abs"``  :math:`|d|` (slope 0 at 0)       —
    ``"k2"``   :math:`\tfrac12 d^2`             :math:`\nabla` KL(π‖ref)
    ``"k3"``   :math:`e^{-d} - 1 + d`           :math:`\nabla` KL(ref‖π), the *forward* KL
    ========== ================================ =========================================

    (``k3`` is computed as ``expm1(-d) + d``, exact near 0.) The importance weight is
    :math:`\rho = e^{lp - b}` with ``b`` the ``behavior`` logprobs (the policy that sampled),
    differentiated through ``lp``; without ``behavior`` :math:`\rho = 1`, not differentiated,
    unless ``gradient="unbiased"``, where :math:`\rho = e^{lp - \mathrm{sg}(lp)}` (value 1,
    gradient :math:`\rho\,\partial lp`): then ``k1`` and ``k3`` have the gradient of
    KL(π‖ref) in expectation. With ``behavior`` the ratio already carries that gradient and
    ``gradient="unbiased"`` changes nothing. The closed-form gradient is

    .. math::

        \frac{\partial p}{\partial lp} = \rho\, k'(d)\, [lo \le lp - r \le hi]
            + \frac{\partial\rho}{\partial lp}\, k(d).

    Metrics: ``sampled_kl_raw`` = :math:`\sum p`, ``sampled_kl_mean`` = :math:`\sum p / N`,
    ``sampled_kl_max``, and ``log_ratio_mean`` = :math:`\sum d / N` (after the clip).

    Parameters
    ----------
    reference : Field, ("field", key), array or list of arrays
        The reference policy's logprobs of the sampled tokens, shaped like ``logprobs``
        (may be given first, by position). Never differentiated by ``value_and_grad``.
    estimator : {"k1", "abs", "k2", "k3"}, default "k3"
        verl's ``kl``, ``abs``, ``mse`` and ``low_var_kl``.
    gradient : {"estimator", "unbiased"}, default "estimator"
        ``"unbiased"`` (``k1`` and ``k3`` only) differentiates the on-policy ratio so that the
        expected gradient is that of KL(π‖ref).
    behavior : None, Field, ("field", key), array or list of arrays, default None
        Logprobs of the sampling policy, for off-policy tokens.
    log_ratio_clip : None or (lo, hi), default None
        Clip of ``lp - r`` (gradient passes on ``[lo, hi]``, bounds included, 0 outside).
    target, reduce, max_tokens, mask
        As for every regularizer.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> kl = rg.SampledKL(rg.Field("ref"))
    >>> kl
    SampledKL(reference=Field('ref'))
    >>> lp = xp.asarray([-1.0, -2.0])
    >>> value, metrics = kl.compute({"ref": xp.asarray([-1.0, -1.0])}, lp)
    >>> round(float(value), 6)  # e^1 - 1 - 1
    0.718282
    >>> rg.to_floats(metrics)["log_ratio_mean"]
    -0.5
    """

    reference = option(
        None, check=checks.optional(checks.operand), positional=True, doc="reference logprobs"
    )
    estimator = option("k3", check=checks.one_of(*ESTIMATORS), doc="k1, abs, k2 or k3")
    gradient = option(
        "estimator", check=checks.one_of("estimator", "unbiased"), doc="what is differentiated"
    )
    behavior = option(None, check=checks.optional(checks.operand), doc="sampling logprobs")
    log_ratio_clip = option(None, check=checks.interval, doc="(lo, hi) of lp - reference")

    def check_options(self) -> None:
        super().check_options()
        if self._opts["reference"] is None:
            raise TypeError(
                "SampledKL needs reference=... (the reference policy's logprobs of the sampled "
                "tokens: Field(key), ('field', key), an array or a list of arrays)"
            )
        estimator = self._opts["estimator"]
        if self._opts["gradient"] == "unbiased" and estimator not in UNBIASED_OK:
            raise ValueError(
                f"gradient='unbiased' is for estimator 'k1' or 'k3' only, got "
                f"estimator={estimator!r}: only their values are unbiased for KL(π‖ref), so only "
                "for them does differentiating the on-policy ratio give that KL's gradient"
            )

    def _log_ratio(self, batch: Batch) -> tuple[Array, Array | None]:
        """(d, where the clip passes the gradient or None)."""
        xp = batch.xp
        d = batch.values - batch.field(self.reference, role="reference")
        if self.log_ratio_clip is None:
            return d, None
        return clip_(xp, d, *self.log_ratio_clip), inside_clip(xp, d, *self.log_ratio_clip)

    def _finish(self, batch: Batch, p: Array, d: Array) -> tuple[Array, Metrics]:
        raw = batch.sum(p)
        metrics = batch.metrics("sampled_kl", p, total=raw)
        metrics["log_ratio_mean"] = batch.mean(d)
        return batch.aggregate(p, total=raw), metrics

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        d, _ = self._log_ratio(batch)
        k = _estimate(batch.xp, self.estimator, d)
        rho = importance_ratio(batch, self.behavior, through_lp=self.gradient == "unbiased")
        return self._finish(batch, k if rho is None else rho * k, d)

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        xp = batch.xp
        d, inside = self._log_ratio(batch)
        k = _estimate(xp, self.estimator, d)
        dk = _slope(xp, self.estimator, d)
        if inside is not None:
            dk = xp.where(inside, dk, xp.zeros_like(dk))
        if self.behavior is not None:  # ∂rho/∂lp = rho
            rho = importance_ratio(batch, self.behavior, through_lp=True)
            p, dp = rho * k, rho * (dk + k)
        elif self.gradient == "unbiased":  # rho = 1, ∂rho/∂lp = 1
            p, dp = k, dk + k
        else:
            p, dp = k, dk
        value, metrics = self._finish(batch, p, d)
        return value, metrics, batch.aggregate_grad(dp)
