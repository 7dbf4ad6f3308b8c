"""Consistency between the input and a paired array: mse, l1, cosine or symmetric KL."""

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
from .._core.rows import cosine_rows, elementwise
from .._core.typing import Array, Metrics

__all__ = ["Consistency"]

ELEMENTWISE = ("mse", "l1")


class Consistency(OverClasses, name="consistency"):
    r"""How far the input ``x`` is from a ``paired`` array ``y`` of the same shape.

    ``metric``:

    - ``"mse"``: :math:`(x - y)^2` and ``"l1"``: :math:`|x - y|` (subgradient 0 at 0), **per
      element** of the arrays as given: no normalization, any shape (Tinker's 1-D sampled
      logprobs included), the mask and counts per element as for L2;
    - ``"cosine"``: :math:`1 - \cos(x, y)` of the raw rows along the class axis, computed as
      :math:`\tfrac12\lVert \hat x - \hat y\rVert^2` (exactly 0 on equal rows, never < 0);
      a pair of zero rows gives 0, one zero row 1, with a finite gradient (0 at a zero row);
    - ``"kl"``: :math:`\tfrac12(\mathrm{KL}(p\|q) + \mathrm{KL}(q\|p))` of the two rows
      normalized by log-softmax of scores / ``temperature``: ``KL(direction="symmetric")``.

    All are >= 0, 0 when ``x = y``, and symmetric in ``x`` and ``y``; the gradient is w.r.t.
    the input only (``paired`` is a constant). **-inf is a masked class**: for ``"mse"`` and
    ``"l1"`` an element that is -inf in both arrays is not counted (one -inf alone gives
    +inf); for ``"cosine"`` a class that is -inf in either row is left out of both; for
    ``"cosine"`` and ``"kl"`` a token whose row is all -inf in either array is not counted.
    ``temperature`` is used by ``"kl"`` only.

    Metrics: ``consistency_raw``, ``consistency_mean``, ``consistency_max``.

    Parameters
    ----------
    paired : Field or array or list of arrays
        The other view, shaped like the input; also accepted first by position.
    metric : {"mse", "l1", "cosine", "kl"}, default "mse"
    temperature : float, default 1.0
        ``"kl"`` only.
    axis : int, default -1
        The class axis (``"cosine"`` and ``"kl"``).
    reduce, mask, target, max_tokens
        As for every regularizer; for ``"cosine"`` and ``"kl"`` ``mask`` has the shape
        without the class axis.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> x = xp.asarray([[1.0, 0.0], [0.0, 0.0]])
    >>> y = xp.asarray([[0.0, 2.0], [0.0, 0.0]])
    >>> float(rg.Consistency(y, metric="cosine")(x)[0])    # orthogonal rows, then zero rows
    1.0
    >>> float(rg.Consistency(y)(x)[0])                     # mse, per element
    5.0
    """

    paired = operand_option("the other view (a Field or arrays)")
    metric = option(
        "mse", check=checks.one_of("mse", "l1", "cosine", "kl"), doc="how x and y are compared"
    )
    temperature = temperature_option()
    axis = axis_option()

    @property
    def event_ndim(self) -> int:  # type: ignore[override]
        """0 (per element) for ``"mse"``/``"l1"``, 1 (per row) for ``"cosine"``/``"kl"``."""
        return 0 if self.metric in ELEMENTWISE else 1

    def check_options(self) -> None:
        super().check_options()
        require(self, "paired")
        if self.temperature != 1.0 and self.metric != "kl":
            raise ValueError(
                f"temperature={self.temperature!r} is used by metric='kl' only, and "
                f"metric={self.metric!r}; drop temperature or use metric='kl'"
            )

    def _paired(self, batch: Batch) -> Array:
        return batch.field(self.paired, role="paired", counted=False)

    def valid_tokens(self, batch: Batch) -> Array:
        xp, x, y = batch.xp, batch.values, self._paired(batch)
        if self.metric in ELEMENTWISE:  # not -inf in both: max(x, y) > -inf (NaN counts)
            return xp.maximum(x, y) != -xp.inf
        return valid_rows(batch, x, y)

    def _run(self, batch: Batch, grad: bool) -> tuple[Array, Metrics, Array | None]:
        xp, how, t = batch.xp, self.metric, self.temperature

        def rows(x: Array, y: Array) -> tuple[list[Array], Array | None]:
            if how == "kl":
                value, g = kl_rows(xp, x, y, "symmetric", t, grad)
            elif how == "cosine":
                value, g = cosine_rows(xp, x, y, grad)
            else:
                value, g = elementwise(xp, x, y, how, grad)
            return [value], g

        # what restrict drops (an element -inf in both arrays, a row all -inf in either) is
        # zeroed, as its pair is: a row of +inf or NaN beside a dropped one would otherwise
        # give autodiff a NaN slope times the dropped row's cotangent 0
        (p,), g = blockwise(batch, rows, [self._paired(batch)], grad=grad, zero_values=True)
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("consistency", p, total=raw), g
