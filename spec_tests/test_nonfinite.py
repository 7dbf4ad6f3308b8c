"""SPEC section 3 on non-finite data: NaN propagates; ±inf propagates unless clipped away."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pytest

import regularizers as rg
from regularizers import Batch

Harness = Any
nan, inf = math.nan, math.inf


def run(
    bk: Harness, reg: rg.Regularizer, x: list[float], mask: list[float] | None = None
) -> tuple[float, dict[str, float], np.ndarray]:
    a = bk.asarray(np.asarray(x))
    if mask is None:
        v, m, g = bk.call(lambda lp: reg.value_and_grad(None, lp), a)
    else:
        v, m, g = bk.call(
            lambda lp, w: reg.value_and_grad(None, lp, mask=w), a, bk.asarray(np.asarray(mask))
        )
    return bk.float(v), rg.to_floats(m), bk.to_numpy(g)


@pytest.mark.parametrize(
    "reg",
    [rg.L1(), rg.L2(), rg.L2(center="mean"), rg.L2(clip=(-100.0, 0.0)), rg.L1(target="probs")],
)
def test_nan_propagates(bk: Harness, reg: rg.Regularizer) -> None:
    value, metrics, grad = run(bk, reg, [-1.0, nan, -2.0])
    assert math.isnan(value)
    assert all(math.isnan(v) for v in metrics.values()), metrics
    assert math.isnan(grad[1])


def test_masked_out_nan_does_not_leak(bk: Harness) -> None:
    for reg in (rg.L1(), rg.L2(center="mean"), rg.L2(clip=(-100.0, 0.0), reduce="mean")):
        value, metrics, grad = run(bk, reg, [-1.0, nan, -inf, -2.0], mask=[1, 0, 0, 1])
        assert math.isfinite(value)
        assert all(math.isfinite(v) for v in metrics.values())
        assert grad[1] == 0.0
        assert grad[2] == 0.0
        assert np.isfinite(grad).all()


def test_infinities_propagate_without_clip(bk: Harness) -> None:
    value, metrics, grad = run(bk, rg.L1(), [-inf, 1.0, inf])
    assert value == inf
    assert metrics["l1_raw"] == inf
    assert grad.tolist() == [-1.0, 1.0, 1.0]
    value, metrics, _ = run(bk, rg.L2(), [-inf, 1.0])
    assert value == inf
    assert metrics["l2_max"] == inf


def test_clip_tames_infinities(bk: Harness) -> None:
    value, metrics, grad = run(bk, rg.L2(clip=(-100.0, 0.0)), [-inf, -1.0, inf])
    assert value == 10001.0
    assert metrics["l2_max"] == 10000.0
    assert grad.tolist() == [0.0, -2.0, 0.0]  # strictly outside the bounds: no gradient
    value, _, grad = run(bk, rg.L2(clip=(-100.0, 0.0), center="mean"), [-inf, -100.0, inf])
    assert math.isfinite(value)
    assert np.isfinite(grad).all()
    value, _, _ = run(bk, rg.L2(clip=(None, 0.0)), [-inf, -1.0])
    assert value == inf  # one-sided clip leaves the other infinity alone


# ---- a NaN among many elements ----------------------------------------------------------------
# XLA's CPU backend drops NaN from a max or min reduction over 4096 elements or more, and from
# a max or min fused into a reduction (a clip feeding a sum): the small inputs above cannot
# show it. Each case holds one NaN (at ``NAN_AT``) among 8192 elements; a row case's NaN row
# is otherwise all -inf (for GradientPenalty: all 0), where a max that drops the NaN would call
# the row empty, or zero.
ROWS, V = 64, 128
NAN_AT = (ROWS // 2, 5)


def _many(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "flat":
        x = -rng.gamma(0.6, 1.8, size=ROWS * V)
        x[:3] = [-130.0, -150.0, 0.5]  # beyond the clip bounds, so that clipping acts
        x[ROWS * V // 2 + 5] = nan
        return x
    x = rng.normal(0.0, 3.0, size=(ROWS, V))
    x[NAN_AT[0]] = 0.0 if kind == "zeros" else -inf
    x[NAN_AT] = nan
    if kind == "rows":
        x[1, 3] = nan  # and one among finite scores
    return x


_FLAT = [
    rg.L1(),
    rg.L1(target="probs"),
    rg.L2(),
    rg.L2(center="mean"),
    rg.L2(center=-2.0),
    rg.L2(clip=(-100.0, 0.0)),
    rg.L2(clip=(-100.0, 0.0), center="mean"),
    rg.L2(clip=(-100.0, 0.0), center=-2.0),
    rg.ElasticNet(),
    rg.Huber(),
    rg.SampledEntropy(),
    rg.SampledKL(rg.Field("other")),
    rg.SampledKL(rg.Field("other"), estimator="k1"),
    rg.Consistency(rg.Field("other")),
    rg.Consistency(rg.Field("other"), metric="l1"),
]
_ROWS = [
    rg.KL(rg.Field("other")),
    rg.KL(rg.Field("other"), direction="forward"),
    rg.JSD(rg.Field("other")),
    rg.Entropy(),
    rg.ZLoss(),
    rg.Consistency(rg.Field("other"), metric="cosine"),
    rg.Consistency(rg.Field("other"), metric="kl"),
]
MANY = (
    [(reg, "flat") for reg in _FLAT]
    + [(reg, "masked") for reg in _FLAT[2:8]]  # L2's masked form (the NaN token counted)
    + [(reg, "rows") for reg in _ROWS]
    + [(rg.GradientPenalty(), "zeros"), (rg.Orthogonality(), "matrix")]
)


@pytest.mark.parametrize(("reg", "kind"), MANY, ids=[f"{r!r}-{k}" for r, k in MANY])
def test_nan_propagates_among_many_elements(bk: Harness, reg: rg.Regularizer, kind: str) -> None:
    rng = np.random.default_rng(7)
    x = _many(rng, "flat" if kind in ("matrix", "masked") else kind)
    if kind == "matrix":
        x = x.reshape(ROWS * 2, V // 2)
    if kind in ("flat", "masked"):
        # the other view (logprobs, for SampledKL): -inf at the NaN element, so that a
        # max(x, y) which drops the NaN calls the element -inf in both, and empty
        other = np.where(np.isnan(x), -inf, np.minimum(np.nan_to_num(x) - 0.25, 0.0))
    else:  # -inf where x is (no support gap), finite at the NaN: the row still counts
        other = np.where(x == -inf, -inf, rng.normal(0.0, 3.0, size=x.shape))
    uses_other = "other" in repr(reg)
    constant_slope = getattr(reg, "estimator", None) == "k1"  # d(lp - ref)/d lp = 1, even at NaN
    arrays = [bk.asarray(x)] + ([bk.asarray(other)] if uses_other else [])
    if kind == "masked":  # uncounted tokens beyond the clip, so that they would show
        mask = np.ones(x.shape, dtype=bool)
        mask[:2] = False
        arrays.append(bk.asarray(mask))

    def call(method: Any, a: Any, *rest: Any) -> Any:
        kw = {"mask": rest[-1]} if kind == "masked" else {}
        fields = rest[:-1] if kind == "masked" else rest
        return method({"other": fields[0]} if fields else None, a, **kw)

    for label, fn in [
        ("compute", lambda *a: call(reg.compute, *a)),
        ("value_and_grad", lambda *a: call(reg.value_and_grad, *a)),
    ]:
        with np.errstate(all="ignore"):
            out = bk.call(fn, *arrays)
        value, metrics = bk.float(out[0]), rg.to_floats(out[1])
        assert math.isnan(value), (label, value)
        assert all(math.isnan(m) for m in metrics.values()), (label, metrics)
        if label == "value_and_grad" and not constant_slope:
            g = np.asarray(bk.to_numpy(out[2]), dtype=np.float64)
            assert np.isnan(g.reshape(x.shape)[np.isnan(x)]).all(), label


class Peak(rg.Regularizer):
    """The largest counted value, by the extension API's ``Batch.max``."""

    name: ClassVar[str] = "peak"

    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        m = batch.max(batch.values)
        return m, {"peak": m}


@pytest.mark.parametrize(
    ("specials", "want"),
    [
        ([nan], nan),
        ([inf, -inf], inf),  # their sum is NaN, their max is not
        ([nan, inf, -inf], nan),
        ([inf, nan], nan),
        ([-inf, nan], nan),
        ([], None),
    ],
)
def test_batch_max_among_many_elements(bk: Harness, specials: list[float], want: Any) -> None:
    x = np.random.default_rng(3).normal(size=ROWS * V)
    x[np.arange(len(specials)) * 997 + 11] = specials
    value, metrics = bk.call(lambda a: Peak().compute(None, a), bk.asarray(x))
    expected = np.max(x) if want is None else want
    np.testing.assert_equal(bk.float(value), expected)
    np.testing.assert_equal(rg.to_floats(metrics)["peak"], expected)
    if bk.backend.has_autodiff and want is None:  # the derivative of max: 1 at the argmax
        g = np.asarray(
            bk.to_numpy(bk.autodiff(lambda a: Peak().compute(None, a)[0], bk.asarray(x)))
        )
        assert g[np.argmax(x)] == 1.0
        assert np.count_nonzero(g) == 1


@pytest.mark.parametrize(
    ("mask", "want"),
    [
        (None, -inf),  # every token counts, and each p is -inf
        ([True, True, True, True], -inf),  # the same, said by a mask
        ([True, False, True, False], -inf),  # the counted ones are all -inf
        ([False, False, False, False], 0.0),  # none counts: 0
    ],
    ids=["no-mask", "all-counted", "some-counted", "none-counted"],
)
def test_a_max_over_counted_tokens_all_minus_inf_is_minus_inf(
    bk: Harness, mask: list[bool] | None, want: float
) -> None:
    """``*_max`` is the max over counted tokens, 0 only when none counts: where every counted
    p is -inf, it is -inf (a mask's -inf fill must not read as "none counted"). SampledKL k1's
    p = logprob - reference is -inf at a logprob of -inf; the uncounted tokens hold 5.0."""
    reg = rg.SampledKL(rg.Field("ref"), estimator="k1")
    x = np.full(4, -inf) if mask is None else np.where(mask, -inf, 5.0)
    data = {"ref": np.zeros(4)}
    kw = {} if mask is None else {"mask": bk.asarray(np.asarray(mask))}
    _, metrics = bk.call(lambda lp: reg.compute(data, lp, **kw), bk.asarray(x))
    assert rg.to_floats(metrics)["sampled_kl_max"] == want
    _, metrics, _ = bk.call(lambda lp: reg.value_and_grad(data, lp, **kw), bk.asarray(x))
    assert rg.to_floats(metrics)["sampled_kl_max"] == want
    if bk.library == "torch":  # the training path (one closed-form node)
        leaf = bk.asarray(x).requires_grad_(True)
        value, metrics = reg.compute(data, leaf, **kw)
        assert rg.to_floats(metrics)["sampled_kl_max"] == want
        assert value.requires_grad


@pytest.mark.parametrize("center", [None, "mean", -2.0])
@pytest.mark.parametrize(("specials", "nan_out"), [([inf, -inf], False), ([nan, inf, -inf], True)])
def test_clipped_l2_among_many_elements(
    bk: Harness, center: Any, specials: list[float], nan_out: bool
) -> None:
    """A clip tames ±inf but not NaN, also where both are present (a sum of NaN)."""
    x = np.random.default_rng(5).normal(size=ROWS * V)
    x[np.arange(len(specials)) * 997 + 11] = specials
    reg = rg.L2(clip=(-3.0, 3.0), center=center)
    value, metrics = bk.call(lambda a: reg.compute(None, a), bk.asarray(x))
    for got in [bk.float(value), *rg.to_floats(metrics).values()]:
        assert math.isnan(got) if nan_out else math.isfinite(got), (value, metrics)


# ---- a NaN beside a support gap ----------------------------------------------------------------
# Row 0 finite; row 1 a NaN in the scores and a class -inf there where the reference's is finite;
# row 2 a NaN in the reference and a class -inf there where the scores' is finite; row 3 a true
# support gap (the reference -inf where the scores are finite), row 4 the other way round.
_GAP_Z = [[0.0, 1.0, 2.0], [nan, -inf, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 2.0], [1.0, -inf, 0.0]]
_GAP_R = [[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [nan, -inf, 0.0], [0.0, -inf, 1.0], [0.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    "reg",
    [
        rg.KL(rg.Field("other")),
        rg.KL(rg.Field("other"), direction="forward"),
        rg.KL(rg.Field("other"), direction="symmetric"),
        rg.Consistency(rg.Field("other"), metric="kl"),
    ],
    ids=repr,
)
def test_nan_beside_a_support_gap_is_nan(bk: Harness, reg: rg.Regularizer) -> None:
    """A row holding a NaN is NaN, value and gradient, even where it also has a support gap
    (whose KL alone is +inf): NaN + inf is NaN, and NaN propagates. The true gaps stay +inf
    with gradient 0 in their direction; the closed form and autodiff agree."""
    z, r = np.asarray(_GAP_Z), np.asarray(_GAP_R)
    direction = getattr(reg, "direction", "symmetric")
    gap_row = {"reverse": 3, "forward": 4}.get(direction)  # (symmetric: both are +inf)

    def per_row(i: int) -> float:
        fn = lambda lp, ref: reg.compute({"other": ref}, lp)[0]  # noqa: E731
        with np.errstate(all="ignore"):
            return bk.float(bk.call(fn, bk.asarray(z[i : i + 1]), bk.asarray(r[i : i + 1])))

    rows = [per_row(i) for i in range(5)]
    assert math.isfinite(rows[0]), rows
    assert math.isnan(rows[1]), rows
    assert math.isnan(rows[2]), rows
    gaps = [3, 4] if gap_row is None else [gap_row]
    assert all(rows[i] == inf for i in gaps), rows
    with np.errstate(all="ignore"):
        value, metrics, grad = bk.call(
            lambda lp, ref: reg.value_and_grad({"other": ref}, lp), bk.asarray(z), bk.asarray(r)
        )
    assert math.isnan(bk.float(value))
    assert all(math.isnan(v) for v in rg.to_floats(metrics).values()), metrics
    grads = [np.asarray(bk.to_numpy(grad), dtype=np.float64)]
    if bk.backend.has_autodiff:
        ref = bk.asarray(r)
        for generic in (True, False):
            g = bk.autodiff(
                lambda lp: reg.compute({"other": ref}, lp)[0], bk.asarray(z), generic=generic
            )
            grads.append(np.asarray(bk.to_numpy(g), dtype=np.float64))
    for g in grads:
        assert np.isnan(g[1:3]).all(), g
        assert np.isfinite(g[[0, *[i for i in (3, 4) if i not in gaps]]]).all(), g
        if gap_row is not None:
            assert (g[gap_row] == 0).all(), g


@pytest.mark.parametrize(
    "reg",
    [
        rg.ZLoss(),
        rg.Entropy(),
        rg.KL(rg.Field("other")),
        rg.KL(rg.Field("other"), direction="forward"),
        rg.JSD(rg.Field("other")),
        rg.Consistency(rg.Field("other"), metric="kl"),
    ],
    ids=repr,
)
# inf - inf is the point (NumPy warns of it; Dask computes in threads np.errstate cannot reach)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_positive_infinity_among_scores_is_nan(bk: Harness, reg: rg.Regularizer) -> None:
    """A score of +inf has no softmax (inf / inf), nor a log-sum-exp by the shift every
    path takes (inf - inf): its row is NaN, value, metrics and gradient, on every backend
    and path (torch's own ``logsumexp`` gives +inf there, which ZLoss's kernel took)."""
    z = np.array([[0.0, inf, 1.0], [1.0, 2.0, 3.0]])
    r = np.array([[0.5, 0.0, 1.0], [0.0, 1.0, 2.0]])
    call = lambda lp, ref: reg.value_and_grad({"other": ref}, lp)  # noqa: E731
    with np.errstate(all="ignore"):
        value, metrics, grad = bk.call(call, bk.asarray(z), bk.asarray(r))
        plain = bk.call(
            lambda lp, ref: reg.compute({"other": ref}, lp), bk.asarray(z), bk.asarray(r)
        )
    values = [bk.float(value), bk.float(plain[0])]
    floats = [rg.to_floats(metrics), rg.to_floats(plain[1])]
    grads = [np.asarray(bk.to_numpy(grad), dtype=np.float64)]
    if bk.library == "torch":  # the route autograd takes: the closed form's node
        import torch

        leaf = torch.tensor(z, requires_grad=True)
        v, m = reg.compute({"other": torch.tensor(r)}, leaf)
        (g,) = torch.autograd.grad(v, leaf)
        values.append(float(v.detach()))
        floats.append(rg.to_floats(m))
        grads.append(g.numpy())
    assert all(math.isnan(v) for v in values), values
    for f in floats:
        assert all(math.isnan(x) for k, x in f.items()), f
    for g in grads:
        assert np.isnan(g[0]).all(), g
        assert np.isfinite(g[1]).all(), g


# ---- the reference on special rows --------------------------------------------------------------
# Row 0 finite; 1 a NaN among the scores; 2 a NaN in the reference; 3 a score of +inf; 4 a class
# -inf in the scores only; 5 a support gap (the reference -inf where the scores are finite).
_SPECIAL_Z = [
    [0.0, 1.0, 2.0],
    [nan, 0.0, 1.0],
    [0.5, 0.0, 0.5],
    [0.0, inf, 1.0],
    [1.0, -inf, 0.0],
    [0.0, 1.0, 2.0],
]
_SPECIAL_R = [
    [1.0, 0.0, 2.0],
    [0.0, 1.0, 2.0],
    [nan, 0.0, 1.0],
    [0.5, 0.0, 1.0],
    [0.0, 1.0, 2.0],
    [0.0, -inf, 1.0],
]


@pytest.mark.parametrize(
    "reg",
    [
        rg.KL(rg.Field("other")),
        rg.KL(rg.Field("other"), direction="forward"),
        rg.KL(rg.Field("other"), direction="symmetric"),
        rg.JSD(rg.Field("other")),
        rg.Entropy(),
        rg.Entropy(mode="maximize", normalize=True),
        rg.ZLoss(),
    ],
    ids=repr,
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_reference_agrees_on_special_rows(bk: Harness, reg: rg.Regularizer) -> None:
    """The suite's float64 reference (``reference.py``) is the oracle of the fuzz and property
    tests; on rows holding NaN, +inf or -inf it must say what the library does, row by row:
    NaN where a row holds a NaN (a NaN among the scores is not a class outside the support)."""
    from .reference import reference

    z, r = np.asarray(_SPECIAL_Z), np.asarray(_SPECIAL_R)
    for i in range(len(z)):
        data = {"other": r[i : i + 1]}
        want, _, want_g = reference(reg, z[i : i + 1], data=data)
        with np.errstate(all="ignore"):
            value, _, g = bk.call(
                lambda lp, ref: reg.value_and_grad({"other": ref}, lp),
                bk.asarray(z[i : i + 1]),
                bk.asarray(r[i : i + 1]),
            )
        got, got_g = bk.float(value), np.asarray(bk.to_numpy(g), dtype=np.float64).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=f"row {i} value")
        np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-12, err_msg=f"row {i} grad")
