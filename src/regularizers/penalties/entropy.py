"""Exact entropy along the class axis: a penalty, a bonus, or a confidence hinge."""

from __future__ import annotations

import math
from typing import Any

from .. import checks
from .._core.backends import stop_gradient
from .._core.distributions import (
    OverClasses,
    axis_option,
    blockwise,
    const,
    temperature_option,
    valid_rows,
)
from .._core.inputs import Batch
from .._core.options import option
from .._core.rows import entropy_rows
from .._core.typing import Array, Metrics, Namespace

__all__ = ["Entropy"]


class Entropy(OverClasses, name="entropy"):
    r"""Entropy of the model's distribution per token, to minimize or to maximize.

    With :math:`p = \operatorname{softmax}(z/T)` over the ``V`` classes of the class axis,

    .. math::

        H = -\sum_v p_v \log p_v \qquad (0 \le H \le \log V)

    and the per-token penalty, in this order:

    1. ``normalize=True``: :math:`h = H / \log V` (in [0, 1]; for ``V = 1``, where
       :math:`H = 0`, ``h`` is defined as 0); otherwise :math:`h = H`, in nats.
    2. ``mode="minimize"``: :math:`h` (lower entropy: more decisive outputs);
       ``mode="maximize"``: :math:`\log V - H` (or :math:`1 - h` normalized): the gradient
       of :math:`-H`, and the penalty stays >= 0.
    3. ``threshold=τ``: a hinge instead, :math:`\max(0, h - τ)` (minimize) or
       :math:`\max(0, τ - h)` (maximize: Pereyra et al.'s confidence penalty, which acts
       only on tokens more confident than τ); its gradient is 0 where the hinge is flat
       (including at the kink).

    ``V`` is the size of the class axis **including -inf classes** (a masked vocabulary does
    not change it). The gradient w.r.t. the scores is :math:`-p\odot(\log p + H)/T` times
    the derivative of steps 1-3. **-inf is a masked class**: it contributes 0 (0·log 0 = 0)
    with finite gradients; a token whose scores are all -inf is not counted.

    Metrics: ``entropy_raw`` and ``entropy_max`` are of the penalty (Σ over tokens and the
    max); ``entropy_mean`` is the mean entropy :math:`H` in nats per counted token, in every
    mode (what to log).

    Parameters
    ----------
    mode : {"minimize", "maximize"}, default "minimize"
    normalize : bool, default False
        Divide the entropy by :math:`\log V` (before the hinge).
    threshold : float, optional
        ``>= 0``: the hinge's τ (in nats, or in units of :math:`\log V` when normalized).
    temperature : float, default 1.0
    axis : int, default -1
        The class axis.
    reduce, mask, target, max_tokens
        As for every regularizer; ``mask`` has the shape without the class axis.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> z = xp.asarray([[0.0, 0.0, 0.0, -float("inf")], [5.0, 0.0, 0.0, 0.0]])
    >>> value, metrics = rg.Entropy(reduce="mean")(z)
    >>> round(rg.to_floats(metrics)["entropy_mean"], 4)   # (log 3 + 0.1190) / 2
    0.6088
    >>> value, _ = rg.Entropy(mode="maximize", normalize=True)(z[:1, :])   # V = 4
    >>> round(float(value), 4)                            # 1 - log 3 / log 4
    0.2075
    """

    mode = option("minimize", check=checks.one_of("minimize", "maximize"), doc="H or log V - H")
    normalize = option(False, check=checks.boolean, doc="divide the entropy by log V")
    threshold = option(
        None, check=checks.optional(checks.nonnegative), doc="hinge at this entropy (Pereyra)"
    )
    temperature = temperature_option()
    axis = axis_option()

    def valid_tokens(self, batch: Batch) -> Array:
        return valid_rows(batch, batch.values)

    def _run(self, batch: Batch, grad: bool) -> tuple[Array, Metrics, Array | None]:
        xp, t = batch.xp, self.temperature
        size = int(batch.values.shape[-1])

        def rows(z: Array) -> tuple[list[Array], Array | None]:
            h, dh = entropy_rows(xp, z, t, grad)  # dH/dz = -p (log p + H) / T
            penalty, slope = self._penalty(xp, h, size)
            # times d penalty / dH, in the same pass
            return [penalty, h], (None if dh is None else dh(slope))

        (p, h), g = blockwise(batch, rows, grad=grad)
        raw = batch.sum(p)
        metrics = batch.metrics("entropy", p, total=raw)
        metrics["entropy_mean"] = batch.mean(h)
        return batch.aggregate(p, total=raw), metrics, g

    def _penalty(self, xp: Namespace, h: Array, size: int) -> tuple[Array, Any]:
        """(per-token penalty, its derivative w.r.t. H: a number or per-token array)."""
        log_v = math.log(size) if size > 1 else 0.0
        scale = (1.0 / log_v if log_v > 0 else 0.0) if self.normalize else 1.0
        top = log_v * scale  # the largest value: 1 normalized, log V otherwise (0 at V = 1)
        x = h * scale if scale != 1.0 else h
        sign = 1.0 if self.mode == "minimize" else -1.0
        if self.threshold is None and sign > 0:
            return x, scale  # H >= 0 exactly: every log p <= 0
        tau = const(xp, top if self.threshold is None else self.threshold, h)
        excess = x - tau if sign > 0 else tau - x
        zero = const(xp, 0.0, h)
        if self.threshold is None:
            # log V - H may round below 0 by an ulp (a near-uniform row): the value is kept
            # >= 0, but this is rounding, not a kink: the slope stays that of log V - H
            return excess + stop_gradient(xp, xp.maximum(excess, zero) - excess), -scale
        active = excess > zero
        slope = xp.where(active, const(xp, sign * scale, h), zero)
        return xp.where(active, excess, zero), slope
