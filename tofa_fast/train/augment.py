"""Weak (α) and strong (𝒜) augmentation of SPEC §7, from torchvision.transforms.v2.

α = random resized crop + horizontal flip (when the data set allows it) + colour jitter;
𝒜 = α + AutoAugment (FixMatch's strong view). Both take a uint8 (3, H, W) image and return a
normalised float32 image of the same size; the trainer resizes batches to each subnet's resolution.
The normalisation is the network's (``SearchSpace.input_mean`` / ``input_std``: ImageNet's, except
for EfficientNet-Lite's [-1, 1]).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..spaces import IMAGENET_MEAN, IMAGENET_STD


def _finish(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def weak_transform(size: int, flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.85, 1.18), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3))
    return v2.Compose(ops + _finish(mean, std))


def strong_transform(size: int, flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.85, 1.18), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]
    return v2.Compose(ops + _finish(mean, std))


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)] + _finish(mean, std))
