"""NumPy's fused ``value_and_grad`` (``numpy_blocked.GRAD``) equals the generic closed form.

Hypothesis draws the regularizer (L1, L2, Huber, ElasticNet with every option: target,
clip, center, each ``reduce`` mode), the input (one array, rows, ragged lists; float16,
float32, float64; the kinks 0, the clip bounds exactly, ±δ for Huber; ±inf and NaN, also
in masked entries; empty arrays), masks, ``counts`` and the block size (a few elements, so
that merging blocks is exercised). Values, metrics and gradients must equal the generic
path's (``regularizers.testing.generic_path()``) to the dtype's tolerance, NaN where it is
NaN, and the fused kernel must really have run (a spy on the kernel table).
"""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import regularizers as rg
from regularizers._fastpath import dispatch as _fastpath
from regularizers._fastpath import numpy_blocked as _native
from regularizers._fastpath import numpy_direct as _direct
from regularizers.testing import generic_path

from . import strategies as S

Harness = Any
pytestmark = pytest.mark.backends("numpy")

REDUCES = ("sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@st.composite
def regularizers(draw: st.DrawFn) -> rg.Regularizer:
    kind = draw(st.sampled_from(["l1", "l2", "huber", "elastic_net"]))
    how = draw(st.sampled_from(REDUCES))
    opts: dict[str, Any] = {"reduce": how, "target": draw(st.sampled_from(["logprobs", "probs"]))}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0, 64.0]))
    if kind == "l1":
        return rg.L1(**opts)
    opts["clip"] = draw(S.clips())
    opts["center"] = draw(S.centers())
    if kind == "l2":
        return rg.L2(**opts)
    if kind == "huber":
        return rg.Huber(delta=draw(st.sampled_from([0.5, 1.0, 3.0])), **opts)
    return rg.ElasticNet(l1_ratio=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), **opts)


def kinks(reg: rg.Regularizer) -> list[float]:
    """The points where the gradient has a kink: 0, the clip bounds, center ± δ."""
    out = [0.0, -0.0]
    clip = getattr(reg, "clip", None)
    if clip is not None:
        out += [b for b in clip if b is not None]
    center = getattr(reg, "center", None)
    c = center if isinstance(center, float) else 0.0
    out.append(c)
    delta = getattr(reg, "delta", None)
    if delta is not None:
        out += [c + delta, c - delta]
    return out


SPECIALS = [np.inf, -np.inf, np.nan]


@st.composite
def inputs(draw: st.DrawFn, reg: rg.Regularizer) -> tuple[Any, Any]:
    """``(x, mask)``: an array or a ragged list of arrays, and a mask shaped like it or None.

    Masked entries may hold ±inf or NaN whatever the rest holds: they must stay inert."""
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    exact = [k for k in kinks(reg) if np.isfinite(np.asarray(k, dtype=dtype))]
    elements = st.one_of(S.elements(-150.0, 10.0), st.sampled_from(exact))
    nonfinite = draw(st.integers(0, 4)) == 0
    if nonfinite:
        elements = st.one_of(elements, st.sampled_from(SPECIALS))
    size = st.integers(0, 300) if draw(st.integers(0, 4)) == 0 else st.integers(0, 30)
    shape = draw(st.sampled_from(["flat", "rows", "list"]))
    if shape == "rows":
        rows, cols = (
            draw(st.integers(1, 5)),
            draw(st.integers(0, 12)),
        )  # seq-mean-token-mean fails on 0 rows, generic too
        arrays = [draw(hnp.arrays("float64", (rows, cols), elements=elements))]
    else:
        count = draw(st.integers(1, 4)) if shape == "list" else 1
        arrays = [draw(hnp.arrays("float64", draw(size), elements=elements)) for _ in range(count)]
    arrays = [a.astype(dtype) for a in arrays]
    mask = None
    if draw(st.booleans()):
        mask = [draw(hnp.arrays(np.bool_, a.shape)) for a in arrays]
        poison = draw(st.sampled_from(SPECIALS))
        for a, m in zip(arrays, mask, strict=True):
            if draw(st.booleans()):
                a[~m] = poison  # masked entries: ±inf or NaN, which must not leak
    if shape == "list":
        return arrays, mask
    return arrays[0], None if mask is None else mask[0]


def counts_for(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 3)):
        return None
    return {"tokens": draw(st.integers(0, 500)), "sequences": draw(st.integers(0, 9))}


def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each kernel of ``GRAD`` that runs and returns a result ("small" for the path
    of one small array, before any Batch)."""
    ran: list[str] = []
    for name, kernel in list(_native.GRAD.items()):

        def recorded(*args: Any, _name: str = name, _kernel: Any = kernel) -> Any:
            got = _kernel(*args)
            if got is not None:
                ran.append(_name)
            return got

        monkeypatch.setitem(_native.GRAD, name, recorded)

    def recording(f: Any, label: str, per_term: bool) -> Any:
        def path(*args: Any) -> Any:
            got = f(*args)
            if got is not None:  # (a Pipeline's terms: one result per term)
                ran.extend([label] * (len(got[0]) if per_term else 1))
            return got

        return path

    small = recording(_native.small_value_and_grad, "small", False)
    monkeypatch.setattr(_native, "small_value_and_grad", small)
    monkeypatch.setattr(
        _direct, "value_and_grad", recording(_direct.value_and_grad, "direct", False)
    )
    monkeypatch.setattr(_direct, "terms", recording(_direct.terms, "direct", True))
    return ran


def single_weight(reg: rg.Regularizer, x: Any, mask: Any) -> bool:
    """Whether ``reduce`` aggregates with one weight here (then the kernel must run)."""
    if reg.reduce != "seq-mean-token-mean":
        return True
    arrays = x if isinstance(x, list) else [x]
    lengths = (
        [a.size for a in arrays]
        if isinstance(x, list)
        else [int(np.prod(x.shape[1:]))] * x.shape[0]
        if x.ndim >= 2
        else [x.size]
    )
    return mask is None and len(set(lengths)) <= 1


def as_list(g: Any) -> list[np.ndarray]:
    return g if isinstance(g, list) else [g]


def check_equal(reg: rg.Regularizer, x: Any, fast: Any, generic: Any) -> None:
    (fv, fm, fg), (gv, gm, gg) = fast, generic
    assert type(fv) is np.ndarray
    assert fv.shape == ()
    assert fv.dtype == gv.dtype
    assert fm.keys() == gm.keys()
    for k in gm:
        assert type(fm[k]) is np.ndarray, k
        assert fm[k].shape == (), k
        assert fm[k].dtype == gm[k].dtype, k
    flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in as_list(x)])
    with np.errstate(over="ignore"):
        t = np.exp(flat) if reg.target == "probs" else flat
    finite = t[np.isfinite(t)]
    center = getattr(reg, "center", None)
    big = (
        (np.abs(finite).max() if finite.size else 0.0)
        + 1.0
        + abs(center if isinstance(center, float) else 0.0)
    )
    rtol = 1e-9 if gv.dtype == np.float64 else 2e-5
    atol = rtol * max(t.size, 1) * big * big
    for name, a, b in [("value", fv, gv), *((k, fm[k], gm[k]) for k in gm)]:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)
    assert isinstance(fg, list) == isinstance(gg, list)
    for a, b, src in zip(as_list(fg), as_list(gg), as_list(x), strict=True):
        assert type(a) is np.ndarray
        assert a.shape == b.shape == src.shape
        assert a.dtype == b.dtype == src.dtype
        g_rtol = 4e-3 if src.dtype == np.float16 else 1e-9 if src.dtype == np.float64 else 2e-5
        # the mean's rounding (center="mean") moves every element of the gradient alike
        g_atol = g_rtol * 16 * big
        np.testing.assert_allclose(
            a.astype(np.float64),
            b.astype(np.float64),
            rtol=g_rtol,
            atol=g_atol,
            equal_nan=True,
            err_msg="gradient",
        )


@given(reg=regularizers(), data=st.data())
def test_fused_value_and_grad_equals_the_generic_path(
    bk: Harness, reg: rg.Regularizer, data: st.DataObject
) -> None:
    x, mask = data.draw(inputs(reg), label="x, mask")
    counts = counts_for(data.draw)
    block = data.draw(st.sampled_from([None, 1, 3, 16]), label="block")
    kw: dict[str, Any] = {"counts": counts}
    if mask is not None:
        kw["mask"] = mask
    with pytest.MonkeyPatch.context() as patch:
        ran = spy(patch)
        if block is not None:
            patch.setattr(_native, "BLOCK", block)
        with np.errstate(all="ignore"):
            fast = reg.value_and_grad(None, x, **kw)
    if single_weight(reg, x, mask):
        assert ran in ([reg.name], ["small"], ["direct"]), "the fused kernel did not run"
    with np.errstate(all="ignore"), generic_path():
        generic = reg.value_and_grad(None, x, **kw)
    check_equal(reg, x, fast, generic)


@given(reg=regularizers(), data=st.data())
def test_small_path_equals_the_generic_path(
    bk: Harness, reg: rg.Regularizer, data: st.DataObject
) -> None:
    """One array with no mask or counts: the small path, or else the blocked kernels."""
    x, _ = data.draw(inputs(reg), label="x")
    x = x[0] if isinstance(x, list) else x
    with np.errstate(all="ignore"):
        fast = reg.value_and_grad(None, x)
        with generic_path():
            generic = reg.value_and_grad(None, x)
    check_equal(reg, x, fast, generic)


def test_the_fused_paths_are_taken(bk: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks are wired: a NumPy call runs a kernel, a generic_path() call does not; a
    subclass, a Field target or a weight per token takes the penalty's own closed form."""
    x = [np.array([-1.0, 0.0, 2.0], dtype=np.float32), np.array([3.0], dtype=np.float32)]
    ran = spy(monkeypatch)
    for reg in (rg.L1(), rg.L2(clip=(-100.0, 0.0), center="mean"), rg.Huber(), rg.ElasticNet()):
        ran.clear()
        reg.value_and_grad(None, x)
        assert ran == ["direct"]
        ran.clear()
        reg.value_and_grad(None, x, mask=[np.ones(3), np.ones(1)])
        assert ran == [reg.name]
        ran.clear()
        with generic_path():
            reg.value_and_grad(None, x)
        assert ran == []

    class MyL2(rg.L2):
        pass

    ran.clear()
    MyL2().value_and_grad(None, x)
    rg.L2(target=rg.Field("t")).value_and_grad({"t": x}, x)
    rg.L2(reduce="seq-mean-token-mean").value_and_grad(None, x)  # ragged: a weight per token
    assert ran == []

    v, _, g = rg.L2(center="mean").value_and_grad(None, np.arange(4.0))
    assert ran == ["small"]
    assert float(v) == 5.0
    assert g.tolist() == [-3.0, -1.0, 1.0, 3.0]
    assert _fastpath.try_small_value_and_grad(rg.L1(target="probs"), None, np.ones(4)) is None
    ran.clear()
    rg.L1(mask=rg.Field("m")).value_and_grad({"m": np.ones(4)}, np.ones(4))
    assert ran == ["direct"]


def test_kinks_follow_the_conventions(bk: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """sign 0 at 0, the clip passes the gradient at its bounds, ±δ at Huber's kinks; across
    blocks of two elements."""
    monkeypatch.setattr(_native, "BLOCK", 2)
    x = np.array([0.0, -100.0, 0.0, -101.0, 0.5, -1.0, 1.0], dtype=np.float32)
    mask = np.ones(7, dtype=bool)
    _, _, g = rg.L1().value_and_grad(None, x, mask=mask)
    assert g.tolist() == [0.0, -1.0, 0.0, -1.0, 1.0, -1.0, 1.0]
    _, _, g = rg.L2(clip=(-100.0, 0.0)).value_and_grad(None, x, mask=mask)
    assert g.tolist() == [0.0, -200.0, 0.0, 0.0, 0.0, -2.0, 0.0]
    _, _, g = rg.Huber(delta=1.0).value_and_grad(None, x, mask=mask)
    assert g.tolist() == [0.0, -1.0, 0.0, -1.0, 0.5, -1.0, 1.0]


def test_empty_and_all_masked(bk: Harness) -> None:
    for reg in (rg.L1(), rg.L2(center="mean", clip=(-1.0, 0.0)), rg.Huber(center="mean")):
        for x, mask in [
            (np.zeros(0, dtype=np.float32), None),
            ([np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)], None),
            (np.array([np.nan, np.inf], dtype=np.float32), np.zeros(2, dtype=bool)),
        ]:
            kw = {} if mask is None else {"mask": mask}
            v, m, g = reg.value_and_grad(None, x, **kw)
            assert float(v) == 0.0
            assert all(float(a) == 0.0 for a in m.values())
            assert all(not np.any(a) for a in as_list(g))


@given(data=st.data())
def test_pipeline_fused_terms_equal_the_generic_path(bk: Harness, data: st.DataObject) -> None:
    """A Pipeline's built-in terms over one NumPy input add into one gradient: the loss,
    metrics and gradient are the generic path's (each term's own value_and_grad)."""
    regs = data.draw(st.lists(regularizers(), min_size=1, max_size=3), label="regs")
    regs = [r for r in regs if r.target == "logprobs"] or [rg.L1()]
    weights = data.draw(
        st.lists(st.sampled_from([1e-3, 1.0, -0.5]), min_size=len(regs), max_size=len(regs))
    )
    x, mask = data.draw(inputs(regs[0]), label="x, mask")
    d: dict[str, Any] = {} if mask is None else {"w": mask}
    if mask is not None:
        regs[0] = type(regs[0])(**{**regs[0].options(), "mask": rg.Field("w")})
    terms = [
        rg.Term(r, w, name=f"t{i}") for i, (r, w) in enumerate(zip(regs, weights, strict=True))
    ]
    pipe = rg.Pipeline(terms, metrics="array")
    counts = counts_for(data.draw)
    block = data.draw(st.sampled_from([None, 1, 5]), label="block")
    large = data.draw(st.booleans(), label="the large arrays' forms at any size")
    with pytest.MonkeyPatch.context() as patch:
        ran = spy(patch)
        if block is not None:
            patch.setattr(_native, "BLOCK", block)
        if large:
            patch.setattr(_direct, "_PRODUCT", 0)
            patch.setattr(_direct, "_CLIP", 0)
        with np.errstate(all="ignore"):
            loss, metrics, grad = pipe.value_and_grad(d or None, x, counts=counts)
    if counts is None and all(r.reduce in ("sum", "mean") for r in regs):
        expected = ["direct"] * len(regs)  # the whole group without a Batch (numpy_direct)
    else:
        expected = [r.name for r in regs if single_weight(r, x, None if r.mask is None else mask)]
    assert sorted(ran) == sorted(expected), "the fused kernels did not run"
    with np.errstate(all="ignore"), generic_path():
        loss2, metrics2, grad2 = pipe.value_and_grad(d or None, x, counts=counts)
    assert metrics.keys() == metrics2.keys()
    check_equal(rg.L1(), x, (loss, {}, grad), (loss2, {}, grad2))
    for k in metrics2:
        a, b = np.asarray(metrics[k]), np.asarray(metrics2[k])
        assert a.dtype == b.dtype, k
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-3 * (1 + abs(b)), equal_nan=True)


def test_pipeline_fuses_its_numpy_terms(bk: Harness) -> None:
    """The Pipeline hands its NumPy built-in terms to the fused path (one gradient)."""
    x = [np.array([-1.0, 0.0, 2.0], dtype=np.float32), np.array([3.0], dtype=np.float32)]
    parts = [("l1", rg.L1(), 1e-3, "logprobs"), ("l2", rg.L2(center="mean"), 2.0, "logprobs")]
    results, grads = _fastpath.try_terms_value_and_grad(parts, None, {"logprobs": x}, None)
    assert sorted(results) == ["l1", "l2"]
    expected = rg.Pipeline([(rg.L1(), 1e-3), (rg.L2(center="mean"), 2.0)]).value_and_grad(None, x)
    for a, b in zip(grads["logprobs"], expected[2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with generic_path():
        assert _fastpath.try_terms_value_and_grad(parts, None, {"logprobs": x}, None) == ({}, {})


# ---- the whole-call path (numpy_direct): every penalty it has a kernel for ---------------------
ELEMENTWISE = ("l1", "l2", "huber", "elastic_net", "sampled_kl", "sampled_entropy", "consistency")
OVER_ROWS = ("entropy", "kl", "jsd", "z_loss", "gradient_penalty", "orthogonality")


@st.composite
def direct_regularizers(draw: st.DrawFn) -> tuple[rg.Regularizer, bool]:
    """A regularizer with a ``numpy_direct`` kernel, with the options that kernel covers
    (``covered``) or others (which must fall back to the general path)."""
    kind = draw(st.sampled_from(ELEMENTWISE + OVER_ROWS))
    how = draw(st.sampled_from(REDUCES) if draw(st.integers(0, 3)) == 0 else st.just("sum"))
    how = "mean" if how == "sum" and draw(st.booleans()) else how
    opts: dict[str, Any] = {"reduce": how}
    if how == "seq-mean-token-sum-norm":
        opts["max_tokens"] = draw(st.sampled_from([1.0, 7.0]))
    mask = draw(st.sampled_from(["none", "field", "field", "array"]))
    if mask == "field":
        opts["mask"] = rg.Field("m")
    covered = how in ("sum", "mean") and mask != "array"
    other = rg.Field("y")
    plain = draw(st.integers(0, 3)) > 0  # mostly the options a kernel covers
    if kind == "l1":
        reg: rg.Regularizer = rg.L1(**opts)
    elif kind in ("l2", "huber", "elastic_net"):
        if not plain:
            opts["clip"] = draw(S.clips())
            opts["center"] = draw(S.centers())
        if kind == "l2":
            reg = rg.L2(**opts)
        elif kind == "huber":
            reg = rg.Huber(delta=draw(st.sampled_from([0.5, 1.0, 3.0])), **opts)
        else:
            reg = rg.ElasticNet(l1_ratio=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), **opts)
    elif kind == "sampled_kl":
        est = draw(st.sampled_from(["k1", "abs", "k2", "k3"]))
        grad = draw(st.sampled_from(["estimator", "unbiased"])) if est in ("k1", "k3") else None
        extra: dict[str, Any] = {} if grad is None else {"gradient": grad}
        if not plain:
            extra["log_ratio_clip"] = (-1.0, 0.5)
            covered = False
        reg = rg.SampledKL(other, estimator=est, **extra, **opts)
    elif kind == "sampled_entropy":
        reg = rg.SampledEntropy(mode=draw(st.sampled_from(["maximize", "minimize"])), **opts)
    elif kind == "consistency":
        metric = draw(st.sampled_from(["mse", "l1"] if plain else ["cosine", "kl"]))
        covered = covered and plain
        reg = rg.Consistency(other, metric=metric, **opts)
    elif kind == "entropy":
        extra = {} if plain else {"mode": "maximize", "normalize": True}
        covered = covered and plain
        reg = rg.Entropy(**extra, **opts)
    elif kind == "kl":
        extra = {} if plain else {"direction": "forward"}
        covered = covered and plain
        reg = rg.KL(other, **extra, **opts)
    elif kind == "jsd":
        extra = {} if plain else {"temperature": 2.0}
        covered = covered and plain
        reg = rg.JSD(other, beta=draw(st.sampled_from([0.5, 0.1, 0.9])), **extra, **opts)
    elif kind == "z_loss":
        reg = rg.ZLoss(**opts)
    elif kind == "gradient_penalty":
        reg = rg.GradientPenalty(target_norm=draw(st.sampled_from([0.0, 1.0, 2.5])), **opts)
    else:
        covered = covered and plain and mask == "none"  # (a mask: the general path)
        reg = rg.Orthogonality(
            mode=draw(st.sampled_from(["rows", "columns"])),
            kind="cosine" if plain else "frobenius",
            **opts,
        )
    return reg, covered


@st.composite
def direct_inputs(draw: st.DrawFn, reg: rg.Regularizer) -> tuple[Any, dict[str, Any], Any, bool]:
    """``(x, data, mask, finite)``: one array or a ragged list (rows ``[T, V]`` over a class
    axis), the fields the penalty reads (``data["y"]``, ``data["m"]``), a mask for
    ``mask=...`` given at construction or None, and whether every counted value is finite.
    Uncounted entries may hold ±inf or NaN: they must stay inert."""
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    rows = reg.event_ndim  # 1: rows [T, V]; 2: matrices [N, r, k]
    nonfinite = draw(st.integers(0, 4)) == 0
    kinks = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0]
    elements = st.one_of(S.elements(-30.0, 10.0), st.sampled_from(kinks))
    if nonfinite:
        elements = st.one_of(elements, st.sampled_from(SPECIALS))
    count = draw(st.integers(1, 4)) if draw(st.booleans()) else 0  # 0: one array
    width = draw(st.integers(1, 6))
    height = draw(st.integers(1, 4))

    def shape() -> tuple[int, ...]:
        n = draw(st.integers(0, 12))
        if rows == 2:
            return (n % 4, height, width) if count or n % 2 else (height, width)
        if rows:
            return (n, width)
        return draw(st.sampled_from([(n,), (n // 3 + 1, 3)])) if count == 0 else (n,)

    shapes = [shape() for _ in range(max(count, 1))]
    xs = [draw(hnp.arrays("float64", s, elements=elements)).astype(dtype) for s in shapes]
    ys = [draw(hnp.arrays("float64", s, elements=elements)).astype(dtype) for s in shapes]
    if rows == 1 and draw(st.integers(0, 3)) == 0 and xs[0].shape[0]:
        xs[0][0] = -np.inf  # a row of all -inf (not counted for a distribution)
    mask_dtype = draw(st.sampled_from(["bool", "float32", "int8"]))
    masks = [draw(hnp.arrays(mask_dtype, s[: len(s) - rows])) for s in shapes]
    if draw(st.booleans()):
        poison = draw(st.sampled_from(SPECIALS))
        for a, m in zip(xs, masks, strict=True):
            a[~m.astype(bool)] = poison  # uncounted entries: ±inf or NaN, never read
    data: dict[str, Any] = {}
    if getattr(reg, "reference", None) is not None or getattr(reg, "paired", None) is not None:
        data["y"] = ys if count else ys[0]
    if isinstance(reg.mask, rg.Field):
        data["m"] = masks if count else masks[0]
    x = xs if count else xs[0]
    counted = [a if reg.mask is None else a[m.astype(bool)] for a, m in zip(xs, masks, strict=True)]
    finite = all(np.isfinite(c).all() for c in counted)
    if finite and data.get("y") is not None:
        finite = all(
            np.isfinite(y if reg.mask is None else y[m.astype(bool)]).all()
            for y, m in zip(ys, masks, strict=True)
        )
    if finite and reg.name == "gradient_penalty":  # rows of norm 0 take the general path,
        # and so do rows whose squares underflow (|g|² near V·tiny/eps of the compute dtype)
        info = np.finfo(np.float32 if dtype == "float16" else dtype)
        tiny = 4 * width * float(info.tiny) / float(info.eps)
        finite = all((np.square(c.astype(np.float64)).sum(axis=-1) > tiny).all() for c in counted)
    if finite and reg.name == "orthogonality":  # so do zero rows, and a single row
        axis = -1 if reg.mode == "rows" else -2
        finite = all((np.abs(c) > 0).any(axis=axis).all() for c in counted)
        finite = finite and xs[0].shape[-2 if reg.mode == "rows" else -1] >= 2
    return x, data, (masks if count else masks[0]), finite


@given(picked=direct_regularizers(), data=st.data())
def test_direct_path_equals_the_generic_path(
    bk: Harness, picked: tuple[rg.Regularizer, bool], data: st.DataObject
) -> None:
    """The whole-call kernels (``numpy_direct``: no Batch) give the general path's value,
    metrics and gradient, over every penalty they cover, with masks read from ``data``,
    half precision, ragged lists and non-finite values; they run where their options are
    covered and the counted values are finite, and decline (to the general path) otherwise.
    The kernels over a class axis walk their rows by blocks of ``_ROWS`` elements: drawn
    small here too, so that a call takes several blocks."""
    reg, covered = picked
    x, d, mask, finite = data.draw(direct_inputs(reg), label="x, data, mask")
    if reg.mask is None and data.draw(st.booleans(), label="mask option"):
        reg = type(reg)(**{**reg.options(), "mask": mask})  # an array given at construction
        covered = False
    rows = data.draw(st.sampled_from([None, 1, 7]), label="_ROWS")
    large = data.draw(st.booleans(), label="the large arrays' forms at any size")
    before = [a.copy() for a in as_list(x)] + [a.copy() for v in d.values() for a in as_list(v)]
    with pytest.MonkeyPatch.context() as patch:
        if rows is not None:  # (1: a row per block; 7: up to 7 classes' worth of rows)
            patch.setattr(_direct, "_ROWS", rows)
        if large:  # (the mask's product and its check, np.clip: else below 2048 elements
            patch.setattr(_direct, "_PRODUCT", 0)  # where, np.minimum and np.maximum)
            patch.setattr(_direct, "_CLIP", 0)
        ran = spy(patch)
        with np.errstate(all="ignore"):
            fast = reg.value_and_grad(d or None, x)
    after = list(as_list(x)) + [a for v in d.values() for a in as_list(v)]
    for a, b in zip(before, after, strict=True):  # nothing a caller passes is modified
        np.testing.assert_array_equal(a, b)
    if covered and finite:  # (one array of L1 or L2 without data: the small path first)
        assert ran in (["direct"], ["small"]), "the whole-call kernel did not run"
    event("direct" if "direct" in ran else "general")
    with np.errstate(all="ignore"), generic_path():
        generic = reg.value_and_grad(d or None, x)
    check_equal(reg, x, fast, generic)


def direct_equals_generic(reg: rg.Regularizer, data: Any, x: Any) -> Any:
    """``reg.value_and_grad(data, x)`` by the direct kernel (which must run), checked equal
    to the general path's; the direct result."""
    with pytest.MonkeyPatch.context() as patch:
        ran = spy(patch)
        fast = reg.value_and_grad(data, x)
    assert ran == ["direct"], ran
    with generic_path():
        generic = reg.value_and_grad(data, x)
    check_equal(reg, x, fast, generic)
    return fast


@pytest.mark.parametrize(
    "reg",
    [
        rg.L2(center="mean", mask=rg.Field("m")),
        rg.L2(center="mean", clip=(-2.0, 3.0), mask=rg.Field("m"), reduce="mean"),
        rg.Huber(center="mean", delta=0.5, mask=rg.Field("m")),
        rg.ElasticNet(center="mean", l1_ratio=0.3, mask=rg.Field("m"), reduce="mean"),
        rg.SampledKL(rg.Field("y"), mask=rg.Field("m")),
        rg.SampledKL(rg.Field("y"), estimator="k1", mask=rg.Field("m"), reduce="mean"),
    ],
    ids=repr,
)
def test_direct_kernels_on_a_masked_ragged_batch(bk: Harness, reg: rg.Regularizer) -> None:
    """The whole-call kernels on a ragged batch with a mask from ``data`` and the extreme on
    the negative side: value, metrics (a log-ratio mean of a known sign, a peak from the
    bottom) and gradient equal the general path's, the gradient exactly 0 at uncounted
    tokens (a centred penalty's mean share included, which does not average to 0 for Huber
    and ElasticNet)."""
    x = [np.array([1.0, 2.0, -6.0, 0.5, -3.0]), np.array([4.0, -1.0, -0.25])]
    m = [np.array([1.0, 1.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 1.0])]
    y = [np.array([0.5, 2.5, 1.0, 0.0, -1.0]), np.array([-9.0, -1.5, -0.75])]
    data = {"m": m, "y": y}
    fast = direct_equals_generic(reg, data, x)
    for g, mask in zip(fast[2], m, strict=True):
        assert (g[mask == 0] == 0.0).all(), g


@pytest.mark.parametrize(
    "reg",
    [
        rg.Huber(delta=0.5, reduce="mean"),
        rg.ElasticNet(l1_ratio=0.3, reduce="mean"),
        rg.ElasticNet(l1_ratio=0.0, reduce="mean"),
        rg.ElasticNet(l1_ratio=1.0, reduce="mean"),
        rg.Entropy(mask=rg.Field("m"), reduce="mean"),
        rg.KL(rg.Field("y"), mask=rg.Field("m"), reduce="mean"),
        rg.JSD(rg.Field("y"), beta=0.1, mask=rg.Field("m"), reduce="mean"),
        rg.ZLoss(mask=rg.Field("m"), reduce="mean"),
        rg.GradientPenalty(target_norm=1.0, mask=rg.Field("m"), reduce="mean"),
    ],
    ids=repr,
)
def test_direct_kernels_weigh_a_mean_once(bk: Harness, reg: rg.Regularizer) -> None:
    """Kernels that put ``reduce``'s 1/N into the gradient's own coefficients (on the way,
    not as a pass of its own), and take the value from sums they already have: a mean over
    a masked ragged batch (N = 5 counted of 7) equals the general path's, value, metrics
    and gradient, and the direct kernel ran."""
    rng = np.random.default_rng(7)
    if reg.name in ("huber", "elastic_net"):
        x = [rng.normal(0.0, 2.0, size=4), rng.normal(0.0, 2.0, size=3)]
        data: dict[str, Any] = {}
    else:
        x = [rng.normal(0.0, 2.0, size=(4, 6)), rng.normal(0.0, 2.0, size=(3, 6))]
        y = [rng.normal(0.0, 2.0, size=(4, 6)), rng.normal(0.0, 2.0, size=(3, 6))]
        m = [np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0])]
        data = {"m": m, "y": y}
    direct_equals_generic(reg, data, x)


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize(
    "reg",
    [
        rg.L1(mask=rg.Field("m")),
        rg.L2(center="mean", mask=rg.Field("m"), reduce="mean"),
        rg.SampledKL(rg.Field("y"), mask=rg.Field("m")),
    ],
    ids=repr,
)
def test_direct_masking_keeps_uncounted_inf_and_nan_out(
    bk: Harness, reg: rg.Regularizer, product: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uncounted tokens holding inf, -inf and NaN: the whole-call kernels mask by ``where``,
    or (``product``: at any size) by the product with the mask, whose check must catch the
    0 · inf and 0 · NaN it makes and mask by ``where`` after all. Alone and as a
    Pipeline's first term before a plain one (which reads the unmasked values): the
    general path's numbers, finite for the masked term, 0 gradient where uncounted."""
    if product:
        monkeypatch.setattr(_direct, "_PRODUCT", 0)
    x = [np.array([1.0, np.inf, -6.0, 0.5, np.nan]), np.array([-np.inf, -1.0, -0.25])]
    m = [np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0])]
    y = [np.array([0.5, 2.5, 1.0, 0.0, -1.0]), np.array([-9.0, -1.5, -0.75])]
    data = {"m": m, "y": y}
    fast = reg.value_and_grad(data, x)
    with generic_path():
        generic = reg.value_and_grad(data, x)
    check_equal(reg, x, fast, generic)
    assert np.isfinite(float(fast[0]))
    for g, mask in zip(fast[2], m, strict=True):
        assert (g[mask == 0] == 0.0).all(), g
    pipe = rg.Pipeline([rg.Term(reg, 0.5, name="masked"), rg.Term(rg.L1(), 1e-3, name="all")])
    got = pipe.value_and_grad(data, x)
    with generic_path():
        want = pipe.value_and_grad(data, x)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-12, equal_nan=True)
    assert np.isfinite(got[1]["masked/value"])
    assert np.isnan(got[1]["all/value"])  # (the plain term reads the NaN)


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize(
    "reg",
    [
        rg.L2(center="mean"),
        rg.L2(center="mean", clip=(-2.0, 3.0), reduce="mean"),
        rg.Huber(center="mean", delta=0.5),
        rg.Huber(center="mean", delta=0.5, clip=(-2.0, 3.0)),
        rg.ElasticNet(center="mean", l1_ratio=0.3, reduce="mean"),
    ],
    ids=repr,
)
def test_blocked_kernels_on_a_masked_ragged_batch(
    bk: Harness, reg: rg.Regularizer, block: Any
) -> None:
    """The blocked kernels (a mask given to the call: a Batch) of the centred family, in one
    block and in blocks of 2: equal to the general path, the gradient exactly 0 at uncounted
    tokens after the last pass that subtracts the mean of dp (Huber's and ElasticNet's do
    not average to 0)."""
    x = [np.array([1.0, 2.0, -6.0, 0.5, -3.0]), np.array([4.0, -1.0, -0.25])]
    m = [np.array([1.0, 1.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 1.0])]
    with pytest.MonkeyPatch.context() as patch:
        ran = spy(patch)
        if block is not None:
            patch.setattr(_native, "BLOCK", block)
        fast = reg.value_and_grad(None, x, mask=m)
    assert ran == [reg.name], ran
    with generic_path():
        generic = reg.value_and_grad(None, x, mask=m)
    check_equal(reg, x, fast, generic)
    for g, mask in zip(fast[2], m, strict=True):
        assert (g[mask == 0] == 0.0).all(), g


def test_direct_kernels_follow_the_conventions(bk: Harness) -> None:
    """Kinks (sign 0 at 0, Huber's ±δ), uncounted ±inf/NaN inert, -inf classes and rows of
    all -inf handed to the general path (no NaN), a zero gradient row at GradientPenalty's
    g = 0, and a float mask read as ``!= 0`` (NaN counts)."""
    x = np.array([0.0, -1.0, 1.0, np.nan, -np.inf], dtype=np.float32)
    m = np.array([1.0, 1.0, 1.0, 0.0, 0.0], dtype=np.float32)
    _, _, g = rg.L1(mask=rg.Field("m")).value_and_grad({"m": m}, x)
    assert g.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0]
    _, _, g = rg.Huber(mask=rg.Field("m")).value_and_grad({"m": m}, x)
    assert g.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0]
    v, _, g = rg.SampledKL(rg.Field("y"), mask=rg.Field("m")).value_and_grad(
        {"y": np.full(5, np.nan, dtype=np.float32), "m": np.array([0, 0, 0, 0, np.nan])}, x
    )
    assert np.isnan(float(v))  # the NaN mask entry counts, and holds -inf - NaN
    z = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], dtype=np.float32)
    for reg in (rg.Entropy(), rg.ZLoss(), rg.KL(rg.Field("y")), rg.JSD(rg.Field("y"))):
        v, _, g = reg.value_and_grad({"y": np.zeros_like(z)}, z)
        assert np.isfinite(float(v))
        assert np.isfinite(g).all()
        assert not g[1].any()
    v, _, g = rg.GradientPenalty().value_and_grad(None, np.zeros((2, 3), dtype=np.float32))
    assert float(v) == 2.0
    assert not g.any()
