"""Float64 NumPy references: one short function per penalty, over a plain :class:`RefBatch`.

``RefBatch`` is the reference twin of the library's ``Batch``, written as plainly as possible
in NumPy: the target in float64, the mask, the sequences, and every ``reduce`` mode spelled
out from the SPEC's table (section 7.1). A penalty's reference takes ``(reg, b)`` and returns
``(value, metrics, g)`` with ``g`` = d value / d ``b.values``; :func:`reference` does the rest
(reading the inputs, the class axis, the mask, ``counts``, and the way back to the elements
of ``logprobs``).

Register a reference with ``@reference_for(MyPenalty)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import regularizers as rg

RefFn = Callable[[Any, "RefBatch"], tuple[float, dict[str, float], np.ndarray]]
REFERENCES: dict[type, RefFn] = {}
ValidFn = Callable[[Any, np.ndarray, Callable[[Any], np.ndarray]], np.ndarray]
VALID: dict[type, ValidFn] = {}


def reference_for(cls: type) -> Callable[[RefFn], RefFn]:
    def register(fn: RefFn) -> RefFn:
        REFERENCES[cls] = fn
        return fn

    return register


def valid_tokens_for(cls: type) -> Callable[[ValidFn], ValidFn]:
    """Register ``fn(reg, values, read) -> [n] bool``: the tokens ``cls`` can score at all
    (the twin of ``Regularizer.valid_tokens``); the others count as masked, in N and S too."""

    def register(fn: ValidFn) -> ValidFn:
        VALID[cls] = fn
        return fn

    return register


def flat(arrays: Any) -> np.ndarray:
    arrays = arrays if isinstance(arrays, list) else [arrays]
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def _as_list(x: Any) -> list[np.ndarray]:
    if isinstance(x, (list, tuple)):
        return [np.asarray(a, dtype=np.float64) for a in x]
    return [np.asarray(x, dtype=np.float64)]


@dataclass
class RefBatch:
    """The reference view of one call (float64 NumPy, nothing clever)."""

    values: np.ndarray  # [n] or [n, *event]
    mask: np.ndarray  # [n] bool
    lengths: tuple[int, ...]
    reduce: str
    max_tokens: float | None
    N: float
    S: float
    N_local: float
    read: Callable[[Any], np.ndarray] = field(repr=False)

    def field(self, ref: Any) -> np.ndarray:
        """Another array of the call, flattened as the target, uncounted tokens 0."""
        return self.counted(self.read(ref))

    def counted(self, a: np.ndarray) -> np.ndarray:
        m = self.mask.reshape((-1,) + (1,) * (a.ndim - 1))
        with np.errstate(invalid="ignore"):
            return np.where(m, a, 0.0)

    def sum(self, p: np.ndarray) -> float:
        return float(self.counted(p).sum())

    def per_token(self, total: float) -> float:
        return total / max(self.N, 1.0)

    def mean(self, p: np.ndarray) -> float:
        return self.per_token(self.sum(p))

    def local_mean(self, a: np.ndarray) -> float:
        return self.sum(a) / max(self.N_local, 1.0)

    def max(self, p: np.ndarray) -> float:
        return float(p[self.mask].max()) if self.mask.any() else 0.0

    def seq_ids(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths)), self.lengths)

    def weights(self) -> np.ndarray:
        """Per-token w with value = Σ_counted w·p, straight from the SPEC's table."""
        n = self.values.shape[0]
        S = max(self.S, 1.0)
        if self.reduce == "sum":
            w = np.ones(n)
        elif self.reduce == "mean":
            w = np.full(n, 1.0 / max(self.N, 1.0))
        elif self.reduce == "seq-mean-token-sum":
            w = np.full(n, 1.0 / S)
        elif self.reduce == "seq-mean-token-sum-norm":
            assert self.max_tokens is not None
            w = np.full(n, 1.0 / (S * self.max_tokens))
        else:
            assert self.reduce == "seq-mean-token-mean", self.reduce
            ids = self.seq_ids()
            per_seq = np.bincount(ids, weights=self.mask.astype(float), minlength=len(self.lengths))
            w = 1.0 / (S * np.maximum(per_seq[ids], 1.0))
        return np.where(self.mask, w, 0.0)

    def aggregate(self, p: np.ndarray) -> float:
        return float((self.weights() * self.counted(p)).sum())

    def aggregate_grad(self, dp: np.ndarray) -> np.ndarray:
        w = self.weights().reshape((-1,) + (1,) * (dp.ndim - 1))
        return w * self.counted(dp)

    def metrics(self, prefix: str, p: np.ndarray, peak: bool = True) -> dict[str, float]:
        raw = self.sum(p)
        out = {f"{prefix}_raw": raw, f"{prefix}_mean": self.per_token(raw)}
        if peak:
            out[f"{prefix}_max"] = self.max(p)
        return out


def _event_ndim(reg: Any) -> int:
    return int(reg.event_ndim)


def _rows(arrays: list[np.ndarray], k: int, axis: int) -> tuple[np.ndarray, list[tuple]]:
    """Flatten arrays into rows of the event (class axis moved last)."""
    rows, token_shapes = [], []
    for a in arrays:
        if k == 1 and axis % a.ndim != a.ndim - 1:
            a = np.moveaxis(a, axis, -1)
        token_shapes.append(a.shape[: a.ndim - k])
        rows.append(a.reshape((-1, *a.shape[a.ndim - k :]) if k else -1))
    return np.concatenate(rows, axis=0), token_shapes


def _read(data: Any, key: str) -> list[np.ndarray]:
    if isinstance(data, Mapping):
        value = data[key]
    else:
        value = [d.loss_fn_inputs[key] for d in data]
    if isinstance(value, (list, tuple)) and value and not np.isscalar(value[0]):
        return _as_list(value)
    return [np.asarray(value, dtype=np.float64)]


def reference(
    reg: Any,
    x: Any,
    mask: Any = None,
    *,
    data: Any = None,
    counts: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float], np.ndarray]:
    """Value, metrics and d value / d x (flat over the elements of ``x``, in its order)."""
    is_list = isinstance(x, (list, tuple))
    arrays = _as_list(x)
    k = _event_ndim(reg)
    axis = int(getattr(reg, "axis", -1))
    target = reg.target
    target_arrays = _read(data, target.key) if isinstance(target, rg.Field) else arrays
    values, token_shapes = _rows(target_arrays, k, axis)
    if target == "probs":
        values = np.exp(values)
    if is_list:
        lengths = tuple(math.prod(s) for s in token_shapes)
    elif len(token_shapes[0]) >= 2:
        lengths = (math.prod(token_shapes[0][1:]),) * token_shapes[0][0]
    else:
        lengths = (math.prod(token_shapes[0]),)
    m = reg.mask if mask is None else mask
    if m is None:
        m_flat = np.ones(values.shape[0], dtype=bool)
    else:
        if isinstance(m, rg.Field):
            m = _read(data, m.key)
        m_flat = flat(m if isinstance(m, list) else [np.asarray(m)]) != 0

    def read(ref: Any) -> np.ndarray:
        ref = getattr(ref, "value", ref)
        if isinstance(ref, str):
            ref = rg.Field(ref)
        got = _read(data, ref.key) if isinstance(ref, rg.Field) else _as_list(ref)
        return _rows(got, k, axis)[0]

    if type(reg) in VALID:
        with np.errstate(all="ignore"):
            m_flat = m_flat & VALID[type(reg)](reg, values, read)
    n_local = float(m_flat.sum())
    ids = np.repeat(np.arange(len(lengths)), lengths)
    per_seq = np.bincount(ids, weights=m_flat.astype(float), minlength=len(lengths))
    s_local = float((per_seq > 0).sum())
    counts = counts or {}

    with np.errstate(all="ignore"):
        b = RefBatch(
            values=np.where(m_flat.reshape((-1,) + (1,) * k), values, 0.0),
            mask=m_flat,
            lengths=lengths,
            reduce=reg.reduce,
            max_tokens=reg.max_tokens,
            N=float(counts.get("tokens", n_local)),
            S=float(counts.get("sequences", s_local)),
            N_local=n_local,
            read=read,
        )
        value, metrics, g = REFERENCES[type(reg)](reg, b)
        g = b.counted(np.asarray(g, dtype=np.float64))
        if target == "probs":
            g = g * b.values
        if isinstance(target, rg.Field):
            g = np.zeros_like(g)
    # back to the elements of x, in their own order
    out, start = [], 0
    for a, shape in zip(arrays, token_shapes, strict=True):
        n = math.prod(shape)
        piece = g[start : start + n]
        start += n
        if k == 1 and axis % a.ndim != a.ndim - 1:
            moved = np.moveaxis(a, axis, -1).shape
            piece = np.moveaxis(piece.reshape(moved), -1, axis)
        out.append(piece.reshape(-1))
    return value, metrics, np.concatenate(out) if out else np.zeros(0)


# ---- the built-ins ---------------------------------------------------------------------
def _deviation(reg: Any, b: RefBatch) -> tuple[np.ndarray, np.ndarray]:
    """(u, inside): clip then center, and where the clip passes the gradient."""
    t = b.values
    lo, hi = reg.clip if reg.clip is not None else (None, None)
    lo_, hi_ = -np.inf if lo is None else lo, np.inf if hi is None else hi
    c = np.clip(t, lo_, hi_)
    inside = ~((t < lo_) | (t > hi_))
    if reg.center == "mean":
        mu = b.local_mean(c)
    else:
        mu = reg.center or 0.0
    return c - mu, inside


def _center_grad(reg: Any, b: RefBatch, g: np.ndarray) -> np.ndarray:
    if reg.center != "mean":
        return g
    return g - b.counted(np.full_like(g, b.sum(g) / max(b.N_local, 1.0)))


@reference_for(rg.L1)
def ref_l1(reg: rg.L1, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    p = np.abs(b.values)
    return b.aggregate(p), b.metrics("l1", p, peak=False), b.aggregate_grad(np.sign(b.values))


@reference_for(rg.L2)
def ref_l2(reg: rg.L2, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    u, inside = _deviation(reg, b)
    p = u * u
    g = _center_grad(reg, b, b.aggregate_grad(2.0 * u))
    return b.aggregate(p), b.metrics("l2", p), np.where(inside, g, 0.0)


# ---- family II: penalties over distributions along the class axis (SPEC 9) ---------------
# Rows here are never all -inf: such tokens are masked (``valid_tokens_for``) and zeroed.
def _log_softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p, p, lse) by the textbook formula; -inf classes get log p = -inf, p = 0."""
    m = np.max(z, axis=-1, keepdims=True)
    lse = m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
    logp = z - lse
    return logp, np.exp(logp), lse


def _kl(loga: np.ndarray, a: np.ndarray, logb: np.ndarray) -> np.ndarray:
    """KL(a‖b) per row: Σ over a's support (finite scores) of a(log a - log b); a class
    with a > 0 and b = 0 makes it +inf."""
    return np.sum(np.where(np.isfinite(loga), a * (loga - logb), 0.0), axis=-1)


def _rows_ok(*arrays: np.ndarray) -> np.ndarray:
    ok = np.ones(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        ok &= ~np.all(a == -np.inf, axis=-1)
    return ok


def _with_reference(reg: Any, values: np.ndarray, read: Callable[[Any], np.ndarray]) -> np.ndarray:
    return _rows_ok(values, read(reg.reference))


def _kl_and_grad(
    z: np.ndarray, r: np.ndarray, direction: str, t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL (SPEC 9's table) and its gradient w.r.t. z; 0 where the KL is +inf."""
    logp, p, _ = _log_softmax(z / t)
    logq, q, _ = _log_softmax(r / t)
    parts, grads = [], []
    if direction in ("reverse", "symmetric"):
        kl = _kl(logp, p, logq)
        g = np.where(np.isfinite(logp), p * (logp - logq - kl[:, None]), 0.0)
        parts.append(kl)
        grads.append(np.where(np.isinf(kl)[:, None], 0.0, g))
    if direction in ("forward", "symmetric"):
        kl = _kl(logq, q, logp)
        parts.append(kl)
        grads.append(np.where(np.isinf(kl)[:, None], 0.0, p - q))
    value = sum(parts) / len(parts)
    return value, sum(grads) / len(grads) / t


valid_tokens_for(rg.KL)(_with_reference)
valid_tokens_for(rg.JSD)(_with_reference)


@valid_tokens_for(rg.Entropy)
@valid_tokens_for(rg.ZLoss)
def _scores_ok(reg: Any, values: np.ndarray, read: Callable[[Any], np.ndarray]) -> np.ndarray:
    return _rows_ok(values)


@reference_for(rg.KL)
def ref_kl(reg: rg.KL, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    p, g = _kl_and_grad(b.values, b.field(reg.reference), reg.direction, reg.temperature)
    return b.aggregate(p), b.metrics("kl", p), b.aggregate_grad(g)


@reference_for(rg.JSD)
def ref_jsd(reg: rg.JSD, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    beta, t = reg.beta, reg.temperature
    logp, p, _ = _log_softmax(b.values / t)
    logq, q, _ = _log_softmax(b.field(reg.reference) / t)
    logm = np.log(beta * q + (1 - beta) * p)  # in probability space: independent of ours
    kl_pm = _kl(logp, p, logm)
    value = beta * _kl(logq, q, logm) + (1 - beta) * kl_pm
    g = np.where(np.isfinite(logp), p * (logp - logm - kl_pm[:, None]), 0.0)
    return b.aggregate(value), b.metrics("jsd", value), b.aggregate_grad((1 - beta) * g / t)


@reference_for(rg.Entropy)
def ref_entropy(reg: rg.Entropy, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    t, size = reg.temperature, b.values.shape[-1]
    logp, p, _ = _log_softmax(b.values / t)
    plogp = np.where(np.isfinite(logp), p * logp, 0.0)
    h = -plogp.sum(-1)
    dh = -(plogp + p * h[:, None]) / t  # -p (log p + H) / T, 0 at -inf classes
    log_v = math.log(size)
    scale = (1 / log_v if size > 1 else 0.0) if reg.normalize else 1.0
    x = h * scale
    top = log_v * scale
    if reg.threshold is None:
        pen = x if reg.mode == "minimize" else top - x
        slope = np.full_like(h, scale if reg.mode == "minimize" else -scale)
    elif reg.mode == "minimize":
        pen = np.maximum(x - reg.threshold, 0.0)
        slope = np.where(x > reg.threshold, scale, 0.0)
    else:
        pen = np.maximum(reg.threshold - x, 0.0)
        slope = np.where(reg.threshold > x, -scale, 0.0)
    metrics = b.metrics("entropy", pen)
    metrics["entropy_mean"] = b.mean(h)
    return b.aggregate(pen), metrics, b.aggregate_grad(dh * slope[:, None])


@reference_for(rg.ZLoss)
def ref_z_loss(reg: rg.ZLoss, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    _, p, lse = _log_softmax(b.values)
    log_z = lse[:, 0]
    value = log_z**2
    metrics = b.metrics("z_loss", value)
    metrics["log_z_mean"] = b.mean(log_z)
    return b.aggregate(value), metrics, b.aggregate_grad(2 * lse * p)


@valid_tokens_for(rg.Consistency)
def _consistency_ok(
    reg: rg.Consistency, values: np.ndarray, read: Callable[[Any], np.ndarray]
) -> np.ndarray:
    y = read(reg.paired)
    if reg.metric in ("mse", "l1"):
        return ~((values == -np.inf) & (y == -np.inf))
    return _rows_ok(values, y)


@reference_for(rg.Consistency)
def ref_consistency(reg: rg.Consistency, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    x, y = b.values, b.field(reg.paired)
    if reg.metric == "kl":
        p, g = _kl_and_grad(x, y, "symmetric", reg.temperature)
    elif reg.metric == "cosine":
        p, g = _cosine(x, y)
    else:
        d = np.where((x == -np.inf) & (y == -np.inf), 0.0, x - y)
        p, g = (d * d, 2 * d) if reg.metric == "mse" else (np.abs(d), np.sign(d))
    return b.aggregate(p), b.metrics("consistency", p), b.aggregate_grad(g)


def _cosine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1 - cos of rows, -inf classes of either left out; 0 for two zero rows, 1 for one."""
    drop = (x == -np.inf) | (y == -np.inf)
    x, y = np.where(drop, 0.0, x), np.where(drop, 0.0, y)
    nx = np.linalg.norm(x, axis=-1, keepdims=True)
    ny = np.linalg.norm(y, axis=-1, keepdims=True)
    pos = (nx > 0) & (ny > 0)
    nx1, ny1 = np.where(nx > 0, nx, 1.0), np.where(ny > 0, ny, 1.0)
    cos = np.sum(x * y, axis=-1, keepdims=True) / (nx1 * ny1)
    value = np.where(pos, 1 - cos, np.where((nx == 0) & (ny == 0), 0.0, 1.0))[:, 0]
    g = -(y / ny1 - cos * x / nx1) / nx1  # d(1 - cos)/dx
    return value, np.where(pos & ~drop, g, 0.0)
