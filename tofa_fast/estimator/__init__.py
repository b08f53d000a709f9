"""Efficiency estimation (SPEC §6): exact FLOPs and parameters, table-predicted latency, and uniform
sampling of subnets inside a FLOPs band, for whole batches of archs at once.

``Estimator`` is the entry point; ``tofa-fast profile`` (:mod:`.profile`) builds and validates the
latency tables (:class:`LatencyTable`) it reads. Where things live:

* :mod:`.layers` — the stem / MBConv / head configurations and their exact fvcore FLOPs and params;
* :mod:`.layout` — the flat lookup-table layout and the pure-Python reference of the C++ kernel
  (``csrc/estimator/estimator.cpp``; on CPUs with AVX2 it runs ``estimator_avx2.cpp``, selected at
  run time, ``TOFA_FAST_CPU_ISA=baseline`` keeps the portable loop);
* :mod:`.sampler` — uniform sampling in a FLOPs band by exact counting;
* :mod:`.latency`, :mod:`.profile` — latency tables: format, measurement, validation.
"""

from .estimator import Estimator, cpp_estimator_available
from .latency import LatencyTable
from .layers import HeadConfig, MBConvConfig, StemConfig, arch_layers
from .layout import TableLayout
from .sampler import EmptyBandError

__all__ = [
    "EmptyBandError",
    "Estimator",
    "HeadConfig",
    "LatencyTable",
    "MBConvConfig",
    "StemConfig",
    "TableLayout",
    "arch_layers",
    "cpp_estimator_available",
]
