"""Orthogonality: the penalty of a 2x2 matrix whose second row turns by an angle phi.

Writes ``docs/img/orthogonality.png``: with rows w1 = (1, 0) and w2 = (cos phi, sin phi), the
value of ``kind="cosine"`` (|cos phi|) and ``kind="frobenius"`` (2 cos^2 phi), and their
derivative along phi, from the library's closed-form gradient w.r.t. W (NumPy). The kink of
|cos| at phi = 90 degrees is marked with the value the library uses there.
"""

from __future__ import annotations

import numpy as np
from _common import GRAD, OTHER, VALUE, figure, jump, save

import regularizers as rg


def matrix(phi: float) -> np.ndarray:
    if phi == 90.0:  # exactly orthogonal rows (cos(pi/2) is 6e-17 in floating point)
        return np.array([[1.0, 0.0], [0.0, 1.0]])
    r = np.deg2rad(phi)
    return np.array([[1.0, 0.0], [np.cos(r), np.sin(r)]])


def along(reg: rg.Orthogonality, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The value, and d value / d phi = <grad_W, dW/dphi> (per radian)."""
    values, slopes = [], []
    for p in phi:
        value, _, grad = reg.value_and_grad(None, matrix(float(p)))
        r = np.deg2rad(p)
        direction = np.array([[0.0, 0.0], [-np.sin(r), np.cos(r)]])
        values.append(float(value))
        slopes.append(float(np.sum(np.asarray(grad) * direction)))
    return np.array(values), np.array(slopes)


def main() -> None:
    phi = np.linspace(0.0, 180.0, 361)
    phi = phi[phi != 90.0]
    fig, left, right = figure(
        "rg.Orthogonality(): W with rows (1, 0) and (cos phi, sin phi)",
        "penalty of the matrix",
        "its derivative along phi (gradient w.r.t. W . dW/dphi)",
    )
    cosine, frob = rg.Orthogonality(), rg.Orthogonality(kind="frobenius")
    v_cos, g_cos = along(cosine, phi)
    v_frob, g_frob = along(frob, phi)
    left.plot(phi, v_cos, color=VALUE, lw=2, label='kind="cosine": |cos phi|')
    left.plot(phi, v_frob, color=OTHER, lw=1.5, ls="--", label='kind="frobenius": 2 cos² phi')
    for part in (phi < 90, phi > 90):
        right.plot(phi[part], g_cos[part], color=GRAD, lw=2)
    right.plot([], [], color=GRAD, lw=2, label='"cosine": -sign(cos phi) sin phi')
    right.plot(phi, g_frob, color=OTHER, lw=1.5, ls="--", label='"frobenius": -2 sin 2phi')
    at = float(along(cosine, np.array([90.0]))[1][0])
    jump(right, 90.0, -1.0, 1.0, at, "orthogonal rows: 0, the\nsubgradient of |c| at c = 0")
    for ax in (left, right):
        ax.set_xlabel("phi (degrees)")
        ax.set_xticks([0, 45, 90, 135, 180])
        ax.legend(fontsize=8, loc="upper right" if ax is left else "lower left")
    right.set_ylim(-2.3, 2.3)
    save(fig, "orthogonality")


if __name__ == "__main__":
    main()
