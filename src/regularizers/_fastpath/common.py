"""What the native fast paths share: the switch that turns them off, Chan's merge of block
statistics, the reduce rule and the bounded memo of small constants.

Written once over plain arithmetic, so that it serves Python floats (NumPy path) and 0-d
tensors (torch path) alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["ENABLED", "Bounded", "chan_merge", "disabled", "huber_form_fits", "reduced"]

ENABLED: ContextVar[bool] = ContextVar("regularizers_fastpath", default=True)


class Bounded(dict[Any, Any]):
    """A memo of small values made once per key (a constant per dtype and device, a weight
    per count), read with ``get`` (a dict's own, on every call) and written with
    :meth:`put` (on a miss), which empties it first when it holds ``keep`` entries: the
    keys come from callers' data (counts, options), so it must not grow without bound. A
    dict's get and set are atomic under the GIL, and an entry cleared is made again."""

    __slots__ = ("keep",)

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def put(self, key: Any, value: Any) -> Any:
        """``value``, remembered under ``key``."""
        if len(self) >= self.keep:
            self.clear()
        self[key] = value
        return value


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Fast paths off in the current context (thread- and task-local)."""
    token = ENABLED.set(False)
    try:
        yield
    finally:
        ENABLED.reset(token)


def chan_merge(
    count: int, mean: Any, m2: Any, k: int, bmean: Any, bm2: Any
) -> tuple[int, Any, Any]:
    """Chan et al.'s parallel update: ``(count, mean, M2)`` of the data so far merged with a
    block of ``k`` elements whose mean is ``bmean`` and sum of squared deviations ``bm2``."""
    total = count + k
    delta = bmean - mean
    mean = mean + delta * (k / total)
    m2 = m2 + bm2 + delta * delta * (count * k / total)
    return total, mean, m2


def reduced(reg: Any, raw: Any, mean: Any) -> Any:
    """The value under the fast paths' two modes: ``raw`` for "sum", ``mean`` for "mean"."""
    return raw if reg._opts["reduce"] == "sum" else mean


def huber_form_fits(delta: float, top: float) -> bool:
    """Whether a fast kernel may write Huber's ``½u²`` (``|u| <= δ``) as ``q·(|u| - q/2)``
    with ``q = min(|u|, δ)``: where ``δ² <= top`` (the dtype's largest float), no ``u``
    inside δ has ``u·u`` overflow. Beyond that, ``|u|·(|u|/2)`` stays finite for
    ``top < u² <= 2·top`` where the generic path's ``0.5·(u·u)`` is inf, so the kernel
    declines and the generic closed form runs."""
    return delta * delta <= top
