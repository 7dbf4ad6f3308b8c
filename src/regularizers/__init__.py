"""Penalties over model outputs (logprobs first), written once against the array API.

Pass your own arrays (NumPy, PyTorch, JAX, Dask, array-api-strict, anything
``array-api-compat`` knows) and get your own kind of array back: same device, gradients
intact, no copies to the host.

The package's layout:

- ``penalties/``: one short module per penalty;
- ``_core/``: the shared machinery (options, inputs and ``Batch``, aggregation, the
  ``Regularizer`` base class, the registry, gradient conventions, autodiff);
- ``_fastpath/``: backend-specific native code (blocked NumPy, fused torch);
- ``integrations/``: other libraries' APIs (Tinker);
- ``pipeline``, ``config``, ``checks`` and ``testing``: the public tools around them.

>>> import array_api_strict as xp
>>> import regularizers as rg
>>> value, metrics = rg.L2(clip=(-100.0, 0.0))(xp.asarray([-1.0, -2.0]))
>>> float(value)
5.0
"""

from . import checks
from ._core.base import Regularizer, to_floats
from ._core.inputs import Batch
from ._core.options import Field, option
from .config import from_config, register, to_config
from .controllers import AdaptiveKLController
from .penalties.consistency import Consistency
from .penalties.elastic_net import ElasticNet
from .penalties.entropy import Entropy
from .penalties.gradient_penalty import GradientPenalty
from .penalties.huber import Huber
from .penalties.jsd import JSD
from .penalties.kl import KL
from .penalties.l1 import L1
from .penalties.l2 import L2
from .penalties.orthogonality import Orthogonality
from .penalties.sampled_entropy import SampledEntropy
from .penalties.sampled_kl import SampledKL
from .penalties.z_loss import ZLoss
from .pipeline import Pipeline, Term

__all__ = [
    "JSD",
    "KL",
    "L1",
    "L2",
    "AdaptiveKLController",
    "Batch",
    "Consistency",
    "ElasticNet",
    "Entropy",
    "Field",
    "GradientPenalty",
    "Huber",
    "Orthogonality",
    "Pipeline",
    "Regularizer",
    "SampledEntropy",
    "SampledKL",
    "Term",
    "ZLoss",
    "checks",
    "from_config",
    "option",
    "register",
    "to_config",
    "to_floats",
]
__version__ = "0.2.0"
