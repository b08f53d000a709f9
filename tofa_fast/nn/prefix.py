"""The active part of an elastic parameter: a leading block of the max tensor, as a view.

Every elastic layer reads the first C entries of its parameters along one or two dimensions. A slice
that spans a whole dimension still costs autograd a node whose backward zero-fills a full-size
gradient and copies into it; the widest members of every step (a_max, and every layer at its widest
choice) would pay that for nothing.
"""

from __future__ import annotations

import torch


def prefix(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """``t[:sizes[0], :sizes[1], ...]``, slicing only the dimensions the sizes do not span (``t``
    itself when they span all)."""
    for dim, size in enumerate(sizes):
        if size != t.shape[dim]:
            t = t.narrow(dim, 0, size)
    return t
