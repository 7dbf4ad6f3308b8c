"""torch kernels of the closed form (``torch_autograd``) for the penalties over a class axis:
Entropy, KL, JSD and ZLoss.

The generic path (``_core/distributions.py``) is written against the array API: every -inf
class and every undefined branch is a NaN-safe double ``where``, each a full ``[n, V]`` pass
(and on torch a ``where`` costs many multiplications). Here the same maths runs as torch's
kernels on fresh buffers, mostly in place, with no ``[n, V]`` ``where``:

- **the log-normalization**: by torch's fused ``log_softmax``/``softmax``/``logsumexp``
  where :data:`SOFTMAX` says (KL, JSD and ZLoss; Entropy off the CPU), values and
  gradients then the generic path's to rounding; else ``log p = (z - m) - log s`` with ``s =
  Σ exp(z - m)`` exactly as ``log_normalize`` computes it, and every sum as the generic
  path has it, so values and metrics are the generic path's to the bit, and gradients to a
  few units of rounding (the order of the final multiplications by the weights differs); a
  gradient that cancels to rounding noise (a uniform row's) is the generic path's own.
- **-inf classes**: ``z - lse`` is -inf there; it is clamped in place to the dtype's lowest
  finite number, so that ``p · log p`` is ``0 · finite = 0`` (the convention 0·log 0 = 0)
  and every difference of two such logs is finite, where the generic path has ``log p = 0``
  at ``p = 0``: the terms there are 0 either way.
- **uncounted tokens** (the caller's mask, and the rows :meth:`Batch.restrict` drops, such as
  a row of all -inf): their per-token results are dropped by the Batch's reductions (a
  ``where`` over ``[n]``), and their rows of the gradient are set to 0 afterwards
  (:func:`_drop`), never multiplied by 0.
- **support gaps** of a KL (a class not -inf in one distribution and -inf in the other:
  the token's KL is +inf, that direction's gradient 0): one ``amin`` per row finds the rows
  where the other operand holds a -inf (or a NaN), and only those are checked exactly. A row
  that holds a NaN is not a gap: its KL, and its gradient, are NaN.

Per-token penalties, their reduction (every ``reduce`` mode, ``counts``) and the metrics come
from the Batch's helpers, as on the generic path; the gradient is ``scale`` times a
coefficient per row (the ``reduce`` weight, a hinge's slope, ``1/T``; 0 at a gap) times a
per-class array.

Memory: up to :data:`KEEP` elements the forward pass keeps the ``[n, V]`` arrays that the
gradient needs (``p``, ``log p``...); beyond, it keeps per-row statistics only (each row's
max and ``log s``, see :func:`_log_normalize`; a Triton forward's ``lse``) and the backward
recomputes the rest block by block (:data:`BLOCK` elements on the CPU, :data:`DEVICE_BLOCK`
on a GPU), writing into the gradient: one ``[n, V]`` array (the gradient) plus a block's
temporaries, where autograd through the naive idiom keeps several ``[n, V]`` arrays.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import torch_triton
from .torch_const import const

__all__ = ["GRAD", "EntropyGrad", "JSDGrad", "KLGrad", "ZLossGrad"]

KEEP = 1 << 21
"""Elements (tokens x classes) up to which the forward's arrays are kept for the backward."""
BLOCK = 1 << 22
"""Elements per block on the CPU where the arrays are not kept (16 MiB of float32): few
blocks, since each kernel call is a parallel region (on a busy machine, milliseconds each),
while a block's few temporaries stay a fraction of one ``[n, V]`` array at the sizes that
matter."""
DEVICE_BLOCK = 1 << 26
"""Elements per block on other devices (a GPU; 256 MiB of float32). There each kernel is a
launch and one memory-bound pass, so the count of kernels is the cost and blocks are for
memory only: ``[2048, 32000]`` is one block, where :data:`BLOCK` would give 16 of ~15
kernels each."""

SOFTMAX: bool | None = None
"""Whether the kernels log-normalize by torch's fused kernels (``log_softmax``, ``softmax``,
``logsumexp``: one pass each) instead of step by step as the generic path does (max, shift,
``exp``, sum, ``log``: bit-identical values). None: KL, JSD and ZLoss always; Entropy off the
CPU as ``Σ entr(softmax(z))`` (``entr(p) = -p log p``, 0 at 0: three kernels forward, four
backward), and on the CPU from ``log_softmax`` where its arrays are kept for the backward
(up to :data:`KEEP` elements; one kernel where the steps take eleven), else in steps. On a
GPU the count of kernels is the cost: on an H200 at ``[2048, 32000]``, ``loss.backward()``
against the naive idiom went from 1.33x to 0.95-1.04x (Entropy; two runs), 2.31x to 1.90x
(KL) and 1.31x to 1.14x (JSD). On this project's 2-core CPU, KL, JSD and ZLoss took 10-25%
less time so at 1e3, on the Tinker-sized batch and at ``[2048, 32000]``, while Entropy's
``entr`` form was slower beyond 1e3 (5.1 against 2.1 ms per step on the Tinker batch, 364
against 316 ms at ``[2048, 32000]``); its ``log_softmax`` form took 13% less time than the
steps at 1e3 and 8% less on the Tinker batch, but recomputed block by block for the
backward at ``[2048, 32000]`` it was the slower (0.63-0.66x the naive idiom's time against
0.39-0.47x). Fused values agree with the generic path's to rounding, not to the bit. The
tests set True, False and None to run every form anywhere. (On a GPU where ``triton``
imports, Entropy, reverse KL and JSD of float32 rows run as Triton kernels instead:
``torch_triton``.)"""

_INF = math.inf
INDEXED = True
"""On CPU, the few rows to fix (uncounted, suspected of a support gap) are found as indices
and fixed alone; elsewhere (False, or another device: no host sync) by full-size kernels."""


def _steps(n: int, width: int, device: Any, temporaries: int = 3) -> list[slice]:
    """Blocks of rows: :data:`BLOCK` elements on the CPU (:data:`DEVICE_BLOCK` elsewhere)
    for a kernel whose block needs about three temporaries, proportionally fewer for one
    that needs more (JSD: six). A loop over blocks drops a block's temporaries (``del``)
    before the next block's are made: else two blocks' are alive at once."""
    block = BLOCK if device.type == "cpu" else DEVICE_BLOCK
    rows = max(1, block * 3 // (temporaries * max(width, 1)))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _fused(device: Any, cpu: bool) -> bool:
    """Whether a kernel takes its fused form (``cpu``: on the CPU too, unless :data:`SOFTMAX`
    says otherwise)."""
    if SOFTMAX is not None:
        return SOFTMAX
    return cpu or device.type != "cpu"


def _usable(batch: Any) -> bool:
    """A ``[n, V]`` batch with tokens and classes (else the generic kernel, which has the
    conventions of the empty cases)."""
    v = batch.values
    return bool(v.ndim == 2 and v.shape[0] > 0 and v.shape[1] > 0)


_LOWEST = {t: -float(torch.finfo(t).max) for t in (torch.float32, torch.float64)}


def _lowest(dtype: Any) -> float:
    """The lowest finite number of the compute dtype (float32 or float64)."""
    return _LOWEST[dtype]


def _log_normalize(z: Any) -> tuple[Any, Any]:
    """``(log p, norm)`` of rows by the operations of ``log_normalize`` (hence its rounding:
    a gradient that cancels to rounding noise, such as a uniform row's, is the generic
    path's own), with ``masked_fill_`` for its two ``[c, 1]`` ``where``: ``log p = (z - m) -
    log s``, -inf at -inf classes, and ``norm`` the ``[c, 2]`` pair ``(m, log s)`` that
    :func:`_raw` recomputes it from (``lse = m + log s``, rounded to a unit of ``m``, would
    not give it back); ``m = 0`` and ``log s = 0`` for a row of all -inf."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m == -_INF, 0.0)  # a row of all -inf: no shift (and no -inf - -inf)
    e = torch.sub(z, m).exp_()
    s = e.sum(-1, keepdim=True)
    s.masked_fill_(s == 0.0, 1.0)  # only a row of all -inf sums to 0
    log_s = s.log_()
    # z - m again, into the same buffer: a pass more, where keeping z - m aside took a
    # second [c, V] buffer per block (fresh pages: KL at [2048, 32000] 1.8x slower)
    return torch.sub(z, m, out=e).sub_(log_s), torch.cat([m, log_s], 1)


def _raw(x: Any, norm: Any, out: Any = None) -> Any:
    """``log p`` of rows ``x`` again from their ``norm``: ``(x - m) - log s`` for the ``[c,
    2]`` pair of :func:`_log_normalize`, as the forward computed it; ``x - lse`` for a ``[c,
    1]`` ``lse`` (the Triton forward's, or ``logsumexp``'s)."""
    if norm.shape[-1] == 1:
        return torch.sub(x, norm, out=out)
    return torch.sub(x, norm[:, 0:1], out=out).sub_(norm[:, 1:2])


def _halves(norms: Any, sl: slice) -> tuple[Any, Any]:
    """The rows ``sl`` of two distributions' normalizers kept side by side (``[n, 2k]``)."""
    k = norms.shape[-1] // 2
    return norms[sl, :k], norms[sl, k:]


def _scaled(x: Any, t: float) -> Any:
    return x if t == 1.0 else x / t


class _Rows:
    """Per-row results of the blocks: the one block's own, or one array allocated before
    the blocks' temporaries (small arrays allocated between the large ones of successive
    blocks would pin the heap, whose peak then grows block after block)."""

    __slots__ = ("out",)

    def __init__(self, like: Any, blocks: list[slice], cols: int = 0, dtype: Any = None) -> None:
        n = blocks[-1].stop
        shape = (n, cols) if cols else (n,)
        self.out: Any = None
        if len(blocks) > 1:
            self.out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)

    def put(self, sl: slice, x: Any) -> None:
        """``x`` for the rows ``sl``; None (only for ``_gap``'s ``[c]`` bool: no row) as
        False there, or, for the one block, as the result."""
        if self.out is None:  # (the one block)
            self.out = x
        else:
            self.out[sl] = False if x is None else x


def _coefficient(batch: Any, scale: Any, factor: float, slope: Any = None) -> Any:
    """``scale · factor · w · slope``: 0-d, or ``[n, 1]`` where the ``reduce`` weight ``w``
    or the ``slope`` is per token."""
    c = scale.to(batch.dtype)
    if factor != 1.0:
        c = c * const(factor, c)  # (0-d constants: see torch_const)
    w = batch.token_weights()
    if isinstance(w, float):
        if w != 1.0:
            c = c * const(w, c)
    else:
        c = c * w
    if slope is not None:
        c = c * slope
    return c.reshape(-1, 1) if c.ndim else c


def _rows(c: Any, sl: slice) -> Any:
    return c[sl] if c.ndim else c


def _drop(g: Any, mask: Any) -> Any:
    """``g`` with the rows of uncounted tokens set to 0 (whatever they held: NaN, inf)."""
    if mask is None:
        return g
    if INDEXED and g.device.type == "cpu":  # the few rows themselves (a host-side index)
        idx = torch.nonzero(~mask).squeeze(1)
        if idx.numel():
            g.index_fill_(0, idx, 0.0)
        return g
    return g.masked_fill_(~mask.reshape(-1, 1), 0.0)  # (no host sync)


def _gap(first: Any, second: Any) -> Any:
    """``[c]`` bool: some class is not -inf in ``first`` but -inf in ``second`` (a support
    gap, as the generic path defines it: NaN counts as not -inf); None where it is known on
    the host that no row has one. Exact, but only the rows where ``second`` holds a -inf (or
    a NaN) are looked at closely."""
    if not (INDEXED and first.device.type == "cpu"):  # no host sync: every row, full size
        return ((first != -_INF) & (second == -_INF)).any(-1)
    low = second.amin(-1)
    if low.amin().item() > -_INF:  # (the common case, one host read: no row has a -inf or a
        return None  # NaN; then no where, no fill, no factor of 0 or 1)
    suspect = ~(low > -_INF)  # a -inf or a NaN in the row
    idx = torch.nonzero(suspect).squeeze(1)
    gap = torch.zeros_like(suspect)
    a, b = first.index_select(0, idx), second.index_select(0, idx)
    gap.index_copy_(0, idx, ((a != -_INF) & (b == -_INF)).any(-1))
    return gap


def _unless_nan(gap: Any, of: Any) -> Any:
    """``gap`` without the rows where ``of`` (``[c]``, or ``[c, k]``) is NaN, which a NaN
    among the row's scores makes it: there the KL is NaN, gap or not (NaN + inf is NaN), as
    on the generic path (``rows._gaps``); None (no gap) stays None."""
    if gap is None:
        return None
    nan = of.isnan()
    return gap & ~(nan if nan.ndim == 1 else nan.any(-1))


def _at_gaps(gap: Any, kl: Any) -> Any:
    """``kl`` with +inf at the rows of a support gap."""
    return torch.where(gap, torch.full((), _INF, dtype=kl.dtype, device=kl.device), kl)


def _finish(batch: Any, prefix: str, p: Any) -> tuple[Any, dict[str, Any]]:
    """Value and metrics of the per-token penalty ``p`` by the Batch's helpers; where every
    token counts and ``reduce``'s weight is one number, the same by torch's own calls (the
    sum, its weight a 0-d constant, the max: ~5 us less at 1e3 than the array-API calls)."""
    w = batch.token_weights()
    if batch.mask is None and isinstance(w, float) and batch.size:
        raw = p.sum()
        value = raw if w == 1.0 else raw * const(w, raw)
        return value, {
            f"{prefix}_raw": raw,
            f"{prefix}_mean": batch.per_token(raw),
            f"{prefix}_max": p.amax(),
        }
    raw = batch.sum(p)
    return batch.aggregate(p, total=raw), batch.metrics(prefix, p, total=raw)


class _Saved:
    """What a kernel's forward leaves for its backward: per-row statistics, the forward's
    ``[n, V]`` arrays where they are kept (one tuple per block), a spare ``[n, V]`` buffer
    of the forward for the gradient (a fresh array costs its page faults, more than the
    arithmetic; the first backward takes it, a second one allocates) and the version of
    every other operand it recomputes from (checked, as autograd checks saved tensors)."""

    __slots__ = ("blocks", "kept", "operands", "rows", "spare", "versions")

    def __init__(
        self,
        rows: Any,
        blocks: list[slice],
        kept: list[Any],
        operands: list[Any],
        spare: Any = None,
    ) -> None:
        self.rows, self.blocks, self.kept, self.operands = rows, blocks, kept, operands
        self.spare = spare
        self.versions = [o._version for o in operands]

    def gradient(self, like: Any) -> Any:
        """A buffer for the gradient, shaped like ``like``: the spare one, once."""
        g, self.spare = self.spare, None
        return torch.empty_like(like) if g is None else g

    def check(self) -> None:
        if [o._version for o in self.operands] != self.versions:
            raise RuntimeError(
                "a tensor a regularizer was computed from was modified in place before "
                "backward(); its closed-form gradient reads the values of the forward pass "
                "(as autograd's saved tensors would, it refuses; clone the tensor first)"
            )


# ---- Entropy ---------------------------------------------------------------------------------
class EntropyGrad:
    """Entropy: ``H = -Σ p log p`` per row; the gradient ``-p (log p + H) · slope / T``, the
    slope that of the penalty's steps (the normalization, ``mode``, the hinge) as
    ``Entropy._penalty`` defines it. Kept: ``log p`` and ``p``; or ``(m, log s)``, from which the
    backward recomputes them.

    ``VALID_IF_FINITE`` where :meth:`vouches`: without a threshold (whose hinge is 0 at NaN),
    by ``softmax``/``entr`` or ``log_softmax`` (not the steps, nor the Triton kernels), a row
    of all -inf, which ``valid_tokens`` drops, makes its H NaN, and so the value where it
    counts."""

    VALID_IF_FINITE = True

    @staticmethod
    def vouches(reg: Any, batch: Any) -> bool:
        v = batch.values
        fused = _fused(v.device, False)
        steps = not fused and not (SOFTMAX is None and v.numel() <= KEEP)
        return reg._opts["threshold"] is None and not steps and not torch_triton.available(v)

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        if not _usable(batch):
            return None
        o = reg._opts
        v, t = batch.values, o["temperature"]
        n, size = v.shape
        tri = torch_triton.entropy_forward(v, t) if torch_triton.available(v) else None
        if tri is not None:  # one pass, on a GPU (its lse is what the blocks below keep)
            h, lse = tri
            value, metrics, slope = _entropy_finish(batch, o, h, size)
            return (
                value,
                metrics,
                (_Saved((h.reshape(-1, 1), lse), [slice(0, n)], [], []), slope, "triton"),
            )
        fused = _fused(v.device, False)  # Σ entr(softmax(z))
        keep = v.numel() <= KEEP and not fused
        # the CPU's default where the arrays are kept: log p by log_softmax (the steps take
        # eleven kernels; recomputed in blocks for the backward, it was the slower one)
        how = "entr" if fused else "log_softmax" if SOFTMAX is None and keep else "steps"
        low = _lowest(v.dtype)
        blocks = [slice(0, n)] if keep else _steps(n, size, v.device)
        hs, norms, kept, spare = _Rows(v, blocks), _Rows(v, blocks, 2), [], None
        for sl in blocks:
            if fused:  # H = Σ entr(p) = -Σ p log p (entr(0) = 0)
                p = torch.softmax(_scaled(v[sl], t), -1)
                hs.put(sl, torch.special.entr(p, out=p).sum(-1))
                del p
                continue
            if how == "log_softmax":  # (a row of all -inf is NaN here: not counted)
                raw, norm = torch.log_softmax(_scaled(v[sl], t), -1), None
            else:
                raw, norm = _log_normalize(_scaled(v[sl], t))
            p = torch.exp(raw)
            lp = raw.clamp_min_(low)  # -inf classes: p = 0, and p · log p = 0
            if keep:
                spare = torch.mul(p, lp)
                hs.put(sl, spare.sum(-1).neg_())
                kept.append((lp, p))
            else:
                hs.put(sl, p.mul_(lp).sum(-1).neg_())
                norms.put(sl, norm)
                del raw, p, lp  # (see _steps: one block's temporaries at a time)
        h = hs.out
        value, metrics, slope = _entropy_finish(batch, o, h, size)
        rows = (h.reshape(-1, 1), None if fused else norms.out)
        return value, metrics, (_Saved(rows, blocks, kept, [], spare), slope, how)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        saved, slope, how = state
        t = reg._opts["temperature"]
        v, (h, norm) = batch.values, saved.rows
        if isinstance(slope, float):
            c = _coefficient(batch, scale, -slope / t)
        else:
            c = _coefficient(batch, scale, -1.0 / t, slope)
        if how == "triton":  # (where the kernel cannot run, the loop below, from the same lse)
            out, cr = torch.empty_like(v), c.reshape(-1) if c.ndim else c
            g = torch_triton.entropy_backward(v, t, norm, h.reshape(-1), cr, out, batch.mask)
            if g is not None:  # (uncounted rows 0: dropped by the kernel)
                return g
        g = saved.gradient(v)
        low = _lowest(v.dtype)
        for i, sl in enumerate(saved.blocks):
            gb = g[sl]
            if saved.kept:
                lp, p = saved.kept[i]
                torch.add(lp, h[sl], out=gb)
            elif how == "entr":  # -p (log p + H) = entr(p) - p H, times -c
                p = torch.softmax(_scaled(v[sl], t), -1)
                torch.special.entr(p, out=gb).addcmul_(p, h[sl], value=-1.0)
                gb.mul_(-_rows(c, sl))
                del p
                continue
            else:  # log p and p again, as the forward computed them
                p = torch.exp(_raw(_scaled(v[sl], t), norm[sl], out=gb))
                gb.clamp_min_(low).add_(h[sl])
            gb.mul_(p).mul_(_rows(c, sl))
            del p
        return _drop(g, batch.mask)


def _entropy_finish(batch: Any, o: dict[str, Any], h: Any, size: int) -> tuple[Any, Any, Any]:
    """Value, metrics and the penalty's slope from the per-token entropies ``h``."""
    penalty, slope = _entropy_penalty(o, h, size)
    value, metrics = _finish(batch, "entropy", penalty)
    metrics["entropy_mean"] = batch.mean(h)
    return value, metrics, slope


def _entropy_penalty(o: dict[str, Any], h: Any, size: int) -> tuple[Any, Any]:
    """``Entropy._penalty`` in torch: the per-token penalty of ``H`` and its slope."""
    log_v = math.log(size) if size > 1 else 0.0
    scale = (1.0 / log_v if log_v > 0 else 0.0) if o["normalize"] else 1.0
    top = log_v * scale
    x = h * scale if scale != 1.0 else h
    sign = 1.0 if o["mode"] == "minimize" else -1.0
    threshold = o["threshold"]
    if threshold is None and sign > 0:
        return x, scale
    tau = const(float(top if threshold is None else threshold), h)
    excess = x - tau if sign > 0 else tau - x
    if threshold is None:  # log V - H, kept >= 0 (rounding); the slope stays -scale
        return excess.clamp_min(0.0), -scale
    zero = const(0.0, h)
    active = excess > zero
    return torch.where(active, excess, zero), active.to(h.dtype) * const(sign * scale, h)


# ---- ZLoss -----------------------------------------------------------------------------------
def _logsumexp(z: Any) -> Any:
    """Log-sum-exp of rows ``[c, V]`` (``[c, 1]``) as the generic path computes it, ``m +
    log Σ exp(z - m)`` with ``m`` the row max: NaN where a row holds +inf (``inf - inf``)
    or NaN, -inf for a row of all -inf (its ``m`` is taken as the lowest finite number, so
    that ``z - m`` is -inf, not NaN). Seven kernels and no host read: inside a training
    step at 1e3 elements ~20 us less than ``torch.logsumexp`` (a composite, whose +inf at
    a row holding +inf needed a fix-up: NaN is what the generic path has there)."""
    m = z.amax(-1, keepdim=True).clamp_min_(_lowest(z.dtype))
    return torch.sub(z, m).exp_().sum(-1, keepdim=True).log_().add_(m)


class ZLossGrad:
    """ZLoss: ``log Z`` per row (as the generic path computes it); the gradient
    ``2 log Z · softmax(z)``. Kept: ``softmax(z)``; or nothing but ``log Z``.

    ``VALID_IF_FINITE`` where :meth:`vouches` (by ``logsumexp``, not the steps): a row of
    all -inf, which ``valid_tokens`` drops, has ``log Z = -inf``, and a value of +inf where
    it counts."""

    VALID_IF_FINITE = True

    @staticmethod
    def vouches(reg: Any, batch: Any) -> bool:
        return _fused(batch.values.device, True)

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        if not _usable(batch):
            return None
        v = batch.values
        n, size = v.shape
        fused = _fused(v.device, True)
        keep = v.numel() <= KEEP and not fused
        blocks = [slice(0, n)] if keep else _steps(n, size, v.device)
        norms, kept = _Rows(v, blocks, 1 if fused else 2), []
        for sl in blocks:
            if fused:  # (-inf for a row of all -inf, which does not count)
                norms.put(sl, _logsumexp(v[sl]))
                continue
            raw, norm = _log_normalize(v[sl])
            norms.put(sl, norm)
            if keep:
                kept.append(raw.exp_())
            del raw
        norm = norms.out
        lse = norm if fused else norm.sum(-1, keepdim=True)  # m + log s
        log_z = lse.reshape(-1)
        value, metrics = _finish(batch, "z_loss", log_z * log_z)
        metrics["log_z_mean"] = batch.mean(log_z)
        return value, metrics, _Saved((lse, norm), blocks, kept, [])

    @staticmethod
    def grad(reg: Any, batch: Any, saved: Any, scale: Any) -> Any:
        v, (lse, norm) = batch.values, saved.rows
        c = lse * _coefficient(batch, scale, 2.0)  # [n, 1]
        if saved.kept:
            return _drop(saved.kept[0] * c, batch.mask)
        if len(saved.blocks) == 1 and _fused(v.device, True):
            return _drop(torch.softmax(v, -1).mul_(c), batch.mask)
        g = torch.empty_like(v)
        for sl in saved.blocks:
            if norm.shape[-1] == 1:  # logsumexp's lse: softmax again (exp(z - lse) would not
                torch.mul(torch.softmax(v[sl], -1), c[sl], out=g[sl])  # sum to 1, see there)
            else:
                _raw(v[sl], norm[sl], out=g[sl]).exp_().mul_(c[sl])
        return _drop(g, batch.mask)


# ---- KL --------------------------------------------------------------------------------------
def _logs(x: Any, norm: Any, low: float, probs: bool) -> tuple[Any, Any]:
    """``(log p, p)`` of rows from their ``norm`` (:func:`_raw`; None: by ``log_softmax``,
    fused): ``log p`` clamped to ``low`` at -inf classes (where ``p`` = 0); ``p`` None unless
    ``probs``."""
    raw = torch.log_softmax(x, -1) if norm is None else _raw(x, norm)
    p = torch.exp(raw) if probs else None
    return raw.clamp_min_(low), p


class KLGrad:
    """KL between ``p = softmax(z/T)`` and ``q = softmax(r/T)``: reverse ``Σ p (log p -
    log q)``, gradient ``p (log p - log q - KL) / T``; forward ``Σ q (log q - log p)``,
    gradient ``(p - q) / T``; symmetric, their mean. A token with a support gap is +inf and
    its direction's gradient 0 (its KL replaced by 0 first, so that the row stays finite),
    unless the token's scores hold a NaN: then its KL and its gradient are NaN.
    Kept: ``p``, ``log p - log q`` (and ``q``); or both ``(m, log s)``.

    ``VALID_IF_FINITE`` where :meth:`vouches` (by ``log_softmax``, not the steps, nor the
    Triton kernels, whose rows of all -inf are not vouched for here): a row of all -inf in
    either operand, which ``valid_tokens`` drops, makes its logs NaN, and so its KL and the
    value where it counts."""

    VALID_IF_FINITE = True

    @staticmethod
    def vouches(reg: Any, batch: Any) -> bool:
        v = batch.values
        return _fused(v.device, True) and not torch_triton.available(v)

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        if not _usable(batch):
            return None
        o = reg._opts
        how, t = o["direction"], o["temperature"]
        v = batch.values
        r = batch.field(o["reference"], role="reference", counted=False)
        n, size = v.shape
        # one pass, on a GPU (its lse are what the blocks below would keep: one block)
        usable = how == "reverse" and torch_triton.available(v, r)
        tri = torch_triton.kl_forward(v, r, t) if usable else None
        if tri is not None:
            kl_r, lse, gap_r = tri
            # (a NaN or +inf among a row's scores makes its lse NaN; its kl may be NaN at a
            # true gap too, where a p that underflows to 0 meets the -inf: 0 · inf)
            gap_r = _unless_nan(gap_r, lse)
            per = _at_gaps(gap_r, kl_r)
            kl_r.masked_fill_(gap_r, 0.0)  # (as below)
            value, metrics = _finish(batch, "kl", per)
            saved = _Saved((kl_r.reshape(-1, 1), lse), [slice(0, n)], [], [r])
            return value, metrics, (saved, gap_r, None, r, True)
        keep = v.numel() <= KEEP
        fused = _fused(v.device, True)
        low = _lowest(v.dtype)
        reverse, forward = how != "forward", how != "reverse"
        # (sized for six temporaries: at [2048, 32000] with DEVICE_BLOCK, sized for four its
        # peak was 2.9 [n, V] arrays against 2.0, replayed on the CPU; the naive idiom's is 6)
        blocks = [slice(0, n)] if keep else _steps(n, size, v.device, 6)
        revs, fwds, norms = _Rows(v, blocks), _Rows(v, blocks), _Rows(v, blocks, 4)
        gaps_r, gaps_f, kept = _Rows(v, blocks, 0, torch.bool), _Rows(v, blocks, 0, torch.bool), []
        for sl in blocks:
            zb, rb = v[sl], r[sl]
            if fused:
                raw_p = torch.log_softmax(_scaled(zb, t), -1)
                raw_q = torch.log_softmax(_scaled(rb, t), -1)
            else:
                raw_p, norm_p = _log_normalize(_scaled(zb, t))
                raw_q, norm_q = _log_normalize(_scaled(rb, t))
            p = torch.exp(raw_p)
            q = torch.exp(raw_q) if forward else None
            work = raw_q.clamp_min_(low)  # log q, finite
            d = raw_p.clamp_min_(low).sub_(work)  # log p - log q, finite
            if reverse:
                revs.put(sl, torch.mul(p, d, out=work).sum(-1))
                gaps_r.put(sl, _gap(zb, rb))
            if forward:
                assert q is not None
                fwds.put(sl, torch.mul(q, d, out=work).sum(-1).neg_())
                gaps_f.put(sl, _gap(rb, zb))
            if keep:
                kept.append((p, d, q))
            else:
                if not fused:
                    norms.put(sl, torch.cat([norm_p, norm_q], 1))
                del raw_p, raw_q, p, q, work, d
        kl_r = gap_r = gap_f = None
        values = []  # (each direction's KL, +inf at its gap rows; a gap None: it has none)
        if reverse:
            kl_r = revs.out
            gap_r = _unless_nan(gaps_r.out, kl_r)  # (finite logs: NaN from the data only)
            values.append(kl_r if gap_r is None else _at_gaps(gap_r, kl_r))
            if gap_r is not None:
                kl_r.masked_fill_(gap_r, 0.0)  # (for the gradient, whose row is 0: finite)
        if forward:
            gap_f = _unless_nan(gaps_f.out, fwds.out)
            values.append(fwds.out if gap_f is None else _at_gaps(gap_f, fwds.out))
        per = values[0] if len(values) == 1 else 0.5 * (values[0] + values[1])
        value, metrics = _finish(batch, "kl", per)
        rows = (None if kl_r is None else kl_r.reshape(-1, 1), None if fused else norms.out)
        saved = _Saved(rows, blocks, kept, [] if keep else [r], work if keep else None)
        return value, metrics, (saved, gap_r, gap_f, None if keep else r, False)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        saved, gap_r, gap_f, r, triton = state
        saved.check()
        t, how = reg._opts["temperature"], reg._opts["direction"]
        v, (kl_r, norms) = batch.values, saved.rows
        both = how == "symmetric"
        c = _coefficient(batch, scale, (0.5 if both else 1.0) / t)
        # (a direction's rows of 0 and 1, 0 at its gap rows; None where it has no gap)
        keep_r = None if gap_r is None else (~gap_r).to(v.dtype).reshape(-1, 1)
        keep_f = None if gap_f is None else (~gap_f).to(v.dtype).reshape(-1, 1)
        keep = keep_r if how == "reverse" else keep_f
        if not both and keep is not None:  # the one direction's gap rows: a coefficient of 0
            c = c * keep
        if triton:  # (reverse: c is [n, 1]; where the kernel cannot run, the loop below)
            out = torch.empty_like(v)
            k, cr = kl_r.reshape(-1), c.reshape(-1)
            g = torch_triton.kl_backward(v, r, t, norms, k, cr, out, batch.mask)
            if g is not None:  # (uncounted rows 0: dropped by the kernel)
                return g
        g = saved.gradient(v)
        low = _lowest(v.dtype)
        for i, sl in enumerate(saved.blocks):
            gb = g[sl]
            if saved.kept:
                p, d, q = saved.kept[i]
            else:  # as the forward computed them
                norm_p, norm_q = (None, None) if norms is None else _halves(norms, sl)
                d, p = _logs(_scaled(v[sl], t), norm_p, low, True)
                lq, q = _logs(_scaled(r[sl], t), norm_q, low, how != "reverse")
                d.sub_(lq)  # log p - log q
                del lq
            if kl_r is None:
                torch.sub(p, q, out=gb)
            else:  # p (log p - log q - KL)
                torch.sub(d, kl_r[sl], out=gb).mul_(p)
                if both:  # each direction 0 at its own gap rows, then their sum
                    pq = torch.sub(p, q)
                    host = gb.device.type == "cpu"  # (on a GPU: multiply, no host read)
                    if keep_r is not None and not (host and bool(keep_r[sl].all())):
                        gb.mul_(keep_r[sl])
                    if keep_f is not None and not (host and bool(keep_f[sl].all())):
                        pq.mul_(keep_f[sl])
                    gb.add_(pq)
                    del pq
            gb.mul_(_rows(c, sl))
            del p, d, q
        return _drop(g, batch.mask)


# ---- JSD -------------------------------------------------------------------------------------
class JSDGrad:
    """JSD_β by the operations of the generic path (``log m`` from the max of ``log β q``
    and ``log (1-β) p``), with the logs clamped to finite where the generic path has its
    ``where``: ``β Σ q (log q - log m) + (1-β) Σ p (log p - log m)`` and the gradient
    ``(1-β) p (log p - log m - KL(p‖m)) / T``. Kept: ``p`` and ``log p - log m``; or both
    ``(m, log s)``.

    ``VALID_IF_FINITE`` where :meth:`vouches` (by ``log_softmax``, not the steps nor the
    Triton kernels), as KL's."""

    VALID_IF_FINITE = True

    @staticmethod
    def vouches(reg: Any, batch: Any) -> bool:
        v = batch.values
        return _fused(v.device, True) and not torch_triton.available(v)

    @staticmethod
    def forward(reg: Any, batch: Any) -> tuple[Any, dict[str, Any], Any] | None:
        if not _usable(batch):
            return None
        o = reg._opts
        beta, t = o["beta"], o["temperature"]
        v = batch.values
        r = batch.field(o["reference"], role="reference", counted=False)
        n, size = v.shape
        # two passes, on a GPU (the lse, then the terms; the lse are what the blocks keep)
        tri = torch_triton.jsd_forward(v, r, t, beta) if torch_triton.available(v, r) else None
        if tri is not None:
            kl, lse = tri
            kl_p = kl[:, 0:1].contiguous()  # (a column of its own, for the backward)
            value, metrics = _finish(batch, "jsd", beta * kl[:, 1] + (1.0 - beta) * kl[:, 0])
            saved = _Saved((kl_p, lse), [slice(0, n)], [], [r])
            return value, metrics, (saved, r, True)
        keep = v.numel() <= KEEP
        fused = _fused(v.device, True)
        blocks = [slice(0, n)] if keep else _steps(n, size, v.device, 6)
        values, kls, norms, kept = _Rows(v, blocks), _Rows(v, blocks), _Rows(v, blocks, 4), []
        for sl in blocks:
            x, y = _scaled(v[sl], t), _scaled(r[sl], t)
            norm_p = norm_q = None  # (fused: log_softmax in _jsd_rows)
            if not fused:
                norm_p, norm_q = _log_normalize(x)[1], _log_normalize(y)[1]
            p, d, kl_q, work = _jsd_rows(x, y, norm_p, norm_q, beta, _lowest(v.dtype), True)
            kl_p = torch.mul(p, d, out=work).sum(-1)
            values.put(sl, const(beta, kl_p) * kl_q + const(1.0 - beta, kl_p) * kl_p)
            kls.put(sl, kl_p)
            if keep:
                kept.append((p, d))
            else:
                if norm_p is not None and norm_q is not None:
                    norms.put(sl, torch.cat([norm_p, norm_q], 1))
                del p, d, work
        value, metrics = _finish(batch, "jsd", values.out)
        rows = (kls.out.reshape(-1, 1), None if fused else norms.out)
        saved = _Saved(rows, blocks, kept, [] if keep else [r], work if keep else None)
        return value, metrics, (saved, None if keep else r, False)

    @staticmethod
    def grad(reg: Any, batch: Any, state: Any, scale: Any) -> Any:
        saved, r, triton = state
        saved.check()
        o = reg._opts
        beta, t = o["beta"], o["temperature"]
        v, (kl_p, norms) = batch.values, saved.rows
        c = _coefficient(batch, scale, (1.0 - beta) / t)
        if triton:  # (where the kernel cannot run, the loop below, from the same lse)
            out, k, cr = torch.empty_like(v), kl_p.reshape(-1), c.reshape(-1) if c.ndim else c
            g = torch_triton.jsd_backward(v, r, t, beta, norms, k, cr, out, batch.mask)
            if g is not None:  # (uncounted rows 0: dropped by the kernel)
                return g
        g = saved.gradient(v)
        for i, sl in enumerate(saved.blocks):
            if saved.kept:
                p, d = saved.kept[i]
            else:  # as the forward computed them
                x, y = _scaled(v[sl], t), _scaled(r[sl], t)
                norm_p, norm_q = (None, None) if norms is None else _halves(norms, sl)
                p, d, _, _ = _jsd_rows(x, y, norm_p, norm_q, beta, _lowest(v.dtype))
            torch.sub(d, kl_p[sl], out=g[sl]).mul_(p).mul_(_rows(c, sl))
            del p, d
        return _drop(g, batch.mask)


def _jsd_rows(
    x: Any, y: Any, norm_p: Any, norm_q: Any, beta: float, low: float, value: bool = False
) -> tuple[Any, Any, Any, Any]:
    """``(p, log p - log m, KL(q‖m), spare)`` of rows (``KL(q‖m)`` 0 unless ``value``; the
    spare is a free buffer of their shape), as ``jsd_rows`` computes them (``norm`` None:
    the logs by ``log_softmax``, fused). Where both classes are -inf the generic path's
    ``log m`` is 0 and this one's the lowest number; there ``p = q = 0`` and every term is 0
    either way."""
    if norm_p is None or norm_q is None:
        raw_p, raw_q = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    else:
        raw_p, raw_q = _raw(x, norm_p), _raw(y, norm_q)
    a = raw_q + const(math.log(beta), raw_q)  # log(β q), -inf where q = 0
    b = raw_p + const(math.log1p(-beta), raw_p)  # log((1 - β) p)
    top = torch.maximum(a, b).clamp_min_(low)  # (-inf where both are: no -inf - -inf)
    u = a.sub_(top).exp_().add_(b.sub_(top).exp_())
    lm = top.add_(u.log_()).clamp_min_(low)  # log m
    p = torch.exp(raw_p, out=b)
    kl_q = const(0.0, x)  # (an operand only)
    if value:
        q = torch.exp(raw_q, out=a)
        kl_q = q.mul_(raw_q.clamp_min_(low).sub_(lm)).sum(-1)
    return p, raw_p.clamp_min_(low).sub_(lm), kl_q, a


GRAD: dict[str, Any] = {
    "entropy": EntropyGrad,
    "kl": KLGrad,
    "jsd": JSDGrad,
    "z_loss": ZLossGrad,
}
