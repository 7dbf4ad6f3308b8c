"""What the distributed tests share: the regularizers, every ``reduce`` mode, and the batches.

Imported by the pytest modules and by the scripts they start in other processes
(``_jax_sharded.py``, ``_torch_ddp.py``), so it needs NumPy and ``regularizers`` only.

Batches come in the two shapes of SPEC 7.1: a ragged **list** of per-datum arrays (one empty,
one wholly masked) and **rows** of a ``[B, T]`` array with a padding mask (one row wholly
masked). The mask is a field of ``data`` (``Field("mask")``, the way Tinker datums carry
``weights``), so a Pipeline's terms read it too. A batch is split by sequences: datums of a
list, rows of an array.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

import regularizers as rg

MODES = ("sum", "mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MAX_TOKENS = 16.0
MASK = rg.Field("mask")

# Options per exported regularizer class. center="mean" is a statistic of the call's own part
# (SPEC 7.2), so it is used only where a batch is not split (Dask, jit over sharded arrays).
OPTIONS: dict[type, list[dict[str, Any]]] = {
    rg.L1: [{}, {"target": "probs"}],
    rg.L2: [{"center": -1.0, "clip": (-4.0, 0.0)}, {}],
}
UNSPLIT_OPTIONS: dict[type, list[dict[str, Any]]] = {
    rg.L2: [{"center": "mean", "clip": (-4.0, 0.0)}],
}
LENGTHS = (7, 0, 11, 4, 9, 1, 6, 3)  # ragged datums: one empty
ROWS, COLS = 16, 12


def exported_classes() -> set[type]:
    """Every regularizer class the package exports (what "every regularizer" means)."""
    out = set()
    for name in rg.__all__:
        obj = getattr(rg, name)
        if isinstance(obj, type) and issubclass(obj, rg.Regularizer) and obj is not rg.Regularizer:
            out.add(obj)
    return out


def regularizers(mode: str, *, split: bool = True, mask: Any = MASK) -> Iterator[rg.Regularizer]:
    """One instance per option set of every exported class, aggregating with ``mode``."""
    max_tokens = MAX_TOKENS if mode == "seq-mean-token-sum-norm" else None
    for cls, variants in OPTIONS.items():
        extra = [] if split else UNSPLIT_OPTIONS.get(cls, [])
        for kw in [*variants, *extra]:
            yield cls(reduce=mode, max_tokens=max_tokens, mask=mask, **kw)


def pipeline(mode: str | None = None, *, split: bool = True, metrics: str = "array") -> rg.Pipeline:
    """Every regularizer of :func:`regularizers` (for ``mode``, or for every mode when None)
    as a weighted term, with grad norms."""
    regs = [r for m in (MODES if mode is None else (mode,)) for r in regularizers(m, split=split)]
    weights = itertools.cycle((0.5, -0.25, 2.0, 1.5, 0.75))
    terms = [
        rg.Term(reg, weight, name=f"{reg.name}_{i}")
        for i, (reg, weight) in enumerate(zip(regs, weights, strict=False))
    ]
    return rg.Pipeline(terms, track_grad_norms=True, metrics=metrics)  # type: ignore[arg-type]


def _logprobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = -rng.gamma(0.8, 1.5, size=shape)
    x[rng.random(shape) < 0.1] = 0.0  # the kink of |x|
    x[rng.random(shape) < 0.05] = -6.0  # outside L2's clip
    return x


def ragged(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-datum logprobs and masks (float64); datum 3 is wholly masked."""
    rng = np.random.default_rng(seed)
    xs = [_logprobs(rng, (n,)) for n in LENGTHS]
    masks = [(rng.random(n) < 0.75).astype(np.float64) for n in LENGTHS]
    masks[3][:] = 0.0
    return xs, masks


def rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``[ROWS, COLS]`` float64 array and its padding mask; row 5 is wholly padding."""
    rng = np.random.default_rng(seed + 1000)
    x = _logprobs(rng, (ROWS, COLS))
    lengths = rng.integers(1, COLS + 1, size=ROWS)
    lengths[5] = 0
    mask = (np.arange(COLS)[None, :] < lengths[:, None]).astype(np.float64)
    return x, mask


def field_readers() -> dict[str, rg.Regularizer | rg.Pipeline]:
    """Regularizers that read other arrays of ``data`` (the ``mask``, ``ref``, ``paired`` and
    ``scores`` fields of :func:`field_data`): the checks that fields on another device than
    the logprobs are brought to theirs. ``KL(scores)`` takes ``scores`` as its logprobs."""
    return {
        "L1(mask)": rg.L1(mask=MASK),
        "SampledKL(ref, mask)": rg.SampledKL(rg.Field("ref"), mask=MASK, reduce="mean"),
        "Consistency(paired)": rg.Consistency(rg.Field("paired")),
        "L2(target=Field)": rg.L2(target=rg.Field("ref"), reduce="seq-mean-token-mean"),
        "KL(scores)": rg.KL(rg.Field("scores"), mask=MASK),
        "Pipeline": rg.Pipeline(
            [(rg.L1(mask=MASK), 0.5), (rg.L2(clip=(-4.0, 0.0)), 2.0)], metrics="array"
        ),
    }


def field_data(xs: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The fields :func:`field_readers` read, per datum of ``xs``: ``mask``, reference
    logprobs (``ref``, also as ``paired``) and ``[n, 5]`` ``scores``."""
    rng = np.random.default_rng(7)
    refs = [-rng.gamma(0.8, 1.5, size=a.shape) for a in xs]
    scores = [rng.normal(size=(a.shape[0], 5)) for a in xs]
    return {"mask": masks, "ref": refs, "paired": refs, "scores": scores}


def split(seq: Any, parts: int) -> list[Any]:
    """``seq`` (a list of datums or the rows of an array) in ``parts`` contiguous pieces."""
    bounds = np.linspace(0, len(seq), parts + 1).round().astype(int)
    return [seq[a:b] for a, b in itertools.pairwise(bounds)]


def flat(arrays: Any) -> np.ndarray:
    """One float64 vector of an array or a list of arrays (NumPy-convertible)."""
    arrays = arrays if isinstance(arrays, (list, tuple)) else [arrays]
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def close(got: Any, want: Any, what: str, *, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """``np.testing.assert_allclose`` with ``what`` in the message."""
    np.testing.assert_allclose(
        np.asarray(got, dtype=np.float64),
        np.asarray(want, dtype=np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=what,
    )


def combine(metric: str) -> str | None:
    """How the parts' values of a metric make the whole's, over a batch split by sequences and
    computed with the whole batch's counts (SPEC 7.2): ``"sum"`` (values, ``*_raw``,
    ``*_mean``), ``"max"`` (``*_max``), ``"norm"`` (a Pipeline's grad norms: each part's
    gradient is the whole's on that part's elements, so the whole's norm is the root of the
    sum of squares), or None (weights, which are not per part)."""
    if metric.endswith(("_raw", "_mean", "/value", "/contribution")) or metric in (
        "loss_total",
        "regularizer_total",
    ):
        return "sum"
    if metric.endswith("_max"):
        return "max"
    if metric.endswith(("grad_norm", "grad_norm_weighted")):
        return "norm"
    return None
