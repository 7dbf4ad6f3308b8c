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
    value = data[key] if isinstance(data, Mapping) else [d.loss_fn_inputs[key] for d in data]
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
    mu = b.local_mean(c) if reg.center == "mean" else reg.center or 0.0
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


@reference_for(rg.ElasticNet)
def ref_elastic_net(reg: rg.ElasticNet, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    u, inside = _deviation(reg, b)
    a, l1, l2 = reg.l1_ratio, np.abs(u), u * u
    # a part whose weight is exactly 0 is left out (no 0 · inf)
    p = l1 if a == 1.0 else l2 if a == 0.0 else a * l1 + (1.0 - a) * l2
    dp = np.sign(u) if a == 1.0 else 2.0 * u if a == 0.0 else a * np.sign(u) + 2.0 * (1 - a) * u
    metrics = {**b.metrics("elastic_net", p, peak=False), "l1_raw": b.sum(l1), "l2_raw": b.sum(l2)}
    g = _center_grad(reg, b, b.aggregate_grad(dp))
    return b.aggregate(p), metrics, np.where(inside, g, 0.0)


@reference_for(rg.Huber)
def ref_huber(reg: rg.Huber, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    u, inside = _deviation(reg, b)
    d = reg.delta
    p = np.where(np.abs(u) <= d, 0.5 * u * u, d * (np.abs(u) - 0.5 * d))
    g = _center_grad(reg, b, b.aggregate_grad(np.clip(u, -d, d)))
    return b.aggregate(p), b.metrics("huber", p), np.where(inside, g, 0.0)


def _log_ratio(reg: Any, b: RefBatch) -> tuple[np.ndarray, np.ndarray]:
    """(d, inside): lp - reference after ``log_ratio_clip``, and where the clip passes."""
    d = b.values - b.field(reg.reference)
    lo, hi = reg.log_ratio_clip if reg.log_ratio_clip is not None else (None, None)
    lo_, hi_ = -np.inf if lo is None else lo, np.inf if hi is None else hi
    return np.clip(d, lo_, hi_), ~((d < lo_) | (d > hi_))


@reference_for(rg.SampledKL)
def ref_sampled_kl(reg: rg.SampledKL, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    d, inside = _log_ratio(reg, b)
    k, dk = {
        "k1": (d, np.ones_like(d)),
        "abs": (np.abs(d), np.sign(d)),
        "k2": (0.5 * d * d, d),
        "k3": (np.exp(-d) - 1.0 + d, 1.0 - np.exp(-d)),
    }[reg.estimator]
    dk = np.where(inside, dk, 0.0)
    if reg.behavior is not None:  # rho = exp(lp - b), d rho / d lp = rho
        rho = np.exp(b.values - b.field(reg.behavior))
        p, dp = rho * k, rho * dk + rho * k
    elif reg.gradient == "unbiased":  # rho = 1, d rho / d lp = 1
        p, dp = k, dk + k
    else:
        p, dp = k, dk
    metrics = b.metrics("sampled_kl", p)
    metrics["log_ratio_mean"] = b.mean(d)
    return b.aggregate(p), metrics, b.aggregate_grad(dp)


@reference_for(rg.SampledEntropy)
def ref_sampled_entropy(
    reg: rg.SampledEntropy, b: RefBatch
) -> tuple[float, dict[str, float], np.ndarray]:
    lp = b.values
    rho = np.ones_like(lp) if reg.behavior is None else np.exp(lp - b.field(reg.behavior))
    sign = 1.0 if reg.mode == "maximize" else -1.0
    p, dp = sign * rho * lp, sign * rho * (lp + 1.0)
    metrics = b.metrics("sampled_entropy", p, peak=False)
    metrics["entropy_mean"] = b.mean(-rho * lp)
    return b.aggregate(p), metrics, b.aggregate_grad(dp)


def _mean_abs_cosine(w: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean |cos| over the distinct pairs of rows of ``w``, and its gradient, pair by pair."""
    norms = np.sqrt((w * w).sum(axis=1))
    pairs = [(i, j) for i in range(len(w)) for j in range(i + 1, len(w))]
    total, d = 0.0, np.zeros_like(w)
    for i, j in pairs:
        if norms[i] == 0 or norms[j] == 0:  # a zero row: cosine 0, gradient 0
            continue
        c = float(w[i] @ w[j]) / (norms[i] * norms[j])
        total += min(abs(c), 1.0)
        if abs(c) > 1.0:  # rounding beyond ±1 is clipped: no slope
            continue
        # d cos / d w_i = w_j / (‖w_i‖‖w_j‖) - cos · w_i / ‖w_i‖²  (and symmetrically)
        d[i] += np.sign(c) * (w[j] / (norms[i] * norms[j]) - c * w[i] / norms[i] ** 2)
        d[j] += np.sign(c) * (w[i] / (norms[i] * norms[j]) - c * w[j] / norms[j] ** 2)
    if not pairs:  # a single row: no pairs, 0
        return 0.0, d
    return total / len(pairs), d / len(pairs)


@reference_for(rg.Orthogonality)
def ref_orthogonality(
    reg: rg.Orthogonality, b: RefBatch
) -> tuple[float, dict[str, float], np.ndarray]:
    p, dp = np.zeros(b.values.shape[0]), np.zeros_like(b.values)
    for t, matrix in enumerate(b.values):
        w = matrix if reg.mode == "rows" else matrix.T
        if reg.kind == "frobenius":
            e = w @ w.T - np.eye(w.shape[0])
            p[t], d = float((e * e).sum()), 4.0 * e @ w
        else:
            p[t], d = _mean_abs_cosine(w)
        dp[t] = d if reg.mode == "rows" else d.T
    return b.aggregate(p), b.metrics("orthogonality", p), b.aggregate_grad(dp)


@reference_for(rg.GradientPenalty)
def ref_gradient_penalty(
    reg: rg.GradientPenalty, b: RefBatch
) -> tuple[float, dict[str, float], np.ndarray]:
    g, c = b.values, reg.target_norm
    norm = np.sqrt((g * g).sum(axis=-1))
    p = (norm - c) ** 2
    unit = np.zeros_like(g)
    np.divide(g, norm[:, None], out=unit, where=norm[:, None] > 0)  # 0 at g = 0
    metrics = b.metrics("gradient_penalty", p)
    metrics["grad_norm_mean"] = b.mean(norm)
    return b.aggregate(p), metrics, b.aggregate_grad(2.0 * (norm - c)[:, None] * unit)


# ---- family II: penalties over distributions along the class axis (SPEC 9) ---------------
# Rows here are never all -inf: such tokens are masked (``valid_tokens_for``) and zeroed.
def _log_softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p, p, lse) by the textbook formula, log p as (z - m) - log s (not z - lse, which
    loses log s to the rounding of a large max m); -inf classes get log p = -inf, p = 0."""
    m = np.max(z, axis=-1, keepdims=True)
    log_s = np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
    logp = (z - m) - log_s
    return logp, np.exp(logp), m + log_s


def _kl(loga: np.ndarray, a: np.ndarray, logb: np.ndarray) -> np.ndarray:
    """KL(a‖b) per row: Σ over a's support (log a > -inf) of a(log a - log b); a class
    with a > 0 and b = 0 makes it +inf, and a NaN anywhere in the row (not a class outside
    the support: ``NaN > -inf`` is False, so the test is ``!= -inf``) makes it NaN."""
    return np.sum(np.where(_support(loga), a * (loga - logb), 0.0), axis=-1)


def _support(loga: np.ndarray) -> np.ndarray:
    """The classes of a distribution's support, and its NaNs (which must propagate)."""
    return loga != -np.inf


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
        g = np.where(_support(logp), p * (logp - logq - kl[:, None]), 0.0)
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
    g = np.where(_support(logp), p * (logp - logm - kl_pm[:, None]), 0.0)
    return b.aggregate(value), b.metrics("jsd", value), b.aggregate_grad((1 - beta) * g / t)


@reference_for(rg.Entropy)
def ref_entropy(reg: rg.Entropy, b: RefBatch) -> tuple[float, dict[str, float], np.ndarray]:
    t, size = reg.temperature, b.values.shape[-1]
    logp, p, _ = _log_softmax(b.values / t)
    plogp = np.where(_support(logp), p * logp, 0.0)
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
