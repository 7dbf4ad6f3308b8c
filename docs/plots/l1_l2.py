"""L1 and L2: each penalty of one element and its gradient, kinks and clip bounds marked.

Writes ``docs/img/l1.png`` and ``docs/img/l2.png`` from the library's own values and
closed-form gradients (NumPy).
"""

from __future__ import annotations

import numpy as np
from _common import GRAD, OTHER, VALUE, bounds, derivative_at, figure, jump, per_element, save

import regularizers as rg


def l1() -> None:
    reg = rg.L1()
    t = np.linspace(-2.0, 2.0, 401)
    t = t[t != 0.0]  # the kink is drawn on its own
    value, grad = per_element(reg, t)
    fig, left, right = figure("rg.L1(): |t|, subgradient sign(t), 0 at 0")
    left.plot(t, value, color=VALUE, lw=2, label="|t|")
    left.legend(fontsize=8)
    neg, pos = t < 0, t > 0
    right.plot(t[neg], grad[neg], color=GRAD, lw=2, label="d|t|/dt")
    right.plot(t[pos], grad[pos], color=GRAD, lw=2)
    jump(
        right,
        0.0,
        -1.0,
        1.0,
        derivative_at(reg, 0.0),
        "0 at t = 0, every backend\n(JAX's abs says 1)",
    )
    right.set_ylim(-1.6, 1.6)
    right.legend(fontsize=8, loc="upper left")
    save(fig, "l1")


def l2() -> None:
    lo, hi, center = -4.0, 0.0, -1.0
    plain, clipped = rg.L2(), rg.L2(clip=(lo, hi), center=center)
    t = np.linspace(-6.0, 2.0, 801)
    t = t[(t != lo) & (t != hi)]
    v_plain, g_plain = per_element(plain, t)
    v_clip, g_clip = per_element(clipped, t)
    fig, left, right = figure(
        f"rg.L2(clip=({lo}, {hi}), center={center}): (clip(t) - center)², against rg.L2()"
    )
    left.plot(t, v_plain, color=OTHER, ls="--", lw=1.2, label="rg.L2(): t²")
    left.plot(t, v_clip, color=VALUE, lw=2, label="clipped, centered")
    left.set_ylim(-1, 26)
    bounds(left, lo, hi)
    left.legend(fontsize=8, loc="upper center")
    right.plot(t, g_plain, color=OTHER, ls="--", lw=1.2, label="rg.L2(): 2t")
    for part in (t < lo, (t > lo) & (t < hi), t > hi):
        right.plot(t[part], g_clip[part], color=GRAD, lw=2)
    right.plot([], [], color=GRAD, lw=2, label="2(t - center) inside, 0 outside")
    label = "bound included: the gradient passes\n(torch's clamp too; JAX's clip halves it)"
    jump(right, lo, 0.0, 2 * (lo - center), derivative_at(clipped, lo), label)
    jump(right, hi, 2 * (hi - center), 0.0, derivative_at(clipped, hi), "")
    bounds(right, lo, hi)
    right.set_ylim(-9, 5)
    right.legend(fontsize=8, loc="upper left")
    save(fig, "l2")


if __name__ == "__main__":
    l1()
    l2()
