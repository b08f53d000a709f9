"""Custom operators of tofa_fast, each with its pure-PyTorch reference beside it.

``elastic_dwconv2d`` is built in three modules that depend one way: ``elastic_dwconv_reference``
(math, argument rules, the reference) ← ``elastic_dwconv_dispatch`` (the per-device backend table)
← ``elastic_dwconv`` (the ``torch.library`` operator).
"""

from .bn_act_dwconv import bn_act_dwconv2d
from .elastic_dwconv import elastic_dwconv2d
from .elastic_dwconv_reference import (
    active_filter_backward_reference,
    active_filter_reference,
    elastic_dwconv2d_reference,
)
from .packed_batch_norm import packed_batch_norm_act
from .packed_batch_norm_reference import packed_batch_norm_act_reference

__all__ = [
    "active_filter_backward_reference",
    "bn_act_dwconv2d",
    "active_filter_reference",
    "elastic_dwconv2d",
    "elastic_dwconv2d_reference",
    "packed_batch_norm_act",
    "packed_batch_norm_act_reference",
]
