"""The gradient penalty and its gradient against ‖g‖, computed by the library itself.

Run from the repository root: ``python docs/plots/weights.py`` writes
``docs/img/gradient_penalty.png`` (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import regularizers as rg

OUT = Path(__file__).resolve().parents[1] / "img" / "gradient_penalty.png"
DIRECTION = np.array([0.6, 0.8])  # a unit vector: g = t · DIRECTION has ‖g‖ = t


def along(c: float, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per ‖g‖: the penalty, and its gradient's component along g / ‖g‖ (by value_and_grad)."""
    reg = rg.GradientPenalty(target_norm=c)
    value, slope = [], []
    for t in norms:
        v, _, grad = reg.value_and_grad(None, (t * DIRECTION)[None, :])
        value.append(float(v))
        slope.append(float(grad[0] @ DIRECTION))
    return np.array(value), np.array(slope)


def main() -> None:
    norms = np.linspace(0.0, 3.0, 301)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.6), constrained_layout=True)
    for c, color in [(1.0, "tab:blue"), (0.5, "tab:orange"), (0.0, "tab:green")]:
        value, slope = along(c, norms)
        left.plot(norms, value, color=color, label=f"c = {c:g}")
        right.plot(norms[1:], slope[1:], color=color, label=f"c = {c:g}")
        # at g = 0 the gradient is 0 by convention (filled), not the limit -2c (open)
        right.plot([0.0], [slope[0]], "o", color=color)
        if c:
            right.plot([0.0], [-2.0 * c], "o", mfc="white", color=color)
    left.set(xlabel="‖g‖", ylabel="(‖g‖ - c)²", title="GradientPenalty: value per row")
    right.set(
        xlabel="‖g‖",
        ylabel="∇p · g/‖g‖ = 2(‖g‖ - c)",
        title="its gradient along g (0 at g = 0)",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    right.axhline(0.0, color="black", lw=0.5)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
