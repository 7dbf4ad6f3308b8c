"""The Pipeline: one differentiable loss, flat metrics, gradient norms, validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

from . import strategies as S
from .reference import flat, reference

Harness = Any


def total(bk: Harness, lp: Any) -> Any:
    """Σx of an array or a list, in the backend's own namespace (a plain callable term)."""
    xp = bk.xp
    return sum(xp.sum(a) for a in lp) if isinstance(lp, list) else xp.sum(lp)


def squares(bk: Harness, lp: Any) -> Any:
    xp = bk.xp
    return sum(xp.sum(a * a) for a in lp) if isinstance(lp, list) else xp.sum(lp * lp)


@st.composite
def pipelines(draw: st.DrawFn) -> rg.Pipeline:
    regs = draw(st.lists(S.regularizers(probs=True), min_size=1, max_size=3))
    weights = draw(
        st.lists(
            st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0]), min_size=len(regs), max_size=len(regs)
        )
    )
    terms = [
        rg.Term(r, w, name=f"t{i}") for i, (r, w) in enumerate(zip(regs, weights, strict=True))
    ]
    return rg.Pipeline(terms, track_grad_norms=draw(st.booleans()), metrics="array")


# ---- the loss and its metrics --------------------------------------------------------------
@given(pipe=pipelines(), x=S.arrays(hi=5.0) | S.ragged(hi=5.0))
def test_loss_is_the_weighted_sum_with_flat_metrics(bk: Harness, pipe: rg.Pipeline, x: Any) -> None:
    loss, metrics = bk.call(lambda lp: pipe(None, lp), bk.asarray(x))
    want = 0.0
    keys = {"loss_total", "regularizer_total"}
    for t in pipe.terms:
        value, ref_metrics, grad = reference(t.regularizer, x)
        want += t.weight * value
        keys |= {f"{t.name}/{k}" for k in ("value", "weight", "contribution", *ref_metrics)}
        np.testing.assert_allclose(
            bk.float(metrics[f"{t.name}/value"]), value, rtol=1e-4, atol=1e-3
        )
        if pipe.track_grad_norms:
            keys |= {f"{t.name}/grad_norm", f"{t.name}/grad_norm_weighted"}
            np.testing.assert_allclose(
                bk.float(metrics[f"{t.name}/grad_norm"]), np.linalg.norm(grad), rtol=1e-4, atol=1e-3
            )
    if pipe.track_grad_norms:
        keys.add("total_grad_norm")
    assert set(metrics) == keys
    np.testing.assert_allclose(bk.float(loss), want, rtol=1e-4, atol=1e-3)
    assert bk.float(metrics["loss_total"]) == bk.float(loss)
    for k, v in metrics.items():
        if k.endswith("/weight") and not bk.jit:  # weights are the Python floats given
            assert type(v) is float, k
            assert v == next(t.weight for t in pipe.terms if k == f"{t.name}/weight")
        else:
            assert tuple(v.shape) == (), k


def test_metrics_float_are_python_floats(bk: Harness) -> None:
    pipe = rg.Pipeline([(rg.L1(), 1.0), (rg.L2(), 0.5)], base_loss=rg.L1(reduce="mean"))
    # Float metrics sync the host by definition (they compute a Dask graph, and cannot be
    # made under jax.jit: that is what metrics="array" is for), so no bk.call here.
    loss, metrics = pipe(None, bk.asarray(np.array([1.0, -2.0, 3.0])))
    assert all(type(v) is float for v in metrics.values())
    assert metrics["base_loss"] == 2.0
    assert metrics["base_loss/l1_raw"] == 6.0
    assert metrics["regularizer_total"] == 6.0 + 0.5 * 14.0
    assert metrics["loss_total"] == bk.float(loss) == 2.0 + 13.0


def test_a_plain_callable_may_return_metrics(bk: Harness) -> None:
    def base(data: Any, lp: Any) -> Any:
        s = total(bk, lp)
        return s, {"tokens": bk.xp.asarray(3.0)}

    pipe = rg.Pipeline([], base_loss=base)
    loss, metrics = pipe(None, bk.asarray(np.array([1.0, 2.0, 3.0])))
    assert bk.float(loss) == 6.0
    assert metrics == {
        "loss_total": 6.0,
        "regularizer_total": 0.0,
        "base_loss": 6.0,
        "base_loss/tokens": 3.0,
    }


# ---- gradients and their norms ---------------------------------------------------------------
@pytest.mark.backends("torch", "jax")
def test_grad_norms_match_hand_derived_values(bk: Harness) -> None:
    """x = [1, 2, 3]: ‖∇Σx‖ = √3, ‖∇Σx²‖ = √56, ‖∇(Σx + 0.5·Σx²)‖ = ‖1 + x‖ = √29."""
    pipe = rg.Pipeline(
        [
            rg.Term(lambda d, lp: total(bk, lp), 1.0, name="sum"),
            rg.Term(lambda d, lp: squares(bk, lp), 0.5, name="squares"),
        ],
        track_grad_norms=True,
        metrics="array",
    )
    _, m = bk.call(lambda lp: pipe(None, lp), bk.asarray(np.array([1.0, 2.0, 3.0])))
    assert bk.float(m["sum/grad_norm"]) == pytest.approx(math.sqrt(3))
    assert bk.float(m["squares/grad_norm"]) == pytest.approx(math.sqrt(56))
    assert bk.float(m["squares/grad_norm_weighted"]) == pytest.approx(0.5 * math.sqrt(56))
    assert bk.float(m["total_grad_norm"]) == pytest.approx(math.sqrt(29))


def test_grad_norms_of_the_builtins(bk: Harness) -> None:
    """Closed form on every backend: ‖∇L1‖ = √(nonzeros), ‖∇L2‖ = 2‖x‖ (x = [1, -2, 0, 3])."""
    x = np.array([1.0, -2.0, 0.0, 3.0])
    base = rg.L2(reduce="mean")
    pipe = rg.Pipeline(
        [(rg.L1(), 2.0), (rg.L2(), 0.25)], base_loss=base, track_grad_norms=True, metrics="array"
    )
    _, m = bk.call(lambda lp: pipe(None, lp), bk.asarray(x))
    assert bk.float(m["l1_sparsity/grad_norm"]) == pytest.approx(math.sqrt(3))
    assert bk.float(m["l2_weight_decay/grad_norm"]) == pytest.approx(2 * math.sqrt(14))
    assert bk.float(m["base_loss/grad_norm"]) == pytest.approx(2 * math.sqrt(14) / 4)
    want = 2.0 * np.sign(x) + 0.25 * 2 * x + 2 * x / 4
    assert bk.float(m["total_grad_norm"]) == pytest.approx(np.linalg.norm(want))


@pytest.mark.backends("numpy", "array_api_strict", "dask")
def test_grad_norm_without_closed_form_or_autodiff_names_the_term(bk: Harness) -> None:
    pipe = rg.Pipeline(
        [rg.Term(lambda d, lp: total(bk, lp), 1.0, name="my_sum")], track_grad_norms=True
    )
    with pytest.raises(TypeError, match="my_sum"):
        pipe(None, bk.asarray(np.array([1.0, 2.0])))


@pytest.mark.backends("torch", "jax")
@given(pipe=pipelines(), x=S.ragged(hi=5.0))
def test_autodiff_of_the_loss_reaches_every_datum(
    bk: Harness, pipe: rg.Pipeline, x: list[np.ndarray]
) -> None:
    got = bk.to_numpy(bk.autodiff(lambda lp: pipe(None, lp)[0], bk.asarray(x)))
    want = sum(t.weight * reference(t.regularizer, x)[2] for t in pipe.terms)
    np.testing.assert_allclose(flat(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.backends("torch")
def test_tracking_leaves_the_callers_backward_alone(bk: Harness) -> None:
    import torch

    terms = [
        (rg.L1(), 0.3),
        (rg.L2(center="mean"), 0.1),
        rg.Term(lambda d, lp: sum((a**3).sum() for a in lp), 0.01, name="cubes"),
    ]
    grads = {}
    for track in (False, True):
        xs = [
            torch.tensor([-1.0, 0.5, 2.0], requires_grad=True),
            torch.tensor([[3.0, -0.25]], requires_grad=True),
        ]
        loss, _ = rg.Pipeline(terms, track_grad_norms=track)(None, xs)
        assert all(x.grad is None for x in xs)  # tracking did not touch .grad
        loss.backward()
        grads[track] = [x.grad.clone() for x in xs]
    # (untracked, the two built-ins share one autograd node, which sums their gradients in
    # its own order: equal up to the rounding of that sum)
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


# ---- tracing -------------------------------------------------------------------------------------
@pytest.mark.backends("jax")
def test_jax_jit_of_a_pipeline(bk: Harness) -> None:
    import jax

    for track in (False, True):
        pipe = rg.Pipeline(
            [(rg.L1(mask=rg.Field("weights")), 1.0), (rg.L2(clip=(-100.0, 0.0)), 0.5)],
            track_grad_norms=track,
            metrics="array",
        )
        x = bk.asarray(np.array([-1.0, -300.0, 0.0, -2.0]))
        data = {"weights": bk.asarray(np.array([0.0, 1.0, 1.0, 1.0]))}
        loss, metrics = jax.jit(pipe)(data, x)
        eager_loss, eager_metrics = pipe(data, x)
        assert bk.float(loss) == pytest.approx(bk.float(eager_loss))
        assert rg.to_floats(metrics) == pytest.approx(rg.to_floats(eager_metrics))


@pytest.mark.backends("torch")
def test_torch_compile_fullgraph_of_a_pipeline(bk: Harness) -> None:
    import torch

    pipe = rg.Pipeline(
        [(rg.L1(), 1.0), (rg.L2(center="mean", clip=(-100.0, 0.0)), 0.5)], metrics="array"
    )
    x = torch.tensor([-1.0, -300.0, 0.0, -2.0])
    loss, metrics = torch.compile(pipe, fullgraph=True, backend="eager")(None, x)
    eager_loss, eager_metrics = pipe(None, x)
    assert loss.item() == pytest.approx(eager_loss.item())
    assert rg.to_floats(metrics) == pytest.approx(rg.to_floats(eager_metrics))


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: rg.Pipeline([(rg.L1(), float("nan"))]), ValueError, "weight.*l1_sparsity.*finite"),
        (lambda: rg.Pipeline([(rg.L1(), float("inf"))]), ValueError, "weight.*finite"),
        (lambda: rg.Pipeline([(rg.L1(), True)]), TypeError, "weight.*real number.*bool"),
        (lambda: rg.Pipeline([(rg.L1(), "0.1")]), TypeError, "weight.*str"),
        (lambda: rg.Pipeline([(rg.L1(), None)]), TypeError, "weight.*NoneType"),
        (lambda: rg.Term(rg.L1(), 1.0, name=""), TypeError, "name.*non-empty"),
        (lambda: rg.Term(rg.L1(), 1.0, name=3), TypeError, "name.*non-empty"),
        (
            lambda: rg.Pipeline([(rg.L1(), 1.0), (rg.L1(reduce="mean"), 1.0)]),
            ValueError,
            "'l1_sparsity'.*name=",
        ),
        (
            lambda: rg.Pipeline([rg.Term(rg.L1(), 1.0, name="total_grad_norm")]),
            ValueError,
            "reserved",
        ),
        (lambda: rg.Pipeline([(lambda d, lp: lp, 1.0)]), TypeError, "no name.*name="),
        (lambda: rg.Pipeline([(42, 1.0)]), TypeError, "regularizer.*int"),
        (lambda: rg.Pipeline([rg.L1()]), TypeError, r"terms\[0\].*Term"),
        (lambda: rg.Pipeline(rg.L1()), TypeError, "terms must be a list"),
        (lambda: rg.Pipeline([(rg.L1(), 1.0)], metrics="json"), ValueError, "metrics.*'float'"),
        (
            lambda: rg.Pipeline([(rg.L1(), 1.0)], track_grad_norms="yes"),
            TypeError,
            "track_grad_norms",
        ),
        (lambda: rg.Pipeline([(rg.L1(), 1.0)], base_loss=3), TypeError, "base_loss"),
    ],
)
def test_validation_at_construction(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_numpy_scalar_weights_are_accepted() -> None:
    pipe = rg.Pipeline([(rg.L1(), np.float32(0.5)), rg.Term(rg.L2(), np.int64(2), name="b")])
    assert [t.weight for t in pipe.terms] == [0.5, 2.0]
    assert all(type(t.weight) is float for t in pipe.terms)


def test_a_failing_term_is_named_and_chained(bk: Harness) -> None:
    def broken(data: Any, lp: Any) -> Any:
        raise KeyError("advantages")

    pipe = rg.Pipeline([(rg.L1(), 1.0), rg.Term(broken, 1.0, name="needs_advantages")])
    with pytest.raises(KeyError, match="needs_advantages") as info:
        pipe(None, bk.asarray(np.zeros(2)))
    assert isinstance(info.value.__cause__, KeyError)
    pipe = rg.Pipeline([rg.Term(rg.L1(target=rg.Field("adv")), 1.0, name="adv_l1")])
    with pytest.raises(ValueError, match=r"adv_l1.*'adv'") as info2:
        pipe(None, bk.asarray(np.zeros(2)))
    assert isinstance(info2.value.__cause__, ValueError)


def test_pipelines_are_immutable_and_equal_by_terms() -> None:
    a = rg.Pipeline([(rg.L1(), 0.1), (rg.L2(center="mean"), 1e-3)])
    b = rg.Pipeline([rg.Term(rg.L1(), 0.1), rg.Term(rg.L2(center="mean"), 0.001)])
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError, match="immutable"):
        a.metrics = "array"  # type: ignore[misc]
    assert "Term(L1(), 0.1, name='l1_sparsity')" in repr(a)


def test_grad_norm_does_not_overflow_when_the_norm_fits(bk: Harness) -> None:
    """∇ of L1 on probs is exp(x): at x = 47 its square overflows float32, its norm does not."""
    x = bk.asarray(np.array([47.0, 46.0, -1.0], dtype=np.float32))
    pipe = rg.Pipeline([(rg.L1(target="probs"), 1.0)], track_grad_norms=True, metrics="array")
    _, m = bk.call(lambda lp: pipe(None, lp), x)
    want = math.sqrt(math.exp(94.0) + math.exp(92.0) + math.exp(-2.0))
    assert bk.float(m["l1_sparsity/grad_norm"]) == pytest.approx(want, rel=1e-5)
    assert bk.float(m["total_grad_norm"]) == pytest.approx(want, rel=1e-5)


@given(pipe=pipelines(), x=S.arrays(hi=5.0) | S.ragged(hi=5.0))
def test_pipeline_value_and_grad_on_every_backend(bk: Harness, pipe: rg.Pipeline, x: Any) -> None:
    loss, _, grad = bk.call(lambda lp: pipe.value_and_grad(None, lp), bk.asarray(x))
    want = sum(t.weight * reference(t.regularizer, x)[2] for t in pipe.terms)
    got = bk.to_numpy(grad)
    assert isinstance(got, list) == isinstance(x, list)
    np.testing.assert_allclose(flat(got), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        bk.float(loss),
        sum(t.weight * reference(t.regularizer, x)[0] for t in pipe.terms),
        rtol=1e-4,
        atol=1e-3,
    )
