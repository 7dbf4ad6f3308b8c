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
from ..pipeline import Pipeline

__all__ = ["custom_loss"]

_METRIC_NAME = re.compile(r"[a-z0-9_./-]{1,64}")


def _inputs_of(reg: Regularizer) -> list[str]:
    return [f.key for f in (reg.target, reg.mask) if isinstance(f, Field)]


def _per_datum(reg: Regularizer) -> Callable[[Any, dict[str, Any]], Any]:
    """``(logprobs, inputs) -> value`` for one datum, in torch ops only (fx-traceable)."""
    import torch

    if not isinstance(reg, (L1, L2)) or type(reg) not in (L1, L2):
        raise TypeError(
            f"custom_loss supports the built-in L1 and L2 only (the SDK traces plain torch), "
            f"got {type(reg).__name__}"
        )

    def value(lp: Any, inputs: dict[str, Any]) -> Any:
        target = reg.target
        t = inputs[target.key] if isinstance(target, Field) else lp
        if target == "probs":
            t = torch.exp(t)
        mask = reg.mask
        if isinstance(mask, Field):
            keep = inputs[mask.key] != 0
            count = torch.clamp(keep.sum(), min=1)
            t = torch.where(keep, t, torch.zeros_like(t))
        elif mask is None:
            keep = None
            count = torch.clamp(torch.ones_like(t).sum(), min=1)
        else:
            raise TypeError("custom_loss needs masks given as Field(key), not arrays")

        def total(a: Any) -> Any:
            return (a if keep is None else torch.where(keep, a, torch.zeros_like(a))).sum()

        if isinstance(reg, L1):
            raw = total(t * torch.sign(t))  # d|x| = sign(x), 0 at 0, as in _core.ops.abs_
        else:
            c = t
            lo, hi = reg.clip if reg.clip is not None else (None, None)
            if hi is not None:  # where-clipping: gradient 1 on [lo, hi], 0 strictly outside
                c = torch.where(c > hi, torch.full_like(c, hi), c)
            if lo is not None:
                c = torch.where(c < lo, torch.full_like(c, lo), c)
            if reg.center == "mean":
                c = c - total(c) / count
            elif reg.center is not None:
                c = c - reg.center
            raw = total(c * c)
        return raw if reg.reduce == "sum" else raw / count

    return value


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
        Terms must be built-in ``L1``/``L2`` (masks and targets as ``Field``); no base_loss.
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
                "supports the built-in L1 and L2 only"
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
