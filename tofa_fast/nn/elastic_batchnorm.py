"""Elastic batch norm: statistics and affine parameters sliced to the active channels.

Semantics of OFA's ``DynamicBatchNorm2d``: a subnet with C channels uses (and, in training, updates in
place) the first C entries of ``running_mean`` / ``running_var`` / ``weight`` / ``bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ElasticBatchNorm2d(nn.Module):
    """Shapes: x (N, C ≤ max_features, H, W) → same shape."""

    def __init__(self, max_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.max_features, self.eps, self.momentum = max_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(max_features))
        self.bias = nn.Parameter(torch.zeros(max_features))
        self.register_buffer("running_mean", torch.zeros(max_features))
        self.register_buffer("running_var", torch.ones(max_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # False: training mode normalises with batch statistics but leaves the running ones alone
        # (the pseudo-label pass, Supernet.pseudo_label_pass).
        self.update_running_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.training and not self.update_running_stats:
            return F.batch_norm(x, None, None, self.weight[:c], self.bias[:c], True, 0.0, self.eps)
        # Mirrors nn.BatchNorm2d: momentum=None means a cumulative moving average.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Slices are views, so F.batch_norm updates the prefix of the running buffers in place.
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            factor,
            self.eps,
        )

    def extract(self, features: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(features, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:features])
            bn.bias.copy_(self.bias[:features])
            bn.running_mean.copy_(self.running_mean[:features])
            bn.running_var.copy_(self.running_var[:features])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn

    def extra_repr(self) -> str:
        return f"max_features={self.max_features}, eps={self.eps}, momentum={self.momentum}"
