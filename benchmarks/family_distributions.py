"""Forward + backward of the penalties over distributions against the naive torch idiom.

Run: ``python benchmarks/family_distributions.py [--device cpu|cuda] [--repeats 3]``.

Cases (float32 logits ``[T, V]``; the reference, where there is one, has the same shape):

- ``entropy``: ``rg.Entropy()``;
- ``kl``: ``rg.KL(reference)`` (reverse KL(p||q));
- ``jsd``: ``rg.JSD(reference, beta=0.5)``;

all at [2048, 32000] (the issue's shape; ``--tokens`` and ``--vocab`` change it).

Implementations, each in a **fresh subprocess** (so that one's memory cannot hide in
another's peak):

- ``naive``: what people write, with autograd: ``p = softmax(z); -(p * log_softmax(z)).sum()``
  for the entropy, ``(p * (log_softmax(z) - log_softmax(r))).sum()`` for the KL, TRL's stacked
  ``logsumexp`` mixture for the JSD; then ``.backward()``;
- ``ours_vag``: ``reg.value_and_grad(None, z)``: value, metrics and the closed-form gradient,
  computed block by block over tokens (the library's generic array API path);
- ``ours_autograd``: ``reg(z)`` on a tensor that requires grad, then ``.backward()``: torch
  autograd records one node whose backward is the closed form (``_fastpath/torch_autograd``);
  on a GPU, KL's forward and backward are one Triton kernel each (``_fastpath/torch_triton``);
- ``ours_torch_kernels`` (only when named in ``--impls``): ``ours_autograd`` with the Triton
  kernels off, torch's kernels instead.

Measured: the median wall time of ``--repeats`` runs after one warm run, and the peak memory
beyond the inputs, reported in units of one ``[T, V]`` float32 array (the gradient itself is
one). On CPU that is the growth of the process's peak resident set (``ru_maxrss``: torch's CPU
allocator keeps no statistics); on CUDA, ``torch.cuda.max_memory_allocated``. On CUDA also
where the time goes (:func:`split`): the host's time per call (the call returns before the
GPU is done) and the GPU's alone. The last table gives ours/naive ratios, all measured in
this one run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CASES = {"entropy": (2048, 32000), "kl": (2048, 32000), "jsd": (2048, 32000)}
IMPLS = ("naive", "ours_vag", "ours_autograd")
BETA = 0.5


def make_inputs(case: str, device: str) -> tuple[Any, Any]:
    import torch

    t, v = CASES[case]
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn((t, v), generator=gen, device=device).mul_(3.0)  # in place: no transient
    r = None if case == "entropy" else torch.randn((t, v), generator=gen, device=device).mul_(3.0)
    return z, r


def regularizer(case: str, r: Any) -> Any:
    import regularizers as rg

    if case == "entropy":
        return rg.Entropy()
    if case == "kl":
        return rg.KL(r)
    return rg.JSD(r, beta=BETA)


def naive(case: str, z: Any, r: Any) -> Any:
    """The idiom with autograd: several [T, V] temporaries, all kept for the backward."""
    import torch
    import torch.nn.functional as F

    z = z.detach().requires_grad_(True)
    lp = F.log_softmax(z, dim=-1)
    if case == "entropy":
        p = F.softmax(z, dim=-1)
        loss = -(p * lp).sum()
    elif case == "kl":
        lq = F.log_softmax(r, dim=-1)
        loss = (lp.exp() * (lp - lq)).sum()
    else:  # TRL GKD's generalized_jsd_loss, the same maths
        lq = F.log_softmax(r, dim=-1)
        stacked = torch.stack([lq + math.log(BETA), lp + math.log(1 - BETA)])
        lm = torch.logsumexp(stacked, dim=0)
        kl_q = (lq.exp() * (lq - lm)).sum()
        kl_p = (lp.exp() * (lp - lm)).sum()
        loss = BETA * kl_q + (1 - BETA) * kl_p
    loss.backward()
    return loss.detach(), z.grad


def ours_vag(case: str, z: Any, r: Any) -> Any:
    value, _, grad = regularizer(case, r).value_and_grad(None, z)
    return value, grad


def ours_autograd(case: str, z: Any, r: Any) -> Any:
    z = z.detach().requires_grad_(True)
    value, _ = regularizer(case, r)(z)
    value.backward()
    return value.detach(), z.grad


def ours_torch_kernels(case: str, z: Any, r: Any) -> Any:
    """``ours_autograd`` with KL's Triton kernels off (``torch_triton.TRITON = False``): its
    torch kernels, as a GPU ran them before the Triton ones (not run unless named)."""
    from regularizers._fastpath import torch_triton

    torch_triton.TRITON = False
    return ours_autograd(case, z, r)


IMPL = {
    "naive": naive,
    "ours_vag": ours_vag,
    "ours_autograd": ours_autograd,
    "ours_torch_kernels": ours_torch_kernels,
}


def split(fn: Any, case: str, z: Any, r: Any, repeats: int) -> dict[str, Any]:
    """On a GPU, where one call's time goes: ``host_s``, the median time the host takes to
    queue a call (no sync inside it); ``gpu_s``, the GPU's time per call alone, with
    ``repeats`` calls queued behind a ~0.15 s sleep kernel and timed by CUDA events around
    them; ``queued``: whether the host had queued them all before the GPU reached the first
    (else the GPU waited for the host in between, and ``gpu_s`` includes that wait)."""
    import torch

    host = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value, grad = fn(case, z, r)
        host.append(time.perf_counter() - start)
        del value, grad
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))  # (cycles: ~0.15 s at an H200's 2 GHz)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn(case, z, r)
    end.record()
    queued = not begin.query()  # (the GPU still sleeping: it ran the calls back to back)
    torch.cuda.synchronize()
    gpu = begin.elapsed_time(end) / 1e3 / repeats
    return {"host_s": statistics.median(host), "gpu_s": gpu, "queued": queued}


def child(case: str, impl: str, device: str, repeats: int) -> dict[str, Any]:
    """One implementation of one case, in this (fresh) process."""
    import torch

    fn = IMPL[impl]
    z, r = make_inputs(case, device)
    small = (z[:8], None if r is None else r[:8])
    fn(case, *small)  # load kernels, warm the allocator
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    value, grad = fn(case, z, r)
    sync()
    first = time.perf_counter() - start
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out_value = float(value)
    del value, grad
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        value, grad = fn(case, z, r)
        sync()
        times.append(time.perf_counter() - start)
        del value, grad
    t, v = CASES[case]
    return {
        "case": case,
        "impl": impl,
        "shape": [t, v],
        "device": device,
        "value": out_value,
        "first_s": first,
        "median_s": statistics.median(times),
        "peak_extra_bytes": extra,
        "peak_extra_arrays": extra / (t * v * 4),
        **(split(fn, case, z, r, repeats) if device == "cuda" else {}),
    }


def run_child(case: str, impl: str, device: str, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, impl, "--device", device]
    cmd += ["--repeats", str(repeats), "--tokens", str(CASES[case][0])]
    cmd += ["--vocab", str(CASES[case][1])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case}/{impl} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--tokens", type=int, default=None, help="override T (quick runs)")
    parser.add_argument("--vocab", type=int, default=None, help="override V (quick runs)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="naive first")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for case, (t, v) in list(CASES.items()):
        CASES[case] = (args.tokens or t, args.vocab or v)
    impls = tuple(args.impls.split(","))
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeats)))
        return 0
    import torch

    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    results = []
    for case in args.cases.split(","):
        for impl in impls:
            res = run_child(case, impl, args.device, args.repeats)
            results.append(res)
            where = ""
            if "gpu_s" in res:  # (a GPU: the host's time per call, and the GPU's alone)
                host, gpu = res["host_s"] * 1e3, res["gpu_s"] * 1e3
                where = f"   host {host:.2f} ms, GPU alone {gpu:.2f} ms"
                where += "" if res["queued"] else " (the GPU waited for the host)"
            print(
                f"{case:8s} {CASES[case]!s:14s} {impl:14s} median {res['median_s'] * 1e3:9.1f} ms"
                f"  peak extra {res['peak_extra_bytes'] / 2**20:8.0f} MiB"
                f" = {res['peak_extra_arrays']:5.2f} x [T, V]   value {res['value']:.6g}{where}",
                flush=True,
            )
    print("\nours / naive (same run, same device):")
    by = {(r["case"], r["impl"]): r for r in results}
    for case in args.cases.split(","):
        base = by[(case, "naive")]
        for impl in impls[1:]:
            ours = by[(case, impl)]
            rel = abs(ours["value"] - base["value"]) / max(abs(base["value"]), 1e-30)
            print(
                f"{case:8s} {impl:14s} time x{ours['median_s'] / base['median_s']:5.2f}"
                f"  peak memory x{ours['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):5.2f}"
                f"  (value rel. diff {rel:.1e})"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
