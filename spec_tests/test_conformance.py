"""The conformance kit on every built-in and on users' own regularizers, on every backend."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

import regularizers as rg
from regularizers import Batch
from regularizers.testing import check_regularizer

Harness = Any


class MaxAbs(rg.Regularizer):
    """A user's penalty written against the extension API: the largest |t| counted."""

    name: ClassVar[str] = "max_abs"

    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        m = batch.max(batch.xp.abs(batch.values))
        return m, {"max_abs": m}


class Smooth(rg.Regularizer):
    """Σ log(1 + t²), with a closed-form gradient 2t / (1 + t²)."""

    name: ClassVar[str] = "smooth"

    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        v = batch.aggregate(batch.xp.log1p(batch.values * batch.values))
        return v, {"smooth": v}

    def evaluate_with_grad(self, batch: Batch) -> tuple[Any, dict[str, Any], Any]:
        v, m = self.evaluate(batch)
        t = batch.values
        return v, m, batch.aggregate_grad(2 * t / (1 + t * t))


class DuckTyped:
    """Not a subclass at all: a name and a compute, as the Pipeline also accepts."""

    name = "duck"

    def __repr__(self) -> str:  # a stable test id (pytest-xdist compares them across workers)
        return "DuckTyped()"

    def compute(self, data: Any, logprobs: Any) -> tuple[Any, dict[str, Any]]:
        return rg.L1(reduce="mean").compute(data, logprobs)


BUILTINS = [
    rg.L1(),
    rg.L1(reduce="mean", target="probs"),
    rg.L2(),
    rg.L2(center="mean", clip=(-100.0, 0.0)),
    rg.L2(center=-1.0, clip=(None, 0.0), reduce="mean"),
]


@pytest.mark.parametrize(
    "reg", [*BUILTINS, Smooth(), Smooth(reduce="mean"), MaxAbs(), DuckTyped()], ids=repr
)
def test_conformance(bk: Harness, reg: Any) -> None:
    with bk.flags(forbid_compute=False):  # the kit compares values, so it computes Dask graphs
        check_regularizer(reg, bk.xp)


class WrongGradient(Smooth):
    def evaluate_with_grad(self, batch: Batch) -> tuple[Any, dict[str, Any], Any]:
        v, m, g = super().evaluate_with_grad(batch)
        return v, m, 2 * g


class ReadsAField(rg.Regularizer, name="test_squared_gap"):
    """A user's penalty that reads a second field: Σ (t - ref)², closed form 2(t - ref)."""

    ref = rg.option(rg.Field("ref"), check=rg.checks.operand)

    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        gap = batch.values - batch.field(self.ref)
        return batch.aggregate(gap * gap), batch.metrics("gap", gap * gap)

    def evaluate_with_grad(self, batch: Batch) -> tuple[Any, dict[str, Any], Any]:
        value, metrics = self.evaluate(batch)
        return value, metrics, batch.aggregate_grad(2.0 * (batch.values - batch.field(self.ref)))


def _half(xp: Any, lp: Any) -> dict[str, Any]:
    return {"ref": [0.5 * a for a in lp] if isinstance(lp, list) else 0.5 * lp}


@pytest.mark.parametrize("reduce", ["sum", "mean", "seq-mean-token-mean"])
def test_the_kit_checks_a_data_aware_regularizer(bk: Harness, reduce: str) -> None:
    with bk.flags(forbid_compute=False):
        check_regularizer(ReadsAField(reduce=reduce), bk.xp, data=_half)


class WrongFieldGradient(ReadsAField):
    def evaluate_with_grad(self, batch: Batch) -> tuple[Any, dict[str, Any], Any]:
        value, metrics, _ = super().evaluate_with_grad(batch)
        return value, metrics, batch.aggregate_grad(2.0 * batch.values)  # forgot the ref


def test_the_kit_catches_a_wrong_gradient_that_reads_a_field(bk: Harness) -> None:
    with (
        bk.flags(forbid_compute=False),
        pytest.raises(AssertionError, match="gradient equals finite differences"),
    ):
        check_regularizer(WrongFieldGradient(), bk.xp, data=_half)


class Unpicklable(rg.Regularizer):
    """An option whose value does not survive its own check twice: caught by the kit."""

    scale = rg.option(1.0, check=lambda name, v: float(v) * 2)  # not idempotent

    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        return batch.aggregate(self.scale * batch.values), {}


def test_the_kit_checks_the_declaration() -> None:
    import numpy as np

    with pytest.raises(AssertionError, match="rebuilt from options"):
        check_regularizer(Unpicklable(), np)


class NotZeroD(MaxAbs):
    def evaluate(self, batch: Batch) -> tuple[Any, dict[str, Any]]:
        return batch.xp.reshape(super().evaluate(batch)[0], (1,)), {}


class Mutating:
    name = "mutating"

    def compute(self, data: Any, logprobs: Any) -> tuple[Any, dict[str, Any]]:
        for a in logprobs if isinstance(logprobs, list) else [logprobs]:
            a[...] = 0.0
        return rg.L1().compute(data, logprobs)


def test_the_kit_catches_a_wrong_gradient(bk: Harness) -> None:
    # On every backend, NumPy, array-api-strict and Dask included: finite differences.
    with pytest.raises(AssertionError, match="gradient equals finite differences"):
        check_regularizer(WrongGradient(), bk.xp)


@pytest.mark.backends("numpy", "torch", "jax")
def test_the_kit_catches_a_value_that_is_not_0d(bk: Harness) -> None:
    with pytest.raises(AssertionError, match="0-d result"):
        check_regularizer(NotZeroD(), bk.xp)


@pytest.mark.backends("numpy", "torch")  # JAX arrays cannot be changed in place at all
def test_the_kit_catches_mutated_inputs(bk: Harness) -> None:
    with pytest.raises(AssertionError, match="inputs not mutated"):
        check_regularizer(Mutating(), bk.xp)


def test_value_and_grad_falls_back_to_autodiff_or_says_why(bk: Harness) -> None:
    import numpy as np

    x = bk.asarray(np.array([-3.0, 1.0, 0.5]))
    if bk.backend.has_autodiff:
        _, _, g = MaxAbs().value_and_grad(None, x)
        assert bk.to_numpy(g).tolist() == [-1.0, 0.0, 0.0]
    else:
        with pytest.raises(TypeError, match=r"MaxAbs.*no closed-form gradient"):
            MaxAbs().value_and_grad(None, x)
