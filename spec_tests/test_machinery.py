"""The shared machinery: the extension API, counts, pipelines (SPEC 10) and validation.

Each test here names the promise it checks; the old machinery failed every one of them.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest

import regularizers as rg

Harness = Any


# ---- the extension API (SPEC 7.3) ---------------------------------------------------------
class Cubic(rg.Regularizer, name="test_cubic"):
    """The SPEC's example: Σ scale·|t|³, with a closed form."""

    scale = rg.option(1.0, check=rg.checks.positive)

    def evaluate(self, batch: rg.Batch) -> tuple[Any, dict[str, Any]]:
        xp = batch.xp
        p = self.scale * xp.abs(batch.values) ** 3
        return batch.aggregate(p), batch.metrics("cubic", p)

    def evaluate_with_grad(self, batch: rg.Batch) -> tuple[Any, dict[str, Any], Any]:
        value, metrics = self.evaluate(batch)
        t = batch.values
        return value, metrics, batch.aggregate_grad(3.0 * self.scale * t * batch.xp.abs(t))


class GapToReference(rg.Regularizer, name="test_gap_to_reference"):
    """KL-like: reads a second field of data, aligned with the values."""

    reference = rg.option(rg.Field("ref_logprobs"), check=rg.checks.operand, positional=True)

    def evaluate(self, batch: rg.Batch) -> tuple[Any, dict[str, Any]]:
        d = batch.values - batch.field(self.reference, role="reference")
        return batch.aggregate(d * d), batch.metrics("gap", d * d)


def test_options_declared_once_drive_identity() -> None:
    a, b = Cubic(scale=2), Cubic(scale=2.0)
    assert a == b
    assert hash(a) == hash(b)
    assert a != Cubic(scale=3.0)
    assert repr(a) == "Cubic(scale=2.0)"
    assert repr(Cubic()) == "Cubic()"
    assert a.scale == 2.0
    assert list(a.options()) == ["target", "reduce", "scale", "max_tokens", "mask"]
    assert rg.from_config(a.to_config()) == a
    assert rg.from_config({"regularizer": "Cubic", "options": {"scale": 2.0}}) == a
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.copy(a) == a
    assert copy.deepcopy(a) == a
    with pytest.raises(AttributeError, match="immutable"):
        a.scale = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"scale.*> 0.*-1"):
        Cubic(scale=-1)
    with pytest.raises(TypeError, match="keyword only"):
        Cubic(2.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"no option 'scael'.*scale"):
        Cubic(scael=2.0)  # type: ignore[call-arg]


def test_an_undeclared_init_option_is_a_type_error_at_class_creation() -> None:
    with pytest.raises(TypeError, match=r"'scale'.*not a declared option"):

        class Sloppy(rg.Regularizer):
            def __init__(self, *, scale: float = 1.0, **kw: Any) -> None:
                super().__init__(**kw)


def test_a_default_that_fails_its_own_check_is_caught_at_class_creation() -> None:
    with pytest.raises(TypeError, match=r"default.*fails its own check"):

        class Broken(rg.Regularizer):
            scale = rg.option(-1.0, check=rg.checks.positive)


def test_one_positional_option_and_one_registry() -> None:
    reg = GapToReference(rg.Field("ref"))
    assert reg == GapToReference(reference=rg.Field("ref"))
    assert "test_gap_to_reference" in rg.to_config(reg)["regularizer"]
    with pytest.raises(ValueError, match="already registered"):

        class Impostor(rg.Regularizer, name="test_cubic"):
            pass

    with pytest.raises(TypeError, match="at most one option"):

        class TwoPositional(rg.Regularizer):
            a = rg.option(None, positional=True)
            b = rg.option(None, positional=True)


def test_batch_field_reads_a_second_field_aligned_with_the_values(bk: Harness) -> None:
    x = [bk.asarray(np.array([-1.0, -2.0])), bk.asarray(np.array([-0.5, 0.0, -3.0]))]
    ref = [np.array([-1.5, -2.0]), np.array([0.5, 0.0, -1.0])]
    mask = [np.array([1, 1]), np.array([1, 0, 1])]
    reg = GapToReference()
    value, metrics = bk.call(
        lambda lp: reg.compute({"ref_logprobs": ref}, lp, mask=mask, counts=None), x
    )
    want = 0.25 + 0.0 + 1.0 + 4.0  # the masked token does not count
    assert bk.float(value) == pytest.approx(want)
    assert bk.float(metrics["gap_mean"]) == pytest.approx(want / 4)
    # datums of Tinker's shape are read the same way
    datums = [type("D", (), {"loss_fn_inputs": {"ref_logprobs": r}})() for r in ref]
    value2, _ = bk.call(lambda lp: reg.compute(datums, lp, mask=mask), x)
    assert bk.float(value2) == pytest.approx(want)
    with pytest.raises(
        ValueError, match=r"reference.*shape \[\(2,\), \(2,\)\].*\[\(2,\), \(3,\)\]"
    ):
        reg.compute({"ref_logprobs": [ref[0], ref[0]]}, x)


@pytest.mark.parametrize(
    "reg",
    [
        Cubic(),
        rg.SampledKL(rg.Field("ref_logprobs")),
        rg.Consistency(rg.Field("ref_logprobs")),
        rg.L1(reduce="seq-mean-token-mean"),
    ],
    ids=["Cubic", "SampledKL", "Consistency", "L1"],
)
def test_datums_of_any_shape_read_like_their_flattening(bk: Harness, reg: Any) -> None:
    """A list whose datums are not all 1-D is flattened datum by datum (its values, its mask
    and each field it reads); a list of 1-D datums is joined as it is. Both give the same
    value, metrics and counts, and each datum's gradient comes back in its own shape."""
    shapes = [(2, 2), (3,), (1, 2), (0,)]
    rng = np.random.default_rng(3)
    xs = [-rng.gamma(1.0, 1.0, size=s) for s in shapes]
    refs = [-rng.gamma(1.0, 1.0, size=s) for s in shapes]
    masks = [rng.random(s) < 0.7 for s in shapes]
    masks[0][0, 0] = masks[0][1, 1] = True  # (some counted token in a 2-D datum)

    def run(x: list[Any], ref: list[Any], mask: list[Any]) -> Any:
        data = {"ref_logprobs": ref}
        return bk.call(lambda lp: reg.value_and_grad(data, lp, mask=mask), x)

    def flat(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [a.reshape(-1) for a in arrays]

    got = run(bk.asarray(xs), refs, masks)
    want = run(bk.asarray(flat(xs)), flat(refs), flat(masks))
    assert bk.float(got[0]) == pytest.approx(bk.float(want[0]), rel=1e-12)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        assert bk.float(got[1][k]) == pytest.approx(bk.float(want[1][k]), rel=1e-12), k
    grads = bk.to_numpy(got[2])
    assert [g.shape for g in grads] == shapes
    np.testing.assert_allclose(
        np.concatenate(flat(grads)), np.concatenate(bk.to_numpy(want[2])), rtol=1e-12
    )
    if bk.backend.has_autodiff:  # the training path (torch: the closed-form node)
        data = {"ref_logprobs": refs}
        g = bk.autodiff(
            lambda lp: reg.compute(data, lp, mask=masks)[0], bk.asarray(xs), generic=False
        )
        g = bk.to_numpy(g)
        assert [a.shape for a in g] == shapes
        np.testing.assert_allclose(np.concatenate(flat(g)), np.concatenate(flat(grads)), rtol=1e-12)


class _CountingData(dict[str, Any]):
    """``data`` that counts how often each key is read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads: dict[str, int] = {}

    def __getitem__(self, key: str) -> Any:
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


@pytest.mark.parametrize(
    ("reg", "key", "event"),
    [
        (rg.Consistency(paired=rg.Field("y")), "y", 0),
        (rg.KL(reference=rg.Field("y")), "y", 1),
        (rg.JSD(reference=rg.Field("y")), "y", 1),
    ],
    ids=["Consistency", "KL", "JSD"],
)
def test_a_field_is_read_once_per_call(bk: Harness, reg: Any, key: str, event: int) -> None:
    """A penalty that reads a field twice in one call (its ``valid_tokens``, then its value)
    reads ``data`` once: the Batch keeps what it read, in the call's layout; the next call
    reads again."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (2, 4)] if event else [(3,), (5,)]
    x = [bk.asarray(rng.normal(size=s)) for s in shapes]
    ys = [rng.normal(size=s) for s in shapes]
    want, _ = reg.compute({key: ys}, x)
    data = _CountingData({key: ys})
    got, _ = reg.compute(data, x)
    assert data.reads == {key: 1}
    assert bk.float(got) == bk.float(want)
    reg.value_and_grad(data, x)
    assert data.reads == {key: 2}


@pytest.mark.parametrize(
    "reduce", ["sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-mean"]
)
def test_an_empty_stack_is_zero_under_every_reduce(bk: Harness, reduce: str) -> None:
    """A ``[0, T]`` stack (no sequence at all): value and metrics 0, the gradient ``[0, T]``
    (``seq-mean-token-mean`` once failed here, taking sequence ids from an empty list)."""
    x = bk.asarray(np.zeros((0, 3)))
    for reg in (rg.L1(reduce=reduce), rg.L2(reduce=reduce, center="mean")):
        value, metrics = bk.call(lambda lp, reg=reg: reg.compute(None, lp), x)
        assert bk.float(value) == 0.0
        assert all(bk.float(m) == 0.0 for m in metrics.values())
        _, _, grad = bk.call(lambda lp, reg=reg: reg.value_and_grad(None, lp), x)
        assert tuple(grad.shape) == (0, 3)


def test_counts_are_integer_arrays_of_the_callers_namespace(bk: Harness) -> None:
    x = bk.asarray(np.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, -3.0]]))
    counts = bk.call(lambda lp: rg.L1().counts(None, lp, mask=np.array([[0, 0, 0], [1, 0, 1]])), x)
    assert bk.float(counts["tokens"]) == 2
    assert bk.float(counts["sequences"]) == 1
    for v in counts.values():
        assert tuple(v.shape) == ()
        assert "int" in str(v.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_masks_count_is_exact(bk: Harness, dtype: str) -> None:
    """``count_true``, every masked call's N: the number of True, exactly, in the compute
    dtype (torch on the CPU sums the mask's bytes in that dtype, exact up to 2^24 in
    float32; beyond, and on every other backend, ``count_nonzero``)."""
    from regularizers._core.backends import count_true

    rng = np.random.default_rng(7)
    sizes = [0, 1, 1000, 65_537] + ([(1 << 24) + 3] if bk.library == "torch" else [])
    for n in sizes:
        m = rng.random(n) < 0.75 if n < 1 << 20 else np.ones(n, dtype=bool)
        m[:1] = True
        got = bk.call(lambda a: count_true(bk.xp, a, bk.dtype(dtype)), bk.asarray(m))
        assert bk.to_numpy(got).dtype == np.dtype(dtype)
        assert tuple(got.shape) == ()
        assert bk.float(got) == float(np.asarray(np.count_nonzero(m), dtype=dtype)), n
        if bk.library == "torch":  # the training path's masking, which counts by the way
            _zero_and_count_agrees(bk, m, dtype)


def test_a_bounded_memo_empties_itself_when_full() -> None:
    """The fast paths' memo of small constants (a weight per count, a constant per dtype
    and device: keys from the caller's data) holds at most ``keep`` entries, and what was
    just put is there to get."""
    from regularizers._fastpath.common import Bounded

    memo = Bounded(3)
    for k in range(10):
        assert memo.put(("key", k), k * k) == k * k
        assert memo.get(("key", k)) == k * k
        assert 1 <= len(memo) <= 3
    assert memo.get(("key", 0)) is None  # (emptied since)


def test_remembered_dtype_kinds_are_the_namespaces(bk: Harness) -> None:
    """``backends.isdtype`` (remembered per namespace, dtype and kind, which every call's
    checks ask) answers what the namespace's own ``isdtype`` does, asked twice over."""
    from regularizers._core.backends import isdtype

    xp = bk.xp
    names = ["bool", "int8", "int32", "int64", "uint8", "float16", "bfloat16", "float32"]
    dtypes = [getattr(xp, d) for d in [*names, "float64", "complex64"] if hasattr(xp, d)]
    kinds: list[Any] = ["bool", "integral", "real floating", "complex floating", "numeric"]
    kinds += [("bool", "integral", "real floating"), xp.float32]
    for _ in range(2):
        for d in dtypes:
            for kind in kinds:
                assert isdtype(xp, d, kind) is bool(xp.isdtype(d, kind)), (d, kind)


def _zero_and_count_agrees(bk: Harness, m: np.ndarray, dtype: str) -> None:
    """torch's ``zero_and_count`` (the CPU's masking product, its count from the floats the
    product multiplies by): ``where(mask, x, 0)`` and ``count_true``'s count, exactly, with
    an infinity and a NaN where the mask is False and an infinity where it is True; the
    input written in place only when ``fresh``. The floats it keeps (``Batch._keep``) are
    the mask's, and ``count_and_keep`` (a kernel that masks its own) gives the same count
    and floats, which ``zero_uncounted`` then takes for the same result."""
    import torch

    from regularizers._fastpath.torch_fused import (
        SMALL,
        count_and_keep,
        zero_and_count,
        zero_uncounted,
    )

    mask = bk.asarray(m)
    x = torch.arange(m.size, dtype=getattr(torch, dtype)).remainder_(7.0).sub_(3.0)
    special = torch.tensor([np.inf, np.nan], dtype=x.dtype)
    uncounted = torch.nonzero(~mask).flatten()[:2]
    x[uncounted] = special[: len(uncounted)]
    x[torch.nonzero(mask).flatten()[-1:]] = -np.inf
    want = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    for fresh in (False, True):
        a = x.clone()
        z, count, keep = zero_and_count(a, mask, fresh)
        assert torch.equal(z, want), (m.size, fresh)
        assert count.dtype == x.dtype
        assert count.shape == ()
        assert count.item() == float(np.asarray(np.count_nonzero(m), dtype=dtype)), m.size
        if not fresh:
            torch.testing.assert_close(a, x, rtol=0, atol=0, equal_nan=True)
        same, own_count, own_keep = count_and_keep(x, mask)
        assert same is x
        assert own_count.item() == count.item()
        assert (keep is None) == (own_keep is None) == (m.size <= SMALL), m.size
        if keep is not None:
            assert torch.equal(keep, mask.to(x.dtype))
            assert torch.equal(own_keep, keep)
        assert torch.equal(zero_uncounted(x.clone(), mask, fresh, own_keep), want)


def test_max_tokens_goes_with_its_mode() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        rg.L1(reduce="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_tokens"):
        rg.L1(max_tokens=4)
    assert rg.L1(reduce="token-mean") == rg.L1(reduce="mean")


# ---- validation (SPEC 5) ------------------------------------------------------------------
def test_data_of_the_wrong_kind_is_a_type_error(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))
    for bad in (42, "weights", object()):
        with pytest.raises(TypeError, match=f"data must be None.*got {type(bad).__name__}"):
            rg.L1().compute(bad, x)
    with pytest.raises(TypeError, match=r"data\[0\] must have a loss_fn_inputs"):
        rg.L1().compute([object()], x)


def test_swapped_arguments_name_the_order(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))
    with pytest.raises(TypeError, match=r"compute\(data, logprobs\).*swapped"):
        rg.L1().compute(x, None)
    with pytest.raises(TypeError, match=r"compute\(data, logprobs\).*swapped"):
        rg.L1().compute(x, {"weights": x})
    with pytest.raises(TypeError, match=r"reg\(logprobs, data=\.\.\.\).*swapped"):
        rg.L1()({"weights": x})
    with pytest.raises(TypeError, match=r"pipe\(data, logprobs\).*swapped"):
        rg.Pipeline([(rg.L1(), 1.0)])(x, {"weights": x})


def test_a_direct_mask_accepts_what_a_field_mask_accepts(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0, -4.0]))
    reg = rg.L1(reduce="mean")
    want = bk.float(reg.compute({"w": [0.0, 1.0, 1.0]}, x, mask=rg.Field("w"))[0])
    assert want == pytest.approx(3.0)
    for mask in ([0.0, 1.0, 1.0], np.array([0, 1, 1]), [False, True, True]):
        assert bk.float(bk.call(lambda lp, m=mask: reg.compute(None, lp, mask=m)[0], x)) == want
    with pytest.raises(ValueError, match=r"mask shape \(2,\).*target's shape \(3,\)"):
        reg.compute(None, x, mask=[1.0, 0.0])


@pytest.mark.backends("jax")
def test_float_metrics_under_jit_say_to_use_arrays(bk: Harness) -> None:
    import jax

    pipe = rg.Pipeline([(rg.L1(), 1.0)])  # metrics="float"
    with pytest.raises(TypeError, match=r"jax.jit.*metrics='array'"):
        jax.jit(lambda lp: pipe(None, lp))(bk.asarray(np.array([-1.0, -2.0])))


# ---- pipelines (SPEC 10) ------------------------------------------------------------------
def test_an_empty_pipeline_is_zero_in_the_callers_namespace(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))
    loss, metrics = bk.call(lambda lp: rg.Pipeline([], metrics="array")(None, lp), x)
    assert bk.float(loss) == 0.0
    assert type(loss).__module__.split(".")[0] == type(x).__module__.split(".")[0]
    assert set(metrics) == {"loss_total", "regularizer_total"}
    loss, _ = rg.Pipeline([], base_loss=rg.L1())(None, x)
    assert bk.float(loss) == 3.0


def test_disabled_terms_and_new_pipelines(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))
    pipe = rg.Pipeline([rg.Term(rg.L1(), 1.0), rg.Term(rg.L2(), 0.5, enabled=False)])
    loss, metrics = pipe(None, x)
    assert bk.float(loss) == 3.0
    assert not any(k.startswith("l2_weight_decay/") for k in metrics)
    on = pipe.with_enabled({"l2_weight_decay": True})
    assert bk.float(on(None, x)[0]) == 3.0 + 0.5 * 5.0
    heavier = on.with_weights({"l1_sparsity": 2.0})
    assert bk.float(heavier(None, x)[0]) == 6.0 + 2.5
    assert pipe.terms[1].enabled is False  # the original is unchanged
    with pytest.raises(KeyError, match="no term named 'l3'"):
        pipe.with_weights({"l3": 1.0})


def test_call_time_weights_numbers_or_arrays(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))
    pipe = rg.Pipeline([(rg.L1(), 1.0), (rg.L2(), 0.5)], metrics="array")
    coef = bk.asarray(np.array(0.25))
    loss, metrics = bk.call(lambda lp, c: pipe(None, lp, weights={"l2_weight_decay": c}), x, coef)
    assert bk.float(loss) == pytest.approx(3.0 + 0.25 * 5.0)
    assert bk.float(metrics["l2_weight_decay/weight"]) == 0.25
    loss2, _ = pipe(None, x, weights={"l1_sparsity": -1.0})  # a bonus: negative is allowed
    assert bk.float(loss2) == pytest.approx(-3.0 + 2.5)
    with pytest.raises(KeyError, match="no term named"):
        pipe(None, x, weights={"kl": 1.0})


@pytest.mark.backends("jax")
def test_array_weights_do_not_retrace_under_jit(bk: Harness) -> None:
    import jax

    traces = []
    pipe = rg.Pipeline([(rg.L1(), 1.0), (rg.L2(), 0.5)], metrics="array")

    @jax.jit
    def loss(lp: Any, coef: Any) -> Any:
        traces.append(1)
        return pipe(None, lp, weights={"l1_sparsity": coef})[0]

    x = bk.asarray(np.array([-1.0, -2.0]))
    values = [float(loss(x, bk.asarray(np.array(c)))) for c in (0.1, 0.2, 0.3)]
    assert values == pytest.approx([0.1 * 3 + 2.5, 0.2 * 3 + 2.5, 0.3 * 3 + 2.5])
    assert len(traces) == 1


def test_weights_are_python_floats_and_checked_at_construction() -> None:
    pipe = rg.Pipeline([(rg.L1(), 1e-3)])
    _, metrics = pipe(None, np.array([-1.0, -2.0], dtype=np.float32))
    assert metrics["l1_sparsity/weight"] == 1e-3  # not float32's 0.0010000000474974513
    assert pipe.to_config()["pipeline"]["terms"][0]["weight"] == 1e-3
    with pytest.raises(TypeError, match=r"class L1.*not an instance"):
        rg.Pipeline([(rg.L1, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        rg.Pipeline([(rg.L1(), float("nan"))])


def test_named_inputs_and_grad_norms_per_input(bk: Harness) -> None:
    lp = bk.asarray(np.array([-1.0, -2.0]))
    z = bk.asarray(np.array([[0.5, -0.5], [1.0, 2.0]]))
    pipe = rg.Pipeline(
        [rg.Term(rg.L1(), 1.0), rg.Term(rg.L2(), 0.5, input="logits")],
        track_grad_norms=True,
        metrics="array",
    )
    loss, metrics, grads = bk.call(
        lambda a, b: pipe.value_and_grad(None, {"logprobs": a, "logits": b}), lp, z
    )
    assert bk.float(loss) == pytest.approx(3.0 + 0.5 * 5.5)
    np.testing.assert_allclose(bk.to_numpy(grads["logprobs"]), [-1.0, -1.0])
    np.testing.assert_allclose(bk.to_numpy(grads["logits"]), [[0.5, -0.5], [1.0, 2.0]])
    assert bk.float(metrics["l2_weight_decay/grad_norm"]) == pytest.approx(np.sqrt(22.0))
    total = np.sqrt(2.0 + 0.25 * 22.0)
    assert bk.float(metrics["total_grad_norm"]) == pytest.approx(total)
    with pytest.raises(KeyError, match="'logits'"):
        pipe(None, lp)


def test_a_constant_term_has_grad_norm_zero(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.0, -2.0]))

    def constant(data: Any, logprobs: Any) -> Any:
        return bk.xp.asarray(7.0)  # does not depend on its input

    pipe = rg.Pipeline(
        [rg.Term(constant, 1.0, name="const"), (rg.L1(), 1.0)],
        track_grad_norms=True,
        metrics="array",
    )
    if bk.backend.has_autodiff:
        _, metrics = pipe(None, x)
        assert bk.float(metrics["const/grad_norm"]) == 0.0
        assert bk.float(metrics["total_grad_norm"]) == pytest.approx(np.sqrt(2.0))
    else:  # no autodiff and no closed form: a clear error, not a wrong zero
        with pytest.raises(TypeError, match=r"'const'.*no value_and_grad"):
            pipe(None, x)


def test_pipelines_and_terms_pickle_and_copy() -> None:
    pipe = rg.Pipeline(
        [rg.Term(rg.L1(mask=rg.Field("weights")), 1e-3), rg.Term(rg.L2(), 0.5, enabled=False)],
        base_loss=rg.L1(reduce="mean"),
        track_grad_norms=True,
    )
    for again in (pickle.loads(pickle.dumps(pipe)), copy.copy(pipe), copy.deepcopy(pipe)):
        assert again == pipe
        assert hash(again) == hash(pipe)
    term = pipe.terms[1]
    assert pickle.loads(pickle.dumps(term)) == term
    assert copy.deepcopy(term) == term
    assert rg.from_config(pipe.to_config()) == pipe
