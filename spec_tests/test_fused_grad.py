"""torch's training path equals the generic path (issue 12: training-path speed).

``compute`` on torch tensors that require grad runs through one ``ClosedForm`` autograd node
(``_fastpath/torch_autograd.py``) whose backward is the closed form: by kernels
(``torch_fused.GRAD``: L1, L2, Huber, ElasticNet, SampledKL, SampledEntropy, Consistency,
GradientPenalty, Orthogonality, and the penalties over a class axis, Entropy, KL, JSD and
ZLoss, in ``torch_distributions``) where the options allow, else by the penalty's
``evaluate_with_grad``; a
Pipeline's built-in terms over one input share one node. Hypothesis draws the options (every
``reduce``, clip, center, target), masks (arrays, lists, Fields), ``counts``, ragged lists,
dtypes (float16 and bfloat16 included) and values on the kinks (0, the clip bounds, Huber's
δ) and beyond (±inf, NaN). Value, metrics and gradients must equal the generic path's
(:func:`regularizers.testing.generic_path`), NaN where it is NaN, and the route (and, where
one applies, the kernel) must really have run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg
from regularizers.testing import generic_path

from . import strategies as S
from .conftest import TORCH_DEVICE
from .test_properties import CLASSES, convert, kwargs

Harness = Any
pytestmark = pytest.mark.backends("torch")
CLOSED = [c for c in CLASSES if c.evaluate_with_grad is not rg.Regularizer.evaluate_with_grad]
REDUCES = ["sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KINKS = S.TRAINING_KINKS
ROUTED = "ClosedFormBackward"


@st.composite
def elementwise(draw: st.DrawFn) -> rg.Regularizer:
    """The elementwise built-ins with a fused kernel, over the options it covers (Huber's and
    ElasticNet's center and clip are the generic kernel's, drawn by the test below)."""
    how = draw(st.sampled_from(REDUCES))
    opts: dict[str, Any] = {"reduce": how, "target": draw(st.sampled_from(["logprobs", "probs"]))}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0, 512.0]))
    kind = draw(st.sampled_from(["L1", "L2", "Huber", "ElasticNet", "SampledEntropy"]))
    if kind == "L1":
        return rg.L1(**opts)
    if kind == "Huber":
        return rg.Huber(delta=draw(st.sampled_from([1.0, 0.5, 3.5, 100.0])), **opts)
    if kind == "ElasticNet":
        return rg.ElasticNet(l1_ratio=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), **opts)
    if kind == "SampledEntropy":
        return rg.SampledEntropy(mode=draw(st.sampled_from(["maximize", "minimize"])), **opts)
    clip = draw(S.clips())
    if clip is not None and draw(st.integers(0, 3)) == 0:  # a bound on a kink's value
        clip = draw(st.sampled_from([(-100.0, 0.0), (-1.0, None), (None, -3.5), (0.5, 1.0)]))
    return rg.L2(clip=clip, center=draw(S.centers()), **opts)


def _listed(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _cast(x: Any, dtype: str) -> Any:
    import torch

    if isinstance(x, list):
        return [_cast(a, dtype) for a in x]
    x = x.astype("float32" if dtype == "bfloat16" else dtype)
    return torch.asarray(x, device=TORCH_DEVICE).to(getattr(torch, dtype))


def _mask_args(kind: str, mask: Any) -> tuple[Any, Any]:
    """``(data, mask=)`` for a mask given as an array/list or as a Field."""
    import torch

    if kind == "none":
        return None, None
    m = [torch.asarray(a, device=TORCH_DEVICE) for a in _listed(mask)]
    m = m if isinstance(mask, list) else m[0]
    return ({"w": m}, rg.Field("w")) if kind == "field" else (None, m)


def _close(got: Any, want: Any, rtol: float, atol: float, what: str) -> None:
    for a, b in zip(_listed(got), _listed(want), strict=True):
        a = a.detach().double().cpu().numpy()
        b = b.detach().double().cpu().numpy()
        assert a.shape == b.shape, what
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _autograd(reg: Any, data: Any, x: Any, mask: Any, counts: Any) -> Any:
    """Value, metrics and gradients by torch autograd through ``compute`` (which writes to
    none of the leaves)."""
    import torch

    leaves = [a.detach().clone().requires_grad_(True) for a in _listed(x)]
    lp = leaves if isinstance(x, list) else leaves[0]
    value, metrics = reg.compute(data, lp, counts=counts, **kwargs(mask))
    for leaf, a in zip(leaves, _listed(x), strict=True):
        torch.testing.assert_close(leaf.detach(), a, rtol=0.0, atol=0.0, equal_nan=True)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads, strict=True)]
    return value, metrics, grads


def _assert_same(got: Any, want: Any) -> None:
    """Two results of :func:`_autograd` (value, metrics, gradients): equal, NaN where NaN,
    with the same metrics."""
    import torch

    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert got[1].keys() == want[1].keys()
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k], equal_nan=True)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@contextlib.contextmanager
def _spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the fused kernels whose forward and backward ran."""
    from regularizers._fastpath import torch_fused  # (imports torch: only where it runs)

    ran: list[str] = []
    for name, kernel in list(torch_fused.GRAD.items()):

        class Spy(kernel):  # type: ignore[misc,valid-type]
            @staticmethod
            def forward(reg: Any, batch: Any, _k: Any = kernel, _n: str = name) -> Any:
                got = _k.forward(reg, batch)
                if got is not None:
                    ran.append(f"{_n}.forward")
                return got

            @staticmethod
            def grad(reg: Any, batch: Any, state: Any, scale: Any, _k: Any = kernel) -> Any:
                ran.append("grad")
                return _k.grad(reg, batch, state, scale)

        monkeypatch.setitem(torch_fused.GRAD, name, Spy)
    yield ran


def _routed_and_generic(
    mp: pytest.MonkeyPatch, reg: Any, args: tuple[Any, ...], kernel: bool
) -> tuple[Any, Any]:
    """``_autograd(reg, *args)`` through the route (``kernel``: its fused kernel ran, both
    ways) and through the generic path, with what must hold of both besides the numbers;
    and ``value_and_grad`` of tensors that need no gradient, by the same kernel run forward
    then backward at once: the route's numbers to the bit."""
    import torch

    with _spy(mp) as ran:
        got = _autograd(reg, *args)
    assert got[0].grad_fn.name() == ROUTED, "the route was not taken"
    if kernel:
        assert ran[:1] == [f"{reg.name}.forward"], ran
        assert ran[-1] == "grad", ran
    data, x, mask, counts = args
    with _spy(mp) as ran:
        value, metrics, grads = reg.value_and_grad(data, x, counts=counts, **kwargs(mask))
    if kernel:
        assert ran == [f"{reg.name}.forward", "grad"], ran
    exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
    torch.testing.assert_close(value, got[0].detach(), **exact)
    assert metrics.keys() == got[1].keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], got[1][k], **exact)
    for a, b in zip(_listed(grads), got[2], strict=True):
        torch.testing.assert_close(a, b, **exact)
    with generic_path():
        want = _autograd(reg, *args)
    assert want[0].grad_fn.name() != ROUTED
    assert got[0].dtype == want[0].dtype
    assert got[1].keys() == want[1].keys()
    assert all(not v.requires_grad for v in got[1].values())
    assert [g.dtype for g in got[2]] == [g.dtype for g in want[2]]
    return got, want


@given(reg=elementwise(), case=S.training_batches(), data=st.data())
def test_fused_elementwise_kernels_equal_the_generic_path(
    bk: Harness, reg: rg.Regularizer, case: Any, data: st.DataObject
) -> None:
    from regularizers._fastpath import torch_fused

    x, kind, mask, counts = case
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]), label="dt")
    xs = _cast(x, dtype)
    d, m = _mask_args(kind, mask)
    # ``SMALL`` lowered: the kernels' forms for large inputs (the mask by a checked product,
    # L2's peak by ``aminmax``) at the sizes drawn here
    large = data.draw(st.booleans(), label="large")
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        if large:
            mp.setattr(torch_fused, "SMALL", 2)
        # (one aggregation weight: the fused kernel)
        kernel = reg.reduce != "seq-mean-token-mean"
        got, want = _routed_and_generic(mp, reg, (d, xs, m, counts), kernel)
    (value, metrics, grads), (want_value, want_metrics, want_grads) = got, want
    rtol, atol = S.training_tolerance(x, dtype, reg)
    grtol = {"float16": 1e-2, "bfloat16": 1e-1}.get(dtype, rtol)
    _close(value, want_value, rtol, atol, "value")
    for k in metrics:
        _close(metrics[k], want_metrics[k], rtol, atol, k)
    if isinstance(reg, rg.SampledEntropy):  # at a non-finite lp (value ±inf or NaN there)
        # the closed form says rho·(lp + 1) = lp + 1, autodiff 1 (rho's where): both compared
        # elsewhere
        grads, want_grads = _where_finite(xs, grads), _where_finite(xs, want_grads)
    _close(grads, want_grads, grtol, atol, "gradient")


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(reduce="mean"),
        rg.L2(),
        rg.L2(clip=(-3.0, -0.5), center="mean", reduce="mean"),
        rg.L2(center=-1.0, reduce="seq-mean-token-sum"),
        rg.Huber(delta=0.5, reduce="mean"),
        rg.ElasticNet(l1_ratio=0.3),
        rg.SampledEntropy(mode="maximize", reduce="mean"),
        rg.Consistency(rg.Field("y"), reduce="mean"),
        rg.Consistency(rg.Field("y"), metric="l1"),
    ],
    ids=repr,
)
def test_elementwise_kernels_on_either_side_of_small(bk: Harness, reg: Any, large: bool) -> None:
    """Each elementwise kernel on one ragged, masked batch whose extreme is negative (the
    logprobs' side: a peak from the largest value alone is wrong) with a masked inf, by its
    forms for small inputs and (``large``: ``SMALL`` lowered) for large ones, equals the
    generic path; the property above draws both forms, this reaches each every run.
    Consistency's paired view holds a NaN where uncounted and -inf where the input has it
    (an element its ``valid_tokens`` drops)."""
    import torch

    from regularizers._fastpath import torch_fused

    x = [np.array([-0.25, -4.0, -1.0, 0.0, -2.5]), np.array([-0.5, -np.inf, -6.0])]
    mask = [np.array([1.0, 1.0, 0.0, 1.0, 1.0]), np.array([1.0, 0.0, 1.0])]
    y = [np.array([-0.5, -3.0, np.nan, 1.0, -2.5]), np.array([-1.5, -np.inf, -5.0])]
    x[1][2] = y[1][2] = -np.inf  # -inf in both, counted by the mask: dropped by Consistency
    xs = _cast(x, "float64")
    data = {"y": _cast(y, "float64")} if isinstance(reg, rg.Consistency) else None
    if data is None:
        mask[1][2] = 0.0  # (elsewhere that -inf is masked: the others count it as +inf)
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        if large:
            mp.setattr(torch_fused, "SMALL", 2)
        m = [torch.asarray(a, device=TORCH_DEVICE) for a in mask]
        (value, metrics, grads), want = _routed_and_generic(mp, reg, (data, xs, m, None), True)
    rtol, atol = S.training_tolerance(x, "float64", reg, mask)
    _close(value, want[0], rtol, atol, "value")
    for k in metrics:
        _close(metrics[k], want[1][k], rtol, atol, k)
    _close(grads, want[2], rtol, atol, "gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("above", [False, True])
def test_huber_kernel_declines_where_its_form_would_not_overflow(
    bk: Harness, dtype: str, above: bool
) -> None:
    """Huber's kernel writes ½u² inside δ as ``|u| · (|u| - |u|/2)``, which stays finite
    for ``u² > max`` where the generic path's ``0.5 · (u · u)`` overflows to inf: with
    ``δ² > max`` such a ``u`` is inside δ, so the kernel declines and the generic closed form
    runs (value inf, as the generic path's); with ``δ² <= max`` no ``u`` inside δ overflows
    and the kernel runs. Both equal the generic path exactly. (Declining on ``δ > max``
    instead of ``δ² > max`` gives a finite value here: this catches it.)"""
    import torch

    top = float(torch.finfo(getattr(torch, dtype)).max)
    root = math.sqrt(top)
    # above: δ and u between sqrt(max) and sqrt(2 max), so u² overflows and ½u² does not
    delta, u = (1.2 * root, 1.1 * root) if above else (0.9 * root, 0.8 * root)
    reg = rg.Huber(delta=delta, reduce="mean")
    xs = _cast([np.array([u, -1.5, 0.25, -u / 2])], dtype)[0]
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        with _spy(mp) as ran:
            got, want = _routed_and_generic(mp, reg, (None, xs, None, None), not above)
        assert ("huber.forward" in ran) is (not above), ran
    exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
    assert math.isinf(float(want[0].detach())) is above  # (the generic path's ½u² overflows)
    torch.testing.assert_close(got[0].detach(), want[0].detach(), **exact)
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k].detach(), **exact)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, **exact)


def _where_finite(xs: Any, grads: Any) -> list[Any]:
    """The gradients with 0 where the input is not finite."""
    import torch

    pairs = zip(_listed(xs), _listed(grads), strict=True)
    return [g.masked_fill(~torch.isfinite(x), 0.0) for x, g in pairs]


@st.composite
def sampled_kls(draw: st.DrawFn) -> rg.SampledKL:
    how = draw(st.sampled_from(REDUCES))
    opts: dict[str, Any] = {"reduce": how, "estimator": draw(st.sampled_from(["k1", "k2", "k3"]))}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0, 512.0]))
    if opts["estimator"] != "k2" and draw(st.integers(0, 3)) == 0:
        opts["gradient"] = "unbiased"  # (the generic kernel: its value is k·rho)
    return rg.SampledKL(rg.Field("ref"), **opts)


@given(reg=sampled_kls(), case=S.training_batches(), data=st.data())
def test_fused_sampled_kl_equals_the_generic_path(
    bk: Harness, reg: rg.SampledKL, case: Any, data: st.DataObject
) -> None:
    """k1, k2 and k3 by the fused kernel: a reference that holds inf or NaN where the mask
    hides it, log-ratios of 0 (where k3 and its slope vanish), half precision; the mask
    applied by ``where`` or (``SMALL`` lowered to reach it at these sizes) by the product
    whose finiteness check's sum the kernel reuses."""
    import torch

    from regularizers._fastpath import torch_fused

    x, kind, mask, counts = case
    if kind == "none" and data.draw(st.booleans(), label="masked"):
        kind, mask = "array", data.draw(S.masks_for(x), label="mask")
    elements = st.one_of(S.elements(-30.0, 0.0), st.sampled_from([0.0, -1.0, np.inf, np.nan]))
    ref = []
    for a in _listed(x):
        same = data.draw(hnp.arrays(np.bool_, a.shape), label="same")
        shift = data.draw(hnp.arrays("float64", a.shape, elements=elements), label="ref")
        with np.errstate(invalid="ignore"):  # (-inf + inf: a NaN reference, on purpose)
            ref.append(np.where(same, a, 0.0) + shift)
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]), label="dt")
    xs = _cast(x, dtype)
    refs = _cast(ref if isinstance(x, list) else ref[0], dtype)
    d, m = _mask_args(kind, mask)
    d = {**(d or {}), "ref": refs}
    product = data.draw(st.booleans(), label="product")
    with np.errstate(all="ignore"):
        finite = all(bool(torch.isfinite(r).all()) for r in _listed(refs))
        with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
            if product:
                mp.setattr(torch_fused, "SMALL", 2)
            value, metrics, grads = _autograd(reg, d, xs, m, counts)
        assert value.grad_fn.name() == ROUTED
        if reg.reduce != "seq-mean-token-mean" and reg.gradient == "estimator":
            assert ran[:1] == ["sampled_kl.forward"], ran
        with generic_path():
            want_value, want_metrics, want_grads = _autograd(reg, d, xs, m, counts)
    assert metrics.keys() == want_metrics.keys()
    rtol, atol = S.training_tolerance([*_listed(x), *ref] if finite else x, dtype, reg)
    atol = max(atol, 1e-30) * (1e6 if reg.estimator == "k3" else 1.0)  # e^-d of a large -d
    grtol = {"float16": 1e-2, "bfloat16": 1e-1}.get(dtype, rtol)
    _close(value, want_value, rtol, atol, "value")
    for k in metrics:
        _close(metrics[k], want_metrics[k], rtol, atol, k)
    if reg.gradient == "unbiased":  # at a non-finite lp (value ±inf or NaN there) the closed
        # form says k' + k, autodiff k' + k·0 (NaN): both not finite, compared elsewhere
        grads, want_grads = _where_finite(xs, grads), _where_finite(xs, want_grads)
    _close(grads, want_grads, grtol, atol, "gradient")


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("hidden", [-1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_fused_sampled_kl_at_uncounted_tokens(
    bk: Harness, estimator: str, hidden: float, product: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uncounted tokens whose log-ratio is not 0 (a number, or a reference of inf or NaN
    there) count in no metric, by ``where`` or by the product (``SMALL`` lowered) whose
    finiteness check's sum the kernel reuses as ``Σ d``; every reduce that has one weight."""
    import torch

    from regularizers._fastpath import torch_fused

    if product:
        monkeypatch.setattr(torch_fused, "SMALL", 2)
    x = [[-1.0, -2.0, -3.0, -0.5, -4.0], [-0.25, -7.0]]
    ref = [[-1.5, -2.0, hidden, -0.1, -1.0], [-0.5, -3.0]]
    mask = [[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0]]

    def tensors(rows: list[list[float]]) -> list[Any]:
        return [torch.tensor(r, dtype=torch.float64, device=TORCH_DEVICE) for r in rows]

    data = {"ref": tensors(ref), "m": tensors(mask)}
    for reduce in ("sum", "mean", "seq-mean-token-sum"):
        reg = rg.SampledKL(rg.Field("ref"), estimator=estimator, reduce=reduce, mask=rg.Field("m"))
        with _spy(monkeypatch) as ran:
            got = _autograd(reg, data, tensors(x), None, None)
        assert got[0].grad_fn.name() == ROUTED
        assert ran == ["sampled_kl.forward", "grad"], ran
        with generic_path():
            want = _autograd(reg, data, tensors(x), None, None)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
        assert got[1].keys() == want[1].keys()
        for k in got[1]:
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-12, atol=0, msg=k)
        for a, b in zip(got[2], want[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def _count_prepares(mp: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time a Batch is prepared (``Regularizer.prepare``)."""
    prepared: list[int] = []
    real_prepare = rg.Regularizer.prepare

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        prepared.append(1)
        return real_prepare(self, *args, **kwargs)

    mp.setattr(rg.Regularizer, "prepare", spy)
    return prepared


def _bitwise(got: Any, want: Any) -> None:
    """Two ``(value, metrics, gradients)``: equal to the bit, NaN where NaN."""
    import torch

    exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
    torch.testing.assert_close(got[0].detach(), want[0].detach(), **exact)
    assert got[1].keys() == want[1].keys()
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k], **exact, msg=k)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, **exact)


ONE_TENSOR = ["L1", "L2", "Huber", "ElasticNet", "SampledEntropy", "SampledKL", "Consistency"]


@st.composite
def one_tensor_calls(draw: st.DrawFn) -> tuple[rg.Regularizer, str]:
    """A per-token built-in with a fused kernel, ``reduce`` "sum" or "mean", and where its
    mask comes from: ``"none"``, ``"option"`` (``mask=Field("m")`` at construction),
    ``"field"`` (the call's ``mask=Field("m")``) or ``"array"`` (the call's tensor)."""
    kind = draw(st.sampled_from(ONE_TENSOR))
    where = draw(st.sampled_from(["none", "option", "field", "array"]))
    opts: dict[str, Any] = {"reduce": draw(st.sampled_from(["sum", "mean"]))}
    if where == "option":
        opts["mask"] = rg.Field("m")
    if kind == "SampledKL":
        est = draw(st.sampled_from(["k1", "k2", "k3"]))
        return rg.SampledKL(rg.Field("other"), estimator=est, **opts), where
    if kind == "Consistency":
        metric = draw(st.sampled_from(["mse", "l1"]))
        return rg.Consistency(rg.Field("other"), metric=metric, **opts), where
    if kind == "L2":
        clip = draw(st.sampled_from([None, (-100.0, 0.0), (-1.0, None)]))
        return rg.L2(clip=clip, center=draw(st.sampled_from([None, "mean", -1.0])), **opts), where
    if kind == "Huber":
        return rg.Huber(delta=draw(st.sampled_from([0.5, 1.0, 3.5])), **opts), where
    if kind == "ElasticNet":
        return rg.ElasticNet(l1_ratio=draw(st.sampled_from([0.0, 0.3, 1.0])), **opts), where
    cls = {"L1": rg.L1, "SampledEntropy": rg.SampledEntropy}[kind]
    return cls(**opts), where


@given(call=one_tensor_calls(), data=st.data())
def test_one_tensor_with_its_data_needs_no_batch(
    bk: Harness, call: tuple[rg.Regularizer, str], data: st.DataObject
) -> None:
    """One tensor with its mask and other fields in a dict of ``data`` (verl's padded
    ``[B, T]`` layout, or one sequence) runs its fused kernel without preparing a Batch, and
    gives the numbers of the call that prepares one, bit for bit: value, metrics and
    gradient, with ±inf or NaN hidden under the mask (in the input or the other field), half
    precision, 1-D and 2-D. Consistency, whose invalid tokens its value tells (not finite),
    prepares one where its value is not finite, as the call with a Batch validates then."""
    import torch

    from regularizers._fastpath import torch_autograd, torch_fused

    reg, where = call
    shape = data.draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (40,)]), label="shape")
    values = st.one_of(S.elements(-300.0, 10.0), st.sampled_from(S.TRAINING_KINKS))
    if data.draw(st.integers(0, 3)) == 0:
        values = st.one_of(values, st.sampled_from(S.TRAINING_SPECIALS))
    x = data.draw(hnp.arrays("float64", shape, elements=values), label="x")
    other = x + data.draw(hnp.arrays("float64", shape, elements=S.elements(-2.0, 2.0)), label="o")
    mask = None
    if where != "none":
        mask = data.draw(S.masks_for(x), label="mask")
        off = np.asarray(mask) == 0
        hidden = st.sampled_from([np.inf, -np.inf, np.nan, 5.0])
        for a in (x, other):
            if off.any() and data.draw(st.booleans()):
                a[off] = data.draw(hnp.arrays("float64", int(off.sum()), elements=hidden))
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64"]), label="dt")
    xs = _cast(x, dtype)
    d: dict[str, Any] = {"other": _cast(other, dtype)}
    m: Any = None
    if mask is not None:
        tm = torch.asarray(mask, device=TORCH_DEVICE)
        d["m"] = tm
        m = {"field": rg.Field("m"), "array": tm}.get(where)
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        prepared = _count_prepares(mp)
        if data.draw(st.booleans(), label="product"):  # (the mask by the checked product)
            mp.setattr(torch_fused, "SMALL", 2)
        before = [xs.clone(), *[a.clone() for a in d.values()]]
        got = _autograd(reg, d, xs, m, None)
        assert got[0].grad_fn.name() == ROUTED
        for a, b in zip([xs, *d.values()], before, strict=True):  # (nothing written to)
            torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)
        value = float(got[0].detach())
        if isinstance(reg, rg.Consistency) and x.size and not math.isfinite(value):
            assert prepared, "a Consistency whose value is not finite prepares a Batch"
        else:
            assert not prepared, f"{reg!r} prepared a Batch"
        mp.setattr(torch_autograd, "compute_flat", lambda *a, **k: None)
        want = _autograd(reg, d, xs, m, None)
        assert prepared, "the call with a Batch prepared one"
    _bitwise(got, want)


@given(calls=st.lists(one_tensor_calls(), min_size=2, max_size=3), data=st.data())
def test_a_pipeline_over_one_tensor_needs_no_batch(
    bk: Harness, calls: list[tuple[rg.Regularizer, str]], data: st.DataObject
) -> None:
    """A Pipeline's per-token terms over one tensor (each with its own mask option or none,
    the fields in a dict of data) share one node without preparing a Batch, with the numbers
    of the call that prepares one, bit for bit."""
    import torch

    from regularizers._fastpath import torch_autograd

    shape = data.draw(st.sampled_from([(1,), (9,), (3, 5)]), label="shape")
    x = data.draw(hnp.arrays("float64", shape, elements=S.elements(-300.0, 10.0)), label="x")
    mask = data.draw(S.masks_for(x), label="mask")
    other = x + data.draw(hnp.arrays("float64", shape, elements=S.elements(-2.0, 2.0)), label="o")
    d = {"other": torch.asarray(other), "m": torch.asarray(mask)}
    terms = [rg.Term(reg, 0.5 + i, name=f"t{i}") for i, (reg, _) in enumerate(calls)]
    pipe = rg.Pipeline(terms, metrics="array")

    def step() -> Any:
        leaf = torch.asarray(x).requires_grad_(True)
        value, metrics = pipe(d, leaf)
        return value, metrics, torch.autograd.grad(value, [leaf])

    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        prepared = _count_prepares(mp)
        got = step()
        assert not prepared, "a term prepared a Batch"
        mp.setattr(torch_autograd, "compute_flat", lambda *a, **k: None)
        want = step()
        assert prepared
    _bitwise(got, want)


@given(data=st.data())
def test_rows_of_one_tensor_need_no_batch(bk: Harness, data: st.DataObject) -> None:
    """GradientPenalty (a kernel ``ROWS``: ``[n, D]`` rows, a per-row mask) on one tensor
    with its mask in a dict (or given) prepares no Batch where its kernel runs, with the
    numbers of the call that prepares one, bit for bit; a row its kernel declines (not
    finite, or underflowing) hands the call to a Batch; the vectors along another axis
    (``axis``) take a Batch."""
    import torch

    from regularizers._fastpath import torch_autograd, torch_fused

    shape = data.draw(st.sampled_from([(4,), (1, 3), (5, 4), (2, 3, 4), (3, 1)]), label="shape")
    axis = data.draw(st.sampled_from([-1, len(shape) - 1, 0]), label="axis")
    reduce = data.draw(st.sampled_from(["sum", "mean"]), label="reduce")
    where = data.draw(st.sampled_from(["none", "option", "field", "array"]), label="where")
    reg = rg.GradientPenalty(
        target_norm=data.draw(st.sampled_from([1.0, 0.0, 2.5])),
        axis=axis,
        reduce=reduce,
        mask=rg.Field("m") if where == "option" else None,
    )
    magnitudes = st.one_of(S.elements(0.25, 4.0), S.elements(-4.0, -0.25))
    special = data.draw(st.booleans(), label="special")
    if special:
        magnitudes = st.one_of(magnitudes, st.sampled_from([0.0, np.inf, np.nan, 1e-30]))
    x = data.draw(hnp.arrays("float64", shape, elements=magnitudes), label="x")
    tokens = shape[:-1] if axis != 0 else shape[1:]
    mask = data.draw(
        hnp.arrays(np.float32, tokens, elements=st.sampled_from([0.0, 1.0, 0.5])), label="mask"
    )
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dt")
    xs = _cast(x, dtype)
    d = {"m": torch.asarray(mask, device=TORCH_DEVICE)}
    m = {"field": rg.Field("m"), "array": d["m"]}.get(where)
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        prepared = _count_prepares(mp)
        if data.draw(st.booleans(), label="product"):
            mp.setattr(torch_fused, "SMALL", 2)
        got = _autograd(reg, d, xs, m, None)
        assert got[0].grad_fn.name() == ROUTED
        along_last = axis != 0 or len(shape) == 1
        if along_last and not special:  # (every norm finite and far from 0: the kernel runs)
            assert not prepared, "a Batch was prepared"
        if not along_last:
            assert prepared, "vectors along another axis need a Batch"
        mp.setattr(torch_autograd, "compute_flat", lambda *a, **k: None)
        want = _autograd(reg, d, xs, m, None)
    _bitwise(got, want)


def test_per_token_kernels_of_penalties_with_valid_tokens_tell_them_by_their_value(
    bk: Harness,
) -> None:
    """The call on one tensor prepares no Batch, so runs no ``valid_tokens``: the per-token
    built-ins that have one (Consistency) have kernels ``VALID_IF_FINITE``, whose value is not
    finite where a token is invalid (then the Batch is prepared, and validated); the kernels
    ``ROWS`` (GradientPenalty's) are of penalties that have none."""
    from regularizers._fastpath import torch_fused

    with_valid = []
    for cls in CLOSED:
        if cls.valid_tokens is rg.Regularizer.valid_tokens or cls.name not in torch_fused.GRAD:
            continue
        nd = cls.event_ndim  # (a property where the options decide: Consistency's metric)
        if isinstance(nd, property) or nd == 0:
            with_valid.append(cls.__name__)
            assert getattr(torch_fused.GRAD[cls.name], "VALID_IF_FINITE", False), cls.__name__
    assert with_valid == ["Consistency"]
    rows = [c.__name__ for c in CLOSED if getattr(torch_fused.GRAD.get(c.name), "ROWS", False)]
    assert rows == ["GradientPenalty"]  # (a kernel ROWS: its penalty has no valid_tokens)
    assert all(getattr(rg, n).valid_tokens is rg.Regularizer.valid_tokens for n in rows)


def test_what_one_tensor_reads_otherwise_prepares_a_batch(bk: Harness) -> None:
    """Where a call on one tensor reads anything but tensors of its shape and device in a
    dict (a list, a tuple ``("field", key)``, another mapping, a reference that requires
    grad), or reads them wrongly (a missing key, another shape, a complex mask), the Batch
    is prepared: the same numbers, and its validation's errors."""
    import types

    import torch

    x = torch.tensor([-1.0, -2.5, 0.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -3.0, -0.25], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    reg = rg.SampledKL(rg.Field("ref"), reduce="mean")

    field = rg.Field("w")

    def step(d: Any, mask: Any = field) -> Any:
        leaf = x.clone().requires_grad_(True)
        value, metrics = reg.compute(d, leaf, mask=mask)
        value.backward()
        return value, metrics, leaf.grad

    plain = step({"ref": ref, "w": w})
    assert plain[0].grad_fn.name() == ROUTED
    for d, mask in [
        ({"ref": [ref], "w": w}, rg.Field("w")),  # a list of one tensor
        ({"ref": ref, "w": [w]}, rg.Field("w")),
        ({"ref": ref}, [w]),
        ({"ref": ref, "w": w}, ("field", "w")),
        (types.MappingProxyType({"ref": ref, "w": w}), rg.Field("w")),
        ({"ref": ref, "w": w.to(torch.int64)}, rg.Field("w")),
        ({"ref": ref, "w": w.bool()}, rg.Field("w")),
    ]:
        got = step(d, mask)
        torch.testing.assert_close(got[0], plain[0], rtol=0.0, atol=0.0)
        for k in plain[1]:
            torch.testing.assert_close(got[1][k], plain[1][k], rtol=0.0, atol=0.0)
        torch.testing.assert_close(got[2], plain[2], rtol=0.0, atol=0.0)
    teacher = ref.clone().requires_grad_(True)  # a reference that requires grad: its gradient
    leaf = x.clone().requires_grad_(True)
    value, _ = reg.compute({"ref": teacher, "w": w}, leaf, mask=rg.Field("w"))
    assert value.grad_fn.name() != ROUTED
    value.backward()
    assert teacher.grad is not None
    assert bool(teacher.grad[1] == 0.0)  # (uncounted)
    torch.testing.assert_close(leaf.grad, plain[2])
    # a counted token -inf in both views: Consistency's valid_tokens drops it, which its
    # kernel's value tells (not finite), so the Batch is prepared and validated
    pair = rg.Consistency(rg.Field("ref"), reduce="mean")
    ninf = torch.tensor([-1.0, -math.inf, 0.0, -0.5], dtype=torch.float64)
    counted = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    leaf = ninf.clone().requires_grad_(True)
    value, metrics = pair.compute({"ref": ninf.clone(), "w": counted}, leaf, mask=rg.Field("w"))
    value.backward()
    assert value.grad_fn.name() == ROUTED
    with generic_path():
        want = _autograd(pair, {"ref": ninf.clone(), "w": counted}, ninf, rg.Field("w"), None)
    assert math.isfinite(float(value.detach()))
    assert float(metrics["consistency_mean"]) == 0.0
    torch.testing.assert_close(value.detach(), want[0].detach(), rtol=0.0, atol=0.0)
    torch.testing.assert_close(leaf.grad, want[2][0], rtol=0.0, atol=0.0)
    with pytest.raises(KeyError, match="'w'"):
        step({"ref": ref})
    with pytest.raises(ValueError, match="does not match"):
        step({"ref": ref, "w": w[:3]})
    with pytest.raises(ValueError, match="does not match"):
        step({"ref": ref[:3], "w": w})
    with pytest.raises(TypeError, match="complex"):
        step({"ref": ref, "w": w.to(torch.complex128)})
    with pytest.raises(TypeError, match="mask"):
        step({"ref": ref, "w": w}, "w")


@pytest.mark.parametrize("cls", CLOSED, ids=[c.__name__ for c in CLOSED])
@given(data=st.data())
def test_every_built_in_equals_the_generic_path(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    """The drawn cases of every built-in (kinks, Huber's δ, half precision, ragged lists,
    -inf classes, masks and counts as its strategy draws them)."""
    case = data.draw(S.cases(cls), label="case")
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    x, d, m = convert(bk, case, dtype)
    with np.errstate(all="ignore"):
        value, metrics, grads = _autograd(case.reg, d, x, m, None)
        routed = value.grad_fn.name() == ROUTED
        assert routed == (not isinstance(getattr(case.reg, "target", None), rg.Field))
        with generic_path():
            want_value, want_metrics, want_grads = _autograd(case.reg, d, x, m, None)
    rtol = 1e-9 if dtype == "float64" else 1e-4
    wv = float(want_value.detach())
    scale = max(1.0, abs(wv)) if np.isfinite(wv) else 1.0
    _close(value, want_value, rtol, rtol * scale, "value")
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        w = float(want_metrics[k].detach())
        wscale = max(1.0, abs(w)) if np.isfinite(w) else 1.0
        _close(metrics[k], want_metrics[k], rtol, rtol * wscale, k)
    gscale = max(
        [1.0] + [float(g.detach().abs().nan_to_num().max()) for g in want_grads if g.numel()]
    )
    _close(grads, want_grads, rtol * 10, rtol * 10 * gscale, "gradient")


@pytest.mark.parametrize("cls", CLOSED, ids=[c.__name__ for c in CLOSED])
@given(data=st.data())
def test_without_a_gradient_the_kernels_give_the_same_numbers(
    bk: Harness, cls: type, data: st.DataObject
) -> None:
    """``compute`` under ``torch.no_grad()``, or on tensors that need no gradient, runs the
    kernels the call with a gradient runs (before, it took the generic path), with no node:
    its value and metrics are that call's, bit for bit, and nothing is recorded. L1 and L2
    without a mask or data have fused reductions of their own (``torch_fused.FAST``): close,
    as the generic path is."""
    import torch

    case = data.draw(S.cases(cls), label="case")
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    x, d, m = convert(bk, case, dtype)
    plain = [a.detach().clone() for a in _listed(x)]
    lp = plain if isinstance(x, list) else plain[0]
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        value, metrics, _ = _autograd(case.reg, d, x, m, None)
        trained = [r for r in ran if r.endswith(".forward")]
        ran.clear()
        with torch.no_grad():
            leaves = [a.detach().clone().requires_grad_(True) for a in _listed(x)]
            got = [case.reg.compute(d, leaves if isinstance(x, list) else leaves[0], **kwargs(m))]
        unwanted = [r for r in ran if r.endswith(".forward")]
        ran.clear()
        got.append(case.reg.compute(d, lp, **kwargs(m)))
        assert [r for r in ran if r.endswith(".forward")] == unwanted
    fused = isinstance(case.reg, (rg.L1, rg.L2)) and not unwanted
    assert unwanted == trained or fused, (unwanted, trained)
    for v, ms in got:
        assert v.grad_fn is None
        assert not v.requires_grad
        assert ms.keys() == metrics.keys()
        if trained and not fused:
            exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
            torch.testing.assert_close(v, value.detach(), **exact)
            for k in ms:
                torch.testing.assert_close(ms[k], metrics[k], **exact, msg=k)
        else:  # (the generic path, or the fused reductions: the rounding of another order)
            rtol = 1e-9 if dtype == "float64" else 1e-4
            for a, b in [(v, value), *[(ms[k], metrics[k]) for k in ms]]:
                w = float(b.detach())
                _close(a, b, rtol, rtol * (max(1.0, abs(w)) if np.isfinite(w) else 1.0), "nograd")


@st.composite
def pipelines(draw: st.DrawFn) -> rg.Pipeline:
    terms = []
    for i in range(draw(st.integers(2, 3))):
        reg = draw(elementwise())
        if draw(st.booleans()):
            reg = type(reg)(**{**reg.options(), "mask": rg.Field("w")})
        terms.append(rg.Term(reg, draw(st.sampled_from([1.0, 1e-3, -0.5])), name=f"t{i}"))
    return rg.Pipeline(terms, metrics="array")


@given(pipe=pipelines(), data=st.data())
def test_a_pipelines_terms_share_one_node_equal_to_the_generic_path(
    bk: Harness, pipe: rg.Pipeline, data: st.DataObject
) -> None:
    import torch

    elements = st.one_of(S.elements(-300.0, 10.0), st.sampled_from(KINKS))
    xs = [
        data.draw(hnp.arrays("float64", data.draw(st.integers(1, 40)), elements=elements))
        for _ in range(data.draw(st.integers(1, 5)))
    ]
    ws = [
        data.draw(hnp.arrays("float32", a.shape, elements=st.sampled_from([0.0, 1.0]))) for a in xs
    ]
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    x = _cast(xs, dtype)
    d = {"w": [torch.asarray(w, device=TORCH_DEVICE) for w in ws]}

    def run() -> Any:
        leaves = [a.detach().clone().requires_grad_(True) for a in x]
        loss, metrics = pipe(d, leaves)
        loss.backward()
        return loss, metrics, [a.grad for a in leaves]

    with np.errstate(all="ignore"):
        loss, metrics, grads = run()
        with generic_path():
            want_loss, want_metrics, want_grads = run()
    rtol, atol = max(S.training_tolerance(xs, dtype, t.regularizer) for t in pipe.terms)
    atol *= len(pipe.terms)
    _close(loss, want_loss, rtol, atol, "loss")
    assert metrics.keys() == want_metrics.keys()
    for k, v in metrics.items():
        if not k.endswith("/weight"):
            _close(v, want_metrics[k], rtol, atol, k)
    _close(grads, want_grads, rtol, atol, "gradient")


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("masked", ["L1", "SampledKL"])
def test_a_masked_term_reads_the_concatenation_of_a_later_plain_term(
    bk: Harness, masked: str, product: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A term that reads a mask, before one that reads the values alone, is prepared on
    the later term's concatenation (one for both): masking it must not write into it. The
    uncounted tokens hold large values, inf and NaN, which the plain L2 counts; the
    numbers are the generic path's, and the input is left as it was. The mask by
    ``where``, or (``product``: ``SMALL`` lowered) by the product, which writes in place
    into an array of the call's own."""
    import torch

    from regularizers._fastpath import torch_fused

    if product:
        monkeypatch.setattr(torch_fused, "SMALL", 1)

    first = (
        rg.L1(mask=rg.Field("w"))
        if masked == "L1"
        else rg.SampledKL(reference=rg.Field("ref"), mask=rg.Field("w"))
    )
    terms = [rg.Term(first, 1e-3, name="masked"), rg.Term(rg.L2(), 1e-4, name="plain")]
    pipe = rg.Pipeline(terms, metrics="array")
    xs = [[-1.0, 1e4, -2.0, float("inf")], [-0.5, float("nan")], [-3.0, -4.0, 7e3]]
    ws = [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0], [1.0, 1.0, 0.0]]
    data = {
        "w": [torch.tensor(w, dtype=torch.float64, device=TORCH_DEVICE) for w in ws],
        "ref": [torch.full((len(x),), -1.25, dtype=torch.float64, device=TORCH_DEVICE) for x in xs],
    }
    x = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in xs]
    kept = [a.clone() for a in x]

    def run() -> Any:
        leaves = [a.detach().clone().requires_grad_(True) for a in x]
        loss, metrics = pipe(data, leaves)
        loss.backward()
        return loss, metrics, [a.grad for a in leaves]

    loss, metrics, grads = run()
    assert [f.name() for f, _ in loss.grad_fn.next_functions if f is not None] == [
        "MulBackward0",
        "MulBackward0",
    ]
    assert {f.next_functions[0][0].name() for f, _ in loss.grad_fn.next_functions} == {ROUTED}
    with generic_path():
        want_loss, want_metrics, want_grads = run()
    torch.testing.assert_close(loss, want_loss, equal_nan=True)
    for k in want_metrics:
        torch.testing.assert_close(metrics[k], want_metrics[k], equal_nan=True)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert math.isnan(float(metrics["plain/l2_raw"]))  # the plain term counts every token
    raw = "l1_raw" if masked == "L1" else "sampled_kl_raw"
    assert math.isfinite(float(metrics[f"masked/{raw}"]))  # the masked one only some
    for a, b in zip(x, kept, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_a_pipelines_terms_are_one_node(bk: Harness) -> None:
    """Two built-ins over one ragged input: one ClosedForm node, and one gradient per tensor."""
    import torch

    pipe = rg.Pipeline(
        [(rg.L1(mask=rg.Field("w")), 1e-3), (rg.L2(center="mean", clip=(-100.0, 0.0)), 1e-4)]
    )
    xs = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    loss, _ = pipe({"w": [torch.ones(5), torch.zeros(3)]}, xs)
    nodes, seen = [], set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    assert nodes.count(ROUTED) == 1, nodes
    loss.backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in xs)


@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(),
        rg.L2(center="mean", clip=(-100.0, 0.0)),
        rg.L1(reduce="seq-mean-token-mean"),
        rg.Huber(delta=1.0),
    ],
    ids=repr,
)
def test_double_backward_differentiates_the_generic_path(bk: Harness, reg: Any) -> None:
    """``create_graph=True``: the same gradient, differentiable again (Hessian-vector)."""
    import torch

    def grads(routed: bool) -> Any:
        xs = [
            torch.tensor([-1.0, 0.0, -150.0, 0.5], dtype=torch.float64, requires_grad=True),
            torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True),
        ]
        with contextlib.nullcontext() if routed else generic_path():
            value, _ = reg(xs)
        assert (value.grad_fn.name() == ROUTED) == routed
        g = torch.autograd.grad(value, xs, create_graph=True)
        h = torch.autograd.grad(
            sum(((gi * gi).sum() for gi in g if gi.requires_grad), torch.zeros(()))
            + sum((xi * xi).sum() for xi in xs),
            xs,
        )
        return [gi.detach() for gi in g], h

    (g, h), (want_g, want_h) = grads(True), grads(False)
    for a, b in zip([*g, *h], [*want_g, *want_h], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("metric", ["mse", "l1"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_consistency_kernel_equals_the_generic_path(bk: Harness, metric: str, reduce: str) -> None:
    """-inf in both arrays (not counted: its -inf - -inf is set to 0), -inf in one (+inf), a
    masked NaN and inf in the paired array, a zero difference (l1's kink)."""
    import torch

    inf, nan = float("inf"), float("nan")
    x = [[-1.0, -inf, -inf, 0.5, 2.0, -3.0], [0.0, -2.0]]
    y = [[-1.5, -inf, 0.0, 0.5, nan, inf], [1.0, -2.0]]
    m = [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0]]
    data = {"y": [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in y]}
    data["m"] = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in m]
    reg = rg.Consistency(rg.Field("y"), metric=metric, reduce=reduce, mask=rg.Field("m"))
    lp = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in x]
    with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        got = _autograd(reg, data, lp, None, None)  # (on fresh leaves: lp is not touched)
        assert got[0].grad_fn.name() == ROUTED
    assert ran[:1] == ["consistency.forward"], ran
    assert ran[-1] == "grad", ran
    with generic_path():
        want = _autograd(reg, data, lp, None, None)
    _assert_same(got, want)
    assert float(got[0].detach()) == float("inf")  # the -inf against 0


@pytest.mark.parametrize(
    ("case", "validated"),
    [("finite", False), ("uncounted pair", False), ("counted pair", True), ("nan", True)],
)
@pytest.mark.parametrize("metric", ["mse", "l1"])
def test_consistency_validates_only_where_its_value_is_not_finite(
    bk: Harness, case: str, validated: bool, metric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel runs before ``valid_tokens`` (``VALID_IF_FINITE``): a finite value means
    that every counted token is valid, and the restriction is skipped, also with a pair of
    -inf that the mask does not count; a counted pair of -inf makes the value NaN, and
    ``valid_tokens`` then drops that token (N = 3, not 4). A NaN in the input is valid: its
    value is NaN either way. The generic path's numbers in every case."""
    import torch

    inf = float("inf")
    x = [[-1.0, -2.0, 0.5], [-3.0, -0.25]]
    y = [[-1.5, -2.0, 0.0], [-1.0, -0.5]]
    if case != "finite":
        x[1][1] = y[1][1] = -inf  # not counted: the mask's 0
    if case == "counted pair":
        x[0][1] = y[0][1] = -inf
    if case == "nan":
        x[0][2] = float("nan")
    m = [[1.0, 1.0, 1.0], [1.0, 0.0]]
    data = {"y": [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in y]}
    data["m"] = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in m]
    reg = rg.Consistency(rg.Field("y"), metric=metric, reduce="mean", mask=rg.Field("m"))
    lp = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in x]
    checked: list[int] = []
    valid_tokens = rg.Consistency.valid_tokens

    def spied(self: Any, batch: Any) -> Any:
        checked.append(batch.size)
        return valid_tokens(self, batch)

    monkeypatch.setattr(rg.Consistency, "valid_tokens", spied)
    with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        got = _autograd(reg, data, lp, None, None)
        assert got[0].grad_fn.name() == ROUTED
    on_cpu = lp[0].device.type == "cpu"  # (elsewhere no host read: valid_tokens runs first)
    assert bool(checked) == (validated or not on_cpu), (case, checked)
    assert ran[-2:] == ["consistency.forward", "grad"], ran
    with generic_path():
        want = _autograd(reg, data, lp, None, None)
    _assert_same(got, want)
    value, raw = float(got[0].detach()), float(got[1]["consistency_raw"])
    if case == "nan":
        assert math.isnan(value)
    else:  # the counted pair of -inf is dropped: it is not in N
        assert math.isfinite(value)
        assert value == pytest.approx(raw / (3 if case == "counted pair" else 4))


_VOUCHING = [
    ("KL", True),
    ("JSD", True),
    ("ZLoss", True),
    ("Entropy", True),
    ("Entropy, threshold", False),  # its hinge is 0 at NaN: the value cannot tell
    ("KL, steps", False),  # SOFTMAX=False: a row of all -inf normalizes to a finite 0
]


@pytest.mark.parametrize(
    ("name", "vouching", "case"),
    [
        (name, vouching, case)
        for name, vouching in _VOUCHING
        for case in ["finite", "uncounted row", "counted row", "reference row", "nan"]
        if case != "reference row" or name.startswith(("KL", "JSD"))  # (those with one)
    ],
)
def test_class_axis_kernels_validate_only_where_their_value_is_not_finite(
    bk: Harness, monkeypatch: pytest.MonkeyPatch, name: str, vouching: bool, case: str
) -> None:
    """Where their forward vouches for it (``vouches``: by log_softmax, softmax or logsumexp,
    without Entropy's hinge), the class-axis kernels run before ``valid_tokens``
    (``VALID_IF_FINITE``): a finite value means no counted row is all -inf (in the scores or
    the reference), so the restriction is skipped, also with such a row that the mask does
    not count; a counted one makes the value NaN or +inf, and ``valid_tokens`` then drops it
    (N = 2, not 3). A NaN is valid, and its value NaN either way. Where the forward does not
    vouch, ``valid_tokens`` runs first, as ``prepare`` has it. The generic path's numbers in
    every case, and the kernel's forward ran once or, where it was asked again, twice."""
    import torch

    from regularizers._fastpath import torch_distributions

    kind = name.split(",")[0]
    if name.endswith("steps"):
        monkeypatch.setattr(torch_distributions, "SOFTMAX", False)
    inf = float("inf")
    x = [[[0.5, -1.0, 2.0, -inf], [1.0, 0.0, -0.5, 0.25]], [[-2.0, 0.0, 1.5, 0.5]]]
    r = [[[0.0, -0.5, 1.0, -inf], [0.5, 0.5, -1.0, 0.0]], [[-1.0, 0.5, 1.0, 0.0]]]
    m = [[1.0, 1.0], [0.0]]  # the last row is not counted
    if case == "uncounted row":
        x[1][0] = [-inf] * 4
    elif case == "counted row":
        x[0][1] = [-inf] * 4
    elif case == "reference row":
        r[0][1] = [-inf] * 4
    elif case == "nan":
        x[0][1][2] = float("nan")
    key = {"KL": "kl", "JSD": "jsd", "ZLoss": "z_loss", "Entropy": "entropy"}[kind]
    opts: dict[str, Any] = {"reduce": "mean", "mask": rg.Field("m")}
    if kind in ("KL", "JSD"):
        reg = getattr(rg, kind)(rg.Field("r"), **opts)
    elif name == "Entropy, threshold":
        reg = rg.Entropy(threshold=0.5, **opts)
    else:
        reg = getattr(rg, kind)(**opts)
    cls = type(reg)

    def tensors(a: Any) -> list[Any]:
        return [torch.tensor(b, dtype=torch.float64, device=TORCH_DEVICE) for b in a]

    data = {"r": tensors(r), "m": tensors(m)}
    lp = tensors(x)
    checked: list[int] = []
    valid_tokens = cls.valid_tokens

    def spied(self: Any, batch: Any) -> Any:
        checked.append(batch.size)
        return valid_tokens(self, batch)

    monkeypatch.setattr(cls, "valid_tokens", spied)
    with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        got = _autograd(reg, data, lp, None, None)
        assert got[0].grad_fn.name() == ROUTED
    on_cpu = lp[0].device.type == "cpu"  # (elsewhere no host read: valid_tokens runs first)
    invalid = case in ("counted row", "reference row", "nan")
    assert bool(checked) == (invalid or not vouching or not on_cpu), (case, checked)
    asked = 2 if vouching and on_cpu and invalid else 1
    assert ran == [f"{key}.forward"] * asked + ["grad"], ran
    with generic_path():
        want = _autograd(reg, data, lp, None, None)
    _assert_same(got, want)
    value = float(got[0].detach())  # (the hinge's 0 at NaN: finite)
    assert math.isnan(value) is (case == "nan" and name != "Entropy, threshold")


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("special", [None, float("inf"), float("nan"), 1e-300])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradient_penalty_kernel_equals_the_generic_path(
    bk: Harness, special: Any, reduce: str, product: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A masked row holding inf, ragged datums, the class axis first; with a counted row
    holding inf or NaN, or one whose squares underflow (1e-300 · [-1, 2, 0]: Σ g² is 0 in
    float64, its norm 2.2e-300 is not), the kernel hands over to the generic one. The mask
    by ``where``, or (``product``: ``SMALL`` lowered) by the product whose check's sum the
    kernel reuses."""
    import torch

    from regularizers._fastpath import torch_fused

    if product:
        monkeypatch.setattr(torch_fused, "SMALL", 1)

    inf = float("inf")
    x = [[[3.0, 0.0, 0.0], [4.0, 0.0, inf], [0.5, 1.0, 0.0]], [[-1.0], [2.0], [0.0]]]
    if special == 1e-300:
        x[1] = [[-1e-300], [2e-300], [0.0]]
    elif special is not None:
        x[1][1][0] = special
    m = [[1.0, 1.0, 0.0], [1.0]]
    data = {"m": [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in m]}
    reg = rg.GradientPenalty(target_norm=0.5, axis=0, reduce=reduce, mask=rg.Field("m"))
    lp = [torch.tensor(a, dtype=torch.float64, device=TORCH_DEVICE) for a in x]
    with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        got = _autograd(reg, data, lp, None, None)
        assert got[0].grad_fn.name() == ROUTED
    on_host = TORCH_DEVICE in (None, "cpu")  # (on a GPU its host-read check hands over)
    assert (ran[:1] == ["gradient_penalty.forward"]) == (special is None and on_host), ran
    with generic_path():
        want = _autograd(reg, data, lp, None, None)
    _assert_same(got, want)


@pytest.mark.parametrize("special", [None, float("nan")])
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_orthogonality_kernel_equals_the_generic_path(bk: Harness, special: Any, mode: str) -> None:
    """Cosine kind: a zero row, parallel rows (|cos| rounding above 1 is clipped), a masked
    matrix holding inf, a NaN in a counted one."""
    import torch

    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 5))
    w[0, 1] = 0.0  # a zero row
    w[1, 2] = 3.0 * w[1, 0]  # parallel rows
    w[3, 0, 0] = np.inf  # masked below
    if special is not None:
        w[2, 1, 1] = special
    x = torch.asarray(w if mode == "rows" else np.swapaxes(w, 1, 2).copy(), device=TORCH_DEVICE)
    data = {"m": torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=TORCH_DEVICE)}
    reg = rg.Orthogonality(mode=mode, reduce="mean", mask=rg.Field("m"))
    with pytest.MonkeyPatch.context() as mp, _spy(mp) as ran:
        got = _autograd(reg, data, x, None, None)
        assert got[0].grad_fn.name() == ROUTED
    assert ran[:1] == ["orthogonality.forward"], ran
    with generic_path():
        want = _autograd(reg, data, x, None, None)
    _assert_same(got, want)


@pytest.mark.parametrize(
    "reg",
    [rg.L2(), rg.Huber(delta=0.5), rg.Orthogonality(), rg.ElasticNet(l1_ratio=0.3, center="mean")],
    ids=repr,
)
def test_parameters_take_the_route(bk: Harness, reg: Any) -> None:
    """A model's weights (``nn.Parameter``, one or a list) are regularized through the closed
    form as plain tensors are, with the generic path's value, metrics and gradients."""
    import torch

    def run(routed: bool) -> Any:
        rng = np.random.default_rng(0)
        ws = [
            torch.nn.Parameter(torch.asarray(rng.normal(size=(4, 3)), device=TORCH_DEVICE)),
            torch.nn.Parameter(torch.asarray(rng.normal(size=(2, 4, 3)), device=TORCH_DEVICE)),
        ]
        out = []
        for lp in (ws[0], ws):
            with contextlib.nullcontext() if routed else generic_path():
                value, metrics = reg(lp)
            assert (value.grad_fn.name() == ROUTED) == routed
            out.append((value, metrics, torch.autograd.grad(value, ws[: len(_listed(lp))])))
        return out

    for (v, m, g), (wv, wm, wg) in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(v, wv)
        assert m.keys() == wm.keys()
        for k in m:
            torch.testing.assert_close(m[k], wm[k])
        for a, b in zip(g, wg, strict=True):
            torch.testing.assert_close(a, b)


def test_retain_graph_runs_the_backward_twice(bk: Harness) -> None:
    import torch

    x = torch.tensor([-1.0, 0.0, -150.0, 0.5], requires_grad=True)
    value, _ = rg.L2(center="mean", clip=(-100.0, 0.0))(x)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x)
    assert torch.equal(first, second)


def test_torch_compile_fullgraph_with_gradients(bk: Harness) -> None:
    """Under torch.compile the node steps aside and the compiler traces the generic path:
    fullgraph traces, and value, metrics and gradients equal eager's (the routed node)."""
    import torch

    pipe = rg.Pipeline(
        [(rg.L1(mask=rg.Field("w")), 1e-3), (rg.L2(center="mean", clip=(-100.0, 0.0)), 1e-4)],
        metrics="array",
    )
    data = {"w": [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0])]}

    def run(fn: Any) -> Any:
        xs = [
            torch.tensor([-1.0, -300.0, 0.0], requires_grad=True),
            torch.tensor([-2.0, -0.5], requires_grad=True),
        ]
        loss, metrics = fn(data, xs)
        loss.backward()
        return loss.detach(), rg.to_floats(metrics), [x.grad for x in xs]

    compiled = torch.compile(lambda d, xs: pipe(d, xs), fullgraph=True, backend="eager")
    loss, metrics, grads = run(compiled)
    want_loss, want_metrics, want_grads = run(pipe)
    assert loss.item() == pytest.approx(want_loss.item())
    assert metrics == pytest.approx(want_metrics)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    reg = rg.L2(center="mean", clip=(-100.0, 0.0), reduce="mean")
    x = torch.tensor([-1.0, -3.0, -float("inf"), 0.0], requires_grad=True)
    value, _ = torch.compile(lambda a: reg.compute(None, a), fullgraph=True, backend="eager")(x)
    value.backward()
    assert x.grad.tolist() == pytest.approx([12.5, 11.5, 0.0, 13.0])


def test_an_input_modified_in_place_before_backward_is_refused(bk: Harness) -> None:
    """The closed form reads the forward pass's values at backward time, as autograd's saved
    tensors do; an in-place change in between is an error, as it is for autograd."""
    import torch

    for reg in (rg.L1(), rg.L2(clip=(-100.0, 0.0)), rg.Entropy()):
        x = torch.randn(4, 6) if isinstance(reg, rg.Entropy) else torch.randn(6)
        x.requires_grad_(True)
        y = x * 1.0  # a non-leaf: in-place changes are allowed on it
        value, _ = reg(y)
        assert value.grad_fn.name() == ROUTED
        with torch.no_grad():
            y.add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            value.backward()


@pytest.mark.parametrize("case", ["logprobs", "zeros", "positive first", "positive later", "nan"])
def test_l1_of_logprobs_is_a_negated_sum(
    bk: Harness, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's L1 value and metrics (no gradient) of an input whose elements are all <= 0
    is ``0 - Σx`` block by block, bit for bit Σ|x| by ``|x|``'s blocks (+0 for zeros); an
    element > 0 or a NaN, in the first block or a later one, takes ``|x|``: the value is
    the generic path's either way."""
    import torch

    from regularizers._fastpath import torch_fused

    monkeypatch.setattr(torch_fused, "BLOCK", 1000)
    rng = np.random.default_rng(11)
    n = torch_fused.SMALL + 27  # (up to SMALL, one vector_norm: no blocks)
    x = torch.as_tensor(-rng.gamma(0.6, 1.8, size=n).astype(np.float32))
    if case == "zeros":
        x = torch.zeros(n)
    at = {"positive first": 5, "positive later": n - 100, "nan": n - 100}.get(case)
    if at is not None:
        x[at] = math.nan if case == "nan" else 0.5
    got = torch_fused._negated_sum(x, x.dtype)
    if case in ("logprobs", "zeros"):
        by_abs = torch.stack([x[i : i + 1000].abs().sum() for i in range(0, n, 1000)]).sum()
        assert got is not None
        assert torch.equal(got, by_abs)
        assert not got.signbit()
    else:
        assert got is None
    value, metrics = rg.L1().compute(None, x)
    with generic_path():
        want, want_metrics = rg.L1().compute(None, x)
    torch.testing.assert_close(value, want, rtol=2e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(metrics["l1_mean"], want_metrics["l1_mean"], equal_nan=True)


@pytest.mark.parametrize("own", [False, True])
def test_the_masks_floats_follow_the_mask(bk: Harness, own: bool) -> None:
    """The mask as the values' floats, made once where ``prepare`` counts it (``Batch._keep``,
    for the kernels that zero by their product; ``own``: a kernel that masks what it
    derives, whose values stay as they are), is the mask's own; a restricted Batch (tokens
    a penalty finds invalid) keeps none, so what it zeroes follows its own mask."""
    import torch

    from regularizers._fastpath.torch_autograd import _as_they_are
    from regularizers._fastpath.torch_fused import SMALL, zero_uncounted

    rng = np.random.default_rng(3)
    n = 2 * SMALL
    x = torch.as_tensor(rng.normal(size=n), device=TORCH_DEVICE)
    mask = torch.as_tensor(rng.random(n) < 0.7, device=TORCH_DEVICE)
    zero = _as_they_are if own else zero_uncounted
    batch = rg.L1().prepare(None, x, mask=mask, _zero=zero)
    assert torch.equal(batch.values, x if own else torch.where(mask, x, 0.0))
    if x.device.type == "cpu":
        assert torch.equal(batch._keep, mask.to(x.dtype))
    else:  # (the where: no floats made)
        assert batch._keep is None
    valid = torch.as_tensor(rng.random(n) < 0.8, device=TORCH_DEVICE)
    restricted = batch.restrict(valid)
    a = torch.as_tensor(rng.normal(size=n), device=TORCH_DEVICE)
    got = zero_uncounted(a.clone(), restricted.mask, True, restricted._keep)
    assert torch.equal(got, torch.where(mask & valid, a, 0.0))


@pytest.mark.parametrize("n", [0, 1, 1000, 35422])
def test_all_valid_is_all(bk: Harness, n: int) -> None:
    """``all_valid`` (read on the host by the training path, so that a call whose tokens are
    all valid keeps an unrestricted Batch) is ``all()`` of a boolean ``[n]`` tensor on the
    CPU, wherever a False is; elsewhere (another device) False, without a read."""
    import torch

    from regularizers._fastpath.torch_fused import all_valid

    valid = torch.ones(n, dtype=torch.bool, device=TORCH_DEVICE)
    on_cpu = valid.device.type == "cpu"
    assert all_valid(valid) is on_cpu
    for i in sorted({0, n // 2, n - 1}) if n else []:
        some = valid.clone()
        some[i] = False
        assert all_valid(some) is False
    assert all_valid(valid[: n // 2]) is on_cpu  # (a view)


@pytest.mark.parametrize(
    "case",
    [
        "ragged",  # the Tinker batch's shape: 64 tensors, 35K elements, two groups
        "one long",  # a tensor of _GRAIN elements or more among short ones: a group alone
        "many groups",  # close to _CHUNKED
        "bool",  # a mask
        "equal",  # equal lengths: torch.cat itself
        "dtypes",  # float32 and float64: torch.cat's promotion
        "small",  # under _GRAIN: torch.cat itself
        "grad",  # autograd records: torch.cat itself
    ],
)
def test_torch_cat_is_torch_cat(bk: Harness, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """``backends.torch_cat`` equals ``torch.cat`` (values, dtype, shape; a fresh tensor,
    the inputs untouched), by groups of fewer than ``_GRAIN`` elements written into one
    result where it takes them (counted by a spy on ``torch.cat``'s ``out=`` calls), and by
    ``torch.cat`` itself where it should not."""
    import torch

    from regularizers._core import backends

    rng = np.random.default_rng(len(case))
    lengths = [int(n) for n in rng.integers(64, 1025, size=64)]
    if case == "one long":
        lengths[30] = backends._GRAIN + 5
    elif case == "many groups":
        lengths = [int(n) for n in rng.integers(100, 3000, size=80)]
    elif case == "equal":
        lengths = [600] * 64
    elif case == "small":
        lengths = lengths[:20]
    arrays = [torch.asarray(rng.normal(size=n).astype(np.float32)) for n in lengths]
    if case == "bool":
        arrays = [a > 0 for a in arrays]
    if case == "dtypes":
        arrays[5] = arrays[5].double()
    copies = [a.clone() for a in arrays]
    grouped = case in ("ragged", "one long", "many groups", "bool")
    want = torch.cat(arrays)
    calls: list[int] = []
    real = torch.cat

    def spy(tensors: Any, *args: Any, **kw: Any) -> Any:
        calls.append(int("out" in kw))
        return real(tensors, *args, **kw)

    monkeypatch.setattr(torch, "cat", spy)
    if case == "grad":
        arrays[3].requires_grad_(True)
        got = backends.torch_cat(arrays, lengths)
        assert got.requires_grad
        assert calls == [0]
    else:
        with torch.no_grad():
            got = backends.torch_cat(arrays, lengths, torch.bool if case == "bool" else None)
    assert sum(lengths) <= backends._CHUNKED
    ok = torch.get_num_threads() > 1
    assert (sum(calls) >= 2) is (grouped and ok), calls
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got.detach(), want)
    for a, c in zip(arrays, copies, strict=True):
        assert torch.equal(a.detach(), c)


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("special", [None, "inf masked", "nan masked", "inf counted"])
@pytest.mark.parametrize("shape", ["small", "one more", "large", "rows"])
def test_zero_uncounted_is_the_where(bk: Harness, shape: str, special: Any, fresh: bool) -> None:
    """``zero_uncounted`` (the training path's ``where(mask, a, 0)``: one ``where`` up to
    ``SMALL`` elements, above it a product by the mask's bytes checked for finiteness) is
    the ``where`` bit for bit on either side of ``SMALL``, with an inf or NaN under the mask
    or counted, over a ``[n]`` or ``[n, V]`` array; it writes into ``a`` only where told.
    ``zero_uncounted_sum`` gives the same array and its sum (the check's own, where made)."""
    import torch

    from regularizers._fastpath.torch_fused import SMALL, zero_uncounted, zero_uncounted_sum

    n, tail = {"small": (SMALL, ()), "one more": (SMALL + 1, ()), "large": (3 * SMALL, ())}.get(
        shape, (SMALL // 4 + 1, (8,))
    )
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(size=(n, *tail)).astype(np.float32)).to(TORCH_DEVICE)
    mask = torch.from_numpy(rng.random(n) < 0.7).to(TORCH_DEVICE)
    mask[:2] = torch.tensor([False, True])
    if special is not None:
        a[0 if "masked" in special else 1] = float("nan") if "nan" in special else float("inf")
    expected = torch.where(mask.reshape((-1,) + (1,) * len(tail)), a, 0.0)
    before = a.clone()
    twin = a.clone()
    got = zero_uncounted(a, mask, fresh)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    if not fresh:
        torch.testing.assert_close(a, before, rtol=0, atol=0, equal_nan=True)
    got, total = zero_uncounted_sum(twin, mask, fresh)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(total, expected.sum(), rtol=0, atol=0, equal_nan=True)
    if not fresh:
        torch.testing.assert_close(twin, before, rtol=0, atol=0, equal_nan=True)


# ---- the penalties over a class axis (torch_distributions) ----------------------------------
CLASS_AXIS = ("entropy", "kl", "jsd", "z_loss")


@st.composite
def class_axis_regularizers(draw: st.DrawFn) -> rg.Regularizer:
    how = draw(st.sampled_from(REDUCES))
    opts: dict[str, Any] = {"reduce": how}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0, 512.0]))
    kind = draw(st.sampled_from(CLASS_AXIS))
    if kind == "z_loss":
        return rg.ZLoss(**opts)
    opts["temperature"] = draw(S.temperatures())
    if kind == "entropy":
        return rg.Entropy(
            mode=draw(st.sampled_from(["minimize", "maximize"])),
            normalize=draw(st.booleans()),
            threshold=draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5]))),
            **opts,
        )
    if kind == "kl":
        direction = draw(st.sampled_from(["reverse", "forward", "symmetric"]))
        return rg.KL(rg.Field("ref"), direction=direction, **opts)
    beta = draw(st.sampled_from([0.5, 0.1, 0.9, 0.015625]))
    return rg.JSD(rg.Field("ref"), beta=beta, **opts)


@st.composite
def class_axis_batches(draw: st.DrawFn) -> tuple[Any, Any, str, Any, Any]:
    """``(x, ref, kind, mask, counts)``: scores ``[T, V]``, ``[B, T, V]`` or a ragged list of
    ``[T_i, V]`` with -inf classes and rows of all -inf, a reference (the same distribution,
    the same -inf classes, or its own), and maybe a mask whose masked rows hold ±inf/NaN in
    the scores and in the reference."""
    classes = draw(st.integers(1, 9))
    layout = draw(st.sampled_from(["list", "2d", "3d"]))
    if layout == "list":
        shapes = [(draw(st.integers(0, 6)), classes) for _ in range(draw(st.integers(1, 4)))]
        if not any(s[0] for s in shapes):
            shapes[0] = (1, classes)
    elif layout == "2d":
        shapes = [(draw(st.integers(1, 12)), classes)]
    else:  # [B, T, V]: drawn as [B·T, V] rows, reshaped below
        stack = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
        shapes = [(stack[0] * stack[1], classes)]
    x = draw(S.scores(shapes))
    ref = draw(S.paired_scores(x))
    kind = draw(st.sampled_from(["none", "array", "field"]))
    mask = None
    if kind != "none":
        mask = [draw(hnp.arrays(np.bool_, a.shape[:-1])) for a in x]
        if draw(st.booleans()):  # what a masked token holds never counts
            hidden = st.sampled_from([np.inf, -np.inf, np.nan])
            for arrays in (x, ref):
                for a, m in zip(arrays, mask, strict=True):
                    off = ~m
                    if off.any():
                        cells = (int(off.sum()), a.shape[-1])
                        a[off] = draw(hnp.arrays("float64", cells, elements=hidden))
    counts = None
    if draw(st.integers(0, 4)) == 0:
        counts = {"tokens": draw(st.integers(1, 50)), "sequences": draw(st.integers(1, 6))}
    if layout != "list":
        x, ref, mask = x[0], ref[0], None if mask is None else mask[0]
        if layout == "3d":
            x, ref = x.reshape(*stack, classes), ref.reshape(*stack, classes)
            mask = None if mask is None else mask.reshape(stack)
    return x, ref, kind, mask, counts


@given(reg=class_axis_regularizers(), case=class_axis_batches(), data=st.data())
def test_fused_class_axis_penalties_equal_the_generic_path(
    bk: Harness, reg: rg.Regularizer, case: Any, data: st.DataObject
) -> None:
    """Entropy, KL, JSD and ZLoss by their kernels, their arrays kept or (``blocked``)
    recomputed block by block in the backward pass, the rows to fix found as indices or
    not (``indexed``), built on torch's fused softmax kernels or not or as each chooses
    (``fused``): -inf
    classes, rows of all -inf, support gaps, masked rows holding ±inf/NaN, every
    ``reduce``, ``counts``, half precision."""
    from regularizers._fastpath import torch_distributions

    x, ref, kind, mask, counts = case
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]), label="dt")
    blocked = data.draw(st.booleans(), label="blocked")
    indexed = data.draw(st.booleans(), label="indexed")
    fused = data.draw(st.sampled_from([True, False, None]), label="fused")
    triton = _triton_runs() and data.draw(st.booleans(), label="triton")
    xs, refs = _cast(x, dtype), _cast(ref, dtype)
    d, m = _mask_args(kind, mask)
    d = {**(d or {}), "ref": refs}
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
        # torch's fused softmax kernels (a GPU's form), the log-normalization step by step,
        # or each kernel's own choice (None: Entropy's log_softmax where it keeps its arrays)
        mp.setattr(torch_distributions, "SOFTMAX", fused)
        # reverse KL of float32 rows by the Triton kernels (on a GPU, or their interpreter)
        ran = _triton_spy(mp, triton)
        if blocked:  # the large-input path: nothing kept, blocks of a few rows
            mp.setattr(torch_distributions, "KEEP", 0)
            for name in ("BLOCK", "DEVICE_BLOCK"):  # (the CPU's, and a GPU's)
                mp.setattr(torch_distributions, name, 2 * _listed(x)[0].shape[-1])
        if not indexed:  # the rows to fix by full-size kernels (as on a GPU: no host sync)
            mp.setattr(torch_distributions, "INDEXED", False)
        got, want = _routed_and_generic(mp, reg, (d, xs, m, counts), True)
    kl = reg.name == "kl" and reg.direction == "reverse"
    takes = triton and (kl or reg.name in ("jsd", "entropy")) and dtype != "float64"
    if takes:  # forward and backward, through compute and through value_and_grad
        name = "kl" if kl else reg.name
        assert ran == [f"{name}_forward", f"{name}_backward"] * 2, ran
    else:
        assert not ran, ran
    (value, metrics, grads), (want_value, want_metrics, want_grads) = got, want
    rtol = 1e-9 if dtype == "float64" else 1e-4
    grtol = {"float16": 1e-2, "bfloat16": 1e-1}.get(dtype, rtol * 10)
    for k, got, want in [("value", value, want_value)] + [
        (k, metrics[k], want_metrics[k]) for k in metrics
    ]:
        w = float(want.detach())
        _close(got, want, rtol, rtol * (max(1.0, abs(w)) if np.isfinite(w) else 1.0), k)
    gscale = max(
        [1.0] + [float(g.detach().abs().nan_to_num().max()) for g in want_grads if g.numel()]
    )
    _close(grads, want_grads, grtol, grtol * gscale, "gradient")


def _triton_runs() -> bool:
    """Whether the Triton kernels of KL can run here: ``triton`` imports, and the tests'
    device is a GPU or Triton's interpreter is on (``TRITON_INTERPRET=1``, as the ``triton``
    nox session sets it)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return str(TORCH_DEVICE).startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_spy(mp: pytest.MonkeyPatch, on: bool) -> list[str]:
    """``torch_triton.TRITON`` set to ``on`` (False: never, whatever the device), and the
    names of its kernels that ran."""
    from regularizers._fastpath import torch_triton

    mp.setattr(torch_triton, "TRITON", on)
    ran: list[str] = []
    names = ("kl", "jsd", "entropy")
    for name in [f"{n}_{way}" for n in names for way in ("forward", "backward")]:
        real = getattr(torch_triton, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            ran.append(_name)
            return _real(*args)

        mp.setattr(torch_triton, name, spy)
    return ran


@pytest.mark.parametrize("penalty", ["kl", "jsd", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduce", ["mean", "seq-mean-token-mean"])
def test_class_axis_penalties_by_the_triton_kernels(
    bk: Harness, penalty: str, temperature: float, reduce: str
) -> None:
    """Reverse KL, JSD and Entropy of float32 rows by the Triton kernels equal the torch
    kernels and the generic path: rows of 5000 classes (two of the kernels' blocks of 4096,
    the maximum of a row in either), -inf classes in either block, a class -inf in the
    reference only (KL's support gap), a row of all -inf, NaN and +inf in masked rows and in
    counted ones (a NaN beside a gap: NaN); Entropy with a threshold (a slope per row) too."""
    import torch

    if not _triton_runs():
        pytest.skip("Triton cannot run here: no triton, or neither a GPU nor its interpreter")
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(9, 5000, generator=gen) * 3
    r = z + torch.randn(9, 5000, generator=gen)
    z[0, 4500] = 40.0  # the maximum in the second block
    z[1, 10] = 40.0  # in the first
    z[2, 4100:4200] = -float("inf")
    r[2, 10:20] = -float("inf")
    z[2, 10:20] = -float("inf")  # -inf in both: no gap
    r[3, 4300] = -float("inf")  # a support gap: KL +inf
    z[4] = -float("inf")  # a row of all -inf (not counted)
    z[5, 7] = float("nan")
    r[5, 4400] = -float("inf")  # beside the NaN: a gap, but the row's KL is NaN
    r[6, 9] = float("inf")
    z[7, 3] = float("nan")  # never counted
    # counted: the finite rows (a finite value); then the gap's row too (+inf); then NaN's
    for counted in ([0, 1, 2, 8], [0, 1, 2, 3, 8], [0, 1, 2, 3, 5, 8], [0, 1, 2, 3, 5, 6, 8]):
        m = torch.zeros(9, dtype=torch.bool)
        m[counted] = True
        args = ({"ref": r.to(TORCH_DEVICE), "m": m.to(TORCH_DEVICE)}, z.to(TORCH_DEVICE))
        opts = {"temperature": temperature, "reduce": reduce, "mask": rg.Field("m")}
        if penalty == "kl":
            reg: rg.Regularizer = rg.KL(rg.Field("ref"), **opts)
        elif penalty == "jsd":
            reg = rg.JSD(rg.Field("ref"), beta=0.3, **opts)
        else:  # (a hinge at 3 nats: the rows of a 40 below it, the others above)
            reg = rg.Entropy(threshold=3.0 if reduce == "mean" else None, **opts)
        with pytest.MonkeyPatch.context() as mp, np.errstate(all="ignore"):
            ran = _triton_spy(mp, True)
            got = _autograd(reg, *args, None, None)
            assert ran == [f"{penalty}_forward", f"{penalty}_backward"], ran
        with pytest.MonkeyPatch.context() as mp:
            _triton_spy(mp, False)
            torch_kernels = _autograd(reg, *args, None, None)
        with generic_path():
            want = _autograd(reg, *args, None, None)
        value = float(got[0].detach())
        nan = 5 in counted and not (penalty == "entropy" and reduce == "mean")  # (the hinge's 0)
        assert np.isnan(value) == nan
        assert np.isfinite(value) == (not nan and (penalty != "kl" or 3 not in counted))
        for other in (torch_kernels, want):
            _close(got[0], other[0], 1e-5, 1e-6, "value")
            for k in other[1]:
                _close(got[1][k], other[1][k], 1e-5, 1e-6, k)
            # (at a row's top class p ≈ 1 and log p - log q - KL cancels: what is left is the
            # rounding of lse at logits of 40/T, ulp(40) = 3.8e-6, times the reduce weight)
            _close(got[2], other[2], 1e-5, 4e-6 / temperature, "gradient")
        g = got[2][0]
        if penalty == "kl":  # (the gap's row: KL +inf, no gradient)
            assert bool((g[3] == 0).all())
        assert bool((g[~m.to(g.device)] == 0).all())
        assert bool(torch.isfinite(g[[0, 1, 2, 8]]).all())


@pytest.mark.parametrize("penalty", ["kl", "jsd", "entropy"])
@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_where_the_triton_kernels_cannot_run(
    bk: Harness, penalty: str, fails: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Triton kernel that cannot run (a GPU older than Triton supports, a broken install)
    is said once in a RuntimeWarning, and the torch kernels serve the call and every later
    one: after the forward's failure from the start; after the backward's, from what the
    Triton forward kept (its ``lse``; stand-in kernels here, so that this runs without
    Triton)."""
    import torch

    from regularizers._fastpath import torch_triton

    inf = float("inf")
    low = -torch.finfo(torch.float32).max

    def failing(*args: Any, **meta: Any) -> None:
        raise RuntimeError("no kernel image for this device")

    def kl(z: Any, r: Any, kl: Any, lse: Any, gap: Any, *args: Any, **meta: Any) -> None:
        x, y = z / args[3], r / args[3]
        lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        lse[:, 0], lse[:, 1] = torch.logsumexp(x, -1), torch.logsumexp(y, -1)
        kl.copy_((lp.exp() * (lp.clamp_min(low) - lq.clamp_min(low))).sum(-1))
        gap.copy_(((z != -inf) & (r == -inf)).any(-1))

    def jsd(z: Any, r: Any, kl: Any, lse: Any, *args: Any, **meta: Any) -> None:
        t, log_b, log_1b = args[3], args[4], args[5]
        lp, lq = torch.log_softmax(z / t, -1), torch.log_softmax(r / t, -1)
        lse[:, 0], lse[:, 1] = torch.logsumexp(z / t, -1), torch.logsumexp(r / t, -1)
        lm = torch.logaddexp(lq + log_b, lp + log_1b).clamp_min(low)
        kl[:, 0] = (lp.exp() * (lp.clamp_min(low) - lm)).sum(-1)
        kl[:, 1] = (lq.exp() * (lq.clamp_min(low) - lm)).sum(-1)

    def entropy(z: Any, h: Any, lse: Any, *args: Any, **meta: Any) -> None:
        lp = torch.log_softmax(z / args[2], -1)
        h.copy_(-(lp.exp() * lp.clamp_min(low)).sum(-1))
        lse[:, 0] = torch.logsumexp(z / args[2], -1)

    class Grid:  # what ``kernel[grid]`` gives: the launcher
        def __init__(self, run: Any) -> None:
            self.run = run

        def __getitem__(self, grid: Any) -> Any:
            return self.run

    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 10, generator=gen) * 3).to(TORCH_DEVICE)
    r = (z + torch.randn(6, 10, generator=gen).to(TORCH_DEVICE)).contiguous()
    z[1, 2], r[2, 3] = -inf, -inf  # a -inf class; a support gap (its KL +inf)
    m = torch.ones(6, dtype=torch.bool, device=TORCH_DEVICE)
    m[2] = False  # (a finite value)
    opts = {"temperature": 0.5, "reduce": "mean", "mask": rg.Field("m")}
    reg = {
        "kl": lambda: rg.KL(rg.Field("ref"), **opts),
        "jsd": lambda: rg.JSD(rg.Field("ref"), beta=0.3, **opts),
        "entropy": lambda: rg.Entropy(**opts),
    }[penalty]()
    args = ({"ref": r, "m": m}, z, None, None)
    with generic_path():
        want = _autograd(reg, *args)
    forward = {"kl": kl, "jsd": jsd, "entropy": entropy}[penalty]
    kernels = [Grid(failing)] * 6
    if fails == "backward":
        kernels[{"kl": 0, "jsd": 2, "entropy": 4}[penalty]] = Grid(forward)
    monkeypatch.setattr(torch_triton, "TRITON", True)
    monkeypatch.setattr(torch_triton, "_KERNELS", tuple(kernels))
    with pytest.warns(RuntimeWarning, match="Triton kernels of Entropy, KL and JSD cannot run"):
        got = _autograd(reg, *args)
    assert torch_triton._KERNELS is False
    assert not torch_triton.available(z, r)
    again = _autograd(reg, *args)  # (no warning: filterwarnings makes one an error)
    for result in (got, again):
        _close(result[0], want[0], 1e-5, 1e-6, "value")
        for k in want[1]:
            _close(result[1][k], want[1][k], 1e-5, 1e-6, k)
        _close(result[2], want[2], 1e-5, 1e-6, "gradient")


_COMPILE = """
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regularizers._fastpath import torch_triton

TYPES = {"keep_ptr": "*u8", "gap_ptr": "*i8", "size": "i32", "sz": "i32", "sr": "i32",
         "sg": "i32", "t": "fp32", "low": "fp32", "log_b": "fp32", "log_1b": "fp32"}
CHOICES = {"BLOCK": [16, 4096], "KEEP": [False, True], "C_ROWS": [False, True]}
for kernel in torch_triton._build():
    params = kernel.params
    consts = [p.name for p in params if p.is_constexpr]
    signature = {p.name: "constexpr" if p.is_constexpr else TYPES.get(
        p.name, "*fp32" if p.name.endswith("_ptr") else None) for p in params}
    assert None not in signature.values(), (kernel.__name__, signature)
    for values in itertools.product(*(CHOICES[c] for c in consts)):
        for arch in (80, 90):
            meta = dict(zip(consts, values))
            source = ASTSource(fn=kernel, signature=signature, constexprs=meta)
            done = triton.compile(source, target=GPUTarget("cuda", arch, 32))
            assert done.asm["cubin"], (kernel.__name__, meta, arch)
            print(kernel.__name__, arch, meta)
"""


def test_the_triton_kernels_compile_for_a_gpu(bk: Harness) -> None:
    """Every Triton kernel compiles to an A100's and an H100's machine code (sm_80, sm_90,
    by Triton's own ``ptxas``; no GPU needed) for each choice of its compile-time
    arguments: what the interpreter (``TRITON_INTERPRET=1``), which runs the kernels as
    Python, cannot show. In a process of its own, without the interpreter."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.split("\n")
    for name in ("kl_forward", "kl_backward", "jsd_forward", "jsd_backward", "entropy_forward"):
        assert any(line.startswith(name + " ") for line in lines), done.stdout
    # the backwards with and without the mask's bytes (KEEP), on both GPUs
    assert sum(line.startswith("entropy_backward ") for line in lines) == 2 * 2 * 2 * 2


@pytest.mark.parametrize("fused", [False, True, None])
@pytest.mark.parametrize("blocked", [False, True])
def test_class_axis_kernels_on_a_moved_axis_and_twice(
    bk: Harness, blocked: bool, fused: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``axis=0`` (the class axis moved last and back), and ``retain_graph``: the backward
    run twice gives the same gradient; each form of the kernels (``fused``: None is each
    kernel's own choice, Entropy's ``log_softmax`` where it keeps its arrays), with a -inf
    class, a row of all -inf and a temperature, equals the generic path."""
    import torch

    from regularizers._fastpath import torch_distributions

    monkeypatch.setattr(torch_distributions, "SOFTMAX", fused)
    if blocked:
        monkeypatch.setattr(torch_distributions, "KEEP", 0)
        monkeypatch.setattr(torch_distributions, "BLOCK", 8)
        monkeypatch.setattr(torch_distributions, "DEVICE_BLOCK", 8)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64) * 3
    r = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64) * 3
    z[1, 2, :] = -float("inf")
    z[:, 3, 0] = -float("inf")  # a row of all -inf (along axis 0): not counted
    r[0, 1, 1] = -float("inf")
    for reg in (
        rg.Entropy(axis=0, mode="maximize", temperature=0.7),
        rg.KL(r, axis=0, direction="symmetric"),
        rg.JSD(r, axis=0, beta=0.25),
        rg.ZLoss(axis=0, reduce="mean"),
    ):
        x = z.clone().requires_grad_(True)
        value, _ = reg(x)
        assert value.grad_fn.name() == ROUTED
        (first,) = torch.autograd.grad(value, x, retain_graph=True)
        (second,) = torch.autograd.grad(value, x)
        assert torch.equal(first, second)
        with generic_path():
            want_value, _ = reg(x)
        (want,) = torch.autograd.grad(want_value, x)
        torch.testing.assert_close(value, want_value)
        torch.testing.assert_close(first, want)


def test_a_reference_modified_in_place_before_backward_is_refused(
    bk: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the backward recomputes from the reference (a large input), an in-place change
    of it in between is refused, as autograd refuses a changed saved tensor."""
    import torch

    from regularizers._fastpath import torch_distributions

    monkeypatch.setattr(torch_distributions, "KEEP", 0)
    for cls in (rg.KL, rg.JSD):
        r = torch.randn(4, 6)
        x = torch.randn(4, 6, requires_grad=True)
        value, _ = cls(r)(x)
        assert value.grad_fn.name() == ROUTED
        r.add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            value.backward()


def _both_paths(reg: Any, data: Any, x: Any, **kw: Any) -> Any:
    """``(value, metrics, grad)`` by the routed call and by the generic path (``x`` a leaf
    that requires grad; ``grad`` None where it does not)."""
    import torch

    out = []
    for generic in (False, True):
        with generic_path() if generic else contextlib.nullcontext():
            value, metrics = reg.compute(data, x, **kw)
            grad = torch.autograd.grad(value, x)[0] if x.requires_grad else None
        out.append((value, metrics, grad))
    return out


def _routed_as_generic(reg: Any, data: Any, x: Any, **kw: Any) -> Any:
    """:func:`_both_paths`, asserting that the routed call took the node and equals the
    generic path (value, metrics, gradient, dtypes included); its ``(value, metrics,
    grad)``."""
    (value, metrics, grad), (want, want_metrics, want_grad) = _both_paths(reg, data, x, **kw)
    assert value.grad_fn.name() == ROUTED
    _same(value, want)
    assert metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        _same(metrics[k], want_metrics[k])
    _same(grad, want_grad)
    return value, metrics, grad


def _same(got: Any, want: Any, rtol: float = 1e-5, atol: float = 0.0) -> None:
    """Equal dtype, and equal values to ``rtol`` (NaN where NaN, ±inf where ±inf)."""
    import torch

    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(),
        rg.L1(target="probs"),
        rg.L2(),
        rg.L2(center="mean"),
        rg.L2(center=0.5),
        rg.L2(clip=(-400.0, -0.25)),
        rg.L2(target="probs"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("n", [30, 5001])
def test_fused_compute_over_several_blocks(
    bk: Harness, monkeypatch: pytest.MonkeyPatch, reg: Any, dtype: str, n: int
) -> None:
    """The no-grad fused reductions (``torch_fused.l1``/``l2``) with ``BLOCK`` lowered so that
    the input spans several blocks, the last one short, and its extremes in that last block
    (every block counts, each for its size, in Chan's formula too); half precision in
    float32, with a max² beyond float16's range: value and metrics are the generic path's,
    dtypes included."""
    import torch

    from regularizers._fastpath import dispatch, torch_fused

    monkeypatch.setattr(torch_fused, "BLOCK", 7 if n < torch_fused.SMALL else 1000)
    rng = np.random.default_rng(n)
    a = -np.abs(rng.normal(0.0, 30.0, size=n))
    a[-1], a[-2] = -300.0, 0.0  # (the extremes, in the last block)
    x = torch.asarray(a, dtype=torch.float32, device=TORCH_DEVICE).to(getattr(torch, dtype))
    assert dispatch.try_compute(reg, x) is not None, "the fast path was not taken"
    (value, metrics, _), (want, want_metrics, _) = _both_paths(reg, None, x)
    _same(value, want, rtol=1e-4)
    assert metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        _same(metrics[k], want_metrics[k], rtol=1e-4)


@pytest.mark.parametrize("reg", [rg.L1(), rg.L2(), rg.ElasticNet(l1_ratio=0.5)], ids=repr)
def test_half_precision_plain_call_computes_in_float32(bk: Harness, reg: Any) -> None:
    """A plain float16 tensor that requires grad (the Batch-free call, ``compute_flat``)
    computes in float32, as the generic path does: a sum beyond float16's range is finite,
    and value and metrics are float32."""
    import torch

    x = torch.full((70000,), -1.0, dtype=torch.float16, device=TORCH_DEVICE)
    x.requires_grad_(True)
    _routed_as_generic(reg, None, x)


@pytest.mark.parametrize(
    "reg",
    [
        rg.L2(reduce="mean"),
        rg.L1(reduce="mean"),
        rg.Consistency(rg.Field("other"), reduce="mean"),
        rg.SampledKL(rg.Field("other"), reduce="mean"),
        rg.JSD(rg.Field("other"), beta=0.25, reduce="mean"),
        rg.KL(rg.Field("other"), reduce="mean"),
        rg.Entropy(reduce="mean"),
        rg.ZLoss(reduce="mean"),
    ],
    ids=repr,
)
def test_constants_are_made_per_dtype_and_device(bk: Harness, reg: Any) -> None:
    """The training path's constants (``torch_const.const``: ``reduce``'s 1/N, the count a
    mean divides by, the 2 of a squared slope, JSD's log β and its factors, the coefficient
    of a class-axis gradient) are 0-d tensors kept from call to call: calls
    of one size in float64, float32, then float64 again each get their own, so the value and
    metrics keep the call's dtype (a float64 constant would make a float32 call's 0-d results
    float64) and equal the generic path's, gradients included."""
    import torch

    rng = np.random.default_rng(3)
    shape = (3, 5) if reg.name in ("jsd", "kl", "entropy", "z_loss") else (7,)  # [T, V] rows
    a, b = -np.abs(rng.normal(size=shape)), -np.abs(rng.normal(size=shape))
    for dtype in (torch.float64, torch.float32, torch.float64):
        x = torch.asarray(a, dtype=dtype, device=TORCH_DEVICE).requires_grad_(True)
        data = {"other": torch.asarray(b, dtype=dtype, device=TORCH_DEVICE)}
        _routed_as_generic(reg, data, x)


def test_sampled_kl_k1_max_is_over_counted_tokens(bk: Harness) -> None:
    """SampledKL k1 with a mask: an uncounted token's log ratio is 0 in the kernel, and must
    not win the max over counted ones that are all negative."""
    import torch

    dev = TORCH_DEVICE
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0], device=dev, requires_grad=True)
    data = {"ref": torch.tensor([-0.5, -1.0, -3.5, 0.0], device=dev)}
    mask = torch.tensor([True, True, False, False], device=dev)
    reg = rg.SampledKL(estimator="k1", reference=rg.Field("ref"))
    _, metrics, _ = _routed_as_generic(reg, data, lp, mask=mask)
    assert float(metrics["sampled_kl_max"]) == -0.5


@pytest.mark.parametrize(
    "reg", [rg.L2(clip=(-3e38, 3e38)), rg.L2(clip=(-1.0, 1.0), center=-3e38)], ids=repr
)
def test_l2_gradient_outside_the_clip_where_it_overflows(bk: Harness, reg: Any) -> None:
    """L2's gradient is 0 strictly outside the clip range, also where ``2 d`` overflows to
    ±inf there (a product by 0 would be NaN)."""
    import torch

    x = torch.tensor([0.5, 5.0, -5.0, -math.inf, 0.25], device=TORCH_DEVICE)
    x.requires_grad_(True)
    (value, _, grad), (want, _, want_grad) = _both_paths(reg, None, x)
    assert value.grad_fn.name() == ROUTED
    _same(value, want)
    _same(grad, want_grad)


@pytest.mark.parametrize("first", [1e8, 0.1, math.inf])
def test_l2_mean_center_gradient_is_zero_at_uncounted_tokens(bk: Harness, first: float) -> None:
    """L2 ``center="mean"`` with a mask: the mean's share (0 but for rounding, NaN where the
    mean is) never reaches an uncounted token, whose gradient is exactly 0."""
    import torch

    dev = TORCH_DEVICE
    x = torch.tensor([first, 0.2, 0.7, -7.0, 2.0], device=dev, requires_grad=True)
    mask = torch.tensor([True, True, True, False, False], device=dev)
    (value, _, grad), (_, _, want_grad) = _both_paths(rg.L2(center="mean"), None, x, mask=mask)
    assert value.grad_fn.name() == ROUTED
    assert grad[3:].tolist() == [0.0, 0.0]
    _same(grad, want_grad)


@pytest.mark.parametrize("direction", ["reverse", "forward", "symmetric"])
def test_kl_support_gap_beside_a_nan(bk: Harness, direction: str) -> None:
    """Rows holding both a NaN and a -inf where the other row's class is finite (in the
    reference, then in ``z``), beside a true gap: the NaN wins (its row's KL and gradient
    are NaN, NaN + inf being NaN), the gap's row is +inf with gradient 0, and the kernel
    agrees with the generic path (a NaN must not hide the -inf from its quick test of the
    rows, nor a gap hide the NaN)."""
    import torch

    dev = TORCH_DEVICE
    nan, inf = math.nan, math.inf
    z = torch.tensor(
        [[0.0, 1.0, 2.0], [nan, -inf, 0.0], [0.5, 0.5, 0.5], [0.0, 1.0, -inf]],
        device=dev,
        requires_grad=True,
    )
    r = [[nan, -inf, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, -inf]]
    r[3 if direction == "forward" else 2] = [0.0, -inf, 1.0]  # the direction's true gap
    data = {"r": torch.tensor(r, device=dev)}
    reg = rg.KL(reference=rg.Field("r"), direction=direction)
    (value, metrics, grad), (want, want_metrics, want_grad) = _both_paths(reg, data, z)
    assert value.grad_fn.name() == ROUTED
    for k in want_metrics:
        _same(metrics[k], want_metrics[k])
    _same(value, want)
    _same(grad, want_grad, atol=1e-6)
    assert value.detach().isnan()
    assert grad[:2].isnan().all()
    gap = 3 if direction == "forward" else 2
    rows = [reg.compute({"r": data["r"][i : i + 1]}, z.detach()[i : i + 1])[0] for i in range(4)]
    assert [bool(v.isnan()) for v in rows] == [True, True, False, False]
    assert rows[gap] == inf
    if direction != "symmetric":  # (symmetric: the other direction's share is finite)
        assert (grad[gap] == 0).all()


@pytest.mark.parametrize("name", ["KL", "JSD", "Entropy"])
def test_a_second_backward_leaves_the_first_gradient_alone(bk: Harness, name: str) -> None:
    """``retain_graph``: the gradient of a first backward is the caller's; a second backward
    (here with another incoming gradient) writes into a buffer of its own, never into it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=gen).to(TORCH_DEVICE).requires_grad_(True)
    data = {"r": torch.randn(4, 5, generator=gen).to(TORCH_DEVICE)}
    reg = getattr(rg, name)(reference=rg.Field("r")) if name != "Entropy" else rg.Entropy()
    value, _ = reg.compute(data, z)
    assert value.grad_fn.name() == ROUTED
    (first,) = torch.autograd.grad(value, z, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(3.0 * value, z)
    assert torch.equal(first, kept)
    torch.testing.assert_close(second, 3.0 * kept)


def test_gradient_penalty_of_a_row_whose_squares_underflow(bk: Harness) -> None:
    """A row whose squares are subnormal (``Σ g²`` near 0, a norm far from 0): the gradient is
    the generic path's, whose norms are scaled (the fused kernel's unscaled ``Σ g²`` would
    lose most of its digits)."""
    import torch

    rows = [[3e-22, 1e-22, -2e-22], [0.5, 1.0, -2.0]]
    x = torch.tensor(rows, device=TORCH_DEVICE, requires_grad=True)
    (value, metrics, grad), (want, want_metrics, want_grad) = _both_paths(
        rg.GradientPenalty(), None, x
    )
    _same(value, want)
    for k in want_metrics:
        _same(metrics[k], want_metrics[k])
    _same(grad, want_grad)


@pytest.mark.parametrize(
    "reg",
    [rg.ElasticNet(l1_ratio=0.5), rg.Consistency(paired=rg.Field("y"), metric="l1")],
    ids=repr,
)
def test_sign_of_subnormals(bk: Harness, reg: Any) -> None:
    """The slope ``sign(v)`` is ±1 at subnormal ``v`` too (float32's least included)."""
    import torch

    dev = TORCH_DEVICE
    x = torch.tensor([1e-40, -1e-41, 0.0, 2.0, -1e-45], device=dev, requires_grad=True)
    data = {"y": torch.zeros(5, device=dev)}
    (value, _, grad), (_, _, want_grad) = _both_paths(reg, data, x)
    assert value.grad_fn.name() == ROUTED
    _same(grad, want_grad)


@pytest.mark.parametrize("normalize", [False, True])
def test_maximized_entropy_penalty_of_uniform_rows_is_not_negative(
    bk: Harness, normalize: bool
) -> None:
    """Entropy ``mode="maximize"`` with no threshold: the penalty ``log V - H`` is kept >= 0
    where rounding puts a uniform row's ``H`` above ``log V``."""
    import torch

    for size in range(2, 17):
        z = torch.zeros(4, size, device=TORCH_DEVICE, requires_grad=True)
        value, metrics = rg.Entropy(mode="maximize", normalize=normalize).compute(None, z)
        assert value.grad_fn.name() == ROUTED
        assert value.detach().item() >= 0.0, size
        assert metrics["entropy_raw"].item() >= 0.0, size


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize(
    "cls", [rg.L1, rg.L2, rg.Huber, rg.ElasticNet, rg.SampledEntropy], ids=lambda c: c.__name__
)
def test_empty_plain_tensor_that_requires_grad(bk: Harness, cls: Any, reduce: str) -> None:
    """An empty tensor that requires grad (the Batch-free call): value 0, every metric the
    generic path's (a mean over no token is 0, not NaN), and an empty gradient."""
    import torch

    x = torch.zeros(0, device=TORCH_DEVICE, requires_grad=True)
    (value, metrics, grad), (want, want_metrics, want_grad) = _both_paths(
        cls(reduce=reduce), None, x
    )
    _same(value, want)
    for k in want_metrics:
        _same(metrics[k], want_metrics[k])
    _same(grad, want_grad)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_l1_gradient_is_nan_at_nan(bk: Harness, reduce: str) -> None:
    """L1's slope ``sign(v)`` is NaN at a NaN ``v`` (``torch.sign`` would give 0 there)."""
    import torch

    x = torch.tensor([1.0, math.nan, -2.0, 0.0], device=TORCH_DEVICE, requires_grad=True)
    (value, _, grad), (_, _, want_grad) = _both_paths(rg.L1(reduce=reduce), None, x)
    assert value.grad_fn.name() == ROUTED
    assert math.isnan(grad[1].item())
    _same(grad, want_grad)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_sampled_kl_metrics_with_and_without_a_mask(
    bk: Harness, estimator: str, masked: bool
) -> None:
    """SampledKL's fused kernel: every metric (``log_ratio_mean`` included, whose sign the k3
    form's ``r - lp`` reverses) and the gradient are the generic path's."""
    import torch

    dev = TORCH_DEVICE
    lp = torch.tensor([-1.0, -2.0, -3.0, -0.25], device=dev, requires_grad=True)
    data = {"ref": torch.tensor([-0.5, -1.0, -3.5, -2.0], device=dev)}
    kw = {"mask": torch.tensor([True, True, True, False], device=dev)} if masked else {}
    reg = rg.SampledKL(estimator=estimator, reference=rg.Field("ref"))
    _routed_as_generic(reg, data, lp, **kw)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("cls", [rg.L1, rg.L2, rg.ElasticNet], ids=lambda c: c.__name__)
def test_counts_of_a_ragged_list_on_the_concatenation(bk: Harness, cls: Any, reduce: str) -> None:
    """A ragged list with ``counts`` (the whole batch's, larger than this call's): the call
    prepared on the list's concatenation divides by the counts, as the generic path does."""
    import torch

    dev = TORCH_DEVICE
    counts = {"tokens": torch.tensor(10, device=dev), "sequences": torch.tensor(4, device=dev)}
    out = []
    for generic in (False, True):
        xs = [
            torch.tensor([-1.0, -2.0], device=dev, requires_grad=True),
            torch.tensor([-3.0], device=dev, requires_grad=True),
        ]
        with generic_path() if generic else contextlib.nullcontext():
            value, metrics = cls(reduce=reduce).compute(None, xs, counts=counts)
            grads = torch.autograd.grad(value, xs)
        out.append((value, metrics, grads))
    (value, metrics, grads), (want, want_metrics, want_grads) = out
    assert value.grad_fn.name() == ROUTED
    _same(value, want)
    for k in want_metrics:
        _same(metrics[k], want_metrics[k])
    for a, b in zip(grads, want_grads, strict=True):
        _same(a, b)


@pytest.mark.parametrize("data", [3.0, "arrays"])
def test_ragged_list_checks_its_data(bk: Harness, data: Any) -> None:
    """A ragged list whose term is prepared on the concatenation (``mask=None`` given) still
    checks ``data``: arrays where data belongs (swapped arguments) or a float is refused."""
    import torch

    xs = [torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)]
    bad = [torch.tensor([1.0])] if data == "arrays" else data
    for generic in (False, True):
        context = generic_path() if generic else contextlib.nullcontext()
        with context, pytest.raises(TypeError, match="data"):
            rg.L1().compute(bad, xs, mask=None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_z_loss_log_sum_exp_of_each_kind_of_row(bk: Harness, dtype: str) -> None:
    """ZLoss's row log-sum-exp (``torch_distributions._logsumexp``) is the generic path's
    ``m + log Σ exp(z - m)``, row by row: finite rows as ``torch.logsumexp`` (to rounding),
    -inf for a row of all -inf (not the NaN of ``-inf - -inf``), NaN where a row holds +inf
    or NaN; a -inf class is exp 0, and rows at the largest float stay finite."""
    import torch

    from regularizers._fastpath.torch_distributions import _logsumexp

    top = float(torch.finfo(getattr(torch, dtype)).max)
    inf, nan = math.inf, math.nan
    rows = [
        [0.5, -1.0, 2.0, 3.0],
        [-inf, -inf, -inf, -inf],
        [1.0, inf, 0.0, -inf],
        [1.0, nan, 0.0, 2.0],
        [-inf, 1.0, -inf, 0.0],
        [top, top, top, top],
    ]
    z = torch.tensor(rows, dtype=getattr(torch, dtype), device=TORCH_DEVICE)
    got = _logsumexp(z)
    assert got.shape == (6, 1)
    want = torch.logsumexp(z[[0, 4, 5]], -1, keepdim=True)
    torch.testing.assert_close(got[[0, 4, 5]], want)
    assert got[1, 0].item() == -inf
    assert math.isnan(got[2, 0].item())
    assert math.isnan(got[3, 0].item())
    assert got[5, 0].item() == top
