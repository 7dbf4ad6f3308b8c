"""Penalties over model outputs (logprobs first), written once against the array API.

Pass your own arrays (NumPy, PyTorch, JAX, Dask, array-api-strict, anything
``array-api-compat`` knows) and get your own kind of array back: same device, gradients
intact, no copies to the host.

>>> import array_api_strict as xp
>>> import regularizers as rg
>>> value, metrics = rg.L2(clip=(-100.0, 0.0))(xp.asarray([-1.0, -2.0]))
>>> float(value)
5.0
"""

from ._base import Regularizer, to_floats
from ._config import from_config, register, to_config
from ._options import Field
from .l1 import L1
from .l2 import L2
from .pipeline import Pipeline, Term

__all__ = [
    "L1",
    "L2",
    "Field",
    "Pipeline",
    "Regularizer",
    "Term",
    "from_config",
    "register",
    "to_config",
    "to_floats",
]
__version__ = "0.1.0"
