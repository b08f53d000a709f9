"""Efficiency estimation (SPEC §6): exact FLOPs and parameters, table-predicted latency, and uniform
sampling of subnets inside a FLOPs band, for whole batches of archs at once.

``Estimator`` is the entry point; ``tofa-fast profile`` (:mod:`.profile`) builds and validates the
latency tables it reads.
"""

from .estimator import Estimator, cpp_estimator_available
from .layers import HeadConfig, MBConvConfig, StemConfig, arch_layers
from .layout import TableLayout

__all__ = [
    "Estimator",
    "HeadConfig",
    "MBConvConfig",
    "StemConfig",
    "TableLayout",
    "arch_layers",
    "cpp_estimator_available",
]
