"""On a GPU, no call of the library waits for the device (SPEC: no copies to the host).

Collected only with ``REGULARIZERS_TORCH_DEVICE=cuda`` (the torch session on a GPU, where the
rest of the suite runs on the device too); a CPU session has no device to wait for. torch's
``set_sync_debug_mode("error")`` turns every device-to-host synchronization (``.item()``, a
boolean index, a data-dependent shape, a blocking copy) into an error, so each test fails at
the line of the library that would stall a training step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regularizers as rg
from regularizers.testing import generic_path

from . import strategies as S
from .conftest import TORCH_DEVICE
from .test_properties import CLASSES, IDS, convert, kwargs

Harness = Any

pytestmark = [
    pytest.mark.backends("torch"),
    pytest.mark.cuda,
]


@contextlib.contextmanager
def _no_sync() -> Iterator[None]:
    import torch

    torch.cuda.synchronize()  # the inputs' copies to the device are not the library's
    try:
        with warnings.catch_warnings():  # "a prototype feature" (an error under -W error)
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("route", ["routed", "generic"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@settings(max_examples=10)
@given(data=st.data())
def test_no_call_waits_for_the_device(
    bk: Harness, cls: type, route: str, data: st.DataObject
) -> None:
    """compute, value_and_grad and autograd's backward through the closed form (or the
    generic path), with the drawn masks, lists and reduce modes, stay on the device."""
    import torch

    case = data.draw(S.cases(cls), label="case")
    x, fields, mask = convert(bk, case)
    leaves = [a.detach().clone().requires_grad_(True) for a in (x if case.is_list else [x])]
    lp = leaves if case.is_list else leaves[0]
    with generic_path() if route == "generic" else contextlib.nullcontext(), _no_sync():
        value, metrics = case.reg.compute(fields, lp, **kwargs(mask))
        if value.requires_grad:
            torch.autograd.grad(value, leaves, allow_unused=True)
        v2, m2, grad = case.reg.value_and_grad(fields, x, **kwargs(mask))
    device = leaves[0].device
    for a in [value, v2, *metrics.values(), *m2.values(), *(grad if case.is_list else [grad])]:
        assert a.device == device, (a.device, device)


def test_a_pipeline_with_counts_waits_for_nothing(bk: Harness) -> None:
    """The Tinker-shaped Pipeline (masked L1 and clipped L2 over a ragged list, the batch's
    global token count) through loss and backward."""
    import torch

    gen = torch.Generator(device=TORCH_DEVICE).manual_seed(0)
    xs = [
        torch.randn(n, device=TORCH_DEVICE, generator=gen, requires_grad=True) for n in (5, 64, 300)
    ]
    ws = [(torch.rand(n, device=TORCH_DEVICE, generator=gen) > 0.3).float() for n in (5, 64, 300)]
    pipe = rg.Pipeline(
        [
            (rg.L1(mask=rg.Field("w"), reduce="mean"), 1e-3),
            (rg.L2(clip=(-5.0, 0.0), center=-1.0, mask=rg.Field("w")), 1e-4),
        ],
        metrics="array",  # "float" reads each metric on the host, by design
    )
    counts = {"tokens": torch.stack([w.sum() for w in ws]).sum().long(), "sequences": 3}
    with _no_sync():
        loss, metrics = pipe({"w": ws}, xs, counts=counts)
        loss.backward()
    assert all(x.grad is not None and x.grad.device == xs[0].device for x in xs)
    assert loss.device == xs[0].device
    arrays = [m for k, m in metrics.items() if not k.endswith("/weight")]  # weights: floats
    assert all(m.device == loss.device for m in arrays)
