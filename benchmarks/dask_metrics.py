"""One ``dask.compute`` for every metric against one per metric, on a ``LocalCluster``.

``python benchmarks/dask_metrics.py [n]`` (default 2e7 float32 logprobs, stored as a stack of
``.npy`` chunks in a temporary directory and read by the workers, as a dump is analysed): the
three metrics of ``L2(clip=(-100, 0))`` computed by ``rg.to_floats`` (one graph: each chunk is
read once) and one by one (three graphs: what ``to_floats`` did before; each reads every
chunk again). Prints the medians of 5 runs each, and the cluster it ran on. Quoted in
``docs/distributed.md``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import regularizers as rg

CHUNK = 1_000_000
REPEATS = 5


def _block(block_info: Any = None) -> np.ndarray:
    info = block_info[None]
    rng = np.random.default_rng(info["chunk-location"][0])
    return -rng.standard_exponential(info["chunk-shape"], dtype=np.float32)


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        x = da.map_blocks(_block, chunks=((CHUNK,) * (n // CHUNK),), dtype=np.float32)
        with dask.config.set(scheduler="threads"):
            da.to_npy_stack(tmp, x)
        with (
            LocalCluster(
                processes=True,
                n_workers=2,
                threads_per_worker=1,
                dashboard_address=None,
                host="127.0.0.1",
            ) as cluster,
            Client(cluster),
        ):
            dump = da.from_npy_stack(tmp)
            reg = rg.L2(clip=(-100.0, 0.0))

            def together() -> dict[str, float]:
                return rg.to_floats(reg(dump)[1])

            def one_by_one() -> dict[str, float]:
                return {k: float(v.compute()) for k, v in reg(dump)[1].items()}

            assert together() == one_by_one()  # warm up; the same numbers
            times: dict[str, list[float]] = {"one dask.compute": [], "one per metric": []}
            for _ in range(REPEATS):
                for label, fn in (("one dask.compute", together), ("one per metric", one_by_one)):
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
            workers = len(cluster.scheduler_info["workers"])
    print(f"{n:.0e} float32, {n // CHUNK} chunks, L2 metrics (3), LocalCluster of {workers}")
    for label, ts in times.items():
        print(f"  {label:>17}: median {statistics.median(ts):.2f} s over {REPEATS} runs")


if __name__ == "__main__":
    main(int(float(sys.argv[1])) if len(sys.argv) > 1 else 20_000_000)
