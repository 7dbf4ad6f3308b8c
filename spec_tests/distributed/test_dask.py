"""SPEC 11, Dask: every regularizer and Pipeline on a ``LocalCluster`` of worker processes.

- every regularizer, every ``reduce`` mode, lists and rows, ``compute``, ``value_and_grad``,
  ``counts`` and a Pipeline with grad norms give the NumPy result;
- ``to_floats`` submits **one** graph, however many metrics (counted by a scheduler plugin);
- the scheduler logs no warning, also when the caller computes the value or gradient after
  the metrics (the ``cluster`` fixture fails a test that leaves one);
- a dump bigger than a worker's memory limit gives the float64 NumPy result.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest

import regularizers as rg

from ._cases import MODES, close, flat, pipeline, ragged, regularizers, rows


def _dask_batches(chunks: int) -> list[tuple[str, Any, Any, Any, Any]]:
    """(label, NumPy logprobs, NumPy data, Dask logprobs, Dask data)."""
    xs, ms = ragged()
    x2, m2 = rows()
    return [
        (
            "list",
            xs,
            {"mask": ms},
            [da.from_array(x, chunks=chunks) for x in xs],
            {"mask": [da.from_array(m, chunks=chunks) for m in ms]},
        ),
        (
            "rows",
            x2,
            {"mask": m2},
            da.from_array(x2, chunks=(chunks, 7)),
            {"mask": da.from_array(m2, chunks=(chunks, 7))},
        ),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_every_regularizer_and_pipeline_match_numpy(cluster: Any, mode: str) -> None:
    """Each step is one graph, on inputs of their own (chunked differently), as a caller
    computes: graphs computed one after another that share keys make the scheduler warn."""
    regs = list(regularizers(mode, split=False))
    pipe = pipeline(mode, split=False)

    # value_and_grad, compute, counts of every regularizer and the Pipeline: one compute.
    want, lazy = {}, {}
    for label, x, data, dx, ddata in _dask_batches(chunks=4):
        for i, reg in enumerate(regs):
            want[label, i] = (
                reg.value_and_grad(data, x),
                reg.compute(data, x),
                reg.counts(data, x),
            )
            lazy[label, i] = (
                reg.value_and_grad(ddata, dx),
                reg.compute(ddata, dx),
                reg.counts(ddata, dx),
            )
        want[label, "pipe"] = pipe.value_and_grad(data, x)
        lazy[label, "pipe"] = pipe.value_and_grad(ddata, dx)
    (got,) = dask.compute(lazy)
    for key, w in want.items():
        what = f"{key[0]}: {pipe if key[1] == 'pipe' else regs[key[1]]!r}"
        if key[1] == "pipe":
            _same(got[key], w, what)
        else:
            (gv, gm, gg), (cv, cm), gc = got[key]
            (wv, wm, wg), (v, m), wc = w
            _same((gv, gm, gg), (wv, wm, wg), f"{what} value_and_grad")
            _same((cv, cm), (v, m), f"{what} compute")
            assert {k: int(c) for k, c in gc.items()} == {k: int(c) for k, c in wc.items()}, what

    # to_floats: every metric of every regularizer, and the values, in one graph (on the
    # list: the case; the one-graph property does not depend on the input's shape).
    for label, x, data, dx, ddata in _dask_batches(chunks=3)[:1]:
        metrics, expected = {}, {}
        for i, reg in enumerate(regs):
            for name, (v, m) in (("want", reg.compute(data, x)), ("got", reg.compute(ddata, dx))):
                into = expected if name == "want" else metrics
                into.update({f"{i}/{k}": a for k, a in m.items()}, **{f"{i}/value": v})
        before = cluster.graphs()
        floats = rg.to_floats(metrics)
        assert cluster.graphs() == before + 1, f"{label}: to_floats ran more than one graph"
        assert floats == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-9)

    # A float-metrics Pipeline: one graph per call, and the loss comes computed with it.
    fpipe = pipeline(mode, split=False, metrics="float")
    for label, x, data, dx, ddata in _dask_batches(chunks=5)[:1]:
        want_loss, want_m = fpipe(data, x)
        before = cluster.graphs()
        loss, got_m = fpipe(ddata, dx)
        assert cluster.graphs() == before + 1, f"{label}: the Pipeline ran more than one graph"
        assert got_m == pytest.approx(want_m, rel=1e-9)
        assert len(loss.__dask_graph__()) == 1  # computed: nothing runs twice
        close(loss.compute(), want_loss, f"{label}: Pipeline loss")


def _same(got: Any, want: Any, what: str) -> None:
    """(value, metrics[, grad]) from Dask (computed) equal those from NumPy."""
    close(got[0], want[0], f"{what}: value")
    assert set(got[1]) == set(want[1]), what
    for k in want[1]:
        close(got[1][k], want[1][k], f"{what}: {k}")
    if len(want) == 3:
        close(flat(got[2]), flat(want[2]), f"{what}: gradient")


def test_to_floats_submits_one_graph(cluster: Any) -> None:
    """The measured problem: to_floats computed each metric in its own graph (3 metrics, 3
    runs). Several regularizers' metrics together are still one graph."""
    x = da.from_array(np.linspace(-3.0, 1.0, 4000), chunks=500)
    metrics: dict[str, Any] = {}
    for reg in (rg.L1(), rg.L2(clip=(-2.0, 0.0)), rg.L2(reduce="mean", center="mean")):
        value, m = reg(x)
        metrics.update({f"{reg!r}/{k}": v for k, v in m.items()}, **{repr(reg): value})
    assert len(metrics) == 11
    before = cluster.graphs()
    floats = rg.to_floats(metrics)
    assert cluster.graphs() - before == 1
    assert all(isinstance(v, float) for v in floats.values())
    assert floats["L1()/l1_raw"] == pytest.approx(np.abs(np.linspace(-3.0, 1.0, 4000)).sum())


def test_pipeline_grad_norms_over_a_list_warns_nothing(cluster: Any) -> None:
    """The measured problem: a Pipeline with grad norms over a list of Dask arrays made the
    scheduler warn "Detected different run_spec" (graphs sharing keys, fused differently).
    Two steps of a loop, each computing the loss after the metrics, warn nothing."""
    rng = np.random.default_rng(0)
    xs = [-rng.gamma(1.0, 1.0, size=n) for n in (7, 11, 4)]
    pipe = rg.Pipeline([(rg.L1(), 1.0), (rg.L2(clip=(-3.0, 0.0)), 0.5)], track_grad_norms=True)
    want_loss, want = pipe(None, xs)
    for _ in range(2):
        loss, metrics = pipe(None, [da.from_array(x, chunks=5) for x in xs])
        assert loss.compute() == pytest.approx(want_loss)
        assert metrics == pytest.approx(want)
    assert cluster.warnings() == []
