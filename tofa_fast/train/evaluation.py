"""Measuring subnets of a trained supernet: BN recalibration batches, test accuracy, calibrated
extraction. Shared by the palette, ``export``, ``evaluate`` and the search module.

Images are normalised as the space's networks expect (``SearchSpace.input_mean`` / ``input_std``).
The transforms (torchvision) are imported where images are measured: importing torchvision costs
seconds, and ``tofa-fast select`` measures nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from ..nn import Supernet, recalibrate_bn
from ..spaces import Arch, SearchSpace
from .data import DataSplits, ImageSet
from .loaders import PlainImages, resize

Transform = Callable[[torch.Tensor], torch.Tensor]


def eval_transform_for(splits: DataSplits, space: SearchSpace) -> Transform:
    """The un-augmented view of ``splits``' images that ``space``'s networks take."""
    from .augment import eval_transform  # torchvision: only when images are measured

    return eval_transform(splits.size, space.input_mean, space.input_std)


def calibration_batches(
    splits: DataSplits, space: SearchSpace, resolution: int, images: int, batch_size: int = 128
) -> list[torch.Tensor]:
    """Up to ``images`` un-augmented training images (labelled first, then unlabelled), normalised
    for ``space``'s networks and resized to ``resolution``, in batches (N, C, r, r) — the BN
    recalibration data of every subnet."""
    sets = [splits.labelled] + ([splits.unlabelled] if splits.unlabelled is not None else [])
    tf = eval_transform_for(splits, space)
    chosen: list[torch.Tensor] = []
    for image_set in sets:
        for i in range(min(len(image_set), images - len(chosen))):
            chosen.append(tf(image_set.image(i)))
    return list(resize(torch.stack(chosen), resolution).split(batch_size))


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    images: ImageSet,
    transform: Transform,
    resolution: int,
    device: torch.device,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on labelled ``images``, each passed
    through ``transform`` (:func:`eval_transform_for`), at ``resolution``."""
    loader = DataLoader(PlainImages(images, transform), batch_size=256, num_workers=num_workers)
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(resize(x.to(device), resolution))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def calibrated_subnet(net: Supernet, arch: Arch, splits: DataSplits, images: int) -> torch.nn.Module:
    """``net.extract(arch)`` with BN statistics recomputed on ``images`` training images, in eval mode."""
    sub = net.extract(arch)
    recalibrate_bn(sub, calibration_batches(splits, net.space, arch.resolution, images))
    return sub.eval()
