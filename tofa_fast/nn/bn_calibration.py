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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    sums: dict[nn.Module, list] = {}

    def hook(module, inputs, _output):
        x = inputs[0].detach()
        dims = (0, 2, 3)
        count = x.numel() // x.shape[1]
        # One float64 copy feeds both sums: the same values as x.sum(dtype=float64) and
        # (x.double() ** 2).sum(), bit for bit, in 2.5–4× less time (a casting reduction and pow
        # each take a slow path; test_supernet.py::test_recalibrate_bn_sums_in_float64_bit_for_bit).
        xd = x.double()
        s = xd.sum(dims)
        sq = xd.square().sum(dims)
        acc = sums.get(module)
        if acc is None:
            sums[module] = [s, sq, count]
        else:
            acc[0] += s
            acc[1] += sq
            acc[2] += count

    was_training = {m: m.training for m in model.modules()}
    # The pass runs BN in training mode, which moves the running buffers (to NaN, on NaN images);
    # they are put back afterwards, so a refused call leaves the model as it was.
    buffers = {bn: {k: v.clone() for k, v in bn.named_buffers()} for bn in bns}
    handles = [bn.register_forward_hook(hook) for bn in bns]
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()  # batch statistics in the forward, as during training
        weight = next(model.parameters(), None)
        device = weight.device if weight is not None else torch.device("cpu")
        try:
            batches = iter(batches)
        except TypeError:
            raise TypeError(f"batches must be an iterable of image batches, got {type(batches).__name__}") from None
        for index, batch in enumerate(batches):
            images = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            _check_batch(images, index, weight)
            try:
                model(images.to(device))
            except (RuntimeError, NotImplementedError) as exc:  # e.g. a channel count the model does not take
                raise ValueError(
                    f"batches[{index}] (images of shape {tuple(images.shape)}) does not run through the model: {exc}"
                ) from exc
            seen += images.shape[0]
    finally:
        for h in handles:
            h.remove()
        for bn, saved in buffers.items():
            for name, value in bn.named_buffers():
                value.copy_(saved[name])
        for m, mode in was_training.items():
            m.train(mode)
    if seen == 0:
        raise ValueError("batches is empty: recalibrate_bn needs at least one batch of images")
    statistics = {bn: (s / count, sq / count - (s / count) ** 2) for bn, (s, sq, count) in sums.items()}
    # NaN or inf in the images would become NaN running statistics: a silently broken model.
    if not all(torch.isfinite(mean).all() and torch.isfinite(var).all() for mean, var in statistics.values()):
        raise ValueError("batches hold non-finite values (NaN or inf): the batch-norm statistics would be NaN")
    for bn, (mean, var) in statistics.items():
        c = mean.numel()
        bn.running_mean[:c].copy_(mean.to(bn.running_mean.dtype))
        bn.running_var[:c].copy_(var.clamp_min(0).to(bn.running_var.dtype))
    return seen


def _check_batch(images: object, index: int, weight: torch.Tensor | None) -> None:
    expected = "batches must yield image tensors (N, C, H, W) or (images, ...) tuples"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{expected}; batches[{index}] is a {type(images).__name__}")
    if images.is_nested or images.layout != torch.strided:
        raise ValueError(
            f"batches[{index}] must be a dense tensor, got a {'nested' if images.is_nested else images.layout} one"
        )
    if images.dim() != 4:
        raise ValueError(f"{expected}; batches[{index}] has shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"batches[{index}] must hold floating-point images, got dtype {images.dtype}")
    if images.device.type == "meta":
        raise ValueError(f"batches[{index}] is on the meta device: it holds no images")
    # Under autocast the layers cast the images themselves.
    if weight is not None and images.dtype != weight.dtype and not torch.is_autocast_enabled(weight.device.type):
        raise ValueError(f"batches[{index}] has dtype {images.dtype} but the model's weights {weight.dtype}")
