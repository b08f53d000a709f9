"""--data fashion-mnist / mnist: IDX files (plain or gzip) read offline, checked, split like every data set.

The tests write tiny IDX files themselves; the real Fashion-MNIST (Debian package
dataset-fashion-mnist) is checked only where it is installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tofa_fast.train.data import load_data
from tofa_fast.train.idx_data import IDX_SETS, find_idx_files, read_idx, write_idx

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 6, 2


def write_set(folder: Path, compress: bool, seed: int = 0, side: int = 28) -> dict[str, np.ndarray]:
    """The four files of a tiny set in ``folder``; images encode their label in their brightness."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = rng.permutation(np.repeat(np.arange(CLASSES, dtype=np.uint8), per_class))
        images = np.repeat(labels * 20, side * side).reshape(-1, side, side).astype(np.uint8)
        arrays[f"{split}-images"], arrays[f"{split}-labels"] = images, labels
        for kind, array, dims in (("images", images, 3), ("labels", labels, 1)):
            write_idx(folder / f"{split}-{kind}-idx{dims}-ubyte{'.gz' if compress else ''}", array)
    return arrays


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Fashion-MNIST's system folder pointed at an empty place, so tests see only their own files."""
    spec = dataclasses.replace(IDX_SETS["fashion-mnist"], system_folder=str(tmp_path / "system"))
    monkeypatch.setitem(IDX_SETS, "fashion-mnist", spec)
    return tmp_path / "system"


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_reads_and_splits(tmp_path, no_system_copy, compress, layout):
    root = tmp_path / "root"
    arrays = write_set(root if layout == "flat" else root / "FashionMNIST" / "raw", compress)
    splits = load_data("fashion-mnist", 32, labels_per_class=2, seed=1, root=str(root), val_per_class=1)
    assert splits.name == "fashion-mnist" and splits.classes[0] == "T-shirt/top" and splits.num_classes == 10
    assert splits.flip and splits.size == 32
    assert (len(splits.labelled), len(splits.val), len(splits.test)) == (20, 10, 20)
    assert len(splits.unlabelled) == CLASSES * TRAIN_PER_CLASS - 30 and splits.unlabelled.labels is None
    assert torch.equal(torch.bincount(splits.labelled.labels), torch.full((10,), 2))
    assert torch.equal(torch.bincount(splits.val.labels), torch.ones(10, dtype=torch.long))
    images = splits.test.source
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey → RGB
    # Resizing keeps each (constant) image's brightness, which encodes its label.
    assert torch.equal(images[:, 0, 5, 5].long(), torch.from_numpy(arrays["t10k-labels"]).long() * 20)
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["t10k-labels"]).long())


def test_mnist_from_torchvision_layout_without_splits(tmp_path):
    write_set(tmp_path / "MNIST" / "raw", compress=False)
    splits = load_data("mnist", 28, labels_per_class=None, seed=0, root=str(tmp_path))
    assert splits.unlabelled is None and splits.val is None and not splits.flip
    assert len(splits.labelled) == 60 and splits.classes == [str(d) for d in range(10)]
    assert splits.labelled.source.shape == (60, 3, 28, 28)


def test_lookup_order_root_then_torchvision_then_system(tmp_path, no_system_copy):
    write_set(no_system_copy, compress=True, seed=5)
    # Nothing under the root (the CLI default "data" usually does not exist): the system copy.
    found = find_idx_files("fashion-mnist", str(tmp_path / "data"))
    assert found["train-images"] == no_system_copy / "train-images-idx3-ubyte.gz"
    assert set(found) == {"train-images", "train-labels", "t10k-images", "t10k-labels"}
    write_set(tmp_path / "data" / "FashionMNIST" / "raw", compress=True)
    assert find_idx_files("fashion-mnist", str(tmp_path / "data"))["t10k-labels"].parent.name == "raw"
    write_set(tmp_path / "data", compress=False)
    assert (
        find_idx_files("fashion-mnist", str(tmp_path / "data"))["t10k-labels"]
        == tmp_path / "data" / "t10k-labels-idx1-ubyte"
    )
    assert find_idx_files("fashion-mnist", None)["train-labels"].parent == no_system_copy


def test_written_files_are_lecuns_format(tmp_path):
    write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
    assert (tmp_path / "x").read_bytes() == bytes.fromhex("00000803000000010000000200000003000102030405")


def test_plain_file_is_preferred_to_its_gz(tmp_path):
    write_set(tmp_path, compress=True)
    write_set(tmp_path, compress=False)
    assert find_idx_files("mnist", str(tmp_path))["train-images"].suffix != ".gz"


def test_missing_files_are_named_with_the_places_looked_in(tmp_path, no_system_copy):
    with pytest.raises(
        FileNotFoundError,
        match=r"fashion-mnist: none of \['train-images-idx3-ubyte\[\.gz\]'.*"
        r"apt-get install dataset-fashion-mnist",
    ) as info:
        load_data("fashion-mnist", 28, None, 0, root=str(tmp_path / "nowhere"))
    for folder in (tmp_path / "nowhere", tmp_path / "nowhere" / "FashionMNIST" / "raw", no_system_copy):
        assert repr(str(folder)) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"mnist: none of .*put the four IDX files in --data-root"):
        load_data("mnist", 28, None, 0, root=str(tmp_path))
    write_set(tmp_path / "partial", compress=True)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"partial' holds some of its IDX files but not \['t10k-labels-idx1-ubyte\[\.gz\]'\]"
    ):
        load_data("mnist", 28, None, 0, root=str(tmp_path / "partial"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-5], r"is truncated: header says 60×28×28 values \(47056 bytes\), the file holds 47051"),
        (lambda raw: raw + b"\0", r"is longer than its header says"),
        (lambda raw: raw[:10], r"is truncated inside its header \(10 bytes\)"),
        (lambda raw: b"PK\x03\x04" + raw[4:], r"does not start with an IDX header \(magic 504b0304\)"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], r"holds type 0x0d with 3 dimensions; expected unsigned bytes"),
        (lambda raw: b"\x1f\x8b" + raw[2:100], r"could not be read or decompressed"),
        (lambda raw: b"", r"does not start with an IDX header \(magic empty\)"),
    ],
)
def test_corrupt_files_are_named(tmp_path, damage, message):
    write_set(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_data("mnist", 28, None, 0, root=str(tmp_path))
    assert str(path) in str(info.value)


def test_images_and_labels_must_agree(tmp_path):
    arrays = write_set(tmp_path, compress=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels, arrays["t10k-labels"][:-1])
    with pytest.raises(ValueError, match=r"holds 20 images but .*t10k-labels-idx1-ubyte' 19 labels"):
        load_data("mnist", 28, None, 0, root=str(tmp_path))
    write_idx(labels, np.full(20, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte' holds label 10; expected 0–9"):
        load_data("mnist", 28, None, 0, root=str(tmp_path))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-labels"])  # a labels file
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte' holds type 0x08 with 1 dimensions; expected .* with 3"
    ):
        load_data("mnist", 28, None, 0, root=str(tmp_path))


def test_splits_that_do_not_fit_name_the_setting(tmp_path):
    write_set(tmp_path, compress=False)
    with pytest.raises(ValueError, match=r"labels_per_class=6 but class \d has only 6 training images"):
        load_data("mnist", 28, 6, 0, root=str(tmp_path))


@pytest.mark.skipif(
    not Path(IDX_SETS["fashion-mnist"].system_folder).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_the_debian_package_holds_fashion_mnist():
    files = find_idx_files("fashion-mnist", None)
    assert all(path.suffix == ".gz" for path in files.values())
    labels = read_idx(files["train-labels"], 1)
    assert labels.shape == (60000,) and np.array_equal(np.bincount(labels), np.full(10, 6000))
    assert read_idx(files["t10k-labels"], 1).shape == (10000,)
    assert read_idx(files["t10k-images"], 3).shape == (10000, 28, 28)
