"""tofa_fast: weight-sharing supernet training on your own small data set (TOFA), fast.

Public API (SPEC §11)::

    tofa_fast.spaces.names() / get(name)
    tofa_fast.Supernet(space, num_classes)
    tofa_fast.recalibrate_bn(model, batches)
    tofa_fast.Estimator(space, num_classes)     # .flops / params / latency / sample
    tofa_fast.ops.elastic_dwconv2d(x, weight, kernel_size, stride=1, transforms=None)
    tofa_fast.accelerate(ofa_model)             # ofa's own supernet code on the fast op, in place
"""

__version__ = "0.1.0"

from . import _extension, nn, ops, spaces, transfer  # noqa: E402  (_extension registers the compiled ops)
from .accelerate import accelerate  # noqa: E402
from .estimator import Estimator  # noqa: E402
from .nn import Supernet, recalibrate_bn  # noqa: E402

__all__ = [
    "Estimator",
    "Supernet",
    "__version__",
    "_extension",
    "accelerate",
    "nn",
    "ops",
    "recalibrate_bn",
    "spaces",
    "transfer",
]
