"""Where the torch training step's time goes: forward and backward, ours and hand-written.

For each training-path case of ``training.py`` on the Tinker batch, one training step
(``loss.backward()`` on fresh leaves) is split into its forward and its backward, and each
half is timed on its own (thread CPU time, so that other processes on a busy machine do not
count; medians of interleaved steps). Then the operations of a masked step are timed one by
one inside such a loop (after a backward, as in training: allocations and caches are those
of a real step, and several times an isolated ``timeit``), which is what
``docs/benchmarks.md`` quotes to explain the misses.

Run: ``python benchmarks/profile_training.py [--steps N] [--cases L1,L2,...]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import training as T

import regularizers as rg


def _step_halves(forward: Callable[[list[Any]], Any], tensors: list[Any]) -> tuple[float, float]:
    leaves = [a.detach().requires_grad_(True) for a in tensors]
    t0 = time.thread_time()
    value = forward(leaves)
    t1 = time.thread_time()
    value.backward()
    return t1 - t0, time.thread_time() - t1


def halves(names: list[str], steps: int) -> None:
    o = T._torch_ops()
    print(f"{'case':28s} {'ours fwd':>9s} {'bwd':>7s} {'native fwd':>11s} {'bwd':>7s}  (us)")
    for case in T.CASES:
        if case.name not in names:
            continue
        inp = T.inputs(case.shape, "tinker")
        tensors = [torch.from_numpy(x) for x in inp["x"]]
        t_inp = {
            k: None if v is None else [torch.from_numpy(a) for a in v]
            for k, v in inp.items()
            if k != "x"
        }
        data = T._data(case, t_inp, False)
        ours = case.ours()
        call = ours if isinstance(ours, rg.Pipeline) else ours.compute

        def fwd_ours(leaves: list[Any], call: Any = call, data: Any = data) -> Any:
            return call(data, leaves)[0]

        def fwd_native(leaves: list[Any], case: Any = case, t_inp: Any = t_inp) -> Any:
            y = None if case.other is None else torch.cat(t_inp["other"])
            m = torch.cat(t_inp["weights"]) if case.masked else None
            return case.native(o, torch.cat(leaves), y, m)[0]

        got: dict[str, list[tuple[float, float]]] = {"ours": [], "native": []}
        for _ in range(steps):
            got["ours"].append(_step_halves(fwd_ours, tensors))
            got["native"].append(_step_halves(fwd_native, tensors))
        row = []
        for k in ("ours", "native"):
            row += [
                statistics.median(a for a, _ in got[k]),
                statistics.median(b for _, b in got[k]),
            ]
        print(f"{case.label[:28]:28s} " + " ".join(f"{v * 1e6:9.0f}" for v in row))


def masked_ops(steps: int) -> None:
    """The operations of a masked step over the Tinker batch, timed inside a training loop."""
    inp = T.inputs("tokens", "tinker")
    tensors = [torch.from_numpy(x) for x in inp["x"]]
    weights = [torch.from_numpy(a) for a in inp["weights"]]
    ops: dict[str, list[int]] = {}

    def t(name: str, f: Callable[[], Any]) -> Any:
        t0 = time.perf_counter_ns()
        out = f()
        ops.setdefault(name, []).append(time.perf_counter_ns() - t0)
        return out

    for _ in range(steps):
        leaves = [a.detach().requires_grad_(True) for a in tensors]
        _masked_step(leaves, weights, t)
        (torch.cat(leaves).abs() * torch.cat(weights)).sum().backward()  # a real step between
    print("\nOne masked step's operations, 35K float32 elements, inside a training loop:")
    for name, ns in ops.items():
        print(f"  {name:32s} {statistics.median(ns) / 1e3:6.1f} us")


def _masked_step(leaves: list[Any], weights: list[Any], t: Callable[[str, Any], Any]) -> None:
    with torch.no_grad():
        x = t("cat of the 64 logprob tensors", lambda: torch.cat(leaves))
        w = t("cat of the 64 weight tensors", lambda: torch.cat(weights))
        m = t("weights -> bool mask", lambda: w.to(torch.bool))
        t("count_nonzero(mask)", lambda: torch.count_nonzero(m))
        t("where(mask, x, 0)", lambda: torch.where(m, x, 0.0))
        t("x * mask bytes (in place)", lambda: x.clone().mul_(m.view(torch.uint8)))
        t(
            "x * mask bytes as float (in place)",
            lambda: x.clone().mul_(m.view(torch.uint8).to(x.dtype)),
        )
        t("x * float weights (in place)", lambda: x.clone().mul_(w))
        t("clone(x) (the two above include one)", lambda: x.clone())
        t("sum(x), read on the host", lambda: x.sum().item())
        t("abs(x)", lambda: x.abs())


class _Bare(torch.autograd.Function):
    """The closed-form node of :func:`bare_l1_mask`: sign(z) times the incoming gradient,
    split back per tensor."""

    @staticmethod
    def forward(ctx: Any, kept: Any, value: Any, *arrays: Any) -> Any:
        ctx.kept = kept
        return value.clone()

    @staticmethod
    def backward(ctx: Any, go: Any) -> Any:
        z, lengths = ctx.kept
        return (None, None, *torch.sign(z).mul_(go).split_with_sizes(lengths))


def bare_l1_mask(leaves: list[Any], weights: list[Any]) -> Any:
    """L1(mask)'s loss by the route's maths and masking (the weights as a boolean mask, its
    count, the masked values zeroed by a product whose finiteness is checked, one node with
    the closed form), without its validation, Batch, metrics or dispatch: what is left of
    the gap to the hand-written step once the library's own per-call work is gone."""
    with torch.no_grad():
        shapes = [a.shape for a in leaves]
        if shapes != [w.shape for w in weights] or len({a.dtype for a in leaves}) != 1:
            raise ValueError("shapes or dtypes differ")
        x, w = torch.cat(leaves), torch.cat(weights)
        keep = w.to(torch.bool).view(torch.uint8).to(x.dtype)
        count = keep.sum()
        z = x.mul_(keep)
        raw = z.abs().sum()
        if not math.isfinite(raw.item()):  # an inf or NaN under the mask (not in this batch)
            raise ValueError("not finite")
        raw / count.clamp(min=1.0)  # the mean the route reports
    return _Bare.apply((z, [s[0] for s in shapes]), raw, *leaves)


def bare(steps: int) -> None:
    """L1(mask) on the Tinker batch: ours, :func:`bare_l1_mask` and the hand-written step."""
    inp = T.inputs("tokens", "tinker")
    tensors = [torch.from_numpy(x) for x in inp["x"]]
    weights = [torch.from_numpy(a) for a in inp["weights"]]
    reg, data = rg.L1(mask=rg.Field("weights")), {"weights": weights}
    sides = {
        "ours": lambda leaves: reg.compute(data, leaves)[0],
        "bare (no validation)": lambda leaves: bare_l1_mask(leaves, weights),
        "hand-written": lambda leaves: (torch.cat(leaves).abs() * torch.cat(weights)).sum(),
    }
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    for _ in range(steps):
        for name, forward in sides.items():
            got[name].append(_step_halves(forward, tensors))
    print("\nL1(mask) on the Tinker batch, one step's halves (us):")
    for name, halves_ in got.items():
        fwd = statistics.median(a for a, _ in halves_) * 1e6
        bwd = statistics.median(b for _, b in halves_) * 1e6
        print(f"  {name:22s} fwd {fwd:6.0f}  bwd {bwd:6.0f}  step {fwd + bwd:6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cases", default=",".join(c.name for c in T.CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; thread CPU time, medians of {args.steps} steps")
    halves(args.cases.split(","), args.steps)
    masked_ops(args.steps)
    bare(args.steps)


if __name__ == "__main__":
    main()
