"""Custom operators of tofa_fast, each with its pure-PyTorch reference beside it."""

from .elastic_dwconv import active_filter_reference, elastic_dwconv2d, elastic_dwconv2d_reference

__all__ = ["active_filter_reference", "elastic_dwconv2d", "elastic_dwconv2d_reference"]
