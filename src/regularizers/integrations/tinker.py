"""Tinker integration: a Pipeline as a custom loss, both ways the SDK takes one.

1. ``TrainingClient.forward_backward_custom(data, pipe)``: a :class:`~regularizers.Pipeline`
   with ``metrics="float"`` (the default) *is* a loss function for it. The SDK calls
   ``pipe(data, logprobs_list)`` with one torch tensor per datum, backpropagates the loss
   and sends ``-grad`` to the server as weights. Nothing in this module is needed for that.

2. ``ServiceClient.create_custom_loss(fn, input_ranks)``: the SDK traces ``fn`` with
   ``torch.fx`` and accepts only torch and math, run once per datum, the per-datum losses
   summed. :func:`custom_loss` builds such a ``fn`` from a Pipeline of the built-in
   regularizers, written in plain torch with the same conventions as the generic code.

Neither tinker nor torch is imported by ``import regularizers``; torch is imported here
only when :func:`custom_loss` runs.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable
from typing import Any

from .._core.base import Regularizer
from .._core.options import Field
from ..penalties.l1 import L1
from ..penalties.l2 import L2
from ..penalties.sampled_entropy import SampledEntropy
from ..penalties.sampled_kl import SampledKL
from ..pipeline import Pipeline

__all__ = ["custom_loss"]

_METRIC_NAME = re.compile(r"[a-z0-9_./-]{1,64}")


SUPPORTED = (L1, L2, SampledKL, SampledEntropy)
_FIELDS = ("target", "mask", "reference", "behavior")  # options that may read a datum's input


def _inputs_of(reg: Regularizer) -> list[str]:
    fields = [getattr(reg, name, None) for name in _FIELDS]
    return [f.key for f in fields if isinstance(f, Field)]


def _per_datum(reg: Regularizer) -> Callable[[Any, dict[str, Any]], Any]:
    """``(logprobs, inputs) -> value`` for one datum, in torch ops only (fx-traceable)."""
    import torch

    if type(reg) not in SUPPORTED:
        raise TypeError(
            "custom_loss supports the built-in "
            + ", ".join(c.__name__ for c in SUPPORTED)
            + f" only (the SDK traces plain torch), got {type(reg).__name__}"
        )
    for name in ("mask", "reference", "behavior"):
        given = getattr(reg, name, None)
        if given is not None and not isinstance(given, Field):
            raise TypeError(
                f"custom_loss needs {name} given as Field(key) (a loss_fn_inputs key), not "
                "arrays: a traced loss reads only logprobs and the inputs it names"
            )
    body = {L1: _l1, L2: _l2, SampledKL: _sampled_kl, SampledEntropy: _sampled_entropy}[type(reg)]

    def value(lp: Any, inputs: dict[str, Any]) -> Any:
        target = reg.target
        t = inputs[target.key] if isinstance(target, Field) else lp
        mask = reg.mask
        if isinstance(mask, Field):
            keep = inputs[mask.key] != 0
            count = torch.clamp(keep.sum(), min=1)
        else:
            keep = None
            count = torch.clamp(torch.ones_like(t).sum(), min=1)

        def counted(a: Any) -> Any:  # uncounted tokens hold 0, as in Batch
            return a if keep is None else torch.where(keep, a, torch.zeros_like(a))

        def total(a: Any) -> Any:
            return counted(a).sum()

        def read(field: Any) -> Any:
            return counted(inputs[field.key])

        t = counted(t)
        if target == "probs":
            t = counted(torch.exp(t))
        raw = body(reg, t, read, total, count)
        return raw if reg.reduce == "sum" else raw / count

    return value


def _l1(reg: Any, t: Any, read: Any, total: Any, count: Any) -> Any:
    import torch

    return total(t * torch.sign(t))  # d|x| = sign(x), 0 at 0, as in ops.abs_


def _l2(reg: Any, t: Any, read: Any, total: Any, count: Any) -> Any:
    c = _clip(t, reg.clip)
    if reg.center == "mean":
        c = c - total(c) / count
    elif reg.center is not None:
        c = c - reg.center
    return total(c * c)


def _clip(t: Any, bounds: Any) -> Any:
    """where-clipping: gradient 1 on [lo, hi] (bounds included), 0 strictly outside."""
    import torch

    lo, hi = bounds if bounds is not None else (None, None)
    if hi is not None:
        t = torch.where(t > hi, torch.full_like(t, hi), t)
    if lo is not None:
        t = torch.where(t < lo, torch.full_like(t, lo), t)
    return t


def _ratio(t: Any, read: Any, behavior: Any, through_lp: bool) -> Any:
    """rho = exp(lp - b) (b = behavior), exp(lp - detach(lp)) (value 1), or None (1)."""
    import torch

    if behavior is not None:
        return torch.exp(t - read(behavior))
    if through_lp:
        return torch.exp(t - t.detach())
    return None


def _sampled_kl(reg: Any, t: Any, read: Any, total: Any, count: Any) -> Any:
    import torch

    d = _clip(t - read(reg.reference), reg.log_ratio_clip)
    k = {
        "k1": lambda: d,
        "abs": lambda: d * torch.sign(d),
        "k2": lambda: 0.5 * (d * d),
        "k3": lambda: torch.expm1(-d) + d,
    }[reg.estimator]()
    rho = _ratio(t, read, reg.behavior, reg.gradient == "unbiased")
    return total(k if rho is None else rho * k)


def _sampled_entropy(reg: Any, t: Any, read: Any, total: Any, count: Any) -> Any:
    rho_lp = _ratio(t, read, reg.behavior, True) * t
    return total(rho_lp if reg.mode == "maximize" else -rho_lp)


def custom_loss(
    pipe: Pipeline, *, logprobs_rank: int = 1
) -> tuple[Callable[..., Any], dict[str, int]]:
    """``(fn, input_ranks)`` for Tinker's ``ServiceClient.create_custom_loss``.

    ``fn(logprobs, <each loss_fn_inputs key the pipeline reads>)`` returns
    ``(loss, metrics)`` for one datum: ``loss = Σ weight · term`` and, per term, its
    unweighted value as ``custom/<name>:sum`` (``reduce="sum"``) or ``custom/<name>:mean``.
    Tinker sums the per-datum losses, so for sum reductions without ``center="mean"`` the
    result equals ``pipe`` on the whole batch; ``reduce="mean"`` and ``center="mean"`` become
    per-datum means.

    Parameters
    ----------
    pipe : Pipeline
        Terms must be built-in ``L1``, ``L2``, ``SampledKL`` or ``SampledEntropy`` (masks,
        targets, references and behaviour logprobs as ``Field``); no base_loss.
    logprobs_rank : {1, 2}
        The rank of each datum's logprobs (and of the inputs read): 1 for ``[T]``.
    """
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"custom_loss needs a Pipeline, got {type(pipe).__name__}")
    if pipe.base_loss is not None:
        raise ValueError(
            "custom_loss cannot trace a base_loss; add it as a term or compute it "
            "with forward_backward_custom"
        )
    if logprobs_rank not in (1, 2) or isinstance(logprobs_rank, bool):
        raise ValueError(f"logprobs_rank must be 1 ([T]) or 2 ([T, K]), got {logprobs_rank!r}")
    terms = []
    keys: list[str] = []
    for t in pipe.terms:
        if not _METRIC_NAME.fullmatch(t.name):
            raise ValueError(
                f"term name {t.name!r} cannot name a Tinker metric (custom/<name>:sum needs "
                "lowercase letters, digits and _./-); pass name="
            )
        if not isinstance(t.regularizer, Regularizer):
            raise TypeError(
                f"term {t.name!r} is a {type(t.regularizer).__name__}; custom_loss "
                "supports the built-in " + ", ".join(c.__name__ for c in SUPPORTED) + " only"
            )
        terms.append((t.name, t.weight, t.regularizer.reduce, _per_datum(t.regularizer)))
        for key in _inputs_of(t.regularizer):
            if key == "logprobs" or not key.isidentifier() or keyword.iskeyword(key):
                raise ValueError(
                    f"term {t.name!r} reads the field {key!r}, which cannot be a "
                    "parameter name of a Tinker custom loss"
                )
            if key not in keys:
                keys.append(key)

    def loss(logprobs: Any, *inputs: Any) -> tuple[Any, dict[str, Any]]:
        named = dict(zip(keys, inputs, strict=True))
        total: Any = None
        metrics: dict[str, Any] = {}
        for name, weight, reduce, value in terms:
            v = value(logprobs, named)
            metrics[f"custom/{name}:{reduce}"] = v
            total = weight * v if total is None else total + weight * v
        return total, metrics

    # torch.fx and the SDK read the parameter names: build a function with real ones.
    params = ", ".join(["logprobs", *keys])
    scope: dict[str, Any] = {"_loss": loss}
    exec(f"def regularizers_pipeline({params}):\n    return _loss({params})\n", scope)
    fn = scope["regularizers_pipeline"]
    fn.__doc__ = f"Tinker custom loss for {pipe!r}."
    return fn, dict.fromkeys(["logprobs", *keys], logprobs_rank)
