"""Draw docs/img/kl_estimators.png: each SampledKL estimator and its gradient against d = lp - ref.

Everything drawn is computed by the library itself (NumPy, ``value_and_grad``), so the picture
is of what the code does. Run: ``python docs/plots/kl_estimators.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import regularizers as rg

OUT = Path(__file__).resolve().parent.parent / "img" / "kl_estimators.png"
D = np.linspace(-2.5, 2.5, 501)  # d = lp - ref; the reference is 0, so lp = d
STYLES = {
    "k1": ("tab:gray", "-"),
    "abs": ("tab:purple", "-"),
    "k2": ("tab:blue", "-"),
    "k3": ("tab:red", "-"),
}


def per_token(reg: rg.SampledKL) -> tuple[np.ndarray, np.ndarray]:
    """(p(d), dp/dlp(d)): each token alone for its value, all tokens at once for the gradient."""
    data = {"ref": np.zeros_like(D)}
    _, _, grad = reg.value_and_grad(data, D)
    values = np.array([float(reg(np.array([d]), data={"ref": np.zeros(1)})[0]) for d in D])
    return values, np.asarray(grad)


def main() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for est, (color, style) in STYLES.items():
        values, grad = per_token(rg.SampledKL(rg.Field("ref"), estimator=est))
        left.plot(D, values, color=color, linestyle=style, label=est)
        right.plot(D, grad, color=color, linestyle=style, label=f"{est}")
    for est, color in (("k1", "tab:gray"), ("k3", "tab:red")):
        _, grad = per_token(rg.SampledKL(rg.Field("ref"), estimator=est, gradient="unbiased"))
        right.plot(D, grad, color=color, linestyle="--", label=f'{est}, gradient="unbiased"')
    left.set_title("per-token value k(d)")
    left.set_ylim(-2.6, 6.0)
    right.set_title("per-token gradient dp/dlp (no behavior)")
    right.set_ylim(-3.0, 3.5)
    for ax in (left, right):
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel("d = lp - ref")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    right.annotate(
        "in expectation over sampled tokens:\n"
        "k1: 0    k2: grad KL(pi||ref)    k3: grad KL(ref||pi)\n"
        'k1, k3 with gradient="unbiased": grad KL(pi||ref)\n'
        '(k3 "unbiased" = k2 = d, per token)',
        xy=(0.98, 0.03),
        xycoords="axes fraction",
        ha="right",
        va="bottom",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"},
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
