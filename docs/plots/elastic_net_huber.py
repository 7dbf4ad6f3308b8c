"""ElasticNet and Huber: each penalty of one element and its gradient, kinks marked.

Writes ``docs/img/elastic_net.png`` and ``docs/img/huber.png`` from the library's own values
and closed-form gradients (NumPy).
"""

from __future__ import annotations

import numpy as np
from _common import GRAD, KINK, OTHER, VALUE, derivative_at, figure, jump, per_element, save

import regularizers as rg


def elastic_net() -> None:
    t = np.linspace(-2.0, 2.0, 401)
    t = t[t != 0.0]
    fig, left, right = figure("rg.ElasticNet(l1_ratio=a): a|t| + (1 - a)t², between L1 and L2")
    shades = {0.0: OTHER, 0.5: VALUE, 1.0: "#8e24aa"}
    for ratio, color in shades.items():
        reg = rg.ElasticNet(l1_ratio=ratio)
        value, grad = per_element(reg, t)
        name = {0.0: " (= L2)", 1.0: " (= L1)"}.get(ratio, "")
        lw = 2 if ratio == 0.5 else 1.2
        left.plot(t, value, color=color, lw=lw, label=f"l1_ratio={ratio:g}{name}")
        for part in (t < 0, t > 0):
            right.plot(t[part], grad[part], color=color, lw=lw)
    reg = rg.ElasticNet(l1_ratio=0.5)
    jump(right, 0.0, -0.5, 0.5, derivative_at(reg, 0.0), "0 at t = 0, whatever l1_ratio")
    left.legend(fontsize=8)
    right.set_ylim(-4.5, 4.5)
    save(fig, "elastic_net")


def huber() -> None:
    delta = 1.0
    reg = rg.Huber(delta=delta)
    t = np.linspace(-3.0, 3.0, 601)
    value, grad = per_element(reg, t)
    half_l2, _ = per_element(rg.L2(), t)
    fig, left, right = figure(f"rg.Huber(delta={delta:g}): ½t² inside ±δ, δ(|t| - ½δ) outside")
    left.plot(t, 0.5 * half_l2, color=OTHER, ls="--", lw=1.2, label="½t² (½ rg.L2)")
    left.plot(t, value, color=VALUE, lw=2, label="Huber")
    left.set_ylim(-0.2, 4.6)
    right.plot(t, t, color=OTHER, ls="--", lw=1.2, label="t")
    right.plot(t, grad, color=GRAD, lw=2, label="clip(t, -δ, δ)")
    for ax in (left, right):
        for x in (-delta, delta):
            ax.axvline(x, color=OTHER, ls=":", lw=0.9)
    right.plot(
        [-delta, delta], [-delta, delta], "o", color=KINK, ms=5, label="|t| = δ: slope joins"
    )
    right.set_ylim(-2.2, 2.2)
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="upper left")
    save(fig, "huber")


if __name__ == "__main__":
    elastic_net()
    huber()
