"""The training-path cases: forward + backward of every built-in, against hand-written code.

One entry of ``CASES`` is one case: the regularizer (or Pipeline) measured, the input it
takes, and the hand-written reference for the same outputs (the loss and the metrics the
regularizer reports), written once for torch and JAX over a small adapter (``Ops``), and once
for NumPy with its closed-form gradient (NumPy has no autodiff). Every public built-in
(``rg.__all__``) has a case or a reason in ``SKIPPED``: :func:`missing` names any other, so a
new built-in cannot be forgotten (``spec_tests/test_benchmarks.py`` checks it).

Inputs (float32):

- ``tokens``: the Tinker-shaped batch, 64 datums of 64-1024 tokens (a ragged list), with
  ``weights`` (0 on the first quarter of each datum, the prompt) where a case takes a mask;
  at 1e3, one array of 1,000 elements;
- ``rows`` (penalties over a class axis, and GradientPenalty's vectors): 64 datums of 8-128
  tokens over ``V = 256`` classes (a ragged list of ``[T_i, V]``; 1.1e6 elements); at 1e3,
  one ``[10, 100]`` array;
- ``matrices`` (Orthogonality): a ``[64, 32, 32]`` stack; at 1e3, one ``[32, 32]`` matrix.

Per backend, one training step is:

- torch: ``loss.backward()`` through ``compute`` (or the Pipeline) on leaves that require
  grad, against the hand-written loss through torch autograd;
- JAX: ``jax.jit(jax.value_and_grad(..., has_aux=True))`` of both;
- NumPy: ``value_and_grad``, against hand-written NumPy computing the same gradient.

Also on torch: ``L2(clip, center)`` forward with grad at 1e3 (the per-call overhead), the
Pipeline under ``torch.compile(fullgraph=True)`` against eager, and the family's SampledKL k3
loss + backward against verl's idiom (``kl = ref - logp; ratio = exp(kl); ratio - kl - 1``,
masked token-mean; verl also clamps ``kl`` to ±20 and the result to ±10, left out here).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import regularizers as rg

W1, W2 = 1e-3, 1e-4  # the Tinker pipeline's weights
LO, HI = -100.0, 0.0
TINKER = (64, 64, 1024)  # datums, shortest, longest
ROWS = (64, 8, 128, 256)  # datums, shortest, longest, classes
MATRICES = (64, 32, 32)
BETA = 0.5  # JSD's beta (the default)


# ---- hand-written references for torch and JAX ---------------------------------------------------
@dataclass(frozen=True)
class Ops:
    """What the hand-written references need that torch and JAX spell differently."""

    cat: Callable[[list[Any]], Any]
    clip: Callable[[Any, float, float], Any]
    exp: Callable[[Any], Any]
    log_softmax: Callable[[Any], Any]  # over the last axis
    logsumexp: Callable[[Any], Any]  # over the last axis
    logaddexp: Callable[[Any, Any], Any]
    norm: Callable[[Any], Any]  # Euclidean, over the last axis, keeping it
    stop: Callable[[Any], Any]  # stop_gradient / detach
    amax: Callable[[Any], Any]
    amin: Callable[[Any], Any]
    maximum: Callable[[Any, Any], Any]
    rowsum: Callable[[Any], Any]  # sum over the last axis
    numel: Callable[[Any], int]
    transpose: Callable[[Any], Any]  # swap the last two axes


def stats(o: Ops, name: str, p: Any, n: Any, peak: bool = True) -> tuple[Any, dict[str, Any]]:
    """Sum, and the raw/mean/max metrics every built-in reports."""
    raw = p.sum()
    out = {f"{name}_raw": raw, f"{name}_mean": raw / n}
    if peak:
        out[f"{name}_max"] = o.amax(p)
    return raw, out


def max_square(o: Ops, d: Any) -> Any:
    """max d² from the extrema (two reductions, no squared temporary)."""
    hi, lo = o.amax(d), o.amin(d)
    return o.maximum(hi * hi, lo * lo)


def _l1(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    a = abs(x) if m is None else abs(x) * m
    return stats(o, "l1", a, o.numel(x) if m is None else m.sum(), peak=False)


def _l2(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    raw = (x * x).sum()
    return raw, {"l2_raw": raw, "l2_mean": raw / o.numel(x), "l2_max": max_square(o, x)}


def _l2cc(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    c = o.clip(x, LO, HI)
    d = c - c.mean()
    raw = (d * d).sum()
    return raw, {"l2_raw": raw, "l2_mean": raw / o.numel(x), "l2_max": max_square(o, d)}


def _elastic_net(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    l1, l2 = abs(x), x * x
    raw, metrics = stats(o, "elastic_net", 0.5 * l1 + 0.5 * l2, o.numel(x), peak=False)
    return raw, {**metrics, "l1_raw": l1.sum(), "l2_raw": l2.sum()}


def _huber(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    a = abs(x)
    q = o.clip(a, 0.0, 1.0)  # delta = 1: q (a - q/2) is a²/2 inside, a - 1/2 outside
    return stats(o, "huber", q * (a - 0.5 * q), o.numel(x))


def _sampled_kl(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    kl = y - x  # verl's low_var_kl, without its clamps
    k3 = o.exp(kl) - kl - 1
    raw, metrics = stats(o, "sampled_kl", k3, o.numel(x))
    return raw, {**metrics, "log_ratio_mean": -kl.mean()}


def _sampled_entropy(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    p = o.exp(x - o.stop(x)) * x  # value lp, gradient lp + 1
    raw, metrics = stats(o, "sampled_entropy", p, o.numel(x), peak=False)
    return raw, {**metrics, "entropy_mean": -raw / o.numel(x)}


def _kl(o: Ops, z: Any, r: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    lp, lq = o.log_softmax(z), o.log_softmax(r)
    return stats(o, "kl", o.rowsum(o.exp(lp) * (lp - lq)), z.shape[0])


def _jsd(o: Ops, z: Any, r: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    lp, lq = o.log_softmax(z), o.log_softmax(r)  # TRL GKD's generalized JSD
    lm = o.logaddexp(lq + math.log(BETA), lp + math.log(1 - BETA))
    kl_q = o.rowsum(o.exp(lq) * (lq - lm))
    kl_p = o.rowsum(o.exp(lp) * (lp - lm))
    return stats(o, "jsd", BETA * kl_q + (1 - BETA) * kl_p, z.shape[0])


def _entropy(o: Ops, z: Any, r: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    lp = o.log_softmax(z)
    return stats(o, "entropy", -o.rowsum(o.exp(lp) * lp), z.shape[0])


def _z_loss(o: Ops, z: Any, r: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    lz = o.logsumexp(z)
    raw, metrics = stats(o, "z_loss", lz * lz, z.shape[0])
    return raw, {**metrics, "log_z_mean": lz.mean()}


def _consistency(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    d = x - y
    return stats(o, "consistency", d * d, o.numel(x))


def _orthogonality(o: Ops, w: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    r = w.shape[-2]
    u = w / o.norm(w)
    gram = u @ o.transpose(u)  # mean |cos| over the r(r-1)/2 pairs: the diagonal is r ones
    p = (abs(gram).sum((-2, -1)) - r) / (r * (r - 1))
    return stats(o, "orthogonality", p, o.numel(p))


def _gradient_penalty(o: Ops, g: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    n = o.norm(g)[..., 0]
    d = n - 1.0
    raw, metrics = stats(o, "gradient_penalty", d * d, o.numel(n))
    return raw, {**metrics, "grad_norm_mean": n.mean()}


def _pipeline(o: Ops, x: Any, y: Any, m: Any) -> tuple[Any, dict[str, Any]]:
    v1, m1 = _l1(o, x, y, m)
    v2, m2 = _l2cc(o, x, y, None)
    return W1 * v1 + W2 * v2, {**m1, **m2}


# ---- hand-written NumPy: value, metrics and the closed-form gradient -------------------------
Out = tuple[Any, dict[str, Any], np.ndarray]


def _np_stats(name: str, p: np.ndarray, n: Any, peak: bool = True) -> tuple[Any, dict[str, Any]]:
    raw = p.sum()
    out = {f"{name}_raw": raw, f"{name}_mean": raw / n}
    if peak:
        out[f"{name}_max"] = p.max()
    return raw, out


def _np_l1(x: np.ndarray, y: Any, m: Any) -> Out:
    a = np.abs(x) if m is None else np.abs(x) * m
    raw, metrics = _np_stats("l1", a, x.size if m is None else m.sum(), peak=False)
    return raw, metrics, np.sign(x) if m is None else np.sign(x) * m


def _np_l2(x: np.ndarray, y: Any, m: Any) -> Out:
    raw = np.dot(x.ravel(), x.ravel())
    peak = max(x.max() ** 2, x.min() ** 2)
    return raw, {"l2_raw": raw, "l2_mean": raw / x.size, "l2_max": peak}, 2 * x


def _np_l2cc(x: np.ndarray, y: Any, m: Any) -> Out:
    c = np.clip(x, LO, HI)
    d = c - c.mean()
    raw = np.dot(d, d)
    peak = max(d.max() ** 2, d.min() ** 2)
    g = 2 * (d - d.mean())  # the mean's own gradient: d.mean() is 0 up to rounding
    g[(x < LO) | (x > HI)] = 0.0
    return raw, {"l2_raw": raw, "l2_mean": raw / x.size, "l2_max": peak}, g


def _np_elastic_net(x: np.ndarray, y: Any, m: Any) -> Out:
    l1, l2 = np.abs(x), x * x
    raw, metrics = _np_stats("elastic_net", 0.5 * l1 + 0.5 * l2, x.size, peak=False)
    return raw, {**metrics, "l1_raw": l1.sum(), "l2_raw": l2.sum()}, 0.5 * np.sign(x) + x


def _np_huber(x: np.ndarray, y: Any, m: Any) -> Out:
    a = np.abs(x)
    q = np.minimum(a, 1.0)
    raw, metrics = _np_stats("huber", q * (a - 0.5 * q), x.size)
    return raw, metrics, np.clip(x, -1.0, 1.0)


def _np_sampled_kl(x: np.ndarray, y: np.ndarray, m: Any) -> Out:
    kl = y - x
    ratio = np.exp(kl)
    raw, metrics = _np_stats("sampled_kl", ratio - kl - 1, x.size)
    return raw, {**metrics, "log_ratio_mean": -kl.mean()}, 1 - ratio


def _np_sampled_entropy(x: np.ndarray, y: Any, m: Any) -> Out:
    raw, metrics = _np_stats("sampled_entropy", x, x.size, peak=False)
    return raw, {**metrics, "entropy_mean": -raw / x.size}, x + 1


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(-1, keepdims=True)
    return z - (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))


def _np_kl(z: np.ndarray, r: np.ndarray, m: Any) -> Out:
    lp, lq = _np_log_softmax(z), _np_log_softmax(r)
    p, d = np.exp(lp), lp - lq
    kl = (p * d).sum(-1)
    raw, metrics = _np_stats("kl", kl, kl.size)
    return raw, metrics, p * (d - kl[:, None])


def _np_jsd(z: np.ndarray, r: np.ndarray, m: Any) -> Out:
    lp, lq = _np_log_softmax(z), _np_log_softmax(r)
    p, q = np.exp(lp), np.exp(lq)
    lm = np.logaddexp(lq + math.log(BETA), lp + math.log(1 - BETA))
    dp = lp - lm
    kl_p = (p * dp).sum(-1)
    jsd = BETA * (q * (lq - lm)).sum(-1) + (1 - BETA) * kl_p
    raw, metrics = _np_stats("jsd", jsd, jsd.size)
    return raw, metrics, (1 - BETA) * p * (dp - kl_p[:, None])


def _np_entropy(z: np.ndarray, r: Any, m: Any) -> Out:
    lp = _np_log_softmax(z)
    p = np.exp(lp)
    h = -(p * lp).sum(-1)
    raw, metrics = _np_stats("entropy", h, h.size)
    return raw, metrics, -p * (lp + h[:, None])


def _np_z_loss(z: np.ndarray, r: Any, m: Any) -> Out:
    top = z.max(-1, keepdims=True)
    e = np.exp(z - top)
    s = e.sum(-1, keepdims=True)
    lz = (top + np.log(s))[:, 0]
    raw, metrics = _np_stats("z_loss", lz * lz, lz.size)
    return raw, {**metrics, "log_z_mean": lz.mean()}, (2 * lz[:, None] / s) * e


def _np_consistency(x: np.ndarray, y: np.ndarray, m: Any) -> Out:
    d = x - y
    raw, metrics = _np_stats("consistency", d * d, x.size)
    return raw, metrics, 2 * d


def _np_orthogonality(w: np.ndarray, y: Any, m: Any) -> Out:
    r = w.shape[-2]
    n = np.linalg.norm(w, axis=-1, keepdims=True)
    u = w / n
    gram = u @ u.swapaxes(-1, -2)
    scale = 1.0 / (r * (r - 1))
    p = (np.abs(gram).sum((-2, -1)) - r) * scale
    raw, metrics = _np_stats("orthogonality", p, p.size)
    s = np.sign(gram)
    idx = np.arange(r)
    s[..., idx, idx] = 0.0
    du = (2 * scale) * (s @ u)
    g = (du - u * (du * u).sum(-1, keepdims=True)) / n
    return raw, metrics, g


def _np_gradient_penalty(g: np.ndarray, y: Any, m: Any) -> Out:
    n = np.linalg.norm(g, axis=-1)
    d = n - 1.0
    raw, metrics = _np_stats("gradient_penalty", d * d, n.size)
    return raw, {**metrics, "grad_norm_mean": n.mean()}, (2 * d / n)[:, None] * g


def _np_pipeline(x: np.ndarray, y: Any, m: Any) -> Out:
    v1, m1, g1 = _np_l1(x, y, m)
    v2, m2, g2 = _np_l2cc(x, y, None)
    g1 *= W1
    g1 += W2 * g2
    return W1 * v1 + W2 * v2, {**m1, **m2}, g1


@dataclass(frozen=True)
class Case:
    """One training-path case: ours, and the hand-written reference for each backend."""

    name: str  # the built-in's class name, or "Pipeline"
    label: str
    ours: Callable[[], Any]  # the regularizer or Pipeline (operand: Field("other"))
    native: Callable[[Ops, Any, Any, Any], tuple[Any, dict[str, Any]]]
    numpy: Callable[[np.ndarray, Any, Any], Out]
    shape: str = "tokens"  # tokens, rows or matrices
    other: str | None = None  # "ref" (a reference: logprobs or scores) or "paired"
    masked: bool = False  # reads the Tinker batch's weights (Field("weights")) as its mask


OTHER = rg.Field("other")
MASK = rg.Field("weights")
CASES = [
    Case("L1", "L1(mask)", lambda: rg.L1(mask=MASK), _l1, _np_l1, masked=True),
    Case("L2", "L2", rg.L2, _l2, _np_l2),
    Case("ElasticNet", "ElasticNet", rg.ElasticNet, _elastic_net, _np_elastic_net),
    Case("Huber", "Huber", rg.Huber, _huber, _np_huber),
    Case(
        "SampledKL",
        "SampledKL k3",
        lambda: rg.SampledKL(OTHER),
        _sampled_kl,
        _np_sampled_kl,
        other="ref",
    ),
    Case(
        "SampledEntropy", "SampledEntropy", rg.SampledEntropy, _sampled_entropy, _np_sampled_entropy
    ),
    Case("KL", "KL [T, V]", lambda: rg.KL(OTHER), _kl, _np_kl, "rows", "scores"),
    Case("JSD", "JSD [T, V]", lambda: rg.JSD(OTHER), _jsd, _np_jsd, "rows", "scores"),
    Case("Entropy", "Entropy [T, V]", rg.Entropy, _entropy, _np_entropy, "rows"),
    Case("ZLoss", "ZLoss [T, V]", rg.ZLoss, _z_loss, _np_z_loss, "rows"),
    Case(
        "Consistency",
        "Consistency (mse)",
        lambda: rg.Consistency(OTHER),
        _consistency,
        _np_consistency,
        other="paired",
    ),
    Case(
        "Orthogonality",
        "Orthogonality [N, 32, 32]",
        rg.Orthogonality,
        _orthogonality,
        _np_orthogonality,
        "matrices",
    ),
    Case(
        "GradientPenalty",
        "GradientPenalty [T, D]",
        rg.GradientPenalty,
        _gradient_penalty,
        _np_gradient_penalty,
        "rows",
    ),
    Case(
        "Pipeline",
        "Pipeline 1e-3 L1(mask) + 1e-4 L2(clip, center)",
        lambda: rg.Pipeline(
            [(rg.L1(mask=MASK), W1), (rg.L2(clip=(LO, HI), center="mean"), W2)], metrics="array"
        ),
        _pipeline,
        _np_pipeline,
        masked=True,
    ),
]
L2CC = Case(
    "L2cc", "L2(clip, center)", lambda: rg.L2(clip=(LO, HI), center="mean"), _l2cc, _np_l2cc
)
# built-ins without a training-path case, and why (none today)
SKIPPED: dict[str, str] = {}
LABELS = {c.name: c.label for c in [*CASES, L2CC]}


def builtins() -> list[str]:
    """The public built-in regularizer classes (rg.__all__)."""
    names = []
    for name in rg.__all__:
        obj = getattr(rg, name)
        if isinstance(obj, type) and issubclass(obj, rg.Regularizer) and obj is not rg.Regularizer:
            names.append(name)
    return names


def missing() -> list[str]:
    """Built-ins with neither a case nor a reason to skip them."""
    covered = {c.name for c in CASES} | set(SKIPPED)
    return [name for name in builtins() if name not in covered]


# ---- inputs -------------------------------------------------------------------------------------
def _lengths(rng: np.random.Generator, datums: int, short: int, long: int) -> np.ndarray:
    return rng.integers(short, long + 1, size=datums)


def inputs(shape: str, size: str, scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """``x`` (a list of arrays), ``other`` (the reference or paired view) and ``weights``.

    ``size`` is ``"tinker"`` or ``"1e3"``; ``scale`` < 1 shrinks the batch (``--smoke``).
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    if shape == "matrices":
        n, r, c = MATRICES if size == "tinker" else (1, 32, 32)
        n = max(1, int(n * scale))
        xs = [rng.normal(size=(n, r, c)).astype(f32)]
        if size == "1e3":
            xs = [xs[0][0]]
        return {"x": xs, "other": None, "weights": None}
    if shape == "rows":
        datums, short, long, v = ROWS
        if size == "tinker":
            lengths = _lengths(
                rng, max(2, int(datums * scale)), short, max(short, int(long * scale))
            )
            xs = [rng.normal(0.0, 3.0, size=(k, v)).astype(f32) for k in lengths]
        else:
            xs = [rng.normal(0.0, 3.0, size=(10, 100)).astype(f32)]
        other = [(x + rng.normal(0.0, 1.0, size=x.shape)).astype(f32) for x in xs]
        return {"x": xs, "other": other, "weights": None}
    datums, short, long = TINKER
    if size == "tinker":
        lengths = _lengths(rng, max(2, int(datums * scale)), short, max(short, int(long * scale)))
    else:
        lengths = np.array([1000])
    xs = [(-rng.gamma(0.6, 1.8, size=k)).astype(f32) for k in lengths]
    for x in xs:  # a few tokens beyond the clip range, as real logprobs have
        x[rng.integers(0, x.size, size=2)] = -rng.uniform(100, 150, size=2)
    other = [np.minimum(x + rng.normal(0.0, 0.3, size=x.size), 0.0).astype(f32) for x in xs]
    weights = [(np.arange(x.size) >= x.size // 4).astype(f32) for x in xs]
    return {"x": xs, "other": other, "weights": weights}


def _data(case: Case, inp: dict[str, Any], single: bool) -> dict[str, Any] | None:
    data: dict[str, Any] = {}
    if case.other is not None:
        data["other"] = inp["other"][0] if single else inp["other"]
    if case.masked:
        data["weights"] = inp["weights"][0] if single else inp["weights"]
    return data or None


# ---- per backend: (case key, n, {impl: fn}, argument) -------------------------------------------
Entry = tuple[str, int, dict[str, Callable[[Any], Any]], Any]


def cases(backend: str, scale: float = 1.0, compile: bool = True) -> list[Entry]:
    """Every case of this backend, ready to time: ``train_<Name>_<tinker|1e3>``, and on torch
    ``fwdgrad_L2cc_1e3``, ``verl_SampledKL_tinker`` and (``compile``)
    ``compiled_Pipeline_tinker``."""
    for name in missing():
        print(f"# no training-path case for the built-in {name}", file=sys.stderr)
    for name, why in SKIPPED.items():
        print(f"# {name} skipped: {why}", file=sys.stderr)
    make = {"numpy": _numpy_impls, "torch": _torch_impls, "jax": _jax_impls}[backend]
    out: list[Entry] = []
    for case in CASES:
        for size in ("tinker", "1e3"):
            inp = inputs(case.shape, size, scale)
            n = sum(int(a.size) for a in inp["x"])
            impls, arg = make(case, inp)
            out.append((f"train_{case.name}_{size}", n, impls, arg))
    if backend == "torch":
        inp = inputs("tokens", "1e3")
        out.append(("fwdgrad_L2cc_1e3", 1000, *_torch_forward(L2CC, inp)))
        inp = inputs("tokens", "tinker", scale)
        n = sum(int(a.size) for a in inp["x"])
        compiled = _torch_compiled(CASES[-1], inp) if compile else None
        if compiled is not None:
            out.append(("compiled_Pipeline_tinker", n, *compiled))
        out.append(("verl_SampledKL_tinker", n, *_torch_verl(inp)))
    return out


def _numpy_impls(case: Case, inp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    ours = case.ours()
    xs = inp["x"]
    single = len(xs) == 1
    data = _data(case, inp, single)
    others = None if inp["other"] is None or case.other is None else inp["other"]
    splits = np.cumsum([x.shape[0] for x in xs])[:-1]

    def run_ours(arg: Any) -> Any:
        return ours.value_and_grad(data, arg[0] if single else arg)

    def run_native(arg: Any) -> Any:
        # the per-datum fields are concatenated on each step, as the per-datum logprobs are
        # (a hand-written loss over Tinker's datums builds them from the data every call)
        x = arg[0] if single else np.concatenate(arg)
        y = None if others is None else others[0] if single else np.concatenate(others)
        m = None
        if case.masked:
            m = inp["weights"][0] if single else np.concatenate(inp["weights"])
        value, metrics, g = case.numpy(x, y, m)
        return value, metrics, g if single else np.split(g, splits)

    return {"ours": run_ours, "native": run_native}, xs


def _torch_ops() -> Ops:
    import torch

    return Ops(
        cat=torch.cat,
        clip=torch.clamp,
        exp=torch.exp,
        log_softmax=lambda z: torch.log_softmax(z, -1),
        logsumexp=lambda z: torch.logsumexp(z, -1),
        logaddexp=torch.logaddexp,
        norm=lambda x: torch.linalg.vector_norm(x, dim=-1, keepdim=True),
        stop=lambda x: x.detach(),
        amax=torch.amax,
        amin=torch.amin,
        maximum=torch.maximum,
        rowsum=lambda x: x.sum(-1),
        numel=lambda x: x.numel(),
        transpose=lambda x: x.transpose(-1, -2),
    )


def _torch_impls(case: Case, inp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    import torch

    o = _torch_ops()
    ours = case.ours()
    call = ours if isinstance(ours, rg.Pipeline) else ours.compute
    tensors = [torch.from_numpy(x) for x in inp["x"]]
    single = len(tensors) == 1
    t_inp = {
        k: None if v is None else [torch.from_numpy(a) for a in v]
        for k, v in inp.items()
        if k != "x"
    }
    data = _data(case, t_inp, single)

    def run_ours(arg: Any) -> Any:
        leaves = [a.detach().requires_grad_(True) for a in arg]
        value, metrics = call(data, leaves[0] if single else leaves)
        value.backward()
        return value, metrics, [leaf.grad for leaf in leaves]

    def run_native(arg: Any) -> Any:
        # the per-datum fields are concatenated on each step, as the per-datum logprobs are
        # (a hand-written loss over Tinker's datums builds them from the data every call)
        y = None if case.other is None else torch.cat(t_inp["other"])
        m = torch.cat(t_inp["weights"]) if case.masked else None
        leaves = [a.detach().requires_grad_(True) for a in arg]
        x = leaves[0] if single else torch.cat(leaves)
        value, metrics = case.native(o, x, y, m)
        value.backward()
        return value, {k: v.detach() for k, v in metrics.items()}, [leaf.grad for leaf in leaves]

    return {"ours": run_ours, "native": run_native}, tensors


def _torch_forward(case: Case, inp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Forward only, on a leaf that requires grad: the per-call overhead of the graph."""
    import torch

    o = _torch_ops()
    reg = case.ours()
    leaf = torch.from_numpy(inp["x"][0]).requires_grad_(True)
    return {
        "ours": lambda x: reg(x),
        "native": lambda x: case.native(o, x, None, None),
    }, leaf


def _torch_compiled(case: Case, inp: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
    """The Pipeline under ``torch.compile(fullgraph=True)`` against eager, loss + backward."""
    import torch

    pipe = case.ours()
    data = {"weights": [torch.from_numpy(w) for w in inp["weights"]]}
    tensors = [torch.from_numpy(x) for x in inp["x"]]

    def step(fn: Any) -> Callable[[Any], Any]:
        def run(arg: Any) -> Any:
            leaves = [a.detach().requires_grad_(True) for a in arg]
            value, metrics = fn(data, leaves)
            value.backward()
            return value, metrics, [leaf.grad for leaf in leaves]

        return run

    try:
        compiled = torch.compile(pipe, fullgraph=True)
        step(compiled)(tensors)  # compile now (not timed)
    except Exception as exc:  # no C++ compiler, or a graph break: said, and left out
        print(f"# torch.compile case skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return {"eager": step(pipe), "ours": step(compiled)}, tensors


def _torch_verl(inp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """SampledKL k3, masked token-mean, loss + backward, against verl's idiom, both on verl's
    own layout: padded ``[B, T]`` logprobs, reference logprobs and response mask."""
    import torch

    reg = rg.SampledKL(OTHER, reduce="mean", mask=MASK)
    width = max(int(a.shape[0]) for a in inp["x"])

    def padded(arrays: list[np.ndarray]) -> Any:
        out = np.zeros((len(arrays), width), dtype=arrays[0].dtype)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        return torch.from_numpy(out)

    ref, mask = padded(inp["other"]), padded(inp["weights"])
    data = {"other": ref, "weights": mask}

    def ours(arg: Any) -> Any:
        leaf = arg.detach().requires_grad_(True)
        value, metrics = reg.compute(data, leaf)
        value.backward()
        return value, metrics, [leaf.grad]

    def verl(arg: Any) -> Any:
        logprob = arg.detach().requires_grad_(True)
        kl = ref - logprob
        ratio = torch.exp(kl)
        kld = ratio - kl - 1
        loss = (kld * mask).sum() / mask.sum()
        loss.backward()
        return loss, [logprob.grad]

    return {"ours": ours, "verl": verl}, padded(inp["x"])


def _jax_impls(case: Case, inp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    import jax
    import jax.numpy as jnp

    o = Ops(
        cat=jnp.concatenate,
        clip=jnp.clip,
        exp=jnp.exp,
        log_softmax=lambda z: jax.nn.log_softmax(z, axis=-1),
        logsumexp=lambda z: jax.nn.logsumexp(z, axis=-1),
        logaddexp=jnp.logaddexp,
        norm=lambda x: jnp.linalg.norm(x, axis=-1, keepdims=True),
        stop=jax.lax.stop_gradient,
        amax=jnp.max,
        amin=jnp.min,
        maximum=jnp.maximum,
        rowsum=lambda x: x.sum(-1),
        numel=jnp.size,
        transpose=lambda x: jnp.swapaxes(x, -1, -2),
    )
    ours = case.ours()
    call = ours if isinstance(ours, rg.Pipeline) else ours.compute
    arrays = [jax.device_put(x) for x in inp["x"]]
    single = len(arrays) == 1
    j_inp = {
        k: None if v is None else [jax.device_put(a) for a in v] for k, v in inp.items() if k != "x"
    }

    def loss_ours(lp: Any, j: Any) -> Any:
        out = call(_data(case, j, single), lp[0] if single else lp)
        return out[0], out[1]

    def loss_native(lp: Any, j: Any) -> Any:
        x = lp[0] if single else jnp.concatenate(lp)
        y = None if case.other is None else jnp.concatenate(j["other"])
        m = jnp.concatenate(j["weights"]) if case.masked else None
        return case.native(o, x, y, m)

    vg_ours = jax.jit(jax.value_and_grad(loss_ours, has_aux=True))
    vg_native = jax.jit(jax.value_and_grad(loss_native, has_aux=True))
    return {"ours": lambda a: vg_ours(a, j_inp), "native": lambda a: vg_native(a, j_inp)}, arrays


# ---- both sides compute the same numbers (so that the timing compares like with like) ----------
def value_and_grads(backend: str, key: str, out: Any) -> tuple[float, list[np.ndarray]]:
    """The loss and the gradients (as NumPy) from one implementation's output."""
    if backend == "jax":
        (value, _), grads = out
    else:
        value, grads = out[0], out[-1]
    if hasattr(value, "detach"):  # a torch loss that requires grad
        value = value.detach()
    if key.startswith("fwdgrad_"):
        return float(value), []
    grads = [grads] if not isinstance(grads, (list, tuple)) else grads
    return float(value), [np.asarray(g, dtype=np.float64) for g in grads]


def check(backend: str, entries: list[Entry]) -> list[str]:
    """Where ours and the reference disagree on the loss or the gradients (empty: agreed)."""
    problems = []
    for key, _, impls, arg in entries:
        (a, fa), (b, fb) = impls.items()
        va, ga = value_and_grads(backend, key, fa(arg))
        vb, gb = value_and_grads(backend, key, fb(arg))
        if not math.isclose(va, vb, rel_tol=2e-4, abs_tol=1e-5):
            problems.append(f"{backend} {key}: loss {a} {va!r} != {b} {vb!r}")
        for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
            tol = 2e-4 * max(1.0, float(np.abs(y).max(initial=0.0)))
            if x.shape != y.shape or not np.allclose(x, y, rtol=2e-3, atol=tol):
                problems.append(f"{backend} {key}: gradient {i} differs ({a} vs {b})")
                break
    return problems
