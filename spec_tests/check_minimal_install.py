"""Run in a virtualenv holding only regularizers, array-api-compat and numpy (nox tests-numpy).

``import regularizers`` must import no backend, and an L2 on a NumPy array must work.
"""

import importlib.util
import sys

for absent in ("torch", "jax", "dask", "array_api_strict", "hypothesis"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed: not a minimal env"

import regularizers as rg  # noqa: E402

imported = [m for m in ("numpy", "torch", "jax", "dask") if m in sys.modules]
assert not imported, f"import regularizers imported {imported}"

import numpy as np  # noqa: E402

value, metrics = rg.L2(clip=(-100.0, 0.0))(np.array([-1.0, -2.0, -np.inf]))
assert isinstance(value, np.ndarray), type(value)
assert value.shape == (), value.shape
assert float(value) == 10005.0, value
assert rg.to_floats(metrics) == {"l2_raw": 10005.0, "l2_mean": 3335.0, "l2_max": 10000.0}
print("minimal install: import regularizers imports no backend; L2 on numpy =", float(value))
