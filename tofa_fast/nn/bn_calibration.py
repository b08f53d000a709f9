"""Batch-norm recalibration of a subnet (OFA's ``set_running_statistics``), exact and in one pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .elastic_batchnorm import ElasticBatchNorm2d

_BN_TYPES = (nn.BatchNorm2d, ElasticBatchNorm2d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor | tuple | list]) -> int:
    """Recompute every BN's running mean/var as the exact statistics of the data in ``batches``.

    Like OFA's ``set_running_statistics``: the forward pass normalises with batch statistics, and
    each BN's running statistics become the population mean and (biased) variance of its input
    over all samples and positions of all batches, accumulated in float64 and weighted by sample
    count (batch sizes may differ). As in OFA, deeper layers see activations normalised with each
    batch's own statistics, so their result depends on the batching the way training does. Works
    on an extracted
    :class:`~tofa_fast.nn.Subnet` or on a :class:`~tofa_fast.nn.Supernet` with its active arch
    (only the active channel prefix of each elastic BN is rewritten).

    Args:
        model: the network.
        batches: iterable of images (N, C, H, W), or of (images, labels, ...) tuples.

    Returns:
        The number of images seen. Raises ``ValueError`` if ``batches`` is empty.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    sums: dict[nn.Module, list] = {}

    def hook(module, inputs, _output):
        x = inputs[0].detach()
        dims = (0, 2, 3)
        count = x.numel() // x.shape[1]
        s = x.sum(dims, dtype=torch.float64)
        sq = (x.double() ** 2).sum(dims)
        acc = sums.get(module)
        if acc is None:
            sums[module] = [s, sq, count]
        else:
            acc[0] += s
            acc[1] += sq
            acc[2] += count

    was_training = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    handles = [bn.register_forward_hook(hook) for bn in bns]
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()  # batch statistics in the forward, as during training
            bn.momentum = 0.0  # ...without touching the running buffers until we overwrite them
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError("batches must yield image tensors (N, C, H, W) or (images, ...) tuples")
            model(images.to(device))
            seen += images.shape[0]
    finally:
        for h in handles:
            h.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in was_training.items():
            m.train(mode)
    if seen == 0:
        raise ValueError("batches is empty: recalibrate_bn needs at least one batch of images")
    for bn, (s, sq, count) in sums.items():
        mean = s / count
        var = (sq / count - mean**2).clamp_min(0)
        c = mean.numel()
        bn.running_mean[:c].copy_(mean.to(bn.running_mean.dtype))
        bn.running_var[:c].copy_(var.to(bn.running_var.dtype))
    return seen
