"""Data sets for training (SPEC §8): the embedded digits set, torchvision sets, ImageFolder trees.

Every source becomes a :class:`DataSplits`: labelled, unlabelled and test :class:`ImageSet` objects
holding uint8 (3, H, W) images at a common base resolution, plus the class names. Small sets live in
memory; ImageFolder trees are decoded lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

TORCHVISION_SETS = ("cifar10", "cifar100", "flowers102", "oxfordiiitpet", "stanfordcars", "fgvcaircraft")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class ImageSet(Dataset):
    """Images (uint8, 3×S×S) with optional integer labels. ``source`` is either a uint8 tensor
    (N, 3, S, S) held in memory, or a list of file paths decoded on access."""

    def __init__(self, source: torch.Tensor | list[str], labels: torch.Tensor | None, size: int):
        self.source, self.labels, self.size = source, labels, size
        if labels is not None and len(labels) != len(source):
            raise ValueError(f"labels has {len(labels)} entries for {len(source)} images")

    def __len__(self) -> int:
        return len(self.source)

    def image(self, index: int) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source[index]
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2 import functional as TF

        img = decode_image(self.source[index], mode=ImageReadMode.RGB)
        img = TF.resize(img, self.size, antialias=True)
        return TF.center_crop(img, self.size)

    def __getitem__(self, index: int):
        img = self.image(index)
        return (img, int(self.labels[index])) if self.labels is not None else img

    def subset(self, indices) -> ImageSet:
        indices = list(map(int, indices))
        if isinstance(self.source, torch.Tensor):
            source = self.source[indices]
        else:
            source = [self.source[i] for i in indices]
        labels = self.labels[indices] if self.labels is not None else None
        return ImageSet(source, labels, self.size)


@dataclass
class DataSplits:
    labelled: ImageSet
    unlabelled: ImageSet | None
    test: ImageSet
    classes: list[str]
    size: int  # base resolution of the stored images
    flip: bool  # whether horizontal flips preserve labels
    name: str
    val: ImageSet | None = None  # labelled validation split (validation-based selection, TOFA eq. 5)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_labels_per_class(labels: torch.Tensor, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``per_class`` labelled examples per class and of the rest (TOFA's semi-supervised
    splits). Raises if a class has fewer than ``per_class`` + 1 examples."""
    rng = np.random.default_rng(seed)
    labelled, rest = [], []
    labels_np = labels.numpy()
    for c in np.unique(labels_np):
        idx = rng.permutation(np.flatnonzero(labels_np == c))
        if len(idx) <= per_class:
            raise ValueError(f"labels_per_class={per_class} but class {c} has only {len(idx)} training images")
        labelled.append(idx[:per_class])
        rest.append(idx[per_class:])
    return np.sort(np.concatenate(labelled)), np.sort(np.concatenate(rest))


def carve_validation(train: ImageSet, per_class: int | None, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold ``per_class`` labelled images per class out of ``train`` as a validation split.

    The split is seeded separately from the labelled/unlabelled split, and taken *before* it, so
    the images a run validates on are never trained on, labelled or not."""
    if per_class is None:
        return train, None
    if train.labels is None:
        raise ValueError("val_per_class needs labelled training images")
    val_idx, rest_idx = split_labels_per_class(train.labels, per_class, seed + 7_919)
    return train.subset(rest_idx), train.subset(val_idx)


def load_digits(
    labels_per_class: int | None = 20,
    seed: int = 0,
    size: int = 32,
    test_fraction: float = 0.2,
    val_per_class: int | None = None,
) -> DataSplits:
    """scikit-learn's 8×8 handwritten digits (1797 images, ships inside scikit-learn: no download),
    upsampled to ``size`` and split into test (``test_fraction``, stratified), optionally validation
    (``val_per_class`` per class), labelled (``labels_per_class`` per class) and unlabelled (the rest
    of the training images)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    n_test_per_class = int(round(len(labels) * test_fraction / 10))
    test_idx, train_idx = split_labels_per_class(labels, n_test_per_class, seed=12345)  # fixed test split
    full = ImageSet(images, labels, size)
    train, val = carve_validation(full.subset(train_idx), val_per_class, seed)
    test = full.subset(test_idx)
    if labels_per_class is None:
        labelled, unlabelled = train, None
    else:
        lab_idx, unl_idx = split_labels_per_class(train.labels, labels_per_class, seed)
        labelled, unlabelled = train.subset(lab_idx), train.subset(unl_idx)
        unlabelled.labels = None
    return DataSplits(labelled, unlabelled, test, [str(i) for i in range(10)], size, flip=False, name="digits", val=val)


def _scan_folder(root: str, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root!r} does not exist")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if classes is not None and found != classes:
        raise ValueError(f"class folders of {root!r} ({found}) do not match the training classes ({classes})")
    paths, targets = [], []
    for c, name in enumerate(found):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    targets.append(c)
    if not paths:
        raise ValueError(f"data folder {root!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, targets, found


def _flat_images(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root!r} does not exist")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"unlabelled folder {root!r} contains no images")
    return paths


def load_image_folder(
    root: str, size: int, labels_per_class: int | None = None, seed: int = 0, val_per_class: int | None = None
) -> DataSplits:
    """An ImageFolder tree: ``root/train/<class>/*``, ``root/test/<class>/*``, optionally
    ``root/val/<class>/*`` and ``root/unlabelled/**`` (any layout). ``labels_per_class`` keeps that
    many labelled images per class and moves the rest of ``train`` to the unlabelled pool;
    ``val_per_class`` (when there is no ``val`` folder) holds that many out of ``train`` first."""
    paths, targets, classes = _scan_folder(os.path.join(root, "train"), None)
    test_paths, test_targets, _ = _scan_folder(os.path.join(root, "test"), classes)
    labelled = ImageSet(paths, torch.tensor(targets), size)
    if os.path.isdir(os.path.join(root, "val")):
        val_paths, val_targets, _ = _scan_folder(os.path.join(root, "val"), classes)
        val = ImageSet(val_paths, torch.tensor(val_targets), size)
    else:
        labelled, val = carve_validation(labelled, val_per_class, seed)
        paths = list(labelled.source)
    unlabelled_paths: list[str] = []
    if os.path.isdir(os.path.join(root, "unlabelled")):
        unlabelled_paths = _flat_images(os.path.join(root, "unlabelled"))
    if labels_per_class is not None:
        lab_idx, unl_idx = split_labels_per_class(labelled.labels, labels_per_class, seed)
        unlabelled_paths += [paths[i] for i in unl_idx]
        labelled = labelled.subset(lab_idx)
    unlabelled = ImageSet(unlabelled_paths, None, size) if unlabelled_paths else None
    test = ImageSet(test_paths, torch.tensor(test_targets), size)
    return DataSplits(
        labelled, unlabelled, test, classes, size, flip=True, name=os.path.basename(os.path.normpath(root)), val=val
    )


def load_torchvision(
    name: str,
    root: str,
    size: int,
    labels_per_class: int | None,
    seed: int,
    download: bool,
    val_per_class: int | None = None,
) -> DataSplits:
    """One of the paper's six torchvision data sets from ``root`` (downloads only if ``download``)."""
    import torchvision.datasets as tvd
    from torchvision.transforms import v2

    key = name.lower()
    to_tensor = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    # data set -> (class, keyword arguments of the training split, of the test split)
    table = {
        "cifar10": (tvd.CIFAR10, {"train": True}, {"train": False}),
        "cifar100": (tvd.CIFAR100, {"train": True}, {"train": False}),
        "flowers102": (tvd.Flowers102, {"split": "train"}, {"split": "test"}),
        "oxfordiiitpet": (tvd.OxfordIIITPet, {"split": "trainval"}, {"split": "test"}),
        "stanfordcars": (tvd.StanfordCars, {"split": "train"}, {"split": "test"}),
        "fgvcaircraft": (tvd.FGVCAircraft, {"split": "trainval"}, {"split": "test"}),
    }
    if key not in table:
        raise ValueError(f"unknown torchvision data set {name!r}; available: {list(TORCHVISION_SETS)}")
    cls, train_kw, test_kw = table[key]
    try:
        train, test = cls(root, download=download, **train_kw), cls(root, download=download, **test_kw)
    except RuntimeError as exc:
        raise ValueError(f"{name} not found under {root!r} ({exc}); pass --download to fetch it") from exc

    def materialise(ds) -> ImageSet:
        imgs, labels = zip(*((to_tensor(img), int(t)) for img, t in ds))
        return ImageSet(torch.stack(imgs), torch.tensor(labels), size)

    train_set, test_set = materialise(train), materialise(test)
    train_set, val = carve_validation(train_set, val_per_class, seed)
    classes = [str(c) for c in getattr(train, "classes", range(int(train_set.labels.max()) + 1))]
    unlabelled = None
    if labels_per_class is not None:
        lab_idx, unl_idx = split_labels_per_class(train_set.labels, labels_per_class, seed)
        unlabelled = train_set.subset(unl_idx)
        unlabelled.labels = None
        train_set = train_set.subset(lab_idx)
    return DataSplits(train_set, unlabelled, test_set, classes, size, flip=True, name=key, val=val)


def load_data(
    data: str,
    size: int,
    labels_per_class: int | None,
    seed: int,
    root: str = "data",
    download: bool = False,
    val_per_class: int | None = None,
) -> DataSplits:
    """Dispatch on ``--data``: ``digits``, a torchvision data-set name, or an ImageFolder path."""
    if data == "digits":
        per_class = labels_per_class if labels_per_class is not None else 20
        return load_digits(per_class, seed, size, val_per_class=val_per_class)
    if data.lower() in TORCHVISION_SETS:
        return load_torchvision(data, root, size, labels_per_class, seed, download, val_per_class)
    if os.path.isdir(data):
        return load_image_folder(data, size, labels_per_class, seed, val_per_class)
    raise ValueError(
        f"--data {data!r} is neither 'digits', a torchvision data set ({', '.join(TORCHVISION_SETS)}) nor an existing folder"
    )
