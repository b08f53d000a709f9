"""tofa_fast: weight-sharing supernet training on your own small data set (TOFA), fast.

Public API (SPEC §11)::

    tofa_fast.spaces.names() / get(name)
    tofa_fast.Supernet(space, num_classes)
    tofa_fast.recalibrate_bn(model, batches)
    tofa_fast.Estimator(space, num_classes)     # .flops / params / latency / sample
    tofa_fast.ops.elastic_dwconv2d(x, weight, kernel_size, stride=1, transforms=None)
    tofa_fast.accelerate(ofa_model)             # ofa's own supernet code on the fast op, in place
    tofa_fast.retain_freed_host_memory()        # CPU training: keep freed memory, spare page faults
"""

__version__ = "0.1.0"

# Imported on first use (tofa_fast/_lazy.py says why): nothing here imports torch.
from ._lazy import lazy_attributes  # noqa: E402

_EXPORTS = {
    "Estimator": "estimator",
    "Supernet": "nn",
    "recalibrate_bn": "nn",
    "accelerate": "accelerate_ofa",
    "retain_freed_host_memory": "host_memory",
    # submodules
    "_extension": "_extension",
    "backends": "backends",
    "estimator": "estimator",
    "nn": "nn",
    "ops": "ops",
    "search": "search",
    "spaces": "spaces",
    "train": "train",
    "transfer": "transfer",
}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = ["__version__", *_EXPORTS]
