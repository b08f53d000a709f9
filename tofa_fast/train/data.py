"""Data sets for training (SPEC §8): the embedded digits set, torchvision sets, ImageFolder trees.

Every source becomes a :class:`DataSplits`: labelled, unlabelled and test :class:`ImageSet` objects
holding uint8 (3, H, W) images at a common base resolution, plus the class names. Small sets live in
memory; ImageFolder trees are decoded lazily.

Bad data is found before training, never mid-run: every file of an ImageFolder tree is decoded once
(in a thread pool, with a progress bar on large trees) and every item of a torchvision set is read
while it is materialised; unreadable ones are named (``ValueError``), or listed and left out with
``skip_bad_images``. Empty class folders, classes missing from ``train``, and files that are not
images are reported naming the folder. The embedded digits set is in memory: nothing to check.

:func:`native_image_size` and :func:`default_space_for_size` pick a search space that fits the
images of a ``--data`` source without loading it.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover
    from ..spaces import SearchSpace
    from .config import TrainConfig

TORCHVISION_SETS = ("cifar10", "cifar100", "flowers102", "oxfordiiitpet", "stanfordcars", "fgvcaircraft")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
#: Trees with at least this many files show a progress bar while they are checked.
PROGRESS_MIN_IMAGES = 2_000
#: Unreadable files named in an error (all of them are counted); a skip warning names up to 50.
LISTED_BAD_IMAGES = 5
LISTED_SKIPPED_IMAGES = 50


class DataWarning(UserWarning):
    """Something in a data source was ignored or is missing, but training can go on."""


def _warn(message: str) -> None:
    # The message names the file or folder; the line of tofa_fast that noticed it does not matter.
    warnings.warn(message, DataWarning, stacklevel=2)


@dataclass(frozen=True)
class UnreadableImage:
    """A file (or a torchvision item) that does not decode, and why."""

    path: str
    reason: str


def decode_rgb(path: str) -> torch.Tensor:
    """Decode the image file ``path`` into a uint8 (3, H, W) RGB tensor.

    torchvision's decoders (JPEG, PNG, WebP, GIF) first; Pillow for what they refuse (BMP, PPM, TIFF,
    or an image whose extension lies). Raises ``ValueError`` naming the file and why it failed.
    """
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        img = _decode_with_pillow(path, exc)
    if img.dim() == 4:  # an animated GIF: its first frame
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        img = (img.double() * (255 / torch.iinfo(img.dtype).max)).round().to(torch.uint8)
    return img


def _decode_with_pillow(path: str, torch_error: RuntimeError) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        # torchvision's message says which formats it knows, without its C++ source location.
        reason = re.sub(r"^[^,]*, \S+:\d+, ", "", str(torch_error)).split(". ")[0]
        raise ValueError(f"{path}: not an image file ({reason})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


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
        from torchvision.transforms.v2 import functional as TF

        img = decode_rgb(self.source[index])
        img = TF.resize(img, self.size, antialias=True)
        return TF.center_crop(img, self.size)

    def stack(self, indices: Sequence[int]) -> torch.Tensor:
        """The uint8 (N, 3, S, S) images at ``indices``: one gather when they are in memory."""
        if isinstance(self.source, torch.Tensor):
            return self.source[torch.tensor(indices, dtype=torch.long)]
        return torch.stack([self.image(i) for i in indices])

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

    @staticmethod
    def concatenate(parts: Sequence[ImageSet]) -> ImageSet:
        """One set holding ``parts``' images in order (all in memory and labelled, or all file-backed
        and all labelled or none), e.g. a data set's train and val splits as one training pool."""
        if not parts:
            raise ValueError("parts must hold at least one ImageSet")
        if len(parts) == 1:
            return parts[0]
        sizes = {p.size for p in parts}
        in_memory = {isinstance(p.source, torch.Tensor) for p in parts}
        labelled = {p.labels is not None for p in parts}
        if len(sizes) > 1 or len(in_memory) > 1 or len(labelled) > 1:
            raise ValueError(
                "parts must share one image size and one storage (memory or files), and all have labels or none"
            )
        if in_memory.pop():
            source: torch.Tensor | list[str] = torch.cat([p.source for p in parts])
        else:
            source = [path for p in parts for path in p.source]
        labels = torch.cat([p.labels for p in parts]) if labelled.pop() else None
        return ImageSet(source, labels, sizes.pop())


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


def split_labels_per_class(
    labels: torch.Tensor, per_class: int, seed: int, name: str = "labels_per_class"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``per_class`` labelled examples per class and of the rest (TOFA's semi-supervised
    splits). Raises if a class has fewer than ``per_class`` + 1 examples, naming the setting ``name``."""
    rng = np.random.default_rng(seed)
    labelled, rest = [], []
    labels_np = labels.numpy()
    for c in np.unique(labels_np):
        idx = rng.permutation(np.flatnonzero(labels_np == c))
        if len(idx) <= per_class:
            raise ValueError(f"{name}={per_class} but class {c} has only {len(idx)} training images")
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
    val_idx, rest_idx = split_labels_per_class(train.labels, per_class, seed + 7_919, "val_per_class")
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


# -- checking image files -------------------------------------------------------------------------

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _worker_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores))


def _parallel_map(fn: Callable[[_In], _Out], items: Sequence[_In], desc: str) -> list[_Out]:
    """``[fn(x) for x in items]`` in order, on a thread pool, with a progress bar on long inputs.

    Threads rather than processes: the decoders (torchvision's C++, Pillow's C) release the GIL, and
    nothing has to be pickled. Items go in chunks so that per-task overhead stays small next to a decode.
    """
    from tqdm import tqdm

    chunk = 64
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    out: list[_Out] = []
    with (
        ThreadPoolExecutor(min(_worker_count(), max(1, len(chunks)))) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=len(items) < PROGRESS_MIN_IMAGES) as bar,
    ):
        for results in pool.map(lambda part: [fn(x) for x in part], chunks):
            out.extend(results)
            bar.update(len(results))
    return out


def _decode_problem(path: str) -> UnreadableImage | None:
    try:
        decode_rgb(path)
    except ValueError as exc:
        return UnreadableImage(path, str(exc).removeprefix(f"{path}: "))
    except Exception as exc:  # the decoders' own failures (MemoryError on a huge image, …) are named too
        return UnreadableImage(path, f"{type(exc).__name__}: {exc}")
    return None


def find_unreadable_images(paths: Sequence[str], desc: str = "checking images") -> list[UnreadableImage]:
    """Decode every file of ``paths`` exactly as training will (:func:`decode_rgb`) and return those
    that fail, in the order given. Runs on a thread pool; shows a progress bar from
    :data:`PROGRESS_MIN_IMAGES` files on."""
    return [bad for bad in _parallel_map(_decode_problem, list(paths), desc) if bad is not None]


def _refuse_or_skip(bad: list[UnreadableImage], total: int, where: str, skip: bool) -> set[str]:
    """Raise naming the first unreadable images, or (``skip``) warn listing them; the paths to leave out."""
    if not bad:
        return set()
    shown = LISTED_SKIPPED_IMAGES if skip else LISTED_BAD_IMAGES
    listed = "; ".join(f"{b.path} ({b.reason})" for b in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    if not skip:
        raise ValueError(
            f"{len(bad)} of {total} images of {where!r} cannot be read: {listed}{more}. Fix or remove them, "
            "or pass --skip-bad-images (skip_bad_images=True) to train without them"
        )
    _warn(f"skipping {len(bad)} unreadable images of {total} in {where!r}: {listed}{more}")
    return {b.path for b in bad}


# -- ImageFolder trees ------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    # .DS_Store, macOS "._x.jpg" resource forks, .ipynb_checkpoints: never data.
    return name.startswith(".")


def _image_files(folder: str, non_images: dict[str, list[str]]) -> list[str]:
    """Image files under ``folder``, any depth, by directory path then name (the order the seeded
    splits index: it must not change, or resumed runs would split differently); the names of other
    files go to ``non_images``, keyed by their directory."""
    paths = []
    for dirpath, _, files in sorted(os.walk(folder)):
        if any(_is_hidden(part) for part in Path(dirpath).relative_to(folder).parts):
            continue
        for f in sorted(files):
            if _is_hidden(f):
                continue
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(dirpath, f))
            else:
                non_images.setdefault(dirpath, []).append(f)
    return paths


def _warn_non_images(non_images: dict[str, list[str]]) -> None:
    if not non_images:
        return
    count = sum(len(names) for names in non_images.values())
    kinds = sorted({os.path.splitext(n)[1].lower() or "no extension" for names in non_images.values() for n in names})
    folders = sorted(non_images)
    shown = ", ".join(repr(f) for f in folders[:5]) + (
        f" and {len(folders) - 5} more folders" if len(folders) > 5 else ""
    )
    _warn(
        f"ignored {count} file(s) that are not images ({', '.join(kinds)}; images end in "
        f"{', '.join(IMAGE_EXTENSIONS)}) in {shown}"
    )


def _scan_classes(root: str) -> dict[str, list[str]]:
    """Class name → image paths of an ImageFolder split ``root/<class>/**`` (classes sorted by name)."""
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root!r} does not exist")
    entries = sorted((e for e in os.scandir(root) if not _is_hidden(e.name)), key=lambda e: e.name)
    loose = [e.name for e in entries if not e.is_dir()]
    if loose:
        _warn(
            f"ignored {len(loose)} file(s) directly in {root!r} ({', '.join(loose[:3])}"
            f"{', …' if len(loose) > 3 else ''}): images belong in {os.path.join(root, '<class>')}"
        )
    non_images: dict[str, list[str]] = {}
    scan = {e.name: _image_files(e.path, non_images) for e in entries if e.is_dir()}
    _warn_non_images(non_images)
    if not scan:
        raise ValueError(
            f"data folder {root!r} has no class folders (expected {os.path.join(root, '<class>')}/<images>)"
        )
    if not any(scan.values()):
        raise ValueError(f"data folder {root!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return scan


def _check_split_classes(scan: dict[str, list[str]], classes: list[str], root: str) -> None:
    """A test/val split may lack a training class (warning) but never add one (error)."""
    extra = [c for c in scan if c not in classes]
    if extra:
        raise ValueError(
            f"class folders of {root!r} do not match the training classes: "
            f"{', '.join(repr(os.path.join(root, c)) for c in extra)} has no counterpart in train "
            f"(training classes: {classes})"
        )
    missing = [c for c in classes if c not in scan]
    if missing:
        _warn(f"{root!r} has no folder for training class(es) {missing}: this split does not measure them")


def _check_empty_classes(scan: dict[str, list[str]], root: str, required: bool, skipped: set[str]) -> None:
    """Training classes need images (error); an empty test/val class folder only gets a warning."""
    empty = [c for c, files in scan.items() if not any(f not in skipped for f in files)]
    if not empty:
        return
    folders = ", ".join(repr(os.path.join(root, c)) for c in empty)
    why = "holds no readable images (all were skipped)" if any(scan[c] for c in empty) else "holds no images"
    if required:
        raise ValueError(f"class folder {folders} {why}: every training class needs images")
    _warn(f"class folder {folders} {why}: this split does not measure that class")


def _labelled_paths(scan: dict[str, list[str]], classes: list[str], skipped: set[str]) -> tuple[list[str], list[int]]:
    paths, targets = [], []
    for name, files in scan.items():
        for f in files:
            if f not in skipped:
                paths.append(f)
                targets.append(classes.index(name))
    return paths, targets


def _flat_images(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root!r} does not exist")
    non_images: dict[str, list[str]] = {}
    paths = sorted(_image_files(root, non_images))
    _warn_non_images(non_images)
    if not paths:
        raise ValueError(f"unlabelled folder {root!r} contains no images")
    return paths


def load_image_folder(
    root: str,
    size: int,
    labels_per_class: int | None = None,
    seed: int = 0,
    val_per_class: int | None = None,
    skip_bad_images: bool = False,
) -> DataSplits:
    """An ImageFolder tree: ``root/train/<class>/*``, ``root/test/<class>/*``, optionally
    ``root/val/<class>/*`` and ``root/unlabelled/**`` (any layout). ``labels_per_class`` keeps that
    many labelled images per class and moves the rest of ``train`` to the unlabelled pool;
    ``val_per_class`` (when there is no ``val`` folder) holds that many out of ``train`` first.

    Before anything is split, every image file of the tree is decoded once (see the module
    docstring): an unreadable one raises ``ValueError`` naming it, or with ``skip_bad_images`` is
    listed in a :class:`DataWarning` and left out. Hidden files and folders (``.DS_Store``,
    ``._x.jpg``) are ignored; other files that are not images are ignored with a warning naming
    their folders. ``test``/``val`` may lack a training class (a warning) but not add one.
    """
    train_root = os.path.join(root, "train")
    train_scan = _scan_classes(train_root)
    classes = list(train_scan)
    _check_empty_classes(train_scan, train_root, required=True, skipped=set())
    split_scans = {}
    for split in ("test", "val"):
        split_root = os.path.join(root, split)
        if split == "test" or os.path.isdir(split_root):
            split_scans[split] = _scan_classes(split_root)
            _check_split_classes(split_scans[split], classes, split_root)
            _check_empty_classes(split_scans[split], split_root, required=False, skipped=set())
    unlabelled_root = os.path.join(root, "unlabelled")
    unlabelled_paths = _flat_images(unlabelled_root) if os.path.isdir(unlabelled_root) else []

    everything = [f for scan in (train_scan, *split_scans.values()) for files in scan.values() for f in files]
    everything += unlabelled_paths
    skipped = _refuse_or_skip(
        find_unreadable_images(everything, f"checking {root}"), len(everything), root, skip_bad_images
    )
    if skipped:
        _check_empty_classes(train_scan, train_root, required=True, skipped=skipped)
        for split, scan in split_scans.items():
            _check_empty_classes(scan, os.path.join(root, split), required=False, skipped=skipped)
        unlabelled_paths = [f for f in unlabelled_paths if f not in skipped]

    paths, targets = _labelled_paths(train_scan, classes, skipped)
    labelled = ImageSet(paths, torch.tensor(targets), size)
    if "val" in split_scans:
        val_paths, val_targets = _labelled_paths(split_scans["val"], classes, skipped)
        val = ImageSet(val_paths, torch.tensor(val_targets), size)
    else:
        labelled, val = carve_validation(labelled, val_per_class, seed)
        paths = list(labelled.source)
    if labels_per_class is not None:
        lab_idx, unl_idx = split_labels_per_class(labelled.labels, labels_per_class, seed)
        unlabelled_paths += [paths[i] for i in unl_idx]
        labelled = labelled.subset(lab_idx)
    unlabelled = ImageSet(unlabelled_paths, None, size) if unlabelled_paths else None
    test_paths, test_targets = _labelled_paths(split_scans["test"], classes, skipped)
    if not test_paths:
        raise ValueError(f"test folder {os.path.join(root, 'test')!r} holds no readable images")
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
    skip_bad_images: bool = False,
) -> DataSplits:
    """One of the paper's six torchvision data sets from ``root`` (downloads only if ``download``).

    Every item is read (decoded, resized) into memory here, before training; an unreadable item
    raises ``ValueError`` naming its file, or with ``skip_bad_images`` is listed and left out."""
    import torchvision.datasets as tvd
    from torchvision.transforms import v2

    key = name.lower()
    to_tensor = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    # data set -> (class, the splits training draws from, the test split), each split the keyword
    # arguments of one torchvision instance. The training pools are the TOFA paper's (Table 2):
    # Aircraft 6,667 = trainval, Cars 8,144 = train, Pets 3,680 = trainval, Flowers 2,040 = train +
    # val (Flowers102's "train" alone holds 1,020).
    table: dict[str, tuple[Any, tuple[dict[str, Any], ...], dict[str, Any]]] = {
        "cifar10": (tvd.CIFAR10, ({"train": True},), {"train": False}),
        "cifar100": (tvd.CIFAR100, ({"train": True},), {"train": False}),
        "flowers102": (tvd.Flowers102, ({"split": "train"}, {"split": "val"}), {"split": "test"}),
        "oxfordiiitpet": (tvd.OxfordIIITPet, ({"split": "trainval"},), {"split": "test"}),
        "stanfordcars": (tvd.StanfordCars, ({"split": "train"},), {"split": "test"}),
        "fgvcaircraft": (tvd.FGVCAircraft, ({"split": "trainval"},), {"split": "test"}),
    }
    if key not in table:
        raise ValueError(f"unknown torchvision data set {name!r}; available: {list(TORCHVISION_SETS)}")
    cls, train_kws, test_kw = table[key]
    try:
        trains = [cls(root, download=download, **kw) for kw in train_kws]
        test = cls(root, download=download, **test_kw)
    except RuntimeError as exc:
        raise ValueError(f"{name} not found under {root!r} ({exc}); pass --download to fetch it") from exc

    def where(kw: dict[str, Any]) -> str:
        return f"{name} {kw.get('split', 'train' if kw.get('train') else 'test')} split under {root}"

    train_set = ImageSet.concatenate(
        [_materialise(ds, to_tensor, size, where(kw), skip_bad_images) for ds, kw in zip(trains, train_kws)]
    )
    test_set = _materialise(test, to_tensor, size, where(test_kw), skip_bad_images)
    train_set, val = carve_validation(train_set, val_per_class, seed)
    classes = [str(c) for c in getattr(trains[0], "classes", range(int(train_set.labels.max()) + 1))]
    unlabelled = None
    if labels_per_class is not None:
        lab_idx, unl_idx = split_labels_per_class(train_set.labels, labels_per_class, seed)
        unlabelled = train_set.subset(unl_idx)
        unlabelled.labels = None
        train_set = train_set.subset(lab_idx)
    return DataSplits(train_set, unlabelled, test_set, classes, size, flip=True, name=key, val=val)


def _item_name(ds: Any, index: int) -> str:
    """The file behind item ``index`` of a torchvision data set, where the set says (the file-backed
    ones keep their paths in these private lists), else ``ClassName[index]``."""
    for attribute in ("_image_files", "_images", "_samples"):
        files = getattr(ds, attribute, None)
        if isinstance(files, Sequence) and 0 <= index < len(files):
            entry = files[index]
            return str(entry[0] if isinstance(entry, tuple) else entry)
    return f"{type(ds).__name__}[{index}]"


def _materialise(ds: Any, transform: Callable, size: int, where: str, skip_bad_images: bool) -> ImageSet:
    """Every (image, target) item of ``ds`` through ``transform`` into one in-memory :class:`ImageSet`."""

    def read(index: int) -> tuple[torch.Tensor, int] | UnreadableImage:
        try:
            img, target = ds[index]
            return transform(img), int(target)
        except Exception as exc:  # PIL and the data sets' own readers fail in many types
            return UnreadableImage(_item_name(ds, index), f"{type(exc).__name__}: {exc}")

    items = _parallel_map(read, range(len(ds)), f"reading {where}")
    bad = [item for item in items if isinstance(item, UnreadableImage)]
    _refuse_or_skip(bad, len(items), where, skip_bad_images)
    good = [item for item in items if not isinstance(item, UnreadableImage)]
    if not good:
        raise ValueError(f"{where} holds no readable images")
    return ImageSet(torch.stack([img for img, _ in good]), torch.tensor([t for _, t in good]), size)


def load_data(
    data: str,
    size: int,
    labels_per_class: int | None,
    seed: int,
    root: str = "data",
    download: bool = False,
    val_per_class: int | None = None,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Dispatch on ``--data``: ``digits``, a torchvision data-set name, or an ImageFolder path.

    ``skip_bad_images`` lists and leaves out images that do not decode instead of refusing the data
    (the embedded digits set is in memory and has none)."""
    if data == "digits":
        per_class = labels_per_class if labels_per_class is not None else 20
        return load_digits(per_class, seed, size, val_per_class=val_per_class)
    if data.lower() in TORCHVISION_SETS:
        return load_torchvision(data, root, size, labels_per_class, seed, download, val_per_class, skip_bad_images)
    from .idx_data import IDX_SETS, load_idx  # idx_data builds on this module: imported here, not at the top

    if data.lower() in IDX_SETS:
        return load_idx(data.lower(), root, size, labels_per_class, seed, val_per_class)
    if os.path.isdir(data):
        return load_image_folder(data, size, labels_per_class, seed, val_per_class, skip_bad_images)
    raise ValueError(
        f"--data {data!r} is neither 'digits', 'mnist', 'fashion-mnist', a torchvision data set "
        f"({', '.join(TORCHVISION_SETS)}) nor an existing folder"
    )


def load_run_data(config: TrainConfig, space: SearchSpace) -> DataSplits:
    """The data of a training run: ``config``'s source and splits, stored at ``config.image_size``
    (default: the largest resolution of ``space``)."""
    return load_data(
        config.data,
        config.image_size or max(space.resolutions),
        config.labels_per_class,
        config.seed,
        config.data_root,
        config.download,
        config.val_per_class,
        config.skip_bad_images,
    )


# -- image size and the default space -------------------------------------------------------------

#: Native image side, in pixels, of the named data sets: exact for digits (8×8), MNIST and
#: Fashion-MNIST (IDX, 28×28) and CIFAR (32×32); for the other torchvision sets, whose images vary,
#: the approximate median shorter side.
KNOWN_IMAGE_SIZES: dict[str, int] = {
    "digits": 8,
    "mnist": 28,
    "fashion-mnist": 28,
    "cifar10": 32,
    "cifar100": 32,
    "flowers102": 500,
    "oxfordiiitpet": 375,
    "stanfordcars": 400,
    "fgvcaircraft": 700,
}

#: (largest native side, space preset) in increasing order; the first that fits the images wins.
#: "digits" (24–32 px) suits up to MNIST's 28 px, "rss" (32 px, the RSS paper's CIFAR/MNIST space)
#: small images up to 64 px; larger images get "tofa" (ImageNet-style strides, 272–320 px).
SPACE_BY_IMAGE_SIZE: tuple[tuple[int | None, str], ...] = ((28, "digits"), (64, "rss"), (None, "tofa"))


def native_image_size(data: str, root: str = "data", sample: int = 16) -> int:
    """The side length, in pixels, of the images ``--data`` holds, without loading the data set.

    ``digits`` → 8 (scikit-learn's 8×8 digits, before upsampling); ``mnist`` / ``fashion-mnist``
    → 28; a torchvision set → its entry in :data:`KNOWN_IMAGE_SIZES` (``root`` is not read); an
    ImageFolder path → the median shorter side of up to ``sample`` images, read from their headers
    only (a few per class of ``train/``, or of the folder itself when it has no ``train/``), so the
    cost does not grow with the tree. Raises ``ValueError`` naming ``data`` when it is none of these
    or no sampled header is readable.
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be a positive integer, got {sample!r}")
    key = data.lower()
    if key in KNOWN_IMAGE_SIZES:
        return KNOWN_IMAGE_SIZES[key]
    if not os.path.isdir(data):
        raise ValueError(
            f"--data {data!r} is neither a known data set ({', '.join(KNOWN_IMAGE_SIZES)}) nor an existing folder"
        )
    from PIL import Image

    sides = []
    for path in _sample_image_files(data, sample):
        try:
            with Image.open(path) as im:  # reads the header only
                sides.append(min(im.size))
        except Exception:  # an unreadable file is load_data's to report; the others tell the size
            continue
    if not sides:
        raise ValueError(f"found no readable image in {data!r} to tell its image size")
    return int(statistics.median_low(sides))


def _sample_image_files(root: str, sample: int) -> list[str]:
    """Up to ``sample`` image paths from class folders spread evenly over ``root/train`` (or
    ``root``), listing only the directories it takes them from."""
    base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    folders = sorted(e.path for e in os.scandir(base) if e.is_dir() and not _is_hidden(e.name)) or [base]
    picked = [folders[i * len(folders) // min(sample, len(folders))] for i in range(min(sample, len(folders)))]
    per_folder = -(-sample // len(picked))
    chosen = [path for folder in picked for path in itertools.islice(_iter_image_files(folder), per_folder)]
    return chosen[:sample]


def _iter_image_files(folder: str) -> Iterator[str]:
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for f in sorted(files):
            if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(dirpath, f)


def default_space_for_size(native_size: int) -> tuple[str, int]:
    """The default search space for images of side ``native_size`` pixels, and the base resolution to
    store them at (the space's largest input resolution).

    Small images (≤ 64 px) get a small-image space near their native size, so training does not
    upsample them to ImageNet resolutions: ≤ 28 px (digits, MNIST) → ``("digits", 32)``,
    29–64 px (CIFAR) → ``("rss", 32)``; larger images → ``("tofa", 320)``. See
    :data:`SPACE_BY_IMAGE_SIZE`.
    """
    if isinstance(native_size, bool) or not isinstance(native_size, (int, np.integer)) or native_size < 1:
        raise ValueError(f"native_size must be a positive number of pixels, got {native_size!r}")
    from .. import spaces

    name = next(space for limit, space in SPACE_BY_IMAGE_SIZE if limit is None or native_size <= limit)
    return name, max(spaces.get(name).resolutions)
