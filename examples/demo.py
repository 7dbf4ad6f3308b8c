"""The main job: one batch of sample logprobs through every penalty on sampled-token logprobs
(L1, L2, ElasticNet, Huber, SampledKL, SampledEntropy), on every backend.

Reads ``examples/data/sample_logprobs.json`` (eight ragged per-datum sequences of logprobs with
a few very negative outliers, and Tinker-style ``weights`` masks), hands the same float32
values to NumPy, PyTorch, JAX and Dask, and prints for each regularizer each backend's value
and metrics and a gradient check:

- torch and JAX: the closed-form ``value_and_grad`` against the backend's own autodiff
  (``torch.autograd``, ``jax.grad``) through ``compute``, on the generic path
  (``regularizers.testing.generic_path``: torch autograd would otherwise use the closed form);
- NumPy and Dask: the closed-form gradient against central finite differences in float64.

It ends by checking that every backend agrees with NumPy, and exits non-zero if one does not.

Run it with ``nox -s demo`` (or ``python examples/demo.py`` where the backends are installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import regularizers as rg

DATA = Path(__file__).with_name("data") / "sample_logprobs.json"
RTOL = 2e-5  # float32 sums over ~300 elements, compared across libraries

REGULARIZERS = [
    rg.L1(),
    rg.L1(reduce="mean", mask=rg.Field("weights")),
    rg.L2(),
    rg.L2(center="mean", clip=(-100.0, 0.0)),
    rg.L2(target="probs", reduce="mean", mask=rg.Field("weights")),
    rg.ElasticNet(l1_ratio=0.5, reduce="mean", mask=rg.Field("weights")),
    rg.Huber(delta=1.0, mask=rg.Field("weights")),
    rg.SampledKL(
        rg.Field("ref_logprobs"),
        estimator="k3",
        log_ratio_clip=(-5.0, 5.0),
        reduce="seq-mean-token-mean",
    ),
    rg.SampledEntropy(reduce="mean", mask=rg.Field("weights")),
]


def load() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    doc = json.loads(DATA.read_text())
    logprobs = [np.asarray(d["logprobs"], dtype=np.float32) for d in doc["datums"]]
    weights = [np.asarray(d["weights"], dtype=np.float32) for d in doc["datums"]]
    # A stand-in for a reference model's logprobs of the same tokens: the policy's, tempered
    # (the sample file has no reference model), so that SampledKL has something to compare.
    reference = [np.maximum(0.8 * lp - 0.05, lp) for lp in logprobs]
    return logprobs, weights, reference


def backends() -> dict[str, Any]:
    """name -> function turning a NumPy array into that library's array."""
    import dask.array as da
    import jax
    import jax.numpy as jnp
    import torch

    jax.config.update("jax_enable_x64", True)
    return {
        "numpy": lambda a: a,
        "torch": lambda a: torch.asarray(a),
        "jax": lambda a: jnp.asarray(a),
        "dask": lambda a: da.from_array(a, chunks=16),
    }


def to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach()
    if hasattr(a, "compute"):
        a = a.compute()
    return np.asarray(a, dtype=np.float64)


def autodiff(name: str, reg: rg.Regularizer, data: Any, xs: list[Any]) -> list[np.ndarray]:
    if name == "torch":
        import torch

        from regularizers.testing import generic_path

        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        with generic_path():
            value, _ = reg.compute(data, leaves)
        grads = torch.autograd.grad(value, leaves)
        return [to_numpy(g) for g in grads]
    import jax

    grads = jax.grad(lambda lp: reg.compute(data, lp)[0])(xs)
    return [to_numpy(g) for g in grads]


def finite_differences(
    reg: rg.Regularizer,
    data: Any,
    xs: list[np.ndarray],
    picks: list[tuple[int, int]],
    h: float = 1e-6,
) -> list[float]:
    """Central differences in float64 at a few (datum, token) positions away from kinks."""
    base = [x.astype(np.float64) for x in xs]
    out = []
    for i, j in picks:
        up = [b.copy() for b in base]
        down = [b.copy() for b in base]
        up[i][j] += h
        down[i][j] -= h
        out.append((float(reg.compute(data, up)[0]) - float(reg.compute(data, down)[0])) / (2 * h))
    return out


def differentiable_twin(reg: rg.Regularizer) -> rg.Regularizer:
    """A regularizer whose value has ``reg``'s gradient as its derivative, at this point.

    On-policy sampled penalties weight each token by rho = exp(lp - lp) (value 1, gradient
    rho): their gradient is not the derivative of their value, so finite differences are
    taken of the same penalty with the behaviour logprobs frozen at the current ones.
    """
    on_policy = isinstance(reg, rg.SampledEntropy) or (
        isinstance(reg, rg.SampledKL) and reg.gradient == "unbiased"
    )
    if not on_policy or reg.behavior is not None:
        return reg
    return type(reg)(**{**reg.options(), "behavior": rg.Field("frozen_logprobs")})


def main() -> int:
    logprobs, weights, reference = load()
    n = sum(x.size for x in logprobs)
    print(
        f"sample: {len(logprobs)} datums, {n} tokens, lengths {[x.size for x in logprobs]}, "
        f"min logprob {min(float(x.min()) for x in logprobs):.2f}, "
        f"{int(sum(w.sum() for w in weights))} completion tokens (weights = 1)\n"
    )
    libs = backends()
    picks = [(0, 5), (3, 10), (5, 40)]
    failures = []
    for reg in REGULARIZERS:
        print(f"{reg!r}  [{reg.name}]")
        results: dict[str, dict[str, float]] = {}
        for name, convert in libs.items():
            xs = [convert(x) for x in logprobs]
            data = {
                "weights": [convert(w) for w in weights],
                "ref_logprobs": [convert(r) for r in reference],
            }
            value, metrics = reg.compute(data, xs)
            _, _, grad = reg.value_and_grad(data, xs)
            closed = [to_numpy(g) for g in grad]
            if name in ("torch", "jax"):
                ref = autodiff(name, reg, data, xs)
                err = max(float(np.max(np.abs(c - r))) for c, r in zip(closed, ref, strict=True))
                check = f"closed form vs {name} autodiff: max |diff| {err:.1e}"
                ok = err <= 1e-5 * max(1.0, max(float(np.max(np.abs(r))) for r in ref))
            else:
                fd_reg, fd_data = differentiable_twin(reg), {"weights": weights}
                fd_data.update(ref_logprobs=reference, frozen_logprobs=logprobs)
                fd = finite_differences(fd_reg, fd_data, logprobs, picks)
                got = [float(closed[i][j]) for i, j in picks]
                err = max(abs(a - b) for a, b in zip(got, fd, strict=True))
                check = f"closed form vs finite differences: max |diff| {err:.1e}"
                ok = err <= 1e-3 * max(1.0, max(abs(v) for v in fd))
            results[name] = {"value": float(to_numpy(value)), **rg.to_floats(metrics)}
            row = "  ".join(f"{k}={v:.6g}" for k, v in results[name].items())
            print(f"  {name:<6} {type(value).__name__:<8} {row}   {check} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{reg!r} gradient on {name}")
        ref_row = results["numpy"]
        worst = max(
            abs(r[k] - ref_row[k]) / max(abs(ref_row[k]), 1e-30)
            for r in results.values()
            for k in r
        )
        agree = worst <= RTOL
        print(
            f"  all backends agree with numpy: max relative difference {worst:.1e} "
            f"{'ok' if agree else 'FAIL'}\n"
        )
        if not agree:
            failures.append(f"{reg!r} backends disagree")
    if failures:
        print("FAILED:", "; ".join(failures))
        return 1
    print(
        f"All {len(REGULARIZERS)} regularizers agree on {len(libs)} backends "
        "(numpy, torch, jax, dask), and every gradient check passed."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
