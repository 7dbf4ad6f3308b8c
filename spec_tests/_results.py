"""Figures the reliability tests measure, printed at the end of the run (see conftest).

Tests put what they measured here; ``pytest_terminal_summary`` prints it and writes it to
``build/reliability.json`` so ``docs/reliability.md`` can quote the last run.
"""

from __future__ import annotations

from typing import Any

RESULTS: dict[str, Any] = {}
