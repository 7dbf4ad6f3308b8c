"""Orthogonality of weight matrices: mean |cosine| between rows (Keras 3), or ‖W Wᵀ - I‖²_F."""

from __future__ import annotations

from array_api_compat import device

from .. import checks
from .._core.base import Regularizer
from .._core.inputs import Batch
from .._core.ops import abs_, clip_
from .._core.options import option
from .._core.typing import Array, Metrics, Namespace

__all__ = ["Orthogonality"]


class Orthogonality(Regularizer, name="orthogonality"):
    r"""How far the rows (or columns) of weight matrices are from orthogonal.

    The input is one matrix ``W`` of shape ``[m, n]`` or a stack ``[..., m, n]``; each matrix
    is one token (a ``[B, T, m, n]`` stack has ``B`` sequences of ``T`` matrices, and ``mask``
    has the shape without the matrix axes). With ``mode="rows"`` the vectors are the ``r = m``
    rows :math:`w_i` of ``W`` (``mode="columns"``: its ``r = n`` columns, i.e. the rows of
    :math:`W^\top`).

    ``kind="cosine"``: the mean absolute cosine similarity over the :math:`r(r-1)/2` distinct
    pairs,

    .. math::

        p(W) = \frac{2}{r(r-1)} \sum_{i<j} |\cos(w_i, w_j)|, \qquad
        \cos(w_i, w_j) = \frac{w_i \cdot w_j}{\lVert w_i\rVert\,\lVert w_j\rVert},

    in [0, 1], invariant to scaling each row, and 0 when ``r = 1`` (no pairs). A zero row has
    cosine 0 with every row, and gradient 0 (no NaN). The derivative of :math:`|c|` is
    :math:`\operatorname{sign}(c)`, **0 at 0**, and rounding that puts :math:`|c|` above 1
    is clipped to 1 (where the gradient of :math:`|\cos|` is 0 anyway).

    This is Keras 3's ``keras.regularizers.OrthogonalRegularizer(factor, mode)`` divided by
    its ``factor``: Keras L2-normalizes the rows (columns), sums the absolute off-diagonal
    entries of their Gram matrix, halves that sum (each pair appears twice) and divides by
    the number of pairs ``r(r-1)/2``, then multiplies by ``factor`` (default 0.01). So
    ``factor * Orthogonality(mode=mode)(W) == OrthogonalRegularizer(factor, mode)(W)`` for a
    2-D ``W`` with ``r >= 2`` (Keras gives NaN for ``r = 1``; it divides each row by
    ``max(‖w‖, 1e-7)``, so rows shorter than 1e-7 differ).

    ``kind="frobenius"``: :math:`p(W) = \lVert W W^\top - I_m\rVert_F^2` (``mode="columns"``:
    :math:`\lVert W^\top W - I_n\rVert_F^2`), 0 exactly when the rows (columns) are
    orthonormal; its gradient is :math:`4 (W W^\top - I) W`.

    Per-matrix penalties are aggregated with ``reduce``. Metrics: ``orthogonality_raw`` =
    :math:`\sum p`, ``orthogonality_mean`` = :math:`\sum p / N`, ``orthogonality_max`` =
    :math:`\max p`, over the counted matrices.

    Parameters
    ----------
    mode : {"rows", "columns"}, default "rows"
        Which vectors of each matrix should be orthogonal.
    kind : {"cosine", "frobenius"}, default "cosine"
        Mean absolute cosine over pairs (Keras 3), or the squared Frobenius distance of the
        Gram matrix from the identity.
    target : {"logprobs", "probs"} or Field, default "logprobs"
        What is penalized (``"logprobs"``: the array passed, here the weights).
    reduce : str, default "sum"
        How the per-matrix penalties are aggregated.
    mask : None, array, list or Field, optional
        Only matrices whose mask is nonzero count.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import regularizers as rg
    >>> w = xp.asarray([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> value, metrics = rg.Orthogonality()(w)
    >>> round(float(value), 6)  # (0 + 1/√2 + 1/√2) / 3 pairs
    0.471405
    >>> value, _ = rg.Orthogonality(kind="frobenius", mode="columns")(w)
    >>> float(value)  # Wᵀ W - I = [[1, 1], [1, 4]]
    19.0
    """

    event_ndim = 2

    mode = option("rows", check=checks.one_of("rows", "columns"), doc="rows or columns")
    kind = option(
        "cosine", check=checks.one_of("cosine", "frobenius"), doc="mean |cos| or ‖WWᵀ - I‖²"
    )

    def evaluate(self, batch: Batch) -> tuple[Array, Metrics]:
        return self._finish(batch, self._penalty(batch, grad=False)[0])

    def evaluate_with_grad(self, batch: Batch) -> tuple[Array, Metrics, Array]:
        p, dp = self._penalty(batch, grad=True)
        value, metrics = self._finish(batch, p)
        assert dp is not None
        return value, metrics, batch.aggregate_grad(dp)

    def _finish(self, batch: Batch, p: Array) -> tuple[Array, Metrics]:
        raw = batch.sum(p)
        return batch.aggregate(p, total=raw), batch.metrics("orthogonality", p, total=raw)

    def _penalty(self, batch: Batch, *, grad: bool) -> tuple[Array, Array | None]:
        """Per-matrix ``p`` ([N]) and, if asked, d p / d values ([N, m, n])."""
        xp = batch.xp
        if batch.size == 0:  # no matrices: Dask mishandles reducing empty chunks
            return xp.sum(batch.values, axis=(-2, -1)), (batch.values if grad else None)
        a = batch.values if self.mode == "rows" else _transpose(xp, batch.values)
        if self.kind == "frobenius":
            p, da = _frobenius(xp, a, grad)
        else:
            p, da = _mean_abs_cosine(xp, a, grad)
        if da is not None and self.mode == "columns":
            da = _transpose(xp, da)
        return p, da


def _transpose(xp: Namespace, a: Array) -> Array:
    return xp.permute_dims(a, (0, 2, 1))


def _frobenius(xp: Namespace, a: Array, grad: bool) -> tuple[Array, Array | None]:
    """‖A Aᵀ - I‖²_F per matrix, and its gradient 4 (A Aᵀ - I) A."""
    r = a.shape[1]
    e = xp.matmul(a, _transpose(xp, a)) - xp.eye(r, dtype=a.dtype, device=device(a))
    p = xp.sum(e * e, axis=(-2, -1))
    return p, (4.0 * xp.matmul(e, a) if grad else None)


def _mean_abs_cosine(xp: Namespace, a: Array, grad: bool) -> tuple[Array, Array | None]:
    """Mean |cos| over distinct pairs of rows per matrix, and its gradient.

    The cosines are the Gram matrix scaled by the inverse norms, so a pair that is exactly
    orthogonal has cosine exactly 0 (and gradient sign 0) whatever the rounding of the norms.
    A zero row gets inverse norm 0 through a double ``where`` (the ``sqrt`` never sees 0),
    so its cosines and its gradient are 0, not NaN.
    """
    r = a.shape[1]
    if r < 2:  # no pairs: 0 (a static shape, not a value), kept in autodiff's graph
        return 0.0 * xp.sum(a, axis=(-2, -1)), (xp.zeros_like(a) if grad else None)
    s = xp.sum(a * a, axis=-1)
    nonzero = s != 0  # NaN counts as nonzero, so it propagates
    inv = xp.where(nonzero, 1.0 / xp.sqrt(xp.where(nonzero, s, xp.ones_like(s))), xp.zeros_like(s))
    col, row = xp.expand_dims(inv, axis=-1), xp.expand_dims(inv, axis=-2)
    c = xp.matmul(a, _transpose(xp, a)) * col * row
    off = 1.0 - xp.eye(r, dtype=a.dtype, device=device(a))
    pairs = float(r * (r - 1))  # ordered pairs: each distinct pair counted twice
    p = xp.sum(clip_(xp, abs_(xp, c), None, 1.0) * off, axis=(-2, -1)) / pairs
    if not grad:
        return p, None
    # d p / d c_ij = sign(c_ij) / pairs off the diagonal (0 where the clip holds |c| at 1);
    # with u_i = a_i / ‖a_i‖: d p / d u_i = 2 Σ_j S_ij u_j, and d u_i / d a_i projects out u_i.
    sgn = xp.where(abs_(xp, c) > 1.0, xp.zeros_like(c), xp.sign(c)) * off / pairs
    u = a * col
    along = xp.expand_dims(xp.sum(sgn * c, axis=-1), axis=-1)
    return p, 2.0 * col * (xp.matmul(sgn, u) - along * u)
