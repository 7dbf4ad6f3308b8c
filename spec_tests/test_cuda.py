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

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regularizers as rg
from regularizers.testing import generic_path

from . import strategies as S
from .conftest import TORCH_DEVICE
from .distributed._cases import close, field_data, field_readers, ragged
from .test_fused_grad import _listed
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


@pytest.mark.parametrize("layout", ["one array", "a list", "a list across devices"])
@pytest.mark.parametrize("name", sorted(field_readers()))
def test_fields_on_the_host_are_brought_to_the_device(bk: Harness, name: str, layout: str) -> None:
    """Fields of ``data`` on the CPU (one tensor, a list, or a list whose datums alternate
    between the CPU and the GPU) with logprobs on the GPU: ``compute``, ``value_and_grad``
    and autograd's backward give what the all-on-the-GPU call gives, on the GPU."""
    import torch

    xs, masks = ragged()
    fields = field_data(xs, masks)
    joined = layout == "one array"

    def put(v: list[Any], away: bool) -> Any:
        if joined:
            return torch.asarray(np.concatenate(v), device="cpu" if away else TORCH_DEVICE)
        on = ["cpu", TORCH_DEVICE] if layout == "a list across devices" else ["cpu"]
        return [
            torch.asarray(a, device=on[i % len(on)] if away else TORCH_DEVICE)
            for i, a in enumerate(v)
        ]

    near = {k: put(v, away=False) for k, v in fields.items()}
    away = {k: put(v, away=True) for k, v in fields.items()}
    obj = field_readers()[name]
    arg = near["scores"] if name.startswith("KL") else put(xs, away=False)
    call = obj if isinstance(obj, rg.Pipeline) else obj.compute
    want, want_metrics = call(near, arg)
    _, _, want_grads = obj.value_and_grad(near, arg)
    value, metrics = call(away, arg)
    value2, metrics2, grads = obj.value_and_grad(away, arg)
    leaves = [
        a.detach().clone().requires_grad_(True) for a in (arg if isinstance(arg, list) else [arg])
    ]
    loss, _ = call(away, leaves if isinstance(arg, list) else leaves[0])
    if loss.requires_grad:  # (L2 of a Field target does not depend on the logprobs)
        loss.backward()
    device = _listed(arg)[0].device
    outs = [value, value2, loss, *metrics.values(), *metrics2.values()]
    outs += [leaf.grad for leaf in leaves if leaf.grad is not None]
    for out in [*outs, *_listed(grads)]:
        if not isinstance(out, float):  # (a Pipeline's term weights are floats)
            assert out.device == device, (name, out.device)
    for got in (value, value2, loss):
        close(_host(got), _host(want), f"{name}: value")
    for k, m in want_metrics.items():
        close(_host(metrics[k]), _host(m), f"{name}: {k}")
    for got, by_autograd, want_grad in zip(
        _listed(grads), leaves, _listed(want_grads), strict=True
    ):
        close(_host(got), _host(want_grad), f"{name}: gradient")
        autograd = 0.0 * want_grad if by_autograd.grad is None else by_autograd.grad
        close(_host(autograd), _host(want_grad), f"{name}: autograd's gradient")


def _host(v: Any) -> Any:
    """A tensor's values on the host (a float as it is)."""
    return v.detach().cpu() if hasattr(v, "detach") else v
