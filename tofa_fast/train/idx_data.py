"""MNIST and Fashion-MNIST from their IDX files (``--data mnist`` / ``--data fashion-mnist``), offline.

Nothing is downloaded. The four files of a set — ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or gzip-compressed (``.gz``) — are
looked for, in this order, in

1. ``ROOT`` itself (``--data-root``; the folder the files were unpacked into);
2. ``ROOT/FashionMNIST/raw`` (``ROOT/MNIST/raw``): the layout torchvision's downloader writes;
3. the system location, for Fashion-MNIST only: ``/usr/share/datasets/fashion-mnist`` (Debian / Ubuntu
   package ``dataset-fashion-mnist``).

The first folder holding any of the four files must hold all of them. So ``--data fashion-mnist``
works without ``--data-root`` once the Debian package is installed, and an explicit folder always
wins over the system copy. A plain file is preferred over its ``.gz`` beside it.

IDX (LeCun's format): two zero bytes, a type code (``0x08``: unsigned bytes), the number of
dimensions, each dimension as a big-endian int32, then the data. Images are (N, 28, 28) uint8, labels
(N,) uint8 in 0–9. Every header, size and label range is checked, and a truncated, corrupt or foreign
file is named in the error.

Images are grey; they are resized to the run's base resolution and repeated over three channels,
so every network (and ImageNet-pretrained one) sees RGB. The standard 60,000 / 10,000 split is kept
as train / test; ``val_per_class`` and ``labels_per_class`` carve the validation, labelled and
unlabelled splits out of train as for every other data set (:mod:`.data`).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataSplits, ImageSet, carve_validation, split_labels_per_class


@dataclass(frozen=True)
class IDXSet:
    """One IDX data set: its ``--data`` name, torchvision folder, system folder and class names."""

    name: str
    torchvision_folder: str
    system_folder: str | None
    classes: tuple[str, ...]
    flip: bool  # whether a horizontal flip keeps the label (clothes: yes; digits: no)


IDX_SETS: dict[str, IDXSet] = {
    "fashion-mnist": IDXSet(
        "fashion-mnist",
        "FashionMNIST",
        "/usr/share/datasets/fashion-mnist",
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        flip=True,
    ),
    "mnist": IDXSet("mnist", "MNIST", None, tuple(str(d) for d in range(10)), flip=False),
}

#: split → (images file, labels file), without the optional ``.gz``.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """The uint8 array of the IDX file ``path`` (gzip-compressed or not), which must have ``ndim``
    dimensions. Raises ``ValueError`` naming the file when it is truncated, corrupt or not such IDX."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:  # by content, not by name: a renamed file still reads
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"IDX file {str(path)!r} could not be read or decompressed: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"IDX file {str(path)!r} does not start with an IDX header (magic {raw[:4].hex() or 'empty'})")
    dtype, dims = raw[2], raw[3]
    if dtype != _UBYTE or dims != ndim:
        raise ValueError(
            f"IDX file {str(path)!r} holds type 0x{dtype:02x} with {dims} dimensions; "
            f"expected unsigned bytes (0x08) with {ndim} (magic 0x0000080{ndim})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {str(path)!r} is {what}: header says {'×'.join(map(str, shape))} values "
            f"({expected} bytes), the file holds {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz`` (subsets of a
    set for experiments, test fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def idx_folders(name: str, root: str | os.PathLike | None) -> list[Path]:
    """The folders searched for data set ``name`` under ``root``, in order (module docstring)."""
    spec = _spec(name)
    folders = []
    if root is not None:
        folders += [Path(root).expanduser(), Path(root).expanduser() / spec.torchvision_folder / "raw"]
    if spec.system_folder is not None:
        folders.append(Path(spec.system_folder))
    return folders


def find_idx_files(name: str, root: str | os.PathLike | None) -> dict[str, Path]:
    """The four IDX files of ``name`` (keys ``train-images``, ``train-labels``, ``t10k-images``,
    ``t10k-labels``) from the first folder that holds any of them.

    Raises:
        FileNotFoundError: no folder holds them (the message lists the folders and file names looked
            for and how to get them), or the first folder that holds some lacks others (named).
    """
    wanted = [stem for pair in IDX_FILES.values() for stem in pair]
    folders = idx_folders(name, root)
    for folder in folders:
        found = {stem: _existing(folder / stem) for stem in wanted}
        if not any(found.values()):
            continue
        missing = [f"{stem}[.gz]" for stem, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(f"{name}: {str(folder)!r} holds some of its IDX files but not {missing}")
        return {"-".join(stem.split("-")[:2]): path for stem, path in found.items()}
    hint = (
        "install the Debian/Ubuntu package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or "
        if _spec(name).system_folder
        else ""
    )
    raise FileNotFoundError(
        f"{name}: none of {[f'{stem}[.gz]' for stem in wanted]} found in {[str(f) for f in folders]}; "
        f"{hint}put the four IDX files in --data-root (plain or .gz)"
    )


def _existing(stem: Path) -> Path | None:
    for candidate in (stem, stem.with_name(stem.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _spec(name: str) -> IDXSet:
    try:
        return IDX_SETS[name]
    except KeyError:
        raise ValueError(f"unknown IDX data set {name!r}; available: {list(IDX_SETS)}") from None


def read_idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) of one split, checked against each other."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(
            f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r} {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError(f"{str(labels_path)!r} holds no labels")
    if labels.max() >= num_classes:
        raise ValueError(f"{str(labels_path)!r} holds label {int(labels.max())}; expected 0–{num_classes - 1}")
    return images, labels


def to_rgb_images(grey: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) grey images → uint8 (N, 3, size, size): resized (bilinear, antialiased) and
    repeated over three channels."""
    images = torch.from_numpy(grey.copy()).unsqueeze(1)
    if images.shape[-1] != size or images.shape[-2] != size:
        out = torch.empty(len(images), 1, size, size, dtype=torch.uint8)
        # In chunks: the float copy of all 60,000 images at once would be the memory peak.
        for start in range(0, len(images), 4096):
            chunk = images[start : start + 4096].float()
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out[start : start + 4096] = chunk.round().clamp(0, 255).to(torch.uint8)
        images = out
    return images.expand(-1, 3, -1, -1).contiguous()


def load_idx(
    name: str,
    root: str | os.PathLike | None,
    size: int,
    labels_per_class: int | None = None,
    seed: int = 0,
    val_per_class: int | None = None,
) -> DataSplits:
    """MNIST or Fashion-MNIST (``name`` ``"mnist"`` / ``"fashion-mnist"``) from IDX files under
    ``root`` (lookup order in the module docstring) as :class:`DataSplits`: the official test split;
    ``val_per_class`` validation images per class held out of train first; then ``labels_per_class``
    labelled images per class and the rest unlabelled (all of train labelled when ``None``).
    Images are uint8 (3, ``size``, ``size``)."""
    spec = _spec(name)
    files = find_idx_files(name, root)
    train_images, train_labels = read_idx_split(files["train-images"], files["train-labels"], len(spec.classes))
    test_images, test_labels = read_idx_split(files["t10k-images"], files["t10k-labels"], len(spec.classes))
    train = ImageSet(to_rgb_images(train_images, size), torch.from_numpy(train_labels.astype(np.int64)), size)
    test = ImageSet(to_rgb_images(test_images, size), torch.from_numpy(test_labels.astype(np.int64)), size)
    train, val = carve_validation(train, val_per_class, seed)
    unlabelled = None
    if labels_per_class is not None:
        lab_idx, unl_idx = split_labels_per_class(train.labels, labels_per_class, seed)
        train, unlabelled = train.subset(lab_idx), train.subset(unl_idx)
        unlabelled.labels = None
    return DataSplits(train, unlabelled, test, list(spec.classes), size, flip=spec.flip, name=name, val=val)
