"""0-d torch constants of a dtype and device, made once (the training path's arithmetic).

An operator given a Python number wraps it into a double tensor and converts it on every
call: on this machine's CPU ``raw / 1000`` takes 2.6 us and ``raw / c`` 1.2 us, so each
constant of a small call's arithmetic costs ~1.4 us more as a number. The result is the
same: the number is rounded to the tensor's dtype either way. Shared by the fused kernels
(``torch_fused``) and the class-axis ones (``torch_distributions``), which ``torch_fused``
imports.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import Bounded

__all__ = ["const"]

_CONSTANTS = Bounded(64)  # per (value, dtype, device)


def const(value: float, like: Any) -> Any:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, made once and never
    written (callers use it as an operand only)."""
    key = (value, like.dtype, like.device)
    c = _CONSTANTS.get(key)
    if c is None:
        c = _CONSTANTS.put(key, torch.full((), value, dtype=like.dtype, device=like.device))
    return c
