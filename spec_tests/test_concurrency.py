"""Repeated and concurrent calls: the same answers, steady memory, one JAX trace per options."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from typing import Any

import numpy as np
import pytest

import regularizers as rg

Harness = Any
REGS = [
    rg.L1(),
    rg.L1(reduce="mean", target="probs"),
    rg.L2(),
    rg.L2(center="mean"),
    rg.L2(clip=(-100.0, 0.0), center=-2.0, reduce="mean"),
]


def inputs(bk: Harness) -> list[Any]:
    rng = np.random.default_rng(5)
    out: list[Any] = []
    for n in (1, 7, 100, 1000):
        x = -rng.gamma(0.6, 2.0, size=n).astype(np.float32)
        x[:: max(1, n // 5)] = -rng.uniform(50, 200, size=len(x[:: max(1, n // 5)]))
        out.append(bk.asarray(x))
    out.append(bk.asarray([rng.normal(size=13), rng.normal(size=29)]))
    return out


def fingerprint(bk: Harness, reg: rg.Regularizer, x: Any) -> bytes:
    value, metrics, grad = reg.value_and_grad(None, x)
    parts = [bk.to_numpy(value), *(bk.to_numpy(m) for m in metrics.values())]
    parts += bk.to_numpy(grad) if isinstance(grad, list) else [bk.to_numpy(grad)]
    return b"|".join(np.ascontiguousarray(p).tobytes() for p in parts)


@pytest.mark.backends("numpy", "torch")
# torch on CUDA, in a thread whose first CUDA call is cuBLAS (the kernels' ``torch.dot``), warns
# that it sets the device's primary context for that thread: torch's notice, not a result
@pytest.mark.filterwarnings("ignore:Attempting to run cuBLAS, but there was no current CUDA")
def test_eight_threads_give_the_single_threaded_results(bk: Harness) -> None:
    xs = inputs(bk)
    cases = [(r, i) for r in range(len(REGS)) for i in range(len(xs))]
    expected = {c: fingerprint(bk, REGS[c[0]], xs[c[1]]) for c in cases}
    threads, calls = 8, 1000
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            for k in range(calls):
                c = cases[(7 * t + k) % len(cases)]
                if fingerprint(bk, REGS[c[0]], xs[c[1]]) != expected[c]:
                    mismatches.append(c)
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in pool), "a thread hung"
    assert not errors, errors[:3]
    assert not mismatches, f"{len(mismatches)} of {threads * calls} calls differ"
    print(f"concurrency: {threads} threads x {calls} calls on {bk.name}: all identical")


@pytest.mark.backends("numpy", "torch")
def test_memory_is_steady_over_100k_calls(bk: Harness) -> None:
    x = inputs(bk)[3]  # 1e3 elements
    regs = REGS[:4]
    for k in range(2000):  # warm up caches (array-api-compat's, the library's, the backend's)
        regs[k % 4].compute(None, x)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(100_000):
            regs[k % 4].compute(None, x)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"memory: 100000 calls at 1e3 elements on {bk.name}: tracemalloc grew {grown} bytes")
    assert grown < 1 << 20, f"grew {grown} bytes over 100,000 calls"


@pytest.mark.backends("jax")
def test_equal_regularizers_hit_the_same_jit_cache_entry(bk: Harness) -> None:
    import jax

    traces: list[str] = []

    def loss(reg: rg.Regularizer, x: Any) -> Any:
        traces.append(repr(reg))  # runs only while tracing
        return reg.compute(None, x)[0]

    jitted = jax.jit(loss, static_argnums=0)
    x = bk.asarray(np.array([-1.0, -2.0, 0.5]))
    a, b = rg.L2(center="mean", clip=(-100.0, 0.0)), rg.L2(clip=[-100, 0], center="mean")
    assert a is not b
    assert a == b
    assert hash(a) == hash(b)
    first, second = jitted(a, x), jitted(b, x)
    assert traces == [repr(a)], traces
    assert bk.float(first) == bk.float(second)
    jitted(rg.L2(), x)
    assert len(traces) == 2  # different options do retrace
