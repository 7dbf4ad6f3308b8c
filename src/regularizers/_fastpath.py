"""The one place that hands ``compute`` to a backend's native fast path.

A fast path exists for the exact built-in classes (not subclasses, which may change the
maths), for value and metrics only (``compute``), with no mask and a ``"logprobs"`` or
``"probs"`` target, when the arrays are plain
NumPy arrays or torch tensors that need no gradient. Everything else, errors included, takes
the generic array API path. The spec suite (``test_fastpaths.py``) proves each fast path
equal to the generic path on Hypothesis-drawn inputs, kinks and non-finite values included.

``disabled()`` turns fast paths off in the current context (thread- and task-local), which is
how the tests and benchmarks reach the generic path.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["KINDS", "disabled", "try_compute"]

ENABLED: ContextVar[bool] = ContextVar("regularizers_fastpath", default=True)
KINDS: dict[type, str] = {}  # exact class -> "l1" / "l2", filled by l1.py and l2.py


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    token = ENABLED.set(False)
    try:
        yield
    finally:
        ENABLED.reset(token)


def _torch_compiling() -> bool:
    torch = sys.modules.get("torch")  # no import: a torch-free program never pays for it
    return torch is not None and bool(torch.compiler.is_compiling())


def try_compute(reg: Any, logprobs: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(value, metrics)`` by a native path, or None where none applies."""
    if _torch_compiling():  # before anything Dynamo cannot trace (ContextVar.get)
        return None
    kind = KINDS.get(type(reg))
    if kind is None or reg.mask is not None or not ENABLED.get():
        return None
    if reg.target != "logprobs" and reg.target != "probs":  # a Field reads data: generic
        return None
    first = logprobs[0] if type(logprobs) in (list, tuple) and logprobs else logprobs
    native = _NATIVE.get(type(first).__module__)
    if native is None:
        native = _load(type(first).__module__)
        if native is None:
            return None
    return native.compute(kind, reg, logprobs)  # type: ignore[no-any-return]


_NATIVE: dict[str, Any] = {}


def _load(module: str) -> Any:
    """The native module for arrays of ``module`` (imported once), or None."""
    if module == "numpy":
        from . import _native_numpy as native
    elif module == "torch":
        from . import _native_torch as native  # type: ignore[no-redef]
    else:
        return None
    _NATIVE[module] = native
    return native
