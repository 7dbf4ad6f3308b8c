"""Measure one backend (numpy, torch eager, jax jit) and print the results as JSON.

Run by ``benchmarks/run.py`` once per backend, each in its own process (Keras 3 chooses its
backend at import). Every implementation of a case is timed in the same process, on the same
array, interleaved round by round in a shuffled order, and reported as a median; each ratio
to ours is the median over rounds of the two timed in the same round (:func:`paired`).

Implementations, for each case and size:

- ``floor``: one native ``sum(x)``: a single read of the input, the cost floor;
- ``ours``: ``regularizers`` (``compute`` for value+metrics);
- ``native``: hand-written native code for the same outputs, as an expert would write it;
- ``adr``: the ADR's code transcribed as written (separate passes, a host sync per metric);
- ``keras``: Keras 3's ``regularizers.L1``/``L2`` (value only: it has no metrics).

Then the training-path cases of ``benchmarks/training.py``: forward + backward of every
built-in and of the Tinker Pipeline, on a Tinker-shaped ragged batch and at 1e3 elements,
against hand-written code for the same outputs (on torch also forward with grad at 1e3, the
compiled Pipeline against eager, and SampledKL k3 against verl's idiom). Before timing, each
case's two sides are checked to compute the same loss and gradients.

``--smoke``: every case once, at tiny sizes (a broken benchmark fails fast; no timing worth
reading).

Peak extra memory for value+metrics at 1e7 (numpy and torch) is measured in a fresh
subprocess per implementation: NumPy through tracemalloc (NumPy reports its buffers to it),
torch CPU through the growth of the process's peak resident set (``ru_maxrss``), since
torch's CPU allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

import regularizers as rg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training  # benchmarks/training.py, beside this file

SIZES = [1_000, 100_000, 1_000_000, 10_000_000]
RAGGED = (256, 512)  # a ragged batch: 256 datums of 512 tokens


def logprobs(n: int, seed: int = 0) -> np.ndarray:
    """Logprob-like float32 values, built in pieces so that making them leaves no large peak
    in the process's memory (the torch memory figure is a growth of that peak)."""
    rng = np.random.default_rng(seed)
    x = np.empty(n, dtype=np.float32)
    for i in range(0, n, 1 << 20):
        piece = x[i : i + (1 << 20)]
        piece[:] = -rng.gamma(0.6, 1.8, size=piece.size)
        k = max(1, piece.size // 200)
        piece[rng.integers(0, piece.size, size=k)] = -rng.uniform(20, 150, size=k)
    return x


# ---- implementations per backend ------------------------------------------------------------
REGS = {"l1": rg.L1(), "l2_clip_center": rg.L2(center="mean", clip=(-100.0, 0.0)), "l2": rg.L2()}


def eager_impls(
    xp: Any, to_number: Callable[[Any], float], native: dict[str, Callable[[Any], Any]]
) -> dict[str, dict[str, Any]]:
    """ours, the hand-written ``native`` code and the ADR transcription, for an eager ``xp``
    (NumPy and torch share every function the ADR code uses)."""

    def adr_l1(x: Any) -> Any:
        value = xp.sum(xp.abs(x))
        return value, {"l1_raw": to_number(value), "l1_mean": to_number(xp.mean(xp.abs(x)))}

    def adr_l2(x: Any, clip: bool, center: bool) -> Any:
        t = xp.clip(x, -100, 0) if clip else x
        t = t - xp.mean(t) if center else t
        sq = xp.pow(t, 2) if hasattr(xp, "pow") else xp.power(t, 2)
        value = xp.sum(sq)
        return value, {
            "l2_raw": to_number(value),
            "l2_mean": to_number(xp.mean(sq)),
            "l2_max": to_number(xp.max(sq)),
        }

    adr = {
        "l1": adr_l1,
        "l2_clip_center": lambda x: adr_l2(x, True, True),
        "l2": lambda x: adr_l2(x, False, False),
    }
    return {
        case: {
            "ours": (lambda x, r=reg: r.compute(None, x)),
            "native": native[case],
            "adr": adr[case],
        }
        for case, reg in REGS.items()
    }


def numpy_impls() -> dict[str, dict[str, Callable[[Any], Any]]]:
    def native_l1(x: Any) -> Any:
        raw = np.abs(x).sum()
        return raw, raw / x.size

    def native_l2c(x: Any) -> Any:
        c = np.clip(x, -100.0, 0.0)
        m = c.mean()
        d = c - m
        raw = np.dot(d, d)
        return raw, raw / x.size, max((c.max() - m) ** 2, (c.min() - m) ** 2)

    def native_l2(x: Any) -> Any:
        raw = np.dot(x, x)
        return raw, raw / x.size, max(x.max() ** 2, x.min() ** 2)

    return eager_impls(np, float, {"l1": native_l1, "l2_clip_center": native_l2c, "l2": native_l2})


def torch_impls() -> dict[str, dict[str, Callable[[Any], Any]]]:
    import torch

    def native_l1(x: Any) -> Any:
        raw = torch.linalg.vector_norm(x, 1)
        return raw, raw / x.numel()

    def native_l2c(x: Any) -> Any:
        c = x.clamp(-100.0, 0.0)
        m = c.mean()
        d = c - m
        raw = torch.dot(d, d)
        lo, hi = torch.aminmax(c)
        return raw, raw / c.numel(), torch.maximum((hi - m) ** 2, (lo - m) ** 2)

    def native_l2(x: Any) -> Any:
        raw = torch.dot(x, x)
        lo, hi = torch.aminmax(x)
        return raw, raw / x.numel(), torch.maximum(hi * hi, lo * lo)

    return eager_impls(
        torch, lambda v: v.item(), {"l1": native_l1, "l2_clip_center": native_l2c, "l2": native_l2}
    )


def jax_impls() -> dict[str, dict[str, Callable[[Any], Any]]]:
    import jax
    import jax.numpy as jnp

    l1, l2c, l2 = REGS["l1"], REGS["l2_clip_center"], REGS["l2"]

    def native_l1(x: Any) -> Any:
        raw = jnp.abs(x).sum()
        return raw, raw / x.size

    def native_l2c(x: Any) -> Any:
        c = jnp.clip(x, -100.0, 0.0)
        d = c - c.mean()
        sq = d * d
        raw = sq.sum()
        return raw, raw / x.size, sq.max()

    def native_l2(x: Any) -> Any:
        sq = x * x
        raw = sq.sum()
        return raw, raw / x.size, sq.max()

    def adr_l2(x: Any, clip: bool, center: bool) -> Any:
        t = jnp.clip(x, -100, 0) if clip else x
        t = t - jnp.mean(t) if center else t
        sq = jnp.power(t, 2)
        return jnp.sum(sq), jnp.mean(sq), jnp.max(sq)

    def adr(fn: Callable[[Any], Any], names: tuple[str, ...]) -> Callable[[Any], Any]:
        jitted = jax.jit(fn)

        def run(x: Any) -> Any:  # the ADR syncs the host once per metric (Nx.to_number)
            out = jitted(x)
            return out[0], {k: float(v) for k, v in zip(names, out, strict=True)}

        return run

    return {
        "l1": {
            "ours": jax.jit(lambda x: l1.compute(None, x)),
            "native": jax.jit(native_l1),
            "adr": adr(
                lambda x: (jnp.sum(jnp.abs(x)), jnp.mean(jnp.abs(x))), ("l1_raw", "l1_mean")
            ),
        },
        "l2_clip_center": {
            "ours": jax.jit(lambda x: l2c.compute(None, x)),
            "native": jax.jit(native_l2c),
            "adr": adr(lambda x: adr_l2(x, True, True), ("l2_raw", "l2_mean", "l2_max")),
        },
        "l2": {
            "ours": jax.jit(lambda x: l2.compute(None, x)),
            "native": jax.jit(native_l2),
            "adr": adr(lambda x: adr_l2(x, False, False), ("l2_raw", "l2_mean", "l2_max")),
        },
    }


def keras_impls(backend: str) -> dict[str, Callable[[Any], Any]]:
    try:
        import keras
    except ImportError:
        return {}
    l1, l2 = keras.regularizers.L1(1.0), keras.regularizers.L2(1.0)
    if backend == "jax":
        import jax

        return {"l1": jax.jit(lambda x: l1(x)), "l2": jax.jit(lambda x: l2(x))}
    return {"l1": lambda x: l1(x), "l2": lambda x: l2(x)}


# ---- timing ----------------------------------------------------------------------------------
def sync(out: Any) -> Any:
    leaves = out if isinstance(out, (list, tuple)) else [out]
    for leaf in leaves:
        if isinstance(leaf, (list, tuple, dict)):
            sync(list(leaf.values()) if isinstance(leaf, dict) else leaf)
        elif hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return out


_EVICT: list[np.ndarray] = []
COLD = 10_000_000  # from here (40 MB of float32), each timed call starts from memory


def evict() -> None:
    """Read 64 MiB (twice the 32 MiB L3 of this machine class), so that the next call reads
    its input from memory: every timed call of a 1e7 case (40 MB of float32, more than the
    L3) starts from the same state of the caches, as the floor's definition (one read of
    memory) has it. Measured over nine runs, it did not narrow the spread of the torch floor
    (one ``sum(x)`` on two threads, 0.78-1.23 ms with it, 0.68-1.16 without), which comes
    from the other core (``docs/benchmarks.md``, Misses), nor move NumPy's (1.62-1.70 ms)."""
    if not _EVICT:
        _EVICT.append(np.ones(1 << 24, dtype=np.float32))
    _EVICT[0].sum()


def time_all(
    impls: dict[str, Callable[[Any], Any]],
    x: Any,
    budget: float,
    smoke: bool = False,
    cold: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call, implementations interleaved round by round in an order
    shuffled each round; and, where ``"ours"`` is one of them, the paired ratios: for each
    other implementation the median over rounds of ours / it, both timed in the same round
    (what the table reports: a slow stretch of a busy machine weighs on both sides of each
    pair, and no implementation always runs in the same place of a round). ``smoke``: one
    call each, after one warm-up. ``cold``: each timed call (one per sample) starts from
    caches emptied of the input (:func:`evict`, not timed): the floor is a read of memory."""
    if smoke:
        for fn in impls.values():
            sync(fn(x))
        out = {}
        for name, fn in impls.items():
            t0 = time.perf_counter()
            sync(fn(x))
            out[name] = time.perf_counter() - t0
        return out, paired(out, {k: [v] for k, v in out.items()})
    for fn in impls.values():  # warm up (and compile)
        sync(fn(x))
        sync(fn(x))
    start = time.perf_counter()
    for fn in impls.values():
        sync(fn(x))
    one_round = max(time.perf_counter() - start, 1e-7)
    rounds = int(min(200, max(7, budget / one_round)))
    inner = 1 if cold or one_round > 1e-3 else int(min(200, 1e-3 / one_round) + 1)
    samples: dict[str, list[float]] = {k: [] for k in impls}
    order = list(impls.items())
    shuffle = random.Random(0).shuffle  # (seeded: a run is repeatable)
    for _ in range(rounds):
        shuffle(order)
        for name, fn in order:
            if cold:
                evict()
            t0 = time.perf_counter()
            for _ in range(inner):
                sync(fn(x))
            samples[name].append((time.perf_counter() - t0) / inner)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return medians, paired(medians, samples)


def paired(medians: dict[str, float], samples: dict[str, list[float]]) -> dict[str, float]:
    """``{name: median over rounds of ours / name}`` for every implementation but ours."""
    if "ours" not in samples:
        return {}
    ours = samples["ours"]
    return {
        k: statistics.median([a / b for a, b in zip(ours, v, strict=True)])
        for k, v in samples.items()
        if k != "ours"
    }


def memory_child(backend: str, case: str, impl: str, n: int) -> None:
    """In a fresh process: the peak extra bytes one call of ``impl`` allocates."""
    x = logprobs(n)
    impls = {"numpy": numpy_impls, "torch": torch_impls}[backend]()[case]
    fn = impls[impl]
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        x = torch.from_numpy(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn(x)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    else:
        fn(x[:1000])
        tracemalloc.start()
        fn(x)
        extra = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps({"extra_bytes": extra, "input_bytes": int(x.nbytes)}))


def memory(backend: str, case: str, impl: str, n: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory", backend, case, impl, str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["numpy", "torch", "jax"])
    parser.add_argument("--memory", nargs=4)
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="every case once, tiny sizes")
    args = parser.parse_args()
    if args.memory:
        backend, case, impl, n = args.memory
        memory_child(backend, case, impl, int(n))
        return
    backend = args.backend
    if backend == "jax":
        import jax

        jax.config.update("jax_platform_name", "cpu")
        convert: Callable[[np.ndarray], Any] = lambda a: jax.device_put(a)  # noqa: E731
    elif backend == "torch":
        import torch

        convert = torch.from_numpy
    else:
        convert = np.asarray
    impls = {"numpy": numpy_impls, "torch": torch_impls, "jax": jax_impls}[backend]()
    keras = keras_impls(backend)
    floor: Callable[[Any], Any]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        floor = jax.jit(jnp.sum)
    else:
        floor = lambda x: x.sum()  # noqa: E731
    results: dict[str, Any] = {"backend": backend, "cases": [], "smoke": args.smoke}
    load_at_start = os.getloadavg()[0]
    smoke = args.smoke
    for n in SIZES[:1] if smoke else SIZES:
        x = convert(logprobs(n))
        for case, case_impls in impls.items():
            todo = {"floor": floor, **case_impls}
            if case in keras:
                todo["keras"] = keras[case]
            budget = args.budget if n >= 10**6 else args.budget / 3
            times, ratios = time_all(todo, x, budget, smoke, cold=n >= COLD)
            results["cases"].append({"case": case, "n": n, "seconds": times, "paired": ratios})
            print(
                f"# {backend} {case} n={n}: "
                + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
                file=sys.stderr,
            )
    # the ragged batch: value+metrics on the list
    datums, tokens = (4, 16) if smoke else RAGGED
    xs = [convert(logprobs(tokens, seed=i)) for i in range(datums)]
    n_ragged = datums * tokens
    flat_floor: Callable[[Any], Any]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        flat_floor = jax.jit(lambda xs: jnp.sum(jnp.concatenate(xs)))
    elif backend == "torch":
        import torch

        flat_floor = lambda xs: torch.cat(xs).sum()  # noqa: E731
    else:
        flat_floor = lambda xs: np.concatenate(xs).sum()  # noqa: E731
    ours_l1 = impls["l1"]["ours"]
    times, ratios = time_all({"floor": flat_floor, "ours": ours_l1}, xs, args.budget, smoke)
    results["cases"].append(
        {"case": "l1_ragged", "n": n_ragged, "seconds": times, "paired": ratios}
    )
    # the training path: forward + backward of every built-in (benchmarks/training.py)
    if backend == "torch":  # both sides on one thread: at these sizes an op is microseconds,
        import torch  # and on a busy 2-core machine threads mostly measure their own wake-up

        results["threads_training"] = 1
        torch.set_num_threads(1)
    entries = training.cases(backend, scale=0.05 if smoke else 1.0)
    problems = training.check(backend, entries)
    if problems:
        raise SystemExit("ours and the hand-written code disagree:\n" + "\n".join(problems))
    for case, n, case_impls, arg in entries:
        times, ratios = time_all(case_impls, arg, args.budget / 2, smoke)
        results["cases"].append({"case": case, "n": n, "seconds": times, "paired": ratios})
        print(
            f"# {backend} {case} n={n}: "
            + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
            file=sys.stderr,
        )
    results["missing"] = training.missing()
    results["skipped"] = training.SKIPPED
    if backend in ("numpy", "torch") and not smoke:
        results["memory"] = {
            case: {impl: memory(backend, case, impl, SIZES[-1]) for impl in ("ours", "native")}
            for case in impls
        }
    results["threads"] = os.cpu_count()
    results["load"] = round(load_at_start, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
