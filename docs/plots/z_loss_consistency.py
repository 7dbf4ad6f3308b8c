"""ZLoss and Consistency: each penalty and its gradient, drawn from the library (NumPy).

Writes ``docs/img/z_loss.png``: the z-loss of a row of scores shifted by c, against the row's
log-partition log Z, with its derivative along the shift (2 log Z); and
``docs/img/consistency.png``: the elementwise metrics ("mse", "l1": kink at 0 marked) against
x - y, and the row metrics ("cosine" against the angle between two rows, "kl" against the
logit gap of two 2-class rows), each with its derivative.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import GRAD, KINK, OTHER, VALUE, figure, jump, save

import regularizers as rg


def z_loss() -> None:
    reg = rg.ZLoss()
    base = np.array([2.0, 0.5, -1.0])
    shifts = np.linspace(-4.5, 1.5, 241)
    log_z, value, slope = [], [], []
    for c in shifts:
        v, _, g = reg.value_and_grad(None, (base + c)[None, :])
        log_z.append(float(np.logaddexp.reduce(base + c)))
        value.append(float(v))
        slope.append(float(np.sum(np.asarray(g))))  # d/dc: every score moves with c
    fig, left, right = figure(
        "rg.ZLoss(): (log Z)² per token, log Z = logsumexp(scores)",
        "penalty of one token (scores + c)",
        "its derivative along c",
    )
    left.plot(log_z, value, color=VALUE, lw=2, label="(log Z)²")
    right.plot(log_z, slope, color=GRAD, lw=2, label="d/dc = sum of 2 log Z softmax = 2 log Z")
    for ax in (left, right):
        ax.set_xlabel("log Z of scores + c")
        ax.plot([0.0], [0.0], "o", color=KINK, ms=6)
        ax.legend(fontsize=8, loc="upper left")
    left.annotate("normalized scores (logprobs): 0", (0.0, 0.0), xytext=(10, 20),
                  textcoords="offset points", fontsize=8)  # fmt: skip
    save(fig, "z_loss")


def along(
    reg: rg.Consistency, xs: list[np.ndarray], dxs: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The value at each row x, and its derivative along the path (gradient . dx)."""
    values, slopes = [], []
    for x, dx in zip(xs, dxs, strict=True):
        v, _, g = reg.value_and_grad(None, x[None, :])
        values.append(float(v))
        slopes.append(float(np.sum(np.asarray(g)[0] * dx)))
    return np.array(values), np.array(slopes)


def consistency() -> None:
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.4), constrained_layout=True)
    fig.suptitle(
        "rg.Consistency(paired, metric=...): between the input x and paired y", fontsize=11
    )
    (v1, g1), (v2, g2) = axes
    d = np.linspace(-2.0, 2.0, 401)
    d = d[d != 0.0]
    for metric, color in (("mse", OTHER), ("l1", VALUE)):
        reg = rg.Consistency(rg.Field("y"), metric=metric)  # y = 0
        value = np.array([float(reg.compute({"y": np.zeros(1)}, np.asarray([x]))[0]) for x in d])
        grad = np.asarray(reg.value_and_grad({"y": np.zeros_like(d)}, d)[2])
        label = {"mse": "(x - y)²", "l1": "|x - y|"}[metric]
        v1.plot(d, value, color=color, lw=2, label=f'"{metric}": {label}')
        for part in (d < 0, d > 0):
            g1.plot(d[part], grad[part], color=color, lw=2)
        g1.plot([], [], color=color, lw=2, label=f'"{metric}"')
    l1 = rg.Consistency(np.zeros(1), metric="l1")
    at = float(np.asarray(l1.value_and_grad(None, np.zeros(1))[2])[0])
    jump(g1, 0.0, -1.0, 1.0, at, '"l1": 0 at x = y')
    v1.set_title("per element, against x - y", fontsize=10)
    g1.set_title("its gradient w.r.t. x", fontsize=10)

    phi = np.deg2rad(np.linspace(-180.0, 180.0, 361))
    cosine = rg.Consistency(np.array([[1.0, 0.0]]), metric="cosine")
    xs = [np.array([np.cos(p), np.sin(p)]) for p in phi]
    dxs = [np.array([-np.sin(p), np.cos(p)]) for p in phi]
    value, slope = along(cosine, xs, dxs)
    v2.plot(np.rad2deg(phi), value, color=VALUE, lw=2, label="1 - cos")
    v2.plot(np.rad2deg(phi), slope, color=GRAD, lw=2, label="its derivative along the angle")
    v2.set_xlabel("angle between x = (cos a, sin a) and y = (1, 0), degrees")
    v2.set_title('"cosine", per row', fontsize=10)

    gap = np.linspace(-4.0, 4.0, 321)
    kl = rg.Consistency(np.array([[0.0, 0.0]]), metric="kl")
    rows = [np.array([g, 0.0]) for g in gap]
    value, slope = along(kl, rows, [np.array([1.0, 0.0])] * len(gap))
    g2.plot(gap, value, color=VALUE, lw=2, label="symmetric KL")
    g2.plot(gap, slope, color=GRAD, lw=2, label="its derivative along the gap")
    g2.set_xlabel("logit gap of x = (gap, 0); y = (0, 0), uniform")
    g2.set_title('"kl", per row (log-softmax of each row)', fontsize=10)
    for ax in (v1, g1, v2, g2):
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7)
    save(fig, "consistency")


if __name__ == "__main__":
    z_loss()
    consistency()
