"""JAX through the built-ins' closed form (``_fastpath/jax_closed_form.py``).

On JAX arrays and tracers, L1, L2, Huber and ElasticNet evaluate through a ``jax.custom_jvp``
whose JVP is the closed form, with reductions formulated for XLA's CPU backend. Hypothesis
draws the options (every ``reduce``, clip bounds on the kinks, center, target), arrays and
ragged lists, dtypes (float16 and bfloat16 included), values on the kinks (0, the clip bounds)
and beyond (±inf, NaN), masks whose masked entries hold ±inf or NaN, and ``counts``; value,
metrics and ``jax.grad`` must equal the generic path's (``generic_path()``), eagerly and
under ``jax.jit``, and the custom_jvp must really be in the traced program. ZLoss, KL, JSD,
Entropy, GradientPenalty and Consistency, traced, take a closed form per token: their drawn
cases (-inf classes and rows, zero rows, masks hiding ±inf/NaN, counts, half precision)
equal the generic path with the mask and the reference as traced arguments, and so do their
one-pass totals on small inputs (at and above ``ONE_PASS``, under ``vmap`` and ``jax.jvp``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg
from regularizers.testing import generic_path

from . import strategies as S

Harness = Any
pytestmark = pytest.mark.backends("jax")

REDUCES = ["sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


@st.composite
def regularizers(draw: st.DrawFn) -> rg.Regularizer:
    how = draw(st.sampled_from(REDUCES))
    opts: dict[str, Any] = {"reduce": how, "target": draw(st.sampled_from(["logprobs", "probs"]))}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0, 512.0]))
    kind = draw(st.sampled_from(["l1", "l2", "l2", "huber", "elastic_net"]))
    if kind == "l1":
        return rg.L1(**opts)
    clip = draw(S.clips())
    if clip is not None and draw(st.integers(0, 2)) == 0:  # a bound on a kink's value
        clip = draw(st.sampled_from([(-100.0, 0.0), (-1.0, None), (None, -3.5), (0.0, 1.0)]))
    opts.update(clip=clip, center=draw(S.centers()))
    if kind == "huber":
        return rg.Huber(delta=draw(st.sampled_from([1.0, 2.5])), **opts)
    if kind == "elastic_net":
        return rg.ElasticNet(l1_ratio=draw(st.sampled_from([0.0, 0.5, 1.0])), **opts)
    return rg.L2(**opts)


def _listed(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _jax(x: Any, dtype: str) -> Any:
    import jax.numpy as jnp

    if isinstance(x, list):
        return [_jax(a, dtype) for a in x]
    return jnp.asarray(np.asarray(x, dtype=np.float64)).astype(dtype)


def _np(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _close(got: Any, want: Any, rtol: float, atol: float, what: str) -> None:
    for a, b in zip(_listed(got), _listed(want), strict=True):
        a, b = _np(a), _np(b)
        assert a.shape == b.shape, what
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _routed(fn: Any, *args: Any) -> bool:
    import jax

    # a fresh function: make_jaxpr caches traces by function, and the path is chosen at trace
    return "custom_jvp_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


@given(
    reg=regularizers(),
    case=S.training_batches(masks=("none", "array")),
    dtype=st.sampled_from(DTYPES),
)
def test_the_closed_form_route_equals_the_generic_path(
    bk: Harness, reg: rg.Regularizer, case: Any, dtype: str
) -> None:
    import jax

    x, _, mask, counts = case
    xs = _jax(x, dtype)
    kw: dict[str, Any] = {"counts": counts}
    if mask is not None:
        kw["mask"] = [bk.asarray(m) for m in mask] if isinstance(mask, list) else bk.asarray(mask)

    def compute(lp: Any) -> Any:
        return reg.compute(None, lp, **kw)

    def run() -> Any:
        # fresh functions: jax.jit caches traces by function, and the path is chosen at trace
        value, metrics = bk.call(lambda lp: compute(lp), xs)
        grad = jax.grad(lambda lp: compute(lp)[0])
        return value, metrics, (jax.jit(grad) if bk.jit else grad)(xs)

    with np.errstate(all="ignore"):
        # (a mask or counts read inside the trace are traced: arguments of the custom_jvp,
        # which cannot close over them)
        assert _routed(compute, xs), "the route"
        value, metrics, grads = run()
        with generic_path():
            assert not _routed(compute, xs)
            want_value, want_metrics, want_grads = run()
    rtol, atol = S.training_tolerance(x, dtype, reg, mask)
    _close(value, want_value, rtol, atol, "value")
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        _close(metrics[k], want_metrics[k], rtol, atol, k)
    grtol = {"float16": 1e-2, "bfloat16": 2e-2}.get(dtype, rtol)
    _close(grads, want_grads, grtol, atol, "gradient")
    for g, a in zip(_listed(grads), _listed(xs), strict=True):
        assert g.dtype == a.dtype
        assert g.shape == a.shape


@pytest.mark.parametrize(
    "reg",
    [rg.L1(), rg.L2(clip=(-100.0, 0.0)), rg.L2(center="mean", clip=(-1.0, 0.0)), rg.Huber()],
    ids=repr,
)
def test_gradients_at_the_kinks_follow_the_spec(bk: Harness, reg: rg.Regularizer) -> None:
    """sign(0) = 0 and clip bounds inclusive, exactly (JAX's own abs and clip differ)."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([0.0, -0.0, -100.0, 0.0, -1.0, 1.0, -150.0, 3.0])
    grad = jax.grad(lambda v: reg(v)[0])
    got = (jax.jit(grad) if bk.jit else grad)(x)
    if isinstance(reg, rg.L1):
        want = np.sign(np.asarray(x))
    elif isinstance(reg, rg.Huber):
        want = np.clip(np.asarray(x), -1.0, 1.0)
    elif reg.center == "mean":
        c = np.clip(np.asarray(x), -1.0, 0.0)
        inside = (np.asarray(x) >= -1.0) & (np.asarray(x) <= 0.0)
        d = 2 * (c - c.mean())
        want = np.where(inside, d - np.where(inside, d, 0).sum() / x.size, 0.0)
        # the mean's share flows back only where the clip passes the gradient
    else:
        c = np.clip(np.asarray(x), -100.0, 0.0)
        want = np.where((np.asarray(x) >= -100.0) & (np.asarray(x) <= 0.0), 2 * c, 0.0)
    with generic_path():
        generic = jax.grad(lambda v: reg(v)[0])(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(generic), rtol=1e-12, atol=1e-12)
    if not (isinstance(reg, rg.L2) and reg.center == "mean"):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_forward_mode_vmap_and_second_derivatives(bk: Harness) -> None:
    """jax.jvp and vmap work; second derivatives are JAX's derivative of the closed form,
    equal to the generic path's away from the kinks."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([-1.0, -0.25, -150.0, 0.5, -3.0])
    for reg in (rg.L2(center="mean", clip=(-100.0, 0.0)), rg.L1(), rg.Huber(), rg.L2()):

        def f(v: Any, reg: Any = reg) -> Any:
            return reg(v)[0]

        tangent = jnp.linspace(0.5, 1.5, 5)
        with generic_path():
            want = (jax.jvp(f, (x,), (tangent,)), jax.hessian(f)(x), jax.grad(f)(x))
            want_fwd2 = jax.jvp(jax.grad(f), (x,), (tangent,))[1]
        jvp, hess = jax.jvp(f, (x,), (tangent,)), jax.hessian(f)(x)
        if bk.jit:
            jvp = jax.jit(lambda v, t, f=f: jax.jvp(f, (v,), (t,)))(x, tangent)
            hess = jax.jit(jax.hessian(f))(x)
        np.testing.assert_allclose(jvp[0], want[0][0], rtol=1e-12)
        np.testing.assert_allclose(jvp[1], want[0][1], rtol=1e-12)
        np.testing.assert_allclose(hess, want[1], rtol=1e-12, atol=1e-12)
        fwd2 = jax.jvp(jax.grad(f), (x,), (tangent,))[1]
        np.testing.assert_allclose(fwd2, want_fwd2, rtol=1e-12, atol=1e-12)
        batched = jax.vmap(jax.grad(f))(jnp.stack([x, 2 * x]))
        np.testing.assert_allclose(batched[0], want[2], rtol=1e-12)
        with generic_path():
            np.testing.assert_allclose(batched[1], jax.grad(f)(2 * x), rtol=1e-12)


def test_vmap_with_a_batched_mask(bk: Harness) -> None:
    import jax
    import jax.numpy as jnp

    reg = rg.L2(center="mean", reduce="mean")
    x = jnp.asarray([[-1.0, 2.0, jnp.nan, 0.0], [3.0, -jnp.inf, 0.5, 1.0]])
    m = jnp.asarray([[True, True, False, True], [True, False, True, True]])

    def f(v: Any, k: Any) -> Any:
        return reg(v, mask=k)[0]

    got = jax.vmap(jax.value_and_grad(f))(x, m)
    with generic_path():
        want = jax.vmap(jax.value_and_grad(f))(x, m)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    assert np.isfinite(np.asarray(got[1])).all()


def test_metrics_are_constants_for_autodiff(bk: Harness) -> None:
    """As on the torch route: metrics are for logging, their derivatives are 0."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([-1.0, 2.0, 0.5])
    g = jax.grad(lambda v: rg.L2()(v)[1]["l2_raw"])(x)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_what_stays_on_the_generic_path(bk: Harness) -> None:
    """Subclasses, penalties reading other arrays and ``generic_path()``. Counts given as
    floating tracers being differentiated are arguments of the custom_jvp: their derivative
    is JAX's of the primal, as on the generic path."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([-1.0, 2.0, 0.0, -3.0])

    class Mine(rg.L1):
        pass

    assert not _routed(lambda v: Mine()(v)[0], x)
    assert not _routed(lambda v: rg.SampledKL(jnp.zeros(4))(v)[0], x)
    with generic_path():
        assert not _routed(lambda v: rg.L1()(v)[0], x)
    assert _routed(lambda v: rg.L1()(v)[0], x)

    def with_counts(v: Any, n: Any) -> Any:
        return rg.L2(reduce="mean").compute(None, v, counts={"tokens": n})[0]

    assert _routed(with_counts, x, jnp.asarray(8.0))
    got = jax.grad(with_counts, argnums=(0, 1))(x, jnp.asarray(8.0))
    with generic_path():
        want = jax.grad(with_counts, argnums=(0, 1))(x, jnp.asarray(8.0))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    for grad in (
        jax.jit(jax.grad(with_counts, argnums=(0, 1))),
        jax.grad(jax.jit(with_counts), argnums=(0, 1)),
    ):
        for a, b in zip(grad(x, jnp.asarray(8.0)), want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)
    assert _routed(with_counts, x, 8)  # a number, made an array inside the trace


def test_eager_concrete_inputs_skip_the_custom_jvp_and_agree(bk: Harness) -> None:
    import jax.numpy as jnp

    regs = (rg.L1(), rg.L2(), rg.L2(center="mean", clip=(-100.0, 0.0)), rg.L2(center=2.0))
    # 5003 is prime (flat reductions); 3 * 1024 and 40000 are read as rows (two stages)
    for n, reg in itertools.product((5003, 3 * 1024, 40000), regs):
        x = jnp.asarray(np.linspace(-150.0, 5.0, n))
        value, metrics = bk.call(lambda v, reg=reg: reg(v), x)
        with generic_path():
            want_value, want_metrics = bk.call(lambda v, reg=reg: reg(v), x)
        np.testing.assert_allclose(value, want_value, rtol=1e-12)
        for k in metrics:
            np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-12, err_msg=k)


def test_grad_of_jit_with_a_traced_mask_and_counts(bk: Harness) -> None:
    """A mask or counts passed into ``jit`` are tracers, which the closed form takes as
    arguments (closing over them, ``jax.grad(jax.jit(f))`` failed with "No constant
    handler"); the gradient is the generic path's."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([-0.1, -2.3, -0.7, 0.0, 1.5])
    w = jnp.asarray([0.0, 1.0, 1.0, 1.0, 1.0])
    for reg in (rg.L1(reduce="mean", mask=rg.Field("w")), rg.L2(clip=(-1.0, 0.0))):

        @jax.jit
        def loss(lp: Any, weights: Any, tokens: Any, reg: Any = reg) -> Any:
            return reg.compute({"w": weights}, lp, counts={"tokens": tokens})[0]

        got = jax.grad(loss)(x, w, 4.0)
        with generic_path():
            want = jax.grad(loss.__wrapped__)(x, w, 4.0)  # type: ignore[attr-defined]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize(
    "reg",
    [
        rg.KL(rg.Field("r")),
        rg.KL(rg.Field("r"), direction="forward", mask=rg.Field("m")),
        rg.JSD(rg.Field("r")),
        rg.Consistency(rg.Field("r"), metric="cosine"),
        rg.SampledEntropy(mask=rg.Field("m")),
    ],
    ids=repr,
)
def test_grad_of_jit_with_a_traced_reference_and_dropped_rows(bk: Harness, reg: Any) -> None:
    """``jax.grad(jax.jit(f))`` with the reference and the mask as ``jit`` arguments: the
    closed form takes the Batch's mask as an argument, never closes over it (which fails
    with "No constant handler"), and a row dropped for its reference's all -inf, whose
    scores hold +inf, gets a gradient of 0, not NaN; the same as ``jax.jit(jax.grad(f))``."""
    import jax
    import jax.numpy as jnp

    inf = np.inf
    z = jnp.asarray([[inf, 0.0, 1.0], [1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    r = jnp.asarray([[-inf, -inf, -inf], [0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    m = jnp.asarray([True, True, False])
    if reg.event_ndim == 0:  # (SampledEntropy: per element, the dropped ones masked)
        z, r, m = z[1:], r[1:], jnp.asarray([[True, False, True], [True, True, False]])

    def loss(a: Any, ref: Any, mask: Any) -> Any:
        return reg.compute({"r": ref, "m": mask}, a)[0]

    got = jax.grad(jax.jit(loss))(z, r, m)
    want = jax.jit(jax.grad(loss))(z, r, m)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
    assert np.isfinite(np.asarray(got)).all()
    if reg.event_ndim:
        assert (np.asarray(got)[0] == 0).all()


@pytest.mark.parametrize(
    "reg",
    [
        rg.SampledEntropy(reduce="mean", mask=rg.Field("m")),
        rg.SampledEntropy(mode="minimize", mask=rg.Field("m")),
        rg.L1(reduce="mean", mask=rg.Field("m")),
        rg.L2(clip=(-1.0, 0.0), reduce="mean", mask=rg.Field("m")),
        rg.Huber(reduce="mean", mask=rg.Field("m")),
    ],
    ids=repr,
)
def test_a_traced_mask_and_counts_keep_the_closed_form(bk: Harness, reg: Any) -> None:
    """A mask and ``counts`` given to ``jit`` as arguments, so traced, are arguments of the
    custom_jvp (it cannot close over them): ``jax.grad`` is still the closed form, NumPy's
    ``value_and_grad``. The generic path it took before gave SampledEntropy's gradient ±1
    at a logprob of ±inf or NaN (its ratio is a constant there), where the closed form
    ±(lp + 1) / N is ±inf or NaN."""
    import jax
    import jax.numpy as jnp

    inf, nan = np.inf, np.nan
    x = np.array([inf, -inf, nan, 0.0, -1.0, 0.5, -2.0, nan])
    m = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    with np.errstate(all="ignore"):
        want = reg.value_and_grad({"m": m}, x, counts={"tokens": 10.0})[2]

    def loss(a: Any, mask: Any, n: Any) -> Any:
        return reg.compute({"m": mask}, a, counts={"tokens": n})[0]

    args = (jnp.asarray(x), jnp.asarray(m), jnp.asarray(10.0))
    for how, grad in [
        ("grad(jit)", jax.grad(jax.jit(loss))),
        ("jit(grad)", jax.jit(jax.grad(loss))),
        ("grad", jax.grad(loss)),
    ]:
        got = np.asarray(grad(*args))
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=how)


# ---- penalties over rows: ZLoss, KL, JSD, Entropy, GradientPenalty ------------------------------
ROWS = [rg.ZLoss, rg.KL, rg.JSD, rg.Entropy, rg.GradientPenalty, rg.Consistency]


def _hide(x: Any, mask: Any, hidden: float) -> Any:
    """``x`` (NumPy) with every masked token's row set to ``hidden`` (±inf or NaN)."""
    if isinstance(x, list):
        return [_hide(a, m, hidden) for a, m in zip(x, mask, strict=True)]
    out = np.array(x, dtype=np.float64)
    out[~np.asarray(mask, dtype=bool)] = hidden
    return out


def _rows_run(bk: Harness, reg: Any, x: Any, data: Any, mask: Any, counts: Any) -> Any:
    import jax

    def compute(lp: Any, d: Any, m: Any) -> Any:
        kw = {} if m is None else {"mask": m}
        return reg.compute(d, lp, counts=counts, **kw)

    # fresh functions: jax.jit caches traces by function, and the path is chosen at trace;
    # the data and the mask are arguments, so traced under jit
    value, metrics = bk.call(lambda lp, d, m: compute(lp, d, m), x, data, mask)
    grad = jax.grad(lambda lp, d, m: compute(lp, d, m)[0])
    grads = (jax.jit(grad) if bk.jit else grad)(x, data, mask)
    return value, metrics, grads, _routed(compute, x, data, mask)


def _scaled_close(got: Any, want: Any, rtol: float, what: str) -> None:
    arrays = [_np(w) for w in _listed(want)]
    finite = [np.abs(a[np.isfinite(a)]) for a in arrays]
    scale = max([1.0] + [float(f.max()) for f in finite if f.size])
    _close(got, want, rtol, rtol * scale, what)


@pytest.mark.parametrize("cls", ROWS, ids=[c.__name__ for c in ROWS])
@given(data=st.data())
def test_the_per_row_closed_forms_equal_the_generic_path(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    """The drawn cases of the class (-inf classes and rows of all -inf, zero rows, ragged
    lists, stacked batches, every ``reduce``, masks), with masked tokens holding ±inf or
    NaN, ``counts``, and half precision: value, metrics and ``jax.grad`` equal the generic
    path's, with the mask and the reference as traced arguments under ``jit``."""
    case = data.draw(S.cases(cls), label="case")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    x, ref = case.x, case.data
    if case.mask is not None and data.draw(st.booleans(), label="hide"):
        x = _hide(x, case.mask, data.draw(st.sampled_from([np.inf, -np.inf, np.nan])))
    counts = data.draw(st.sampled_from([None, {"tokens": 7, "sequences": 3}]), label="counts")
    xs = _jax(x, dtype)
    d = None if ref is None else {k: _jax(v, dtype) for k, v in ref.items()}
    m = None if case.mask is None else _jax(case.mask, "bool")
    with np.errstate(all="ignore"):
        value, metrics, grads, routed = _rows_run(bk, case.reg, xs, d, m, counts)
        assert routed, "the route"
        with generic_path():
            want_value, want_metrics, want_grads, generic = _rows_run(
                bk, case.reg, xs, d, m, counts
            )
            assert not generic
    rtol = {"float64": 1e-9, "float32": 1e-4}.get(dtype, 1e-2)
    _scaled_close(value, want_value, rtol, "value")
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        _scaled_close(metrics[k], want_metrics[k], rtol, k)
    _scaled_close(grads, want_grads, rtol * 10, "gradient")
    for g, a in zip(_listed(grads), _listed(xs), strict=True):
        assert g.dtype == a.dtype
        assert g.shape == a.shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_penalty_rows_beyond_the_plain_sum_of_squares(bk: Harness, dtype: str) -> None:
    """Rows whose Σ g² overflows or underflows, zero rows, ±inf and NaN take the scaled
    norm (``row_norms``), with its conventions: the generic path's value and metrics, and
    the gradient of its closed form (``value_and_grad``; JAX's derivative of the generic
    maths is NaN where ``p`` itself overflows, the closed form is not)."""
    import jax
    import jax.numpy as jnp

    big = 1e30 if dtype == "float32" else 1e300
    tiny = 1e-30 if dtype == "float32" else 1e-300
    rows = [
        [[3.0, 4.0], [1.0, -2.0]],
        [[big, big], [1.0, 2.0]],
        [[big, 0.0], [1.0, 2.0]],
        [[tiny, -tiny], [1.0, 2.0]],
        [[0.0, 0.0], [1.0, 2.0]],
        [[np.inf, 1.0], [1.0, 2.0]],
        [[np.nan, 1.0], [1.0, 2.0]],
    ]
    for reg, r in itertools.product(
        (rg.GradientPenalty(), rg.GradientPenalty(target_norm=0.0, reduce="mean")), rows
    ):
        x = jnp.asarray(r, dtype=dtype)
        vg = jax.value_and_grad(lambda v, reg=reg: reg(v)[0])
        with np.errstate(all="ignore"):
            value, metrics = bk.call(lambda v, reg=reg: reg(v), x)
            _, grad = (jax.jit(vg) if bk.jit else vg)(x)
            with generic_path():
                want_value, want_metrics, want_grad = reg.value_and_grad(None, x)
        rtol = 1e-6 if dtype == "float32" else 1e-13
        np.testing.assert_allclose(_np(value), _np(want_value), rtol=rtol, err_msg=str(r))
        for k in metrics:
            np.testing.assert_allclose(_np(metrics[k]), _np(want_metrics[k]), rtol=rtol, err_msg=k)
        np.testing.assert_allclose(_np(grad), _np(want_grad), rtol=rtol, atol=0, err_msg=str(r))


@pytest.mark.parametrize(
    ("dtype", "row"),
    [
        # one square normal, the others below the smallest normal: flushed to 0 where XLA
        # flushes subnormals (its CPU backend), so Σ g² loses half its mass or more
        ("float32", [1e-18] + [9e-20] * 100),
        ("float64", [1e-153] + [1.4e-154] * 100),
        # every square subnormal: 0 where they are flushed (the scaled norm then), rounded to
        # a bit or two where they are kept
        ("float32", [3e-23] * 4),
        ("float64", [2.5e-162] * 4),
    ],
    ids=["flushed-f32", "flushed-f64", "subnormal-f32", "subnormal-f64"],
)
def test_gradient_penalty_rows_whose_squares_underflow(
    bk: Harness, dtype: str, row: list[float]
) -> None:
    """A row whose Σ g² is nonzero but below ``tiny / eps²`` (terms lost to underflow, or
    rounded to a few bits) takes the scaled norm too: ``sqrt(Σ g²)`` is not its norm there.
    Value, metrics and gradient equal ``value_and_grad``'s (the gradient ``2 (‖g‖ - c) g /
    ‖g‖`` is off by the norm's error for c = 1, the value ``‖g‖²`` for c = 0)."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([row], dtype=dtype)
    for reg in (rg.GradientPenalty(), rg.GradientPenalty(target_norm=0.0, reduce="mean")):
        vg = jax.value_and_grad(lambda v, reg=reg: reg(v)[0])
        value, metrics = bk.call(lambda v, reg=reg: reg(v), x)
        _, grad = (jax.jit(vg) if bk.jit else vg)(x)
        want_value, want_metrics, want_grad = reg.value_and_grad(None, np.asarray(x))
        rtol = 1e-6 if dtype == "float32" else 1e-13
        tiny = float(np.finfo(dtype).tiny)  # a value ‖g‖² below it may be flushed to 0
        np.testing.assert_allclose(_np(value), _np(want_value), rtol=rtol, atol=tiny)
        for k in metrics:
            np.testing.assert_allclose(
                _np(metrics[k]), _np(want_metrics[k]), rtol=rtol, atol=tiny, err_msg=k
            )
        np.testing.assert_allclose(_np(grad), _np(want_grad), rtol=rtol, atol=0)


@pytest.mark.parametrize("hidden", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_norm_mean_derivative_on_a_row_holding_inf_or_nan(
    bk: Harness, dtype: str, hidden: float
) -> None:
    """``grad_norm_mean`` differentiated (the generic Batch code over the norms' tangent):
    ``unit / N``, and the unit of a row holding ±inf or NaN is NaN in every entry (the
    convention of ``row_norms``), not 0 at its finite ones."""
    import jax
    import jax.numpy as jnp

    rows = np.asarray([[hidden, 1.0, 0.0], [1.0, 2.0, -2.0], [0.5, -3.0, 1.5]])
    finite = np.isfinite(rows).all(axis=-1, keepdims=True)
    safe = np.where(finite, rows, 1.0)
    unit = np.where(finite, safe / np.linalg.norm(safe, axis=-1, keepdims=True), np.nan)
    g = jax.grad(lambda v: rg.GradientPenalty()(v)[1]["grad_norm_mean"])
    with np.errstate(all="ignore"):
        got = (jax.jit(g) if bk.jit else g)(jnp.asarray(rows, dtype=dtype))
    rtol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(_np(got), unit / len(rows), rtol=rtol, atol=0, equal_nan=True)


HOWS = ("reverse", "forward", "symmetric")


def test_a_differentiated_reference_gets_the_generic_derivative(bk: Harness) -> None:
    """KL's and JSD's reference is an argument of the custom_jvp: differentiated (rare), its
    derivative is JAX's derivative of the same maths, as on the generic path."""
    import jax
    import jax.numpy as jnp

    z = jnp.asarray([[0.5, -1.0, 2.0], [1.0, -jnp.inf, 0.0]])
    r = jnp.asarray([[0.0, 0.25, 1.0], [-1.0, -jnp.inf, 3.0]])
    regs = [lambda b, how=how: rg.KL(b, direction=how, temperature=1.5) for how in HOWS]
    regs.append(lambda b: rg.JSD(b, beta=0.3, temperature=1.5))
    for make in regs:

        def f(a: Any, b: Any, make: Any = make) -> Any:
            return make(b)(a)[0]

        g = jax.grad(f, argnums=(0, 1))
        got = (jax.jit(g) if bk.jit else g)(z, r)
        with generic_path():
            want = jax.grad(f, argnums=(0, 1))(z, r)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("reg", "values", "dtype"),
    [
        (rg.L2(center="mean"), [-10.0, -2.0, 0.0, 1.0], "float64"),  # l2_max from the low
        (rg.L2(center=-5.0), [-6.0, 3.0], "float64"),  # from the high one
        (rg.L2(center=-50.0, clip=(-60.0, 20.0)), [-55.0, 10.0, -59.0], "float64"),  # clipped
        # a mean that overflows to -inf: Σ(c - mu)² is inf, though -inf - mu is NaN
        (rg.L2(center="mean", clip=(-1.7e308, 0.0)), [-1e308, -1e308, -np.inf], "float64"),
        # a bound beyond the dtype's finite range, clamped to it as the generic path does: the
        # -inf it keeps then gives inf, not NaN
        (rg.L2(center="mean", clip=(-1e39, 0.0)), [-1.0, -2.0, -np.inf, 3.0], "float32"),
        (rg.L2(center="mean", clip=(-1e39, 0.0)), [-1.0, -2.0, -np.inf, 3.0], "float16"),
    ],
    ids=["mean-low", "center-high", "clip-high", "overflowing-mean", "bound-f32", "bound-f16"],
)
def test_unmasked_l2_peak_and_a_mean_that_overflows(
    bk: Harness, reg: rg.Regularizer, values: list[float], dtype: str
) -> None:
    """The unmasked L2 forms take ``l2_max`` from whichever extreme of the input is farther
    from the center, clamp a bound to the dtype's range and fix up a mean that is not
    finite, as the generic path does."""
    import jax.numpy as jnp

    x = jnp.asarray(values, dtype=dtype)
    rtol = 1e-12 if dtype == "float64" else 1e-3
    with np.errstate(all="ignore"):
        value, metrics = bk.call(lambda v: reg(v), x)
        with generic_path():
            want_value, want_metrics = bk.call(lambda v: reg(v), x)
    np.testing.assert_allclose(_np(value), _np(want_value), rtol=rtol)
    for k in metrics:
        np.testing.assert_allclose(_np(metrics[k]), _np(want_metrics[k]), rtol=rtol, err_msg=k)


def test_metric_derivatives_and_a_reference_differentiated_alone(bk: Harness) -> None:
    """On the per-row route the metrics are the generic Batch code, which JAX differentiates
    (ZLoss's ``log_z_mean`` through ``log Z``'s tangent), and KL or JSD differentiated in
    their reference alone (the scores' tangent a symbolic zero) get the generic derivative."""
    import jax
    import jax.numpy as jnp

    z = jnp.asarray([[0.5, -1.0, 2.0], [1.0, -3.0, 0.0]])
    r = jnp.asarray([[0.0, 0.25, 1.0], [-1.0, 2.0, 3.0]])

    def log_z_mean(v: Any) -> Any:
        return rg.ZLoss()(v)[1]["log_z_mean"]

    def kl(b: Any, a: Any) -> Any:
        return rg.KL(b, direction="symmetric")(a)[0]

    def jsd(b: Any, a: Any) -> Any:
        return rg.JSD(b, beta=0.3)(a)[0]

    for f, args in ((log_z_mean, (z,)), (kl, (r, z)), (jsd, (r, z))):
        g = jax.grad(f)  # in the first argument only
        got = (jax.jit(g) if bk.jit else g)(*args)
        with generic_path():
            want = g(*args)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "reg",
    [rg.L2(center="mean"), rg.L2(clip=(-1.0, -0.5)), rg.L2(center="mean", clip=(-1.5, -0.5))],
    ids=repr,
)
def test_masked_l2_with_a_center_or_a_clip_excluding_0(bk: Harness, reg: rg.Regularizer) -> None:
    """With a mask (concrete: eagerly and under ``jax.grad`` the closed form's masked
    branch), uncounted tokens count neither through the mean nor through a clip whose
    interval excludes the 0 they hold."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray([-1.0, -2.0, 5.0, -0.75])
    m = jnp.asarray([True, True, False, True])
    vg = jax.value_and_grad(lambda v: reg(v, mask=m)[0])
    with np.errstate(all="ignore"):
        value, metrics = bk.call(lambda v: reg(v, mask=m), x)
        got = vg(x)
        with generic_path():
            want_value, want_metrics = bk.call(lambda v: reg(v, mask=m), x)
            want = vg(x)
    np.testing.assert_allclose(_np(value), _np(want_value), rtol=1e-12)
    for k in metrics:
        np.testing.assert_allclose(_np(metrics[k]), _np(want_metrics[k]), rtol=1e-12, err_msg=k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-12, atol=1e-12)


def _one_pass_case(size: int, dtype: str) -> tuple[Any, Any, Any]:
    """Consistency's input, paired array and mask of ``size`` tokens: ties at the largest
    ``(x - y)²``, a pair of -inf (dropped), ±inf, NaN and a large value under the mask in
    either array (the input's masked tokens hold 0 once prepared, the paired array's keep
    what they held)."""
    rng = np.random.default_rng(size)
    y = rng.normal(size=size)
    x = y + rng.normal(size=size)
    x[3], x[size - 2] = y[3] + 5.0, y[size - 2] - 5.0  # two tokens tie at the max
    x[5] = y[5] = -np.inf
    m = rng.random(size) > 0.2
    m[[3, 5, size - 2]] = True
    hidden = np.flatnonzero(~m)[:8]
    x[hidden[:4]] = [np.inf, -np.inf, np.nan, 100.0]
    y[hidden[4:]] = [np.inf, -np.inf, np.nan, 100.0]
    return _jax(x, dtype), _jax(y, dtype), _jax(m, "bool")


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("offset", [0, 1], ids=["at ONE_PASS", "above"])
def test_one_pass_totals_on_either_side_of_its_size(bk: Harness, offset: int, reduce: str) -> None:
    """Traced, up to ``ONE_PASS`` tokens the sum, max, count and NaN check of a per-token
    penalty are one variadic reduce (a ``reduce`` in the program), above it the Batch's own
    reductions: both equal the generic path, in the value, every metric and the derivative
    of each (the max's shared among its ties), with the mask and the paired array traced;
    a counted NaN makes the max NaN; a mask that counts nothing gives 0s."""
    import jax

    from regularizers._fastpath.jax_closed_form import ONE_PASS

    size = ONE_PASS + offset
    reg = rg.Consistency(rg.Field("y"), reduce=reduce, mask=rg.Field("m"))
    x, y, m = _one_pass_case(size, "float64")
    names = ["value", "consistency_raw", "consistency_mean", "consistency_max"]

    def output(k: int) -> Any:
        def f(a: Any, b: Any, c: Any) -> Any:
            value, metrics = reg.compute({"y": b, "m": c}, a)
            return [value, *(metrics[n] for n in names[1:])][k]

        return f

    jaxpr = str(jax.make_jaxpr(output(0))(x, y, m))
    assert (" reduce[" in jaxpr) == (offset == 0), "one pass"

    def run(a: Any, b: Any, c: Any) -> list[Any]:
        out = []
        for k in range(len(names)):
            f = output(k)
            out.append((jax.jit(f)(a, b, c), jax.jit(jax.grad(f))(a, b, c)))
        return out

    with np.errstate(all="ignore"):
        got = run(x, y, m)
        with generic_path():
            want = run(x, y, m)
    for name, (v, g), (wv, wg) in zip(names, got, want, strict=True):
        np.testing.assert_allclose(_np(v), _np(wv), rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(_np(g), _np(wg), rtol=1e-12, atol=1e-15, err_msg=name)
    top_grad = _np(got[3][1])
    assert np.count_nonzero(top_grad) == 2, "the max's derivative is shared by its two ties"

    with np.errstate(all="ignore"):
        nan_x = x.at[7].set(np.nan)
        _, metrics = jax.jit(lambda a, b, c: reg.compute({"y": b, "m": c}, a))(nan_x, y, m)
        assert np.isnan(_np(metrics["consistency_max"]))
        none = jax.numpy.zeros_like(m)
        value, metrics = jax.jit(lambda a, b, c: reg.compute({"y": b, "m": c}, a))(x, y, none)
    assert _np(value) == 0.0
    assert all(_np(v) == 0.0 for v in metrics.values())


def test_a_traced_list_is_joined_behind_a_barrier(bk: Harness) -> None:
    """A list's concatenation, traced, is behind ``optimization_barrier`` (XLA would
    otherwise reduce each joined array apart: one runtime step each), and derivatives,
    ``vmap`` and ``jit`` go through it: the values and gradients of eager NumPy."""
    import jax
    import jax.numpy as jnp

    pipe = rg.Pipeline(
        [(rg.L1(mask=rg.Field("m")), 0.5), (rg.L2(center="mean"), 2.0)], metrics="array"
    )
    xs = [np.asarray([-1.0, 2.0, 0.5]), np.asarray([3.0, -0.25])]
    ms = [np.asarray([True, False, True]), np.asarray([True, True])]

    def loss(a: Any, m: Any) -> Any:
        return pipe({"m": m}, a)[0]

    args = ([jnp.asarray(x) for x in xs], [jnp.asarray(m) for m in ms])
    assert "optimization_barrier" in str(jax.make_jaxpr(loss)(*args))
    assert "optimization_barrier" not in str(jax.make_jaxpr(lambda a: rg.L1()(a)[0])(args[0][0]))
    want_value, _, want_grads = pipe.value_and_grad({"m": ms}, xs)
    value, grads = jax.jit(jax.value_and_grad(loss))(*args)
    np.testing.assert_allclose(_np(value), _np(want_value), rtol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(_np(g), _np(w), rtol=1e-12)
    stacked = [jnp.stack([a, 2.0 * a]) for a in args[0]]
    batched = jax.vmap(lambda a: loss(a, args[1]))(stacked)
    doubled = pipe.value_and_grad({"m": ms}, [2.0 * x for x in xs])[0]
    np.testing.assert_allclose(_np(batched), [_np(want_value), _np(doubled)], rtol=1e-12)


@pytest.mark.parametrize(
    "reg",
    [
        rg.Consistency(rg.Field("y"), reduce="mean", mask=rg.Field("m")),
        rg.Consistency(rg.Field("y"), metric="l1", mask=rg.Field("m")),
        rg.ZLoss(mask=rg.Field("m")),
        rg.Entropy(reduce="mean", mask=rg.Field("m")),
        rg.GradientPenalty(mask=rg.Field("m")),
    ],
    ids=repr,
)
def test_the_one_pass_under_vmap_and_forward_mode(bk: Harness, reg: rg.Regularizer) -> None:
    """The one-pass totals (a variadic reduce inside a custom_jvp) batched by ``vmap`` with a
    batched mask, and ``jax.jvp`` of the max metric: the generic path's numbers."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    shape = (3, 8) if reg.event_ndim == 0 else (3, 4, 5)
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.normal(size=shape))
    m = jnp.asarray(rng.random(shape[:2]) > 0.3)
    name = f"{reg.name}_max"

    def f(a: Any, b: Any, c: Any) -> Any:
        return reg.compute({"y": b, "m": c}, a)

    def run() -> Any:
        vg = jax.vmap(jax.value_and_grad(lambda a, b, c: f(a, b, c)[0]))(x, y, m)
        metrics = jax.vmap(lambda a, b, c: f(a, b, c)[1])(x, y, m)
        tangent = jnp.ones_like(x[0])
        fwd = jax.jvp(lambda a: f(a, y[0], m[0])[1][name], (x[0],), (tangent,))
        return vg, metrics, fwd

    assert " reduce[" in str(jax.make_jaxpr(lambda a: f(a, y[0], m[0])[0])(x[0])), "one pass"
    got = run()
    with generic_path():
        want = run()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-10, atol=1e-14)
