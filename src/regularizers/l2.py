"""L2 weight decay (ADR-002): ``Σ (clip(t) - center)²``, or its mean."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ._base import Metrics, Regularizer
from ._fastpath import KINDS
from ._inputs import Array, Batch
from ._ops import clip_, inside_clip, scalar
from ._options import Target, check_center, check_clip

__all__ = ["L2"]


class L2(Regularizer):
    r"""L2 penalty on logprobs, probabilities or a field of ``data``.

    .. math::

        s_i = \bigl(c(t_i) - \mu\bigr)^2, \qquad
        \mathrm{L2}(t) = \sum_i s_i \quad (\texttt{reduce="sum"}), \qquad
        \frac{1}{n}\sum_i s_i \quad (\texttt{reduce="mean"})

    applied in this order: ``c`` clips to ``clip=(lo, hi)`` (either bound may be None), then
    :math:`\mu` is ``center`` (None: 0; ``"mean"``: the mean of the clipped target; or a
    number), then the square is reduced. The gradient is :math:`2(c(t) - \mu)` where
    ``lo <= t <= hi`` (bounds included) and 0 strictly outside; ``center="mean"`` is
    differentiated as a function of the input. Metrics: ``l2_raw`` = :math:`\sum s`,
    ``l2_mean`` = :math:`\sum s / n`, ``l2_max`` = :math:`\max s`.

    Parameters
    ----------
    target : {"logprobs", "probs"} or Field, default "logprobs"
    reduce : {"sum", "mean"}, default "sum"
    center : None, "mean" or float, default None
    clip : None or (lo, hi), default None
        ``clip=(-100.0, 0.0)`` is the ADR's advice for logprobs: it turns ``-inf`` into -100.
    mask : None, array or Field, optional
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

    name: ClassVar[str] = "l2_weight_decay"
    _option_names: ClassVar[tuple[str, ...]] = ("target", "reduce", "center", "clip", "mask")

    def __init__(
        self,
        *,
        target: Target | tuple[str, str] = "logprobs",
        reduce: str = "sum",
        center: Literal["mean"] | float | None = None,
        clip: tuple[float | None, float | None] | None = None,
        mask: object = None,
    ) -> None:
        super().__init__(target=target, reduce=reduce, mask=mask)
        self._set("center", check_center(center))
        self._set("clip", check_clip(clip))

    @property
    def center(self) -> Literal["mean"] | float | None:
        """None, ``"mean"`` or the number subtracted after clipping."""
        return self._opts["center"]  # type: ignore[no-any-return]

    @property
    def clip(self) -> tuple[float | None, float | None] | None:
        """None or the ``(lo, hi)`` bounds applied first."""
        return self._opts["clip"]  # type: ignore[no-any-return]

    def _deviation(self, batch: Batch) -> Array:
        """``c(t) - center`` over the flat target."""
        xp, t = batch.xp, batch.values
        c = t if self.clip is None else clip_(xp, t, *self.clip)
        center: Any = self.center
        if center == "mean":
            return c - batch.per_element(batch.sum(c))
        if center is not None:
            return c - scalar(xp, center, c)
        return c

    def _evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._reduce(batch, self._deviation(batch))

    def _reduce(self, batch: Batch, d: Array) -> tuple[Array, Metrics]:
        s = d * d
        raw = batch.sum(s)
        mean = batch.per_element(raw)
        value = raw if self.reduce == "sum" else mean
        return value, {"l2_raw": raw, "l2_mean": mean, "l2_max": batch.max_square(d)}

    def _evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        xp = batch.xp
        d = self._deviation(batch)
        value, metrics = self._reduce(batch, d)
        grad = (2.0 * batch.grad_scale(self.reduce)) * d
        if self.clip is not None:
            inside = inside_clip(xp, batch.values, *self.clip)
            grad = xp.where(inside, grad, xp.zeros_like(grad))
        return value, metrics, grad


KINDS[L2] = "l2"  # the exact class has native fast paths (_fastpath.py)
