"""The benchmarks stay runnable and honest (``benchmarks/training.py``).

- Every public built-in has a training-path case or a stated reason to skip it, so a new
  built-in is not left out of ``nox -s bench``.
- On NumPy and torch, every training-path case runs once at tiny sizes, and ours and the
  hand-written reference agree on the loss and the gradients: a timing compares like with
  like, and a broken benchmark fails here, not in the middle of a 10-minute run. (JAX and
  ``torch.compile`` cost their compile time: ``python benchmarks/run.py --smoke`` runs
  every case of every backend once, in about a minute.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def training() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import training
    finally:
        sys.path.remove(str(BENCHMARKS))
    return training


def test_every_builtin_has_a_training_case(training: Any) -> None:
    assert training.builtins(), "no built-ins found in rg.__all__"
    assert training.missing() == [], "add a Case to benchmarks/training.py (or a SKIPPED reason)"


@pytest.mark.backends("numpy", "torch")
def test_training_cases_run_and_agree(bk: Any, training: Any) -> None:
    entries = training.cases(bk.backend.library, scale=0.05, compile=False)
    names = {key.split("_")[1] for key, *_ in entries if key.startswith("train_")}
    assert names == {c.name for c in training.CASES}
    assert training.check(bk.backend.library, entries) == []
