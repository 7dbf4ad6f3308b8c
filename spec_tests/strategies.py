"""Hypothesis strategies: NumPy arrays (converted per backend by the harness) and options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

import regularizers as rg

FLOATS = ("float32", "float64")


def reals(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats in ``[lo, hi]``, exact in float32 too (``width=32``: every dtype sees the same
    input), and never subnormal: XLA's CPU backend reads subnormals as 0 (its arithmetic and
    its comparisons), so there a subnormal is on the kink at 0 that the float64 reference
    puts it beside. ``test_inv09_subnormals_as_the_backend_reads_them`` pins them instead,
    on every backend."""
    return st.floats(lo, hi, width=32, allow_subnormal=False)


def elements(lo: float = -200.0, hi: float = 50.0) -> st.SearchStrategy[float]:
    return reals(lo, hi)


@st.composite
def arrays(
    draw: st.DrawFn,
    dtype: str | None = None,
    lo: float = -200.0,
    hi: float = 50.0,
    min_side: int = 0,
    max_dims: int = 2,
) -> np.ndarray:
    dt = dtype or draw(st.sampled_from(FLOATS))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=min_side, max_side=10))
    # Sprinkle the kinks: exact zeros, and values on and around the ADR's clip bounds.
    kinks = st.sampled_from([0.0, -0.0, -100.0, 0.0, 1.0, -1.0])
    return draw(hnp.arrays(dt, shape, elements=st.one_of(elements(lo, hi), kinks)))


@st.composite
def ragged(
    draw: st.DrawFn, dtype: str | None = None, lo: float = -200.0, hi: float = 50.0
) -> list[np.ndarray]:
    dt = dtype or draw(st.sampled_from(FLOATS))
    n = draw(st.integers(1, 4))
    return [draw(arrays(dt, lo, hi, max_dims=1)) for _ in range(n)]


def clips() -> st.SearchStrategy[Any]:
    bound = reals(-150.0, 20.0)
    return st.one_of(
        st.none(),
        st.just((-100.0, 0.0)),
        st.tuples(bound, bound).map(lambda p: (min(p), max(p))),
        st.tuples(st.none(), bound),
        st.tuples(bound, st.none()),
    )


def centers() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.just("mean"), reals(-50.0, 10.0))


@st.composite
def regularizers(
    draw: st.DrawFn,
    *,
    clip: bool = True,
    center: bool = True,
    probs: bool = False,
    kinds: tuple[str, ...] = ("l1", "l2"),
) -> rg.Regularizer:
    kind = draw(st.sampled_from(kinds))
    opts: dict[str, Any] = {"reduce": draw(st.sampled_from(["sum", "mean"]))}
    if probs:
        opts["target"] = draw(st.sampled_from(["logprobs", "probs"]))
    if kind == "l1":
        return rg.L1(**opts)
    if clip:
        opts["clip"] = draw(clips())
    if center:
        opts["center"] = draw(centers())
    return rg.L2(**opts)


def masks_for(x: Any) -> st.SearchStrategy[Any]:
    """A mask shaped like ``x`` (an array or a list of arrays): bool, 0/1 ints or floats."""
    if isinstance(x, list):
        return st.tuples(*[masks_for(a) for a in x]).map(list)
    return st.one_of(
        hnp.arrays(np.bool_, x.shape),
        hnp.arrays(np.float32, x.shape, elements=st.sampled_from([0.0, 1.0, 0.5])),
    )


# ---- cases for the generic properties of every penalty (test_properties.py) -----------------
REDUCES = ("sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class Case:
    """One drawn call: a regularizer, its input (one array or a list), its ``data`` and mask.

    ``x`` and the arrays of ``data`` and ``mask`` are NumPy; the harness converts them.
    Fields a regularizer reads (``reference``, ``behavior``...) are always given through
    ``data`` here, so that the same regularizer runs on every backend.
    """

    reg: Any
    x: Any
    data: dict[str, Any] | None = None
    mask: Any = None

    @property
    def is_list(self) -> bool:
        return isinstance(self.x, list)


CaseFn = Callable[..., st.SearchStrategy[Case]]
CASES: dict[type, CaseFn] = {}


def cases_for(cls: type) -> Callable[[CaseFn], CaseFn]:
    """Register ``fn(shapes, reduce_options, splittable) -> strategy of Case`` for ``cls``.

    ``shapes`` is the list of per-sequence input shapes (class axis included) that the case
    must use (a strategy with an ``event_ndims`` attribute, e.g. ``(0, 1)``, is asked for
    each; the case's regularizer must then have that ``event_ndim``), ``reduce_options`` the
    ``reduce`` (and ``max_tokens``) to construct with, and
    ``splittable`` asks for options under which split invariance is promised (no
    ``center="mean"``).
    """

    def register(fn: CaseFn) -> CaseFn:
        CASES[cls] = fn
        return fn

    return register


def reduce_options(reduce: str) -> dict[str, Any]:
    if reduce == "seq-mean-token-sum-norm":
        return {"reduce": reduce, "max_tokens": 8.0}
    return {"reduce": reduce}


@st.composite
def cases(
    draw: st.DrawFn,
    cls: type,
    *,
    reduce: str | None = None,
    splittable: bool = False,
    layout: str | None = None,
    min_sequences: int = 1,
    masked: bool | None = None,
    no_tokens: bool = False,
) -> Case:
    """A drawn call of ``cls``: the layout (list or stacked ``[B, T, ...]``), the sequences,
    the reduce mode and a mask, around the class's own case strategy. A list has a token at
    least, unless ``no_tokens``: then it has none (every datum empty)."""
    # a class whose options decide its event_ndim lists the ones its strategy handles
    # (not a getattr default: a property's class attribute is no int)
    ks = getattr(CASES[cls], "event_ndims", None)
    k = draw(st.sampled_from(ks if ks is not None else (int(cls.event_ndim),)))
    event = tuple(draw(st.integers(1, 4)) for _ in range(k))
    layout = layout or draw(st.sampled_from(["list", "stacked"]))
    n_seq = draw(st.integers(min_sequences, 4))
    if layout == "stacked":
        length = draw(st.integers(1, 5))
        lengths = [length] * n_seq
    else:
        lengths = draw(st.lists(st.integers(0, 6), min_size=n_seq, max_size=n_seq))
        if no_tokens:
            lengths = [0] * n_seq
        elif sum(lengths) == 0:
            lengths[0] = 1
    reduce = reduce or draw(st.sampled_from(REDUCES))
    shapes = [(n, *event) for n in lengths]
    case = draw(CASES[cls](shapes, reduce_options(reduce), splittable))
    if masked is None:
        masked = draw(st.booleans())
    mask = [draw(hnp.arrays(np.bool_, (n,))) for n in lengths] if masked else None
    if layout == "stacked":
        stack = lambda arrays: np.stack(arrays)  # noqa: E731
        case.x = stack(case.x)
        if case.data:
            case.data = {k_: stack(v) for k_, v in case.data.items()}
        if mask is not None:
            mask = stack(mask)
    case.mask = mask
    return case


def field_like(
    draw: st.DrawFn, shapes: list[tuple[int, ...]], lo: float, hi: float
) -> list[np.ndarray]:
    """A list of float64 arrays of ``shapes`` (e.g. reference logprobs), values in [lo, hi]."""
    return [draw(hnp.arrays(np.float64, s, elements=reals(lo, hi))) for s in shapes]


@cases_for(rg.L1)
@st.composite
def l1_cases(draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool) -> Case:
    x = field_like(draw, shapes, -50.0, 5.0)
    target = draw(st.sampled_from(["logprobs", "probs"]))
    return Case(rg.L1(target=target, **reduce), x)


@cases_for(rg.L2)
@st.composite
def l2_cases(draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool) -> Case:
    x = field_like(draw, shapes, -50.0, 5.0)
    center = draw(st.one_of(st.none(), reals(-5.0, 1.0)) if splittable else centers())
    return Case(rg.L2(clip=draw(clips()), center=center, **reduce), x)


def with_kinks(draw: st.DrawFn, arrays: list[np.ndarray], kinks: list[float]) -> list[np.ndarray]:
    """``arrays`` with some elements set exactly to the given kink values."""
    out = []
    for a in arrays:
        a = np.array(a, dtype=np.float64)
        flat_view = a.reshape(-1)  # a view: a is a fresh contiguous copy
        if flat_view.size and kinks:
            where = st.integers(0, flat_view.size - 1)
            for i, v in draw(st.lists(st.tuples(where, st.sampled_from(kinks)), max_size=4)):
                flat_view[i] = v
        out.append(a)
    return out


def dyadic(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Multiples of 1/8: their sums are exact, so a mean is the same on every backend."""
    return st.integers(int(lo * 8), int(hi * 8)).map(lambda k: k / 8)


def dyadic_clips() -> st.SearchStrategy[Any]:
    bound = dyadic(-150.0, 20.0)
    return st.one_of(
        st.none(),
        st.just((-100.0, 0.0)),
        st.tuples(bound, bound).map(lambda p: (min(p), max(p))),
        st.tuples(st.none(), bound),
        st.tuples(bound, st.none()),
    )


def kinks_of(center: Any, clip: Any, *offsets: float) -> list[float]:
    """Where ``u = clip(t) - center`` hits ``offsets`` (0, ±δ...), and the clip bounds."""
    c0 = 0.0 if center is None or center == "mean" else center
    return [c0 + o for o in offsets] + [b for b in clip or () if b is not None]


@cases_for(rg.ElasticNet)
@st.composite
def elastic_net_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    l1_ratio = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)))
    center = draw(st.one_of(st.none(), reals(-5.0, 1.0)) if splittable else centers())
    # sign(u) at u = 0 must not hinge on how a backend rounds a mean: keep sums exact there
    exact = center == "mean"
    clip = draw(dyadic_clips() if exact else clips())
    if exact:
        x = [draw(hnp.arrays(np.float64, s, elements=dyadic(-50.0, 5.0))) for s in shapes]
    else:
        x = field_like(draw, shapes, -50.0, 5.0)
    target = draw(st.sampled_from(["logprobs", "probs"])) if center is None else "logprobs"
    if target == "logprobs":  # (the kinks of probs are elsewhere; exp(20) is no float16)
        x = with_kinks(draw, x, kinks_of(center, clip, 0.0))
    reg = rg.ElasticNet(l1_ratio=l1_ratio, center=center, clip=clip, target=target, **reduce)
    return Case(reg, x)


@cases_for(rg.Huber)
@st.composite
def huber_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    delta = draw(st.one_of(st.sampled_from([1.0, 0.5, 2.0]), reals(0.015625, 20.0)))
    center = draw(st.one_of(st.none(), reals(-5.0, 1.0)) if splittable else centers())
    clip = draw(clips())
    x = field_like(draw, shapes, -50.0, 5.0)
    target = draw(st.sampled_from(["logprobs", "probs"]))
    if target == "logprobs":
        x = with_kinks(draw, x, kinks_of(center, clip, 0.0, delta, -delta))
    return Case(rg.Huber(delta=delta, center=center, clip=clip, target=target, **reduce), x)


def _logprob_fields(
    draw: st.DrawFn, shapes: list[Any], names: tuple[str, ...]
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Logprobs and fields (reference, behaviour) in [-10, 0], so |lp - field| <= 10 and
    exp(±10) keeps every float64 reference finite; some fields equal lp (d = 0, a kink)."""
    x = field_like(draw, shapes, -10.0, 0.0)
    data: dict[str, Any] = {}
    for name in names:
        other = field_like(draw, shapes, -10.0, 0.0)
        same = [draw(hnp.arrays(np.bool_, s)) for s in shapes]
        data[name] = [np.where(m, a, o) for a, o, m in zip(x, other, same, strict=True)]
    return x, data


@cases_for(rg.SampledKL)
@st.composite
def sampled_kl_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    estimator = draw(st.sampled_from(["k1", "abs", "k2", "k3"]))
    unbiased = estimator in ("k1", "k3") and draw(st.booleans())
    behavior = draw(st.booleans())
    bound = reals(-4.0, 4.0)
    clip = draw(
        st.one_of(
            st.none(),
            st.tuples(bound, bound).map(lambda p: (min(p), max(p))),
            st.tuples(st.none(), bound),
            st.tuples(bound, st.none()),
        )
    )
    names = ("ref_logprobs", "behavior_logprobs") if behavior else ("ref_logprobs",)
    x, data = _logprob_fields(draw, shapes, names)
    reg = rg.SampledKL(
        rg.Field("ref_logprobs"),
        estimator=estimator,
        gradient="unbiased" if unbiased else "estimator",
        behavior=rg.Field("behavior_logprobs") if behavior else None,
        log_ratio_clip=clip,
        **reduce,
    )
    return Case(reg, x, data)


@cases_for(rg.SampledEntropy)
@st.composite
def sampled_entropy_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    behavior = draw(st.booleans())
    x, data = _logprob_fields(draw, shapes, ("behavior_logprobs",) if behavior else ())
    reg = rg.SampledEntropy(
        mode=draw(st.sampled_from(["maximize", "minimize"])),
        behavior=rg.Field("behavior_logprobs") if behavior else None,
        **reduce,
    )
    return Case(reg, x, data or None)


@st.composite
def _signed(draw: st.DrawFn, lo: float, hi: float) -> float:
    """A value of magnitude in [lo, hi] (or an exact kink: 0, ±1, ±0.5), either sign.

    Magnitudes stay away from the float32 under/overflow of a sum of squares, so the norms
    of every backend and of the float64 reference see the same zero rows."""
    v = draw(st.one_of(reals(lo, hi), st.sampled_from([0.0, 1.0, 0.5])))
    return -v if draw(st.booleans()) else v


def _with_zero_rows(draw: st.DrawFn, x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with some vectors along ``axis`` (rows of a matrix, gradient rows) set to 0."""
    axis %= x.ndim
    keep = draw(hnp.arrays(np.bool_, x.shape[:axis] + x.shape[axis + 1 :]))
    return np.where(np.expand_dims(keep | draw(st.booleans()), axis), x, 0.0)


@cases_for(rg.Orthogonality)
@st.composite
def orthogonality_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    mode = draw(st.sampled_from(["rows", "columns"]))
    x = [
        _with_zero_rows(
            draw,
            draw(hnp.arrays(np.float64, s, elements=_signed(2.0**-10, 4.0))),
            -1 if mode == "rows" else -2,
        )
        for s in shapes
    ]
    kind = draw(st.sampled_from(["cosine", "frobenius"]))
    return Case(rg.Orthogonality(mode=mode, kind=kind, **reduce), x)


@cases_for(rg.GradientPenalty)
@st.composite
def gradient_penalty_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    x = [
        _with_zero_rows(draw, draw(hnp.arrays(np.float64, s, elements=_signed(2.0**-10, 50.0))), -1)
        for s in shapes
    ]
    c = draw(st.one_of(st.sampled_from([0.0, 1.0]), reals(0.0, 5.0)))
    return Case(rg.GradientPenalty(target_norm=c, **reduce), x)


# ---- family II: penalties over distributions along the class axis (SPEC 9) ---------------
def _neg_inf_pattern(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """Where scores are -inf: some classes, and (for rows of a class axis) whole rows."""
    where = draw(hnp.arrays(np.bool_, shape, elements=st.sampled_from([False] * 3 + [True])))
    if len(shape) > 1 and shape[0]:
        rows = draw(hnp.arrays(np.bool_, shape[:1], elements=st.sampled_from([False] * 4 + [True])))
        where = where | rows[:, None]
    return where


@st.composite
def scores(
    draw: st.DrawFn, shapes: list[Any], lo: float = -20.0, hi: float = 20.0
) -> list[np.ndarray]:
    """Float64 scores (exact in float32) with -inf classes and rows of all -inf."""
    out = []
    for s, x in zip(shapes, field_like(draw, shapes, lo, hi), strict=True):
        out.append(np.where(_neg_inf_pattern(draw, s), -np.inf, x))
    return out


@st.composite
def paired_scores(draw: st.DrawFn, x: list[np.ndarray]) -> list[np.ndarray]:
    """A second array of scores for ``x``: equal (up to a shift per row: the same
    distribution), the same -inf classes (a shared masked vocabulary), or its own."""
    how = draw(st.sampled_from(["same", "shared", "shared", "own"]))
    out = []
    for a in x:
        shape = a.shape
        if how == "same":
            shift = draw(st.sampled_from([0.0, 3.5, -7.25]))
            out.append(a + shift)
            continue
        other = field_like(draw, [shape], -20.0, 20.0)[0]
        if how == "shared":
            out.append(np.where(a == -np.inf, -np.inf, other))
        else:
            out.append(np.where(_neg_inf_pattern(draw, shape), -np.inf, other))
    return out


def temperatures() -> st.SearchStrategy[float]:
    return st.one_of(st.just(1.0), st.sampled_from([0.5, 2.0]), reals(0.25, 3.0))


@cases_for(rg.KL)
@st.composite
def kl_cases(draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool) -> Case:
    x = draw(scores(shapes))
    reg = rg.KL(
        rg.Field("reference"),
        direction=draw(st.sampled_from(["reverse", "forward", "symmetric"])),
        temperature=draw(temperatures()),
        **reduce,
    )
    return Case(reg, x, {"reference": draw(paired_scores(x))})


@cases_for(rg.JSD)
@st.composite
def jsd_cases(draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool) -> Case:
    x = draw(scores(shapes))
    beta = draw(st.one_of(st.sampled_from([0.5, 0.1, 0.9]), reals(0.015625, 0.984375)))
    reg = rg.JSD(rg.Field("reference"), beta=beta, temperature=draw(temperatures()), **reduce)
    return Case(reg, x, {"reference": draw(paired_scores(x))})


@cases_for(rg.Entropy)
@st.composite
def entropy_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    reg = rg.Entropy(
        mode=draw(st.sampled_from(["minimize", "maximize"])),
        normalize=draw(st.booleans()),
        threshold=draw(st.one_of(st.none(), reals(0.0, 1.5))),
        temperature=draw(temperatures()),
        **reduce,
    )
    return Case(reg, draw(scores(shapes)))


@cases_for(rg.ZLoss)
@st.composite
def z_loss_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    return Case(rg.ZLoss(**reduce), draw(scores(shapes)))


@cases_for(rg.Consistency)
@st.composite
def consistency_cases(
    draw: st.DrawFn, shapes: list[Any], reduce: dict[str, Any], splittable: bool
) -> Case:
    elementwise = len(shapes[0]) == 1  # event_ndim 0: per element; 1: rows of a class axis
    metric = draw(st.sampled_from(["mse", "l1"] if elementwise else ["cosine", "kl"]))
    x = draw(scores(shapes))
    if metric == "cosine":  # zero rows: the cosine's special cases
        x = [np.where(draw(hnp.arrays(np.bool_, a.shape[:1]))[:, None], 0.0, a) for a in x]
    temperature = draw(temperatures()) if metric == "kl" else 1.0
    reg = rg.Consistency(rg.Field("paired"), metric=metric, temperature=temperature, **reduce)
    return Case(reg, x, {"paired": draw(paired_scores(x))})


consistency_cases.event_ndims = (0, 1)  # type: ignore[attr-defined]


# ---- batches for the training paths' equality tests (test_fused_grad, test_jax_closed_form) --
TRAINING_KINKS = [0.0, -0.0, -100.0, 1.0, -1.0, -3.5]
TRAINING_SPECIALS = [np.inf, -np.inf, np.nan, 1e4, -3e4]


@st.composite
def training_batches(
    draw: st.DrawFn, masks: tuple[str, ...] = ("none", "none", "array", "field")
) -> tuple[Any, str, Any, Any]:
    """``(x, kind, mask, counts)``: a float64 array or a ragged list on the kinks and maybe
    beyond (±inf, NaN, large), a mask of ``kind`` (``"none"``, ``"array"`` or ``"field"``)
    whose masked entries may hide ±inf/NaN, and maybe ``counts``."""
    values = st.one_of(elements(-300.0, 10.0), st.sampled_from(TRAINING_KINKS))
    if draw(st.integers(0, 3)) == 0:
        values = st.one_of(values, st.sampled_from(TRAINING_SPECIALS))
    size = st.integers(0, 2000) if draw(st.integers(0, 9)) == 0 else st.integers(0, 30)
    x: Any
    if draw(st.booleans()):
        x = [
            draw(hnp.arrays("float64", draw(size), elements=values))
            for _ in range(draw(st.integers(1, 5)))
        ]
    else:
        shape = draw(st.sampled_from([(draw(size),), (draw(st.integers(1, 4)), 6)]))
        x = draw(hnp.arrays("float64", shape, elements=values))
    kind = draw(st.sampled_from(masks))
    mask = None if kind == "none" else draw(masks_for(x))
    if mask is not None and draw(st.booleans()):  # what a masked token holds never counts
        hidden = st.sampled_from([np.inf, -np.inf, np.nan])
        for a, m in zip(
            x if isinstance(x, list) else [x],
            mask if isinstance(mask, list) else [mask],
            strict=True,
        ):
            off = np.asarray(m) == 0
            if off.any():
                a[off] = draw(hnp.arrays("float64", int(off.sum()), elements=hidden))
    counts = None
    if draw(st.integers(0, 4)) == 0:
        counts = {"tokens": draw(st.integers(1, 50)), "sequences": draw(st.integers(1, 6))}
    return x, kind, mask, counts


def training_tolerance(x: Any, dtype: str, reg: Any, mask: Any = None) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a training path with the generic path on ``x`` (an
    array or a list; only the counted entries when ``mask`` is given): the rounding of a
    sum of squares of the largest finite magnitude (plus a numeric center) in ``dtype``."""
    parts = x if isinstance(x, list) else [x]
    flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in parts])
    if mask is not None:
        masks = mask if isinstance(mask, list) else [mask]
        flat = flat[np.concatenate([np.asarray(m).reshape(-1) != 0 for m in masks])]
    with np.errstate(over="ignore"):
        t = np.exp(flat) if getattr(reg, "target", None) == "probs" else flat
    finite = t[np.isfinite(t)]
    center = getattr(reg, "center", None)
    big = (np.abs(finite).max() if finite.size else 0.0) + 1.0
    big += abs(center) if isinstance(center, float) else 0.0
    rtol = 1e-9 if dtype == "float64" else 2e-5
    return rtol, rtol * max(t.size, 1) * big * big
