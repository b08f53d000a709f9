"""Elastic batch norm: statistics and affine parameters sliced to the active channels.

Semantics of OFA's ``DynamicBatchNorm2d``: a subnet with C channels uses (and, in training, updates in
place) the first C entries of ``running_mean`` / ``running_var`` / ``weight`` / ``bias``.

The activation that follows a batch norm in an MBConv layer, the stem and the head can be handed to
:meth:`ElasticBatchNorm2d.forward`. On a channels-last input that a compiled kernel serves (the C++
kernel, CPU), the pair is then one call of :func:`tofa_fast.ops.packed_batch_norm_act` with a single
segment: a channels-last (N, C, H, W) tensor *is* the op's (N·H·W, C) row layout, so the view costs
nothing, and the op reads x twice forward and twice backward where ``F.batch_norm`` + the activation
make several more passes and allocations (``bench/test_bench_sequential_step.py``). Everything
else — NCHW input, float16, CUDA (no compiled kernel there yet), an activation the op does not know —
takes ``F.batch_norm`` and the activation module, as before, and so do calls whose pixels × the
layer's widest channel count fall under :data:`FUSED_MIN_ELEMENTS`. The two paths compute the same function,
gradients and running-statistics updates (``tests/test_elastic_batchnorm_fused.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import packed_batch_norm
from .activations import known_activation_name
from .prefix import prefix

#: Smaller inputs keep F.batch_norm: below this the op's per-call overhead outweighs the passes it
#: saves (first measured on the 2-core CPU: 1.1–1.6× faster at 1.5–2.4 M elements, 0.7× at 0.3 M,
#: when the threshold was 1 M). Re-measured 2026-12-07, with the op's eager path (ops/eager_path.py)
#: and the host memory kept (host_memory.py), interleaved round by round in one process (16 rounds,
#: median of the per-round ratios) on the default run's sequential step: 256 K elements 1.022× and
#: 1.065× as fast as 1 M, 16 K 1.030× and 1.034×, 4 K 1.013×; sized by the layer's widest channel
#: count (below), 256 K 1.029× and 1.022×. "Size" is pixels × the layer's max_features.
FUSED_MIN_ELEMENTS = 1 << 18


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

    def forward(
        self,
        x: torch.Tensor,
        activation: nn.Module | None = None,
        batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Batch norm of x's C channels, then ``activation`` (a :func:`~.activations.build_activation`
        module) when given: fused into one op call where a compiled kernel serves it (module docstring).

        ``batch_stats``: two (C,) buffers that receive this batch's mean and unbiased variance
        *instead* of the running statistics being updated (nor ``num_batches_tracked``), when
        training would update them. A caller that computes one batch for several members
        (:mod:`.shared_prefix`) applies the updates itself, member by member, with
        :meth:`update_running_stats_with`."""
        c = x.shape[1]
        running_mean, running_var, factor = self.running_stat_args(c, batch_stats)
        fused = self.fused_activation_name(x, activation)
        if fused is not None:
            n, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: x is channels-last
            y = packed_batch_norm.packed_batch_norm_act(
                rows,
                [0, n * h * w],
                [c],
                prefix(self.weight, c),
                prefix(self.bias, c),
                running_mean,
                running_var,
                self.training,
                [factor],
                self.eps,
                fused,
            )
            return y.view(n, h, w, c).permute(0, 3, 1, 2)
        y = F.batch_norm(
            x, running_mean, running_var, prefix(self.weight, c), prefix(self.bias, c), self.training, factor, self.eps
        )
        return y if activation is None else activation(y)

    def running_stat_args(
        self, channels: int, batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """``running_mean``, ``running_var`` and momentum factor for ``F.batch_norm``-style calls on
        ``channels`` channels (:meth:`forward`'s ``batch_stats`` rule); counts the batch when training
        updates the running statistics. None, None in training that leaves them alone."""
        updates = self.training and self.update_running_stats
        if updates and batch_stats is not None:
            # Momentum 1: the "running" buffers become exactly the batch's statistics.
            return batch_stats[0], batch_stats[1], 1.0
        factor = self.count_batch() if updates else 0.0
        if self.training and not updates:
            return None, None, factor
        # Slices are views, so every path updates the prefix of the running buffers in place.
        return self.running_mean[:channels], self.running_var[:channels], factor

    def count_batch(self) -> float:
        """Counts one batch towards the running statistics (``num_batches_tracked``) and returns the
        factor its statistics enter them with: ``momentum``, or for ``momentum=None`` the cumulative
        moving average's 1 / batches, as nn.BatchNorm2d. The sequential and packed passes both call it."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    @torch.no_grad()
    def update_running_stats_with(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Count one batch and move the first ``len(mean)`` running statistics towards its ``mean``
        and unbiased ``var``: the update a training-mode forward over those channels makes."""
        factor = self.count_batch()
        c = mean.shape[0]
        self.running_mean[:c].lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var[:c].lerp_(var.to(self.running_var.dtype), factor)

    def fused_activation_name(self, x: torch.Tensor, activation: nn.Module | None) -> str | None:
        """The op's name for ``activation`` when batch norm + activation run as one compiled call, else None."""
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return None
        # Sized by the layer's widest channel count, not x's: the shared-prefix step computes a layer at
        # its widest member's width where the sequential step computes each member at its own, and a
        # size test on x would send the same layer and batch down different paths (their roundings
        # differ, visibly so in bfloat16).
        pixels = x.numel() // max(x.shape[1], 1)
        if pixels * self.max_features < FUSED_MIN_ELEMENTS or (self.training and pixels == 1):
            return None  # small (see FUSED_MIN_ELEMENTS), or one value per channel: F.batch_norm's error
        name = "none" if activation is None else known_activation_name(activation)
        if name is None or packed_batch_norm.select_backend(x, self.weight) is packed_batch_norm.REFERENCE:
            return None
        return name

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
