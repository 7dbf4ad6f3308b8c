"""AdaptiveKLController (SPEC 8.5): Ziegler et al. (2019)'s adaptive KL coefficient.

coef <- coef · (1 + clip(kl / target - 1, -0.2, 0.2) · n_steps / horizon): checked against a
sequence computed by hand, the ±0.2 clipping, the value fed to a Pipeline as a call-time
weight on every backend, 0-d arrays of every library as the measured KL, pickling, copying,
configs and typed errors.
"""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import regularizers as rg

Harness = Any


def test_update_follows_a_hand_computed_sequence() -> None:
    ctl = rg.AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    # (kl, n_steps) -> error clip(kl / 6 - 1, -0.2, 0.2) -> factor 1 + error * n / 10000
    steps = [
        (6.0, 100, 1.0),  # on target: error 0
        (7.2, 100, 1.002),  # +0.2 (not clipped) * 0.01
        (6.6, 200, 1.002),  # +0.1 * 0.02
        (0.0, 50, 0.999),  # -1 clipped to -0.2, * 0.005
        (1e9, 1000, 1.02),  # clipped to +0.2, * 0.1
        (4.5, 400, 0.992),  # -0.25 clipped to -0.2, * 0.04
    ]
    want = 0.1
    for kl, n, factor in steps:
        want = want * factor
        got = ctl.update(kl, n)
        assert got == pytest.approx(want, rel=1e-14, abs=0)
        assert ctl.value == got
    assert want == pytest.approx(0.1 * 1.002 * 1.002 * 0.999 * 1.02 * 0.992, rel=1e-14)


@pytest.mark.parametrize(
    ("ratio", "error"),
    [
        (0.0, -0.2),
        (0.5, -0.2),
        (0.8, -0.2),
        (0.9, -0.1),
        (1.0, 0.0),
        (1.1, 0.1),
        (1.2, 0.2),
        (3.0, 0.2),
        (float("inf"), 0.2),
        (-5.0, -0.2),
    ],
)
def test_error_is_clipped_to_a_fifth(ratio: float, error: float) -> None:
    ctl = rg.AdaptiveKLController(init=1.0, target=4.0, horizon=100)
    got = ctl.update(ratio * 4.0, n_steps=10)
    assert got == pytest.approx(1.0 + error * 0.1, rel=1e-14)


@given(
    init=st.floats(1e-4, 10.0),
    target=st.floats(0.1, 50.0),
    horizon=st.integers(1, 100_000),
    kls=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=20),
    n=st.integers(0, 1000),
)
def test_one_step_never_moves_more_than_a_fifth_per_horizon(
    init: float, target: float, horizon: int, kls: list[float], n: int
) -> None:
    n = min(n, horizon)  # the factor stays within [0.8, 1.2]
    ctl = rg.AdaptiveKLController(init=init, target=target, horizon=horizon)
    for kl in kls:
        before = ctl.value
        after = ctl.update(kl, n)
        bound = (0.2 * n / horizon + 4 * np.finfo(float).eps) * before  # + rounding
        assert abs(after - before) <= bound
        assert (after - before) * (kl - target) >= 0, "moves towards the target"
        assert after > 0


def test_value_is_a_call_time_weight(bk: Harness) -> None:
    ctl = rg.AdaptiveKLController(init=0.05, target=1.0, horizon=100)
    pipe = rg.Pipeline([rg.Term(rg.L1(), 1.0, name="sampled_kl")], metrics="array")
    x = np.array([-0.5, -1.25, -2.0, 0.0])
    lp = bk.asarray(x)
    for _ in range(3):
        w = ctl.value
        loss, metrics = bk.call(lambda a, w=w: pipe(None, a, weights={"sampled_kl": w}), lp)
        assert bk.float(loss) == pytest.approx(w * 3.75, rel=1e-14)
        assert bk.float(metrics["sampled_kl/contribution"]) == pytest.approx(w * 3.75, rel=1e-14)
        # the measured value comes back as a 0-d array of the backend
        ctl.update(metrics["sampled_kl/l1_mean"], n_steps=10)  # 0.9375 / 1 - 1 = -0.0625
        assert ctl.value == pytest.approx(w * (1 - 0.0625 * 0.1), rel=1e-14)


def test_update_reads_0d_arrays_of_every_library(bk: Harness) -> None:
    ctl = rg.AdaptiveKLController(init=1.0, target=2.0, horizon=10)
    kl = bk.asarray(np.array(2.2))
    assert ctl.update(kl, 1) == pytest.approx(1.01, rel=1e-14)
    nan = bk.asarray(np.array(np.nan))
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(nan, 1)
    with pytest.raises(TypeError, match="current_kl"):
        ctl.update(bk.asarray(np.array([1.0, 2.0])), 1)
    assert ctl.value == pytest.approx(1.01, rel=1e-14), "a rejected update changes nothing"


@pytest.mark.backends("torch")
def test_update_reads_a_tensor_that_requires_grad(bk: Harness) -> None:
    import torch

    kl = torch.tensor(2.2, dtype=torch.float64, requires_grad=True) * 1.0
    ctl = rg.AdaptiveKLController(init=1.0, target=2.0, horizon=10)
    assert ctl.update(kl, 1) == pytest.approx(1.01, rel=1e-14)


def test_numbers_of_every_kind() -> None:
    ctl = rg.AdaptiveKLController(init=1.0, target=2.0, horizon=10)
    ctl.update(np.float32(2.0), np.int64(3))
    ctl.update(2, 0)
    assert ctl.value == 1.0
    assert ctl.update(0.0, 0) == 1.0, "no steps, no change"
    for bad in ("1.0", None, [1.0], True):
        with pytest.raises(TypeError, match="current_kl"):
            ctl.update(bad, 1)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    with pytest.raises(TypeError, match="n_steps"):
        ctl.update(1.0, "3")
    with pytest.raises(ValueError, match="n_steps"):  # 1 - 0.2 * 60 / 10 < 0
        ctl.update(0.0, 60)
    assert ctl.value == 1.0


@pytest.mark.parametrize("option", ["init", "target", "horizon"])
def test_constructor_checks_each_option(option: str) -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=option):
            rg.AdaptiveKLController(**{option: bad})
    for bad in ("1", None, True):
        with pytest.raises(TypeError, match=option):
            rg.AdaptiveKLController(**{option: bad})


def test_pickle_copy_repr_and_config() -> None:
    ctl = rg.AdaptiveKLController(init=0.2, target=3.0, horizon=500)
    ctl.update(4.0, 25)
    again = pickle.loads(pickle.dumps(ctl))
    assert again == ctl
    assert again.value == ctl.value
    twin = copy.copy(ctl)
    deep = copy.deepcopy(ctl)
    twin.update(0.0, 25)
    assert twin.value < ctl.value == deep.value, "copies are independent"
    assert ctl != twin
    assert repr(ctl) == (
        f"AdaptiveKLController(init=0.2, target=3.0, horizon=500, value={ctl.value!r})"
    )
    config = ctl.to_config()
    restored = rg.AdaptiveKLController.from_config(json.loads(json.dumps(config)))
    assert restored == ctl
    with pytest.raises(ValueError, match="controller"):
        rg.AdaptiveKLController.from_config({"regularizer": "l1_sparsity"})
    with pytest.raises(TypeError):
        hash(ctl)  # mutable: not hashable
    assert "AdaptiveKLController" in rg.__all__
