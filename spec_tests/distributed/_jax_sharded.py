"""JAX over 8 CPU devices, run by test_jax.py in a fresh interpreter (XLA_FLAGS must be set
before jax is imported): ``python _jax_sharded.py jit|shard_map``.

- ``jit``: inputs sharded over a mesh give the unsharded result under ``jax.jit`` (every
  regularizer, every ``reduce`` mode, ``compute``, ``jax.grad``, ``value_and_grad`` and a
  Pipeline), and every gradient keeps the input's sharding: rows, tokens, or both sharded
  over explicit axes (``make_mesh``'s default), and rows over auto axes.
- ``shard_map``: each device computes its rows with its local ``counts`` summed by
  ``jax.lax.psum``; the psum of the values and of the ``*_raw``/``*_mean`` metrics, the pmax of
  ``*_max``, the root of the psum of the squared grad norms, and the gradients reproduce the
  global batch, for every ``reduce`` mode and for a Pipeline.

Prints ``ok <check>`` per check and ``passed <n>`` at the end; any failure raises.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

from _cases import (  # noqa: E402
    MODES,
    close,
    combine,
    field_data,
    field_readers,
    pipeline,
    ragged,
    regularizers,
    rows,
)

import regularizers as rg  # noqa: E402

PASSED: list[str] = []


def ok(name: str) -> None:
    PASSED.append(name)
    print("ok", name, flush=True)


def _everything(*, split: bool) -> tuple[Any, Any]:
    """One function of (x, mask): every regularizer of every ``reduce`` mode (compute,
    jax.grad, value_and_grad) and a Pipeline of all of them, so that each input sharding
    costs one compilation; and what it gives on NumPy (float64, unsharded)."""
    regs = [r for mode in MODES for r in regularizers(mode, split=split)]
    # one term per mode (tracing a Pipeline of every regularizer 3 times costs a minute)
    pipe = rg.Pipeline(
        [rg.Term(next(regularizers(mode, split=split)), 0.5, name=mode) for mode in MODES],
        track_grad_norms=True,
        metrics="array",
    )

    def fn(x: Any, m: Any) -> Any:
        data = {"mask": m}
        out = {}
        for i, reg in enumerate(regs):
            value, metrics = reg.compute(data, x)
            v2, _, g2 = reg.value_and_grad(data, x)
            out[f"{reg!r} #{i}"] = {
                "value": value,
                "metrics": metrics,
                "value_and_grad value": v2,
                "grads": {
                    "jax.grad": jax.grad(lambda lp, reg=reg: reg.compute(data, lp)[0])(x),
                    "value_and_grad": g2,
                },
            }
        loss, pm = pipe(data, x)
        v2, _, g2 = pipe.value_and_grad(data, x)
        out["Pipeline"] = {
            "value": loss,
            "metrics": pm,
            "value_and_grad value": v2,
            "grads": {"jax.grad": jax.grad(lambda lp: pipe(data, lp)[0])(x), "value_and_grad": g2},
        }
        return out

    x_np, m_np = rows()
    want = {}
    for i, reg in enumerate(regs):
        v, mt, g = reg.value_and_grad({"mask": m_np}, x_np)
        want[f"{reg!r} #{i}"] = (v, mt, g)
    want["Pipeline"] = pipe.value_and_grad({"mask": m_np}, x_np)
    return fn, want


def check_jit() -> None:
    assert jax.device_count() == 8, jax.devices()
    x_np, m_np = rows()
    explicit = (AxisType.Explicit,) * 2
    # Auto axes leave shardings to XLA's propagation: over rows it keeps the input's for the
    # gradient; over tokens it picks its own (docs/distributed.md), so that is not checked.
    meshes = [
        ("explicit rows", jax.make_mesh((8,), ("b",)), P("b")),
        ("explicit tokens", jax.make_mesh((2, 4), ("b", "t"), axis_types=explicit), P(None, "t")),
        (
            "explicit rows x tokens",
            jax.make_mesh((4, 2), ("b", "t"), axis_types=explicit),
            P("b", "t"),
        ),
        ("auto rows", jax.make_mesh((8,), ("b",), axis_types=(AxisType.Auto,)), P("b")),
    ]
    fn, want = _everything(split=False)
    fn = jax.jit(fn)
    for label, mesh, spec in meshes:
        sharding = NamedSharding(mesh, spec)
        x = jax.device_put(x_np, sharding)
        m = jax.device_put(m_np, sharding)
        assert len(x.sharding.device_set) == 8
        got = fn(x, m)
        assert set(got) == set(want)
        for key, (wv, wm, wg) in want.items():
            g = got[key]
            what = f"jit {label}: {key}"
            close(g["value"], wv, f"{what}: value")
            close(g["value_and_grad value"], wv, f"{what}: value_and_grad value")
            assert set(g["metrics"]) == set(wm), what
            for k in wm:
                close(g["metrics"][k], wm[k], f"{what}: {k}")
            for name, grad in g["grads"].items():
                close(grad, wg, f"{what}: {name}")
                assert grad.sharding.is_equivalent_to(x.sharding, x.ndim), (
                    f"{what}: {name} has sharding {grad.sharding}, the input {x.sharding}"
                )
        ok(f"jit {label}")


def check_shard_map() -> None:
    x_np, m_np = rows()
    mesh = jax.make_mesh((8,), ("b",))
    sharding = NamedSharding(mesh, P("b"))
    x = jax.device_put(x_np, sharding)
    m = jax.device_put(m_np, sharding)
    regs = [r for mode in MODES for r in regularizers(mode)]
    pipe = pipeline()
    objs = {f"{reg!r} #{i}": reg for i, reg in enumerate(regs)} | {"Pipeline": pipe}
    counter = regs[0]  # every one reads the same mask: the same counts

    def local(x: Any, m: Any) -> Any:
        """One device's rows, with the global counts: the psum of the parts is the whole."""
        data = {"mask": m}
        counts = {k: jax.lax.psum(c, "b") for k, c in counter.counts(data, x).items()}
        out = {}
        for key, obj in objs.items():
            value, metrics, grad = obj.value_and_grad(data, x, counts=counts)
            combined = {
                k: _whole(v, combine(k)) for k, v in metrics.items() if combine(k) is not None
            }
            out[key] = (jax.lax.psum(value, "b"), combined, grad)
        return out, counts

    specs = ({k: (P(), P(), P("b")) for k in objs}, P())
    got, counts = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=specs)
    )(x, m)
    want_c = counter.counts({"mask": m_np}, x_np)
    assert {k: int(v) for k, v in counts.items()} == {k: int(v) for k, v in want_c.items()}

    def summed(x: Any, m: Any) -> Any:
        """jax.grad through shard_map: of the psum of the parts' values."""

        def part(x: Any, m: Any) -> Any:
            data = {"mask": m}
            counts = {k: jax.lax.psum(c, "b") for k, c in counter.counts(data, x).items()}
            return {
                key: jax.lax.psum(_value(obj, data, x, counts), "b") for key, obj in objs.items()
            }

        return jax.shard_map(part, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P())(x, m)

    through = jax.jit(jax.jacrev(summed))(x, m)
    for key, obj in objs.items():
        what = f"shard_map {key}"
        want_v, want_m, want_g = obj.value_and_grad({"mask": m_np}, x_np)
        value, metrics, grad = got[key]
        close(value, want_v, f"{what}: value")
        assert metrics, what
        for k, v in metrics.items():
            close(v, want_m[k], f"{what}: {k}")
        close(grad, want_g, f"{what}: gradient")
        assert grad.sharding.is_equivalent_to(x.sharding, x.ndim), what
        close(through[key], want_g, f"{what}: jax.grad through shard_map")
        assert through[key].sharding.is_equivalent_to(x.sharding, x.ndim), what
        ok(f"shard_map {key}")


def _whole(v: Any, how: str | None) -> Any:
    """A metric of the whole batch from the parts' (see ``_cases.combine``)."""
    if how == "max":
        return jax.lax.pmax(v, "b")
    if how == "norm":
        return jax.numpy.sqrt(jax.lax.psum(v * v, "b"))
    return jax.lax.psum(v, "b")


def _value(obj: Any, data: Any, x: Any, counts: Any) -> Any:
    if isinstance(obj, rg.Pipeline):
        return obj(data, x, counts=counts)[0]
    return obj.compute(data, x, counts=counts)[0]


def check_eager() -> None:
    """Eager calls (no ``jit``) on rows sharded over the 8 devices: every regularizer of
    every ``reduce`` mode and a Pipeline per mode give NumPy's value and gradient, and the
    gradient keeps the input's sharding. (The constants a call makes are not given the
    input's sharding, which a 0-d array cannot take: they are left for JAX to place.)"""
    x_np, m_np = rows()
    sharding = NamedSharding(jax.make_mesh((8,), ("b",)), P("b"))
    x, m = jax.device_put(x_np, sharding), jax.device_put(m_np, sharding)
    for mode in MODES:
        for obj in [*regularizers(mode, split=False), pipeline(mode, split=False)]:
            call = obj if isinstance(obj, rg.Pipeline) else obj.compute
            want, _ = call({"mask": m_np}, x_np)
            _, _, want_grad = obj.value_and_grad({"mask": m_np}, x_np)
            value, _ = call({"mask": m}, x)
            value2, _, grad = obj.value_and_grad({"mask": m}, x)
            what = f"eager {obj!r}"
            close(value, want, f"{what}: value")
            close(value2, want, f"{what}: value_and_grad value")
            close(grad, want_grad, f"{what}: gradient")
            assert grad.sharding.is_equivalent_to(x.sharding, x.ndim), (what, grad.sharding)
            ok(what)


def _listed(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def check_devices() -> None:
    """Eager calls: fields of ``data`` committed to other devices than the logprobs (one
    array, or a list spread over several devices) are brought to the logprobs' device, so
    the results (``compute``, ``value_and_grad``) equal the all-on-one-device ones, and
    value, metrics and gradients are on the logprobs' device. (Under ``jax.jit`` and
    ``jax.grad`` the logprobs are tracers, which have no device to bring a field to: there
    JAX's own rule holds, arrays committed to different devices raise.)"""
    import numpy as np

    devices = jax.devices()
    home = devices[0]
    xs, masks = ragged()

    def put(v: Any, spread: bool) -> Any:
        """On the logprobs' device, or (``spread``) away from it: datum i of a list on
        device 1 + i % 3, a list across devices."""
        if not isinstance(v, list):
            return jax.device_put(v, devices[1] if spread else home)
        return [jax.device_put(a, devices[1 + i % 3] if spread else home) for i, a in enumerate(v)]

    for layout, shape in (("one array", np.concatenate), ("a list", list)):
        fields = field_data(xs, masks)
        near = {k: put(shape(v), False) for k, v in fields.items()}
        away = {k: put(shape(v), True) for k, v in fields.items()}
        for name, obj in field_readers().items():
            arg = near["scores"] if name.startswith("KL") else put(shape(xs), False)
            call = obj if isinstance(obj, rg.Pipeline) else obj.compute
            want, want_metrics = call(near, arg)
            _, _, want_grads = obj.value_and_grad(near, arg)
            value, metrics = call(away, arg)
            value2, metrics2, grads = obj.value_and_grad(away, arg)
            what = f"devices {layout}: {name}"
            close(value, want, f"{what}: value")
            close(value2, want, f"{what}: value_and_grad value")
            for k in want_metrics:
                close(metrics[k], want_metrics[k], f"{what}: {k}")
            for got, grad in zip(_listed(grads), _listed(want_grads), strict=True):
                close(got, grad, f"{what}: gradient")
                assert got.devices() == {home}, (what, got.devices())
            for out in (value, value2, *metrics.values(), *metrics2.values()):
                if not isinstance(out, float):  # (a Pipeline's term weights are floats)
                    assert out.devices() == {home}, (what, out.devices())
            ok(what)


if __name__ == "__main__":
    parts = {"jit": check_jit, "shard_map": check_shard_map, "eager": check_eager}
    parts["devices"] = check_devices
    parts[sys.argv[1]]()
    print("passed", len(PASSED), flush=True)
