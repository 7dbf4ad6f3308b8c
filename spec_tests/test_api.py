"""SPEC sections 2 and 4: the public surface, the input forms, and the caller's arrays."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import regularizers as rg

Harness = Any


# ---- identity of a regularizer -------------------------------------------------------------
def test_names() -> None:
    assert rg.L1.name == rg.L1().name == "l1_sparsity"
    assert rg.L2.name == rg.L2().name == "l2_weight_decay"


def test_repr_shows_the_options_that_differ_from_defaults() -> None:
    assert repr(rg.L2(center="mean", clip=(-100.0, 0.0))) == "L2(center='mean', clip=(-100.0, 0.0))"
    assert repr(rg.L1()) == "L1()"
    assert (
        repr(rg.L1(target=("field", "w"), reduce="mean")) == "L1(target=Field('w'), reduce='mean')"
    )
    assert repr(rg.L2(center=0.0)) == "L2(center=0.0)"


def test_equal_by_options_and_hashable() -> None:
    a = rg.L2(center="mean", clip=[-100, 0])
    b = rg.L2(clip=(-100.0, 0.0), center="mean")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != rg.L2(center="mean")
    assert rg.L1() != rg.L2()
    assert rg.L1(target=rg.Field("w")) == rg.L1(target=("field", "w"))
    assert rg.L2(center=None) != rg.L2(center=0.0)  # None is "no centering"; 0.0 is a number


def test_immutable() -> None:
    reg = rg.L2(center="mean")
    with pytest.raises(AttributeError, match="immutable"):
        reg.center = None  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        reg.reduce = "mean"  # type: ignore[misc]
    assert reg.center == "mean"


def test_pickle_and_copy_round_trip() -> None:
    reg = rg.L2(target=rg.Field("advantages"), center=-1.0, clip=(None, 0.0), reduce="mean")
    assert pickle.loads(pickle.dumps(reg)) == reg
    assert copy.deepcopy(reg) == reg
    assert copy.copy(reg) == reg


def test_array_mask_option_compares_by_identity() -> None:
    m = np.ones(3)
    assert rg.L1(mask=m) == rg.L1(mask=m)
    assert hash(rg.L1(mask=m)) == hash(rg.L1(mask=m))
    assert rg.L1(mask=m) != rg.L1(mask=m.copy())
    assert rg.L1(mask=m).mask is m


# ---- the call protocol --------------------------------------------------------------------
def test_call_is_compute_without_data(bk: Harness) -> None:
    x = bk.asarray(np.array([-1.5, 0.0, 2.0]))
    for reg in (rg.L1(), rg.L2(center="mean")):
        v1, m1 = bk.call(lambda a, r=reg: r(a), x)
        v2, m2 = bk.call(lambda a, r=reg: r.compute(None, a), x)
        assert bk.float(v1) == bk.float(v2)
        assert rg.to_floats(m1) == rg.to_floats(m2)


def test_to_floats(bk: Harness) -> None:
    x = bk.asarray(np.array([-2.0, 0.5, 1.0]))
    _, metrics = bk.call(lambda a: rg.L2()(a), x)
    floats = rg.to_floats(metrics)
    assert floats == {"l2_raw": 5.25, "l2_mean": 1.75, "l2_max": 4.0}
    assert all(type(v) is float for v in floats.values())
    with pytest.raises(TypeError, match=r"'bad'.*shape"):
        rg.to_floats({"bad": bk.asarray(np.zeros(2))})


def test_outputs_live_where_the_input_lives(bk: Harness) -> None:
    from array_api_compat import array_namespace, device

    x = bk.asarray(np.linspace(-3.0, 1.0, 7, dtype=np.float32))
    value, metrics, grad = bk.call(lambda a: rg.L2(clip=(-2.0, 0.0)).value_and_grad(None, a), x)
    for a in (value, *metrics.values(), grad):
        assert array_namespace(a) is array_namespace(x)
        assert device(a) == device(x)


# ---- input forms (SPEC section 4) -------------------------------------------------------------
class TensorData:
    """Duck-typed like Tinker's TensorData: holds a list, converts on request."""

    def __init__(self, data: list[float]) -> None:
        self.data = data
        self.calls: list[str] = []

    def to_numpy(self) -> np.ndarray:
        self.calls.append("numpy")
        return np.asarray(self.data, dtype=np.float32)

    def to_torch(self) -> Any:
        import torch

        self.calls.append("torch")
        return torch.tensor(self.data, dtype=torch.float32)


def datums(weights: list[list[float]], **extra: list[list[float]]) -> list[Any]:
    out = []
    for i, w in enumerate(weights):
        inputs: dict[str, Any] = {"weights": TensorData(w)}
        inputs.update({k: v[i] for k, v in extra.items()})
        out.append(SimpleNamespace(loss_fn_inputs=inputs))
    return out


def test_field_target_from_mapping_and_datums(bk: Harness) -> None:
    adv = [np.array([1.0, -2.0, 0.5]), np.array([3.0])]
    lp = bk.asarray([np.array([-1.0, -2.0, -3.0]), np.array([-4.0])])
    reg = rg.L1(target=rg.Field("advantages"))
    want = 6.5
    from_mapping = reg.compute({"advantages": adv}, lp)
    from_lists = reg.compute({"advantages": [list(a) for a in adv]}, lp)
    from_datums = reg.compute(datums([[1, 1, 1], [1]], advantages=adv), lp)
    for value, _ in (from_mapping, from_lists, from_datums):
        assert bk.float(value) == want
        assert type(value).__module__.split(".")[0] == type(lp[0]).__module__.split(".")[0]
    # The target does not depend on logprobs: the gradient w.r.t. them is 0, shaped like them.
    _, _, g = reg.value_and_grad({"advantages": adv}, lp)
    assert [bk.to_numpy(a).tolist() for a in g] == [[0.0, 0.0, 0.0], [0.0]]


def test_field_mask_read_from_every_datum(bk: Harness) -> None:
    lp = bk.asarray([np.array([-1.0, -2.0, -3.0]), np.array([-4.0, -5.0])])
    data = datums([[0, 1, 1], [0, 1]])
    value, metrics = rg.L2(mask=rg.Field("weights"), reduce="mean").compute(data, lp)
    assert bk.float(value) == pytest.approx((4 + 9 + 25) / 3)
    assert rg.to_floats(metrics)["l2_max"] == 25.0
    want_via = "torch" if bk.library == "torch" else "numpy"
    assert all(d.loss_fn_inputs["weights"].calls == [want_via] for d in data)
    _, _, g = rg.L2(mask=("field", "weights")).value_and_grad(data, lp)
    assert [bk.to_numpy(a).tolist() for a in g] == [[0.0, -4.0, -6.0], [0.0, -10.0]]


def test_all_zero_mask_gives_zero(bk: Harness) -> None:
    x = bk.asarray(np.array([[-1.0, np.nan], [3.0, -np.inf]]))
    zero = bk.asarray(np.zeros((2, 2), dtype=bool))
    for reg in (rg.L1(reduce="mean"), rg.L2(center="mean", reduce="mean")):
        value, metrics, g = bk.call(lambda a, m, r=reg: r.value_and_grad(None, a, mask=m), x, zero)
        assert bk.float(value) == 0.0
        assert all(v == 0.0 for v in rg.to_floats(metrics).values())
        assert (bk.to_numpy(g) == 0).all()


def test_any_shape(bk: Harness) -> None:
    rng = np.random.default_rng(0)
    base = -rng.exponential(3.0, size=24)
    for shape in [(24,), (4, 6), (2, 3, 4)]:
        value, _, g = rg.L2(center="mean").value_and_grad(None, bk.asarray(base.reshape(shape)))
        assert bk.to_numpy(g).shape == shape
        np.testing.assert_allclose(bk.float(value), ((base - base.mean()) ** 2).sum())


# ---- the caller's arrays are left alone -------------------------------------------------
def test_inputs_are_not_modified(bk: Harness) -> None:
    raw = np.array([[-np.inf, -150.0, -1.0], [0.0, np.nan, 2.0]])
    x = bk.asarray(raw)
    mask = bk.asarray(np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))
    for reg in (rg.L1(target="probs"), rg.L2(center="mean", clip=(-100.0, 0.0))):
        bk.call(lambda a, m, r=reg: r.compute(None, a, mask=m), x, mask)
        bk.call(lambda a, m, r=reg: r.value_and_grad(None, a, mask=m), x, mask)
    np.testing.assert_array_equal(bk.to_numpy(x), raw)
    np.testing.assert_array_equal(bk.to_numpy(mask), [[1, 0, 1], [1, 0, 1]])


@pytest.mark.backends("torch")
def test_torch_keeps_requires_grad_and_backward_reaches_every_datum(bk: Harness) -> None:
    import torch

    xs = [
        torch.tensor([-1.0, 0.0, -3.0], requires_grad=True),
        torch.tensor([[-0.5, -200.0]], requires_grad=True),
    ]
    value, _ = rg.L2(clip=(-100.0, 0.0)).compute(None, xs)
    assert all(x.requires_grad for x in xs)
    assert value.requires_grad
    value.backward()
    assert xs[0].grad is not None
    assert xs[1].grad is not None
    assert xs[0].grad.tolist() == [-2.0, 0.0, -6.0]
    assert xs[1].grad.tolist() == [[-1.0, 0.0]]


@pytest.mark.backends("torch")
def test_torch_compile_fullgraph(bk: Harness) -> None:
    import torch

    reg = rg.L2(center="mean", clip=(-100.0, 0.0), reduce="mean")
    x = torch.tensor([-1.0, -3.0, -float("inf"), 0.0])
    compiled = torch.compile(lambda a: reg.compute(None, a), fullgraph=True, backend="eager")
    value, metrics = compiled(x)
    eager_value, eager_metrics = reg.compute(None, x)
    assert value.item() == pytest.approx(eager_value.item())
    assert rg.to_floats(metrics) == pytest.approx(rg.to_floats(eager_metrics))


@pytest.mark.backends("jax")
def test_jax_jit_of_a_regularizer_itself(bk: Harness) -> None:
    import jax

    reg = rg.L2(center="mean")
    x = bk.asarray(np.array([-1.0, -2.0, -6.0]))
    value, metrics = jax.jit(reg)(x)  # a regularizer is a callable jax can hold
    assert bk.float(value) == pytest.approx(14.0)
    assert rg.to_floats(metrics)["l2_max"] == pytest.approx(9.0)
