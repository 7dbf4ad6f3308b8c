"""SampledEntropy: the per-token penalty and its gradient, and why its gradient is the right one.

Writes ``docs/img/sampled_entropy.png``. Left: the per-token value and its gradient w.r.t. the
sampled token's logprob, from the library (NumPy, ``value_and_grad``). Right: for a policy over
two outcomes, the expected gradient of the per-token penalty (summed over outcomes, weighted by
their probabilities), against the gradient of the negative entropy and against the plain
"-logprob" bonus, whose expected gradient is 0.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import GRAD, OTHER, VALUE, save

import regularizers as rg


def per_token() -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    lp = np.linspace(-4.0, 0.0, 201)
    out = {}
    for mode in ("maximize", "minimize"):
        reg = rg.SampledEntropy(mode=mode)
        value = np.array([float(reg(np.asarray([x]))[0]) for x in lp])
        out[mode] = (value, np.asarray(reg.value_and_grad(None, lp)[2]))
    return lp, out


def expected_gradient(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pi = softmax([theta, 0]): sum_i pi_i d(penalty_i)/d theta, the same for the plain
    logprob, and d(-H(pi))/d theta."""
    reg = rg.SampledEntropy()
    ours, plain = [], []
    for t in theta:
        pi = np.exp(np.array([t, 0.0]) - np.logaddexp(t, 0.0))
        lp = np.log(pi)
        dlp = np.array([1.0 - pi[0], -pi[0]])  # d lp_i / d theta
        g = np.asarray(reg.value_and_grad(None, lp)[2])  # d penalty_i / d lp_i
        ours.append(float(np.sum(pi * g * dlp)))
        plain.append(float(np.sum(pi * 1.0 * dlp)))  # d lp_i / d lp_i = 1
    pi0 = 1.0 / (1.0 + np.exp(-theta))
    exact = theta * pi0 * (1.0 - pi0)  # d/d theta of sum pi log pi
    return np.array(ours), np.array(plain), exact


def main() -> None:
    lp, modes = per_token()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), constrained_layout=True)
    fig.suptitle(
        "rg.SampledEntropy(): p = rho * lp, rho = exp(lp - stop_gradient(lp))", fontsize=11
    )
    for mode, ls in (("maximize", "-"), ("minimize", "--")):
        value, grad = modes[mode]
        left.plot(lp, value, ls, color=VALUE, lw=2, label=f'mode="{mode}": value')
        left.plot(lp, grad, ls, color=GRAD, lw=2, label="its gradient w.r.t. lp")
    left.axvline(-1.0, color=OTHER, ls=":", lw=0.9)
    left.annotate("gradient lp + 1: 0 at lp = -1", (-1.0, 0.0), xytext=(-150, 40),
                  textcoords="offset points", fontsize=8)  # fmt: skip
    left.set_xlabel("lp, the sampled token's logprob")
    left.set_title("per token (value: rho = 1)", fontsize=10)
    left.grid(alpha=0.25)
    left.legend(fontsize=7)

    theta = np.linspace(-5.0, 5.0, 201)
    ours, plain, exact = expected_gradient(theta)
    right.plot(theta, exact, color=OTHER, lw=5, alpha=0.5, label="d(-H(pi))/d theta")
    right.plot(theta, ours, color=GRAD, lw=2, label="E[gradient], SampledEntropy")
    right.plot(theta, plain, color=VALUE, ls="--", lw=1.5, label="E[gradient], plain lp: 0")
    right.set_xlabel("theta, with pi = softmax([theta, 0])")
    right.set_title("expected gradient over the sampled token", fontsize=10)
    right.grid(alpha=0.25)
    right.legend(fontsize=7)
    save(fig, "sampled_entropy")


if __name__ == "__main__":
    main()
