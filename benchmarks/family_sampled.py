"""SampledKL (k3) and SampledEntropy, loss + backward, against the same maths written by hand.

A Tinker-shaped batch: 64 datums of 64-1024 tokens each (ragged), torch float32 CPU, a list
of per-datum tensors that require grad (what ``forward_backward_custom`` hands a loss), with
the reference logprobs of the same tokens. "theirs" is what a user writes by hand, verl's way:

    kl = ref - logprob; ratio = torch.exp(kl); kld = ratio - kl - 1      # verl low_var_kl
    rho = torch.exp(logprob - logprob.detach()); bonus = rho * logprob   # on-policy entropy

each token-mean over the concatenated batch; ours is ``rg.SampledKL(Field("ref"))`` and
``rg.SampledEntropy()`` with ``reduce="mean"`` (which also return their metrics). Both are
timed in the same process on the same tensors, interleaved round by round; the medians and
their ratio are printed. Run: ``python benchmarks/family_sampled.py [--rounds N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import regularizers as rg

DATUMS, SHORTEST, LONGEST = 64, 64, 1024


def tinker_batch(seed: int = 0) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SHORTEST, LONGEST + 1, size=DATUMS)
    logprobs, refs = [], []
    for n in lengths:
        lp = -rng.gamma(0.6, 1.8, size=n)
        logprobs.append(torch.tensor(lp, dtype=torch.float32, requires_grad=True))
        ref = np.minimum(lp + rng.normal(0.0, 0.3, size=n), 0.0)
        refs.append(torch.tensor(ref, dtype=torch.float32))
    return logprobs, {"ref": refs}


def backward(loss: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    torch.autograd.grad(loss, leaves)


KL = rg.SampledKL(rg.Field("ref"), reduce="mean")  # estimator="k3"
ENTROPY = rg.SampledEntropy(reduce="mean")


def ours_kl(lps: list[torch.Tensor], data: dict[str, Any]) -> None:
    loss, _ = KL.compute(data, lps)
    backward(loss, lps)


def theirs_kl(lps: list[torch.Tensor], data: dict[str, Any]) -> None:
    logprob, ref = torch.cat(lps), torch.cat(data["ref"])
    kl = ref - logprob
    ratio = torch.exp(kl)
    kld = ratio - kl - 1
    backward(kld.mean(), lps)


def ours_entropy(lps: list[torch.Tensor], data: dict[str, Any]) -> None:
    loss, _ = ENTROPY.compute(data, lps)
    backward(loss, lps)


def theirs_entropy(lps: list[torch.Tensor], data: dict[str, Any]) -> None:
    logprob = torch.cat(lps)
    rho = torch.exp(logprob - logprob.detach())
    backward((rho * logprob).mean(), lps)


CASES: dict[str, dict[str, Callable[..., None]]] = {
    "sampled_kl_k3": {"ours": ours_kl, "theirs": theirs_kl},
    "sampled_entropy": {"ours": ours_entropy, "theirs": theirs_entropy},
}


def check_same_gradients(lps: list[torch.Tensor], data: dict[str, Any]) -> None:
    """Both sides compute the same numbers (so the timing compares like with like)."""
    pairs = [(KL, theirs_kl), (ENTROPY, theirs_entropy)]
    for reg, theirs in pairs:
        ours = torch.autograd.grad(reg.compute(data, lps)[0], lps)
        logprob = torch.cat(lps)
        if theirs is theirs_kl:
            kl = torch.cat(data["ref"]) - logprob
            loss = (torch.exp(kl) - kl - 1).mean()
        else:
            loss = (torch.exp(logprob - logprob.detach()) * logprob).mean()
        want = torch.autograd.grad(loss, lps)
        for a, b in zip(ours, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def measure(rounds: int) -> dict[str, dict[str, float]]:
    lps, data = tinker_batch()
    check_same_gradients(lps, data)
    times: dict[str, dict[str, list[float]]] = {
        case: {impl: [] for impl in impls} for case, impls in CASES.items()
    }
    for _ in range(3):  # warm-up
        for impls in CASES.values():
            for fn in impls.values():
                fn(lps, data)
    for _ in range(rounds):
        for case, impls in CASES.items():
            for impl, fn in impls.items():
                start = time.perf_counter()
                fn(lps, data)
                times[case][impl].append(time.perf_counter() - start)
    return {
        case: {impl: statistics.median(ts) for impl, ts in by_impl.items()}
        for case, by_impl in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: at 35k tokens an op is microseconds, and "
        "threads on a busy machine mostly measure their own wake-up)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = sum(int(t.shape[0]) for t in tinker_batch()[0])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {DATUMS} datums, "
        f"{tokens} tokens, float32; loss + backward, median of {args.rounds} rounds"
    )
    print(f"{'case':<18}{'ours (ms)':>12}{'theirs (ms)':>14}{'ours/theirs':>14}")
    for case, result in measure(args.rounds).items():
        ours, theirs = result["ours"], result["theirs"]
        print(f"{case:<18}{ours * 1e3:>12.3f}{theirs * 1e3:>14.3f}{ours / theirs:>14.2f}")


if __name__ == "__main__":
    main()
