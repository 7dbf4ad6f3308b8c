"""The package's type aliases, defined once.

Arrays are whatever ``array_api_compat`` resolves (NumPy, torch, JAX, Dask, array-api-strict,
...), so they are typed ``Any``: the array API standard has no runtime protocol every library
implements.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Array", "Metrics", "Namespace"]

Array: TypeAlias = Any
"""An array of any library that ``array_api_compat`` knows."""

Namespace: TypeAlias = Any
"""An array API namespace (``array_api_compat.array_namespace(x)``)."""

Metrics: TypeAlias = "dict[str, Any]"
"""Metric name -> 0-d array (or a Python float where documented)."""
