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


def reference_for(cls: type) -> Callable[[RefFn], RefFn]:
    def register(fn: RefFn) -> RefFn:
        REFERENCES[cls] = fn
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
    n_local = float(m_flat.sum())
    ids = np.repeat(np.arange(len(lengths)), lengths)
    per_seq = np.bincount(ids, weights=m_flat.astype(float), minlength=len(lengths))
    s_local = float((per_seq > 0).sum())
    counts = counts or {}

    def read(ref: Any) -> np.ndarray:
        ref = getattr(ref, "value", ref)
        if isinstance(ref, str):
            ref = rg.Field(ref)
        got = _read(data, ref.key) if isinstance(ref, rg.Field) else _as_list(ref)
        return _rows(got, k, axis)[0]

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
