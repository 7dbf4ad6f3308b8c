"""The figures of docs/distributions.md, computed with the library itself (NumPy).

Run from the repository root: ``python docs/plots/distributions.py``; writes
``docs/img/distributions_two_classes.png`` and ``docs/img/distributions_jsd_beta.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import regularizers as rg

OUT = Path(__file__).resolve().parents[1] / "img"


def per_token(
    reg: rg.Regularizer, z: np.ndarray, data: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """The per-token values of ``reg`` (each row of ``z`` computed as its own call)."""
    out = []
    for i in range(z.shape[0]):
        row = {k: v[i : i + 1] for k, v in (data or {}).items()}
        out.append(float(reg.compute(row or None, z[i : i + 1])[0]))
    return np.asarray(out)


def two_classes() -> None:
    """Entropy and KL of p = softmax([a, 0]) against its logit a, and their gradients."""
    a = np.linspace(-8, 8, 401)
    z = np.stack([a, np.zeros_like(a)], axis=-1)
    r = np.tile(np.array([[1.0, 0.0]]), (a.size, 1))  # the reference q = softmax([1, 0])
    data = {"r": r}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    curves = {
        "H(p) (Entropy)": (rg.Entropy(), None),
        "log 2 - H(p) (Entropy, maximize)": (rg.Entropy(mode="maximize"), None),
        "KL(p||q) (KL, reverse)": (rg.KL(rg.Field("r")), data),
        "KL(q||p) (KL, forward)": (rg.KL(rg.Field("r"), direction="forward"), data),
        "JSD_0.5(p, q)": (rg.JSD(rg.Field("r")), data),
    }
    for label, (reg, d) in curves.items():
        left.plot(a, per_token(reg, z, d), label=label)
        grads = np.asarray(
            [
                reg.value_and_grad(None if d is None else {"r": r[i : i + 1]}, z[i : i + 1])[2][
                    0, 0
                ]
                for i in range(a.size)
            ]
        )
        right.plot(a, grads, label=label)
    left.axhline(math.log(2), color="grey", lw=0.8, ls=":")
    left.text(-7.8, math.log(2) + 0.05, "log 2 = log V", color="grey")
    left.axvline(1.0, color="grey", lw=0.8, ls="--")
    left.text(1.15, 2.6, "a = 1: p = q", color="grey")
    left.set(
        xlabel="logit a of class 1 (class 2 has 0)",
        ylabel="per-token value (nats)",
        ylim=(-0.1, 3.0),
        title="Two classes: p = softmax([a, 0]), q = softmax([1, 0])",
    )
    right.set(xlabel="logit a", ylabel="d value / d a", title="Closed-form gradients")
    right.axhline(0.0, color="grey", lw=0.8)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "distributions_two_classes.png", dpi=120)
    plt.close(fig)


def jsd_beta() -> None:
    """JSD_β against β: its upper bound, reached by disjoint supports, and partial overlaps."""
    betas = np.linspace(0.01, 0.99, 99)
    bound = -betas * np.log(betas) - (1 - betas) * np.log(1 - betas)
    pairs = {
        "disjoint supports": ([[0.0, 0.0, -np.inf, -np.inf]], [[-np.inf, -np.inf, 0.0, 1.0]]),
        "one shared class": ([[0.0, 0.0, -np.inf]], [[-np.inf, 0.0, 0.0]]),
        "p = softmax([2, 0]), q = softmax([0, 2])": ([[2.0, 0.0]], [[0.0, 2.0]]),
    }
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(betas, bound, color="black", lw=2, label="bound -b ln b - (1-b) ln(1-b)")
    for label, (x, y) in pairs.items():
        x, y = np.asarray(x), np.asarray(y)
        values = [float(rg.JSD(y, beta=float(b))(x)[0]) for b in betas]
        ax.plot(betas, values, ls="--", label=label)
    ax.set(
        xlabel="beta (the reference's weight in m = beta q + (1-beta) p)",
        ylabel="JSD (nats)",
        title="Generalized JSD: 0 <= JSD <= its bound",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "distributions_jsd_beta.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    two_classes()
    jsd_beta()
    print(f"wrote {OUT / 'distributions_two_classes.png'} and {OUT / 'distributions_jsd_beta.png'}")
