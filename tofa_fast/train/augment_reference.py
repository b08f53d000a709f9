"""The oracle of :mod:`.augment`: the same views computed image by image with torchvision's
functionals, from the same :class:`~.augment.ViewParams`.

This is what ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ColorJitter`` (+ ``AutoAugment``)
+ ``ToDtype`` + ``Normalize`` compute on a float image once their random choices are made; the
batched module must agree with it to float rounding (tests/test_augment.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .augment import CROP_RATIO, CROP_SCALE, JITTER, JITTER_OPS, BatchAugment, ViewParams, apply_auto_augment_op

_ADJUST = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
}


def view_reference(augment: BatchAugment, image: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """One (3, H, W) uint8 image's view, one torchvision functional after the other."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    top, left, h, w = params.box
    x = TF.resized_crop(x, top, left, h, w, [augment.size, augment.size], antialias=True)
    if params.flip:
        x = TF.horizontal_flip(x)
    for op in params.jitter_order:
        x = _ADJUST[JITTER_OPS[op]](x, params.jitter_factors[op])
    for name, magnitude in params.auto_augment:
        x = apply_auto_augment_op(x, name, magnitude)
    return TF.normalize(x, list(augment.mean), list(augment.std))


def views_reference(augment: BatchAugment, images: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    return torch.stack([view_reference(augment, img, p) for img, p in zip(images, params)])


def torchvision_pipeline(augment: BatchAugment):
    """The per-image torchvision v2 transform with the same distribution (its own sampler, applied to
    the uint8 image), which :class:`~.augment.BatchAugment` replaced in the trainer: the benchmark's
    baseline (bench/test_bench_augment.py)."""
    ops = [v2.RandomResizedCrop(augment.size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)]
    if augment.flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER))
    if augment.strong:
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(augment.mean), list(augment.std))]
    return v2.Compose(ops)
