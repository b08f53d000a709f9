"""Custom operators of tofa_fast, each with its pure-PyTorch reference beside it.

``elastic_dwconv_dispatch`` holds the per-device backend table of ``elastic_dwconv2d``.
"""

from .elastic_dwconv import (
    active_filter_backward_reference,
    active_filter_reference,
    elastic_dwconv2d,
    elastic_dwconv2d_reference,
)

__all__ = [
    "active_filter_backward_reference",
    "active_filter_reference",
    "elastic_dwconv2d",
    "elastic_dwconv2d_reference",
]
