"""Batches of an epoch: which images, in which order, with which augmentation seeds.

Determinism: the batch order of epoch e is drawn from a generator seeded by (seed, e), and each
image's augmentation from a seed given by its *position in the epoch's sequence of global batches*
— not by which process handles it — so a step sees the same augmented images however the global
batch is sharded over processes, and a resumed run sees what the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist_utils
from .data import DataSplits, ImageSet

if TYPE_CHECKING:
    from .augment import BatchAugment

Transform = Callable[[torch.Tensor], torch.Tensor]
#: (image index, augmentation seed) pairs: one global batch.
KeyedBatch = list[tuple[int, int]]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch``: batch order, subnet sampling, dropout."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _unzip(keys: KeyedBatch) -> tuple[list[int], list[int]]:
    """(index, seed) pairs → their indices and their seeds."""
    return [i for i, _ in keys], [s for _, s in keys]


class LabelledViews(Dataset):
    """Weak views of labelled images, a global batch's shard at a time: ``views[keys]`` takes a list
    of (index, augmentation seed) pairs and returns (views (N, 3, S, S), labels (N,))."""

    def __init__(self, images: ImageSet, augment: BatchAugment):
        if images.labels is None:
            raise ValueError("LabelledViews needs a labelled ImageSet")
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, keys: KeyedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        indices, seeds = _unzip(keys)
        labels = self.images.labels[torch.tensor(indices, dtype=torch.long)].long()
        return self.augment(self.images.stack(indices), seeds), labels


class UnlabelledViews(Dataset):
    """(weak, strong) views of unlabelled images, a global batch's shard at a time: image i's weak
    view is drawn from its seed, its strong view from seed + 1."""

    def __init__(self, images: ImageSet, weak: BatchAugment, strong: BatchAugment):
        self.images, self.weak, self.strong = images, weak, strong

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, keys: KeyedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        indices, seeds = _unzip(keys)
        images = self.images.stack(indices)
        return self.weak(images, seeds), self.strong(images, [s + 1 for s in seeds])


class PlainImages(Dataset):
    """Un-augmented images (evaluation); unlabelled images get the label -1."""

    def __init__(self, images: ImageSet, transform: Transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.images[i]
        if isinstance(item, tuple):
            return self.transform(item[0]), item[1]
        return self.transform(item), -1


def epoch_batches(n: int, batch_size: int, steps: int, generator: torch.Generator, stream: int) -> list[KeyedBatch]:
    """``steps`` global batches of (index, augmentation seed), indices drawn as concatenated random
    permutations of range(n). The seed of an image depends on its position in the epoch's sequence
    of global batches, not on which process handles it."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    base = int(torch.randint(0, 2**62, (1,), generator=generator)) + stream
    keyed = [(index, (base + 2 * position) % 2**63) for position, index in enumerate(order[: steps * batch_size])]
    return [keyed[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def epoch_loaders(
    splits: DataSplits,
    epoch_seed_value: int,
    steps: int,
    batch_size: int,
    mu: int,
    unlabelled: bool,
    dist: dist_utils.DistContext,
    num_workers: int = 0,
    skip: int = 0,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[Iterable, Iterable]:
    """This rank's labelled and unlabelled loaders for one epoch (its shard of every global batch).

    The labelled loader yields (weak views (B, 3, S, S), labels (B,)); the unlabelled one yields
    (weak, strong) views (μB, 3, S, S) each, or ``None`` per step when ``unlabelled`` is false.
    Both batch lists are drawn from one generator, labelled first, so their order never changes;
    ``skip`` leaves out the epoch's first batches (already trained before a mid-epoch checkpoint);
    ``normalization`` is the network's (mean, std) per channel (default: ImageNet's).
    """
    from .augment import strong_augment, weak_augment  # torchvision: imported when training starts

    g = torch.Generator().manual_seed(epoch_seed_value)
    norm = normalization or ()
    weak = weak_augment(splits.size, splits.flip, *norm)
    # batch_size=None: the loader hands each shard's key list to the data set whole, which augments
    # the batch at once (augment.py) instead of image by image.
    kw = dict(batch_size=None, num_workers=num_workers, persistent_workers=False)
    lab = LabelledViews(splits.labelled, weak)
    lab_batches = epoch_batches(len(lab), batch_size, steps, g, stream=0)
    lab_loader = DataLoader(lab, sampler=[dist_utils.shard(b, dist) for b in lab_batches[skip:]], **kw)
    if not unlabelled:
        return lab_loader, [None] * (steps - skip)
    unl = UnlabelledViews(splits.unlabelled, weak, strong_augment(splits.size, splits.flip, *norm))
    unl_batches = epoch_batches(len(unl), mu * batch_size, steps, g, stream=1)
    return lab_loader, DataLoader(unl, sampler=[dist_utils.shard(b, dist) for b in unl_batches[skip:]], **kw)


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, r, r), antialiased bilinear; the tensor itself when already that size."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
