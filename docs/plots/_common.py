"""Helpers shared by the plot scripts of this folder (not a script: the driver skips ``_*``).

Every script draws from the library itself (NumPy, closed-form ``value_and_grad``), so a
picture in the docs is what the code computes, regenerated at each docs build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

IMG = Path(__file__).resolve().parent.parent / "img"
VALUE, GRAD, OTHER, KINK = "#3949ab", "#d81b60", "#9e9e9e", "#212121"


def per_element(reg: Any, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The penalty of each element of ``t`` alone, and its derivative there.

    The derivative is the library's closed form (``value_and_grad`` with ``reduce="sum"``
    is separable, so the gradient of the whole grid is the derivative at each point).
    """
    values = np.array([float(reg(np.asarray([x]))[0]) for x in t])
    _, _, grad = reg.value_and_grad(None, np.asarray(t, dtype=np.float64))
    return values, np.asarray(grad)


def derivative_at(reg: Any, x: float) -> float:
    """The library's derivative at one point (a kink: 0, a clip bound)."""
    return float(np.asarray(reg.value_and_grad(None, np.asarray([x]))[2])[0])


def figure(
    title: str, value: str = "penalty of one element", grad: str = "its gradient"
) -> tuple[Any, Any, Any]:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4), constrained_layout=True)
    fig.suptitle(title, fontsize=11)
    left.set_title(value, fontsize=10)
    right.set_title(grad, fontsize=10)
    for ax in (left, right):
        ax.axhline(0, color="#e0e0e0", lw=0.8, zorder=0)
        ax.axvline(0, color="#e0e0e0", lw=0.8, zorder=0)
        ax.set_xlabel("t")
        ax.grid(alpha=0.25)
    return fig, left, right


def jump(ax: Any, x: float, left: float, right: float, at: float, label: str) -> None:
    """A jump of the gradient at ``x``: open circles at the one-sided limits, a filled
    dot at the value the library uses, and a note saying which."""
    ax.plot([x, x], [left, right], ls=":", color=OTHER, lw=1)
    ax.plot([x, x], [left, right], "o", mfc="white", mec=GRAD, ms=6, zorder=3)
    ax.plot([x], [at], "o", color=KINK, ms=6, zorder=4)
    if label:
        ax.annotate(
            label,
            (x, at),
            xytext=(10, -18 if at >= 0 else 12),
            textcoords="offset points",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": KINK, "lw": 0.6},
        )


def bounds(ax: Any, *xs: float, label: str = "clip bound") -> None:
    for i, x in enumerate(xs):
        ax.axvline(x, color=OTHER, ls="--", lw=0.9, label=label if i == 0 else None)


def save(fig: Any, name: str) -> Path:
    IMG.mkdir(exist_ok=True)
    path = IMG / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
