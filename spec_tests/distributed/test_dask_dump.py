"""SPEC 11, Dask: a logprob dump bigger than a worker's memory, analysed on a cluster.

1 GiB of float32 logprobs (a padded ``[4096, 65536]`` batch, as a stack of ``.npy`` files
written chunk by chunk) is read lazily by two workers limited to 256 MiB each, so neither
worker (nor both together) could hold it. A Pipeline computes every metric and the loss in one
graph; each equals a float64 NumPy reference computed here chunk by chunk. (Grad norms would
triple the run time here; on the cluster they are checked in test_dask.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest

import regularizers as rg

B, T = 4096, 65536  # 2**28 float32 = 1 GiB
ROWS = 16  # rows per chunk: 4 MiB (8 MiB chunks let a 256 MiB worker reach its 95% budget)
MAX_TOKENS = 65536.0
CLIP, CENTER = (-4.0, 0.0), -1.0


def _block(block_info: Any = None) -> np.ndarray:
    info = block_info[None]
    rng = np.random.default_rng(info["chunk-location"][0])
    return -rng.standard_exponential(info["chunk-shape"], dtype=np.float32)


def _write_dump(path: Path) -> None:
    """Written chunk by chunk (never all in memory), by threads of this process."""
    x = da.map_blocks(_block, chunks=((ROWS,) * (B // ROWS), (T,)), dtype=np.float32)
    with dask.config.set(scheduler="threads", num_workers=2):
        da.to_npy_stack(str(path), x, axis=0)


def _lengths() -> np.ndarray:
    """Tokens per row (the rest is padding); some rows are empty."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[rng.random(B) < 0.02] = 0
    return lengths


PIPE = rg.Pipeline(
    [
        rg.Term(rg.L1(reduce="seq-mean-token-mean", mask=rg.Field("mask")), 1.0, name="l1"),
        rg.Term(
            rg.L2(
                clip=CLIP,
                center=CENTER,
                reduce="seq-mean-token-sum-norm",
                max_tokens=MAX_TOKENS,
                mask=rg.Field("mask"),
            ),
            0.5,
            name="l2",
        ),
    ],
)


def _reference(path: Path, lengths: np.ndarray) -> dict[str, float]:
    """PIPE's metrics in float64, one chunk file at a time."""
    n = float(lengths.sum())
    s = float((lengths > 0).sum())
    # the weight of a token, per row: seq-mean-token-mean (l1), seq-mean-token-sum-norm (l2)
    w1 = np.where(lengths > 0, 1.0 / (s * np.maximum(lengths, 1)), 0.0)
    w2 = 1.0 / (s * MAX_TOKENS)
    acc = dict.fromkeys(("l1_raw", "l1_value", "l2_raw", "l2_max"), 0.0)
    for i in range(B // ROWS):
        x = np.load(path / f"{i}.npy", mmap_mode="r").astype(np.float64)
        rows = slice(i * ROWS, (i + 1) * ROWS)
        mask = np.arange(T)[None, :] < lengths[rows, None]
        a = np.where(mask, np.abs(x), 0.0)
        acc["l1_raw"] += a.sum()
        acc["l1_value"] += (a.sum(axis=1) * w1[rows]).sum()
        d = np.clip(x, *CLIP) - CENTER
        p = np.where(mask, d * d, 0.0)
        acc["l2_raw"] += p.sum()
        acc["l2_max"] = max(acc["l2_max"], p.max())
    l1, l2 = acc["l1_value"], acc["l2_raw"] * w2
    return {
        "loss_total": l1 + 0.5 * l2,
        "regularizer_total": l1 + 0.5 * l2,
        "l1/value": l1,
        "l1/weight": 1.0,
        "l1/contribution": l1,
        "l1/l1_raw": acc["l1_raw"],
        "l1/l1_mean": acc["l1_raw"] / n,
        "l2/value": l2,
        "l2/weight": 0.5,
        "l2/contribution": 0.5 * l2,
        "l2/l2_raw": acc["l2_raw"],
        "l2/l2_mean": acc["l2_raw"] / n,
        "l2/l2_max": acc["l2_max"],
    }


def test_a_dump_bigger_than_a_workers_memory(cluster: Any, tmp_path: Path) -> None:
    path = tmp_path / "logprobs"
    _write_dump(path)
    x = da.from_npy_stack(str(path))
    limits = [w["memory_limit"] for w in cluster.client.scheduler_info()["workers"].values()]
    assert len(limits) == 2
    assert x.nbytes == 2**30 > sum(limits), (x.nbytes, limits)  # bigger than both together

    lengths = _lengths()
    mask = da.arange(T, chunks=T)[None, :] < da.from_array(lengths[:, None], chunks=(ROWS, 1))
    before = cluster.graphs()
    loss, metrics = PIPE({"mask": mask}, x)
    assert cluster.graphs() == before + 1  # every metric, and the loss, in one graph

    want = _reference(path, lengths)
    assert set(metrics) == set(want)
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4), key
    assert len(loss.__dask_graph__()) == 1  # computed with the metrics, not run again
    assert float(loss.compute()) == pytest.approx(want["loss_total"], rel=1e-4)
