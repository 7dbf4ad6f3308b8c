"""NumPy ``value_and_grad`` against hand-written NumPy, side by side in one run (issue 12).

- the training path: ``Pipeline([(L1(mask=Field("weights")), 1e-3), (L2(clip=(-100, 0),
  center="mean"), 1e-4)])`` over a Tinker-shaped ragged batch (64 datums of 64-1024 float32
  tokens, prompt tokens weighted 0), loss and gradient per datum;
- the per-call overhead: one L1 / L2 ``value_and_grad`` at 1e3 float32 elements.

Medians of interleaved rounds; prints one line per case with the ratio ours / hand-written.
Run: ``python benchmarks/numpy_grad.py [--budget SECONDS]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import regularizers as rg

W1, W2 = 1e-3, 1e-4
DATUMS, SHORTEST, LONGEST = 64, 64, 1024


def tinker_batch(seed: int = 0) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    lps, weights = [], []
    for n in rng.integers(SHORTEST, LONGEST + 1, size=DATUMS):
        lps.append((-rng.gamma(0.6, 1.8, size=n)).astype(np.float32))
        w = np.ones(n, dtype=np.float32)
        w[: int(rng.integers(1, n // 2))] = 0.0  # the prompt
        weights.append(w)
    return lps, {"weights": weights}


PIPE = rg.Pipeline(
    [
        (rg.L1(mask=rg.Field("weights")), W1),
        (rg.L2(clip=(-100.0, 0.0), center="mean"), W2),
    ],
    metrics="array",
)


def ours_pipeline(lps: list[np.ndarray], data: dict[str, Any]) -> Any:
    return PIPE.value_and_grad(data, lps)


def hand_pipeline(lps: list[np.ndarray], data: dict[str, Any]) -> Any:
    x = np.concatenate(lps)
    m = np.concatenate(data["weights"]) != 0
    xm = np.where(m, x, 0.0).astype(np.float32)
    c = np.clip(x, -100.0, 0.0)
    d = c - c.mean()
    loss = W1 * np.abs(xm).sum() + W2 * np.dot(d, d)
    g = np.sign(xm) * np.float32(W1)
    g += d * np.float32(2 * W2) * ((x >= -100.0) & (x <= 0.0))
    return loss, np.split(g, np.cumsum([a.size for a in lps])[:-1])


def time_all(impls: dict[str, Callable[[], Any]], budget: float) -> dict[str, float]:
    """Median seconds per call; implementations interleaved round by round."""
    for fn in impls.values():
        fn()
        fn()
    start = time.perf_counter()
    for fn in impls.values():
        fn()
    one_round = max(time.perf_counter() - start, 1e-7)
    rounds = int(min(2000, max(15, budget / one_round)))
    inner = 1 if one_round > 1e-3 else int(min(200, 1e-3 / one_round) + 1)
    samples: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=3.0)
    args = parser.parse_args()
    lps, data = tinker_batch()
    x = (-np.random.default_rng(1).gamma(0.6, 1.8, size=1000)).astype(np.float32)
    l1, l2, l2c = rg.L1(), rg.L2(), rg.L2(clip=(-100.0, 0.0), center="mean")

    def hand_l2c() -> Any:
        c = np.clip(x, -100.0, 0.0)
        d = c - c.mean()
        return np.dot(d, d), d * np.float32(2.0) * ((x >= -100.0) & (x <= 0.0))

    cases: dict[str, dict[str, Callable[[], Any]]] = {
        f"pipeline L1(mask)+L2(clip, center) ragged n={sum(a.size for a in lps)}": {
            "ours": lambda: ours_pipeline(lps, data),
            "hand": lambda: hand_pipeline(lps, data),
        },
        "L1 value_and_grad n=1e3": {
            "ours": lambda: l1.value_and_grad(None, x),
            "hand": lambda: (np.abs(x).sum(), np.sign(x)),
        },
        "L2 value_and_grad n=1e3": {
            "ours": lambda: l2.value_and_grad(None, x),
            "hand": lambda: (np.dot(x, x), x * np.float32(2.0)),
        },
        "L2(clip, center) value_and_grad n=1e3": {
            "ours": lambda: l2c.value_and_grad(None, x),
            "hand": hand_l2c,
        },
        "L1 compute n=1e3": {
            "ours": lambda: l1.compute(None, x),
            "hand": lambda: (np.abs(x).sum(),),
        },
        "L2 compute n=1e3": {
            "ours": lambda: l2.compute(None, x),
            "hand": lambda: (np.dot(x, x), np.max(x * x)),
        },
    }
    for case, impls in cases.items():
        t = time_all(impls, args.budget)
        print(
            f"{case:55s} ours {t['ours'] * 1e6:9.1f} us  hand {t['hand'] * 1e6:9.1f} us  "
            f"ratio {t['ours'] / t['hand']:.2f}x"
        )


if __name__ == "__main__":
    main()
